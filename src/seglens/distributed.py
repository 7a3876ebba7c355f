"""Data parallel on torch.distributed: the process group under ``torchrun`` and a few collectives.

``torchrun --nproc-per-node N -m seglens probe ...`` starts N processes; ``process_group()``
joins them (nccl on GPU, one device per ``LOCAL_RANK``; gloo on CPU) and every helper here is a
no-op in a single process. Each rank streams its own shard of the images; sgd gradients, LDA
statistics and metric counts are summed with ``sum_over_ranks``; only rank 0 writes files. A
rank that fails prints its error and exits non-zero; torchrun then stops the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["barrier", "gather_object", "interleave", "is_main", "launched", "process_group"]
__all__ += ["rank", "rank_world", "sum_over_ranks", "world"]

log = logging.getLogger(__name__)


def _active() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if _active():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return rank_world()[0]


def world() -> int:
    """Number of processes (1 in a single process)."""
    return rank_world()[1]


def is_main() -> bool:
    """Whether this process writes files and prints results (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world() > 1:
        torch.distributed.barrier()


def launched() -> bool:
    """Whether torchrun (or a compatible launcher) started several processes (``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(backend: str | None = None) -> Iterator[None]:
    """Join the process group torchrun describes in the environment, and leave it on exit.

    Does nothing in a single process or when a group already exists (e.g. a test set it up).
    nccl with ``cuda:LOCAL_RANK`` as the current device when CUDA is available, else gloo. On
    an exception the group is not torn down politely (peers may be blocked in a collective):
    the process exits and torchrun stops the other ranks.

    Args:
        backend: override of the backend (``gloo`` or ``nccl``).
    """
    if not launched() or _active():
        yield
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = backend or ("nccl" if cuda else "gloo")
    torch.distributed.init_process_group(backend=backend)
    log.debug("rank %d of %d joined (%s)", rank(), world(), backend)
    yield
    torch.distributed.destroy_process_group()


def gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    n = world()
    if n == 1:
        return [obj]
    out: list[Any] = [None] * n
    torch.distributed.all_gather_object(out, obj)
    return out


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it; a CPU tensor travels via the GPU
    under nccl. No-op in a single process."""
    if world() == 1:
        return tensor
    dist = torch.distributed
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = tensor.to(device)
    dist.all_reduce(buffer)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def interleave(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Undo a strided shard: rank r's rows go back to global positions r, r + W, r + 2W, ...

    Args:
        parts: per rank (in rank order), (n_r, ...) rows in local order.

    Returns:
        (sum n_r, ...) rows in the order of the unsharded data. When the lengths are not those
        of a strided shard (a rank skipped bad samples) the parts are concatenated in rank order.
    """
    W, n = len(parts), sum(len(p) for p in parts)
    if any(len(p) != len(range(r, n, W)) for r, p in enumerate(parts)):
        return np.concatenate(parts)
    out = np.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::W] = part
    return out
