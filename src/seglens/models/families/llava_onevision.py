"""LLaVA-OneVision family (HF ``LlavaOnevisionForConditionalGeneration``): SigLIP, anyres_max.

The token layout is LLaVA-NeXT's (``pack_image_features``): the base image's g x g tokens first,
then the high-resolution tiles stitched into one grid, unpadded to the image's aspect ratio, each
row closed by the learned newline token. OneVision adds ``vision_aspect_ratio="anyres_max_K"``:
when the stitched grid has more than ~1.1^2 K g^2 tokens, HF bilinearly shrinks it by
``ratio = sqrt(rows cols / (K g^2))`` to ``(rows // ratio, cols // ratio)`` before adding the
newlines. seglens probes the base grid (``grid="base"``); ``grid="tiles"`` probes the stitched
tiles and is refused where HF would shrink them (a shrunk cell mixes several tile patches). The
SigLIP tower has no CLS token (strategy ``full`` keeps every patch). Every stage reads the probed
grid as in LLaVA-NeXT; the image block is causal.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from seglens.models.families.llava_next import LlavaNextFamily
from seglens.models.processing import TextImageProcessor
from seglens.models.tiny import build_seeded, special_byte_tokenizer, text_kwargs, vision_kwargs

# OneVision's (Qwen2) conversation format with LLaVA's <image> placeholder.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ONEVISION_TOKENS = {"image_token": "<image>", "video_token": "<video>"}


def anyres_max_shape(rows: int, cols: int, side: int, aspect: str) -> tuple[int, int]:
    """(rows, cols) of the stitched tile grid after OneVision's ``anyres_max_K`` shrinking.

    As ``pack_image_features`` computes it: ``K`` from ``aspect``, ``ratio = sqrt(rows cols /
    (K side^2))``; above 1.1 the grid becomes ``(int(rows // ratio), int(cols // ratio))``.

    Raises:
        ValueError: ``aspect`` is not ``"anyres_max_<int>"``.
    """
    number = aspect.removeprefix("anyres_max_")
    if number == aspect or not number.isdigit():
        raise ValueError(f"vision_aspect_ratio {aspect!r} is not of the form 'anyres_max_<int>'")
    max_tiles = int(number)
    ratio = math.sqrt(rows * cols / (max_tiles * side**2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


class LlavaOnevisionFamily(LlavaNextFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    description = (
        "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration; SigLIP, anyres_max tiles + "
        "newlines, base grid probed or grid='tiles')"
    )
    hf_processor = False  # LlavaOnevisionProcessor needs torchvision (its video processor)
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-llava-onevision": {}}

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_llava_onevision_hf(**kwargs)

    def __init__(self, model: nn.Module, *, grid: str = "base"):
        """``grid``: ``"base"`` or ``"tiles"`` (see ``LlavaNextFamily``)."""
        super().__init__(model, grid=grid)
        rows, cols = self._tile_grid
        aspect = model.config.vision_aspect_ratio
        shrunk = anyres_max_shape(rows, cols, self._base_grid[0], aspect)
        if shrunk != (rows, cols) and grid == "tiles":
            raise ValueError(
                f"grid='tiles': vision_aspect_ratio={aspect!r} shrinks the {rows}x{cols} stitched "
                f"tile grid to {shrunk[0]}x{shrunk[1]} (bilinear), so its tokens are no tile "
                "patches; use grid='base' for this model"
            )
        self._tile_grid = shrunk

    def image_placeholder(self, processor) -> str:
        return getattr(processor, "image_token", None) or ONEVISION_TOKENS["image_token"]


def tiny_llava_onevision_hf(
    *,
    image_size: int = 112,
    patch_size: int = 14,
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None,
    vision_width: int = 48,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2) and a processor.

    ``grid_pinpoints`` defaults to the one resolution (S, S): the sequence is the base g x g
    tokens, then g rows of g tile tokens each closed by a newline. The processor is a
    ``TextImageProcessor`` with the real (PIL) OneVision image processor.

    Returns:
        (model, processor): the HF model in eval mode and its processor.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    pinpoints = [list(p) for p in (grid_pinpoints or ((image_size, image_size),))]
    tokenizer = special_byte_tokenizer(
        ONEVISION_TOKENS, ONEVISION_TEMPLATE, others=("<|im_start|>", "<|im_end|>"), add_bos=False
    )
    vision_config = SiglipVisionConfig(
        **vision_kwargs(vision_width, vision_layers, heads, image_size, patch_size),
        vision_use_head=False,
    )
    text_config = Qwen2Config(**text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads))
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(ONEVISION_TOKENS["image_token"]),
        video_token_index=tokenizer.convert_tokens_to_ids(ONEVISION_TOKENS["video_token"]),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(LlavaOnevisionForConditionalGeneration, config, seed, dtype)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    processor = TextImageProcessor(
        tokenizer, image_processor, ONEVISION_TOKENS["image_token"], ONEVISION_TEMPLATE
    )
    return model, processor
