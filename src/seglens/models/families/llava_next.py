"""LLaVA-NeXT family (HF ``LlavaNextForConditionalGeneration``): anyres tiles, newline tokens.

The model sees the base image (the whole image at the tower's size S, g x g tokens) and, after it,
high-resolution tiles stitched into one grid with a learned newline token closing every row
(``pack_image_features``). Two probing grids (the family option ``grid``):

- ``"base"`` (default): the base image's g x g tokens. They come first among the image
  placeholders, in raster order; tile and newline tokens stay in the sequence and are never
  probed. The model input is the S x S image the geometry produced, with ``image_sizes`` = (S, S);
  the tiles are cut from it resized to the best ``image_grid_pinpoints`` resolution and padded
  (``anyres_pixels``).
- ``"tiles"``: the k x k high-resolution tiles stitched back into one (k g) x (k g) grid. HF's own
  grid follows each image's aspect ratio (unpadding), which a fixed-grid data path cannot label;
  here the geometry squashes every image to the square k S x k S canvas of a square pinpoint
  (k S, k S) and passes ``image_sizes`` = (k S, k S), so unpadding removes nothing and the grid is
  always (k g) x (k g). The geometry's size is k S, so patch labels land on that grid. The base
  image is the canvas resized to S in the forward (``tiled_pixels``); base and newline tokens stay
  in the sequence and are never probed.

Stages ``vision.{i}``, ``encoder`` and ``adapter`` are read on the probed grid's crops (the base
crop, or the tiles rearranged to the stitched raster order); ``adapter`` equals the LLM input
embeddings at the probed positions.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from seglens.models.base import Tap, contiguous_image_positions, vision_blocks
from seglens.models.families.llava import LlavaFamily
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


def tiled_pixels(pixel_values: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 3, k S, k S) normalised canvas -> (B, 1 + k k, 3, S, S): the base image, then the tiles.

    The base image is the canvas resized to S (bicubic with antialiasing, PIL's downscaling filter;
    normalisation is per-channel affine and the filter's weights sum to 1, so resizing normalised
    pixels equals normalising resized ones up to rounding). The tiles are the canvas cut into
    k x k crops of S x S in row-major order, as ``divide_to_patches`` cuts them.
    """
    B, C, H, W = pixel_values.shape
    S = H // k
    if H != W or H % k:
        raise ValueError(f"pixel_values are {H}x{W}; the tiled grid needs a square {k}*S canvas")
    base = F.interpolate(
        pixel_values, size=(S, S), mode="bicubic", align_corners=False, antialias=True
    )
    tiles = pixel_values.reshape(B, C, k, S, k, S).permute(0, 2, 4, 1, 3, 5)
    return torch.cat([base[:, None], tiles.reshape(B, k * k, C, S, S)], dim=1)


def stitch_tiles(h: torch.Tensor, k: int, side: int) -> torch.Tensor:
    """(B * (1 + k k), L, D) per-crop tokens -> (B, (k g)^2, D) stitched raster order.

    The last g g tokens of every tile crop (CLS dropped) are placed as ``pack_image_features``
    places them: tile (tr, tc), patch (i, j) -> stitched cell (tr g + i, tc g + j).
    """
    n, D = side * side, h.shape[-1]
    tiles = h.reshape(-1, 1 + k * k, h.shape[1], D)[:, 1:, h.shape[1] - n :]
    tiles = tiles.reshape(-1, k, k, side, side, D).permute(0, 1, 3, 2, 4, 5)
    return tiles.reshape(-1, (k * side) ** 2, D)


def square_pinpoint(pinpoints, image_size: int) -> int:
    """k of the largest square pinpoint (k S, k S), checked to be the best for a square canvas.

    Raises:
        ValueError: no square pinpoint is a multiple of S, or another pinpoint would be chosen
            for the (k S, k S) canvas.
    """
    from transformers.image_processing_utils import select_best_resolution

    S = image_size
    square = [int(h) // S for h, w in pinpoints if h == w and h % S == 0]
    if not square:
        raise ValueError(
            f"grid='tiles' needs a square image_grid_pinpoints entry [k*S, k*S] (S = {S}); the "
            f"model has {[list(p) for p in pinpoints]}. Use grid='base' for this model."
        )
    k = max(square)
    best = tuple(select_best_resolution((k * S, k * S), pinpoints))
    if best != (k * S, k * S):
        raise ValueError(
            f"grid='tiles': HF would tile a {k * S}x{k * S} canvas at {best}, not "
            f"{(k * S, k * S)}, from image_grid_pinpoints {[list(p) for p in pinpoints]}; "
            "use grid='base' for this model"
        )
    return k


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
        "LLaVA-NeXT (LlavaNextForConditionalGeneration; anyres tiles + newlines, base grid probed "
        "or grid='tiles': the stitched tiles)"
    )
    tiny_models: ClassVar[dict[str, dict]] = {
        "tiny-llava-next": {},
        # Stitched high-resolution tiles: one 2S x 2S pinpoint, probed on the (2g) x (2g) grid.
        "tiny-llava-next-tiles": {
            "grid_pinpoints": ((224, 224),),
            "family_options": {"grid": "tiles"},
        },
    }

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_llava_next_hf(**kwargs)

    GRIDS = ("base", "tiles")

    def __init__(self, model: nn.Module, *, grid: str = "base"):
        """``grid``: ``"base"`` (the base image's g x g tokens) or ``"tiles"`` (the k x k tiles of
        the largest square pinpoint (k S, k S), stitched into a (k g) x (k g) grid)."""
        from transformers.image_processing_utils import select_best_resolution

        if grid not in self.GRIDS:
            raise ValueError(f"llava_next grid {grid!r} is not one of {self.GRIDS}")
        super().__init__(model)
        if self._extra:
            raise ValueError(
                f"{self.name}: vision_feature_select_strategy='full' with a CLS-keeping "
                f"{self._vision_cfg.model_type!r} tower puts a CLS token into every tile; seglens "
                "supports anyres tiles only with vision_feature_select_strategy='default' (CLS "
                "dropped) or a tower without CLS (SigLIP)"
            )
        cfg = model.config
        S = int(self._vision_cfg.image_size)
        self.grid_mode = grid
        self._base_grid = self._grid
        if grid == "tiles":
            self._k = square_pinpoint(cfg.image_grid_pinpoints, S)
            self._best = (self._k * S, self._k * S)
            self._tiles = (self._k, self._k)
            self._tile_grid = (self._k * self._grid[0], self._k * self._grid[1])
            self._grid = self._tile_grid
            return
        self._k = None
        self._best = tuple(select_best_resolution((S, S), cfg.image_grid_pinpoints))
        self._tiles = (self._best[0] // S, self._best[1] // S)
        self._tile_grid = unpadded_shape(self._tiles, self._grid[0], (S, S))

    @property
    def best_resolution(self) -> tuple[int, int]:
        """(H, W) the input is tiled at (from ``image_grid_pinpoints``)."""
        return self._best

    @property
    def tile_grid(self) -> tuple[int, int]:
        """(rows, cols) of the stitched high-resolution tokens; each row ends in a newline."""
        return self._tile_grid

    @property
    def image_size(self) -> int:
        """S (``grid="base"``) or k S (``grid="tiles"``): the side of the geometry's canvas."""
        S = int(self._vision_cfg.image_size)
        return S if self._k is None else self._k * S

    @property
    def num_base_tokens(self) -> int:
        """g g: the base image's tokens, first among the placeholders."""
        return self._base_grid[0] * self._base_grid[1]

    @property
    def num_placeholder_tokens(self) -> int:
        rows, cols = self._tile_grid
        return self.num_base_tokens + rows * (cols + 1)

    def _base(self, h: torch.Tensor) -> torch.Tensor:
        """(B * (1 + T), L, D) per-crop tokens -> (B, N, D): the base image's last N tokens."""
        crops = 1 + self._tiles[0] * self._tiles[1]
        n = self.num_base_tokens
        return h.reshape(-1, crops, h.shape[1], h.shape[2])[:, 0, h.shape[1] - n :]

    def _read(self, h: torch.Tensor) -> torch.Tensor:
        """Per-crop tokens -> (B, N, D) of the probed grid in raster order."""
        if self._k is None:
            return self._base(h)
        return stitch_tiles(h, self._k, self._base_grid[0])

    def geometry_mode(self, image_config: dict) -> str | None:
        # The base image is a squash resize to S x S (get_image_patches); do_pad here pads the
        # crop count for batching, not the image to a square. grid="tiles" squashes to k S so
        # that HF's unpadding of the (k S, k S) image_sizes removes nothing.
        return "resize"

    def stage_taps(self) -> dict[str, Tap]:
        blocks = vision_blocks(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "fn", self._read)
            for i, block in enumerate(blocks)
        }
        taps["encoder"] = Tap(projector, "input", "fn", self._read)
        taps["adapter"] = Tap(projector, "output", "fn", self._read)
        return {**taps, **self.llm_taps()}

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        # pack_image_features: the base image's g x g tokens, then the stitched rows, each closed
        # by a newline token.
        positions = contiguous_image_positions(
            input_ids, self.image_token_id, self.num_placeholder_tokens
        )
        n = self.num_base_tokens
        if self._k is None:
            return positions[:, :n]
        cols = self._tile_grid[1]
        stitched = positions[:, n:]
        keep = torch.arange(stitched.shape[1], device=stitched.device) % (cols + 1) != cols
        return stitched[:, keep]

    def pixel_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, s, s) pixels (s = ``image_size``) -> HF's ``pixel_values`` (B, 1 + T, 3, S, S)
        and ``image_sizes`` (s, s)."""
        side = self.image_size
        if tuple(pixel_values.shape[-2:]) != (side, side):
            raise ValueError(
                f"pixel_values are {tuple(pixel_values.shape[-2:])}, this model takes "
                f"{side}x{side} (grid={self.grid_mode!r}); build inputs with vlm.prepare()"
            )
        sizes = torch.tensor([[side, side]] * pixel_values.shape[0], device=pixel_values.device)
        if self._k is not None:
            return {"pixel_values": tiled_pixels(pixel_values, self._k), "image_sizes": sizes}
        pixels = anyres_pixels(pixel_values, self._best, side)
        return {"pixel_values": pixels, "image_sizes": sizes}


def tiny_llava_next_hf(
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
    """Build a random ``LlavaNextForConditionalGeneration`` (CLIP tower) and its processor.

    ``grid_pinpoints`` defaults to the one resolution (S, S): an S x S input then has one tile, so
    the sequence is the base g x g tokens, then g rows of g tile tokens each closed by a newline.

    Returns:
        (model, processor): the HF model in eval mode and a ``LlavaNextProcessor``.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    pinpoints = [list(p) for p in (grid_pinpoints or ((image_size, image_size),))]
    tokenizer = byte_tokenizer()
    vision_config = CLIPVisionConfig(
        **vision_kwargs(vision_width, vision_layers, heads, image_size, patch_size)
    )
    text_config = LlamaConfig(**text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads))
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(LlavaNextForConditionalGeneration, config, seed, dtype)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = llava_processor(
        LlavaNextProcessor, image_processor, tokenizer, patch_size, "default", 1
    )
    return model, processor
