"""The dataset contract every loader follows: samples, class metadata, errors and sharding.

A sample is an RGB image (uint8, H x W x 3) and a label map (int64, H x W) in the toolkit's
convention: classes ``0..C-1`` and ignore index ``255``. Loaders translate their on-disk
encodings into this convention and nothing else does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


class BadSampleError(ValueError):
    """A sample on disk is unreadable or inconsistent; the message names the file and the fix."""


@dataclass
class Sample:
    """One image and its label map.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) int64, classes 0..C-1, IGNORE_INDEX for unlabelled pixels. None for
            image-only datasets.
        name: a stable identifier (file stem or synthetic index), used in errors and figures.
        notes: doubts about the sample that do not stop it (e.g. an EXIF orientation that
            cannot be checked against the mask); the stream counts them and warns.
    """

    image: np.ndarray
    mask: np.ndarray | None
    name: str
    notes: tuple[str, ...] = ()


class SegDataset:
    """A deterministic, indexable segmentation dataset.

    Subclasses set ``class_names`` and ``palette`` and implement ``_load(key)`` for the items
    in ``self._keys`` (file paths, synthetic seeds...). Ordering is fixed at construction
    (sorted), so ``shard(rank, world)`` gives every process a disjoint, reproducible part.
    """

    name: str = "dataset"
    ignore_index: int = IGNORE_INDEX

    def __init__(self, keys: Sequence, class_names: Sequence[str], palette: np.ndarray):
        self._keys = list(keys)
        self.class_names = list(class_names)
        self.palette = np.asarray(palette, dtype=np.uint8).reshape(len(self.class_names), 3)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> Sample:
        return self._load(self._keys[index])

    def _load(self, key) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    def name_of(self, index: int) -> str:
        """The name of item ``index`` without loading it (for reports on samples that fail)."""
        return self._name(self._keys[index])

    def _name(self, key) -> str:
        return str(key)

    def _view(self, keys: Sequence) -> SegDataset:
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._keys = list(keys)
        return view

    def shard(self, rank: int, world: int) -> SegDataset:
        """The items of process ``rank`` out of ``world`` (strided, so shards differ by <= 1)."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(
                f"shard(rank={rank}, world={world}): need world >= 1 and 0 <= rank < world"
            )
        return self._view(self._keys[rank::world])

    def limit(self, n: int | None) -> SegDataset:
        """The first ``n`` items (all when ``n`` is None)."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"limit={n}: must be a positive number of images (or None for all)")
        return self._view(self._keys[:n])

    def check_mask(self, mask: np.ndarray, image: np.ndarray, where: str) -> np.ndarray:
        """Validate a decoded label map against its image and the class range; return int64."""
        if mask.shape != image.shape[:2]:
            raise BadSampleError(
                f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                f"{image.shape[1]}x{image.shape[0]}; masks must match their image size. "
                "Fix the file or pass --on-bad-sample skip."
            )
        mask = mask.astype(np.int64)
        bad = (mask >= self.num_classes) & (mask != self.ignore_index) | (mask < 0)
        if bad.any():
            values = sorted({int(v) for v in np.unique(mask[bad])})[:10]
            raise BadSampleError(
                f"{where}: label values {values} are outside 0..{self.num_classes - 1} "
                f"(and not the ignore index {self.ignore_index}) for {self.name}. Check that "
                "the dataset name matches the files, or pass --on-bad-sample skip."
            )
        return mask
