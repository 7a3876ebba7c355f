"""The organism's scene distribution: 64 x 64 scenes of eight textures in four confusable pairs.

Each pair shares one colour and differs only in a fine texture, so a single 8 x 8 patch under
noise is ambiguous while its region is not: context helps, which is what the LLM's layers can
add. Mates co-occur (an object on a background of its mate), so the pairs the probes confuse
most are the pairs a knockout can test. The same generator draws the organism's training scenes
(with captions) and the seeded ``organism`` dataset the analyses run on.
"""

from __future__ import annotations

import colorsys
import zlib
from dataclasses import dataclass

import numpy as np

from seglens.data.base import Sample, SegDataset

#: Class k and k ^ 1 are mates: same colour, different texture.
CLASS_NAMES = (
    "hstripes",
    "vstripes",
    "dots",
    "checker",
    "diagonal",
    "antidiagonal",
    "grid",
    "blobs",
)
NUM_CLASSES = len(CLASS_NAMES)
#: A horizontal flip turns each class into this one (diagonal <-> antidiagonal).
FLIPPED = (0, 1, 2, 3, 5, 4, 6, 7)
SIZE = 64
PATCH = 8
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
SIZES = ("small", "large")
_PAIR_HUES = (0.0, 0.33, 0.6, 0.13)


@dataclass(frozen=True)
class SceneStyle:
    """Nuisance of one scene distribution (defaults: the organism's evaluation domain)."""

    contrast: float = 0.12  # texture amplitude relative to the colour
    noise: float = 0.22  # Gaussian pixel noise (image in [0, 1])
    gain: float = 0.15  # global illumination gain, uniform +-
    region_gain: float = 0.08  # per-region brightness, uniform +-
    hue_jitter: float = 0.03  # per-region hue shift, uniform +-
    mate_rate: float = 0.5  # probability that the first object is the background's mate


def pair_colour(k: int, hue_shift: float = 0.0) -> np.ndarray:
    """(3,) float RGB in [0, 1] of class k's pair."""
    return np.array(colorsys.hsv_to_rgb((_PAIR_HUES[k // 2] + hue_shift) % 1.0, 0.55, 0.7))


def palette() -> np.ndarray:
    """(8, 3) uint8 display colours: the pair colour, lighter for the second mate."""
    rows = [pair_colour(k) if k % 2 == 0 else 0.6 * pair_colour(k) + 0.4 for k in range(8)]
    return np.round(np.clip(rows, 0, 1) * 255).astype(np.uint8)


def pattern(k: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """(size, size) float32 texture of class k: zero mean, unit RMS, random phase."""
    y, x = np.mgrid[:size, :size]
    py, px = rng.integers(0, 4, size=2)
    y, x = y + py, x + px
    if k == 0:
        p = (y // 2) % 2
    elif k == 1:
        p = (x // 2) % 2
    elif k == 2:
        p = (y % 4 == 0) & (x % 4 == 0)
    elif k == 3:
        p = (y // 2 + x // 2) % 2
    elif k == 4:
        p = ((x + y) // 2) % 2
    elif k == 5:
        p = ((x - y) // 2) % 2
    elif k == 6:
        p = (y % 4 == 0) | (x % 4 == 0)
    else:
        blocks = rng.random((size // 2 + 1, size // 2 + 1)) < 0.25
        p = np.kron(blocks, np.ones((2, 2), dtype=bool))[py % 2 :][:size, px % 2 :][:, :size]
    p = p.astype(np.float32)
    p -= p.mean()
    return p / max(float(p.std()), 1e-6)


def _object(rng: np.random.Generator, size: int) -> tuple[np.ndarray, float, float]:
    """A random rectangle or ellipse of 18-36 px: its (size, size) mask and centre."""
    h, w = rng.integers(18, 37, size=2)
    cy = rng.uniform(h / 2, size - h / 2)
    cx = rng.uniform(w / 2, size - w / 2)
    y, x = np.mgrid[:size, :size] + 0.5
    if rng.random() < 0.5:
        inside = (np.abs(y - cy) <= h / 2) & (np.abs(x - cx) <= w / 2)
    else:
        inside = ((y - cy) / (h / 2)) ** 2 + ((x - cx) / (w / 2)) ** 2 <= 1.0
    return inside, cy, cx


def draw_scene(
    rng: np.random.Generator, style: SceneStyle = SceneStyle()
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One scene: a background of one class and two objects.

    The first object is the background's mate with probability ``style.mate_rate``, else from
    another pair; the second comes from a pair used by neither.

    Returns:
        image (64, 64, 3) uint8, mask (64, 64) int64 in 0..7, caption words
        (``bg <class> obj <class> <row> <col> <size> ...``, largest visible object first).
    """
    bg = int(rng.integers(NUM_CLASSES))
    pairs = [p for p in range(4) if p != bg // 2]
    if rng.random() < style.mate_rate:
        first = bg ^ 1
    else:
        first = 2 * int(rng.choice(pairs)) + int(rng.integers(2))
    pairs = [p for p in pairs if p != first // 2]
    second = 2 * int(rng.choice(pairs)) + int(rng.integers(2))
    mask = np.full((SIZE, SIZE), bg, dtype=np.int64)
    for k in (first, second):
        inside, _, _ = _object(rng, SIZE)
        mask[inside] = k
    gain = 1.0 + rng.uniform(-style.gain, style.gain)
    image = np.zeros((SIZE, SIZE, 3), dtype=np.float32)
    for k in (bg, first, second):
        colour = pair_colour(k, rng.uniform(-style.hue_jitter, style.hue_jitter))
        colour = colour * (1.0 + rng.uniform(-style.region_gain, style.region_gain))
        texture = colour[None, None, :] * (1.0 + style.contrast * pattern(k, rng)[..., None])
        image = np.where((mask == k)[..., None], texture, image)
    image = image * gain + rng.normal(0.0, style.noise, size=image.shape)
    image = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return image, mask, caption(mask, bg, (first, second))


def caption(mask: np.ndarray, bg: int, objects: tuple[int, ...]) -> list[str]:
    """Caption words of a scene: background class, then each visible object by area."""
    words = ["bg", CLASS_NAMES[bg]]
    visible = []
    for k in objects:
        ys, xs = np.nonzero(mask == k)
        if len(ys) >= 64:  # at least one patch worth of pixels
            visible.append((len(ys), k, ys.mean(), xs.mean()))
    for area, k, cy, cx in sorted(visible, reverse=True):
        row, col = ROWS[min(int(cy * 3 // SIZE), 2)], COLS[min(int(cx * 3 // SIZE), 2)]
        words += ["obj", CLASS_NAMES[k], row, col, SIZES[int(area >= 500)]]
    return words


def vocabulary() -> list[str]:
    """Every caption word, in a fixed order."""
    return ["bg", "obj", *CLASS_NAMES, *ROWS, *COLS, *SIZES]


def scene_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` in a named stream (``train``, ``val``, ``organism:...``)."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), index])


class OrganismDataset(SegDataset):
    """The organism's scenes as a seeded segmentation dataset (64 x 64, 8 classes).

    Its streams never overlap the scenes the shipped organism was trained on (those use the
    ``organism:`` streams).

    Args:
        num_images: images in the split.
        split: ``train`` or ``val`` (any name gives its own seeded stream).
        seed: base seed (non-negative).
    """

    name = "organism"

    def __init__(self, num_images: int = 800, split: str = "train", seed: int = 0):
        if num_images < 1:
            raise ValueError(f"organism: num_images={num_images} must be >= 1")
        if seed < 0:
            raise ValueError(f"organism: seed={seed} must be a non-negative integer")
        if split.startswith("organism:"):
            raise ValueError(f"organism: split {split!r} is reserved for the training scenes")
        super().__init__(range(num_images), CLASS_NAMES, palette())
        self.split = split
        self.seed = seed

    def __repr__(self) -> str:
        return f"OrganismDataset(num_images={len(self)}, split={self.split!r}, seed={self.seed})"

    def _name(self, key: int) -> str:
        return f"organism-{self.split}-{key:05d}"

    def _load(self, key: int) -> Sample:
        image, mask, _ = draw_scene(scene_rng(self.seed, self.split, key))
        return Sample(image=image, mask=mask, name=self._name(key))
