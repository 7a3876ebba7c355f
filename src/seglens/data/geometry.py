"""The model's input geometry, applied identically to images and label maps, and inverted.

Three modes cover the LLaVA family: ``pad`` (pad to square with the processor's mean colour, then
resize; original LLaVA), ``crop`` (resize the shortest side, centre crop; the HF llava-1.5
processor) and ``resize`` (squash). Each is one axis-aligned affine map between original pixel
coordinates and model-input coordinates, so the label map is resampled through exactly the same
map (nearest neighbour), and probe logits are mapped back through its inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from seglens.data.base import IGNORE_INDEX

MODES = ("pad", "crop", "resize")


@dataclass(frozen=True)
class Transform:
    """The affine map of one H x W image onto the S x S model input.

    Pixel-edge coordinates map as ``u = x * scale_x - offset_x`` (and likewise for y), so
    pixel ``x`` covers ``[x, x + 1)`` and its centre is ``x + 0.5``.
    """

    height: int
    width: int
    size: int
    scale_y: float
    scale_x: float
    offset_y: float
    offset_x: float

    def to_model(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Original pixel-edge coordinates -> model-input pixel-edge coordinates."""
        return y * self.scale_y - self.offset_y, x * self.scale_x - self.offset_x

    def to_original(self, v: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model-input pixel-edge coordinates -> original pixel-edge coordinates."""
        return (v + self.offset_y) / self.scale_y, (u + self.offset_x) / self.scale_x

    def scored_region(self) -> np.ndarray:
        """(H, W) bool: original pixels whose centre lands inside the model input.

        ``crop`` removes a band of the image; those pixels are never scored.
        """
        ys, xs = self._centres_in_model()
        inside_y = (ys >= 0) & (ys < self.size)
        inside_x = (xs >= 0) & (xs < self.size)
        return inside_y[:, None] & inside_x[None, :]

    def _centres_in_model(self) -> tuple[np.ndarray, np.ndarray]:
        ys = np.arange(self.height) + 0.5
        xs = np.arange(self.width) + 0.5
        return self.to_model(ys, xs)

    def warp_mask(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) labels -> (S, S) labels by nearest neighbour; outside the image is ignore."""
        centres = np.arange(self.size) + 0.5
        src_y, src_x = self.to_original(centres, centres)
        iy = np.floor(src_y).astype(np.int64)
        ix = np.floor(src_x).astype(np.int64)
        ok_y = (iy >= 0) & (iy < self.height)
        ok_x = (ix >= 0) & (ix < self.width)
        out = mask[
            np.clip(iy, 0, self.height - 1)[:, None], np.clip(ix, 0, self.width - 1)[None, :]
        ]
        out = out.astype(np.int64, copy=True)
        out[~(ok_y[:, None] & ok_x[None, :])] = IGNORE_INDEX
        return out

    def taps(self, grid: int) -> tuple[np.ndarray, ...]:
        """The bilinear taps of every original row and column on a g x g grid of token centres.

        Token (r, c) covers model pixels ``[r*p, (r+1)*p)`` and its value sits at the token
        centre, exactly where ``F.interpolate(..., align_corners=False)`` places it when
        upsampling the grid to S x S. Pixels beyond the outermost centres (and outside the model
        input) read the border token, as ``grid_sample(padding_mode="border")`` does.

        Returns:
            (y0, y1, wy, x0, x1, wx): for each original row (H,) the two grid rows it reads and
            the float32 weight of the second (``y1 = min(y0 + 1, g - 1)``), likewise for each
            column (W,).
        """
        ys, xs = self._centres_in_model()
        taps = []
        for centres in (ys, xs):
            at = np.clip(centres / self.size * grid - 0.5, 0, grid - 1)  # in token units
            lo = np.floor(at).astype(np.int64)
            taps += [lo, np.minimum(lo + 1, grid - 1), (at - lo).astype(np.float32)]
        return tuple(taps)

    def logits_to_original(self, grid_logits: torch.Tensor) -> torch.Tensor:
        """Bilinearly resample (..., C, g, g) grid logits onto the (..., C, H, W) original image.

        Separable, at the taps of ``taps``: first along columns, then along rows, each step
        ``a * (1 - w) + b * w`` in float32 (``metrics.pixel_predictions`` evaluates the same
        expression for the classes that can win, so its argmax equals this one's exactly).
        Pixels outside the model input read the nearest border token; use ``scored_region`` to
        exclude them.
        """
        dev, g = grid_logits.device, grid_logits.shape[-1]
        y0, y1, wy, x0, x1, wx = (torch.from_numpy(t).to(dev) for t in self.taps(g))
        logits = grid_logits.float()
        across = lerp(logits[..., x0], logits[..., x1], wx)  # (..., C, g, W)
        return lerp(across[..., y0, :], across[..., y1, :], wy[:, None])  # (..., C, H, W)


def lerp(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a * (1 - w) + b * w``, elementwise, as separate float32 operations (no fused
    multiply-add), so the same values give the same bits wherever it is evaluated."""
    return a * (1 - w) + b * w


@dataclass(frozen=True)
class Geometry:
    """How a model turns an arbitrary image into its S x S input.

    Attributes:
        mode: ``pad``, ``crop`` or ``resize``.
        size: S, the side of the square model input in pixels.
        fill: the RGB colour (uint8) of padding in ``pad`` mode: the processor's mean.
    """

    mode: str
    size: int
    fill: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"geometry mode {self.mode!r} is not one of {MODES}")
        if self.size < 1:
            raise ValueError(f"geometry size {self.size} must be a positive number of pixels")

    def plan(self, height: int, width: int) -> Transform:
        """The transform of an image of the given size."""
        S = self.size
        if self.mode == "resize":
            return Transform(height, width, S, S / height, S / width, 0.0, 0.0)
        if self.mode == "pad":
            side = max(height, width)
            pad_y, pad_x = (side - height) // 2, (side - width) // 2
            s = S / side
            return Transform(height, width, S, s, s, -pad_y * s, -pad_x * s)
        # crop: resize the shortest edge to S (HF's rule for the long edge), then centre crop.
        new_h, new_w = _shortest_edge_size(height, width, S)
        top, left = (new_h - S) // 2, (new_w - S) // 2
        return Transform(height, width, S, new_h / height, new_w / width, float(top), float(left))

    def warp_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (S, S, 3) uint8 with bicubic resampling, as CLIP's processor does."""
        height, width = image.shape[:2]
        S = self.size
        pil = Image.fromarray(image)
        if self.mode == "resize":
            return np.asarray(pil.resize((S, S), Image.BICUBIC))
        if self.mode == "pad":
            side = max(height, width)
            canvas = Image.new("RGB", (side, side), tuple(int(c) for c in self.fill))
            canvas.paste(pil, ((side - width) // 2, (side - height) // 2))
            return np.asarray(canvas.resize((S, S), Image.BICUBIC))
        new_h, new_w = _shortest_edge_size(height, width, S)
        top, left = (new_h - S) // 2, (new_w - S) // 2
        resized = np.asarray(pil.resize((new_w, new_h), Image.BICUBIC))
        return resized[top : top + S, left : left + S]


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """HF ``get_resize_output_image_size`` for ``shortest_edge``: the long side is truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def patch_labels(
    mask: np.ndarray, grid: int, num_classes: int, min_valid: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Majority class and class histogram of every token of a g x g grid over an S x S mask.

    Args:
        mask: (S, S) int labels in the model-input frame, IGNORE_INDEX for unlabelled pixels.
        grid: g, tokens per side; S must be a multiple of g.
        num_classes: C.
        min_valid: a token whose labelled-pixel fraction is below this is ignore.

    Returns:
        labels: (N,) int64 in raster order, N = g * g; ties go to the lower class id.
        hist: (N, C) int32 pixel counts per class.
    """
    S = mask.shape[0]
    if mask.shape != (S, S) or S % grid:
        raise ValueError(
            f"patch_labels: mask {mask.shape} is not square with a side divisible by {grid}"
        )
    p = S // grid
    token = (np.arange(S)[:, None] // p) * grid + (np.arange(S)[None, :] // p)  # (S, S)
    valid = mask != IGNORE_INDEX
    flat = token[valid] * num_classes + mask[valid]
    hist = np.bincount(flat, minlength=grid * grid * num_classes).reshape(grid * grid, num_classes)
    counts = hist.sum(axis=1)
    labels = hist.argmax(axis=1).astype(np.int64)
    labels[counts < min_valid * p * p] = IGNORE_INDEX
    return labels, hist.astype(np.int32)
