"""Streaming a dataset in deterministic batches, decoding and transforming in worker processes.

``iterate_samples`` wraps ``torch.utils.data.DataLoader`` (in-order, list-collated) and adds what
experiments need around it: a progress bar, and a policy for bad files: stop with the loader's
own message naming the file, or skip the sample and record its name and the reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.utils.data
from tqdm.auto import tqdm

from seglens import distributed
from seglens.data.base import BadSampleError, Sample, SegDataset

logger = logging.getLogger(__name__)

ON_BAD_SAMPLE = ("error", "skip")


@dataclass
class _Failure:
    """A sample that raised BadSampleError, carried back from the worker instead of raising."""

    index: int
    name: str
    error: BadSampleError


@dataclass
class _Noted:
    """A loaded item whose sample carried notes (doubts that do not stop it), for the stream."""

    item: Any
    name: str
    notes: tuple[str, ...]


class _Guarded(torch.utils.data.Dataset):
    """Load + transform one item; a BadSampleError becomes a ``_Failure`` record.

    Catching in the worker keeps the batch alive (so "skip" loses only the bad item) and lets the
    main process re-raise the original exception rather than DataLoader's wrapped copy.
    """

    def __init__(self, dataset: SegDataset, transform: Callable[[Sample], Any] | None):
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            sample = self.dataset[index]
            item = sample if self.transform is None else self.transform(sample)
        except BadSampleError as e:
            return _Failure(index, self.dataset.name_of(index), e)
        return _Noted(item, sample.name, sample.notes) if sample.notes else item


def _collate_list(batch: list) -> list:
    return list(batch)


class SampleStream:
    """An iterable over batches (lists) of transformed samples; see ``iterate_samples``.

    Attributes:
        skipped: ``(sample name, error message)`` of every sample skipped in the latest pass.
        noted: ``(sample name, note)`` of every sample kept with a doubt in the latest pass
            (e.g. an EXIF orientation that cannot be checked against its mask).
    """

    def __init__(
        self,
        dataset: SegDataset,
        *,
        batch_size: int,
        num_workers: int = 0,
        transform: Callable[[Sample], Any] | None = None,
        on_bad_sample: str = "error",
        progress: bool = True,
        desc: str = "samples",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0 (0 loads in this process)")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample={on_bad_sample!r} must be one of {ON_BAD_SAMPLE}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.progress = progress
        self.desc = desc
        self.skipped: list[tuple[str, str]] = []
        self.noted: list[tuple[str, str]] = []

    def __len__(self) -> int:
        """Number of batches before skipping (an upper bound with ``on_bad_sample="skip"``)."""
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[list]:
        self.skipped = []
        self.noted = []
        loader = torch.utils.data.DataLoader(
            _Guarded(self.dataset, self.transform),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate_list,
        )
        total = len(self.dataset)
        with tqdm(
            total=total,
            desc=self.desc,
            unit="img",
            disable=not self.progress or distributed.rank() != 0,
        ) as bar:
            for batch in loader:
                kept = []
                for item in batch:
                    if isinstance(item, _Noted):
                        self.noted.extend((item.name, note) for note in item.notes)
                        item = item.item
                    if not isinstance(item, _Failure):
                        kept.append(item)
                    elif self.on_bad_sample == "error":
                        # In a worker the traceback is lost, but the message names the file.
                        raise item.error
                    else:
                        self.skipped.append((item.name, str(item.error)))
                        logger.debug("skipped %s: %s", item.name, item.error)
                bar.update(len(batch))
                if self.skipped:
                    bar.set_postfix(skipped=len(self.skipped))
                if kept:
                    yield kept
        if self.skipped:
            name, reason = self.skipped[0]
            logger.warning(
                "skipped %d of %d samples as unreadable or inconsistent; first: %s (%s)",
                len(self.skipped),
                total,
                name,
                reason,
            )
        if self.noted:
            name, note = self.noted[0]
            logger.warning(
                "%d of %d images carry an EXIF orientation that cannot be checked against their "
                "mask (first: %s); their masks are taken as drawn on the upright image. If they "
                "were drawn on the stored pixels, turn them with ImageOps.exif_transpose or "
                "remove the orientation tags.",
                len({n for n, _ in self.noted}),
                total,
                note,
            )


def iterate_samples(
    dataset: SegDataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    transform: Callable[[Sample], Any] | None = None,
    on_bad_sample: str = "error",
    progress: bool = True,
    desc: str = "samples",
) -> SampleStream:
    """Stream a dataset in order, in batches of transformed samples.

    Args:
        dataset: the dataset (or a shard of it).
        batch_size: items per batch; the last batch may be smaller.
        num_workers: worker processes that load and transform (0: this process). The order of
            the output does not depend on it.
        transform: a picklable callable applied to each ``Sample`` in the workers (e.g. the
            model's preprocessing); None yields the ``Sample`` objects themselves.
        on_bad_sample: ``"error"`` raises the loader's ``BadSampleError`` (its message names the
            file); ``"skip"`` drops the sample and records it in ``.skipped``.
        progress: show a tqdm progress bar over images.
        desc: the progress bar's label.

    Returns:
        An iterable of non-empty lists of transformed samples, with ``.skipped`` holding
        ``(name, message)`` for each skipped sample and ``.noted`` ``(name, note)`` for each kept
        sample with a doubt (logged as one warning with the count) once iteration has run.
    """
    return SampleStream(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        transform=transform,
        on_bad_sample=on_bad_sample,
        progress=progress,
        desc=desc,
    )
