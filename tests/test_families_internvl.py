"""InternVL: the independent HF path, the pixel-shuffle plant, the unsplit layout.

The reference drops InternViT's CLS token and pixel-shuffles the tower's own hidden states with
HF's ``model.pixel_shuffle``; the plant adds a ramp to the s x s patches of one merged cell in
the last block's output. Tokens: ``<img>`` + N ``<IMG_CONTEXT>`` + ``</img>`` (InternVLProcessor's
layout for one untiled image; restated, as it needs torchvision), the wrappers unprobed; pixels
equal the GotOcr2 image processor's.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TWO_PROMPTS
from family_checks import cached_model, llm_reference, plant_rows


def internvl_reference(vlm, batch) -> dict[str, torch.Tensor]:
    inner, cfg = vlm.model.model, vlm.model.config
    ref = llm_reference(
        vlm,
        batch,
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        tower = inner.vision_tower(batch.pixel_values, output_hidden_states=True)
        feats = inner.get_image_features(batch.pixel_values).pooler_output
    side = vlm.geometry.size // vlm.patch_size

    def shuffle(h):  # as get_image_features: drop CLS, (B, side, side, D), pixel shuffle
        grid = h[:, 1:].reshape(h.shape[0], side, side, -1)
        out = inner.pixel_shuffle(grid, scale_factor=cfg.downsample_ratio)
        return out.reshape(h.shape[0], -1, out.shape[-1])

    hidden = tower.hidden_states
    ref.update({f"vision.{i}": shuffle(hidden[i]) for i in range(1, len(hidden))})
    ref["encoder"] = shuffle(tower.last_hidden_state)
    ref["adapter"] = feats
    return ref


def internvl_plant(vlm, r: int, c: int, batch_size: int):
    """Add a ramp to the 2 x 2 patches of merged cell (r, c) in the last block's (CLS-first)
    output (a constant would vanish in the projector's LayerNorm)."""
    W = vlm.geometry.size // vlm.patch_size
    cell = torch.tensor([1 + (2 * r + i) * W + 2 * c + j for i in range(2) for j in range(2)])

    def rows(h):
        return (torch.arange(h.shape[0])[:, None] * (1 + W * W) + cell).flatten()

    ramp = torch.linspace(-10.0, 10.0, vlm.model.config.vision_config.hidden_size)
    last = vlm.model.model.vision_tower.encoder.layer[-1]
    return plant_rows(last, rows, ramp)


REFERENCES = {"internvl": internvl_reference}
PLANTS = {"internvl": internvl_plant}


@pytest.fixture(scope="module")
def vlm():
    return cached_model("tiny-internvl")


def test_inputs_match_hf(vlm, random_images):
    from PIL import Image

    S = vlm.geometry.size
    image = random_images(1, S, S)[0]
    batch = vlm.prepare([image], prompts=TWO_PROMPTS[:1])
    ref = vlm.processor.image_processor([Image.fromarray(image)], return_tensors="pt")
    torch.testing.assert_close(ref["pixel_values"], batch.pixel_values, rtol=0, atol=1e-5)
    tok = vlm.processor.tokenizer
    n = vlm.num_image_tokens
    want = tok(f"<img>{'<IMG_CONTEXT>' * n}</img>", add_special_tokens=False)["input_ids"]
    ids = batch.input_ids[0].tolist()
    start = ids.index(tok.convert_tokens_to_ids("<img>"))
    assert ids[start : start + n + 2] == want
    assert batch.image_positions[0].tolist() == list(range(start + 1, start + n + 1))
    assert tok.decode(ids[:start]) == "<|im_start|>user\n"


def test_full_strategy_is_refused(vlm):
    from seglens.models.families.internvl import InternVLFamily

    vlm.model.config.vision_feature_select_strategy = "full"
    try:
        with pytest.raises(ValueError, match=r"vision_feature_select_strategy='full'"):
            InternVLFamily(vlm.model)
    finally:
        vlm.model.config.vision_feature_select_strategy = "default"
