"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: 2x2-merged patches, window order, M-RoPE inputs.

The independent HF path and the unit plant for the shared family tests, and the Qwen-specific
layout checks: a pixel patch feeds its own row of its 2x2 unit, pixels and tokens equal the HF
image processor's and ``Qwen2VLProcessor``'s layout, M-RoPE's padding mask is recovered from
seglens' 4D masks.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TWO_PROMPTS
from family_checks import cached_model, llm_reference, tiny_names
from seglens.interventions import BidirectionalImage, Knockout, TokenSet
from seglens.models.families.qwen2_vl import Qwen2VLFamily


def qwen_hf_inputs(vlm, batch) -> dict[str, torch.Tensor]:
    """HF inputs built independently: HF's own patchify per image, grid, token types."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    vision = vlm.model.config.vision_config
    rows, grids = [], []
    for image in batch.pixel_values.numpy():
        flat, gh, gw = Qwen2VLImageProcessorPil().patchify(
            image, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        )
        rows.append(torch.from_numpy(flat.copy()))
        grids.append([1, gh, gw])
    return {
        "pixel_values": torch.cat(rows),
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": (batch.input_ids == vlm.model.config.image_token_id).int(),
    }


def qwen_raster_units(vlm, h: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B * P, Dv) block outputs in the vision sequence order -> (B, N, 4 * Dv) raster order."""
    from transformers.vision_utils import get_vision_window_index

    vision = vlm.model.config.vision_config
    n = vlm.num_image_tokens
    units = h.reshape(batch_size, n, -1)
    if vlm.family.name == "qwen2_5_vl":  # blocks run in window order: undo it as HF does
        side = vlm.geometry.size // vision.patch_size
        window_index, _ = get_vision_window_index(
            torch.tensor([[1, side, side]]),
            vision.spatial_merge_size,
            vision.window_size,
            vision.patch_size,
        )
        units = units[:, torch.argsort(window_index)]
    return units


def qwen_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's own outputs: hidden_states, get_image_features, visual's states."""
    inner = vlm.model.model
    inputs = qwen_hf_inputs(vlm, batch)
    ref = llm_reference(
        vlm, batch, input_ids=batch.input_ids, attention_mask=batch.attention_mask, **inputs
    )
    with torch.no_grad():
        tower = inner.visual(
            inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True
        )
        adapter = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    B, hidden = len(batch), tower.hidden_states
    ref.update({f"vision.{i}": qwen_raster_units(vlm, hidden[i], B) for i in range(1, len(hidden))})
    ref["encoder"] = qwen_raster_units(vlm, tower.last_hidden_state, B)
    ref["adapter"] = torch.stack(adapter.pooler_output)
    return ref


def qwen_plant(vlm, r: int, c: int, batch_size: int):
    """Add a ramp to the 4 patch rows of raster cell (r, c)'s 2x2 unit in the last block's output.

    The rows are the units in vision-sequence order (window order in Qwen2.5-VL, undone with HF's
    window index), located independently of the family code; not a constant, which the merger's
    LayerNorm would remove.
    """
    k = r * vlm.grid[1] + c

    def plant_unit(_m, _a, out):
        units = qwen_raster_units(vlm, torch.arange(out.shape[0]), batch_size)
        out = out.clone()
        out[units[:, k].flatten()] += torch.linspace(-10.0, 10.0, out.shape[-1])
        return out

    return vlm.model.model.visual.blocks[-1].register_forward_hook(plant_unit)


REFERENCES = dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), qwen_reference)
PLANTS = dict.fromkeys(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"), qwen_plant)


# --- tests ----------------------------------------------------------------------------------------
@pytest.fixture(params=tiny_names(Qwen2VLFamily))
def qwen_vlm(request):
    return cached_model(request.param)


def test_qwen_pixel_patch_lands_in_its_unit(qwen_vlm, random_images):
    """Pixels of patch (dr, dc) of merged cell (r, c) feed patch row 4 * (r * g + c) + 2 * dr + dc.

    The merger concatenates 4 consecutive patch rows into one token; so this pins the 2x2 block
    order of ``patchify`` against the model's own layout, and the cell -> raster slot map.
    """
    vlm = qwen_vlm
    batch = vlm.prepare(random_images(1))
    p, g = vlm.patch_size, vlm.grid[1]
    embed = vlm.model.model.visual.patch_embed
    rows = {}

    def embedded(pixel_values):
        handle = embed.register_forward_hook(lambda _m, _a, out: rows.setdefault("x", out))
        try:
            vlm.family.forward(batch.input_ids, pixel_values, batch.attention_mask)
        finally:
            handle.remove()
        return rows.pop("x")

    with torch.inference_mode():
        clean = embedded(batch.pixel_values)
        for r, c, dr, dc in [(0, 0, 0, 1), (1, g - 2, 1, 0), (g - 1, 2, 1, 1)]:
            pixels = batch.pixel_values.clone()
            y, x = (2 * r + dr) * p, (2 * c + dc) * p
            pixels[:, :, y : y + p, x : x + p] += 1.0
            changed = (embedded(pixels) - clean).abs().amax(-1) > 1e-6
            assert changed.nonzero().flatten().tolist() == [4 * (r * g + c) + 2 * dr + dc]


def test_qwen_inputs_match_hf(qwen_vlm, random_images):
    """Pixels equal the HF image processor's; tokens are the Qwen2VLProcessor layout."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    vlm = qwen_vlm
    S = vlm.geometry.size
    image = random_images(1, S, S)[0]  # already S x S: both resize paths are the identity
    batch = vlm.prepare([image])
    settings = vlm.processor.image_processor.to_dict()
    settings.pop("image_processor_type", None)
    ref = Qwen2VLImageProcessorPil(**settings)([Image.fromarray(image)], return_tensors="pt")
    assert ref["image_grid_thw"].tolist() == [list(vlm.family.grid_thw)]
    inputs = vlm.family.model_inputs(batch.input_ids, batch.pixel_values, batch.attention_mask)
    torch.testing.assert_close(inputs["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
    assert inputs["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    # Qwen2VLProcessor: <|vision_start|> + grid_thw.prod() / merge^2 image pads + <|vision_end|>
    tok = vlm.processor.tokenizer
    ids = batch.input_ids[0].tolist()
    n = int(ref["image_grid_thw"].prod()) // vlm.model.config.vision_config.spatial_merge_size**2
    start = ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1 : start + n + 2] == [vlm.image_token_id] * n + [
        tok.convert_tokens_to_ids("<|vision_end|>")
    ]
    assert batch.image_positions[0].tolist() == list(range(start + 1, start + n + 1))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_padding_mask_from_a_4d_mask(qwen_vlm, random_images, backend):
    """M-RoPE needs the 2D padding mask: it is recovered exactly from seglens' 4D masks."""
    from seglens.interventions import build_attention_mask
    from seglens.models.families.qwen2_vl import padding_mask_from

    batch = qwen_vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    specs = [Knockout(keys=TokenSet.from_slots([0, 1, 2])), BidirectionalImage()]
    mask = build_attention_mask(specs, batch, backend=backend)
    assert torch.equal(padding_mask_from(mask), batch.attention_mask)
    assert padding_mask_from(batch.attention_mask) is batch.attention_mask


def test_qwen_rejects_another_image_size(qwen_vlm, random_images):
    batch = qwen_vlm.prepare(random_images(1))
    with pytest.raises(ValueError, match="is set up for"):
        qwen_vlm.family.model_inputs(
            batch.input_ids, batch.pixel_values[..., :-28, :-28], batch.attention_mask
        )


def test_qwen3_deepstack_adds_after_the_block(random_images):
    """llm.1 is block 1's output; block 2 reads it plus DeepStack's first merged feature."""
    from family_checks import gather

    vlm = cached_model("tiny-qwen3-vl")
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    seen = {}

    def keep(_m, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = vlm.family.decoder_layers()[1].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        got = vlm.capture(batch, ["llm.1", "llm.2"])
    finally:
        handle.remove()
    inputs = qwen_hf_inputs(vlm, batch)
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    deep = torch.stack(feats.deepstack_features[0])
    read = gather(seen["x"], batch.image_positions)
    torch.testing.assert_close(read, got["llm.1"] + deep, rtol=0, atol=1e-6)
    assert deep.abs().amax() > 0
