"""The model organism: a tiny LLaVA trained here on synthetic scenes, on which the paper's
findings can be measured without a GPU or a download.

``train_organism`` trains one from scratch; a trained checkpoint ships inside the package and loads
as ``--model organism`` with its scenes as ``--dataset organism``.
"""

from pathlib import Path

from seglens.organism.train import Recipe, train_organism

__all__ = ["ANALYSIS", "Recipe", "checkpoint_path", "train_organism"]

#: How the organism is analysed (the demo, the golden tests and bench/organism.py): 800 training
#: and 800 evaluation scenes; sgd probes with a learning-rate grid that brackets the best rates
#: (llm.1 picks 0.1 from a grid that ends there, hence 0.3), trained from the feature cache until
#: no lr in contention improves the held-out loss (patience 5, 0.1%).
ANALYSIS = {
    "model.name": "organism",
    "model.device": "cpu",
    "data.dataset": "organism",
    "data.synthetic_images": 800,
    "data.batch_size": 64,
    "probe.lrs": (0.003, 0.01, 0.03, 0.1, 0.3),
    "probe.epochs": 40,
    "probe.patience": 5,
    "probe.min_delta": 0.001,
    "knockout.top_k": 8,
}


def checkpoint_path() -> Path:
    """The folder of the shipped organism checkpoint (``--model organism``)."""
    path = Path(__file__).parent / "weights"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped organism checkpoint is missing from {path}; rebuild it with "
            "'make organism' (or seglens organism train --out ... and pass that folder)"
        )
    return path
