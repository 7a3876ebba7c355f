"""Idefics3 and SmolVLM 2: the independent HF path, the pixel-shuffle plant, the unsplit layout.

The reference pixel-shuffles the tower's own hidden states with HF's ``connector.pixel_shuffle``;
the plant adds a signal to the s x s SigLIP patches of one merged cell. The shared family checks
compare tokens and pixels with the real ``Idefics3Processor`` (no splitting); here the wrapper
tokens around the image stay in the sequence unprobed, and an all-zero image is refused.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TWO_PROMPTS
from family_checks import cached_model, llm_reference


def idefics3_reference(vlm, batch) -> dict[str, torch.Tensor]:
    inner = vlm.model.model
    pixels = batch.pixel_values[:, None]
    ref = llm_reference(
        vlm,
        batch,
        input_ids=batch.input_ids,
        pixel_values=pixels,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        tower = inner.vision_model(batch.pixel_values, output_hidden_states=True)
        feats = inner.get_image_features(pixels).pooler_output
    scale = vlm.model.config.scale_factor

    def shuffle(h):
        return inner.connector.pixel_shuffle(h.contiguous(), scale)

    hidden = tower.hidden_states
    ref.update({f"vision.{i}": shuffle(hidden[i]) for i in range(1, len(hidden))})
    ref["encoder"] = shuffle(tower.last_hidden_state)
    ref["adapter"] = torch.stack(list(feats))
    return ref


def idefics3_plant(vlm, r: int, c: int, batch_size: int):
    """Add 10 to the s x s post-layernorm patches of merged cell (r, c)."""
    s = vlm.model.config.scale_factor
    side = vlm.geometry.size // vlm.patch_size

    def plant(_m, _a, out):
        grid = out.clone().view(out.shape[0], side, side, out.shape[-1])
        grid[:, r * s : (r + 1) * s, c * s : (c + 1) * s] += 10.0
        return grid.view(out.shape)

    return vlm.model.model.vision_model.post_layernorm.register_forward_hook(plant)


REFERENCES = {"idefics3": idefics3_reference, "smolvlm": idefics3_reference}
PLANTS = {"idefics3": idefics3_plant, "smolvlm": idefics3_plant}


@pytest.fixture(scope="module", params=["tiny-idefics3", "tiny-smolvlm"])
def vlm(request):
    return cached_model(request.param)


def test_inputs_match_hf(vlm, random_images):
    """Pixels equal the family's (PIL) image processor's; tokens are the processors' unsplit
    layout (restated: SmolVLMProcessor needs torchvision; the shared checks compare Idefics3's)."""
    from PIL import Image

    S = vlm.geometry.size
    image = random_images(1, S, S)[0]
    batch = vlm.prepare([image])
    ref = vlm.processor.image_processor([Image.fromarray(image)], return_tensors="pt")
    got = vlm.family.pixel_inputs(batch.pixel_values)["pixel_values"]
    torch.testing.assert_close(ref["pixel_values"], got, rtol=0, atol=1e-5)
    tok, n = vlm.processor.tokenizer, vlm.num_image_tokens
    text = f"<fake_token_around_image><global-img>{'<image>' * n}<fake_token_around_image>"
    want = tok(text, add_special_tokens=False)["input_ids"]
    ids = batch.input_ids[0].tolist()
    start = int(batch.image_positions[0, 0]) - 2
    assert ids[start : start + n + 3] == want
    assert tok.decode(ids[:start]) == "<s><|im_start|>User:"


def test_wrapper_tokens_stay_unprobed(vlm, random_images):
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    tok = vlm.processor.tokenizer
    fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
    glob = tok.convert_tokens_to_ids("<global-img>")
    n = vlm.num_image_tokens
    for b in range(2):
        ids = batch.input_ids[b]
        first = int(batch.image_positions[b, 0])
        assert ids[first - 2] == fake and ids[first - 1] == glob and ids[first + n] == fake
        assert torch.equal(batch.image_positions[b], first + torch.arange(n))


def test_all_zero_image_is_refused(vlm, random_images):
    batch = vlm.prepare(random_images(2))
    batch.pixel_values[1] = 0.0
    with pytest.raises(ValueError, match=r"images \[1\] of the batch are all 0"):
        vlm.capture(batch, ["adapter"])
