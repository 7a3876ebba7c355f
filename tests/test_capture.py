"""Captured stages equal independent HF paths exactly, for every vision tower."""

from __future__ import annotations

import pytest
import torch

from conftest import TWO_PROMPTS, hf_forward_last

VISIONS = ["clip", "siglip", "dinov2"]


def hf_reference(vlm, batch):
    """Independent path: HF outputs with every hidden state, plus a hook on the last block."""
    model, inner = vlm.model, vlm.model.model
    cfg = model.config
    out, last_block = hf_forward_last(
        model,
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        tower = inner.vision_tower(batch.pixel_values, output_hidden_states=True)
        feats = inner.get_image_features(
            pixel_values=batch.pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
    selected = tower.hidden_states[cfg.vision_feature_layer]
    if cfg.vision_feature_select_strategy == "default":
        selected = selected[:, 1:]
    return out.hidden_states, selected, torch.stack(list(feats)), last_block, tower.hidden_states


def gather(h, positions):
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


@pytest.mark.parametrize("vision", VISIONS)
def test_stages_equal_independent_paths(tiny_models, random_images, vision):
    vlm = tiny_models(vision)
    batch = vlm.prepare(random_images(2), prompts=TWO_PROMPTS)
    assert batch.attention_mask[0].sum() != batch.attention_mask[1].sum()  # two lengths, padded
    got = vlm.capture(batch, vlm.stages)
    hidden, encoder, adapter, last_block, vision_hidden = hf_reference(vlm, batch)
    pos = batch.image_positions
    L = vlm.num_llm_layers

    assert torch.equal(got["encoder"], encoder)
    assert torch.equal(got["adapter"], adapter)
    assert torch.equal(got["adapter"], gather(hidden[0], pos))
    for layer in range(1, L):
        assert torch.equal(got[f"llm.{layer}"], gather(hidden[layer], pos)), layer
    assert torch.equal(got[f"llm.{L}"], gather(last_block, pos))
    assert not torch.allclose(got[f"llm.{L}"], gather(hidden[L], pos))  # HF's last is post-norm
    assert torch.equal(got["llm.final_norm"], gather(hidden[L], pos))
    n = vlm.num_image_tokens
    for i in range(1, vlm.family.num_vision_layers + 1):
        assert torch.equal(got[f"vision.{i}"], vision_hidden[i][:, -n:])
    for stage, tensor in got.items():
        assert tensor.shape[:2] == (2, n), stage


def test_capture_keeps_only_what_was_asked(tiny_vlm, random_images):
    batch = tiny_vlm.prepare(random_images(2))
    calls = []
    layers = tiny_vlm.family.decoder_layers()
    handles = [
        m.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, m in enumerate(layers)
    ]
    try:
        out = tiny_vlm.capture(batch, ["adapter", "llm.2"])
    finally:
        for h in handles:
            h.remove()
    assert list(out) == ["adapter", "llm.2"]
    assert calls == [0, 1]  # the pass stopped after block 2: blocks 3.. never ran
    full = tiny_vlm.capture(batch, ["llm.2", "llm.4"])
    assert torch.equal(full["llm.2"], out["llm.2"])


def test_image_states_ignore_text_after_the_image(tiny_vlm, random_images):
    images = random_images(2)
    a = tiny_vlm.capture(tiny_vlm.prepare(images, prompts=TWO_PROMPTS[:1] * 2))
    b = tiny_vlm.capture(tiny_vlm.prepare(images, prompts=TWO_PROMPTS[1:] * 2))
    for stage in a:
        # Two prompt lengths run through differently blocked CPU kernels (seen with transformers
        # 5.24: 2e-8 apart), so this is equality up to fp32 rounding; text leaking into the image
        # states through the mask would move them by orders of magnitude more.
        torch.testing.assert_close(a[stage], b[stage], rtol=0, atol=1e-6, msg=stage)


def test_causal_perturbation_leaves_earlier_slots_unchanged(tiny_vlm, random_images):
    batch = tiny_vlm.prepare(random_images(1))
    projector = tiny_vlm.model.model.multi_modal_projector
    j = 100

    def bump(_m, _a, out):
        out = out.clone()
        out[:, j] += 1.0
        return out

    stages = ["adapter"] + [f"llm.{i}" for i in range(1, tiny_vlm.num_llm_layers + 1)]
    clean = tiny_vlm.capture(batch, stages)
    handle = projector.register_forward_hook(bump)
    try:
        bumped = tiny_vlm.capture(batch, stages)
    finally:
        handle.remove()
    for stage in clean:
        assert torch.equal(clean[stage][:, :j], bumped[stage][:, :j]), stage
        assert not torch.equal(clean[stage][:, j:], bumped[stage][:, j:]), stage


def test_unknown_stage_suggests(tiny_vlm, random_images):
    batch = tiny_vlm.prepare(random_images(1))
    with pytest.raises(ValueError, match=r"'llm\.9'.*This model has: vision\.1\.\.vision\.4"):
        tiny_vlm.capture(batch, ["llm.9"])
    with pytest.raises(ValueError, match="did you mean 'adapter'"):
        tiny_vlm.capture(batch, ["adaptor"])


def test_save_pretrained_roundtrip_through_load_model(tiny_vlm, random_images, tmp_path):
    from seglens.models import load_model

    tiny_vlm.model.save_pretrained(tmp_path)
    tiny_vlm.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="float32")
    assert loaded.geometry == tiny_vlm.geometry
    images = random_images(2)
    a = tiny_vlm.prepare(images, prompts=TWO_PROMPTS)
    b = loaded.prepare(images, prompts=TWO_PROMPTS)
    assert torch.equal(a.input_ids, b.input_ids)
    ref, got = tiny_vlm.capture(a), loaded.capture(b)
    for stage in ref:
        assert torch.equal(ref[stage], got[stage]), stage


def test_model_errors(tmp_path):
    from seglens.models import load_model

    with pytest.raises(ValueError, match="did you mean 'tiny-clip'"):
        load_model("tiny-clp")
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        load_model(str(tmp_path / "nowhere"))
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model type 'llama' is not supported.*llava"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="sdpa"):
        load_model("tiny-clip", attn_implementation="flash_attention_2")
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(ValueError, match=r"needs the accelerate package.*seglens\[gpu\]"):
            load_model("tiny-clip", device_map="auto")
    else:
        with pytest.raises(ValueError, match="use --device instead"):
            load_model("tiny-clip", device_map="auto")
