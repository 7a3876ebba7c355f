"""The one trainer of the probes of every stage, over a feature source.

A source yields each training phase's features batch by batch: ``LiveFeatures`` from forward
passes (one ``vlm.capture`` per batch), ``seglens.cache.CachedFeatures`` from an on-disk feature
cache. Holdout split, warm-up, epoch orders, early stopping, learning-rate selection and
checkpoints are the trainer's, so both sources get them alike. Runs unchanged inside
``seglens.interventions.intervene``, so the bidirectional experiment trains its per-condition
probes with the same code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from seglens.checkpoint import Checkpointer
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SegDataset
from seglens.distributed import gather_object as _gather
from seglens.distributed import rank_world as _rank_world
from seglens.experiments.streaming import epoch_order, shard_dataset, split_holdout, stream_batches
from seglens.models import VLM
from seglens.probes import ProbeBank

if TYPE_CHECKING:
    from seglens.cache import CachedFeatures

log = logging.getLogger(__name__)


# --- feature sources -------------------------------------------------------------------------
#: One batch of a feature source: ({stage: (B, N, D)}, labels (B, N), hist (B, N, C)).
Features = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]


class LiveFeatures:
    """Features from forward passes: one ``vlm.capture`` of every stage per batch.

    A feature source has a ``name`` and ``batches(dataset, desc, checkpoint, phase, skipped)``,
    which yields ``Features`` of ``dataset``'s images in order as the whole of ``phase``
    (resumable, see ``stream_batches``) and records skipped samples in ``skipped``; the other
    source is ``seglens.cache.CachedFeatures``.
    """

    name = "live"

    def __init__(
        self,
        vlm: VLM,
        stages: Sequence[str],
        data_config: DataConfig,
        num_classes: int,
        progress: bool = True,
    ):
        self.vlm, self.stages, self.data = vlm, list(stages), data_config
        self.num_classes, self.progress = num_classes, progress

    def batches(
        self,
        dataset: SegDataset,
        desc: str,
        checkpoint: Checkpointer | None,
        phase: str,
        skipped: dict[str, str],
    ) -> Iterator[Features]:
        args = (self.data, self.num_classes, skipped, self.progress, desc, checkpoint, phase)
        for batch in stream_batches(self.vlm, dataset, *args):
            yield self.vlm.capture(batch, self.stages), batch.labels, batch.hist


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
    condition: str = "causal",
    features: LiveFeatures | CachedFeatures | None = None,
) -> ProbeBank:
    """Train one probe per stage from a feature source (default: live forward passes, or the
    feature cache when ``probe_config.cache_dir`` is set).

    sgd: a seeded ``holdout`` fraction of the training images (default
    ``probe_config.holdout_fraction``) is set aside; a warm-up pass over the first
    ``warmup_batches`` batches estimates the frozen standardisers; then ``epochs`` passes over
    the training images, each in a seeded order, update all K learning rates side by side; the
    holdout images pick one lr per stage. With early stopping the held-out loss is scored
    after every epoch, or every ``probe_config.eval_every`` training batches (then one pass can
    converge, and training ends as soon as every stage has). lda: one pass over all training
    images, then the closed form (no holdout is needed). Under torch.distributed each rank
    streams its shard.

    Args:
        vlm: the model (may be inside ``intervene(...)``: only ``vlm.capture`` is used).
        train_dataset: the training split (never the evaluation split).
        stages: stage names, e.g. ``resolve_stages(vlm, probe_config)``.
        probe_config: solver and its hyperparameters.
        data_config: batch size, workers, bad-sample policy, ``min_valid``.
        seed: seeds the holdout split and the epoch orders.
        holdout: override of ``probe_config.holdout_fraction`` (sgd only).
        progress: show progress bars.
        condition: the attention condition the model runs under (names the feature cache).
        features: the source of the training phases' features (default ``LiveFeatures``, or
            ``seglens.cache.cached_features(...)`` with ``probe.cache_dir``); the holdout is
            always scored live.
        checkpoint: saves the bank and the position during each phase (``train.warmup``,
            ``train.epoch<e>`` or with ``eval_every`` ``train.epoch<e>.<j>``, the holdout
            checks ``train.holdout<e>[.<j>]``, ``train.lda``) and restores them on resume.

    Returns:
        The selected ``ProbeBank``, with ``bank.training_`` = {"train_images", "holdout_images",
        "warmup_batches", "skipped": [[name, message], ...], "features": "live" or the cache
        directory} summed over ranks.
    """
    cfg, C = probe_config, train_dataset.num_classes
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
    if features is None and cfg.cache_dir is not None:  # one forward pass, then many epochs
        from seglens.cache import cached_features

        options = dict(data_config=data_config, condition=condition, seed=seed, progress=progress)
        features = cached_features(vlm, train_dataset, stages, cfg, **options)
    source = features or LiveFeatures(vlm, stages, data_config, C, progress)
    train = shard_dataset(train_dataset, equal=True)
    hold = None if hold is None else shard_dataset(hold, equal=False)
    if hold is not None and min(_gather(len(hold))) == 0:
        raise ValueError("the holdout has fewer images than processes; raise holdout_fraction")
    soft = cfg.soft_labels
    n_batches = -(-len(train) // data_config.batch_size)
    warmup = min(cfg.warmup_batches, n_batches)
    if cfg.solver == "sgd":
        options = dict(lrs=cfg.lrs, weight_decay=cfg.weight_decay, warmup_batches=warmup)
        early = cfg.early_stopping and hold is not None
        eval_every = cfg.eval_every if early else None
        options |= dict(early_stopping=early, patience=cfg.patience, min_delta=cfg.min_delta)
        options |= dict(epochs=cfg.epochs)
        if cfg.early_stopping and hold is None:
            log.warning(
                "probe.early_stopping needs a holdout (probe.holdout_fraction=%s): training "
                "%d epochs without it; convergence is not checked",
                cfg.holdout_fraction,
                cfg.epochs,
            )
    else:
        options, eval_every = dict(shrinkage=cfg.shrinkage), None
    options |= dict(exact=cfg.exact, gemm=cfg.gemm)
    names = train_dataset.class_names
    bank = ProbeBank(stages, C, solver=cfg.solver, class_names=names, soft_labels=soft, **options)
    ckpt = checkpoint or Checkpointer.off()
    ckpt.register("bank", bank.state_dict, bank.load_state_dict)
    ckpt.register("train_skipped", lambda: dict(skipped), skipped.update)

    def fit(dataset: SegDataset, desc: str, phase: str) -> int:
        for x, labels, hist in source.batches(dataset, desc, ckpt, phase, skipped):
            bank.partial_fit(x, labels, hist if soft else None)  # x: {stage: (B, N, D)}
        return ckpt.seen(phase)

    def epoch_shard(epoch: int, limit: int | None = None) -> SegDataset:
        # Order all images, then shard: W ranks x batch B step through one process's batches
        # of W x B (see ``shard_dataset``), so sgd matches one process on the same global order.
        return shard_dataset(epoch_order(train_dataset, seed, epoch).limit(limit), equal=True)

    def epoch_parts(epoch: int) -> list[tuple[str, SegDataset, str]]:
        """(training phase, this rank's images, holdout phase) per held-out check of an epoch:
        the whole epoch without ``eval_every``, else runs of ``eval_every`` global batches
        (sharded run by run: the same batches as the whole epoch's shard)."""
        if eval_every is None:
            return [(f"train.epoch{epoch}", epoch_shard(epoch), f"train.holdout{epoch}")]
        ordered = epoch_order(train_dataset, seed, epoch)
        run = eval_every * data_config.batch_size * _rank_world()[1]
        return [
            (
                f"train.epoch{epoch}.{j}",
                shard_dataset(ordered._view(ordered._keys[start : start + run]), equal=True),
                f"train.holdout{epoch}.{j}",
            )
            for j, start in enumerate(range(0, len(ordered), run))
            if len(ordered) - start >= _rank_world()[1]  # a leftover < W images: dropped
        ]

    if cfg.solver == "sgd":
        # Warm-up: the standardisers see the first batches of epoch 1 before any update, so
        # that every training image is also trained on (at the cost of `warmup` extra forwards).
        first = epoch_shard(0, warmup * data_config.batch_size * _rank_world()[1])
        fit(first, "probe warm-up", "train.warmup")
        for probe in bank.probes.values():
            if not probe.standardizer.frozen:  # a warm-up batch had no valid token
                probe.standardizer.freeze()

        def score_holdout(phase: str) -> int:
            args = (data_config, C, skipped, progress, "holdout", ckpt, phase)
            for batch in stream_batches(vlm, hold, *args):
                bank.validate(vlm.capture(batch, stages), batch.labels)
            return ckpt.seen(phase)

        check = 0  # held-out checks closed so far, over all epochs
        for epoch in range(cfg.epochs):
            parts = epoch_parts(epoch)
            for j, (phase, images, hold_phase) in enumerate(parts):
                desc = f"probe train {epoch + 1}/{cfg.epochs}"
                desc += f" ({j + 1}/{len(parts)})" if len(parts) > 1 else ""
                n = fit(images, desc, phase)
                n_train = n_train + n if epoch == 0 else n_train
                if early:  # held-out loss per check; stop once every stage has converged
                    n_hold = score_holdout(hold_phase)
                    bank.end_check(check, epoch)
                    check += 1
                    if bank.stopped:
                        break
            if early and bank.stopped:
                break
        if hold is not None and not early:
            n_hold = score_holdout("train.holdout")
    else:
        n_train = fit(train, "probe train (lda)", "train.lda")
    bank.select()
    gathered = _gather((n_train, n_hold, skipped))
    bank.training_ = {
        "train_images": sum(g[0] for g in gathered),
        "holdout_images": sum(g[1] for g in gathered),
        "warmup_batches": warmup if cfg.solver == "sgd" else 0,
        "skipped": sorted({k: v for g in gathered for k, v in g[2].items()}.items()),
        "features": source.name,
    }
    return bank
