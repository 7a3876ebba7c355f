"""Attention interventions: invariants on the tiny model (eager and sdpa) and the mask builder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import create_causal_mask

from conftest import TWO_PROMPTS
from seglens.interventions import (
    BidirectionalImage,
    CausalImage,
    Knockout,
    TokenSet,
    allowed_edges,
    build_attention_mask,
    check_backend,
    intervene,
    slots_to_mask,
)
from seglens.models.vlm import Batch

BACKENDS = ["eager", "sdpa"]
J = 100  # a middle image slot (N = 256)


@pytest.fixture(params=BACKENDS)
def vlm(request, tiny_models):
    return tiny_models("clip", request.param)


@pytest.fixture
def batch(vlm, random_images):
    """Two images, two prompt lengths: the shorter row is right-padded."""
    out = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    assert not out.attention_mask.all()
    return out


def run(vlm, batch, specs=None, sets=None, perturb=None):
    """One capture forward -> (captured llm stages, (L, B, T, D) outputs of every decoder layer).

    ``specs=None`` runs without ``intervene``; ``perturb=(slot, vector)`` adds the vector to the
    projector output (the LLM input embedding) at that image slot.
    """
    layers = vlm.family.decoder_layers()
    hidden = {}
    handles = [
        layer.register_forward_hook(
            lambda _m, _a, out, i=i: hidden.__setitem__(
                i, out[0] if isinstance(out, tuple) else out
            )
        )
        for i, layer in enumerate(layers)
    ]
    if perturb is not None:
        slot, vector = perturb

        def add(_m, _a, out):
            out = out.clone()
            out[:, slot] += vector
            return out

        handles.append(vlm.model.model.multi_modal_projector.register_forward_hook(add))
    stages = [f"llm.{i + 1}" for i in range(len(layers))]
    try:
        if specs is None:
            got = vlm.capture(batch, stages)
        else:
            with intervene(vlm, specs, sets):
                got = vlm.capture(batch, stages)
    finally:
        for handle in handles:
            handle.remove()
    return got, torch.stack([hidden[i] for i in range(len(layers))])


def real_rows(hidden, batch):
    """(L, B, T, D) -> per image (L, T_real, D) for its real tokens."""
    return [hidden[:, b, batch.attention_mask[b].bool()] for b in range(len(batch))]


def later_slots(j=J, n=256):
    return TokenSet.from_slots(range(j, n))


def fake_batch(lengths, image_start, num_image, total, left_pad=False):
    """A Batch with only the fields the mask builder reads."""
    B = len(lengths)
    attention = torch.zeros(B, total, dtype=torch.long)
    positions = torch.zeros(B, num_image, dtype=torch.long)
    for b, n in enumerate(lengths):
        offset = total - n if left_pad else 0
        attention[b, offset : offset + n] = 1
        positions[b] = offset + image_start + torch.arange(num_image)
    return Batch(
        input_ids=torch.zeros(B, total, dtype=torch.long),
        attention_mask=attention,
        pixel_values=torch.zeros(B, 3, 1, 1),
        image_positions=positions,
    )


# --- invariants on the model --------------------------------------------------------------------
def test_empty_specs_change_nothing(vlm, batch):
    stages = vlm.default_stages
    plain = vlm.capture(batch, stages)
    with intervene(vlm, []):
        got = vlm.capture(batch, stages)
    assert all(torch.equal(got[s], plain[s]) for s in stages)
    _, plain_hidden = run(vlm, batch)
    _, hidden = run(vlm, batch, [])
    assert torch.equal(hidden, plain_hidden)


def test_knockout_leaves_earlier_positions_unchanged(vlm, batch):
    got_plain, plain = run(vlm, batch)
    got, hidden = run(vlm, batch, [Knockout(keys=later_slots())])
    for stage in got:  # image slots up to J (J keeps itself) are untouched, later ones move
        assert torch.equal(got[stage][:, : J + 1], got_plain[stage][:, : J + 1]), stage
        assert (got[stage][:, J + 1 :] != got_plain[stage][:, J + 1 :]).any(-1).all(), stage
    for b in range(len(batch)):  # every position, text included
        first_blocked = int(batch.image_positions[b, J])
        n_real = int(batch.attention_mask[b].sum())
        assert torch.equal(hidden[:, b, : first_blocked + 1], plain[:, b, : first_blocked + 1])
        moved = hidden[:, b, first_blocked + 1 : n_real] != plain[:, b, first_blocked + 1 : n_real]
        assert moved.any(-1).all()


def test_eager_weights_on_blocked_edges_are_zero(tiny_models, random_images):
    vlm = tiny_models("clip", "eager")
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    weights = []
    handles = [
        layer.self_attn.register_forward_hook(lambda _m, _a, out: weights.append(out[1]))
        for layer in vlm.family.decoder_layers()
    ]
    try:
        with intervene(vlm, [Knockout(keys=later_slots())]):
            vlm.capture(batch, [f"llm.{vlm.num_llm_layers}"])
    finally:
        for handle in handles:
            handle.remove()
    assert len(weights) == vlm.num_llm_layers
    T = batch.input_ids.shape[1]
    for b in range(len(batch)):
        real = batch.attention_mask[b].bool()
        blocked = torch.zeros(T, T, dtype=torch.bool)  # [query, key]
        blocked[:, batch.image_positions[b, J:]] = True
        blocked &= real[:, None] & ~torch.eye(T, dtype=torch.bool)
        blocked |= torch.ones(T, T, dtype=torch.bool).triu(1)  # causal
        for w in weights:  # (B, H, T, T)
            assert (w[b][:, blocked] == 0).all()
            assert (w[b][:, real][:, :, real].sum(-1) - 1).abs().max() < 1e-5


def test_text_states_ignore_pixels_when_text_cannot_read_image(vlm, random_images):
    batches = [vlm.prepare(random_images(2), prompts=TWO_PROMPTS) for _ in range(2)]
    assert not torch.equal(batches[0].pixel_values, batches[1].pixel_values)
    text = batches[0].text_positions
    spec = [Knockout(queries="text", keys="image")]
    (_, h0), (_, h1) = run(vlm, batches[0], spec), run(vlm, batches[1], spec)
    for b in range(2):
        assert torch.equal(h0[:, b, text[b]], h1[:, b, text[b]])
    _, p0 = run(vlm, batches[0])  # without the knockout the text does see the image
    _, p1 = run(vlm, batches[1])
    assert not torch.equal(p0[:, 0, text[0]], p1[:, 0, text[0]])


def test_bidirectional_image_lets_later_slots_reach_earlier_ones(vlm, batch):
    j, vector = 128, torch.full((vlm.model.config.text_config.hidden_size,), 0.5)
    before_image = int(batch.image_positions[:, 0].min())
    for specs, reaches_back in [([], False), ([BidirectionalImage()], True)]:
        got, hidden = run(vlm, batch, specs)
        got_p, hidden_p = run(vlm, batch, specs, perturb=(j, vector))
        assert torch.equal(hidden_p[:, :, :before_image], hidden[:, :, :before_image])
        for stage in got:
            earlier_moved = (got_p[stage][:, :j] != got[stage][:, :j]).any(-1)
            assert earlier_moved.all() if reaches_back else not earlier_moved.any(), stage
            assert (got_p[stage][:, j] != got[stage][:, j]).any(), stage
    # CausalImage wins over BidirectionalImage: back to the plain causal model.
    _, plain = run(vlm, batch)
    _, undone = run(vlm, batch, [BidirectionalImage(), CausalImage()])
    assert torch.equal(undone, plain)


SPECS = {
    "none": [],
    "knockout": [Knockout(keys=later_slots())],
    "text-image": [Knockout(queries="text", keys="image")],
    "window": [Knockout(keys=later_slots(), layers=(2, 3))],
    "bidirectional": [BidirectionalImage()],
    "mixed": [BidirectionalImage(layers=(1, 2)), Knockout(keys=TokenSet.from_slots([5, 9]))],
}


@pytest.mark.parametrize("name", list(SPECS))
def test_eager_and_sdpa_agree(tiny_models, random_images, name):
    eager, sdpa = tiny_models("clip", "eager"), tiny_models("clip", "sdpa")
    batch = eager.prepare(random_images(2), prompts=TWO_PROMPTS)
    _, he = run(eager, batch, SPECS[name])
    _, hs = run(sdpa, batch, SPECS[name])
    for a, b in zip(real_rows(he, batch), real_rows(hs, batch), strict=True):
        assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("spec", [Knockout, BidirectionalImage])
def test_hooks_on_every_layer_equal_the_forward_mask(vlm, batch, spec):
    kwargs = {"keys": later_slots()} if spec is Knockout else {}
    every = tuple(range(1, vlm.num_llm_layers + 1))
    _, via_mask = run(vlm, batch, [spec(**kwargs)])
    _, via_hooks = run(vlm, batch, [spec(layers=every, **kwargs)])
    assert torch.equal(via_hooks, via_mask)


def test_layer_window_leaves_earlier_layers_unchanged(vlm, batch):
    _, plain = run(vlm, batch)
    _, hidden = run(vlm, batch, [Knockout(keys=later_slots(), layers=(3, 4))])
    assert torch.equal(hidden[:2], plain[:2])
    assert not torch.equal(hidden[2], plain[2])


def test_per_image_key_sets_equal_single_images(vlm, random_images):
    images = random_images(2)
    batch = vlm.prepare(images, prompts=TWO_PROMPTS)
    keys = TokenSet.from_slots([3, 4], [10])
    _, hidden = run(vlm, batch, [Knockout(keys=keys)])
    _, named = run(vlm, batch, [Knockout(keys="ko")], sets={"ko": slots_to_mask(keys.slots, 256)})
    assert torch.equal(named, hidden)
    rows = real_rows(hidden, batch)
    for b, slots in enumerate(keys.slots):
        alone = vlm.prepare([images[b]], prompts=[TWO_PROMPTS[b]])
        _, single = run(vlm, alone, [Knockout(keys=TokenSet.from_slots(slots))])
        _, plain = run(vlm, alone)
        assert (rows[b] - single[:, 0]).abs().max() < 1e-5
        assert (single - plain).abs().max() > 1e-3  # the knockout did something


@pytest.mark.parametrize("name", list(SPECS))
def test_padded_batch_rows_equal_single_images(tiny_models, random_images, name):
    vlm = tiny_models("clip", "sdpa")
    images = random_images(2)
    batch = vlm.prepare(images, prompts=TWO_PROMPTS)
    _, hidden = run(vlm, batch, SPECS[name])
    assert torch.isfinite(hidden).all()
    for b, rows in enumerate(real_rows(hidden, batch)):
        _, single = run(vlm, vlm.prepare([images[b]], prompts=[TWO_PROMPTS[b]]), SPECS[name])
        assert (rows - single[:, 0]).abs().max() < 1e-5


# --- the mask builder ---------------------------------------------------------------------------
def test_empty_spec_mask_equals_create_causal_mask(vlm, batch):
    cfg = vlm.model.config.text_config
    embeds = torch.zeros(*batch.input_ids.shape, cfg.hidden_size)
    expected = create_causal_mask(
        config=cfg, inputs_embeds=embeds, attention_mask=batch.attention_mask,
        past_key_values=None, allow_is_causal_skip=False,
    )  # fmt: skip
    got = build_attention_mask([], batch, backend=vlm.attn_implementation)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)


def test_token_sets_and_helpers():
    batch = fake_batch([10, 8], image_start=2, num_image=4, total=10)
    slots = TokenSet.from_slots([3, 1, 1], [0])
    assert slots.slots == ((1, 3), (0,))
    assert TokenSet.from_mask(slots_to_mask(slots.slots, 4)) == slots
    assert slots_to_mask([[2]], 4, batch_size=2).tolist() == [[False, False, True, False]] * 2
    allowed = allowed_edges([Knockout(queries="text", keys="image")], batch)
    assert not allowed[0, 6:10, 2:6].any()  # text after the image reads no image token
    assert allowed[0, 2:6, 2:6].tril().equal(torch.ones(4, 4, dtype=torch.bool).tril())
    everything = allowed_edges([Knockout(keys="all")], batch)
    keep = torch.eye(10, dtype=torch.bool)
    keep[:, 0] = True
    assert everything[0].equal(keep)  # only itself and BOS remain
    bidirectional = allowed_edges([BidirectionalImage()], batch)
    assert bidirectional[1, 2:6, 2:6].all() and not bidirectional[1, :2, 2:].any()


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    lengths=st.lists(st.integers(7, 12), min_size=1, max_size=3),
    left_pad=st.booleans(),
)
def test_no_query_row_is_ever_empty(data, lengths, left_pad):
    N, start, total = 4, 2, max(lengths)
    batch = fake_batch(lengths, start, N, total, left_pad=left_pad)
    token_set = st.one_of(
        st.sampled_from(["image", "text", "all", "custom"]),
        st.lists(st.sets(st.integers(0, N - 1)), min_size=len(lengths), max_size=len(lengths)).map(
            lambda s: TokenSet.from_slots(*s)
        ),
    )
    spec = st.one_of(
        st.builds(Knockout, queries=token_set, keys=token_set),
        st.builds(BidirectionalImage),
        st.builds(CausalImage),
    )
    specs = data.draw(st.lists(spec, max_size=4))
    custom = torch.from_numpy(data.draw(st.sampled_from([0, 1, 2])) > np.arange(N))
    sets = {"custom": custom.expand(len(lengths), N)}
    allowed = allowed_edges(specs, batch, sets=sets)
    assert allowed.any(-1).all()
    real = batch.attention_mask.bool()
    diagonal = allowed.diagonal(dim1=1, dim2=2)
    assert diagonal[real].all()
    first = real.int().argmax(1)
    assert allowed[torch.arange(len(lengths)), :, first][real].all()  # BOS
    assert not (allowed & real[:, :, None] & ~real[:, None, :]).any()  # real rows skip padding
    off_diagonal = ~torch.eye(total, dtype=torch.bool)
    assert not (allowed & ~real[:, None, :] & off_diagonal).any()  # padded rows: at most self
    eager = build_attention_mask(specs, batch, backend="eager", sets=sets)
    assert eager.eq(0).equal(allowed[:, None])


# --- errors -------------------------------------------------------------------------------------
def test_layer_out_of_range_is_refused(tiny_models):
    vlm = tiny_models("clip", "sdpa")
    for layer in (0, vlm.num_llm_layers + 1):
        with (
            pytest.raises(ValueError, match=r"this model has 4 LLM layers; .* 1\.\.4"),
            intervene(vlm, [Knockout(keys="image", layers=(layer,))]),
        ):
            pass
    assert vlm.attention_mask_override is None


def test_unknown_token_sets_are_refused(tiny_models, random_images):
    vlm = tiny_models("clip", "sdpa")
    with pytest.raises(ValueError, match=r"unknown token set 'imgae' \(did you mean 'image'\?\)"):
        intervene(vlm, [Knockout(keys="imgae")]).__enter__()
    wrong = {"wrong": torch.ones(2, 256, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"unknown token set 'correct'.*sets="):
        intervene(vlm, [Knockout(keys="correct")], sets=wrong).__enter__()
    with pytest.raises(ValueError, match="may not redefine the built-in set 'image'"):
        intervene(vlm, [], sets={"image": torch.ones(2, 256, dtype=torch.bool)}).__enter__()
    with pytest.raises(ValueError, match=r"sets\['c'\] has 3 image slots; this model has 256"):
        intervene(vlm, [], sets={"c": torch.ones(2, 3, dtype=torch.bool)}).__enter__()
    batch = vlm.prepare(random_images(2))
    with (
        pytest.raises(ValueError, match=r"the batch needs \(2, 256\)"),
        intervene(vlm, [Knockout(keys="c")], sets={"c": torch.ones(1, 256, dtype=torch.bool)}),
    ):
        vlm.capture(batch, ["llm.1"])
    with pytest.raises(ValueError, match=r"out of range 0\.\.255"):
        build_attention_mask([Knockout(keys=TokenSet.from_slots([256]))], batch)
    assert vlm.attention_mask_override is None


def test_unsupported_backend_is_refused(random_images):
    from seglens.models import tiny_llava

    vlm = tiny_llava("clip")  # throwaway: its config is edited
    vlm.model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="load the model with attn_implementation='sdpa'"):
        intervene(vlm, []).__enter__()
    with pytest.raises(ValueError, match="'flash_attention_2' does not honour"):
        check_backend("flash_attention_2")
    batch = vlm.prepare(random_images(1))
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        build_attention_mask([], batch, backend="flex_attention")


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match=r"non-empty tuple .* layers=\(3, 4\)"):
        Knockout(keys="image", layers=[3, 4])
    with pytest.raises(ValueError, match="exactly one of name= and slots="):
        TokenSet()
    with pytest.raises(ValueError, match=r"use TokenSet\.from_slots"):
        TokenSet(slots=((1, -2),))
    with pytest.raises(TypeError, match="not an intervention spec"):
        build_attention_mask(["image"], fake_batch([8], 2, 4, 8))


def test_state_is_restored_on_errors_and_misuse(tiny_models, random_images):
    vlm = tiny_models("clip", "sdpa")
    layers = vlm.family.decoder_layers()
    batch = vlm.prepare(random_images(2))
    with pytest.raises(KeyError), intervene(vlm, [Knockout(keys="image", layers=(2,))]):
        raise KeyError("boom")
    assert vlm.attention_mask_override is None
    assert not any(layer._forward_pre_hooks for layer in layers)
    with intervene(vlm, []), pytest.raises(RuntimeError, match="already active"):
        intervene(vlm, []).__enter__()
    for specs in ([Knockout(keys="image")], [Knockout(keys="image", layers=(2,))]):
        with intervene(vlm, specs), torch.inference_mode():
            with pytest.raises(RuntimeError, match=r"did not come from vlm\.capture"):
                vlm.family.forward(batch.input_ids, batch.pixel_values, batch.attention_mask)
            vlm.capture(batch, ["llm.4"])
            with pytest.raises(RuntimeError, match=r"did not come from vlm\.capture"):
                vlm.family.forward(batch.input_ids, batch.pixel_values, batch.attention_mask)
    assert vlm.attention_mask_override is None
    assert not any(layer._forward_pre_hooks for layer in layers)
