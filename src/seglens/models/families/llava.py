"""LLaVA-1.5 family (HF ``LlavaForConditionalGeneration``) with CLIP, SigLIP or DINOv2 towers.

The adapter reads the vision feature the projector consumes (``vision_feature_layer``, with the
CLS token dropped by ``vision_feature_select_strategy="default"``) from the projector's own input,
so it is exactly what the model uses whatever the layer setting. Image tokens are the positions
where ``input_ids == image_token_id``, one per patch in raster order. With ``"full"`` on a tower
that has a CLS token (CLIP, DINOv2) the CLS feature is projected too and its token comes first
among the placeholders: it stays in the sequence, is never probed and is no grid cell.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

from seglens.models.base import ModelFamily, Tap, contiguous_image_positions, vision_blocks
from seglens.models.tiny import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    build_seeded,
    byte_tokenizer,
    llava_processor,
    text_kwargs,
    vision_kwargs,
)

VISIONS = ("clip", "siglip", "dinov2")
# Tokens a vision tower puts before its patches (CLS), by the vision config's model_type.
PREFIX_TOKENS = {"clip_vision_model": 1, "dinov2": 1, "siglip_vision_model": 0}


def prefix_tokens(vision_config) -> int:
    """Non-patch tokens before the patches in the tower's sequence (CLS, registers).

    Raises:
        ValueError: a tower seglens does not know, with the option that avoids the question.
    """
    kind = getattr(vision_config, "model_type", None)
    if kind == "dinov2_with_registers":
        return 1 + int(vision_config.num_register_tokens)
    if kind not in PREFIX_TOKENS:
        raise ValueError(
            f"vision_feature_select_strategy='full' with a {kind!r} vision tower: seglens does not "
            f"know how many non-patch tokens it keeps (known towers: {sorted(PREFIX_TOKENS)}); "
            "use vision_feature_select_strategy='default' (drops the CLS token)"
        )
    return PREFIX_TOKENS[kind]


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    description = (
        "LLaVA-1.5 (LlavaForConditionalGeneration; CLIP, SigLIP or DINOv2 vision tower; CLS kept "
        "by strategy 'full' stays in the sequence, not probed)"
    )
    tiny_models: ClassVar[dict[str, dict]] = {
        "tiny-clip": {"vision": "clip"},
        "tiny-siglip": {"vision": "siglip"},
        "tiny-dinov2": {"vision": "dinov2"},
        # vision_feature_select_strategy "full" on CLIP: the CLS token is projected too.
        "tiny-clip-cls": {"vision": "clip", "strategy": "full"},
    }

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_llava_hf(**kwargs)

    def __init__(self, model: nn.Module):
        super().__init__(model)  # _inner: LlavaModel (vision_tower, projector, language_model)
        side = self._vision_cfg.image_size // self._vision_cfg.patch_size
        self._grid = (side, side)
        # HF's config admits only 'default' (CLS dropped) and 'full' (every tower token).
        strategy = model.config.vision_feature_select_strategy
        # 'full' projects the tower's CLS (and register) tokens too: they precede the patches.
        self._extra = prefix_tokens(self._vision_cfg) if strategy == "full" else 0

    @property
    def num_extra_tokens(self) -> int:
        """Projected non-patch tokens (CLS) before the patch tokens: in the sequence, not probed."""
        return self._extra

    @property
    def num_placeholder_tokens(self) -> int:
        return self.num_image_tokens + self._extra

    @property
    def encoder_width(self) -> int:
        # The projector reads the concatenation of the vision_feature_layer(s).
        layer = self.model.config.vision_feature_layer
        return self.vision_stage_width * (1 if isinstance(layer, int) else len(layer))

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = contiguous_image_positions(
            input_ids, self.image_token_id, self.num_placeholder_tokens
        )
        return positions[:, self._extra :]

    def stage_taps(self) -> dict[str, Tap]:
        blocks = vision_blocks(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "patches") for i, block in enumerate(blocks)
        }
        # "patches": the last N rows, i.e. without a projected CLS (strategy 'full').
        taps["encoder"] = Tap(projector, "input", "patches")
        taps["adapter"] = Tap(projector, "output", "patches")
        return {**taps, **self.llm_taps()}


def tiny_llava_hf(
    vision: str = "clip",
    *,
    image_size: int = 224,
    patch_size: int = 14,
    vision_width: int = 48,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    strategy: str | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random LlavaForConditionalGeneration and its processor (no download).

    ``strategy`` is ``vision_feature_select_strategy``; default: ``default`` (CLS dropped) for
    CLIP and DINOv2, ``full`` for SigLIP (no CLS). ``full`` on CLIP/DINOv2 keeps the CLS token.

    Returns:
        (model, processor): the HF model in eval mode and a ``LlavaProcessor``.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if vision not in VISIONS:
        raise ValueError(f"tiny vision tower {vision!r} is not one of {VISIONS}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    tokenizer = byte_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    common = vision_kwargs(vision_width, vision_layers, heads, image_size, patch_size)
    if vision == "clip":
        vision_config, default, extra = CLIPVisionConfig(**common), "default", 1
    elif vision == "siglip":
        vision_config, default, extra = SiglipVisionConfig(**common), "full", 0
    else:
        common.pop("intermediate_size")
        vision_config, default, extra = Dinov2Config(mlp_ratio=2, **common), "default", 1
    strategy = strategy or default
    if strategy not in ("default", "full"):
        raise ValueError(f"strategy {strategy!r} is not one of 'default', 'full'")
    text_config = LlamaConfig(**text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads))
    grid = image_size // patch_size
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=grid * grid + (extra if strategy == "full" else 0),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(LlavaForConditionalGeneration, config, seed, dtype)
    if vision == "siglip":
        image_processor = CLIPImageProcessorPil(
            size={"height": image_size, "width": image_size},
            do_center_crop=False,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
        )
    else:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
    processor = llava_processor(
        LlavaProcessor, image_processor, tokenizer, patch_size, strategy, extra
    )
    return model, processor
