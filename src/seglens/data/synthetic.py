"""A seeded synthetic segmentation dataset: textured regions with exact masks, for tests and demos.

Each image is a random partition (Voronoi cells plus a few ellipses) whose regions are filled
with class-specific textures from ``skimage.data`` (photographs shipped inside scikit-image, so
nothing is downloaded), tinted with a class colour so that classes are separable from local
patch statistics. Images are generated on the fly from (seed, split, index).
"""

from __future__ import annotations

import colorsys
import functools
import logging
import statistics
import zlib

import numpy as np

from seglens.data.base import Sample, SegDataset

logger = logging.getLogger(__name__)

# (class name, skimage.data function); all ship with scikit-image, none is fetched.
_TEXTURES = (
    ("grass", "grass"),
    ("gravel", "gravel"),
    ("brick", "brick"),
    ("moon", "moon"),
    ("coins", "coins"),
    ("text", "text"),
    ("camera", "camera"),
    ("rocket", "rocket"),
    ("astronaut", "astronaut"),
    ("page", "page"),
    ("coffee", "coffee"),
    ("cat", "chelsea"),
)
TEXTURE_NAMES = tuple(name for name, _ in _TEXTURES)
_NOISE_STD = 3.0  # uint8 levels


_BANK_SIDE = 512  # every texture is mirror-tiled (or cropped) to this square


@functools.cache
def _texture(k: int) -> np.ndarray:
    """(512, 512) uint8 grayscale texture k, contrast-standardised (mean 128, std ~46).

    Loaded on first use and cached per process (never at import time).
    """
    import skimage.data

    image = getattr(skimage.data, _TEXTURES[k][1])()
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114])
    image = image.astype(np.float32)
    image = (image - image.mean()) / max(float(image.std()), 1e-6)
    image = np.clip(128 + 46 * image, 0, 255).round().astype(np.uint8)
    rows = _reflect(0, _BANK_SIDE, image.shape[0])
    cols = _reflect(0, _BANK_SIDE, image.shape[1])
    return image[np.ix_(rows, cols)]


@functools.cache
def _bank(num_classes: int) -> np.ndarray:
    """(C, 512, 512) uint8: the textures of the first C classes, stacked for one gather."""
    return np.stack([_texture(k) for k in range(num_classes)])


def _reflect(start: np.ndarray | int, length: int, period: int) -> np.ndarray:
    """Indices ``start .. start + length`` folded into ``0 .. period`` by mirror tiling.

    ``start`` may be an array of shape (K,), giving (K, length) indices.
    """
    i = (np.asarray(start)[..., None] + np.arange(length)) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


@functools.cache
def _noise_levels() -> np.ndarray:
    """(256,) float32 Gaussian quantiles: indexing it with uniform bytes samples N(0, std^2)."""
    normal = statistics.NormalDist(0.0, _NOISE_STD)
    return np.array([normal.inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32)


def class_colours(num_classes: int) -> np.ndarray:
    """(C, 3) float32 tints in [0, 1]: hues spread evenly around the colour wheel."""
    return np.array(
        [colorsys.hsv_to_rgb(k / num_classes, 0.75, 1.0) for k in range(num_classes)],
        dtype=np.float32,
    )


class SyntheticDataset(SegDataset):
    """Textured regions with exact masks, deterministic per (seed, split, index).

    Args:
        num_images: number of images.
        num_classes: C, between 2 and ``len(TEXTURE_NAMES)``; class k uses texture k.
        size: (H, W) of every image.
        seed: base seed (non-negative).
        split: any name; different splits give different images.
    """

    name = "synthetic"

    def __init__(
        self,
        num_images: int = 96,
        num_classes: int = 6,
        size: tuple[int, int] = (180, 240),
        seed: int = 0,
        split: str = "train",
    ):
        if num_images < 1:
            raise ValueError(f"synthetic: num_images={num_images} must be >= 1")
        if not 2 <= num_classes <= len(TEXTURE_NAMES):
            raise ValueError(
                f"synthetic: num_classes={num_classes} must be in 2..{len(TEXTURE_NAMES)} "
                f"(one texture per class: {', '.join(TEXTURE_NAMES)})"
            )
        height, width = (int(s) for s in size)
        if height < 8 or width < 8:
            raise ValueError(f"synthetic: size={tuple(size)} must be at least 8 x 8 pixels")
        if seed < 0:
            raise ValueError(f"synthetic: seed={seed} must be a non-negative integer")
        colours = class_colours(num_classes)
        palette = np.round(colours * 255).astype(np.uint8)
        # (C, 256, 3): the RGB value of texture level g in class k, 0.5 added for rounding.
        levels = np.arange(256, dtype=np.float32)[:, None]
        self._shades = 0.12 * 255 + 0.5 + 0.88 * levels * colours[:, None, :]
        super().__init__(range(num_images), TEXTURE_NAMES[:num_classes], palette)
        self.size = (height, width)
        self.seed = seed
        self.split = split

    def __repr__(self) -> str:
        return (
            f"SyntheticDataset(num_images={len(self)}, num_classes={self.num_classes}, "
            f"size={self.size}, seed={self.seed}, split={self.split!r})"
        )

    def _name(self, key: int) -> str:
        return f"synthetic-{self.split}-{key:05d}"

    def _load(self, key: int) -> Sample:
        rng = np.random.default_rng([self.seed, zlib.crc32(self.split.encode()), key])
        mask = self._layout(rng)
        image = self._render(mask, rng)
        mask = self.check_mask(mask, image, self._name(key))
        return Sample(image=image, mask=mask, name=self._name(key))

    def _layout(self, rng: np.random.Generator) -> np.ndarray:
        """(H, W) int64 labels: Voronoi cells, then 0-2 ellipses on top, each a random class."""
        H, W = self.size
        ys = np.arange(H, dtype=np.float32)[:, None] + 0.5
        xs = np.arange(W, dtype=np.float32)[None, :] + 0.5
        num_cells = int(rng.integers(3, 7))
        points = rng.uniform((0, 0), (H, W), size=(num_cells, 2)).astype(np.float32)
        dist = (ys[None] - points[:, 0, None, None]) ** 2 + (
            xs[None] - points[:, 1, None, None]
        ) ** 2
        cell_class = rng.integers(0, self.num_classes, size=num_cells)
        mask = cell_class[dist.argmin(axis=0)]
        side = min(H, W)
        for _ in range(int(rng.integers(0, 3))):
            cy, cx = rng.uniform((0, 0), (H, W))
            ry, rx = rng.uniform(0.08 * side, 0.25 * side, size=2)
            angle = rng.uniform(0, np.pi)
            cos, sin = np.cos(angle), np.sin(angle)
            u = (xs - cx) * cos + (ys - cy) * sin
            v = (ys - cy) * cos - (xs - cx) * sin
            inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
            mask = np.where(inside, rng.integers(0, self.num_classes), mask)
        return mask.astype(np.int64)

    def _render(self, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(H, W, 3) uint8: each region's texture (random offset), tinted, plus Gaussian noise."""
        H, W = self.size
        C = self.num_classes
        # Every class reads its texture at its own random offset; one gather serves all regions.
        offsets = rng.integers(0, 2 * _BANK_SIDE, size=(2, C))
        rows = _reflect(offsets[0], H, _BANK_SIDE)[mask, np.arange(H)[:, None]]  # (H, W)
        cols = _reflect(offsets[1], W, _BANK_SIDE)[mask, np.arange(W)[None, :]]  # (H, W)
        gray = _bank(C).reshape(-1)[(mask * _BANK_SIDE + rows) * _BANK_SIDE + cols]  # (H, W) uint8
        image = self._shades[mask, gray]  # (H, W, 3) float32
        image += _noise_levels()[rng.integers(0, 256, size=image.shape, dtype=np.uint8)]
        return np.clip(image, 0, 255).astype(np.uint8)
