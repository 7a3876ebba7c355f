"""Mistral3 (Pixtral vision): the independent HF path, the 2x2-unit plant, the token layout.

The reference merges Pixtral's per-image raster patches with HF's own ``F.unfold`` code; the
plant adds a ramp to the 4 patch rows of one merged cell in the projector's input. Tokens equal
``PixtralProcessor.replace_image_token`` (rows of ``[IMG]`` closed by ``[IMG_BREAK]``, the last by
``[IMG_END]``; restated, as the processor module needs torchvision), pixels equal
the Pixtral image processor's, and the break/end tokens stay in the sequence, unprobed.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from conftest import TWO_PROMPTS
from family_checks import cached_model, llm_reference, plant_rows


def hf_merge(h: torch.Tensor, side: int) -> torch.Tensor:
    """(1, B * side^2, D) -> (B, (side/2)^2, 4 D), as ``Mistral3PatchMerger`` unfolds each image."""
    D = h.shape[-1]
    out = []
    for tokens in h.reshape(-1, side * side, D):
        grid = tokens.view(side, side, D).permute(2, 0, 1).unsqueeze(0)
        out.append(F.unfold(grid, kernel_size=2, stride=2).view(D * 4, -1).t())
    return torch.stack(out)


def mistral3_reference(vlm, batch) -> dict[str, torch.Tensor]:
    inner, S = vlm.model.model, vlm.geometry.size
    sizes = torch.tensor([[S, S]] * len(batch))
    ref = llm_reference(
        vlm,
        batch,
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        image_sizes=sizes,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        tower = inner.vision_tower(batch.pixel_values, image_sizes=sizes, output_hidden_states=True)
        feats = inner.get_image_features(batch.pixel_values, sizes).pooler_output
    side = S // vlm.patch_size
    hidden = tower.hidden_states
    ref.update({f"vision.{i}": hf_merge(hidden[i], side) for i in range(1, len(hidden))})
    ref["encoder"] = hf_merge(hidden[vlm.model.config.vision_feature_layer], side)
    ref["adapter"] = torch.stack(list(feats))
    return ref


def mistral3_plant(vlm, r: int, c: int, batch_size: int):
    """Add a ramp to the 4 patches of merged cell (r, c) in the projector input (B * P, D)."""
    W = vlm.geometry.size // vlm.patch_size
    cell = torch.tensor([(2 * r + i) * W + 2 * c + j for i in range(2) for j in range(2)])

    def rows(h):
        return (torch.arange(batch_size)[:, None] * W * W + cell).flatten()

    ramp = torch.linspace(-10.0, 10.0, vlm.model.config.vision_config.hidden_size)
    return plant_rows(vlm.model.model.multi_modal_projector, rows, ramp, pre=True)


REFERENCES = {"mistral3": mistral3_reference}
PLANTS = {"mistral3": mistral3_plant}


@pytest.fixture(scope="module")
def vlm():
    return cached_model("tiny-mistral3")


def test_inputs_match_pixtral(vlm, random_images):
    from PIL import Image

    S = vlm.geometry.size
    image = random_images(1, S, S)[0]
    batch = vlm.prepare([image])
    ref = vlm.processor.image_processor([Image.fromarray(image)], return_tensors="pt")
    torch.testing.assert_close(ref["pixel_values"], batch.pixel_values, rtol=0, atol=1e-5)
    assert ref["image_sizes"].tolist() == [[S, S]]
    # PixtralProcessor.replace_image_token (its module needs torchvision), restated.
    rows = S // (2 * vlm.patch_size)
    tokens = [["[IMG]"] * rows + ["[IMG_BREAK]"]] * rows
    tokens = [t for row in tokens for t in row]
    tokens[-1] = "[IMG_END]"
    expanded = "".join(tokens)
    tok = vlm.processor.tokenizer
    want = tok(expanded, add_special_tokens=False)["input_ids"]
    ids = batch.input_ids[0].tolist()
    start = ids.index(vlm.image_token_id)
    assert ids[start : start + len(want)] == want
    assert tok.decode(ids[:start]) == "<s>[INST]"


def test_breaks_stay_in_the_sequence_unprobed(vlm, random_images):
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    tok = vlm.processor.tokenizer
    brk, end = tok.convert_tokens_to_ids("[IMG_BREAK]"), tok.convert_tokens_to_ids("[IMG_END]")
    g = vlm.grid[1]
    for b in range(2):
        ids = batch.input_ids[b]
        first = int(batch.image_positions[b, 0])
        span = ids[first : first + g * (g + 1)].view(g, g + 1)
        assert (span[:, :g] == vlm.image_token_id).all()
        assert span[:-1, g].eq(brk).all() and span[-1, g] == end
        rows = torch.arange(g)[:, None] * (g + 1) + torch.arange(g)
        assert torch.equal(batch.image_positions[b], first + rows.flatten())


def test_pixel_patch_feeds_its_row(vlm, random_images):
    """Pixels of patch (pr, pc) feed Pixtral's patch row pr * W + pc of that image."""
    batch = vlm.prepare(random_images(2))
    p, W = vlm.patch_size, vlm.geometry.size // vlm.patch_size
    conv = vlm.model.model.vision_tower.patch_conv
    with torch.no_grad():
        clean = conv(batch.pixel_values).flatten(2)
        for pr, pc in [(0, 1), (W - 1, 0), (3, W - 2)]:
            pixels = batch.pixel_values.clone()
            pixels[1, :, pr * p : (pr + 1) * p, pc * p : (pc + 1) * p] += 1.0
            changed = (conv(pixels).flatten(2) - clean).abs().amax(1) > 1e-6
            assert changed.nonzero().tolist() == [[1, pr * W + pc]]


def test_rejects_another_size(vlm, random_images):
    batch = vlm.prepare(random_images(1))
    with pytest.raises(ValueError, match="is set up for 168x168"):
        vlm.family.pixel_inputs(batch.pixel_values[..., :-28, :-28])
