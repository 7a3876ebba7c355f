"""More model families behind the same adapter interface: Gemma3 (natively bidirectional), ...

Per family: captured stages equal independent HF paths exactly; the token -> grid map is right (a
signal planted at one patch-grid cell lands on that cell's image slot, at every stage and in the
LLM input embeddings); the intervention invariants hold (an empty spec changes nothing bit for bit,
perturbing image slot j moves earlier slots only when the image block is bidirectional); a padded
batch of two prompts works; ``load_model`` and ``save_pretrained`` round-trip.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conftest import TWO_PROMPTS
from seglens.interventions import BidirectionalImage, CausalImage, Knockout, TokenSet, intervene

FAMILIES = ["gemma3"]


@pytest.fixture(scope="module")
def family_models():
    """Cache of tiny models keyed by family name."""
    from seglens.models import load_model

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(f"tiny-{name}", dtype="float32")
        return cache[name]

    return get


@pytest.fixture(params=FAMILIES)
def vlm(request, family_models):
    return family_models(request.param)


@pytest.fixture
def batch(vlm, random_images):
    """Two images, two prompt lengths: the shorter row is right-padded."""
    out = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    assert not out.attention_mask.all()
    return out


def gather(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


# --- independent HF paths, per family -----------------------------------------------------------
def gemma3_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's own outputs: hidden_states, get_image_features, the tower's states."""
    model, inner = vlm.model, vlm.model.model
    token_type_ids = (batch.input_ids == model.config.image_token_id).long()  # as the processor
    last = {}
    handle = inner.language_model.layers[-1].register_forward_hook(
        lambda _m, _a, out: last.setdefault("h", out)
    )
    try:
        with torch.no_grad():
            out = model(
                input_ids=batch.input_ids,
                pixel_values=batch.pixel_values,
                attention_mask=batch.attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=True,
            )
            tower = inner.vision_tower(batch.pixel_values, output_hidden_states=True)
            adapter = inner.get_image_features(batch.pixel_values).pooler_output
    finally:
        handle.remove()
    patches = model.config.vision_config.image_size // model.config.vision_config.patch_size
    kernel = patches // vlm.grid[0]

    def pool(h):  # (B, P, D) -> (B, N, D): the projector's pooling, done independently
        B, _, D = h.shape
        grid = h.permute(0, 2, 1).reshape(B, D, patches, patches)
        return F.avg_pool2d(grid, kernel).reshape(B, D, -1).permute(0, 2, 1)

    pos = batch.image_positions
    L = vlm.num_llm_layers
    ref = {f"vision.{i}": pool(tower.hidden_states[i]) for i in range(1, len(tower.hidden_states))}
    ref["encoder"] = pool(tower.last_hidden_state)
    ref["adapter"] = adapter
    ref["llm.0"] = gather(out.hidden_states[0], pos)  # the LLM input embeddings
    ref.update({f"llm.{i}": gather(out.hidden_states[i], pos) for i in range(1, L)})
    ref[f"llm.{L}"] = gather(last["h"], pos)
    ref["llm.final_norm"] = gather(out.hidden_states[L], pos)
    return ref


REFERENCES = {"gemma3": gemma3_reference}


def patch_grid_module(vlm):
    """Per family: (module whose output is the vision patch grid, (B, P, D) -> (B, Pr, Pc, D))."""
    if vlm.family.name == "gemma3":
        vision = vlm.model.config.vision_config
        side = vision.image_size // vision.patch_size
        module = vlm.model.model.vision_tower.post_layernorm
        return module, lambda h: h.view(h.shape[0], side, side, h.shape[-1])
    raise NotImplementedError(vlm.family.name)


def image_embeddings_module(vlm):
    """The module whose output is (B, N, D) LLM input embeddings in HF's scatter order."""
    return vlm.model.model.multi_modal_projector


# --- tests --------------------------------------------------------------------------------------
def test_stages_equal_independent_paths(vlm, batch):
    got = vlm.capture(batch, vlm.stages)
    ref = REFERENCES[vlm.family.name](vlm, batch)
    n = vlm.num_image_tokens
    assert torch.equal(got["adapter"], ref["llm.0"])  # projector output = LLM input at images
    for stage, tensor in got.items():
        assert tensor.shape[:2] == (2, n), stage
        assert tensor.shape[2] == vlm.family.stage_widths()[stage], stage
        assert torch.equal(tensor, ref[stage]), stage
    L = vlm.num_llm_layers
    assert not torch.allclose(got[f"llm.{L}"], got["llm.final_norm"])


def test_token_to_grid_map(vlm, random_images):
    """A vector added to every patch of grid cell (r, c) lands on image slot r * g + c only."""
    batch = vlm.prepare(random_images(1))
    module, as_grid = patch_grid_module(vlm)
    g_rows, g_cols = vlm.grid
    stages = ["encoder", "adapter", "llm.1"]
    clean = vlm.capture(batch, stages)
    for r, c in [(0, 0), (1, g_cols - 2), (g_rows - 1, 2)]:
        embeds = {}

        def plant(_m, _a, out, r=r, c=c):
            grid = as_grid(out.clone())
            pr, pc = grid.shape[1] // g_rows, grid.shape[2] // g_cols
            grid[:, r * pr : (r + 1) * pr, c * pc : (c + 1) * pc] += 10.0
            return grid.reshape(out.shape)

        handles = [
            module.register_forward_hook(plant),
            image_embeddings_module(vlm).register_forward_hook(
                lambda _m, _a, out, embeds=embeds: embeds.setdefault("x", out)
            ),
        ]
        try:
            planted = vlm.capture(batch, stages)
        finally:
            for h in handles:
                h.remove()
        k = r * g_cols + c
        changed = (planted["encoder"] - clean["encoder"]).abs().amax(-1)[0] > 1e-4
        assert changed.nonzero().flatten().tolist() == [k]
        changed = (planted["adapter"] - clean["adapter"]).abs().amax(-1)[0] > 1e-4
        assert changed.nonzero().flatten().tolist() == [k]
        assert torch.equal(planted["adapter"], embeds["x"].reshape(planted["adapter"].shape))


def perturbed(vlm, batch, j, specs=None):
    """Capture LLM stages with image slot j's input embedding bumped, under ``specs``."""

    def bump(_m, _a, out):
        out = out.clone()
        out.view(len(batch), vlm.num_image_tokens, -1)[:, j] += 1.0
        return out

    handle = image_embeddings_module(vlm).register_forward_hook(bump)
    try:
        return llm_stages(vlm, batch, specs)
    finally:
        handle.remove()


def llm_stages(vlm, batch, specs=None):
    stages = [f"llm.{i}" for i in range(1, vlm.num_llm_layers + 1)]
    if specs is None:
        return vlm.capture(batch, stages)
    with intervene(vlm, specs):
        return vlm.capture(batch, stages)


def earlier_slots_move(vlm, batch, specs=None) -> bool:
    """Bump image slot j; later slots must move. Return whether slots < j moved too."""
    j = vlm.num_image_tokens // 2
    base = llm_stages(vlm, batch, specs)
    bumped = perturbed(vlm, batch, j, specs)
    assert all(not torch.equal(base[s][:, j:], bumped[s][:, j:]) for s in base)
    return any(not torch.equal(base[s][:, :j], bumped[s][:, :j]) for s in base)


def test_perturbation_respects_image_attention(vlm, batch):
    """Natively bidirectional: earlier slots move, and stop moving under CausalImage."""
    native = vlm.family.native_image_attention
    assert native in ("causal", "bidirectional")
    assert earlier_slots_move(vlm, batch) == (native == "bidirectional")
    assert not earlier_slots_move(vlm, batch, [CausalImage()])
    assert earlier_slots_move(vlm, batch, [BidirectionalImage()])


def test_empty_spec_changes_nothing(vlm, batch):
    """intervene() starts from the family's own image block: [] and the native spec are no-ops."""
    ref = vlm.capture(batch)
    native = [BidirectionalImage()] if vlm.family.native_image_attention == "bidirectional" else []
    for specs in ([], native):
        with intervene(vlm, specs):
            got = vlm.capture(batch)
        for stage in ref:
            assert torch.equal(got[stage], ref[stage]), (specs, stage)


def test_knockout_keeps_the_native_image_block(vlm, batch):
    """A knockout of the last image slot leaves a bidirectional family bidirectional."""
    if vlm.family.native_image_attention != "bidirectional":
        pytest.skip("only natively bidirectional families")
    keys = TokenSet.from_slots([vlm.num_image_tokens - 1])
    assert earlier_slots_move(vlm, batch, [Knockout(keys=keys)])


def test_padded_rows_equal_single_images(vlm, random_images):
    images = random_images(2)
    both = vlm.capture(vlm.prepare(images, prompts=TWO_PROMPTS))
    for b in range(2):
        one = vlm.capture(vlm.prepare(images[b : b + 1], prompts=TWO_PROMPTS[b : b + 1]))
        for stage in one:
            torch.testing.assert_close(both[stage][b : b + 1], one[stage], rtol=1e-4, atol=1e-5)


def test_inputs_match_the_hf_processor(vlm, random_images):
    from PIL import Image

    image = random_images(1)[0]
    batch = vlm.prepare([image])
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm.prompt}]}
    ]
    text = vlm.processor.apply_chat_template(conversation, add_generation_prompt=True)
    ref = vlm.processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == batch.input_ids[0].tolist()
    assert batch.pixel_values.shape[-2:] == (vlm.geometry.size, vlm.geometry.size)


def test_save_pretrained_roundtrip(vlm, random_images, tmp_path):
    from seglens.models import load_model

    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.family.name == vlm.family.name
    assert loaded.geometry == vlm.geometry and loaded.grid == vlm.grid
    images = random_images(2)
    a = vlm.prepare(images, prompts=TWO_PROMPTS)
    b = loaded.prepare(images, prompts=TWO_PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids)
    ref, got = vlm.capture(a), loaded.capture(b)
    for stage in ref:
        assert torch.equal(ref[stage], got[stage]), stage


def test_info_reports_the_family(vlm):
    info = vlm.info()
    assert info["family"] == vlm.family.name
    assert info["num_image_tokens"] == vlm.grid[0] * vlm.grid[1]
    assert set(vlm.default_stages) <= set(info["stages"])
