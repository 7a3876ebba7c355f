"""Per-stage statistics of a model on a dataset: the public function behind ``seglens capture``.

One pass over the training split captures every requested stage and summarises it (shape, mean,
spread, token norm, massive dimensions; see ``seglens.experiments.stats.capture_stats``), so the
stages can be checked before any probe is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seglens.config import RunConfig
from seglens.models import VLM
from seglens.rundir.files import provenance, write_json
from seglens.rundir.schema import SCHEMA_VERSION

__all__ = ["STATS_FILE", "run_capture"]

STATS_FILE = "stage_stats.json"


def run_capture(
    config: RunConfig,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    stages: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Capture ``stages`` (default all) on ``config``'s training split and write the statistics.

    Args:
        config: the run configuration (model, data, ``out``, seed).
        vlm: an already loaded model (default: the one ``config.model`` names).
        progress: show a progress bar.
        stages: stage names (default every stage of the model).

    Returns:
        ``{stage: statistics}`` as written to ``config.out/stage_stats.json`` (with provenance
        and the model's description).
    """
    from seglens.experiments.common import build_dataset, build_model
    from seglens.experiments.stats import capture_stats

    vlm = build_model(config.model) if vlm is None else vlm
    data = config.data
    dataset = build_dataset(data, data.train_split, data.limit_train, config.seed)
    stats = capture_stats(
        vlm,
        dataset,
        stages,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        progress=progress,
    )
    out = {**provenance(config.seed, SCHEMA_VERSION), "model": vlm.info(), "stages": stats}
    write_json(Path(config.out) / STATS_FILE, out)
    return stats
