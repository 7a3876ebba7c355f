"""seglens: where in a multimodal LLM does an image's per-pixel semantic information live?

The public API is resolved lazily (PEP 562), so ``import seglens`` stays cheap and does nothing:

    vlm = seglens.load_model("llava-hf/llava-1.5-7b-hf")      # or seglens.tiny_llava("clip")
    states = vlm.capture(vlm.prepare(images, masks), ["encoder", "adapter", "llm.16"])
    with seglens.intervene(vlm, [seglens.BidirectionalImage()]):
        states = vlm.capture(batch, ["llm.16"])
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "seglens.models",
    "tiny_llava": "seglens.models",
    "VLM": "seglens.models",
    "Batch": "seglens.models",
    "load_dataset": "seglens.data",
    "SyntheticDataset": "seglens.data",
    "intervene": "seglens.interventions",
    "Knockout": "seglens.interventions",
    "BidirectionalImage": "seglens.interventions",
    "CausalImage": "seglens.interventions",
    "BidirectionalPrefix": "seglens.interventions",
    "CausalPrefix": "seglens.interventions",
    "TokenSet": "seglens.interventions",
    "ConfusionMatrix": "seglens.metrics",
    "ProbeBank": "seglens.probes",
    "load_probe": "seglens.probes",
    "RunConfig": "seglens.config",
    "load_config": "seglens.config",
    "run_probing": "seglens.analyses.probing.measure",
    "run_knockout": "seglens.analyses.knockout.measure",
    "run_bidirectional": "seglens.analyses.bidirectional.measure",
    "run_umap": "seglens.analyses.umap.measure",
    "run": "seglens.experiments.pipeline",
    "write_report": "seglens.report",
    "compare_runs": "seglens.report",
    "open_run": "seglens.tables",
    "write_tables": "seglens.tables",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'seglens' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
