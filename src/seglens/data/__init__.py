"""Datasets, decoding, streaming and the model-input geometry of images and label maps.

Everything a probe needs on the data side: loaders for the standard segmentation datasets (and two
generated ones: textured regions, and the organism's scenes) in one label convention, file
decoding, a batched streaming loader, and the geometry that maps images and masks onto a model's
input and its token grid.
"""

from seglens.data.base import IGNORE_INDEX, BadSampleError, Sample, SegDataset
from seglens.data.datasets import DATASETS, load_dataset
from seglens.data.geometry import Geometry, Transform, patch_labels
from seglens.data.io import read_image, read_mask
from seglens.data.loader import iterate_samples
from seglens.data.organism import OrganismDataset
from seglens.data.synthetic import SyntheticDataset

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "BadSampleError",
    "Geometry",
    "OrganismDataset",
    "Sample",
    "SegDataset",
    "SyntheticDataset",
    "Transform",
    "iterate_samples",
    "load_dataset",
    "patch_labels",
    "read_image",
    "read_mask",
]
