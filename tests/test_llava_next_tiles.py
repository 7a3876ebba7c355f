"""LLaVA-NeXT ``grid="tiles"``: the k x k high-resolution tiles stitched into one (k g)^2 grid.

The tiny model has pinpoints [[2S, 2S]]: every image is squashed to the 2S x 2S canvas, the base
image is the canvas resized to S, the tiles are its 2 x 2 crops. Checked against independent HF
paths: captured stages equal HF's own tensors rearranged to stitched raster order; a signal
planted in the tile crop covering stitched cell (r, c) lands on slot r * (k g) + c; newline and
base tokens stay in the sequence but are never probed; patch labels of a non-square mask are the
majority classes of its nearest-neighbour squash.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conftest import TWO_PROMPTS, hf_forward_last

S, P = 112, 14  # the tiny tower's input side and patch
K, G = 2, S // P  # tiles per side, tokens per tile side
KG = K * G


@pytest.fixture(scope="module")
def tiles_vlm():
    from seglens.models import tiny_model

    return tiny_model(
        "llava_next", grid_pinpoints=((K * S, K * S),), family_options={"grid": "tiles"}
    )


@pytest.fixture
def batch(tiles_vlm, random_images):
    out = tiles_vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    assert not out.attention_mask.all()
    return out


def gather(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


def hf_pixels(canvas: torch.Tensor) -> torch.Tensor:
    """(B, 3, KS, KS) -> (B, 1 + K K, 3, S, S) by explicit slicing; base = bicubic-antialias."""
    base = F.interpolate(canvas, size=(S, S), mode="bicubic", antialias=True)
    tiles = [
        canvas[:, :, tr * S : (tr + 1) * S, tc * S : (tc + 1) * S]
        for tr in range(K)
        for tc in range(K)
    ]
    return torch.stack([base, *tiles], dim=1)


def stitched_slot_source() -> list[tuple[int, int]]:
    """Stitched slot r * KG + c -> (tile crop index 1.., patch index within the tile)."""
    return [(1 + (r // G) * K + c // G, (r % G) * G + c % G) for r in range(KG) for c in range(KG)]


def stitch(h: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B * crops, L, D) per-crop tokens (last G*G are patches) -> (B, KG^2, D), by a loop."""
    crops = 1 + K * K
    h = h.reshape(batch_size, crops, h.shape[1], h.shape[2])[:, :, -G * G :]
    return torch.stack([h[:, t, i] for t, i in stitched_slot_source()], dim=1)


def placeholder_layout(vlm, input_ids: torch.Tensor):
    """Per row: (base positions, stitched positions in raster order, newline positions)."""
    out = []
    for row in input_ids:
        ph = (row == vlm.image_token_id).nonzero().flatten()
        assert len(ph) == G * G + KG * (KG + 1)
        rows = ph[G * G :].reshape(KG, KG + 1)
        out.append((ph[: G * G], rows[:, :KG].flatten(), rows[:, KG]))
    return out


def test_grid_and_geometry(tiles_vlm):
    assert tiles_vlm.grid == (KG, KG)
    assert tiles_vlm.num_image_tokens == KG * KG
    assert tiles_vlm.geometry.size == K * S and tiles_vlm.geometry.mode == "resize"
    assert tiles_vlm.family.tile_grid == (KG, KG)
    assert tiles_vlm.info()["grid"] == [KG, KG]


def test_stages_equal_independent_paths(tiles_vlm, batch):
    vlm, model, inner = tiles_vlm, tiles_vlm.model, tiles_vlm.model.model
    got = vlm.capture(batch, vlm.stages)
    B = len(batch)
    pixels = hf_pixels(batch.pixel_values)
    assert torch.equal(vlm.family.pixel_inputs(batch.pixel_values)["pixel_values"], pixels)
    sizes = torch.tensor([[K * S, K * S]] * B)
    out, last_block = hf_forward_last(
        model,
        input_ids=batch.input_ids,
        pixel_values=pixels,
        image_sizes=sizes,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        tower = inner.vision_tower(pixels.flatten(0, 1), output_hidden_states=True)
        packed = inner.get_image_features(pixels, sizes).pooler_output
    layout = placeholder_layout(vlm, batch.input_ids)
    pos = torch.stack([stitched for _, stitched, _ in layout])
    assert torch.equal(batch.image_positions, pos)
    hidden, L = tower.hidden_states, vlm.num_llm_layers
    ref = {f"vision.{i}": stitch(hidden[i], B) for i in range(1, len(hidden))}
    ref["encoder"] = stitch(hidden[model.config.vision_feature_layer], B)
    # HF's packed features: base G*G, then KG rows of KG tile tokens + a newline.
    ref["adapter"] = torch.stack(
        [a[G * G :].reshape(KG, KG + 1, a.shape[-1])[:, :KG].flatten(0, 1) for a in packed]
    )
    ref.update({f"llm.{i}": gather(out.hidden_states[i], pos) for i in range(1, L)})
    ref[f"llm.{L}"] = gather(last_block, pos)
    ref["llm.final_norm"] = gather(out.hidden_states[L], pos)
    assert torch.equal(got["adapter"], gather(out.hidden_states[0], pos))
    widths = vlm.family.stage_widths()
    for stage, tensor in got.items():
        assert tensor.shape == (B, KG * KG, widths[stage]), stage
        assert torch.equal(tensor, ref[stage]), stage


@pytest.mark.parametrize("cell", [(0, 0), (1, KG - 2), (G, G - 1), (KG - 1, 2), (KG - 1, KG - 1)])
def test_planted_cell_lands_on_its_slot(tiles_vlm, random_images, cell):
    """10 added to the projector input of the tile patch covering (r, c) moves slot r KG + c."""
    vlm, (r, c) = tiles_vlm, cell
    batch = vlm.prepare(random_images(1))
    stages = ["encoder", "adapter", "llm.1"]
    clean = vlm.capture(batch, stages)
    crop, patch = (1 + (r // G) * K + c // G, (r % G) * G + c % G)

    def plant(_m, args):
        h = args[0].clone()  # (crops, G*G, D): crop 0 is the base image
        h[crop, patch] += 10.0
        return (h, *args[1:])

    embeds = {}

    def keep(_m, args, kwargs):
        embeds.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handles = [
        vlm.model.model.multi_modal_projector.register_forward_pre_hook(plant),
        vlm.family.decoder_layers()[0].register_forward_pre_hook(keep, with_kwargs=True),
    ]
    try:
        planted = vlm.capture(batch, stages)
    finally:
        for h in handles:
            h.remove()
    slot = r * KG + c
    for stage in ("encoder", "adapter"):
        changed = (planted[stage] - clean[stage]).abs().amax(-1)[0] > 1e-4
        assert changed.nonzero().flatten().tolist() == [slot], stage
    # the LLM input embedding that moved is the one at image_positions[slot]
    assert torch.equal(embeds["x"][0, batch.image_positions[0]], planted["adapter"][0])
    # causal LLM: slots before the planted one are untouched at llm.1
    moved = (planted["llm.1"] - clean["llm.1"]).abs().amax(-1)[0] > 1e-5
    assert not moved[:slot].any() and moved[slot]


def test_pixel_patch_feeds_its_tile_patch(tiles_vlm, random_images):
    """A canvas pixel patch (r, c) reaches the tile crop's patch embedding at the same cell."""
    vlm = tiles_vlm
    batch = vlm.prepare(random_images(1))
    tower = vlm.model.model.vision_tower
    embed = next(m for n, m in tower.named_modules() if n.endswith("patch_embedding"))
    seen = []
    handle = embed.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        r, c = G + 1, 3
        vlm.capture(batch, ["encoder"])
        bumped = batch.pixel_values.clone()
        bumped[..., r * P : (r + 1) * P, c * P : (c + 1) * P] += 1.0
        batch.pixel_values = bumped
        vlm.capture(batch, ["encoder"])
    finally:
        handle.remove()
    diff = (seen[1] - seen[0]).abs().amax(1)  # (crops, G, G)
    crop, (i, j) = 1 + (r // G) * K + c // G, (r % G, c % G)
    tiles_changed = diff[1:].flatten(1) > 1e-5
    assert tiles_changed.sum() == 1 and diff[crop, i, j] > 1e-3
    assert diff[0].amax() > 0  # the base image is the canvas resized, so it sees the bump too


def test_newlines_and_base_stay_in_the_sequence(tiles_vlm, batch):
    vlm = tiles_vlm
    inputs = {}

    def keep(_m, args, kwargs):
        inputs.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = vlm.family.decoder_layers()[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        vlm.capture(batch, ["llm.1"])
    finally:
        handle.remove()
    newline = vlm.model.model.image_newline
    for b, (base, stitched, newlines) in enumerate(placeholder_layout(vlm, batch.input_ids)):
        probed = set(batch.image_positions[b].tolist())
        assert probed == set(stitched.tolist())
        assert not probed & set(newlines.tolist()) and not probed & set(base.tolist())
        assert (batch.input_ids[b, newlines] == vlm.image_token_id).all()
        assert len(newlines) == KG and batch.attention_mask[b, newlines].all()
        assert torch.equal(inputs["x"][b, newlines], newline.expand(KG, -1))
    assert batch.text_positions.sum() < batch.attention_mask.sum() - KG * KG


def test_labels_of_a_non_square_mask(tiles_vlm):
    """(k g)^2 labels = majority classes of an independent nearest-neighbour squash to kS."""
    rng = np.random.default_rng(1)
    H, W = 90, 250
    mask = np.kron(rng.integers(0, 4, (9, 25)), np.ones((10, 10), np.int64))
    mask[:5, :40] = 255
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    batch = tiles_vlm.prepare([image], [mask], num_classes=4)
    side = K * S
    ys = np.floor((np.arange(side) + 0.5) * H / side).astype(int)
    xs = np.floor((np.arange(side) + 0.5) * W / side).astype(int)
    squashed = mask[ys][:, xs]
    want = np.full(KG * KG, 255)
    for r in range(KG):
        for c in range(KG):
            cell = squashed[r * P : (r + 1) * P, c * P : (c + 1) * P].ravel()
            valid = cell[cell != 255]
            if len(valid) >= 0.5 * cell.size:
                want[r * KG + c] = np.bincount(valid, minlength=4).argmax()
    assert batch.pixel_values.shape == (1, 3, side, side)
    assert batch.labels.shape == (1, KG * KG)
    assert np.array_equal(batch.labels[0].numpy(), want)
    assert (want == 255).any() and len(set(want.tolist()) - {255}) == 4


def test_load_model_option_and_errors():
    from seglens.models import load_model, tiny_model

    vlm = load_model("tiny-llava-next", family_options={"grid": "tiles"})  # pinpoints [[S, S]]
    assert vlm.family.grid_mode == "tiles" and vlm.grid == (G, G)
    assert load_model("tiny-llava-next").family.grid_mode == "base"
    with pytest.raises(ValueError, match="square image_grid_pinpoints"):
        tiny_model("llava_next", grid_pinpoints=((S, 2 * S),), family_options={"grid": "tiles"})
    with pytest.raises(ValueError, match="not one of"):
        tiny_model("llava_next", family_options={"grid": "stitched"})
    with pytest.raises(ValueError, match="no option"):
        load_model("tiny-gemma3", family_options={"grid": "tiles"})
    with pytest.raises(ValueError, match="no option"):
        load_model("tiny-clip", family_options={"grid": "tiles"})


def test_rejects_the_base_size(tiles_vlm, batch):
    with pytest.raises(ValueError, match="224x224"):
        tiles_vlm.family.pixel_inputs(batch.pixel_values[..., :S, :S])
