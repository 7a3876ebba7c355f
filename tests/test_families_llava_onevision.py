"""LLaVA-OneVision: LLaVA-NeXT's packing (base grid, then newline-closed tile rows) with SigLIP
and ``anyres_max`` shrinking of large tile grids.

The shared family checks use LLaVA-NeXT's independent reference and base-crop plant. Here: the
placeholder count and pixels equal what ``LlavaOnevisionProcessor`` and its image processor give
(the processor itself needs torchvision; its counting method is run on a bare instance), the
shrunk layout of a 4 x 4-tile model equals HF's packing (base tokens first, newlines closing the
shrunk rows), and ``grid="tiles"`` is refused where HF shrinks the tiles.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TWO_PROMPTS
from family_checks import cached_model
from test_families_llava_next import llava_next_plant, llava_next_reference

S = 112  # the tiny tower's side


def hf_token_count(vlm, height: int, width: int) -> int:
    """Image tokens LlavaOnevisionProcessor puts for one (height, width) image (no torchvision:
    its counting method on an instance built without ``__init__``)."""
    from transformers import LlavaOnevisionProcessor

    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor = vlm.processor.image_processor
    proc.num_image_tokens = vlm.grid[0] * vlm.grid[1]
    proc.vision_aspect_ratio = vlm.model.config.vision_aspect_ratio
    proc.vision_feature_select_strategy = vlm.model.config.vision_feature_select_strategy
    return proc._get_number_of_features(height, width, S, S)


def test_inputs_match_the_hf_processor(random_images):
    from PIL import Image

    vlm = cached_model("tiny-llava-onevision")
    image = random_images(1, S, S)[0]
    batch = vlm.prepare([image])
    ref = vlm.processor.image_processor([Image.fromarray(image)], return_tensors="pt")
    got = vlm.family.pixel_inputs(batch.pixel_values)
    torch.testing.assert_close(got["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5)
    assert got["image_sizes"].tolist() == ref["image_sizes"].tolist()
    ids = batch.input_ids[0]
    assert int((ids == vlm.image_token_id).sum()) == hf_token_count(vlm, S, S)
    start = int((ids == vlm.image_token_id).nonzero()[0])
    tok = vlm.processor.tokenizer
    assert tok.decode(ids[:start]).endswith("<|im_start|>user\n")


@pytest.fixture(scope="module")
def shrunk_vlm():
    from seglens.models import tiny_model

    return tiny_model("llava_onevision", grid_pinpoints=((4 * S, 4 * S),))


def test_anyres_max_shrinks_the_tile_grid_as_hf(shrunk_vlm, random_images):
    """4 x 4 tiles of 8 x 8 = 32 x 32 > 1.1^2 * 9 * 64 tokens: HF shrinks them to 24 x 24."""
    vlm = shrunk_vlm
    assert vlm.family.tile_grid == (24, 24)
    assert vlm.family.num_placeholder_tokens == hf_token_count(vlm, S, S) == 64 + 24 * 25
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)  # HF checks the count itself
    inputs = {}

    def keep(_m, args, kwargs):
        inputs.setdefault("x", kwargs["inputs_embeds"])

    lm = vlm.model.model.language_model
    handle = lm.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        got = vlm.capture(batch, ["adapter", "llm.1"])
    finally:
        handle.remove()
    with torch.no_grad():
        feats = vlm.model.model.get_image_features(**vlm.family.pixel_inputs(batch.pixel_values))
    n, newline = vlm.num_image_tokens, vlm.model.model.image_newline
    for b in range(2):
        placeholders = (batch.input_ids[b] == vlm.image_token_id).nonzero().flatten()
        assert torch.equal(placeholders[:n], batch.image_positions[b])
        embeds = inputs["x"][b]
        assert torch.equal(embeds[placeholders], feats.pooler_output[b])
        assert torch.equal(embeds[placeholders[n + 24 :: 25]], newline.expand(24, -1))
    assert torch.equal(torch.stack([f[:n] for f in feats.pooler_output]), got["adapter"])


def test_tiles_refused_where_hf_shrinks(shrunk_vlm):
    from seglens.models.families.llava_onevision import LlavaOnevisionFamily, anyres_max_shape

    with pytest.raises(ValueError, match=r"shrinks the 32x32 stitched tile grid to 24x24"):
        LlavaOnevisionFamily(shrunk_vlm.model, grid="tiles")
    with pytest.raises(ValueError, match=r"vision_aspect_ratio 'anyres_9'"):
        anyres_max_shape(8, 8, 8, "anyres_9")


REFERENCES = {"llava_onevision": llava_next_reference}
PLANTS = {"llava_onevision": llava_next_plant}
