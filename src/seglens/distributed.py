"""Data parallel on torch.distributed: the process group under ``torchrun`` and a few collectives.

``torchrun --nproc-per-node N -m seglens probe ...`` starts N processes; ``process_group()``
joins them (nccl on GPU, one device per ``LOCAL_RANK``: ``rank_device``; gloo on CPU) and every
helper here is a no-op in a single process. Each rank streams its own shard of the images; sgd
gradients, LDA statistics and metric counts are summed with ``sum_over_ranks``; only rank 0
writes files, and the others wait for it in ``barrier`` (a gloo side group with its own timeout,
``SEGLENS_WAIT_TIMEOUT``). A rank that fails prints its error and exits non-zero; torchrun then
stops the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch

__all__ = ["barrier", "gather_object", "interleave", "is_main", "launched", "local_rank"]
__all__ += ["process_group", "rank", "rank_device", "rank_world", "sum_over_ranks"]
__all__ += ["wait_timeout", "world"]

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


WAIT_TIMEOUT_ENV = "SEGLENS_WAIT_TIMEOUT"
DEFAULT_WAIT_TIMEOUT_S = 4 * 3600
_waits: dict[str, Any] = {}  # the gloo group that ``barrier`` waits in, under ``process_group``


def wait_timeout() -> timedelta:
    """How long ``barrier`` lets ranks wait for each other: ``SEGLENS_WAIT_TIMEOUT`` seconds
    (default 4 hours: rank 0 alone runs UMAP, the findings and the report meanwhile)."""
    raw = os.environ.get(WAIT_TIMEOUT_ENV, str(DEFAULT_WAIT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"{WAIT_TIMEOUT_ENV}={raw!r}: give the longest wait between ranks in seconds, a "
            f"number > 0 (default {DEFAULT_WAIT_TIMEOUT_S})"
        )
    return timedelta(seconds=seconds)


def barrier() -> None:
    """Wait for every rank (no-op in a single process).

    Under ``process_group`` the wait runs in a gloo side group with ``wait_timeout()``, not in
    the nccl group: while rank 0 alone runs long work (UMAP, findings, report), the other ranks
    wait on the CPU, where NCCL's watchdog (10 minutes by default) does not see them, and a
    real hang still fails after the wait timeout, naming the rank that never arrived. The nccl
    group keeps its short timeout for the collectives of the data-parallel passes.
    """
    if world() == 1:
        return
    group = _waits.get("group")
    if group is None:
        torch.distributed.barrier()
    else:
        torch.distributed.monitored_barrier(group, timeout=wait_timeout(), wait_all_ranks=True)


def launched() -> bool:
    """Whether torchrun (or a compatible launcher) started several processes (``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's GPU index on its node under torchrun (``LOCAL_RANK``; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str | None, device_map: str | dict | None) -> str | None:
    """The device this process puts its model on: under torchrun, ``cuda:LOCAL_RANK``.

    Outside torchrun ``device`` is returned as given. Under torchrun each rank holds a full
    copy of the model on its own GPU, so ``--device cuda`` (or no ``--device``) means
    ``cuda:LOCAL_RANK``, ``--device cpu`` stays (gloo), and a device or placement that would
    put every rank on the same GPUs is refused with the fix.

    Raises:
        ValueError: ``device_map`` under torchrun, or a ``cuda:N`` device with N not the rank's.
    """
    if not launched():
        return device
    n = os.environ.get("WORLD_SIZE")
    if device_map is not None:
        raise ValueError(
            f"--device-map {device_map!r} under torchrun ({n} processes): every rank would "
            "spread its own full copy of the model over all GPUs. Drop --device-map (each rank "
            "then uses cuda:LOCAL_RANK), or run one process without torchrun to split a model "
            "too big for one GPU"
        )
    gpu = f"cuda:{local_rank()}"
    if device is None:
        return gpu if torch.cuda.is_available() else "cpu"
    parsed = torch.device(device)
    if parsed.type != "cuda":
        return device
    if parsed.index is not None and parsed.index != local_rank():
        raise ValueError(
            f"--device {device} under torchrun ({n} processes): this rank has "
            f"LOCAL_RANK={local_rank()}, and every rank would use the same GPU. Pass --device "
            "cuda (or no --device): each rank then uses cuda:LOCAL_RANK"
        )
    return gpu


@contextlib.contextmanager
def process_group(backend: str | None = None, timeout: timedelta | None = None) -> Iterator[None]:
    """Join the process group torchrun describes in the environment, and leave it on exit.

    Does nothing in a single process or when a group already exists (e.g. a test set it up).
    nccl when CUDA is available (then, and only then, ``cuda:LOCAL_RANK`` becomes the current
    device: gloo ranks on a 1-GPU machine must not all claim GPUs they lack), else gloo. Beside
    it, a gloo group with ``wait_timeout()`` for ``barrier``. On an exception the group is not
    torn down politely (peers may be blocked in a collective): the process exits and torchrun
    stops the other ranks.

    Args:
        backend: override of the backend (``gloo`` or ``nccl``).
        timeout: the collectives' timeout (torch's default when None); waits use
            ``wait_timeout()``.
    """
    if not launched() or _active():
        yield
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    options = {} if timeout is None else {"timeout": timeout}
    torch.distributed.init_process_group(backend=backend, **options)
    _waits["group"] = torch.distributed.new_group(backend="gloo", timeout=wait_timeout())
    log.debug("rank %d of %d joined (%s)", rank(), world(), backend)
    try:
        yield
    finally:
        _waits.clear()
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
