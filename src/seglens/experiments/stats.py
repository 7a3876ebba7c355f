"""Statistics: paired bootstrap intervals on differences, and per-stage feature statistics.

``paired_bootstrap`` / ``bootstrap_contrast`` put an interval on a dataset-level metric (mIoU or
accuracy) or a difference of them by resampling *images*, with the same resample for every side
of the difference; ``centred_interval`` (the default, see its docstring for why) keeps the
interval valid on small samples where classes drop out of resamples. ``capture_stats`` is a quick
look at what each stage carries before training anything (``seglens capture``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from seglens.metrics import PerImageCounts

if TYPE_CHECKING:  # the bootstrap half of this module needs no model code
    from seglens.data import SegDataset
    from seglens.models import VLM

STAT_METRICS = ("miou", "accuracy")
# centred: percentile spread around the full-sample estimate (default); percentile: plain.
INTERVAL_METHODS = ("centred", "percentile")
Counts = tuple[np.ndarray, np.ndarray]  # (numerator, denominator) per image, see ``_counts``


def _counts(side: Any, metric: str, where: str) -> Counts:
    """One side of a contrast as float64 (numerator, denominator) arrays with images first.

    ``miou``: (intersection (n, C), union (n, C)); ``accuracy``: (correct (n,), total (n,)).
    A ``PerImageCounts`` gives either (its pixel accuracy for ``accuracy``).
    """
    if isinstance(side, PerImageCounts):
        side = (side.intersection, side.union) if metric == "miou" else (side.correct, side.total)
    try:
        num, den = (np.asarray(v, dtype=np.float64) for v in side)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"{where} must be a PerImageCounts or a (numerator, denominator) pair of arrays"
        ) from e
    ndim = 2 if metric == "miou" else 1
    if num.shape != den.shape or num.ndim != ndim:
        want = "(n_images, C)" if metric == "miou" else "(n_images,)"
        raise ValueError(
            f"{where}: {metric} needs two {want} arrays, got shapes {num.shape} and {den.shape}"
        )
    if (num < 0).any() or (num > den).any():
        raise ValueError(f"{where}: counts must satisfy 0 <= numerator <= denominator")
    return num, den


def _metric(num: np.ndarray, den: np.ndarray, metric: str) -> np.ndarray:
    """Summed counts (R, C) or (R,) -> (R,) metric values, nan where undefined.

    mIoU averages IoU over the classes with union > 0 (as ``ConfusionMatrix.miou``).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "accuracy":
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
        present = den > 0
        iou = np.where(present, num / np.where(present, den, 1), 0.0)
        k = present.sum(axis=-1)
        return np.where(k > 0, iou.sum(axis=-1) / np.maximum(k, 1), np.nan)


def resample_weights(n_images: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """(R, n) how often each image is drawn in each bootstrap resample.

    Resample r draws the n images ``idx[r]`` of ``default_rng(seed).integers(0, n, (R, n))``
    (the draws of ``PerImageCounts.bootstrap``), so intervals from the same seed are paired.
    """
    idx = np.random.default_rng(seed).integers(0, n_images, size=(n_resamples, n_images))
    flat = (np.arange(n_resamples)[:, None] * n_images + idx).ravel()
    weights = np.bincount(flat, minlength=n_resamples * n_images)
    return weights.reshape(n_resamples, n_images).astype(np.float64)


def metric_of(counts: Any, metric: str) -> float | None:
    """The dataset-level metric of per-image counts summed over all images (None: undefined)."""
    num, den = _counts(counts, metric, "counts")
    return _none(float(_metric(num.sum(0), den.sum(0), metric)))


def resampled_metric(counts: Any, metric: str, weights: np.ndarray) -> np.ndarray:
    """(R,) the metric of each resample (``weights`` from ``resample_weights``), nan if undefined.

    Lets a caller build any statistic of several stages on the same resamples (e.g. the best of
    several layers minus a baseline, with the best one re-chosen in every resample).
    """
    num, den = _counts(counts, metric, "counts")
    if weights.shape[1] != num.shape[0]:
        raise ValueError(f"weights cover {weights.shape[1]} images, the counts {num.shape[0]}")
    # Float64 matmul is exact here: sums of integer counts stay far below 2**53.
    return _metric(weights @ num, weights @ den, metric)


def percentile_interval(
    values: np.ndarray, confidence: float = 0.95
) -> tuple[float | None, float | None]:
    """(low, high) percentile interval of the finite resample values; (None, None) if none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return None, None
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def centred_interval(
    estimate: float | None, values: np.ndarray, confidence: float = 0.95
) -> tuple[float | None, float | None]:
    """(low, high) bootstrap interval centred on the full-sample estimate; (None, None) if none.

    ``estimate + (q(alpha/2) - q(1/2), q(1 - alpha/2) - q(1/2))`` with ``q`` the quantiles of the
    finite resample values: the resamples give the spread (asymmetric), the full sample the
    location. Why: a resample holds only ~63% distinct images, so on a small sample the classes
    seen in one or two images drop out of many resamples and the resample mIoU moves as a whole
    (up when rare classes score low). That shift is an artefact of resampling, not the
    estimator's bias (a real sample of n images has n distinct ones), so the plain percentile
    interval can lie entirely on one side of its own estimate; BCa reads the shift as bias and
    moves the other way, which undercovers more. On a simulated sparse-class set (60 classes, 20
    images, ``tests/test_stats.py``) this interval covers the expected 20-image mIoU and a paired
    difference 0.88-0.94 of the time at 95%, the percentile interval 0.56-0.70. It always
    contains its estimate; classes seen in one image add no spread (nothing to resample).

    Args:
        estimate: the statistic on the full sample (None or nan: no interval).
        values: (R,) the statistic on each resample; nan where undefined (dropped).
        confidence: coverage, in (0, 1).
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if estimate is None or not np.isfinite(estimate) or not values.size:
        return None, None
    alpha = (1 - confidence) / 2
    low, mid, high = np.quantile(values, [alpha, 0.5, 1 - alpha])
    return float(estimate + (low - mid)), float(estimate + (high - mid))


def bootstrap_interval(
    estimate: float | None,
    values: np.ndarray,
    confidence: float = 0.95,
    method: str = "centred",
) -> tuple[float | None, float | None]:
    """(low, high) of the resample ``values`` by ``method`` (``INTERVAL_METHODS``)."""
    if method == "centred":
        return centred_interval(estimate, values, confidence)
    if method == "percentile":
        return percentile_interval(values, confidence)
    raise ValueError(f"interval method {method!r} is not one of {INTERVAL_METHODS}")


def _none(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def bootstrap_contrast(
    terms: Sequence[tuple[float, Any]],
    metric: str = "miou",
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "centred",
) -> dict[str, Any]:
    """Paired bootstrap interval over images of a weighted sum of dataset-level metrics.

    The estimate is ``sum_i w_i * metric(counts_i summed over all images)``; resample r sums
    every term's counts over the SAME resampled images (``resample_weights``), so all terms of a
    difference move together. Resamples where any term is undefined are dropped.

    Args:
        terms: ``[(w_i, counts_i), ...]``; counts are a ``PerImageCounts`` or a
            (numerator, denominator) pair: ``miou`` (intersection (n, C), union (n, C)),
            ``accuracy`` (correct (n,), total (n,)). Row j of every term is the same image j.
        metric: ``miou`` or ``accuracy``.
        n_resamples: R; 0 gives the estimate with ``low = high = None``.
        confidence: interval coverage, in (0, 1).
        seed: seeds the resamples (same seed, same resamples).
        method: ``centred`` (``centred_interval``, stays valid when classes drop out of
            resamples) or ``percentile`` (the plain percentile interval).

    Returns:
        ``{"estimate", "low", "high", "n_images"}`` (plain floats, None where undefined).
    """
    if metric not in STAT_METRICS:
        raise ValueError(f"metric {metric!r} is not one of {STAT_METRICS}")
    if not 0 < confidence < 1 or n_resamples < 0:
        raise ValueError(
            f"need 0 < confidence < 1 and n_resamples >= 0, got {confidence=}, {n_resamples=}"
        )
    if method not in INTERVAL_METHODS:
        raise ValueError(f"interval method {method!r} is not one of {INTERVAL_METHODS}")
    if not terms:
        raise ValueError("bootstrap_contrast needs at least one (weight, counts) term")
    sides = [(float(w), _counts(c, metric, f"term {i}")) for i, (w, c) in enumerate(terms)]
    sizes = {num.shape[0] for _, (num, _) in sides}
    if len(sizes) != 1:
        raise ValueError(
            f"paired terms must hold the same images; got image counts {sorted(sizes)}"
        )
    n = sizes.pop()
    out: dict[str, Any] = {"estimate": None, "low": None, "high": None, "n_images": int(n)}
    if n == 0:
        return out
    estimate = sum(w * _metric(num.sum(0), den.sum(0), metric) for w, (num, den) in sides)
    out["estimate"] = _none(float(estimate))
    if n_resamples == 0:
        return out
    weights = resample_weights(n, n_resamples, seed)
    values = sum(w * resampled_metric(c, metric, weights) for w, c in sides)
    out["low"], out["high"] = bootstrap_interval(out["estimate"], values, confidence, method)
    return out


def paired_bootstrap(
    a: Any,
    b: Any,
    metric: str = "miou",
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    method: str = "centred",
) -> dict[str, Any]:
    """Interval on ``metric(a) - metric(b)`` with both sides from the same image resample.

    ``a`` and ``b`` are per-image counts of the same images in the same order (see
    ``bootstrap_contrast``, also for ``method``); e.g. the adapter's and the encoder's
    ``PerImageCounts``.

    Returns:
        ``{"estimate", "low", "high", "n_images"}``.
    """
    return bootstrap_contrast(
        [(1.0, a), (-1.0, b)],
        metric,
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
        method=method,
    )


def significant(interval: dict[str, Any] | None) -> bool | None:
    """Whether a ``{low, high}`` interval excludes 0 (None when there is no interval)."""
    if not interval or interval.get("low") is None or interval.get("high") is None:
        return None
    return bool(interval["low"] > 0 or interval["high"] < 0)


class _Running:
    """Streaming per-feature moments in float64."""

    def __init__(self, width: int):
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sumsq = torch.zeros(width, dtype=torch.float64)
        self.absmax = torch.zeros(width, dtype=torch.float64)
        self.norms = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.norms += float(x.norm(dim=1).sum())

    def summary(self) -> dict:
        mean = self.sum / self.count
        std = (self.sumsq / self.count - mean**2).clamp_min(0).sqrt()
        top = torch.argsort(self.absmax, descending=True)[:5]
        return {
            "tokens": self.count,
            "width": int(self.sum.numel()),
            "mean": float(mean.mean()),
            "std": float(std.mean()),
            "token_norm": self.norms / self.count,
            "abs_max": float(self.absmax.max()),
            "massive_dims": [[int(d), float(self.absmax[d])] for d in top],
        }


def capture_stats(
    vlm: VLM,
    dataset: SegDataset,
    stages: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Run the model over a dataset once and summarise every requested stage.

    Returns:
        ``{stage: {"shape": [images, N, D], "mean", "std", "token_norm", "abs_max",
        "massive_dims": [[dim, |max|], ...]}}``.
    """
    from seglens.capture import check_stages
    from seglens.data import iterate_samples

    stages = vlm.stages if stages is None else check_stages(stages, vlm.stages)
    running: dict[str, _Running] = {}
    images = 0
    stream = iterate_samples(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        transform=vlm.preprocessor(dataset.num_classes),
        progress=progress,
        desc="capture",
    )
    for prepared in stream:
        states = vlm.capture(vlm.collate(prepared), stages)
        images += len(prepared)
        for stage, x in states.items():
            running.setdefault(stage, _Running(x.shape[-1])).update(x)
    out = {}
    for stage, acc in running.items():
        out[stage] = {"shape": [images, vlm.num_image_tokens, acc.sum.numel()], **acc.summary()}
    return out


def format_stats(stats: dict[str, dict]) -> str:
    """A fixed-width table of ``capture_stats`` output."""
    lines = [f"{'stage':<16}{'shape':>18}{'mean':>10}{'std':>10}{'norm':>10}{'|max|':>10}  top dim"]
    for stage, s in stats.items():
        shape = "x".join(str(v) for v in s["shape"])
        dim, value = s["massive_dims"][0]
        lines.append(
            f"{stage:<16}{shape:>18}{s['mean']:>10.3f}{s['std']:>10.3f}{s['token_norm']:>10.2f}"
            f"{s['abs_max']:>10.2f}  {dim} ({value:.1f})"
        )
    return "\n".join(lines)
