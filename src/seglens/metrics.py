"""Segmentation metrics: dataset-level confusion matrix, bootstrap intervals, per-position accuracy.

Every score comes from one confusion matrix summed over the whole dataset (never an average of
per-batch mIoU); per-image intersection/union counts give bootstrap intervals over images. The
pixel-level helpers map grid logits back through the model's input geometry so that predictions
are scored against the original mask, on the pixels the model actually saw.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
import torch

from seglens.data.base import IGNORE_INDEX
from seglens.data.geometry import Transform
from seglens.upsampling import upsampled_argmax

ArrayLike = torch.Tensor | np.ndarray
BOOTSTRAP_METRICS = ("miou", "pixel_accuracy")


def _as_labels(x: ArrayLike, name: str) -> torch.Tensor:
    """Integer labels as an int64 tensor on their own device (numpy -> CPU)."""
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        if x.dtype.kind not in "biu":
            raise ValueError(f"{name} has dtype {x.dtype}; pass integer class ids, not scores")
        return torch.from_numpy(x.astype(np.int64))
    if x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} has dtype {x.dtype}; pass integer class ids, not scores")
    return x.long()


def _scored_pairs(
    pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated (P,) int64 pred and target of the scored elements, and the valid-target mask."""
    p, t = _as_labels(pred, "prediction"), _as_labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {tuple(p.shape)} != target shape {tuple(t.shape)}")
    valid = t != ignore_index
    p, t = p.to(t.device)[valid], t[valid]
    # A prediction can't abstain: an "ignore" prediction on a scored element is a caller bug.
    for name, values in (("target", t), ("prediction", p)):
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.numel():
            raise ValueError(
                f"{name} values {bad.unique()[:10].tolist()} are outside 0..{num_classes - 1}; "
                "check the class count and label encoding (only targets may be the ignore index)"
            )
    return p, t, valid


def _nan_to_none(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def _require_same(what: str, mine: tuple, theirs: tuple) -> None:
    """Merging or loading needs the same (size, ignore_index)."""
    if mine != theirs:
        raise ValueError(f"{what} {theirs} does not match {mine}; build it with the same settings")


def _miou(intersection: np.ndarray, union: np.ndarray) -> float:
    """(C,) counts -> mean IoU over classes with union > 0; nan when there are none."""
    iou = _ratio(intersection, union)
    present = union > 0
    return float(np.mean(iou[present])) if present.any() else float("nan")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Elementwise float64 num / den, nan where den == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


class _Counter:
    """Shared merge/reset/state for counters made of int64 tensors (named in ``_fields``)."""

    _size: str
    _fields: tuple[str, ...]
    ignore_index: int

    def _layout(self) -> tuple[int, int]:
        return getattr(self, self._size), self.ignore_index

    def merge(self, other: Self) -> Self:
        """Add another counter's counts (e.g. from another process) into this one; return self."""
        _require_same(f"({self._size}, ignore_index)", self._layout(), other._layout())
        for name in self._fields:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name).device))
        return self

    def __iadd__(self, other: Self) -> Self:
        return self.merge(other)

    def reset(self) -> None:
        for name in self._fields:
            getattr(self, name).zero_()

    def state_dict(self) -> dict[str, Any]:
        size, ignore = self._layout()
        tensors = {name: getattr(self, name).cpu().clone() for name in self._fields}
        return {self._size: size, "ignore_index": ignore, **tensors}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theirs = (int(state[self._size]), int(state["ignore_index"]))
        _require_same(f"state ({self._size}, ignore_index)", self._layout(), theirs)
        for name in self._fields:
            getattr(self, name).copy_(torch.as_tensor(state[name], dtype=torch.int64))


class ConfusionMatrix(_Counter):
    """A dataset-level confusion matrix: rows are true classes, columns predicted ones.

    Args:
        num_classes: C.
        ignore_index: target value that is not scored.
        device: where the (C, C) int64 ``matrix`` lives.
    """

    _size, _fields = "num_classes", ("matrix",)

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: Any = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one class")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: ArrayLike, target: ArrayLike) -> ConfusionMatrix:
        """Add predictions of any shape, e.g. (B, N) tokens or (H, W) pixels; return self.

        ``pred`` holds class ids in 0..C-1 and ``target`` the same or ``ignore_index`` (dropped);
        a shape mismatch, float scores or a label outside 0..C-1 raise ValueError naming it.
        """
        p, t, _ = _scored_pairs(pred, target, self.num_classes, self.ignore_index)
        C = self.num_classes
        counts = torch.bincount(t * C + p, minlength=C * C).reshape(C, C)
        self.matrix += counts.to(self.matrix.device)
        return self

    def intersection_union(self) -> tuple[np.ndarray, np.ndarray]:
        """(C,) int64 intersection (true positives) and union (TP + FP + FN) per class."""
        m = self.matrix.cpu().numpy()
        inter = np.diag(m).copy()
        return inter, m.sum(axis=1) + m.sum(axis=0) - inter

    def per_class_iou(self) -> np.ndarray:
        """(C,) float64 IoU per class, nan where the class is neither true nor predicted."""
        return _ratio(*self.intersection_union())

    def miou(self) -> float:
        """Mean IoU over classes that occur (union > 0); nan when nothing was scored."""
        return _miou(*self.intersection_union())

    def pixel_accuracy(self) -> float:
        """Fraction of scored elements predicted correctly; nan when nothing was scored."""
        m = self.matrix.cpu().numpy()
        return float(_ratio(np.trace(m), m.sum()))

    def mean_class_accuracy(self) -> float:
        """Mean recall over classes with support > 0 (balanced accuracy); nan if none."""
        m = self.matrix.cpu().numpy()
        support = m.sum(axis=1)
        has = support > 0
        return float(np.mean(np.diag(m)[has] / support[has])) if has.any() else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary; undefined (nan) values become None."""
        return {
            "miou": _nan_to_none(self.miou()),
            "pixel_accuracy": _nan_to_none(self.pixel_accuracy()),
            "mean_class_accuracy": _nan_to_none(self.mean_class_accuracy()),
            "per_class_iou": [_nan_to_none(v) for v in self.per_class_iou()],
        }


class PerImageCounts:
    """Per-image intersection/union and correct/total counts, for bootstrap intervals over images.

    Summed over images, the counts equal a ``ConfusionMatrix``'s (union is additive over
    disjoint pixel sets), so the point estimates agree with the dataset-level metrics.

    Args:
        num_classes: C.
        ignore_index: target value that is not scored.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one class")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._chunks: list[np.ndarray] = []  # each (B, 2C + 2): inter, union, correct, total

    def add(self, pred: ArrayLike, target: ArrayLike) -> PerImageCounts:
        """Add one image: ``pred`` and ``target`` of any matching shape, e.g. (H, W)."""
        p, t = _as_labels(pred, "prediction"), _as_labels(target, "target")
        return self.add_batch(p[None], t[None])

    def add_batch(self, pred: ArrayLike, target: ArrayLike) -> PerImageCounts:
        """Add B images at once: (B, ...) predictions and targets, e.g. (B, N) or (B, H, W)."""
        p, t, valid = _scored_pairs(pred, target, self.num_classes, self.ignore_index)
        if valid.dim() < 1:
            raise ValueError("add_batch needs a leading batch dimension; use add() for one image")
        B, C = valid.shape[0], self.num_classes
        image = torch.arange(B, device=valid.device).reshape(-1, *[1] * (valid.dim() - 1))
        image = image.expand_as(valid)[valid]  # (P,) image of each scored pixel

        def per_image(img: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # -> (B, C)
            return torch.bincount(img * C + labels, minlength=B * C).reshape(B, C)

        hit = p == t
        inter = per_image(image[hit], t[hit])
        union = per_image(image, t) + per_image(image, p) - inter
        total = valid.reshape(B, -1).sum(dim=1, keepdim=True)
        table = torch.cat([inter, union, inter.sum(dim=1, keepdim=True), total], dim=1)
        self._chunks.append(table.cpu().numpy())
        return self

    def add_confusion(self, confusion: torch.Tensor) -> PerImageCounts:
        """Add B images from their (B, C, C) (or one image's (C, C)) confusion counts, rows true
        and columns predicted: the same counts ``add_batch`` derives from the predictions."""
        m = confusion[None] if confusion.dim() == 2 else confusion
        C = self.num_classes
        if m.dim() != 3 or m.shape[1:] != (C, C):
            raise ValueError(
                f"confusion has shape {tuple(confusion.shape)}; expected (B, {C}, {C})"
            )
        return self.add_tables(self.tables(m))

    @staticmethod
    def tables(confusion: torch.Tensor) -> np.ndarray:
        """(..., C, C) confusion counts -> (..., 2C + 2) int64 rows for ``add_tables``: per class
        intersection and union, then correct and total; one host copy for all of them."""
        return confusion_tables(confusion).cpu().numpy()

    def add_tables(self, tables: np.ndarray) -> PerImageCounts:
        """Add B images from their (B, 2C + 2) rows (``tables``)."""
        if tables.ndim != 2 or tables.shape[1] != 2 * self.num_classes + 2:
            raise ValueError(
                f"tables have shape {tables.shape}; expected (B, {2 * self.num_classes + 2})"
            )
        self._chunks.append(tables)
        return self

    def _table(self) -> np.ndarray:
        if len(self._chunks) != 1:
            width = 2 * self.num_classes + 2
            self._chunks = [np.concatenate([np.zeros((0, width), np.int64), *self._chunks])]
        return self._chunks[0]

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks)

    @property
    def intersection(self) -> np.ndarray:
        """(n_images, C) int64 true positives per image and class."""
        return self._table()[:, : self.num_classes]

    @property
    def union(self) -> np.ndarray:
        """(n_images, C) int64 union per image and class."""
        return self._table()[:, self.num_classes : 2 * self.num_classes]

    @property
    def correct(self) -> np.ndarray:
        """(n_images,) int64 correctly predicted scored pixels per image."""
        return self._table()[:, -2]

    @property
    def total(self) -> np.ndarray:
        """(n_images,) int64 scored pixels per image."""
        return self._table()[:, -1]

    def miou(self) -> float:
        """Dataset-level mIoU from the summed counts (equals ``ConfusionMatrix.miou``)."""
        return _miou(self.intersection.sum(axis=0), self.union.sum(axis=0))

    def pixel_accuracy(self) -> float:
        return float(_ratio(self.correct.sum(), self.total.sum()))

    def bootstrap(
        self,
        metric: str = "miou",
        n_resamples: int = 1000,
        confidence: float = 0.95,
        seed: int = 0,
        method: str = "centred",
    ) -> tuple[float, float]:
        """Bootstrap interval over images: (low, high), nan if never defined.

        ``method`` is ``centred`` (the resamples' spread around the full-sample value; valid when
        classes drop out of resamples, see ``seglens.experiments.stats.centred_interval``) or
        ``percentile``. Resample r takes the n images ``idx[r]`` of
        ``default_rng(seed).integers(0, n, (R, n))``, sums their counts and recomputes ``metric``
        (``miou``, over the classes with union > 0 in that resample, or ``pixel_accuracy``). All R
        resamples are one (R, n) weight matrix times the (n, K) counts. ``confidence`` is the
        coverage, in (0, 1).
        """
        if metric not in BOOTSTRAP_METRICS:
            raise ValueError(f"bootstrap metric {metric!r} is not one of {BOOTSTRAP_METRICS}")
        if not 0 < confidence < 1 or n_resamples < 1:
            raise ValueError(
                f"need 0 < confidence < 1 and n_resamples >= 1, got {confidence=}, {n_resamples=}"
            )
        n, C = len(self), self.num_classes
        if n == 0:
            raise ValueError("bootstrap over zero images: add images before asking for intervals")
        table = self._table()
        counts = table[:, : 2 * C] if metric == "miou" else table[:, -2:]
        idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
        flat = (np.arange(n_resamples)[:, None] * n + idx).ravel()
        weights = np.bincount(flat, minlength=n_resamples * n).reshape(n_resamples, n)
        # Float64 matmul is exact here: sums of integer counts stay far below 2**53.
        sums = weights.astype(np.float64) @ counts.astype(np.float64)  # (R, K)
        if metric == "miou":
            present = sums[:, C:] > 0
            iou = np.where(present, sums[:, :C] / np.maximum(sums[:, C:], 1), 0.0)
            values = _ratio(iou.sum(axis=1), present.sum(axis=1))
        else:
            values = _ratio(sums[:, 0], sums[:, 1])
        # The interval rules are plain numpy, kept with the other statistics of the analyses.
        from seglens.experiments.stats import bootstrap_interval

        estimate = self.miou() if metric == "miou" else self.pixel_accuracy()
        low, high = bootstrap_interval(estimate, values, confidence, method)
        return (float("nan"), float("nan")) if low is None else (low, high)

    def bootstrap_miou(
        self, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
    ) -> tuple[float, float]:
        """``bootstrap("miou", ...)``."""
        return self.bootstrap("miou", n_resamples, confidence, seed)

    def _layout(self) -> tuple[int, int]:
        return self.num_classes, self.ignore_index

    def merge(self, other: PerImageCounts) -> PerImageCounts:
        """Append another process's images after this one's; return self."""
        _require_same("(num_classes, ignore_index)", self._layout(), other._layout())
        self._chunks.append(other._table().copy())
        return self

    def reset(self) -> None:
        self._chunks = []

    def state_dict(self) -> dict[str, Any]:
        n, ignore = self._layout()
        return {"num_classes": n, "ignore_index": ignore, "counts": self._table().copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        theirs = (int(state["num_classes"]), int(state["ignore_index"]))
        _require_same("state (num_classes, ignore_index)", self._layout(), theirs)
        counts = np.asarray(state["counts"], dtype=np.int64)
        if counts.ndim != 2 or counts.shape[1] != 2 * self.num_classes + 2:
            raise ValueError(f"state counts {counts.shape} are not (n_images, 2C + 2)")
        self._chunks = [counts.copy()]


class PositionAccuracy(_Counter):
    """Accuracy per token position p (raster order) over the dataset.

    Args:
        num_positions: N, image tokens per image.
        ignore_index: target value that is not scored.
        device: where the (N,) int64 ``correct`` and ``total`` counts live.
    """

    _size, _fields = "num_positions", ("correct", "total")

    def __init__(self, num_positions: int, ignore_index: int = IGNORE_INDEX, device: Any = "cpu"):
        if num_positions < 1:
            raise ValueError(f"num_positions={num_positions}: need at least one position")
        self.num_positions, self.ignore_index = num_positions, ignore_index
        self.correct = torch.zeros(num_positions, dtype=torch.int64, device=device)
        self.total = torch.zeros(num_positions, dtype=torch.int64, device=device)

    def update(self, pred: ArrayLike, target: ArrayLike) -> PositionAccuracy:
        """Add (B, N) predictions and targets; targets equal to ``ignore_index`` are dropped."""
        p, t = _as_labels(pred, "prediction"), _as_labels(target, "target")
        if p.shape != t.shape or t.dim() != 2 or t.shape[1] != self.num_positions:
            raise ValueError(
                f"prediction {tuple(p.shape)} and target {tuple(t.shape)} must both be "
                f"(B, {self.num_positions})"
            )
        valid = t != self.ignore_index
        self.correct += ((p.to(t.device) == t) & valid).sum(dim=0).to(self.correct.device)
        self.total += valid.sum(dim=0).to(self.total.device)
        return self

    def accuracy(self) -> np.ndarray:
        """(N,) float64 accuracy per position, nan where no target was scored."""
        return _ratio(self.correct.cpu().numpy(), self.total.cpu().numpy())


def count_bins(index: torch.Tensor, size: int) -> torch.Tensor:
    """(...) int64 bin ids in 0..size (``size`` is a dump bin, dropped) -> (size,) int64 counts.

    Never syncs: on an accelerator the counts go through ``index_add_`` (CUDA's ``bincount``
    reads the input's min and max back to the host); on the CPU ``bincount`` (faster there).
    """
    flat = index.reshape(-1)
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=size + 1)[:size]
    ones = torch.ones(1, dtype=torch.int64, device=flat.device).expand(flat.numel())
    counts = torch.zeros(size + 1, dtype=torch.int64, device=flat.device)
    return counts.index_add_(0, flat, ones)[:size]


def count_confusions(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(L, *shape) predictions of L scorers (e.g. stages) against one (*shape) target ->
    (L, C, C) int64 confusions (rows true), without a host sync.

    Elements whose target is ``ignore_index`` (or outside 0..C-1: see ``invalid_labels``) go to
    a dump bin through ``masked_fill`` instead of boolean indexing (which syncs on CUDA).
    Predictions must be class ids in 0..C-1 (an argmax); they are not re-checked.
    """
    C, L = num_classes, pred.shape[0]
    if tuple(pred.shape[1:]) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} is not (L, *{tuple(target.shape)})")
    t = target.to(pred.device, non_blocking=True).long()
    dump = (t < 0) | (t >= C)  # the ignore index and invalid labels
    row = (t.masked_fill(dump, 0) * C).unsqueeze(0)  # (1, *shape)
    lead = (torch.arange(L, device=pred.device) * C * C).view(L, *[1] * t.dim())
    index = (lead + row + pred.long()).masked_fill(dump.unsqueeze(0), L * C * C)
    return count_bins(index, L * C * C).view(L, C, C)


def invalid_labels(
    target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """0-dim int64 count of target values outside 0..C-1 that are not ``ignore_index``, on the
    target's device (the caller reads it back with its other counts: no sync of its own)."""
    t = target.long()
    return (((t < 0) | (t >= num_classes)) & (t != ignore_index)).sum()


def image_tables(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(L, B, ...) predictions of L scorers, (B, ...) targets -> (L, B, 2C + 2) int64
    ``PerImageCounts`` rows (per class intersection and union, correct, total) of every scorer
    and image, without a host sync and without forming (L, B, C, C) confusions."""
    C, (L, B) = num_classes, pred.shape[:2]
    if tuple(pred.shape[1:]) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} is not (L, *{tuple(target.shape)})")
    t = target.to(pred.device, non_blocking=True).long().reshape(1, B, -1)
    p = pred.long().reshape(L, B, -1)
    dump = (t < 0) | (t >= C)
    cell = torch.arange(L * B, device=p.device).view(L, B, 1) * C  # each (scorer, image)
    n = L * B * C
    truth = (cell + t.masked_fill(dump, 0)).masked_fill(dump, 3 * n)
    guess = (cell + p + n).masked_fill(dump, 3 * n)
    hit = (cell + p + 2 * n).masked_fill(dump | (p != t), 3 * n)
    counts = count_bins(torch.cat([truth.expand_as(p), guess, hit], -1), 3 * n).view(3, L, B, C)
    inter = counts[2]
    union = counts[0] + counts[1] - inter
    total = counts[0].sum(-1, keepdim=True)
    return torch.cat([inter, union, inter.sum(-1, keepdim=True), total], -1)


def confusion_tables(confusion: torch.Tensor) -> torch.Tensor:
    """(..., C, C) confusion counts -> (..., 2C + 2) int64 ``PerImageCounts`` rows, on the
    confusion's device (``PerImageCounts.tables`` copies them to the host)."""
    m = confusion.long()
    inter = m.diagonal(dim1=-2, dim2=-1)
    union = m.sum(dim=-1) + m.sum(dim=-2) - inter
    total = m.sum(dim=(-2, -1))[..., None]
    return torch.cat([inter, union, inter.sum(dim=-1, keepdim=True), total], -1)


def score_target(
    target: ArrayLike, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a target once for scoring many predictions of it with ``confusion_of``.

    Returns:
        (valid, offset): the bool mask of scored elements (target != ``ignore_index``) and, for
        those, ``target * num_classes`` (int64), both on the target's device.

    Raises:
        ValueError: a target value outside 0..C-1 that is not the ignore index.
    """
    _, t, valid = _scored_pairs(target, target, num_classes, ignore_index)
    return valid, t * num_classes


def confusion_of(
    pred: torch.Tensor, valid: torch.Tensor, offset: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """(..., C, C) int64 confusion (rows true) of ``pred`` against a target from ``score_target``.

    One ``bincount``: equal to ``ConfusionMatrix(C).update(pred, target).matrix``. ``pred`` has
    the target's shape, or leading dimensions before it (e.g. stages), each scored against the
    same target; it must hold class ids in 0..C-1 (e.g. an argmax; not re-checked).
    """
    C = num_classes
    lead = pred.shape[: pred.dim() - valid.dim()]
    if tuple(pred.shape[len(lead) :]) != tuple(valid.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} does not end in {tuple(valid.shape)}")
    flat = pred.to(offset.device).reshape(-1, *valid.shape)[:, valid]  # (L, P)
    flat = flat + offset + C * C * torch.arange(len(flat), device=offset.device)[:, None]
    counts = torch.bincount(flat.reshape(-1), minlength=len(flat) * C * C)
    return counts.reshape(*lead, C, C)


def pixel_predictions(
    grid_logits: torch.Tensor, transform: Transform, max_elements: int | None = None
) -> torch.Tensor:
    """(..., C, g, g) grid logits -> (..., H, W) int64 class ids in the original frame.

    The argmax over classes of ``transform.logits_to_original(grid_logits)`` (bilinear
    upsampling through the geometry; ties to the lower class), bit for bit, computed by
    ``upsampling.upsampled_argmax`` without forming the (C, H, W) upsampled logits. At most
    about ``max_elements`` values are formed at once (default: ``upsampling.MAX_ELEMENTS``).
    Leading dimensions (e.g. stages) share the transform. Pixels outside
    ``transform.scored_region()`` get a prediction too; ``pixel_target`` marks them ignore.
    """
    return upsampled_argmax(grid_logits, transform, max_elements)


def pixel_target(mask: ArrayLike, transform: Transform) -> ArrayLike:
    """(H, W) original labels -> int64 copy (numpy or torch, as given) with the pixels outside
    ``transform.scored_region()`` (those a crop removed) set to ``IGNORE_INDEX``."""
    shape = (transform.height, transform.width)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != the transform's image shape {shape}")
    outside = ~transform.scored_region()
    if isinstance(mask, torch.Tensor):
        out = mask.long().clone()
        out[torch.from_numpy(outside).to(out.device)] = IGNORE_INDEX
        return out
    out = np.asarray(mask).astype(np.int64, copy=True)
    out[outside] = IGNORE_INDEX
    return out
