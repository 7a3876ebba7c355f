"""LLaVA-NeXT family (HF ``LlavaNextForConditionalGeneration``): anyres tiles, newline tokens.

The model sees the base image (the whole image at the tower's size S, g x g tokens) and, after it,
high-resolution tiles stitched into one grid with a learned newline token closing every row
(``pack_image_features``). Probing uses the base image's g x g tokens: they come first among the
image placeholders, in raster order; tile and newline tokens stay in the sequence and are never
probed. The model input is the S x S image the geometry produced, with ``image_sizes`` = (S, S);
the tiles are cut from it resized to the best ``image_grid_pinpoints`` resolution and padded
(``anyres_pixels``). Stages ``vision.{i}``, ``encoder`` and ``adapter`` are read on the base
image; ``adapter`` equals the LLM input embeddings at the base positions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from seglens.models.base import Tap, contiguous_image_positions, vision_blocks
from seglens.models.llava import LlavaFamily


def anyres_pixels(
    pixel_values: torch.Tensor, best_resolution: tuple[int, int], tile: int
) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, 1 + T, 3, S, S): the base image, then the tiles.

    As the LLaVA-NeXT image processor does for an S x S image: resize to fit ``best_resolution``
    (H, W) keeping the aspect ratio (bicubic; the identity at scale 1), pad centred, cut into
    ``tile`` x ``tile`` crops in row-major order. Padding is 0 in normalised space (the mean
    colour; the processor pads black before normalising): those tokens are removed by the model's
    unpadding, so only their influence inside a tile differs.
    """
    B, C, H, W = pixel_values.shape
    target_h, target_w = best_resolution
    scale = min(target_h / H, target_w / W)
    new_h, new_w = min(target_h, round(H * scale)), min(target_w, round(W * scale))
    canvas = pixel_values
    if (new_h, new_w) != (H, W):
        canvas = F.interpolate(canvas, size=(new_h, new_w), mode="bicubic", align_corners=False)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    canvas = F.pad(canvas, (left, target_w - new_w - left, top, target_h - new_h - top))
    tiles = canvas.reshape(B, C, target_h // tile, tile, target_w // tile, tile)
    tiles = tiles.permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, tile, tile)
    return torch.cat([pixel_values[:, None], tiles], dim=1)


def unpadded_shape(tiles_hw: tuple[int, int], side: int, original: tuple[int, int]):
    """(rows, cols) of the stitched tile grid after ``unpad_image``, as HF computes it.

    Args:
        tiles_hw: tiles per column and per row of the best resolution.
        side: g, tokens per tile side.
        original: the (H, W) given as ``image_sizes``.
    """
    rows, cols = tiles_hw[0] * side, tiles_hw[1] * side
    height, width = original
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - new_cols) // 2)
    return rows, cols


class LlavaNextFamily(LlavaFamily):
    name = "llava_next"
    model_types = ("llava_next",)
    description = (
        "LLaVA-NeXT (LlavaNextForConditionalGeneration; anyres tiles + newlines, base grid probed)"
    )

    def __init__(self, model: nn.Module):
        from transformers.image_processing_utils import select_best_resolution

        super().__init__(model)
        cfg = model.config
        S = int(self._vision_cfg.image_size)
        self._best = tuple(select_best_resolution((S, S), cfg.image_grid_pinpoints))
        self._tiles = (self._best[0] // S, self._best[1] // S)
        self._tile_grid = unpadded_shape(self._tiles, self._grid[0], (S, S))

    @property
    def best_resolution(self) -> tuple[int, int]:
        """(H, W) the S x S input is tiled at (from ``image_grid_pinpoints``)."""
        return self._best

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(rows, cols) of the stitched high-resolution tokens; each row ends in a newline."""
        return self._tile_grid

    @property
    def num_placeholder_tokens(self) -> int:
        rows, cols = self._tile_grid
        return self.num_image_tokens + rows * (cols + 1)

    def _base(self, h: torch.Tensor) -> torch.Tensor:
        """(B * (1 + T), L, D) per-crop tokens -> (B, N, D): the base image's last N tokens."""
        crops = 1 + self._tiles[0] * self._tiles[1]
        n = self.num_image_tokens
        return h.reshape(-1, crops, h.shape[1], h.shape[2])[:, 0, h.shape[1] - n :]

    def geometry_mode(self, image_config: dict) -> str | None:
        # The base image is a squash resize to S x S (get_image_patches); do_pad here pads the
        # crop count for batching, not the image to a square.
        return "resize"

    def stage_taps(self) -> dict[str, Tap]:
        blocks = vision_blocks(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "fn", self._base)
            for i, block in enumerate(blocks)
        }
        taps["encoder"] = Tap(projector, "input", "fn", self._base)
        taps["adapter"] = Tap(projector, "output", "fn", self._base)
        return {**taps, **self.llm_taps()}

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The base image's g x g tokens come first among the placeholders (pack_image_features).
        positions = contiguous_image_positions(
            input_ids, self.image_token_id, self.num_placeholder_tokens
        )
        return positions[:, : self.num_image_tokens]

    def model_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) pixels -> HF's ``pixel_values`` (B, 1 + T, 3, S, S) and ``image_sizes``."""
        S = self.image_size
        if tuple(pixel_values.shape[-2:]) != (S, S):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])}, the vision tower takes "
                f"{S}x{S}; build inputs with vlm.prepare()"
            )
        sizes = torch.tensor([[S, S]] * pixel_values.shape[0], device=pixel_values.device)
        return {"pixel_values": anyres_pixels(pixel_values, self._best, S), "image_sizes": sizes}

    def forward(self, input_ids, pixel_values, attention_mask, **kwargs):
        return self._inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **self.model_inputs(pixel_values),
            **kwargs,
        )
