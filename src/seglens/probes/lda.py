"""Solver ``lda``: closed-form shrunk LDA from streamed sufficient statistics.

Each batch only adds to sums (counts, class sums, scatter), so the fit depends on neither batch
order nor sharding beyond round-off, and statistics from several processes or probes simply add
(``merge``, an all_reduce at ``finalize``). The default path forms the scatter of features
shifted by one per-stage shift that every rank shares with float32 GEMMs and accumulates in
float64; ``exact`` keeps float64 products of raw features (bitwise equal across process counts).
The symmetric scatter is accumulated on its upper block triangle only (about half the flops);
``finalize`` mirrors it and solves once by Cholesky.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from seglens.probes._common import (
    GEMMS,
    Tensor,
    accumulate_dtype,
    all_reduce_sum,
    matmul,
    prefixed,
    unprefixed,
)
from seglens.probes.base import _Probe

_BLOCK = 256  # rows of the scatter per GEMM of its upper block triangle
_FLUSH_ROWS = 8192  # default path: float32 scatter rows summed before adding into float64


class LDAProbe(_Probe):
    """Solver ``lda``: shrunk pooled-covariance LDA from streamed float64 sufficient statistics.

    ``partial_fit`` accumulates, on the features' device, the token count n, the feature sum,
    per-class weights n_c and feature sums, and the scatter sum x x^T of valid tokens. Raw
    second moments in float32 would lose the covariance to cancellation (S/n - mean mean^T)
    where features have a mean large against their spread, as LLM hidden states do (massive
    activations). So by default every statistic is of *shifted* features x - s, with s (D,) the
    mean of the first batch (all ranks' first batches: one all_reduce, so every rank shares it),
    which leaves only the spread: float32 GEMMs then keep ~1e-6 relative accuracy, and the
    float32 scatter is added into the float64 sum every ``_FLUSH_ROWS`` rows. With ``exact``
    they are float64 products of raw features, bitwise independent of how tokens are batched
    and sharded (1/32-1/64 speed on most GPUs).
    The scatter is symmetric, so a batch adds x^T x only to S's blocks of ``_BLOCK`` rows on and
    right of the diagonal (S[i:i+b, i:]; below them S stays 0): about half the flops of the full
    product, which dominates a batch at LLM width. The sums add up across batches and processes
    (``merge``; an all_reduce at ``finalize`` under torch.distributed). ``finalize`` mirrors S's
    upper triangle, standardises with the full-pass mean/std (free from the same sums, so the
    result depends on neither batch order nor sharding), forms
    Σ = (S - Σ_c n_c μ_c μ_c^T) / (n - C_present), shrinks it toward tr(Σ)/D · I, and solves
    W = Σ^-1 μ_c by Cholesky, b_c = -½ μ_c^T Σ^-1 μ_c + log(n_c / n). Unseen classes get bias
    -inf and are never predicted. With soft labels a token's class sums are split by its
    normalised histogram (fractional membership; the within-class scatter stays PSD).
    Ledoit-Wolf 'auto' shrinkage needs fourth moments that do not stream, so it is not offered.

    Args:
        n_classes: C.
        shrinkage: α in [0, 1]: Σ <- (1 - α) Σ + α tr(Σ)/D · I (scikit-learn's convention).
        exact: float64 products of raw features (see above).
        gemm: ``float32``, ``tf32`` or ``bfloat16``: the GEMMs' precision when not ``exact``.
        soft_labels, class_names, name: as ``LinearProbe``.
    """

    solver = "lda"

    def __init__(
        self,
        n_classes: int,
        *,
        shrinkage: float = 0.1,
        exact: bool = False,
        gemm: str = "float32",
        soft_labels: bool = False,
        class_names: Sequence[str] | None = None,
        name: str | None = None,
    ):
        super().__init__(n_classes, soft_labels=soft_labels, class_names=class_names, name=name)
        if isinstance(shrinkage, str) or not 0.0 <= shrinkage <= 1.0:
            raise ValueError(
                f"shrinkage must be a float in [0, 1], got {shrinkage!r} ('auto' Ledoit-Wolf "
                "needs fourth moments that cannot be streamed)"
            )
        if gemm not in GEMMS or (exact and gemm != "float32"):
            raise ValueError(
                f"gemm must be one of {GEMMS} (float32 with exact=True), got {gemm!r} with "
                f"exact={exact}"
            )
        self.shrinkage, self.exact, self.gemm = float(shrinkage), bool(exact), gemm
        # n (), xsum (D,), count (C,), csum (C, D), S (D, D) upper block triangle (``_update``);
        # default path also: shift (D,) float32, S32 (D, D) float32 pending rows, pending ()
        self._stats: dict[str, Tensor] = {}
        self._lda: tuple[Tensor, Tensor] | None = None  # solved (coef (D, C), intercept (C,))

    def _update(self, x: Tensor, T: Tensor, valid: Tensor) -> None:
        self._fitted, self._conf, self._lda = None, None, None
        if self.exact:
            self._update_exact(x, T, valid)
            return
        s, D, C = self._stats, x.shape[1], self.n_classes
        if not s:
            acc = accumulate_dtype(x.device)
            # The shift: the mean of every rank's first batch (all rows; it needs only to be
            # near the data), the same on every rank.
            first = all_reduce_sum([x.float().sum(0), x.new_tensor(float(x.shape[0]), dtype=acc)])
            s["shift"] = (first[0] / first[1].float()).float()
            s.update(n=x.new_zeros((), dtype=acc), xsum=x.new_zeros(D, dtype=acc))
            s.update(count=x.new_zeros(C, dtype=acc), csum=x.new_zeros(C, D, dtype=acc))
            s.update(S=x.new_zeros(D, D, dtype=acc), S32=x.new_zeros(D, D, dtype=torch.float32))
            s["pending"] = torch.zeros((), dtype=torch.int64)  # on the host: read without sync
        xs = (x.float() - s["shift"]).mul_(valid[:, None])  # (M, D), zero rows for ignored
        acc = s["n"].dtype
        s["n"] += valid.sum()
        s["xsum"] += xs.sum(0, dtype=acc)
        s["count"] += T.sum(0, dtype=acc)
        s["csum"] += matmul(T.T.contiguous(), xs, self.gemm)
        for i in range(0, D, _BLOCK):  # S32[i:i+b, i:] += xs[:, i:i+b]^T xs[:, i:]
            block = s["S32"][i : i + _BLOCK, i:]
            if self.gemm == "float32" and x.device.type != "cuda":
                block.addmm_(xs[:, i : i + _BLOCK].T, xs[:, i:])
            else:
                block += matmul(xs[:, i : i + _BLOCK].T, xs[:, i:], self.gemm)
        s["pending"] += x.shape[0]
        if int(s["pending"]) >= _FLUSH_ROWS:
            self._flush()

    def _update_exact(self, x: Tensor, T: Tensor, valid: Tensor) -> None:
        x64 = x.double() * valid[:, None]  # zero rows for ignored tokens: masking without a sync
        T64, s = T.double(), self._stats
        if not s:
            D, C = x.shape[1], self.n_classes
            s.update(n=x64.new_zeros(()), xsum=x64.new_zeros(D), count=x64.new_zeros(C))
            s.update(csum=x64.new_zeros(C, D), S=x64.new_zeros(D, D))
        s["n"] += valid.sum()
        s["xsum"] += x64.sum(0)
        s["count"] += T64.sum(0)
        s["csum"].addmm_(T64.T, x64)
        for i in range(0, x64.shape[1], _BLOCK):  # S[i:i+b, i:] += x[:, i:i+b]^T x[:, i:]
            s["S"][i : i + _BLOCK, i:].addmm_(x64[:, i : i + _BLOCK].T, x64[:, i:])

    def _flush(self) -> None:
        """Add the pending float32 scatter into the float64 one."""
        s = self._stats
        if "S32" in s and int(s["pending"]):
            s["S"] += s["S32"]
            s["S32"].zero_()
            s["pending"].zero_()

    def _reshift(self, shift: Tensor) -> None:
        """Re-express the statistics around another shift (exactly, in the accumulation dtype):
        with d = old - new, x - new = (x - old) + d."""
        self._flush()
        s = self._stats
        old = s.get("shift", torch.zeros_like(shift))
        d = (old.to(s["S"].dtype) - shift.to(s["S"].dtype)).to(s["S"])
        S = s["S"].triu() + s["S"].triu(1).T
        S += torch.outer(d, s["xsum"]) + torch.outer(s["xsum"], d) + s["n"] * torch.outer(d, d)
        s["csum"] += s["count"][:, None] * d
        s["xsum"] += s["n"] * d
        s["S"], s["shift"] = S, shift.clone()
        if "S32" not in s:
            s["S32"] = torch.zeros_like(S, dtype=torch.float32)
            s["pending"] = torch.zeros((), dtype=torch.int64)

    def merge(self, other: LDAProbe) -> LDAProbe:
        """Add another probe's statistics (same C and D) into this one; returns self."""
        if other.n_classes != self.n_classes or self.n_features_in_ not in (
            None,
            other.n_features_in_,
        ):
            raise ValueError(f"{self.name}: cannot merge probes with different C or D")
        if not self._stats:
            self._stats = {k: v.clone() for k, v in other._stats.items()}
        elif other._stats:
            theirs = LDAProbe(self.n_classes, name=other.name)
            theirs._stats = {k: v.clone() for k, v in other._stats.items()}
            if "shift" in self._stats:  # theirs around my shift (a no-op shift if they match)
                theirs._reshift(self._stats["shift"])
            elif "shift" in theirs._stats:  # my raw (exact) statistics around their shift
                self._reshift(theirs._stats["shift"])
                theirs._flush()
            self._flush()
            for k in ("n", "xsum", "count", "csum", "S"):
                self._stats[k] = self._stats[k] + theirs._stats[k].to(self._stats[k])
        self.n_features_in_ = self.n_features_in_ or other.n_features_in_
        self._fitted, self._lda = None, None
        return self

    def finalize(self) -> LDAProbe:
        """Solve from the (all-reduced) statistics and select; sets ``coef_``, ``mean_``..."""
        if self._lda is None:
            self._solve()
        return self.select()

    def _solve(self) -> None:
        if not self._stats:
            raise ValueError(f"{self.name}: no training tokens seen; call partial_fit first")
        keys = ("n", "xsum", "count", "csum", "S")
        stats = dict(self._stats)
        if "S32" in stats:  # the pending float32 rows, without flushing (state stays as it was)
            stats["S"] = stats["S"] + stats["S32"]
        n, xsum, count, csum, S = all_reduce_sum([stats[k] for k in keys])
        S = S.triu() + S.triu(1).T  # the full scatter from its upper triangle
        shift = stats.get("shift")  # moments of shifted features: the raw mean minus shift
        self.standardizer.set_moments(xsum, S.diagonal(), n, shift)
        m, sd = self.mean_.double(), self.scale_.double()  # exactly what transform() will use
        if shift is not None:
            m = m - shift.to(m)  # the class means below are of shifted features
        present = count > 0
        n_present = int(present.sum())
        if float(n) <= n_present:
            raise ValueError(f"{self.name}: {float(n)} tokens for {n_present} classes: too few")
        cs, cnt = csum[present], count[present]
        Sw = S - (cs.T / cnt) @ cs  # within-class scatter of raw features (shift-invariant)
        sigma = Sw / (n - n_present) / (sd[:, None] * sd[None, :])
        sigma = 0.5 * (sigma + sigma.T)
        D = sigma.shape[0]
        eye = torch.eye(D, dtype=sigma.dtype, device=sigma.device)
        sigma = (1 - self.shrinkage) * sigma + self.shrinkage * sigma.trace() / D * eye
        L, info = torch.linalg.cholesky_ex(sigma)
        if int(info) != 0:
            raise ValueError(
                f"{self.name}: pooled covariance is singular (shrinkage={self.shrinkage}); "
                "use shrinkage > 0"
            )
        mu = (cs / cnt[:, None] - m) / sd  # (C_present, D) standardised class means (shifts cancel)
        W = torch.cholesky_solve(mu.T, L)  # (D, C_present)
        coef = W.new_zeros(D, self.n_classes)
        coef[:, present] = W
        intercept = torch.full_like(count, -math.inf)
        intercept[present] = -0.5 * (mu * W.T).sum(1) + torch.log(cnt / count.sum())
        self._lda = (coef.float(), intercept.float())

    def _candidate_weights(self, k: int) -> tuple[Tensor, Tensor]:
        if self._lda is None:
            self._solve()
        return self._lda

    def _candidate_logits(self, x: Tensor) -> Tensor:
        coef, intercept = self._weights()
        return (self.standardizer.transform(x) @ coef + intercept)[:, None, :]

    def _hyperparameters(self) -> dict:
        keys = ("shrinkage", "soft_labels", "exact", "gemm")
        return {k: getattr(self, k) for k in keys}

    def _fit_info(self) -> dict:
        if not self._stats:
            return {}
        counts = self._stats["count"].tolist()
        return {"n_train_tokens": float(self._stats["n"]), "class_counts": counts}

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of all running state: standardiser, validation confusion, statistics."""
        stats = {k: v.clone() for k, v in self._stats.items()}
        return super().state_dict() | prefixed("stats.", stats)

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Restore from ``state_dict()``; the solve is redone from the statistics.

        Only S's upper triangle is read, so checkpoints holding the full symmetric scatter (from
        before the block triangle) load as they are.
        """
        super().load_state_dict(sd)
        self._stats = {k: v.clone() for k, v in unprefixed("stats.", sd).items()}
        self._lda = None
        if self._stats:
            self.n_features_in_ = self._stats["xsum"].shape[0]
            if not self.exact and "shift" not in self._stats:  # raw (exact or older) statistics
                self._reshift((self._stats["xsum"] / self._stats["n"].clamp_min(1)).float())
            elif self.exact and "shift" in self._stats:
                raise ValueError(
                    f"{self.name}: the checkpoint holds shifted float32-path statistics; "
                    "resume it with probe.exact=false"
                )
