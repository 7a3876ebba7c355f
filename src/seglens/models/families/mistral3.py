"""Mistral3 family (HF ``Mistral3ForConditionalGeneration``): Pixtral vision, 2x2 patch merger.

Pixtral runs every image's patches (raster order, 2D RoPE) in one sequence with block-diagonal
attention. The projector RMS-normalises them, merges each 2x2 unit with ``F.unfold`` (kernel and
stride 2: merged tokens in raster order of the (S/2p, S/2p) grid, each the unit's 4 patch
features in ``unfold``'s (channel, row, col) order) and projects them. The sequence holds one
``[IMG]`` token per merged cell, row by row, each row closed by ``[IMG_BREAK]`` and the last by
``[IMG_END]`` (``PixtralProcessor``): break and end tokens stay in the sequence and are never
probed. The resolution is fixed to one square side S (``config.seglens_image_size``, default
``DEFAULT_IMAGE_SIZE``; a multiple of 2p), every image squashed to S x S.

Stages: ``vision.{i}`` (Pixtral block i) and ``encoder`` (the projector's input: the
``vision_feature_layer`` output, before the projector's norm) reduced to the merged grid exactly
as the merger lays its units out; ``adapter`` = projector output = LLM input embeddings at the
image positions. The LLM (Mistral) attends causally.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seglens.models.base import ModelFamily, Tap, fixed_image_size
from seglens.models.processing import TextImageProcessor
from seglens.models.tiny import (
    CLIP_MEAN,
    CLIP_STD,
    build_seeded,
    special_byte_tokenizer,
    text_kwargs,
)

DEFAULT_IMAGE_SIZE = 448
MISTRAL_TOKENS = {
    "image_token": "[IMG]",
    "image_break_token": "[IMG_BREAK]",
    "image_end_token": "[IMG_END]",
}
MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}[IMG]"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
)


def merge_units(h: torch.Tensor, side: int, merge: int) -> torch.Tensor:
    """(..., B * side^2, D) patches in per-image raster order -> (B, (side/m)^2, D m^2).

    Merged cells in raster order; each cell's vector is its m x m patches in ``F.unfold`` order:
    index ``d * m^2 + i * m + j`` holds channel d of the patch at row i, column j of the unit.
    """
    D, g = h.shape[-1], side // merge
    x = h.reshape(-1, g, merge, g, merge, D)  # (B, gr, i, gc, j, D)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(-1, g * g, D * merge * merge)


class Mistral3Family(ModelFamily):
    name = "mistral3"
    model_types = ("mistral3",)
    description = (
        "Mistral3 (Mistral3ForConditionalGeneration; Pixtral vision, 2x2 patch merger, "
        "[IMG_BREAK] row ends, fixed size)"
    )
    hf_processor = False  # PixtralProcessor needs torchvision
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-mistral3": {}}

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_mistral3_hf(**kwargs)

    def __init__(self, model: nn.Module):
        super().__init__(model)  # _inner: Mistral3Model (vision_tower, projector, language_model)
        cfg = model.config
        self._merge = int(cfg.spatial_merge_size)
        unit = self.patch_size * self._merge
        self._size = fixed_image_size(cfg, DEFAULT_IMAGE_SIZE, unit)
        side = self._size // unit
        self._grid = (side, side)
        layer = cfg.vision_feature_layer
        self._feature_layers = 1 if isinstance(layer, int) else len(layer)

    # --- facts ------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self._size

    @property
    def patches_per_side(self) -> int:
        return self._size // self.patch_size

    @property
    def vision_stage_width(self) -> int:
        return int(self._vision_cfg.hidden_size) * self._merge**2

    @property
    def encoder_width(self) -> int:
        return self.vision_stage_width * self._feature_layers

    def image_placeholder(self, processor) -> str:
        return getattr(processor, "image_token", None) or MISTRAL_TOKENS["image_token"]

    def expand_image_placeholder(self, text: str, processor) -> str:
        # PixtralProcessor.replace_image_token: rows of [IMG] closed by [IMG_BREAK], the last
        # by [IMG_END].
        rows, cols = self.grid
        token = self.image_placeholder(processor)
        row = token * cols + MISTRAL_TOKENS["image_break_token"]
        image = row * (rows - 1) + token * cols + MISTRAL_TOKENS["image_end_token"]
        return text.replace(token, image)

    def geometry_mode(self, image_config: dict) -> str | None:
        return "resize"  # fixed S x S (Pixtral itself keeps the aspect ratio)

    # --- token layout -----------------------------------------------------------------------------
    def _units(self, h: torch.Tensor) -> torch.Tensor:
        return merge_units(h, self.patches_per_side, self._merge)

    def _tokens(self, h: torch.Tensor) -> torch.Tensor:
        return h.reshape(-1, self.num_image_tokens, h.shape[-1])

    def stage_taps(self) -> dict[str, Tap]:
        blocks = self._inner.vision_tower.transformer.layers
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "fn", self._units)
            for i, block in enumerate(blocks)
        }
        taps["encoder"] = Tap(projector, "input", "fn", self._units)
        taps["adapter"] = Tap(projector, "output", "fn", self._tokens)
        return {**taps, **self.llm_taps()}

    def pixel_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) pixels -> HF's ``pixel_values`` and ``image_sizes`` (S, S) per image."""
        if tuple(pixel_values.shape[-2:]) != (self._size, self._size):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])}, this model is set up for "
                f"{self._size}x{self._size}; build inputs with vlm.prepare()"
            )
        sizes = torch.tensor([[self._size, self._size]] * pixel_values.shape[0])
        return {"pixel_values": pixel_values, "image_sizes": sizes.to(pixel_values.device)}


def tiny_mistral3_hf(
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
    """Build a random ``Mistral3ForConditionalGeneration`` (Pixtral + Mistral) and a processor.

    Patch p, merge 2: an S x S image is (S/p)^2 patches and (S/2p)^2 image tokens; S is saved as
    ``config.seglens_image_size``. The processor is a ``TextImageProcessor`` (``PixtralProcessor``
    needs torchvision) with the real (PIL) Pixtral image processor settings.

    Returns:
        (model, processor): the HF model in eval mode and its processor.
    """
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    if image_size % (2 * patch_size):
        raise ValueError(f"image_size {image_size} must be a multiple of 2 * patch_size")
    tokenizer = special_byte_tokenizer(
        MISTRAL_TOKENS, MISTRAL_TEMPLATE, others=("[INST]", "[/INST]")
    )
    vision_config = PixtralVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    text_config = MistralConfig(
        **text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads),
        head_dim=text_width // heads,
    )
    config = Mistral3Config(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(MISTRAL_TOKENS["image_token"]),
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )
    config.seglens_image_size = image_size
    config._attn_implementation = attn_implementation
    model = build_seeded(Mistral3ForConditionalGeneration, config, seed, dtype)
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": image_size},
        patch_size={"height": 2 * patch_size, "width": 2 * patch_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = TextImageProcessor(
        tokenizer, image_processor, MISTRAL_TOKENS["image_token"], MISTRAL_TEMPLATE
    )
    return model, processor
