"""PaliGemma: a prefix-LM (image tokens and prompt read each other) behind the family interface.

As for the families in ``test_families.py`` (which runs its shared checks, the planted grid cell
among them, with ``REFERENCES`` and ``PLANTS`` below): captured stages equal HF's own outputs
exactly on sdpa, eager and Gemma2, a padded batch of two prompts equals its rows run alone,
inputs equal the HF processor's, and ``save_pretrained`` round-trips.
Specific to the prefix: seglens' native mask equals the one HF builds from ``token_type_ids``; an
empty spec (and the native ``BidirectionalPrefix``) changes nothing bit for bit; perturbing image
slot j moves earlier slots natively but not under ``CausalImage`` or ``CausalPrefix``, and
``CausalPrefix`` is the plain causal LLM.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.masking_utils import create_causal_mask

from conftest import TWO_PROMPTS, hf_forward_last
from family_checks import earlier_slots_move, gather
from seglens.interventions import (
    BidirectionalImage,
    BidirectionalPrefix,
    CausalImage,
    CausalPrefix,
    Knockout,
    TokenSet,
    allowed_edges,
    build_attention_mask,
    intervene,
)
from seglens.models.vlm import Batch


@pytest.fixture(scope="module")
def paligemma_models():
    """Cache of tiny PaliGemma models keyed by (attention backend, LLM: gemma or gemma2)."""
    from seglens.models import load_model, tiny_model

    cache = {}

    def get(attn: str = "sdpa", text: str = "gemma"):
        if (attn, text) not in cache:
            cache[attn, text] = (
                load_model("tiny-paligemma", dtype="float32", attn_implementation=attn)
                if text == "gemma"
                else tiny_model("paligemma", text=text, attn_implementation=attn)
            )
        return cache[attn, text]

    return get


@pytest.fixture(params=[("sdpa", "gemma"), ("eager", "gemma"), ("eager", "gemma2")], ids=str)
def vlm(request, paligemma_models):
    return paligemma_models(*request.param)


@pytest.fixture
def batch(vlm, random_images):
    """Two images, two prompt lengths: the shorter row is right-padded."""
    out = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    assert not out.attention_mask.all()
    return out


def hf_forward(vlm, batch, attention_mask=None, token_type_ids="prefix"):
    """HF's own forward -> (output with hidden_states, output of the last block before the norm).

    ``token_type_ids="prefix"``: zeros, as ``PaliGemmaProcessor`` gives every token of a prompt
    without suffix; ``attention_mask`` defaults to the batch's 2D padding mask.
    """
    if isinstance(token_type_ids, str):
        token_type_ids = torch.zeros_like(batch.input_ids)
    return hf_forward_last(
        vlm.model,
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask if attention_mask is None else attention_mask,
        token_type_ids=token_type_ids,
    )


def paligemma_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's outputs: hidden_states, get_image_features, the tower's states."""
    inner = vlm.model.model
    out, last = hf_forward(vlm, batch)
    with torch.no_grad():
        tower = inner.vision_tower(batch.pixel_values, output_hidden_states=True)
        adapter = inner.get_image_features(batch.pixel_values).pooler_output
    pos, L = batch.image_positions, vlm.num_llm_layers
    ref = {f"vision.{i}": tower.hidden_states[i] for i in range(1, len(tower.hidden_states))}
    ref["encoder"] = tower.last_hidden_state
    ref["adapter"] = adapter
    ref["llm.0"] = gather(out.hidden_states[0], pos)  # the LLM input embeddings
    ref.update({f"llm.{i}": gather(out.hidden_states[i], pos) for i in range(1, L)})
    ref[f"llm.{L}"] = gather(last, pos)
    ref["llm.final_norm"] = gather(out.hidden_states[L], pos)
    return ref


def paligemma_plant(vlm, r: int, c: int, batch_size: int):
    """Add 10 to patch (r, c) of SigLIP's post-layernorm grid (one patch per token)."""
    g_rows, g_cols = vlm.grid

    def plant(_m, _a, out):
        grid = out.clone().view(out.shape[0], g_rows, g_cols, out.shape[-1])
        grid[:, r, c] += 10.0
        return grid.view(out.shape)

    return vlm.model.model.vision_tower.post_layernorm.register_forward_hook(plant)


REFERENCES = {"paligemma": paligemma_reference}
PLANTS = {"paligemma": paligemma_plant}


def causal_mask(batch, backend: str, dtype=torch.float32) -> torch.Tensor:
    """The plain causal LLM's (B, 1, T, T) mask, built by hand (causal and real keys)."""
    T = batch.input_ids.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & batch.attention_mask.bool()[:, None]
    allowed |= torch.diag_embed(~allowed.any(-1))
    allowed = allowed[:, None]
    if backend == "sdpa":
        return allowed
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)


# --- stages and layout --------------------------------------------------------------------------
def test_stages_equal_independent_paths(vlm, batch):
    got = vlm.capture(batch, vlm.stages)
    ref = paligemma_reference(vlm, batch)
    assert torch.equal(got["adapter"], ref["llm.0"])  # projector output = LLM input at images
    for stage, tensor in got.items():
        assert tensor.shape[:2] == (2, vlm.num_image_tokens), stage
        assert tensor.shape[2] == vlm.family.stage_widths()[stage], stage
        assert torch.equal(tensor, ref[stage]), stage
    L = vlm.num_llm_layers
    assert not torch.allclose(got[f"llm.{L}"], got["llm.final_norm"])
    assert not torch.equal(got["encoder"], got[f"vision.{vlm.family.num_vision_layers}"])


def test_pixel_patch_feeds_its_slot(paligemma_models, random_images):
    """Pixels of patch (r, c) feed the patch embedding of slot r * g + c (SigLIP raster order)."""
    vlm = paligemma_models()
    batch = vlm.prepare(random_images(1))
    p, g = vlm.patch_size, vlm.grid[1]
    embeddings = vlm.model.model.vision_tower.embeddings
    with torch.no_grad():
        clean = embeddings(batch.pixel_values)
        for r, c in [(0, 1), (g - 1, 0), (3, g - 2)]:
            pixels = batch.pixel_values.clone()
            pixels[:, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 1.0
            changed = (embeddings(pixels) - clean).abs().amax(-1)[0] > 1e-6
            assert changed.nonzero().flatten().tolist() == [r * g + c]


def test_padded_rows_equal_single_images(vlm, random_images):
    images = random_images(2)
    both = vlm.capture(vlm.prepare(images, prompts=TWO_PROMPTS))
    for b in range(2):
        one = vlm.capture(vlm.prepare(images[b : b + 1], prompts=TWO_PROMPTS[b : b + 1]))
        for stage in one:
            torch.testing.assert_close(both[stage][b : b + 1], one[stage], rtol=1e-4, atol=1e-5)


def test_inputs_match_the_hf_processor(paligemma_models, random_images):
    """Ids, padding and prefix equal PaliGemmaProcessor's; pixels too on an S x S image."""
    from PIL import Image

    vlm = paligemma_models()
    S = vlm.geometry.size
    images = random_images(2, S, S)
    batch = vlm.prepare(images, prompts=TWO_PROMPTS)
    ref = vlm.processor(
        text=[f"<image>{p}" for p in TWO_PROMPTS],
        images=[Image.fromarray(x) for x in images],
        return_tensors="pt",
        padding=True,
    )
    assert torch.equal(ref["input_ids"], batch.input_ids)
    assert torch.equal(ref["attention_mask"], batch.attention_mask)
    assert torch.equal(
        (ref["token_type_ids"] == 0) & ref["attention_mask"].bool(), batch.prefix_mask
    )
    torch.testing.assert_close(ref["pixel_values"], batch.pixel_values, rtol=0, atol=1e-5)
    ids = batch.input_ids[0].tolist()
    n, bos = vlm.num_image_tokens, vlm.processor.tokenizer.bos_token_id
    assert ids[:n] == [vlm.image_token_id] * n and ids[n] == bos  # image first, then BOS
    assert batch.image_positions[0].tolist() == list(range(n))


def test_save_pretrained_roundtrip(paligemma_models, random_images, tmp_path):
    from seglens.models import load_model

    vlm = paligemma_models()
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.family.name == "paligemma"
    assert loaded.geometry == vlm.geometry and loaded.grid == vlm.grid
    a = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    b = loaded.prepare(random_images(2), prompts=TWO_PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.prefix_mask, b.prefix_mask)
    b.pixel_values = a.pixel_values
    ref, got = vlm.capture(a), loaded.capture(b)
    for stage in ref:
        assert torch.equal(ref[stage], got[stage]), stage


def test_info_reports_the_prefix(paligemma_models):
    info = paligemma_models().info()
    assert info["family"] == "paligemma" and info["native_image_attention"] == "prefix"
    assert info["grid"] == [8, 8] and info["geometry"] == "resize"


# --- attention: the native prefix and its causal counterparts -----------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_native_mask_equals_hf(paligemma_models, random_images, backend):
    """``BidirectionalPrefix`` = HF's mask from ``token_type_ids`` on every real query row."""
    vlm = paligemma_models(backend)
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    B, T = batch.input_ids.shape
    token_type_ids = torch.zeros_like(batch.input_ids)  # what the processor gives
    hf = create_causal_mask(
        config=vlm.model.config.get_text_config(),
        inputs_embeds=torch.zeros(B, T, 8),
        attention_mask=batch.attention_mask,
        past_key_values=None,
        position_ids=torch.arange(T)[None] + 1,
        block_sequence_ids=torch.where(token_type_ids == 0, 0, -1),
    )
    ours = build_attention_mask([BidirectionalPrefix()], batch, backend=backend)
    real = batch.attention_mask.bool()
    for b in range(B):
        assert torch.equal(ours[b, 0][real[b]], hf[b, 0][real[b]])
    # the prompt reads later prompt tokens, and the image reads the prompt
    open_ = ours[0, 0] if backend == "sdpa" else ours[0, 0] == 0
    assert open_[: int(real[0].sum())][:, : int(real[0].sum())].all()


def test_empty_spec_changes_nothing(vlm, batch):
    """intervene() starts from the native prefix: [] and [BidirectionalPrefix()] are no-ops."""
    ref = vlm.capture(batch)
    for specs in ([], [BidirectionalPrefix()], [BidirectionalPrefix(), BidirectionalImage()]):
        with intervene(vlm, specs):
            got = vlm.capture(batch)
        for stage in ref:
            assert torch.equal(got[stage], ref[stage]), (specs, stage)


def test_perturbation_respects_the_prefix(vlm, batch):
    """Natively bidirectional: earlier slots move; not under CausalImage or CausalPrefix."""
    assert vlm.family.native_image_attention == "prefix"
    assert earlier_slots_move(vlm, batch)
    assert not earlier_slots_move(vlm, batch, [CausalImage()])
    assert not earlier_slots_move(vlm, batch, [CausalPrefix()])
    assert earlier_slots_move(vlm, batch, [BidirectionalImage()])
    # a knockout of the last image slot leaves the native prefix in place
    keys = TokenSet.from_slots([vlm.num_image_tokens - 1])
    assert earlier_slots_move(vlm, batch, [Knockout(keys=keys)])


def test_causal_prefix_is_the_causal_llm(vlm, batch):
    """CausalPrefix = HF with a causal 4D mask; CausalImage gives the same image states."""
    stages = [f"llm.{i}" for i in range(1, vlm.num_llm_layers + 1)]
    with intervene(vlm, [CausalPrefix()]):
        prefix = vlm.capture(batch, stages)
    with intervene(vlm, [CausalImage()]):
        image = vlm.capture(batch, stages)
    out, _ = hf_forward(vlm, batch, attention_mask=causal_mask(batch, vlm.attn_implementation))
    for i, stage in enumerate(stages[:-1], start=1):
        assert torch.equal(prefix[stage], gather(out.hidden_states[i], batch.image_positions))
    for stage in stages:
        assert torch.equal(image[stage], prefix[stage]), stage
    native = vlm.capture(batch, stages)
    assert not torch.allclose(native[stages[-1]], prefix[stages[-1]])


def test_gemma2_sliding_window_guard(paligemma_models):
    vlm = paligemma_models("eager", "gemma2")  # HF: Gemma2 has no sdpa
    T = vlm.model.config.text_config.sliding_window + 1
    ids = torch.zeros(1, T, dtype=torch.long)
    with pytest.raises(ValueError, match=r"at most sliding_window=512 tokens \(got 513\)"):
        vlm.family.forward(ids, None, torch.ones(1, 1, T, T, dtype=torch.bool))


# --- the mask builder on a hand-made prefix batch -----------------------------------------------
def prefix_batch() -> Batch:
    """Row 0: image slots 0..3, prompt 4..7, suffix 8..9; row 1: 8 real tokens, 2 padded."""
    T = 10
    attention = torch.ones(2, T, dtype=torch.long)
    attention[1, 8:] = 0
    prefix = torch.zeros(2, T, dtype=torch.bool)
    prefix[0, :8] = True
    prefix[1, :8] = True
    return Batch(
        input_ids=torch.zeros(2, T, dtype=torch.long),
        attention_mask=attention,
        pixel_values=torch.zeros(2, 3, 1, 1),
        image_positions=torch.arange(4).expand(2, 4),
        prefix_mask=prefix,
    )


def test_prefix_specs_on_the_mask():
    batch = prefix_batch()
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    plain = allowed_edges([], batch)
    wide = allowed_edges([BidirectionalPrefix()], batch)
    assert wide[:, :8, :8].all()  # image and prompt read each other
    assert torch.equal(wide[0, 8:], causal[8:])  # the suffix stays causal
    assert not wide[0, :8, 8:].any()  # the prefix never reads the suffix
    assert torch.equal(allowed_edges([BidirectionalPrefix(), CausalPrefix()], batch), plain)
    cut = allowed_edges([BidirectionalPrefix(), CausalImage()], batch)
    assert torch.equal(cut[:, :4], plain[:, :4])  # image rows: causal
    assert torch.equal(cut[:, 4:], wide[:, 4:])  # prompt rows: still bidirectional
    assert torch.equal(allowed_edges([CausalImage()], batch), plain)
    assert torch.equal(allowed_edges([BidirectionalImage(), CausalPrefix()], batch), plain)
    eager = build_attention_mask([BidirectionalPrefix()], batch, backend="eager")
    assert torch.equal(eager.eq(0), wide[:, None])
    # without a prefix mask the prefix is every real token
    batch.prefix_mask = None
    assert allowed_edges([BidirectionalPrefix()], batch)[0].all()


def test_prefix_specs_never_empty_a_row():
    batch = prefix_batch()
    specs = [
        BidirectionalPrefix(),
        CausalPrefix(),
        CausalImage(),
        BidirectionalImage(),
        Knockout(keys="all"),
        Knockout(queries="text", keys="image"),
    ]
    rng = np.random.default_rng(0)
    real = batch.attention_mask.bool()
    for _ in range(30):
        chosen = [specs[i] for i in rng.choice(len(specs), rng.integers(0, 4), replace=False)]
        allowed = allowed_edges(chosen, batch)
        assert allowed.any(-1).all(), chosen
        assert not (allowed & real[:, :, None] & ~real[:, None, :]).any(), chosen


def test_prefix_spec_errors(paligemma_models):
    with pytest.raises(ValueError, match=r"BidirectionalPrefix: layers must be None"):
        BidirectionalPrefix(layers=())
    with pytest.raises(ValueError, match=r"CausalPrefix: layers must be None"):
        CausalPrefix(layers=[1])
    vlm = paligemma_models()
    with (
        pytest.raises(ValueError, match=r"CausalPrefix asks for layer 5, .* 1\.\.4"),
        intervene(vlm, [CausalPrefix(layers=(5,))]),
    ):
        pass
    with pytest.raises(TypeError, match="BidirectionalPrefix or CausalPrefix"), intervene(vlm, [1]):
        pass
    assert vlm.attention_mask_override is None


def test_prefix_window_applies_to_its_layers_only(paligemma_models, random_images):
    """CausalPrefix on layers 3-4: layers 1-2 equal the native model, later ones move."""
    vlm = paligemma_models()
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    stages = [f"llm.{i}" for i in range(1, 5)]
    native = vlm.capture(batch, stages)
    with intervene(vlm, [CausalPrefix(layers=(3, 4))]):
        got = vlm.capture(batch, stages)
    assert all(torch.equal(got[s], native[s]) for s in stages[:2])
    assert all(not torch.equal(got[s], native[s]) for s in stages[2:])
