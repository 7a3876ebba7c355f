"""Model loading and the per-family adapters; the only place that knows module paths."""

from seglens.models.base import ModelFamily, Tap
from seglens.models.loading import (
    FAMILIES,
    NAMED_MODELS,
    TINY_MODELS,
    load_model,
    tiny_llava,
    tiny_model,
)
from seglens.models.registry import registry
from seglens.models.vlm import DEFAULT_PROMPT, VLM, Batch

__all__ = [
    "DEFAULT_PROMPT",
    "FAMILIES",
    "NAMED_MODELS",
    "TINY_MODELS",
    "VLM",
    "Batch",
    "ModelFamily",
    "Tap",
    "load_model",
    "registry",
    "tiny_llava",
    "tiny_model",
]
