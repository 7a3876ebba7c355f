"""Seeded tiny Qwen2-VL and Qwen2.5-VL models built from configs (random weights, no download).

The processor is a ``TextImageProcessor`` (``Qwen2VLProcessor`` needs torchvision): a byte-level
tokenizer with Qwen's special tokens and chat template, and the real (PIL) Qwen2-VL image
processor settings fixed to one size, S x S, so ``image_grid_thw`` is always (1, S/14, S/14).
"""

from __future__ import annotations

import torch

from seglens.models.processing import TextImageProcessor
from seglens.models.tiny import (
    CLIP_MEAN,
    CLIP_STD,
    build_seeded,
    special_byte_tokenizer,
    text_kwargs,
)

QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def tiny_qwen2_vl_hf(
    *,
    version: str = "2",
    image_size: int = 168,
    vision_width: int = 32,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    window_size: int = 112,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``Qwen2VLForConditionalGeneration`` (or 2.5) and a ``TextImageProcessor``.

    Patch 14, merge 2: an S x S image is (S/14)^2 patches and (S/28)^2 image tokens. Qwen2.5-VL
    alternates window attention (``window_size`` pixels) with full attention (blocks 2 and 4).

    Args:
        version: ``"2"`` (Qwen2-VL) or ``"2.5"`` (Qwen2.5-VL).
        image_size: S, a multiple of 28; saved as ``config.seglens_image_size``.

    Returns:
        (model, processor): the HF model in eval mode and its processor.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    if version not in ("2", "2.5"):
        raise ValueError(f"Qwen-VL version {version!r} is not one of '2', '2.5'")
    patch, merge = 14, 2
    if image_size % (patch * merge):
        raise ValueError(f"image_size {image_size} must be a multiple of patch*merge = 28")
    tokenizer = special_byte_tokenizer(
        QWEN_TOKENS, QWEN_TEMPLATE, others=("<|im_start|>", "<|im_end|>"), add_bos=False
    )
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in QWEN_TOKENS.items()}
    head_dim = text_width // heads
    third = head_dim // 2 // 3
    text_config = dict(
        text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads),
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * third, third, third],
        },
    )
    common = dict(depth=vision_layers, num_heads=heads, patch_size=patch, spatial_merge_size=merge)
    if version == "2":
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision_config = dict(embed_dim=vision_width, hidden_size=text_width, mlp_ratio=2, **common)
    else:
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision_config = dict(
            hidden_size=vision_width,
            out_hidden_size=text_width,
            intermediate_size=2 * vision_width,
            window_size=window_size,
            fullatt_block_indexes=list(range(1, vision_layers, 2)),
            **common,
        )
    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
    )
    config.seglens_image_size = image_size
    config._attn_implementation = attn_implementation
    model = build_seeded(model_cls, config, seed, dtype)
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=merge,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = TextImageProcessor(
        tokenizer, image_processor, QWEN_TOKENS["image_token"], QWEN_TEMPLATE
    )
    return model, processor
