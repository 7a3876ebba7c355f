"""Layerwise linear probing: one probe per stage, trained and scored from streamed forward passes.

Every batch runs ONE ``vlm.capture`` for all stages; its features update every stage's probe (or
metric accumulator) and are dropped, so nothing is stored per dataset. ``train_probes`` and
``evaluate_probes`` are the reusable core (they also run unchanged inside
``seglens.interventions.intervene``); ``run_probing`` is the public API behind ``seglens probe``
and ``write_condition`` adds one condition's probing section to a run's ``results.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from seglens.capture import check_stages
from seglens.checkpoint import Checkpointer, rng_state, set_rng_state
from seglens.config import DataConfig, ProbeConfig, RunConfig
from seglens.data import SegDataset, iterate_samples
from seglens.data.base import IGNORE_INDEX
from seglens.distributed import barrier, interleave
from seglens.distributed import gather_object as _gather
from seglens.distributed import rank_world as _rank_world
from seglens.distributed import sum_over_ranks as _sum_over_ranks
from seglens.metrics import (
    ConfusionMatrix,
    PerImageCounts,
    PositionAccuracy,
    pixel_predictions,
    pixel_target,
)
from seglens.models import VLM, Batch
from seglens.probes import ProbeBank
from seglens.results import (
    CHECKPOINT,
    CONFIG,
    RESULTS,
    atomic_write,
    clean_condition,
    prepare_run_dir,
    provenance,
    read_json,
    save_arrays,
    write_json,
)

__all__ = ["StageResults", "evaluate_probes", "qualitative_stages", "resolve_stages"]
__all__ += ["run_probing", "split_holdout", "train_probes", "write_condition"]

log = logging.getLogger(__name__)
_NEG = -1e30  # stands in for -inf logits (classes LDA never saw): bilinear weights * -inf = nan


# --- stages and splits ---------------------------------------------------------------------------
def resolve_stages(vlm: VLM, config: ProbeConfig) -> list[str]:
    """The stages to probe, in forward order: ``config.stages`` (default encoder, adapter,
    llm.1..L), plus vision.1..Lv with ``vision_blocks`` and llm.final_norm with ``final_norm``."""
    stages = list(config.stages) if config.stages else list(vlm.default_stages)
    if config.vision_blocks:
        stages += [s for s in vlm.stages if s.startswith("vision.")]
    if config.final_norm:
        stages.append("llm.final_norm")
    return check_stages(stages, vlm.stages)


def qualitative_stages(vlm: VLM, stages: Sequence[str], config: ProbeConfig) -> list[str]:
    """Stages of the qualitative maps: the configured ones, else encoder, adapter and three LLM
    layers spread over depth (the last included), kept only where probed."""
    if config.qualitative_stages:
        wanted = list(config.qualitative_stages)
        missing = [s for s in wanted if s not in stages]
        if missing:
            raise ValueError(
                f"probe.qualitative_stages {missing} are not probed; probed stages: {list(stages)}"
            )
    else:
        L = vlm.num_llm_layers
        layers = sorted({max(1, round(L * k / 3)) for k in (1, 2, 3)})
        wanted = ["encoder", "adapter"] + [f"llm.{layer}" for layer in layers]
    return [s for s in stages if s in wanted]


def split_holdout(
    dataset: SegDataset, fraction: float, seed: int
) -> tuple[SegDataset, SegDataset | None]:
    """Seeded split of a TRAINING dataset into (train, holdout); holdout None when fraction is 0.

    ``round(fraction * n)`` images (at least one when fraction > 0) go to the holdout, in their
    original order; the rest, also in order, to training.
    """
    n = len(dataset)
    n_hold = 0 if fraction <= 0 else max(1, round(fraction * n))
    if n_hold == 0:
        return dataset, None
    if n_hold >= n:
        raise ValueError(
            f"holdout_fraction={fraction} leaves no training images out of {n}; lower it or use "
            "more images"
        )
    order = np.random.default_rng([seed, 0x401D]).permutation(n)
    hold = set(order[:n_hold].tolist())
    parts = ([k for i, k in enumerate(dataset._keys) if (i in hold) == h] for h in (False, True))
    return tuple(dataset._view(keys) for keys in parts)


# --- distributed -----------------------------------------------------------------------------
def _shard(dataset: SegDataset, equal: bool) -> SegDataset:
    """This rank's part of ``dataset`` (strided: rank r takes items r, r + W, ...); ``equal``
    first drops the < W leftover images so that every rank runs the same number of batches (sgd
    all-reduces gradients once per batch). Sharding an epoch's global order makes W ranks with
    batch B see, step by step, exactly the images one process sees with batch W x B."""
    rank, world = _rank_world()
    if world == 1:
        return dataset
    if equal:
        per_rank = len(dataset) // world
        if per_rank == 0:
            raise ValueError(f"{len(dataset)} images cannot be split over {world} processes")
        dataset = dataset.limit(per_rank * world)
    return dataset.shard(rank, world)


# --- streaming -------------------------------------------------------------------------------
def _batches(
    vlm: VLM,
    dataset: SegDataset,
    data: DataConfig,
    num_classes: int,
    skipped: dict[str, str],
    progress: bool,
    desc: str,
    checkpoint: Checkpointer | None = None,
    phase: str = "",
) -> Iterator[Batch]:
    """Collated batches of ``dataset``; skipped samples land in ``skipped`` as they occur.

    With a ``checkpoint``, ``dataset`` is the whole of ``phase``: nothing is yielded when the
    phase is done, it starts at the saved position when interrupted (skipping the consumed images
    without loading them), and each batch is reported to the checkpoint once the caller has
    processed it (the generator resumes after the caller's loop body).
    """
    ckpt = checkpoint or Checkpointer.off()
    if ckpt.done(phase):
        return
    start, seen = ckpt.position(phase)
    stream = iterate_samples(
        dataset._view(dataset._keys[start:]) if start else dataset,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        transform=vlm.preprocessor(num_classes, data.min_valid),
        on_bad_sample=data.on_bad_sample,
        progress=progress,
        desc=desc,
    )
    kept = 0
    for prepared in stream:
        skipped.update(dict(stream.skipped))
        kept += len(prepared)
        yield vlm.collate(prepared)
        seen += len(prepared)
        # Consumed images (skipped ones included) stay a multiple of the batch size, so a resumed
        # phase cuts its remaining images into the same batches as an uninterrupted one.
        ckpt.step(phase, start + kept + len(stream.skipped), seen)
    skipped.update(dict(stream.skipped))
    ckpt.end(phase, seen)


def _epoch_order(dataset: SegDataset, seed: int, epoch: int) -> SegDataset:
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    return dataset._view([dataset._keys[i] for i in order])


# --- training --------------------------------------------------------------------------------
def train_probes(
    vlm: VLM,
    train_dataset: SegDataset,
    stages: Sequence[str],
    probe_config: ProbeConfig,
    *,
    data_config: DataConfig,
    seed: int = 0,
    holdout: float | None = None,
    progress: bool = True,
    checkpoint: Checkpointer | None = None,
) -> ProbeBank:
    """Train one probe per stage from streamed forward passes (one ``vlm.capture`` per batch).

    sgd: a seeded ``holdout`` fraction of the training images (default
    ``probe_config.holdout_fraction``) is set aside; a warm-up pass over the first
    ``warmup_batches`` batches estimates the frozen standardisers; then ``epochs`` passes over
    the training images, each in a seeded order, update all K learning rates side by side; the
    holdout images pick one lr per stage. lda: one pass over all training images, then the closed
    form (no holdout is needed). Under torch.distributed each rank streams its shard.

    Args:
        vlm: the model (may be inside ``intervene(...)``: only ``vlm.capture`` is used).
        train_dataset: the training split (never the evaluation split).
        stages: stage names, e.g. ``resolve_stages(vlm, probe_config)``.
        probe_config: solver and its hyperparameters.
        data_config: batch size, workers, bad-sample policy, ``min_valid``.
        seed: seeds the holdout split and the epoch orders.
        holdout: override of ``probe_config.holdout_fraction`` (sgd only).
        progress: show progress bars.
        checkpoint: saves the bank and the position during each phase (``train.warmup``,
            ``train.epoch<e>``, ``train.holdout``, ``train.lda``) and restores them on resume.

    Returns:
        The selected ``ProbeBank``, with ``bank.training_`` = {"train_images", "holdout_images",
        "warmup_batches", "skipped": [[name, message], ...]} summed over ranks.
    """
    cfg, C = probe_config, train_dataset.num_classes
    if cfg.cache_dir is not None:  # multi-epoch training from an on-disk feature cache
        from seglens.cache import train_probes_cached

        kwargs = dict(data_config=data_config, seed=seed, holdout=holdout, progress=progress)
        return train_probes_cached(vlm, train_dataset, stages, cfg, **kwargs)
    stages = list(stages)
    skipped: dict[str, str] = {}
    hold, n_train, n_hold = None, 0, 0
    if cfg.solver == "sgd":
        fraction = cfg.holdout_fraction if holdout is None else holdout
        train_dataset, hold = split_holdout(train_dataset, fraction, seed)
        if hold is None and len(cfg.lrs) > 1:
            raise ValueError(
                f"probe.lrs={list(cfg.lrs)} needs a holdout to choose one; set "
                "probe.holdout_fraction > 0 or give a single learning rate"
            )
    train = _shard(train_dataset, equal=True)
    hold = None if hold is None else _shard(hold, equal=False)
    if hold is not None and min(_gather(len(hold))) == 0:
        raise ValueError("the holdout has fewer images than processes; raise holdout_fraction")
    soft = cfg.soft_labels
    n_batches = -(-len(train) // data_config.batch_size)
    warmup = min(cfg.warmup_batches, n_batches)
    if cfg.solver == "sgd":
        options = dict(lrs=cfg.lrs, weight_decay=cfg.weight_decay, warmup_batches=warmup)
    else:
        options = dict(shrinkage=cfg.shrinkage)
    names = train_dataset.class_names
    bank = ProbeBank(stages, C, solver=cfg.solver, class_names=names, soft_labels=soft, **options)
    ckpt = checkpoint or Checkpointer.off()
    ckpt.register("bank", bank.state_dict, bank.load_state_dict)
    ckpt.register("train_skipped", lambda: dict(skipped), skipped.update)

    def fit(dataset: SegDataset, desc: str, phase: str) -> int:
        for batch in _batches(vlm, dataset, data_config, C, skipped, progress, desc, ckpt, phase):
            features = vlm.capture(batch, stages)  # {stage: (B, N, D)}
            bank.partial_fit(features, batch.labels, batch.hist if soft else None)
        return ckpt.seen(phase)

    def epoch_shard(epoch: int, limit: int | None = None) -> SegDataset:
        # Order all images, then shard: W ranks x batch B step through one process's batches
        # of W x B (see ``_shard``), so sgd matches a single process on the same global order.
        return _shard(_epoch_order(train_dataset, seed, epoch).limit(limit), equal=True)

    if cfg.solver == "sgd":
        # Warm-up: the standardisers see the first batches of epoch 1 before any update, so
        # that every training image is also trained on (at the cost of `warmup` extra forwards).
        first = epoch_shard(0, warmup * data_config.batch_size * _rank_world()[1])
        fit(first, "probe warm-up", "train.warmup")
        for probe in bank.probes.values():
            if not probe.standardizer.frozen:  # a warm-up batch had no valid token
                probe.standardizer.freeze()
        for epoch in range(cfg.epochs):
            desc = f"probe train {epoch + 1}/{cfg.epochs}"
            n = fit(epoch_shard(epoch), desc, f"train.epoch{epoch}")
            n_train = n if epoch == 0 else n_train
        if hold is not None:
            args = (data_config, C, skipped, progress, "holdout", ckpt, "train.holdout")
            for batch in _batches(vlm, hold, *args):
                bank.validate(vlm.capture(batch, stages), batch.labels)
            n_hold = ckpt.seen("train.holdout")
    else:
        n_train = fit(train, "probe train (lda)", "train.lda")
    bank.select()
    gathered = _gather((n_train, n_hold, skipped))
    bank.training_ = {
        "train_images": sum(g[0] for g in gathered),
        "holdout_images": sum(g[1] for g in gathered),
        "warmup_batches": warmup if cfg.solver == "sgd" else 0,
        "skipped": sorted({k: v for g in gathered for k, v in g[2].items()}.items()),
    }
    return bank


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
            ci = {m: list(counts.bootstrap(m, self.bootstrap, seed=self.seed)) for m in ci}
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
            for table in [self.patch_images] + ([self.pixel_images] if pixel else []):
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
        qualitative_stages=qual if n_qual else [],
        bootstrap=cfg.bootstrap,
        seed=seed,
    )
    skipped: dict[str, str] = {}
    if checkpoint is not None:
        checkpoint.register("eval", res.state_dict, res.load_state_dict)
        checkpoint.register("eval_skipped", lambda: dict(skipped), skipped.update)
    g = vlm.grid
    data = _shard(eval_dataset, equal=False)
    args = (data_config, C, skipped, progress, "probe eval", checkpoint, "eval")
    for batch in _batches(vlm, data, *args):
        if batch.labels is None:
            raise ValueError(f"{eval_dataset.name}: evaluation images need label maps")
        states = vlm.capture(batch, stages)  # {stage: (B, N, D)}
        if on_batch is not None:
            on_batch(batch, states)
        logits = bank.decision_function(states)  # {stage: (B, N, C)}
        del states
        labels = batch.labels.to(dev)
        targets = []  # per image: (H, W) original mask, outside the scored region ignored
        if cfg.pixel_level:
            pairs = zip(batch.masks, batch.transforms, strict=True)
            targets = [torch.from_numpy(pixel_target(m, t)).to(dev) for m, t in pairs]
        first_new = len(res.qualitative_names)
        for b in range(min(len(batch), n_qual - first_new)):
            i = first_new + b
            res.qualitative[f"image__{i}"] = np.asarray(batch.images[b], np.uint8)
            res.qualitative[f"mask__{i}"] = np.asarray(batch.masks[b])
            res.qualitative_names.append(batch.names[b])
        for s in stages:
            z = logits[s].clamp_min(_NEG)
            pred = z.argmax(-1)  # (B, N)
            res.patch[s].update(pred, labels)
            res.patch_images[s].add_batch(pred, labels)
            res.positions[s].update(pred, labels)
            keep_qual = s in res.qualitative_stages
            for b in range(len(batch)):
                i = res.images + b
                if not cfg.pixel_level and not (keep_qual and i < n_qual):
                    continue
                grid = z[b].T.reshape(C, *g)  # (C, g, g): tokens are raster order
                pix = pixel_predictions(grid, batch.transforms[b])  # (H, W)
                if cfg.pixel_level:
                    res.pixel[s].update(pix, targets[b])
                    res.pixel_images[s].add(pix, targets[b])
                if keep_qual and i < n_qual:
                    region = torch.from_numpy(batch.transforms[b].scored_region())
                    outside = pix.cpu().masked_fill(~region, IGNORE_INDEX)
                    res.qualitative[f"pred__{s}__{i}"] = outside.numpy()
        res.images += len(batch)
    res.skipped = sorted(skipped.items())
    return res.all_reduce()


# --- results.json ----------------------------------------------------------------------------
def _summary(metrics: dict[str, dict], level: str) -> dict:
    miou = {s: (m[level] or {}).get("miou") for s, m in metrics.items()}
    scored = {s: v for s, v in miou.items() if v is not None}
    best = max(scored, key=scored.get) if scored else None
    enc, ada = miou.get("encoder"), miou.get("adapter")
    llm = [v for s, v in scored.items() if s.startswith("llm.")]
    return {
        "level": level,
        "best_stage": best,
        "best_miou": scored.get(best),
        "encoder_miou": enc,
        "adapter_miou": ada,
        "adapter_drop": None if enc is None or ada is None else enc - ada,
        "llm_gain": None if not llm or ada is None else max(llm) - ada,
    }


def write_condition(
    run_dir: str | Path, condition: str, results: StageResults, bank: ProbeBank
) -> dict:
    """Save one condition's probes and arrays and put its section into ``results.json``.

    Writes ``probes/<condition>/<stage>.{safetensors,json}``, ``arrays/probing_<condition>.npz``
    and ``results["probing"][condition]`` (read-modify-write of an existing ``results.json``,
    atomic). Only rank 0 writes under torch.distributed.

    Returns:
        The condition's section as written.
    """
    run_dir = Path(run_dir)
    metrics = results.metrics()
    for stage, probe in bank.probes.items():
        lr = float(probe.lr_) if bank.solver == "sgd" else None
        metrics[stage]["probe"] = {"file": f"probes/{condition}/{stage}", "lr": lr}
    section = {
        "stages": list(results.stages),
        "solver": bank.solver,
        "metrics": metrics,
        "summary": _summary(metrics, "pixel" if results.pixel is not None else "patch"),
        "arrays": f"arrays/probing_{condition}.npz",
    }
    if _rank_world()[0] != 0:
        return section
    bank.save(run_dir / "probes" / condition)
    save_arrays(run_dir / section["arrays"], **results.arrays())
    data = read_json(run_dir / RESULTS)
    data.setdefault("probing", {})[condition] = section
    write_json(run_dir / RESULTS, data)
    return section


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (``yaml.safe_dump`` refuses tuples)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_probing(
    config: RunConfig,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    on_eval_batch: Callable[[Batch, dict[str, torch.Tensor]], None] | None = None,
) -> dict:
    """The layerwise probing experiment behind ``seglens probe``; returns ``results.json``'s data.

    Prepares ``config.out`` (an existing run is refused unless ``config.overwrite`` or
    ``config.resume``), seeds once, trains the probes on the training split, scores them on the
    evaluation split, and writes ``config.yaml``, ``results.json``, ``probes/causal/``,
    ``arrays/probing_causal.npz`` and ``arrays/qualitative.npz``; figures are drawn if
    ``seglens.report.figures`` is installed. ``RUN/checkpoint/`` is written every
    ``config.checkpoint_every`` batches and at the end of every phase; with ``config.resume`` a
    killed run continues from it and ends with the results of an uninterrupted run (a resume with
    a config that changes the results is refused, naming the keys).

    Args:
        config: the resolved run configuration.
        vlm: an already loaded model (default: ``build_model(config.model)``).
        progress: show progress bars.
        on_eval_batch: passed to ``evaluate_probes`` as ``on_batch`` (shares its forward pass).
    """
    from seglens.experiments.common import build_dataset, build_model

    rank, world = _rank_world()
    run_dir = Path(config.out)
    if rank == 0:
        prepare_run_dir(run_dir, overwrite=config.overwrite, resume=config.resume)
    barrier()  # no rank writes its checkpoint before rank 0 has checked the directory
    ckpt = Checkpointer(
        run_dir / CHECKPOINT,
        every=config.checkpoint_every,
        fingerprint=_fingerprint(config),
        resume=config.resume,
        rank=rank,
        world=world,
    )
    if len({repr(where) for where in _gather(ckpt.where())}) > 1:
        raise ValueError(
            f"the processes' checkpoints in {run_dir / CHECKPOINT} stop at different points "
            "(killed between two ranks' writes); pass --overwrite to start again"
        )
    if ckpt.complete_:
        log.info("%s is complete; nothing to resume", run_dir)
        return read_json(run_dir / RESULTS)
    torch.manual_seed(config.seed)
    vlm = build_model(config.model) if vlm is None else vlm
    # After the model: its random init drew from the seeded RNGs in the killed run too.
    ckpt.register("rng", rng_state, set_rng_state)
    data = config.data
    train = build_dataset(data, data.train_split, data.limit_train, config.seed)
    evaluation = build_dataset(data, data.eval_split, data.limit_eval, config.seed)
    if train.num_classes != evaluation.num_classes:
        raise ValueError(
            f"train split has {train.num_classes} classes, eval split {evaluation.num_classes}"
        )
    stages = resolve_stages(vlm, config.probe)
    log.info(
        "probing %d stages of %s (%s, %d processes)",
        len(stages),
        vlm.name,
        config.probe.solver,
        world,
    )
    options = dict(data_config=data, seed=config.seed, progress=progress, checkpoint=ckpt)
    bank = train_probes(vlm, train, stages, config.probe, **options)
    results = evaluate_probes(
        vlm, bank, evaluation, stages, config.probe, on_batch=on_eval_batch, **options
    )
    skipped = dict(bank.training_["skipped"]) | dict(results.skipped)
    out = {
        **provenance(config.seed),
        "config": config.to_dict(),
        "model": vlm.info(),
        "dataset": {
            "name": data.dataset,
            "train_split": data.train_split,
            "eval_split": data.eval_split,
            "num_classes": train.num_classes,
            "class_names": list(train.class_names),
            "palette": np.asarray(train.palette).tolist(),
            "train_images": bank.training_["train_images"],
            "holdout_images": bank.training_["holdout_images"],
            "eval_images": results.images,
            "skipped": {"count": len(skipped), "samples": [list(kv) for kv in skipped.items()]},
        },
        "probing": {},
        "qualitative": {
            "file": "arrays/qualitative.npz",
            "stages": results.qualitative_stages,
            "images": results.qualitative_names,
        },
        "figures": {},
    }
    if rank == 0:
        with atomic_write(run_dir / CONFIG) as handle:
            yaml.safe_dump(_plain(config.to_dict()), handle, sort_keys=False)
        write_json(run_dir / RESULTS, out)
        save_arrays(run_dir / out["qualitative"]["file"], **results.qualitative)
    clean = clean_condition(out)
    out["probing"][clean] = write_condition(run_dir, clean, results, bank)
    if rank == 0:
        _draw_figures(run_dir)
        out = read_json(run_dir / RESULTS)
    ckpt.complete()
    log.info("probing results in %s", run_dir / RESULTS)
    return out


def _fingerprint(config: RunConfig) -> dict:
    """The config values that shape probing results (not the run folder, resume or workers)."""
    full = _plain(config.to_dict())
    data = {k: v for k, v in full["data"].items() if k != "num_workers"}
    return {"seed": full["seed"], "model": full["model"], "data": data, "probe": full["probe"]}


def _draw_figures(run_dir: Path) -> None:
    try:
        from seglens.report.figures import draw_all
    except ImportError:
        log.info("seglens.report.figures is not available; no figures drawn")
        return
    draw_all(run_dir)
