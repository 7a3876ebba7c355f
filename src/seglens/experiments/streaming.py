"""Streaming the data through the model: stage selection, holdout split, sharding and batches.

Every analysis that trains or scores probes iterates the same way: a deterministic (seeded) order,
sharded by rank under torch.distributed, resumable from a checkpoint position, one ``Batch`` at a
time so features can be dropped after use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

from seglens.capture import check_stages
from seglens.checkpoint import Checkpointer
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SegDataset, iterate_samples
from seglens.distributed import rank_world as _rank_world
from seglens.models import VLM, Batch
from seglens.stages import spread, vision_block

log = logging.getLogger(__name__)


# --- stages and splits ---------------------------------------------------------------------------
def resolve_stages(vlm: VLM, config: ProbeConfig) -> list[str]:
    """The stages to probe, in forward order: ``config.stages`` (default encoder, adapter,
    llm.1..L), plus vision.1..Lv with ``vision_blocks`` and llm.final_norm with ``final_norm``."""
    stages = list(config.stages) if config.stages else list(vlm.default_stages)
    if config.vision_blocks:
        stages += [s for s in vlm.stages if vision_block(s) is not None]
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
        layers = spread(vlm.num_llm_layers, 3)
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
    if n < 2:
        raise ValueError(
            f"probe.holdout_fraction={fraction} needs at least two training images (one to "
            f"train on, one held out to choose the learning rate), got {n}; use more training "
            "images, or set probe.holdout_fraction=0 with a single learning rate"
        )
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
def shard_dataset(dataset: SegDataset, equal: bool) -> SegDataset:
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
def stream_batches(
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


def epoch_order(dataset: SegDataset, seed: int, epoch: int) -> SegDataset:
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    return dataset._view([dataset._keys[i] for i in order])
