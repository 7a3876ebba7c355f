"""Pieces every experiment shares: building the model and datasets from a config, and the device."""

from __future__ import annotations

import logging

import torch

from seglens.config import DataConfig, ModelConfig
from seglens.data import SegDataset, load_dataset
from seglens.models import VLM, load_model

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(config: ModelConfig) -> VLM:
    """The model a config names, on its device (or spread by ``device_map``)."""
    device = None if config.device_map else (config.device or default_device())
    return load_model(
        config.name,
        dtype=config.dtype,
        device=device,
        device_map=config.device_map,
        attn_implementation=config.attn_implementation,
        trust_remote_code=config.trust_remote_code,
        geometry=config.geometry,
        prompt=config.prompt,
        family_options=config.family_options,
    )


def build_dataset(config: DataConfig, split: str, limit: int | None, seed: int = 0) -> SegDataset:
    """One split of the configured dataset, cut to ``limit`` images."""
    options = {}
    if config.dataset in ("synthetic", "organism"):
        options = {"seed": seed}
        if config.synthetic_images is not None:
            options["num_images"] = config.synthetic_images
        if config.dataset == "synthetic":
            options["num_classes"] = config.synthetic_classes
    elif config.dataset.strip().lower() == "folder":
        options = {
            "val_fraction": config.folder_val_fraction,
            "split_seed": config.folder_split_seed,
        }
    elif config.dataset.strip().lower() == "hf":
        options = {
            "image_column": config.hf_image_column,
            "label_column": config.hf_label_column,
            "reduce_zero_label": config.hf_reduce_zero_label,
            "classes": config.hf_classes,
        }
    dataset = load_dataset(config.dataset, config.root, split, **options)
    if len(dataset) == 0:
        raise ValueError(f"dataset {config.dataset!r} split {split!r} is empty")
    return dataset.limit(limit)
