"""Solver ``lda``: closed-form shrunk LDA from streamed float64 sufficient statistics.

Each batch only adds to sums (counts, class sums, scatter), so the fit depends on neither batch
order nor sharding, and statistics from several processes or probes simply add (``merge``, an
all_reduce at ``finalize``). The symmetric scatter is accumulated on its upper block triangle
only (about half the flops); ``finalize`` mirrors it and solves once by Cholesky.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from seglens.probes._common import Tensor, all_reduce_sum, prefixed, unprefixed
from seglens.probes.base import _Probe

_BLOCK = 256  # rows of the scatter per GEMM of its upper block triangle


class LDAProbe(_Probe):
    """Solver ``lda``: shrunk pooled-covariance LDA from streamed float64 sufficient statistics.

    ``partial_fit`` accumulates, on the features' device, the token count n, the feature sum,
    per-class weights n_c and feature sums, and the scatter sum x x^T, all of *raw* features and
    valid tokens only, all in float64. Raw second moments in float32 would lose the covariance
    to cancellation (S/n - mean mean^T) where features have a mean large against their spread,
    as LLM hidden states do (massive activations); float32 products of shifted features keep
    ~1e-6 accuracy but make the fit depend on how tokens are batched and sharded at that level.
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
        soft_labels, class_names, name: as ``LinearProbe``.
    """

    solver = "lda"

    def __init__(
        self,
        n_classes: int,
        *,
        shrinkage: float = 0.1,
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
        self.shrinkage = float(shrinkage)
        # n (), xsum (D,), count (C,), csum (C, D), S (D, D) upper block triangle (``_update``)
        self._stats: dict[str, Tensor] = {}
        self._lda: tuple[Tensor, Tensor] | None = None  # solved (coef (D, C), intercept (C,))

    def _update(self, x: Tensor, T: Tensor, valid: Tensor) -> None:
        self._fitted, self._conf, self._lda = None, None, None
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

    def merge(self, other: LDAProbe) -> LDAProbe:
        """Add another probe's statistics (same C and D) into this one; returns self."""
        if other.n_classes != self.n_classes or self.n_features_in_ not in (
            None,
            other.n_features_in_,
        ):
            raise ValueError(f"{self.name}: cannot merge probes with different C or D")
        for k, v in other._stats.items():
            self._stats[k] = (
                self._stats[k] + v.to(self._stats[k]) if k in self._stats else v.clone()
            )
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
        n, xsum, count, csum, S = all_reduce_sum([self._stats[k] for k in keys])
        S = S.triu() + S.triu(1).T  # the full scatter from its upper triangle
        self.standardizer.set_moments(xsum, S.diagonal(), n)
        m, sd = self.mean_.double(), self.scale_.double()  # exactly what transform() will use
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
        mu = (cs / cnt[:, None] - m) / sd  # (C_present, D) standardised class means
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
        return {"shrinkage": self.shrinkage, "soft_labels": self.soft_labels}

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
