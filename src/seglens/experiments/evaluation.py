"""Scoring every stage's probe on the evaluation split: patch and pixel confusion matrices,
per-image counts for bootstrap intervals, per-position accuracy and qualitative maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from seglens.checkpoint import Checkpointer
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SegDataset
from seglens.data.base import IGNORE_INDEX
from seglens.distributed import gather_object as _gather
from seglens.distributed import interleave
from seglens.distributed import rank_world as _rank_world
from seglens.distributed import sum_over_ranks as _sum_over_ranks
from seglens.experiments.stats import bootstrap_contrast
from seglens.experiments.streaming import qualitative_stages, shard_dataset, stream_batches
from seglens.metrics import (
    ConfusionMatrix,
    PerImageCounts,
    PositionAccuracy,
    confusion_tables,
    count_confusions,
    image_tables,
    invalid_labels,
    pixel_predictions,
    pixel_target,
)
from seglens.models import VLM, Batch
from seglens.probes import ProbeBank

log = logging.getLogger(__name__)
_NEG = -1e30  # stands in for -inf logits (classes LDA never saw): bilinear weights * -inf = nan


# --- evaluation ------------------------------------------------------------------------------
@dataclass
class StageResults:
    """Dataset-level accumulators of one condition on the evaluation split.

    Attributes:
        stages: probed stages, forward order.
        num_classes: C.
        patch: per stage, (C, C) token confusion (prediction vs majority label).
        pixel: per stage, (C, C) confusion on original pixels, or None when pixel level is off.
        patch_images, pixel_images: per stage, per-image counts for bootstrap intervals.
        early_images, late_images: per stage, per-image patch counts over the first / last
            ``band`` token positions (the early-minus-late interval of ``seglens bidir``).
        positions: per stage, accuracy per token position (patch level).
        qualitative: ``image__<i>``, ``mask__<i>``, ``pred__<stage>__<i>`` arrays (rank 0).
        qualitative_stages, qualitative_names: what ``qualitative`` holds.
        images: evaluated images; skipped: [(name, message)] of skipped samples.
        bootstrap, seed: resamples and seed of the intervals.
    """

    stages: list[str]
    num_classes: int
    patch: dict[str, ConfusionMatrix]
    pixel: dict[str, ConfusionMatrix] | None
    patch_images: dict[str, PerImageCounts]
    pixel_images: dict[str, PerImageCounts] | None
    positions: dict[str, PositionAccuracy]
    early_images: dict[str, PerImageCounts] = field(default_factory=dict)
    late_images: dict[str, PerImageCounts] = field(default_factory=dict)
    band: int = 1
    qualitative: dict[str, np.ndarray] = field(default_factory=dict)
    qualitative_stages: list[str] = field(default_factory=list)
    qualitative_names: list[str] = field(default_factory=list)
    images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    bootstrap: int = 1000
    seed: int = 0

    def _level(self, cm: ConfusionMatrix, counts: PerImageCounts, unit: str) -> dict:
        ci = {m: [None, None] for m in ("miou", "pixel_accuracy")}
        if self.bootstrap > 0 and len(counts):
            for m, name in (("miou", "miou"), ("pixel_accuracy", "accuracy")):
                i = bootstrap_contrast(
                    [(1.0, counts)], name, n_resamples=self.bootstrap, seed=self.seed
                )
                ci[m] = [i["low"], i["high"]]
        return {**cm.to_dict(), "ci": ci, unit: int(cm.matrix.sum())}

    def metrics(self) -> dict[str, dict]:
        """{stage: {"patch": M, "pixel": M or None}} with M as in ``results.json``."""
        out = {}
        for s in self.stages:
            out[s] = {"patch": self._level(self.patch[s], self.patch_images[s], "tokens")}
            out[s]["pixel"] = None
            if self.pixel is not None:
                out[s]["pixel"] = self._level(self.pixel[s], self.pixel_images[s], "pixels")
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """``position_accuracy__<stage>`` (N,), ``confusion__<stage>__{patch,pixel}`` (C, C)."""
        out = {}
        for s in self.stages:
            out[f"position_accuracy__{s}"] = self.positions[s].accuracy()
            out[f"confusion__{s}__patch"] = self.patch[s].matrix.cpu().numpy()
            if self.pixel is not None:
                out[f"confusion__{s}__pixel"] = self.pixel[s].matrix.cpu().numpy()
        return out

    def _tables(self) -> dict[str, dict]:
        tables = dict(patch=self.patch, pixel=self.pixel, patch_images=self.patch_images)
        tables |= dict(pixel_images=self.pixel_images, positions=self.positions)
        tables |= dict(early_images=self.early_images, late_images=self.late_images)
        return {name: table for name, table in tables.items() if table is not None}

    def state_dict(self) -> dict[str, Any]:
        """The running counts, qualitative arrays and image count (for ``seglens.checkpoint``)."""
        tables = self._tables().items()
        state = {name: {s: t[s].state_dict() for s in self.stages} for name, t in tables}
        state["qualitative"] = dict(self.qualitative)
        return state | {"qualitative_names": list(self.qualitative_names), "images": self.images}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        for name, table in self._tables().items():
            for s in self.stages:
                table[s].load_state_dict(state[name][s])
        self.qualitative = dict(state["qualitative"])
        self.qualitative_names, self.images = list(state["qualitative_names"]), state["images"]

    def all_reduce(self) -> StageResults:
        """Sum counts over ranks (confusions, positions; per-image counts are concatenated)."""
        if _rank_world()[1] == 1:
            return self
        for s in self.stages:
            pixel = self.pixel is not None
            tensors = [self.patch[s].matrix, self.positions[s].correct, self.positions[s].total]
            for tensor in tensors + ([self.pixel[s].matrix] if pixel else []):
                _sum_over_ranks(tensor)
            per_image = [self.patch_images, self.early_images, self.late_images]
            for table in per_image + ([self.pixel_images] if pixel else []):
                states = _gather(table[s].state_dict())
                # Back in the unsharded image order: bootstrap intervals equal one process's.
                states[0]["counts"] = interleave([state["counts"] for state in states])
                table[s].load_state_dict(states[0])
        gathered = _gather((self.images, self.skipped))
        self.images = sum(g[0] for g in gathered)
        self.skipped = sorted({k: v for g in gathered for k, v in g[1]}.items())
        return self


def evaluate_probes(
    vlm: VLM,
    bank: ProbeBank,
    eval_dataset: SegDataset,
    stages: Sequence[str],
    probe_config: ProbeConfig,
    *,
    data_config: DataConfig,
    seed: int = 0,
    qualitative: Sequence[str] | None = None,
    progress: bool = True,
    checkpoint: Checkpointer | None = None,
    on_batch: Callable[[Batch, dict[str, torch.Tensor]], None] | None = None,
) -> StageResults:
    """Score every stage's probe on the evaluation split, one ``vlm.capture`` per batch.

    ``on_batch(batch, states)`` sees every batch's captured states, so another analysis of the
    evaluation split (UMAP token sampling in ``seglens run``) can share the forward pass.

    Patch level: token argmax vs majority label. Pixel level (``probe_config.pixel_level``): grid
    logits (C, g, g) bilinearly mapped back through each image's ``Transform``, argmax, vs the
    original mask inside the scored region. Both feed a dataset-level ``ConfusionMatrix`` and
    ``PerImageCounts``; ``PositionAccuracy`` is patch level. Pixel-level argmax maps of the first
    ``probe_config.qualitative`` images are kept for the ``qualitative`` stages (default
    ``qualitative_stages(...)``). Under torch.distributed each rank scores its shard and the
    counts are summed (every rank gets the totals). A ``checkpoint`` saves the accumulators and
    the position during the ``eval`` phase and restores them on resume.

    Returns:
        The accumulated ``StageResults``.
    """
    cfg, C = probe_config, eval_dataset.num_classes
    stages = list(stages)
    qual = qualitative_stages(vlm, stages, cfg) if qualitative is None else list(qualitative)
    rank, _ = _rank_world()
    n_qual = cfg.qualitative if rank == 0 else 0
    dev = vlm.device  # counts live where the logits are: few host copies
    res = StageResults(
        stages=stages,
        num_classes=C,
        patch={s: ConfusionMatrix(C, device=dev) for s in stages},
        pixel={s: ConfusionMatrix(C, device=dev) for s in stages} if cfg.pixel_level else None,
        patch_images={s: PerImageCounts(C) for s in stages},
        pixel_images={s: PerImageCounts(C) for s in stages} if cfg.pixel_level else None,
        positions={s: PositionAccuracy(vlm.num_image_tokens, device=dev) for s in stages},
        early_images={s: PerImageCounts(C) for s in stages},
        late_images={s: PerImageCounts(C) for s in stages},
        band=max(1, round(cfg.position_band * vlm.num_image_tokens)),
        qualitative_stages=qual if n_qual else [],
        bootstrap=cfg.bootstrap,
        seed=seed,
    )
    skipped: dict[str, str] = {}
    if checkpoint is not None:
        checkpoint.register("eval", res.state_dict, res.load_state_dict)
        checkpoint.register("eval_skipped", lambda: dict(skipped), skipped.update)
    g = vlm.grid
    data = shard_dataset(eval_dataset, equal=False)
    args = (data_config, C, skipped, progress, "probe eval", checkpoint, "eval")
    for batch in stream_batches(vlm, data, *args):
        if batch.labels is None:
            raise ValueError(f"{eval_dataset.name}: evaluation images need label maps")
        states = vlm.capture(batch, stages)  # {stage: (B, N, D)}
        if on_batch is not None:
            on_batch(batch, states)
        logits = bank.decision_function(states)  # {stage: (B, N, C)}, each on its probe's device
        del states
        _score_batch(res, batch, logits, dev, g, n_qual, cfg.pixel_level)
    res.skipped = sorted(skipped.items())
    return res.all_reduce()


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: pinned and non-blocking when that is a GPU."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _small_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Label maps in a small integer type that holds every value (uint8 below 255 classes: the
    ignore index 255 fits), so the host-to-device copy of a mask moves 1 byte per pixel.
    Lossless: values outside the type's range keep a wider one (and are refused on the device)."""
    lo, hi = int(labels.min(initial=0)), int(labels.max(initial=0))
    if num_classes < IGNORE_INDEX and lo >= 0 and hi <= 255:
        return labels.astype(np.uint8)
    return labels.astype(np.int16) if lo >= -(2**15) and hi < 2**15 else labels


def _score_batch(
    res: StageResults,
    batch: Batch,
    logits: dict[str, torch.Tensor],
    dev: torch.device,
    grid: tuple[int, int],
    n_qual: int,
    pixel_level: bool,
) -> None:
    """Add one batch's counts to ``res``, with one host copy for all of them.

    Counts are formed on ``dev`` without boolean indexing or ``bincount`` (``count_bins``);
    invalid labels are counted there too and raise after the copy. Only the pixel upsampler
    (data-dependent pruning, a few syncs per image) and the first images' qualitative maps
    read anything back besides.
    """
    stages, C = res.stages, res.num_classes
    # Under a device_map each stage's probe sits on its layer's GPU: gather the logits on dev.
    z = torch.stack([logits[s].to(dev, non_blocking=True) for s in stages]).clamp_min(_NEG)
    pred = z.argmax(-1)  # (S, B, N)
    labels = _to_device(_small_labels(batch.labels.numpy(), C), dev).long()  # (B, N)
    bad = [invalid_labels(labels, C)]
    band = res.band
    confusion = count_confusions(pred, labels, C)  # (S, C, C)
    tables = [
        image_tables(pred, labels, C),  # (S, B, 2C + 2) each
        image_tables(pred[:, :, :band], labels[:, :band], C),
        image_tables(pred[:, :, -band:], labels[:, -band:], C),
    ]
    for k, s in enumerate(stages):
        res.patch[s].matrix += confusion[k]
        res.positions[s].update(pred[k], labels)
    first_new = len(res.qualitative_names)
    for b in range(min(len(batch), n_qual - first_new)):
        i = first_new + b
        res.qualitative[f"image__{i}"] = np.asarray(batch.images[b], np.uint8)
        res.qualitative[f"mask__{i}"] = np.asarray(batch.masks[b])
        res.qualitative_names.append(batch.names[b])
    pixel_tables, qual_maps = [], []
    for b in range(len(batch)):
        i = res.images + b
        qual = res.qualitative_stages if i < n_qual else []
        scored = stages if pixel_level else qual
        if not scored:
            continue
        rows = slice(None) if scored == stages else [stages.index(s) for s in scored]
        grids = z[rows, b].transpose(1, 2).reshape(len(scored), C, *grid)  # raster order
        transform = batch.transforms[b]
        pix = pixel_predictions(grids, transform)  # (S, H, W), all stages at once
        if pixel_level:
            target = _to_device(_small_labels(pixel_target(batch.masks[b], transform), C), dev)
            bad.append(invalid_labels(target, C))
            image = count_confusions(pix, target, C)  # (S, C, C)
            pixel_tables.append(confusion_tables(image))  # (S, 2C + 2)
            for k, s in enumerate(scored):
                res.pixel[s].matrix += image[k].to(res.pixel[s].matrix.device)
        qual_maps += [(f"pred__{s}__{i}", b, pix[scored.index(s)]) for s in qual]
    # One host copy per batch: the per-image rows of every stage and the label check.
    parts = [t.reshape(-1) for t in tables] + [torch.stack(bad).reshape(-1)]
    if pixel_tables:
        parts.insert(3, torch.stack(pixel_tables, 1).reshape(-1))  # (S, B, 2C + 2)
    host = torch.cat(parts).cpu().numpy()
    if host[-len(bad) :].any():
        raise ValueError(
            f"batch {batch.names}: label values outside 0..{C - 1} that are not the ignore "
            f"index {IGNORE_INDEX}; check the dataset's class count and label encoding"
        )
    width, B = 2 * C + 2, len(batch)
    chunks = np.split(host[: -len(bad)], np.cumsum([t.numel() for t in parts[:-2]]))
    per_stage = [c.reshape(len(stages), -1, width) for c in chunks]
    targets = [res.patch_images, res.early_images, res.late_images]
    targets += [res.pixel_images] if pixel_tables else []
    for table, counts in zip(targets, per_stage, strict=True):
        for k, s in enumerate(stages):
            table[s].add_tables(counts[k])
    for name, b, pix in qual_maps:  # the first images only (rank 0)
        outside = torch.from_numpy(~batch.transforms[b].scored_region())
        res.qualitative[name] = pix.cpu().masked_fill(outside, IGNORE_INDEX).numpy()
    res.images += B
