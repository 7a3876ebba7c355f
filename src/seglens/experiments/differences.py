"""Paired intervals on the differences a probing run is read for.

The claims are differences between stages or conditions measured on the same evaluation images:
the change at the adapter and the gain across LLM layers here (the core probing condition); the
analyses pair their own conditions with it the same way (bidirectional minus causal attention:
``seglens.analyses.bidirectional.measure``). Each gets a paired
bootstrap interval over images (``seglens.experiments.stats``, centred on its estimate) from the
per-image counts that the evaluation keeps; those counts are saved in the run's arrays
(``image_counts__<stage>__<level>``) so that a later analysis (``seglens bidir``) can pair its
condition with the saved one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seglens.experiments.stats import (
    centred_interval,
    metric_of,
    paired_bootstrap,
    resample_weights,
    resampled_metric,
)
from seglens.metrics import PerImageCounts
from seglens.stages import llm_layer

__all__ = ["COUNT_LEVELS", "count_arrays", "counts_from_arrays", "probing_differences"]

# patch / pixel: mIoU per image counts; early / late: the first / last band of token positions.
COUNT_LEVELS = ("patch", "pixel", "early", "late")
Counts = tuple[np.ndarray, np.ndarray]


def _key(stage: str, level: str) -> str:
    return f"image_counts__{stage}__{level}"


def count_arrays(tables: Mapping[str, Mapping[str, PerImageCounts] | None]) -> dict:
    """``{level: {stage: PerImageCounts}}`` -> ``{"image_counts__<stage>__<level>": (n, 2C + 2)}``.

    The table's columns are per-class intersection (C), union (C), correct and total; rows are
    the evaluation images in dataset order (the same for every condition of a run).
    """
    out = {}
    for level, per_stage in tables.items():
        for stage, counts in (per_stage or {}).items():
            out[_key(stage, level)] = counts.state_dict()["counts"]
    return out


def counts_from_arrays(
    arrays: Mapping[str, np.ndarray], stage: str, level: str, metric: str
) -> Counts | None:
    """One stage's saved per-image counts as (intersection, union) for ``miou`` or (correct,
    total) for ``accuracy``; None when the run did not save them (an older run)."""
    table = arrays.get(_key(stage, level))
    if table is None:
        return None
    C = (table.shape[1] - 2) // 2
    if metric == "miou":
        return table[:, :C], table[:, C : 2 * C]
    return table[:, -2], table[:, -1]


def _counts(per_stage: Mapping[str, Any], stage: str, metric: str) -> Counts:
    counts = per_stage[stage]
    if isinstance(counts, PerImageCounts):
        if metric == "miou":
            return counts.intersection, counts.union
        return counts.correct, counts.total
    return counts


def probing_differences(
    per_stage: Mapping[str, Any],
    stages: Sequence[str],
    *,
    level: str,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired mIoU intervals on the encoder -> adapter change and the adapter -> LLM gains.

    Args:
        per_stage: {stage: PerImageCounts or (intersection (n, C), union (n, C))}, same images.
        stages: probed stages, forward order.
        level: ``patch`` or ``pixel`` (recorded).
        n_resamples, confidence, seed: of the bootstrap (0 resamples: estimates only).

    Returns:
        ``{"level", "metric": "miou", "confidence", "n_resamples", "seed", "interval",
        "adapter_minus_encoder": I or None, "llm_minus_adapter": {stage: I},
        "best_llm_minus_adapter": {"stage", **I} or None}`` with I = ``{estimate, low, high,
        n_images}``. The best LLM layer is the one with the highest mIoU; in each resample the
        best layer is chosen again, so its interval includes the choice.
    """
    options = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    out: dict[str, Any] = {"level": level, "metric": "miou", **options, "interval": "centred"}
    out |= {"adapter_minus_encoder": None, "llm_minus_adapter": {}, "best_llm_minus_adapter": None}
    if "adapter" not in per_stage:
        return out
    adapter = _counts(per_stage, "adapter", "miou")
    if "encoder" in per_stage:
        encoder = _counts(per_stage, "encoder", "miou")
        out["adapter_minus_encoder"] = paired_bootstrap(adapter, encoder, "miou", **options)
    llm = [s for s in stages if llm_layer(s) is not None and s in per_stage]
    for s in llm:
        out["llm_minus_adapter"][s] = paired_bootstrap(
            _counts(per_stage, s, "miou"), adapter, "miou", **options
        )
    scored = {s: metric_of(_counts(per_stage, s, "miou"), "miou") for s in llm}
    scored = {s: v for s, v in scored.items() if v is not None}
    base = metric_of(adapter, "miou")
    if not scored or base is None:
        return out
    best = max(scored, key=scored.get)
    n = len(adapter[0])
    best_gain = {"stage": best, "estimate": scored[best] - base, "low": None, "high": None}
    best_gain["n_images"] = n
    if n_resamples > 0 and n > 0:
        weights = resample_weights(n, n_resamples, seed)
        per_layer = np.stack(
            [resampled_metric(_counts(per_stage, s, "miou"), "miou", weights) for s in scored]
        )  # (L, R)
        with np.errstate(all="ignore"):
            gain = np.nanmax(np.where(np.isnan(per_layer), -np.inf, per_layer), axis=0)
        gain = gain - resampled_metric(adapter, "miou", weights)
        best_gain["low"], best_gain["high"] = centred_interval(
            best_gain["estimate"], gain, confidence
        )
    out["best_llm_minus_adapter"] = best_gain
    return out
