"""LLaVA-1.5: the independent HF path and the plant for the shared family tests, and the
``vision_feature_select_strategy="full"`` case of a tower with a CLS token (``tiny-clip-cls``).

With ``full`` HF projects every tower token, CLS first: the sequence holds N + 1 placeholders,
the CLS one first. seglens keeps it in the sequence, never probes it and never maps it to a grid
cell: every stage equals HF's tensors without the CLS row, the grid positions are the last N
placeholders, and the CLS placeholder carries the projected CLS feature.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import TWO_PROMPTS
from family_checks import cached_model, gather, llm_reference, plant_rows

CLS_TOWERS = ("clip_vision_model", "dinov2")  # towers whose sequence starts with a CLS token


def projected_cls(vlm) -> int:
    """1 when HF projects the tower's CLS token (strategy 'full' on CLIP/DINOv2), else 0."""
    cfg = vlm.model.config
    has_cls = cfg.vision_config.model_type in CLS_TOWERS
    return int(has_cls and cfg.vision_feature_select_strategy == "full")


def llava_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's own outputs; the CLS row (tower index 0) removed where present."""
    model, inner = vlm.model, vlm.model.model
    cfg = model.config
    ref = llm_reference(
        vlm,
        batch,
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        tower = inner.vision_tower(batch.pixel_values, output_hidden_states=True)
        feats = inner.get_image_features(pixel_values=batch.pixel_values).pooler_output
    cls = int(cfg.vision_config.model_type in CLS_TOWERS)
    hidden = tower.hidden_states
    ref.update({f"vision.{i}": hidden[i][:, cls:] for i in range(1, len(hidden))})
    ref["encoder"] = hidden[cfg.vision_feature_layer][:, cls:]
    ref["adapter"] = torch.stack(list(feats))[:, projected_cls(vlm) :]
    return ref


def llava_plant(vlm, r: int, c: int, batch_size: int):
    """Add 10 to patch (r, c)'s row of the projector input (after a projected CLS row)."""
    k = r * vlm.grid[1] + c
    first = projected_cls(vlm)
    rows = vlm.num_image_tokens + first

    def cell_rows(h):
        return torch.arange(h.shape[0]) * rows + first + k

    return plant_rows(vlm.model.model.multi_modal_projector, cell_rows, pre=True)


REFERENCES = {"llava": llava_reference}
PLANTS = {"llava": llava_plant}


# --- strategy "full" with a CLS token -------------------------------------------------------------
@pytest.fixture(scope="module")
def cls_vlm():
    return cached_model("tiny-clip-cls")


def test_cls_is_in_the_sequence_and_not_probed(cls_vlm, random_images):
    vlm = cls_vlm
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    n = vlm.num_image_tokens
    assert vlm.grid == (16, 16) and vlm.family.num_placeholder_tokens == n + 1
    got = vlm.capture(batch, ["adapter", "llm.1"])
    ref = llava_reference(vlm, batch)
    with torch.no_grad():
        feats = torch.stack(
            list(vlm.model.model.get_image_features(batch.pixel_values).pooler_output)
        )
    assert feats.shape[1] == n + 1  # HF projects CLS + N patches
    for b in range(2):
        placeholders = (batch.input_ids[b] == vlm.image_token_id).nonzero().flatten()
        assert len(placeholders) == n + 1
        assert torch.equal(batch.image_positions[b], placeholders[1:])
    # The CLS placeholder holds the projected CLS feature; the grid slots the patches.
    first = (batch.input_ids == vlm.image_token_id).int().argmax(1)
    assert torch.equal(ref["llm.0"], got["adapter"])
    assert torch.equal(got["adapter"], feats[:, 1:])
    embeds = {}

    def keep(_m, args, kwargs):
        embeds["x"] = kwargs["inputs_embeds"]

    language_model = vlm.model.model.language_model
    handle = language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        vlm.capture(batch, ["llm.1"])
    finally:
        handle.remove()
    assert torch.equal(gather(embeds["x"], first[:, None])[:, 0], feats[:, 0])


def test_cls_inputs_match_the_hf_processor(cls_vlm, random_images):
    from PIL import Image

    vlm = cls_vlm
    image = random_images(1)[0]
    batch = vlm.prepare([image])
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": vlm.prompt}]}
    ]
    text = vlm.processor.apply_chat_template(conversation, add_generation_prompt=True)
    ref = vlm.processor(text=[text], images=[Image.fromarray(image)], return_tensors="pt")
    assert ref["input_ids"][0].tolist() == batch.input_ids[0].tolist()
    torch.testing.assert_close(ref["pixel_values"], batch.pixel_values, rtol=0, atol=1e-5)


def test_cls_save_and_load(cls_vlm, random_images, tmp_path):
    from seglens.models import load_model

    cls_vlm.model.save_pretrained(tmp_path)
    cls_vlm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.family.num_extra_tokens == 1
    batch = loaded.prepare(random_images(1))
    a, b = cls_vlm.capture(batch), loaded.capture(batch)
    assert all(torch.equal(a[s], b[s]) for s in a)


def test_full_strategy_on_an_unknown_tower_is_refused():
    from seglens.models.families.llava import prefix_tokens

    with pytest.raises(ValueError, match=r"vision_feature_select_strategy='full' with a 'eva'"):
        prefix_tokens(SimpleNamespace(model_type="eva"))
    assert prefix_tokens(SimpleNamespace(model_type="siglip_vision_model")) == 0
    registers = SimpleNamespace(model_type="dinov2_with_registers", num_register_tokens=4)
    assert prefix_tokens(registers) == 5
