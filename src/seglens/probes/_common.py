"""Helpers shared by the probe solvers and the bank: batch checks, targets, validation mIoU.

Checks are reduced on the device and read back with one host sync per batch; ``targets`` turns
hard labels and soft histograms into the same (M, C) rows, so the solvers see one kind of
target. The ``prefixed`` pair names nested state the way checkpoints store it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence

import torch

from seglens.data.base import IGNORE_INDEX
from seglens.distributed import sum_over_ranks, world

Tensor = torch.Tensor
log = logging.getLogger(__name__)

#: Unit roundoff of a GEMM's inputs per ``probe.gemm`` (float32: 24-bit, tf32: 11-bit, bf16: 8-bit
#: significands): the scale of the rounding noise in a float32 result, used by the sgd noise floor.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "tf32": 2.0**-11, "bfloat16": 2.0**-8}
GEMMS = tuple(UNIT_ROUNDOFF)


def accumulate_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of cheap accumulations (per-batch sums, the lda statistics, the final solve):
    float64, except on MPS, which has no float64 kernels (float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@functools.cache
def _warn_tf32(device_type: str) -> None:
    log.warning(
        "probe.gemm='tf32' applies to CUDA tensor cores only; on %s the probe GEMMs run in "
        "float32 (set probe.gemm=float32 or bfloat16 there)",
        device_type,
    )


def matmul(a: Tensor, b: Tensor, gemm: str = "float32") -> Tensor:
    """float32 (M, K) x (K, N) -> float32 (M, N) at the precision ``gemm`` names.

    float32: a plain float32 GEMM (with TF32 off on CUDA, whatever the global setting); tf32:
    CUDA tensor cores with 10-bit mantissas (float32 elsewhere, with a warning once); bfloat16:
    inputs rounded to bf16, the product returned as float32.
    """
    if gemm == "bfloat16":
        return (a.bfloat16() @ b.bfloat16()).float()
    if a.device.type != "cuda":
        if gemm == "tf32":
            _warn_tf32(a.device.type)
        return a @ b
    with _fp32_precision("high" if gemm == "tf32" else "highest"):
        return a @ b


@contextlib.contextmanager
def _fp32_precision(precision: str):
    """Set torch's float32 matmul precision for the block and restore it afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def all_reduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` summed over ranks (plain copies without torch.distributed)."""
    return [sum_over_ranks(t.clone()) for t in tensors]


def check_batch(
    xs: Mapping[str, Tensor], y: Tensor | None, hist: Tensor | None, n_classes: int
) -> bool:
    """Raise on non-finite features or bad labels; return whether to train on the batch.

    All checks are reduced on the device and read back with one host sync per batch. A batch
    without valid tokens is skipped, except under torch.distributed, where every rank must step
    (and all_reduce) together.

    Args:
        xs: {stage: (M, D)} flattened features.
        y: (M,) int64 labels or None. hist: (M, C) histograms or None (hard labels).
        n_classes: C.
    """
    flags = [torch.isfinite(x).all() for x in xs.values()]
    if y is not None:
        ok = (((y >= 0) & (y < n_classes)) | (y == IGNORE_INDEX)).all()
        valid = y != IGNORE_INDEX if hist is None else hist.sum(-1) > 0
        flags += [ok if hist is None else ok & (hist >= 0).all(), valid.any()]
    host = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    for stage, good in zip(xs, host, strict=False):
        if not good:
            raise ValueError(
                f"non-finite values (inf/nan) in the features of stage {stage!r}: fp16 overflows "
                "on the massive activations of LLM hidden states; capture in bf16 or fp32 instead"
            )
    if y is not None and not host[-2]:
        hmin = None if hist is None else float(hist.min())
        raise ValueError(
            f"labels must be in 0..{n_classes - 1} or {IGNORE_INDEX} (ignore), got values in "
            f"[{int(y.min())}, {int(y.max())}]; histograms must be >= 0 (min {hmin})"
        )
    return y is None or bool(host[-1]) or world() > 1


def targets(y: Tensor, hist: Tensor | None, n_classes: int) -> tuple[Tensor, Tensor]:
    """Labels (M,) or histograms (M, C) -> targets T (M, C) fp32 and valid (M,) bool.

    Rows of T sum to 1 on valid tokens and are 0 elsewhere, so hard labels and one-hot
    histograms give bitwise-identical targets.
    """
    if hist is not None:
        h = hist.float()
        tot = h.sum(-1, keepdim=True)
        return h / tot.masked_fill(tot == 0, 1.0), tot.squeeze(-1) > 0
    valid = y != IGNORE_INDEX
    T = torch.nn.functional.one_hot(y.masked_fill(~valid, 0), n_classes).float()
    return T * valid[:, None], valid


def confusion(pred: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """Predictions (M, K) of K candidates, labels (M,) -> (K, C, C) int64 confusion, rows = truth.

    Tokens labelled ``IGNORE_INDEX`` go to a dump bin that is dropped, so nothing syncs.
    """
    K, C = pred.shape[1], n_classes
    idx = (torch.arange(K, device=pred.device) * C + y[:, None]) * C + pred
    idx = idx.masked_fill((y == IGNORE_INDEX)[:, None], K * C * C)
    return torch.bincount(idx.reshape(-1), minlength=K * C * C + 1)[:-1].view(K, C, C)


def miou(conf: Tensor) -> Tensor:
    """(K, C, C) confusion (rows = truth) -> (K,) mIoU over classes with union > 0."""
    conf = conf.to(accumulate_dtype(conf.device))
    inter = conf.diagonal(dim1=1, dim2=2)
    union = conf.sum(2) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), 0.0)
    return iou.sum(1) / (union > 0).sum(1).clamp_min(1)


def prefixed(prefix: str, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{key: v}`` -> ``{prefix + key: v}``: nested state as flat checkpoint names."""
    return {prefix + k: v for k, v in sd.items()}


def unprefixed(prefix: str, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The entries of ``sd`` under ``prefix``, prefix taken off (``prefixed``'s inverse)."""
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}
