"""Per-sample preprocessing: the model's geometry and normalisation, and patch labels.

A ``Preprocessor`` is small and picklable so loader worker processes can run it; the model wrapper
turns its outputs into a batch (token ids are added there, once per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from seglens.data.base import Sample
from seglens.data.geometry import Geometry, Transform, patch_labels


@dataclass
class Prepared:
    """One sample in the model's frame.

    Attributes:
        pixel_values: (3, S, S) float32, normalised.
        labels: (N,) int64 majority class per token (raster order), 255 = ignore; None without mask.
        hist: (N, C) int32 per-token class pixel counts; None without mask.
        transform: the geometry of this image, for mapping predictions back.
        mask: (H, W) int64 original label map (pixel-level scoring), or None.
        image: (H, W, 3) uint8 original image, kept for qualitative figures.
        name: sample identifier.
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor | None
    hist: torch.Tensor | None
    transform: Transform
    mask: np.ndarray | None
    image: np.ndarray
    name: str


@dataclass(frozen=True)
class Preprocessor:
    """Geometry + normalisation + patch labelling of one model, as a picklable callable.

    Attributes:
        geometry: how images and masks reach the S x S input.
        mean, std: per-channel normalisation from the model's processor config.
        grid: g, tokens per side.
        num_classes: C, for the per-token histograms (0 when no masks are used).
        min_valid: minimum labelled fraction of a token's pixels; below it the token is ignore.
    """

    geometry: Geometry
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    grid: int
    num_classes: int = 0
    min_valid: float = 0.5

    def __call__(self, sample: Sample) -> Prepared:
        image = sample.image
        height, width = image.shape[:2]
        transform = self.geometry.plan(height, width)
        pixels = self.geometry.warp_image(image).astype(np.float32) / 255.0
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        labels = hist = None
        if sample.mask is not None:
            if self.num_classes < 1:
                raise ValueError("Preprocessor needs num_classes > 0 to label patches of a mask")
            warped = transform.warp_mask(sample.mask)
            lab, hst = patch_labels(warped, self.grid, self.num_classes, self.min_valid)
            labels, hist = torch.from_numpy(lab), torch.from_numpy(hst)
        return Prepared(
            pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            labels=labels,
            hist=hist,
            transform=transform,
            mask=sample.mask,
            image=image,
            name=sample.name,
        )
