"""LLaVA-NeXT (base grid): the independent HF path, the base-crop plant, the sequence layout.

The base image's g x g tokens come first among the placeholders; the tile rows after them end in
the learned newline embedding and are never probed (``test_llava_next_tiles.py``: the tile grid).
"""

from __future__ import annotations

import pytest
import torch

from conftest import TWO_PROMPTS
from family_checks import llm_reference


def llava_next_pixels(vlm, batch) -> torch.Tensor:
    """HF's (B, 1 + T, 3, S, S) for the default tiny (pinpoints (S, S)): base image + one tile."""
    S = vlm.geometry.size
    assert vlm.model.config.image_grid_pinpoints == [[S, S]]
    return torch.stack([batch.pixel_values, batch.pixel_values], dim=1)


def llava_next_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's outputs; the base image is crop 0 and the first N placeholders.

    Also LLaVA-OneVision's (the same packing; a SigLIP tower without CLS).
    """
    model, inner = vlm.model, vlm.model.model
    pixels = llava_next_pixels(vlm, batch)
    S, B, n = vlm.geometry.size, len(batch), vlm.num_image_tokens
    sizes = torch.tensor([[S, S]] * B)
    ref = llm_reference(
        vlm,
        batch,
        input_ids=batch.input_ids,
        pixel_values=pixels,
        image_sizes=sizes,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        tower = inner.vision_tower(pixels.flatten(0, 1), output_hidden_states=True)
        adapter = inner.get_image_features(pixels, sizes).pooler_output
    crops = pixels.shape[1]
    cls = int(model.config.vision_config.model_type == "clip_vision_model")  # SigLIP: no CLS

    def base(h):  # (B * crops, cls + N, D) -> (B, N, D): crop 0, CLS dropped
        return h[::crops, cls:]

    hidden = tower.hidden_states
    ref.update({f"vision.{i}": base(hidden[i]) for i in range(1, len(hidden))})
    ref["encoder"] = base(hidden[model.config.vision_feature_layer])
    ref["adapter"] = torch.stack([a[:n] for a in adapter])
    return ref


def llava_next_crops(vlm) -> int:
    """1 + tiles: the base image and the tiles of the best resolution."""
    (h, w), S = vlm.family.best_resolution, vlm.geometry.size
    return 1 + (h // S) * (w // S)


def plant_llava_next(vlm, r: int, c: int):
    """Add 10 to the base crop's patch (r, c) in the feature the projector reads."""
    g, crops = vlm.grid[1], llava_next_crops(vlm)

    def plant(_m, args):
        h = args[0].clone()  # (B * crops, N, D): crop 0 of each image is its base image
        h[::crops, r * g + c] += 10.0
        return (h, *args[1:])

    return vlm.model.model.multi_modal_projector.register_forward_pre_hook(plant)


def llava_next_plant(vlm, r: int, c: int, batch_size: int):
    return plant_llava_next(vlm, r, c)


REFERENCES = {"llava_next": llava_next_reference}
PLANTS = {"llava_next": llava_next_plant}


# --- LLaVA-NeXT: tiles and newlines after the base grid -----------------------------------------
@pytest.mark.parametrize("pinpoints", [((112, 224),), ((224, 224),)])
def test_llava_next_sequence_layout(pinpoints, random_images):
    """Base g x g tokens first, then rows of tile tokens each closed by the newline embedding.

    (112, 224): one tile row of two tiles, centre-padded and unpadded by HF to g x g; (224, 224):
    2 x 2 tiles of the upsampled input, 2g x 2g. HF itself checks the placeholder count.
    """
    from seglens.models import tiny_model

    vlm = tiny_model("llava_next", grid_pinpoints=pinpoints)
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    rows, cols = vlm.family.tile_grid
    g, n = vlm.grid[0], vlm.num_image_tokens
    assert (rows, cols) == ((g, g) if pinpoints[0][1] != pinpoints[0][0] else (2 * g, 2 * g))
    inputs = {}

    def keep(_m, args, kwargs):
        inputs.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = vlm.family.decoder_layers()[0].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        got = vlm.capture(batch, ["adapter", "llm.1"])
    finally:
        handle.remove()
    newline = vlm.model.model.image_newline
    for b in range(2):
        placeholders = (batch.input_ids[b] == vlm.image_token_id).nonzero().flatten()
        assert len(placeholders) == n + rows * (cols + 1)
        assert torch.equal(placeholders[:n], batch.image_positions[b])
        embeds = inputs["x"][b]
        assert torch.equal(embeds[batch.image_positions[b]], got["adapter"][b])
        ends = placeholders[n + cols :: cols + 1]
        assert len(ends) == rows
        assert torch.equal(embeds[ends], newline.expand(rows, -1))
        tiles = placeholders[n:][(torch.arange(rows * (cols + 1)) % (cols + 1)) != cols]
        assert not (embeds[tiles] == newline).all(-1).any()
    # the HF path on the same crops gives the same base tokens
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(**vlm.family.pixel_inputs(batch.pixel_values))
    assert torch.equal(torch.stack([f[:n] for f in feats.pooler_output]), got["adapter"])


def test_full_strategy_with_cls_is_refused_for_tiles():
    """A CLS per tile crop has no place in the packed layout: refused, naming the option."""
    from family_checks import cached_model
    from seglens.models.families.llava_next import LlavaNextFamily

    model = cached_model("tiny-llava-next").model
    model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match=r"vision_feature_select_strategy='full' with a CLS"):
            LlavaNextFamily(model)
    finally:
        model.config.vision_feature_select_strategy = "default"
