"""InternVL family (HF ``InternVLForConditionalGeneration``, InternVL 3 / 3.5): InternViT, shuffle.

InternViT prepends a CLS token to the (S/p)^2 raster patches (``vision_feature_select_strategy
"default"`` drops it). ``get_image_features`` pixel-shuffles the patch grid with
``downsample_ratio`` 1/s: each s x s unit becomes one token holding its patches in (row, col,
channel) order, tokens in raster order of the (S/sp, S/sp) grid, then the projector (LayerNorm +
MLP). seglens feeds one S x S image (S = the tower's ``image_size``), the processor's layout
without tiling (``crop_to_patches=False``): ``<img>`` + N ``<IMG_CONTEXT>`` + ``</img>``; the
wrapper tokens stay in the sequence and are never probed. (With tiling HF adds up to
``max_patches`` tiles and a thumbnail, each 256 tokens, in sequence; seglens does not probe them.)

Stages: ``vision.{i}`` (InternViT block i, CLS dropped) pixel-shuffled as HF does; ``encoder`` =
the projector input (the shuffled ``vision_feature_layer`` output); ``adapter`` = projector output
= LLM input embeddings at the image positions. The LLM (Qwen2 / Qwen3 ...) attends causally.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seglens.models.base import ModelFamily, Tap, vision_blocks
from seglens.models.families.idefics3 import shuffle_units
from seglens.models.processing import TextImageProcessor
from seglens.models.tiny import build_seeded, special_byte_tokenizer, text_kwargs

INTERNVL_TOKENS = {
    "context_image_token": "<IMG_CONTEXT>",
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "video_token": "<video>",
}
INTERNVL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _side(value) -> int:
    """A square size from an int or an (h, w) pair."""
    if isinstance(value, int):
        return value
    h, w = value
    if h != w:
        raise ValueError(f"InternVL: non-square vision size {list(value)} is not supported")
    return int(h)


class InternVLFamily(ModelFamily):
    name = "internvl"
    model_types = ("internvl",)
    description = (
        "InternVL 3/3.5 (InternVLForConditionalGeneration; InternViT, pixel shuffle, one "
        "448-px crop without tiling)"
    )
    hf_processor = False  # InternVLProcessor needs torchvision (its video processor)
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-internvl": {}}

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_internvl_hf(**kwargs)

    def __init__(self, model: nn.Module):
        super().__init__(model)  # _inner: InternVLModel (vision_tower, projector, language_model)
        cfg = model.config
        scale = round(1 / float(cfg.downsample_ratio))
        if abs(scale * float(cfg.downsample_ratio) - 1) > 1e-6:
            raise ValueError(f"InternVL: downsample_ratio {cfg.downsample_ratio} is not 1/int")
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"InternVL: vision_feature_layer {layer} must be one layer")
        self._scale = scale
        self._patches = self.image_size // self.patch_size
        side, rest = divmod(self._patches, scale)
        if rest:
            raise ValueError(
                f"InternVL: {self._patches} patches per side is not a multiple of {scale}"
            )
        self._grid = (side, side)
        # 'default' drops InternViT's CLS token; 'full' would shuffle it into the grid.
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(
                "InternVL with vision_feature_select_strategy="
                f"{cfg.vision_feature_select_strategy!r}: HF would pixel-shuffle the CLS token "
                "with the patches; seglens supports 'default' (CLS dropped)"
            )

    @property
    def image_size(self) -> int:
        return _side(self._vision_cfg.image_size)

    @property
    def patch_size(self) -> int:
        return _side(self._vision_cfg.patch_size)

    @property
    def vision_stage_width(self) -> int:
        return int(self._vision_cfg.hidden_size) * self._scale**2

    def image_placeholder(self, processor) -> str:
        return INTERNVL_TOKENS["context_image_token"]

    def expand_image_placeholder(self, text: str, processor) -> str:
        # InternVLProcessor: <img> + image_seq_length * num_patches <IMG_CONTEXT> + </img>.
        token = self.image_placeholder(processor)
        start, end = INTERNVL_TOKENS["start_image_token"], INTERNVL_TOKENS["end_image_token"]
        return text.replace(token, f"{start}{token * self.num_image_tokens}{end}")

    def geometry_mode(self, image_config: dict) -> str | None:
        return "resize"  # GotOcr2 image processor without crop_to_patches: squash to S x S

    def _shuffle(self, h: torch.Tensor) -> torch.Tensor:
        """(B, 1 + P, D) block output (CLS first) -> (B, N, s^2 D) as HF's pixel shuffle."""
        return shuffle_units(h[:, h.shape[1] - self._patches**2 :], self._patches, self._scale)

    def stage_taps(self) -> dict[str, Tap]:
        blocks = vision_blocks(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "fn", self._shuffle)
            for i, block in enumerate(blocks)
        }
        taps["encoder"] = Tap(projector, "input", "all")
        taps["adapter"] = Tap(projector, "output", "all")
        return {**taps, **self.llm_taps()}


def tiny_internvl_hf(
    *,
    image_size: int = 168,
    patch_size: int = 14,
    vision_width: int = 48,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``InternVLForConditionalGeneration`` (InternViT + Qwen2) and a processor.

    (S/p)^2 patches, pixel shuffle by 2: (S/2p)^2 image tokens. The processor is a
    ``TextImageProcessor`` (``InternVLProcessor`` needs torchvision) with the real (PIL) GotOcr2
    image processor settings, no tiling.

    Returns:
        (model, processor): the HF model in eval mode and its processor.
    """
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    if image_size % (2 * patch_size):
        raise ValueError(f"image_size {image_size} must be a multiple of 2 * patch_size")
    tokenizer = special_byte_tokenizer(
        INTERNVL_TOKENS, INTERNVL_TEMPLATE, others=("<|im_start|>", "<|im_end|>"), add_bos=False
    )
    vision_config = InternVLVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=(image_size, image_size),
        patch_size=(patch_size, patch_size),
    )
    text_config = Qwen2Config(**text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads))
    config = InternVLConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
        image_seq_length=(image_size // (2 * patch_size)) ** 2,
        downsample_ratio=0.5,
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(InternVLForConditionalGeneration, config, seed, dtype)
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=False,
        image_mean=(0.485, 0.456, 0.406),
        image_std=(0.229, 0.224, 0.225),
    )
    processor = TextImageProcessor(
        tokenizer, image_processor, INTERNVL_TOKENS["context_image_token"], INTERNVL_TEMPLATE
    )
    return model, processor
