"""Early stopping of the sgd probes on held-out loss, and the record of whether they converged.

At every check (after every epoch, or every ``probe.eval_every`` training batches, so that one
pass can converge) the K learning-rate candidates are scored on held-out *training* tokens
(cross-entropy, mean over valid tokens). Each candidate keeps a copy of its weights at its lowest
held-out loss; a probe stops once no candidate *in contention* has improved its own best loss by
more than ``min_delta`` (relative) for ``patience`` checks, and it then counts as converged, at
the optimiser step of that check. A candidate is in contention while, at the rate its best loss
fell over the last ``patience`` checks, it would reach the lowest loss of any candidate within
``patience`` more checks; the leader always is. (Judging only the lowest loss would stop a probe
whose large lr led early and then levelled off while a smaller lr was still improving and about
to overtake; waiting for every candidate would train on for a small lr that improves slowly far
behind the leader and cannot catch up.)
A probe that reaches the epoch limit still improving has not converged: it measures its
optimiser, not the representation, and the report says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from seglens.probes._common import Tensor, all_reduce_sum

log = logging.getLogger(__name__)


class EarlyStopping:
    """Held-out loss trace, best-epoch snapshots and the stopping rule of one sgd probe.

    Args:
        patience: checks without improvement before the probe stops (>= 1).
        min_delta: relative improvement of the best held-out loss that counts (>= 0).
    """

    def __init__(self, patience: int = 2, min_delta: float = 0.005):
        if patience < 1 or not min_delta >= 0:
            raise ValueError(f"need patience >= 1 and min_delta >= 0, got {patience}, {min_delta}")
        self.patience, self.min_delta = patience, float(min_delta)
        self.trace: list[list[float]] = []  # per check: (K,) mean held-out loss
        self.steps: list[int] = []  # per check: optimiser steps taken before it
        self.check_epochs: list[int] = []  # per check: the epoch (0-based) it closed part of
        self.stopped = False
        self.closed = 0  # checks closed by the trainer (recorded or, once stopped, ignored)
        self.since_best = 0  # checks since a candidate in contention last improved
        self.overall_best = math.inf
        self.since_k: Tensor | None = None  # (K,) checks since each candidate last improved
        self.best_k: Tensor | None = None  # (K,) each candidate's best loss (float64)
        self.best: dict[str, Tensor] = {}  # W (D, K, C), b (K, C), loss (K,), epoch (K,), conf
        self._sum: Tensor | None = None  # (K,) float64 summed held-out loss of this epoch
        self._count: Tensor | None = None  # () int64 valid held-out tokens of this epoch

    @property
    def epochs(self) -> int:
        """Checks whose held-out loss was recorded (one per epoch without ``eval_every``)."""
        return len(self.trace)

    def accumulate(self, logits: Tensor, y: Tensor, valid: Tensor) -> None:
        """Add held-out tokens: (M, K, C) logits of the K candidates, (M,) labels, (M,) valid."""
        logp = logits.double().log_softmax(-1)
        picked = logp.gather(
            -1, y.masked_fill(~valid, 0)[:, None, None].expand(-1, logp.shape[1], 1)
        )
        loss = -(picked.squeeze(-1) * valid[:, None]).sum(0)  # (K,)
        n = valid.sum()
        self._sum = loss if self._sum is None else self._sum + loss
        self._count = n if self._count is None else self._count + n

    def end_epoch(
        self,
        W: Tensor,
        b: Tensor,
        conf: Tensor | None,
        name: str = "probe",
        step: int | None = None,
        epoch: int | None = None,
    ) -> None:
        """Close a check: record the mean held-out loss (summed over ranks), the optimiser
        ``step`` and the ``epoch`` (0-based) it falls in, keep improved candidates' weights
        (and their local validation confusion), apply the stopping rule."""
        if self._sum is None:
            raise ValueError(
                f"{name}: no held-out tokens were scored this epoch; early stopping needs a "
                "holdout (probe.holdout_fraction > 0)"
            )
        total, count = all_reduce_sum([self._sum, self._count])
        self._sum = self._count = None
        if int(count) == 0:
            raise ValueError(f"{name}: the holdout has no labelled token to score the loss on")
        mean = (total / count).cpu()
        check = self.epochs
        self.trace.append(mean.tolist())
        self.steps.append(-1 if step is None else int(step))
        self.check_epochs.append(check if epoch is None else int(epoch))
        if not self.best:
            K = mean.shape[0]
            self.best = {"W": W.clone(), "b": b.clone(), "loss": torch.full((K,), math.inf)}
            self.best["epoch"] = torch.zeros(K, dtype=torch.int64)
            if conf is not None:
                self.best["conf"] = conf.clone()
        better = mean < self.best["loss"]
        if better.any():
            k = better.nonzero().flatten().to(W.device)
            self.best["W"][:, k] = W[:, k]
            self.best["b"][k] = b[k]
            if conf is not None:
                self.best["conf"][k] = conf[k]
            self.best["loss"] = torch.where(better, mean, self.best["loss"])
            self.best["epoch"] = torch.where(better, check, self.best["epoch"])  # check index
        lowest = float(mean.min())
        m64 = mean.double()
        if self.best_k is None:  # the first check always improves
            self.best_k = torch.full_like(m64, math.inf)
            self.since_k = torch.zeros(m64.shape[0], dtype=torch.int64)
        improved = torch.isinf(self.best_k) | (m64 < self.best_k * (1 - self.min_delta))
        self.since_k = torch.where(improved, 0, self.since_k + 1)
        self.best_k = torch.minimum(self.best_k, m64)
        self.overall_best = min(self.overall_best, lowest)
        self.since_best = int(self.since_k[self._in_contention()].min())
        if self.since_best >= self.patience:
            self.stopped = True
            log.debug("%s: stopped at check %d (held-out loss %.5f)", name, check + 1, lowest)

    def _in_contention(self) -> Tensor:
        """(K,) bool: candidates that, falling at the rate their best loss fell over the last
        ``patience`` checks, would reach the lowest loss within ``patience`` more checks."""
        p = min(self.patience, len(self.trace) - 1)
        if p == 0:
            return torch.ones_like(self.best_k, dtype=torch.bool)
        then = torch.tensor(self.trace[:-p], dtype=torch.float64).min(0).values  # best_k p ago
        rate = (then - self.best_k) / p  # (K,) >= 0
        gap = self.best_k - self.best_k.min()
        return gap <= self.patience * rate

    def selected(self) -> int:
        """The candidate with the lowest held-out loss (the first on ties)."""
        return int(torch.argmin(self.best["loss"]))

    def summary(self, lrs: Sequence[float], k: int, max_epochs: int | None) -> dict:
        """Plain-JSON record: converged, epochs (begun), checks, the best check's epoch and
        optimiser step, the step at which the probe stopped (None while still improving), the
        step of every check, the selected lr's loss trace, all candidates' traces, and whether
        the selected lr sits at the edge of the grid."""
        best = int(self.best["epoch"][k]) if self.best else None
        steps = [None if s < 0 else s for s in self.steps]
        return {
            "early_stopping": True,
            "converged": bool(self.stopped),
            "epochs": max(self.check_epochs) + 1 if self.check_epochs else self.epochs,
            "max_epochs": max_epochs,
            "checks": self.epochs,
            "best_epoch": None if best is None else self.check_epochs[best] + 1,
            "best_check": None if best is None else best + 1,
            "best_step": None if best is None else steps[best],
            "stopped_at_step": steps[-1] if self.stopped and steps else None,
            "steps": steps,
            "val_loss": [row[k] for row in self.trace],
            "val_loss_by_lr": {
                repr(float(lr)): [row[i] for row in self.trace] for i, lr in enumerate(lrs)
            },
            "lr_at_grid_edge": lr_at_edge(k, len(lrs)),
        }

    def state_dict(self) -> dict[str, Tensor]:
        sd = {f"best.{k}": v.clone() for k, v in self.best.items()}
        K = len(self.trace[0]) if self.trace else 0
        sd["trace"] = torch.tensor(self.trace, dtype=torch.float64).reshape(len(self.trace), K)
        sd["flags"] = torch.tensor([int(self.stopped), self.since_best, self.closed])
        sd["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        sd["check_epochs"] = torch.tensor(self.check_epochs, dtype=torch.int64)
        sd["overall_best"] = torch.tensor(self.overall_best, dtype=torch.float64)
        if self.best_k is not None:
            sd["best_k"], sd["since_k"] = self.best_k.clone(), self.since_k.clone()
        for key, value in (("sum", self._sum), ("count", self._count)):
            if value is not None:
                sd[key] = value.clone()
        return sd

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        self.best = {k[5:]: v.clone() for k, v in sd.items() if k.startswith("best.")}
        self.trace = sd["trace"].tolist()
        n = len(self.trace)  # checkpoints from before the in-pass checks: one check per epoch
        self.steps = sd["steps"].tolist() if "steps" in sd else [-1] * n
        self.check_epochs = sd["check_epochs"].tolist() if "check_epochs" in sd else list(range(n))
        self.stopped, self.since_best = bool(sd["flags"][0]), int(sd["flags"][1])
        self.closed = int(sd["flags"][2])
        self.overall_best = float(sd["overall_best"])
        self.best_k = sd["best_k"].clone() if "best_k" in sd else None
        self.since_k = sd["since_k"].clone() if "since_k" in sd else None
        if self.best_k is None and self.trace:  # older checkpoints: rebuilt from the trace
            trace = torch.tensor(self.trace, dtype=torch.float64)
            self.best_k = trace.min(0).values
            self.since_k = torch.full((trace.shape[1],), self.since_best, dtype=torch.int64)
        self._sum = sd["sum"].clone() if "sum" in sd else None
        self._count = sd["count"].clone() if "count" in sd else None


def lr_at_edge(k: int, n_candidates: int) -> bool:
    """Whether candidate k is the first or the last of a grid of more than one learning rate."""
    return n_candidates > 1 and k in (0, n_candidates - 1)


def convergence_warnings(records: Mapping[str, Mapping], lrs: Sequence[float]) -> list[str]:
    """Messages for the stages whose probe did not converge or chose an lr at the grid's edge.

    Args:
        records: {stage: ``LinearProbe.convergence()`` or ``ProbeBank.convergence()`` entry}.
        lrs: the learning-rate grid.
    """
    out = []
    late = [s for s, r in records.items() if r.get("converged") is False]
    if late:
        epochs = max(r.get("epochs") or 0 for s, r in records.items() if s in late)
        checks = max(r.get("checks") or 0 for s, r in records.items() if s in late)
        out.append(
            f"sgd probes of {', '.join(late)} did not converge in {epochs} epochs ({checks} "
            "held-out checks; held-out loss still improving): their scores measure the "
            "optimiser; raise probe.epochs, check within the pass with probe.eval_every, or use "
            "probe.solver=lda"
        )
    edge = [s for s, r in records.items() if r.get("lr_at_grid_edge")]
    if edge:
        out.append(
            f"the selected learning rate of {', '.join(edge)} is at the edge of probe.lrs="
            f"{list(lrs)}: the best rate may lie outside the grid; extend it"
        )
    return out
