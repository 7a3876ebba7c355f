"""Qwen2-VL and Qwen2.5-VL families: 2x2-merged patch tokens at a fixed resolution, M-RoPE.

Dynamic resolution is fixed to one square side S (a multiple of patch * merge = 28, default
``DEFAULT_IMAGE_SIZE``, or ``config.seglens_image_size``), so every image has the same
``image_grid_thw`` = (1, S/14, S/14) and N = (S/28)^2 image tokens. The model's input format is a
list of flattened patches in 2x2-block order (``patchify``); the vision blocks keep that order
(Qwen2.5-VL further permutes the 2x2 units into attention windows), the merger concatenates each
unit's 4 patch features (4 * Dv) and projects them to one LLM token per unit, and the units are
in raster order of the (S/28, S/28) merged grid, which is also their order in the LLM sequence.

Stages: ``vision.{i}`` = block i's output, ``encoder`` = the merger's input (the last block's
output), both reduced to the N merged tokens by concatenating each unit's 4 patch features in the
unit's own (row, col) order; ``adapter`` = merger output = the LLM input embeddings at the image
positions; ``llm.{l}`` at the image positions. ``forward`` computes the M-RoPE position ids the
way HF does (``get_rope_index`` on the 2D padding mask), also when a 4D mask is given.
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
IMAGE_TOKEN = "<|image_pad|>"


def patchify(
    pixel_values: torch.Tensor, patch_size: int, merge_size: int, temporal_patch_size: int
) -> torch.Tensor:
    """(B, C, S, S) pixels -> (B * P, C * t * p * p) flat patches in Qwen2-VL's 2x2-block order.

    The same layout as ``Qwen2VLImageProcessor.patchify``: patches ordered (block row, block col,
    row in block, col in block), each patch flattened as (C, t, p, p) with the still image repeated
    over the t temporal slots.

    Args:
        pixel_values: (B, C, H, W) normalised pixels, H and W multiples of patch * merge.
        patch_size: p; merge_size: m; temporal_patch_size: t.
    """
    B, C, H, W = pixel_values.shape
    p, m = patch_size, merge_size
    if H % (p * m) or W % (p * m):
        raise ValueError(f"image side {H}x{W} must be a multiple of patch*merge = {p * m}")
    gh, gw = H // p, W // p
    x = pixel_values.reshape(B, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, gh/m, gw/m, m, m, C, p, p)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal_patch_size, p, p)
    return x.reshape(B * gh * gw, C * temporal_patch_size * p * p)


def padding_mask_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) padding mask, or a 4D mask (B, 1, T, T) -> the (B, T) padding mask (1 = real).

    A 4D mask from seglens (``interventions.build_attention_mask``) or from HF for right padding
    lets every real query read itself and no padded query read itself, so the diagonal is the
    padding mask: True (bool) / 0 (additive float) on real tokens.
    """
    if attention_mask.ndim == 2:
        return attention_mask
    if attention_mask.ndim != 4:
        raise ValueError(
            f"attention mask must be (B, T) or (B, 1, T, T), got {attention_mask.shape}"
        )
    diag = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
    real = diag if diag.dtype == torch.bool else diag == 0
    return real.long()


class Qwen2VLFamily(ModelFamily):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    description = "Qwen2-VL (Qwen2VLForConditionalGeneration; 2x2-merged patches, fixed size)"
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-qwen2-vl": {}}

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_qwen2_vl_hf(**kwargs)

    hf_processor = False  # Qwen2VLProcessor needs torchvision (its video processor)
    vision_layers_key = "depth"

    def __init__(self, model: nn.Module):
        super().__init__(model)  # _inner: Qwen2VLModel (visual: blocks + merger, language_model)
        cfg = model.config
        self._merge = int(self._vision_cfg.spatial_merge_size)
        unit = self.patch_size * self._merge
        self._size = fixed_image_size(cfg, DEFAULT_IMAGE_SIZE, unit)
        side = self._size // unit
        self._grid = (side, side)

    # --- facts ------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self._size

    @property
    def patch_size(self) -> int:
        return int(self._vision_cfg.patch_size)

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """(t, h, w) of one image in patches, as ``image_grid_thw`` holds it."""
        side = self._size // self.patch_size
        return (1, side, side)

    @property
    def vision_width(self) -> int:
        """Dv, the width of the vision blocks."""
        return int(self._vision_cfg.embed_dim)

    @property
    def vision_stage_width(self) -> int:
        # vision.{i} and encoder concatenate each 2x2 unit's patch features (merge_units).
        return self.vision_width * self._merge**2

    def image_placeholder(self, processor) -> str:
        return getattr(processor, "image_token", None) or IMAGE_TOKEN

    # --- token layout -----------------------------------------------------------------------------
    def unit_order(self) -> torch.Tensor | None:
        """For each raster slot, its 2x2 unit's index in the vision sequence (None: identity)."""
        return None

    def merge_units(self, h: torch.Tensor) -> torch.Tensor:
        """(B * P, Dv) vision-sequence patches -> (B, N, 4 * Dv), raster order of the merged grid.

        Each merged token concatenates its unit's 4 patch features (row-major within the unit),
        exactly the vector the merger's MLP reads for it.
        """
        n = self.num_image_tokens
        units = h.reshape(-1, n, self._merge**2 * h.shape[-1])
        order = self.unit_order()
        return units if order is None else units[:, order.to(units.device)]

    def merged_tokens(self, h: torch.Tensor) -> torch.Tensor:
        """(B * N, D) merger output in vision-sequence order -> (B, N, D) in raster order."""
        tokens = h.reshape(-1, self.num_image_tokens, h.shape[-1])
        order = self.unit_order()
        return tokens if order is None else tokens[:, order.to(tokens.device)]

    def stage_taps(self) -> dict[str, Tap]:
        visual = self._inner.visual
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "fn", self.merge_units)
            for i, block in enumerate(visual.blocks)
        }
        taps["encoder"] = Tap(visual.merger, "input", "fn", self.merge_units)
        taps["adapter"] = Tap(visual.merger, "output", "fn", self.merged_tokens)
        return {**taps, **self.llm_taps()}

    # --- forward ----------------------------------------------------------------------------------
    def model_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        padding_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The HF inputs for (B, T) ids, (B, 3, S, S) pixels and a (B, T) padding mask.

        Returns:
            ``pixel_values`` (B * P, 3 * t * p * p) flat patches, ``image_grid_thw`` (B, 3),
            ``mm_token_type_ids`` (B, T) (1 on image tokens) and the M-RoPE ``position_ids``
            (3, B, T) from HF's ``get_rope_index``.
        """
        if pixel_values.shape[-1] != self._size or pixel_values.shape[-2] != self._size:
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])}, this model is set up for "
                f"{self._size}x{self._size}; build inputs with vlm.prepare()"
            )
        B = input_ids.shape[0]
        patches = patchify(
            pixel_values,
            self.patch_size,
            self._merge,
            int(self._vision_cfg.temporal_patch_size),
        )
        grid_thw = torch.tensor([self.grid_thw] * B, dtype=torch.long, device=input_ids.device)
        token_types = (input_ids == self.image_token_id).int()
        position_ids, _ = self._inner.get_rope_index(
            input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=grid_thw,
            attention_mask=padding_mask.to(input_ids.device),
        )
        return {
            "pixel_values": patches,
            "image_grid_thw": grid_thw,
            "mm_token_type_ids": token_types,
            "position_ids": position_ids,
        }

    def forward(self, input_ids, pixel_values, attention_mask, *, padding_mask=None, **kwargs):
        """The native forward with M-RoPE positions computed from the 2D padding mask.

        Args:
            input_ids: (B, T) ids with N image tokens per row.
            pixel_values: (B, 3, S, S) normalised pixels (patchified here).
            attention_mask: (B, T) padding mask, or a 4D mask every decoder layer gets as is.
            padding_mask: (B, T) padding mask for the positions; default derived from
                ``attention_mask`` (``padding_mask_from``).
        """
        if padding_mask is None:
            padding_mask = padding_mask_from(attention_mask)
        inputs = self.model_inputs(input_ids, pixel_values, padding_mask)
        inputs.pop("mm_token_type_ids")  # positions are given: HF needs it only to compute them
        return self._inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **inputs,
            **kwargs,
        )


class Qwen25VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    description = (
        "Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration; 2x2-merged patches, window attention)"
    )
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-qwen2.5-vl": {"version": "2.5"}}

    @property
    def vision_width(self) -> int:
        return int(self._vision_cfg.hidden_size)

    def __init__(self, model: nn.Module):
        from transformers.vision_utils import get_vision_window_index

        super().__init__(model)
        window_index, _ = get_vision_window_index(
            torch.tensor([self.grid_thw]),
            spatial_merge_size=self._merge,
            window_size=int(self._vision_cfg.window_size),
            patch_size=self.patch_size,
        )
        # window_index[w] = the raster unit at window-order position w; its inverse maps back.
        self._unit_order = torch.argsort(window_index)

    def unit_order(self) -> torch.Tensor:
        """Raster slot -> position of its 2x2 unit in the window-attention order of the blocks."""
        return self._unit_order


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

    if version not in ("2", "2.5"):
        raise ValueError(f"Qwen-VL version {version!r} is not one of '2', '2.5'")
    patch, merge = 14, 2
    if image_size % (patch * merge):
        raise ValueError(f"image_size {image_size} must be a multiple of patch*merge = 28")
    tokenizer = qwen_tokenizer()
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
        text_config=text_config, vision_config=vision_config, **qwen_token_ids(tokenizer)
    )
    config.seglens_image_size = image_size
    config._attn_implementation = attn_implementation
    model = build_seeded(model_cls, config, seed, dtype)
    return model, qwen_processor(tokenizer, image_size, patch, merge)


def qwen_tokenizer():
    """The byte-level tokenizer with Qwen's special tokens and chat template (no BOS)."""
    return special_byte_tokenizer(
        QWEN_TOKENS, QWEN_TEMPLATE, others=("<|im_start|>", "<|im_end|>"), add_bos=False
    )


def qwen_token_ids(tokenizer) -> dict[str, int]:
    """The config's image / video / vision start / vision end token ids."""
    return {f"{k}_id": tokenizer.convert_tokens_to_ids(v) for k, v in QWEN_TOKENS.items()}


def qwen_processor(tokenizer, image_size: int, patch: int, merge: int) -> TextImageProcessor:
    """A ``TextImageProcessor`` around the (PIL) Qwen2-VL image processor at one fixed size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=merge,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return TextImageProcessor(tokenizer, image_processor, QWEN_TOKENS["image_token"], QWEN_TEMPLATE)
