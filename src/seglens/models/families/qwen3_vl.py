"""Qwen3-VL family (HF ``Qwen3VLForConditionalGeneration``): Qwen2-VL's layout, patch 16, DeepStack.

The vision side is Qwen2-VL's (``qwen2_vl.py``): flattened patches in 2x2-block order, full
attention blocks (no windows), a merger that concatenates each 2x2 unit's patch features and
projects them to one LLM token, units in raster order of the (S/32, S/32) grid, at one fixed
square side S (``config.seglens_image_size``, default ``DEFAULT_IMAGE_SIZE``). Learned position
embeddings are interpolated to the grid by HF. DeepStack: the outputs of chosen vision blocks
(``deepstack_visual_indexes``) are merged by their own mergers and added to the LLM's hidden
states at the image positions after its first decoder layers; ``llm.{l}`` is the decoder block's
output before that addition (what HF reports as ``hidden_states[l]``), and the next block reads
the sum. M-RoPE positions come from HF's ``get_rope_index`` as for Qwen2-VL. Causal image block.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from seglens.models.families.qwen2_vl import (
    Qwen2VLFamily,
    qwen_processor,
    qwen_token_ids,
    qwen_tokenizer,
)
from seglens.models.tiny import build_seeded, text_kwargs


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    description = (
        "Qwen3-VL (Qwen3VLForConditionalGeneration; patch 16, 2x2-merged patches, DeepStack, "
        "fixed size)"
    )
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-qwen3-vl": {}}

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_qwen3_vl_hf(**kwargs)

    @property
    def vision_width(self) -> int:
        return int(self._vision_cfg.hidden_size)


def tiny_qwen3_vl_hf(
    *,
    image_size: int = 192,
    vision_width: int = 32,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``Qwen3VLForConditionalGeneration`` and a ``TextImageProcessor``.

    Patch 16, merge 2: an S x S image is (S/16)^2 patches and (S/32)^2 image tokens; blocks 2 and
    3 feed DeepStack into LLM layers 1 and 2. The processor is Qwen2-VL's (PIL) image processor at
    patch 16 with one fixed size (``Qwen3VLProcessor`` needs torchvision).

    Returns:
        (model, processor): the HF model in eval mode and its processor.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    patch, merge = 16, 2
    if image_size % (patch * merge):
        raise ValueError(f"image_size {image_size} must be a multiple of patch*merge = 32")
    tokenizer = qwen_tokenizer()
    head_dim = text_width // heads
    third = head_dim // 2 // 4
    text_config = dict(
        text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads),
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * third, third, third],
            "mrope_interleaved": True,
        },
    )
    vision_config = dict(
        depth=vision_layers,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_heads=heads,
        patch_size=patch,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        out_hidden_size=text_width,
        num_position_embeddings=(image_size // patch) ** 2,
        deepstack_visual_indexes=[1, 2],
    )
    config = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, **qwen_token_ids(tokenizer)
    )
    config.seglens_image_size = image_size
    config._attn_implementation = attn_implementation
    model = build_seeded(Qwen3VLForConditionalGeneration, config, seed, dtype)
    return model, qwen_processor(tokenizer, image_size, patch, merge)
