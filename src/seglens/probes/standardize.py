"""Per-feature standardisation for the probes, estimated in float64 and then frozen.

LLM hidden states carry a few massive dimensions (values ~1e3 where others are ~1); probes
train on standardised features so one learning rate suits every dimension. The moments are
plain sums, so they add up across batches and processes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from seglens.probes._common import Tensor, accumulate_dtype, all_reduce_sum


class Standardizer:
    """Per-feature mean/std estimated in float64 on the first training batches, then frozen.

    Args:
        warmup_batches: freeze after this many batches.
        warmup_tokens: if set, freeze once this many tokens were seen instead.
        eps: a feature whose std is below ``eps`` gets scale 1 (as scikit-learn's StandardScaler),
            so constant dimensions are centred but never blown up.
    """

    def __init__(
        self, warmup_batches: int = 4, warmup_tokens: int | None = None, eps: float = 1e-6
    ):
        if warmup_batches < 1 or (warmup_tokens is not None and warmup_tokens < 1):
            raise ValueError(
                f"need warmup_batches >= 1 and warmup_tokens >= 1 or None, got "
                f"{warmup_batches} and {warmup_tokens}"
            )
        self.warmup_batches, self.warmup_tokens, self.eps = warmup_batches, warmup_tokens, eps
        self._reset()

    def _reset(self) -> None:
        self._sum: Tensor | None = None  # (D,) float64 running sums
        self._sumsq: Tensor | None = None  # (D,) float64 running sums of squares
        self._count = self.stream_batches = 0
        self.mean_: Tensor | None = None  # (D,) fp32, set when frozen
        self.scale_: Tensor | None = None  # (D,) fp32

    @property
    def frozen(self) -> bool:
        return self.mean_ is not None

    def partial_fit(self, x: Tensor) -> Standardizer:
        """Accumulate a batch (..., D); freeze when the warmup is complete. No-op once frozen."""
        if self.frozen:
            return self
        self._accumulate(x)
        self.stream_batches += 1
        if self.warmup_tokens is not None:
            done = self._count >= self.warmup_tokens
        else:
            done = self.stream_batches >= self.warmup_batches
        return self.freeze() if done else self

    def fit(self, x: Tensor, chunk: int = 65536) -> Standardizer:
        """Estimate on all of ``x`` (M, D) (in-memory data, no warmup limit) and freeze."""
        self._reset()
        for part in x.split(chunk):
            self._accumulate(part)
        return self.freeze()

    def _accumulate(self, x: Tensor) -> None:
        # float64 (float32 on MPS, which has no float64 kernels: ``accumulate_dtype``)
        x64 = x.reshape(-1, x.shape[-1]).to(accumulate_dtype(x.device))
        if self._sum is None:
            self._sum, self._sumsq = x64.new_zeros(x64.shape[1]), x64.new_zeros(x64.shape[1])
        self._sum += x64.sum(0)
        self._sumsq += x64.square().sum(0)
        self._count += x64.shape[0]

    def freeze(self) -> Standardizer:
        """Freeze from the accumulated moments, summed over ranks under torch.distributed."""
        if self._sum is None:
            raise ValueError(
                "no labelled training token reached the probes (their standardisers saw no "
                "data): every sample of the warm-up batches was skipped (see --on-bad-sample "
                "and the skipped files logged above), or every pixel is ignore (255) or too few "
                "pixels per token are labelled for data.min_valid. Check the masks, lower "
                "data.min_valid, or raise probe.warmup_batches; then run the same command again"
            )
        n = self._sum.new_tensor(float(self._count))
        return self.set_moments(*all_reduce_sum([self._sum, self._sumsq, n]))

    def set_moments(
        self, s: Tensor, ss: Tensor, n: Tensor | float, shift: Tensor | None = None
    ) -> Standardizer:
        """Freeze from feature sums ``s`` (D,), sums of squares ``ss`` (D,) and count ``n``,
        of features shifted by ``shift`` (D,) if given (the spread is shift-free, the mean is
        the shifted mean plus the shift)."""
        mean = s / n
        std = (ss / n - mean.square()).clamp_min(0).sqrt()
        if shift is not None:
            mean = mean + shift.to(mean)
        self.mean_, self.scale_ = mean.float(), torch.where(std < self.eps, 1.0, std).float()
        return self

    def transform(self, x: Tensor) -> Tensor:
        """(..., D) any float dtype -> (..., D) fp32 standardised."""
        if not self.frozen:
            raise ValueError("the standardiser is not frozen yet: feed its warmup batches first")
        return (x.float() - self.mean_) / self.scale_

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of the running sums and frozen moments (flat names, safetensors-ready)."""
        sd = {"count": torch.tensor(self._count), "batches": torch.tensor(self.stream_batches)}
        for key in ("_sum", "_sumsq", "mean_", "scale_"):
            if getattr(self, key) is not None:
                sd[key.strip("_")] = getattr(self, key).clone()
        return sd

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Restore from ``state_dict()``."""
        self._count, self.stream_batches = int(sd["count"]), int(sd["batches"])
        self._sum, self._sumsq = sd.get("sum"), sd.get("sumsq")
        self.mean_, self.scale_ = sd.get("mean"), sd.get("scale")
