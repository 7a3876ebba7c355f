"""Solver ``sgd``: streamed softmax regression with K learning rates trained side by side.

The K candidates share one (D, K, C) weight tensor, so a batch costs two GEMMs whatever K is;
AdamW is written out by hand because ``torch.optim.AdamW`` cannot give slices of one tensor
different learning rates. The best rate is picked on held-out training tokens (``base``); with
``early_stopping`` the held-out loss is scored after every epoch and the probe stops on it
(``convergence``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from seglens.data.base import IGNORE_INDEX
from seglens.distributed import world
from seglens.probes._common import (
    GEMMS,
    UNIT_ROUNDOFF,
    Tensor,
    all_reduce_sum,
    confusion,
    matmul,
    miou,
    prefixed,
    unprefixed,
)
from seglens.probes.base import _Probe
from seglens.probes.convergence import EarlyStopping, lr_at_edge
from seglens.probes.standardize import Standardizer

#: The noise floor in AdamW's denominator (default path): floor = c * |z_d| |G_kc| / n with
#: c = NOISE_FLOOR * 2^-24 (float32 accumulation: its rounding error is at most ~2^-24 |z| |G|)
#: + INPUT_ROUNDING * u / sqrt(n) (tf32 and bf16 round the GEMM's inputs to u = 2^-11, 2^-8: a
#: random error of ~u |z| |G| / sqrt(n)). A gradient element whose cosine between feature d and
#: error column kc is below c (6e-5 in float32) is noise, e.g. an absent class whose terms
#: cancel: it takes steps << lr instead of +-lr. NOISE_FLOOR = 1024 keeps 1 vs 2 processes
#: within 1e-4 mIoU (16 did not: 1e-2, tests/test_distributed.py).
NOISE_FLOOR = 1024.0
INPUT_ROUNDING = 8.0


def pack_gradients(grads: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """Several probes' ``_gradients`` -> one flat buffer (one all_reduce for all of them)."""
    return torch.cat([g[k].reshape(-1).to(g["W"].dtype) for g in grads for k in sorted(g)])


def unpack_gradients(flat: Tensor, like: Sequence[Mapping[str, Tensor]]) -> list[dict]:
    """``pack_gradients``'s inverse: views of ``flat`` shaped and typed as ``like``."""
    out, i = [], 0
    for g in like:
        part = {}
        for k in sorted(g):
            n = g[k].numel()
            part[k] = flat[i : i + n].view(g[k].shape).to(g[k].dtype)
            i += n
        out.append(part)
    return out


class LinearProbe(_Probe):
    """Solver ``sgd``: softmax regression (cross-entropy, AdamW), K learning rates side by side.

    The K candidates are one parameter tensor laid out (D, K, C), the transpose of the
    conceptual (K, D, C): the logits of all K come from one GEMM (M, D) x (D, K*C) and the weight
    gradient from one GEMM (D, M) x (M, K*C), without copying features or weights. Gradients are
    closed form ((softmax - target) / n_valid: autograd would only add overhead) and AdamW is
    written out in a few vectorised lines with a (K,) lr tensor: torch.optim.AdamW cannot give
    slices of one tensor different lrs, and K param groups would need K tensors and K GEMMs.
    Weight decay applies to the weights, not the bias; weights start at zero. The first
    ``warmup_batches`` batches only estimate the standardiser and are not trained on (``fit``
    estimates it on all of X instead). Under torch.distributed, gradients are averaged over
    ranks before each step (``sync_gradients``: summed per-token gradients over the summed
    valid-token count, so a step equals one process's on the union of the ranks' batches) and
    the standardiser sums are all-reduced.

    Args:
        n_classes: C.
        lrs: learning rates trained side by side; pick one with ``validate`` then ``select``.
        weight_decay: decoupled (AdamW) weight decay.
        betas, eps: AdamW constants.
        warmup_batches, warmup_tokens: standardiser warmup (see ``Standardizer``).
        epochs, batch_size, seed, validation_fraction: used by ``fit`` only (in-memory data).
        soft_labels: train on per-token class histograms instead of hard labels.
        early_stopping: score the held-out loss after every epoch (``end_epoch``), stop once it
            stops improving, keep each candidate's best-epoch weights and select the candidate
            with the lowest held-out loss (without it: the best validation mIoU after training).
        patience, min_delta: the stopping rule (see ``EarlyStopping``).
        exact: float64 gradient GEMM (bitwise equal across batch splits and process counts,
            1/32-1/64 speed on most GPUs). Default: float32 GEMMs (``gemm``) with a noise floor
            (``NOISE_FLOOR``) in AdamW's denominator, so rounding noise in gradients that cancel
            (absent classes) does not become lr-sized steps.
        gemm: ``float32``, ``tf32`` or ``bfloat16``: the GEMMs' precision when not ``exact``.
        class_names, name: metadata (the name appears in errors).
    """

    solver = "sgd"
    sync_gradients = True

    def __init__(
        self,
        n_classes: int,
        *,
        lrs: Sequence[float] = (1e-3, 1e-2, 1e-1),
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_batches: int = 4,
        warmup_tokens: int | None = None,
        epochs: int = 1,
        batch_size: int = 4096,
        seed: int = 0,
        validation_fraction: float = 0.1,
        soft_labels: bool = False,
        early_stopping: bool = False,
        patience: int = 2,
        min_delta: float = 0.005,
        exact: bool = False,
        gemm: str = "float32",
        class_names: Sequence[str] | None = None,
        name: str | None = None,
    ):
        super().__init__(n_classes, soft_labels=soft_labels, class_names=class_names, name=name)
        if not lrs or any(not lr > 0 for lr in lrs):
            raise ValueError(f"lrs must be a non-empty sequence of positive floats, got {lrs}")
        if weight_decay < 0 or epochs < 1 or batch_size < 1 or not 0 < validation_fraction < 1:
            raise ValueError(
                "need weight_decay >= 0, epochs >= 1, batch_size >= 1, 0 < validation_fraction "
                f"< 1; got {weight_decay}, {epochs}, {batch_size}, {validation_fraction}"
            )
        if gemm not in GEMMS or (exact and gemm != "float32"):
            raise ValueError(
                f"gemm must be one of {GEMMS} (float32 with exact=True), got {gemm!r} with "
                f"exact={exact}"
            )
        self.exact, self.gemm = bool(exact), gemm
        self.lrs = tuple(float(lr) for lr in lrs)
        self.weight_decay, self.betas, self.eps = float(weight_decay), tuple(betas), float(eps)
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.validation_fraction = validation_fraction
        self.warmup_batches, self.warmup_tokens = warmup_batches, warmup_tokens
        self.standardizer = Standardizer(warmup_batches, warmup_tokens)
        self.early_stopping, self.patience, self.min_delta = early_stopping, patience, min_delta
        self.stopping = EarlyStopping(patience, min_delta) if early_stopping else None
        self._params: dict[str, Tensor] = {}  # W (D, K, C), b (K, C), AdamW moments m*, v*; lr
        self._step = 0

    @property
    def n_candidates(self) -> int:
        return len(self.lrs)

    @property
    def lr_(self) -> float:
        """The selected learning rate."""
        self._weights()
        return self.lrs[self._fitted[0]]

    def _prefit(self, x: Tensor) -> None:
        self.standardizer.fit(x)

    def _logits(self, z: Tensor) -> Tensor:
        """Standardised (M, D) -> (M, K, C) logits of all K candidates, in one GEMM."""
        p = self._params
        D, K, C = p["W"].shape
        if self.exact or (self.gemm == "float32" and z.device.type != "cuda"):
            return torch.addmm(p["b"].view(-1), z, p["W"].view(D, K * C)).view(-1, K, C)
        return matmul(z, p["W"].view(D, K * C), self.gemm).add_(p["b"].view(-1)).view(-1, K, C)

    @property
    def stopped(self) -> bool:
        """Early stopping has ended this probe's training (further batches are ignored)."""
        return self.stopping is not None and self.stopping.stopped

    def _update(self, x: Tensor, T: Tensor, valid: Tensor) -> None:
        grads = self._gradients(x, T, valid)
        if grads is None:
            return
        if self.sync_gradients and world() > 1:
            # Sum gradients and counts separately: the mean over ALL ranks' valid tokens, i.e.
            # one process's step on the union of the ranks' batches (not a mean of means).
            flat = all_reduce_sum([pack_gradients([grads])])[0]
            grads = unpack_gradients(flat, [grads])[0]
        self._apply(grads)

    def _gradients(self, x: Tensor, T: Tensor, valid: Tensor) -> dict[str, Tensor] | None:
        """This batch's summed per-token gradients, before any all_reduce: ``W`` (D, K, C),
        ``b`` (K, C), the valid-token count ``n`` and, on the default path, the column norms
        ``zz`` (D,) and ``gg`` (K*C,) (squared) that set the noise floor. None while the
        standardiser is still warming up or once the probe has stopped."""
        if not self.standardizer.frozen:
            self.standardizer.partial_fit(x)
            return None
        if self.stopped:
            return None
        self._fitted, self._conf = None, None  # new weights: old selection and scores are stale
        p = self._params
        if not p:
            D, K, C = x.shape[1], self.n_candidates, self.n_classes
            for key, shape in (("W", (D, K, C)), ("b", (K, C))):
                p[key] = x.new_zeros(shape, dtype=torch.float32)
                p["m" + key], p["v" + key] = torch.zeros_like(p[key]), torch.zeros_like(p[key])
            p["lr"] = torch.tensor(self.lrs, device=x.device)  # (K,), on device once
            p["n_tokens"] = x.new_zeros((), dtype=torch.int64)
        z = self.standardizer.transform(x)  # (M, D)
        D, K, C = p["W"].shape
        logits = self._logits(z)
        G = (logits.softmax(-1) - T[:, None, :]).mul_(valid.float()[:, None, None])  # (M, K, C)
        if self.exact:
            # float64: a class absent from a batch gets a gradient that cancels to rounding noise
            # (~1e-8 in float32), which AdamW would blow up to +-lr; in float64 the noise stays
            # ~1e-16, so the result does not depend on how tokens are split into batches or ranks.
            G = G.double()
            W = (z.double().T @ G.view(-1, K * C)).view(D, K, C)
            return {"W": W, "b": G.sum(0), "n": valid.sum().double()}
        G2 = G.view(-1, K * C)
        W = matmul(z.T, G2, self.gemm).view(D, K, C)
        # The bias sum and the norms are O(M (D + K C)): cheap next to the GEMMs.
        b = G.sum(0, dtype=torch.float64).float()
        zz, gg = z.square().sum(0), G2.square().sum(0)
        return {"W": W, "b": b, "n": valid.sum().float(), "zz": zz, "gg": gg}

    def _apply(self, grads: Mapping[str, Tensor]) -> None:
        """One AdamW step from summed gradients (over ranks too): the mean over valid tokens,
        as ignore_index does; with no valid token anywhere, no step (as one process)."""
        n = grads["n"]
        if world() > 1 and not n > 0:  # no rank had a valid token: one process would skip it
            return
        n1 = n.clamp_min(1)
        mean = {k: (grads[k] / n1).float() for k in ("W", "b")}
        floor = None
        if not self.exact:
            # A gradient element far below the rounding noise's scale (``NOISE_FLOOR``) is
            # noise, e.g. an absent class whose terms cancel. As AdamW's eps the floor turns
            # such noise into steps << lr instead of +-lr, continuously (no threshold to flip).
            n32 = n1.float()
            c = NOISE_FLOOR * UNIT_ROUNDOFF["float32"]
            if self.gemm != "float32":
                c = c + INPUT_ROUNDING * UNIT_ROUNDOFF[self.gemm] / n32.sqrt()
            D, K, C = mean["W"].shape
            scale = grads["zz"].sqrt()[:, None] * grads["gg"].sqrt()[None, :]
            floor = (scale * (c / n32)).view(D, K, C)
        self._adamw(mean, floor)
        self._params["n_tokens"] += n.long()  # over all ranks

    def _adamw(self, grads: Mapping[str, Tensor], floor: Tensor | None = None) -> None:
        """torch.optim.AdamW's update, with the (K,) lrs broadcast over the candidate axis;
        ``floor`` (D, K, C), if given, replaces eps for the weights where it is larger."""
        self._step += 1
        (b1, b2), p = self.betas, self._params
        bc1, bc2_sqrt = 1 - b1**self._step, math.sqrt(1 - b2**self._step)
        for key, lr in (("W", p["lr"].view(1, -1, 1)), ("b", p["lr"].view(-1, 1))):
            g, m, v, param = grads[key], p["m" + key], p["v" + key], p[key]
            if key == "W" and self.weight_decay:
                param.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            eps = self.eps if floor is None or key == "b" else floor.clamp_min(self.eps)
            param.sub_(m / (v.sqrt() / bc2_sqrt + eps) * (lr / bc1))

    # --- held-out loss, early stopping ----------------------------------------------------------
    def _validate(self, x: Tensor, y: Tensor) -> None:
        logits = self._candidate_logits(x)  # (M, K, C)
        conf = confusion(logits.argmax(-1), y, self.n_classes)  # (K, C, C)
        self._conf = conf if self._conf is None else self._conf + conf
        if self.stopping is not None:
            self.stopping.accumulate(logits, y, y != IGNORE_INDEX)

    def end_epoch(self, epoch: int | None = None) -> None:
        """Close an epoch of held-out scoring: ``end_check(epoch, epoch)``."""
        self.end_check(epoch, epoch)

    def end_check(self, check: int | None = None, epoch: int | None = None) -> None:
        """Close a held-out check (``validate`` on the holdout first): record the held-out
        loss, this probe's optimiser step and the ``epoch`` (0-based), and apply the stopping
        rule. A stopped probe ignores the call, and so does a resumed one for a ``check``
        (0-based, counted over all epochs) it had already closed."""
        if self.stopping is None:
            raise ValueError(f"{self.name}: end_epoch() needs early_stopping=True")
        if check is not None and check < self.stopping.closed:
            return
        self.stopping.closed += 1
        if self.stopping.stopped:
            self.stopping._sum = self.stopping._count = None
        else:
            p = self._trained()
            self.stopping.end_epoch(p["W"], p["b"], self._conf, self.name, self._step, epoch)
        self._conf = None

    def select(self) -> LinearProbe:
        """Without early stopping: the best validation mIoU (``_Probe.select``). With it: every
        candidate goes back to its lowest-held-out-loss weights and the lowest loss wins."""
        if self.stopping is None or not self.stopping.trace:
            return super().select()
        best, p = self.stopping.best, self._trained()
        p["W"].copy_(best["W"])
        p["b"].copy_(best["b"])
        self._conf = best.get("conf")
        if self._conf is not None:
            self.val_miou_ = miou(*all_reduce_sum([self._conf])).cpu()
        k = self.stopping.selected()
        coef, intercept = self._candidate_weights(k)
        self._fitted = (k, coef.contiguous().clone(), intercept.clone())
        return self

    def convergence(self) -> dict:
        """Plain-JSON record of the selected candidate's training: ``converged`` (True: stopped
        by the rule; False: hit the epoch limit still improving; None: not checked), the
        held-out loss trace and whether the selected lr is at the edge of the grid."""
        self._weights()
        k = self._fitted[0]
        if self.stopping is not None and self.stopping.trace:
            return self.stopping.summary(self.lrs, k, self.epochs)
        return {
            "early_stopping": False,
            "converged": None,
            "epochs": None,
            "max_epochs": self.epochs,
            "best_epoch": None,
            "val_loss": [],
            "val_loss_by_lr": {},
            "lr_at_grid_edge": lr_at_edge(k, self.n_candidates),
        }

    def _trained(self) -> dict[str, Tensor]:
        if not self._params:
            raise ValueError(
                f"{self.name}: not trained yet; the first {self.warmup_batches} batches only "
                "estimate the standardiser (lower warmup_batches for short streams)"
            )
        return self._params

    def _candidate_logits(self, x: Tensor) -> Tensor:
        self._trained()
        return self._logits(self.standardizer.transform(x))

    def _candidate_weights(self, k: int) -> tuple[Tensor, Tensor]:
        p = self._trained()
        return p["W"][:, k, :], p["b"][k]

    def _hyperparameters(self) -> dict:
        keys = ("lrs", "weight_decay", "betas", "eps", "warmup_batches", "warmup_tokens")
        keys += ("epochs", "batch_size", "seed", "validation_fraction", "soft_labels")
        keys += ("early_stopping", "patience", "min_delta", "exact", "gemm")
        return {k: getattr(self, k) for k in keys}

    def _fit_info(self) -> dict:
        n = int(self._params["n_tokens"]) if self._params else None
        info = {"lr": self.lrs[self._fitted[0]], "n_steps": self._step, "n_train_tokens": n}
        return info | {"convergence": self.convergence()}

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of all running state: standardiser, weights, AdamW moments and step."""
        sd = super().state_dict() | {"step": torch.tensor(self._step)}
        if self.stopping is not None:
            sd |= prefixed("stopping.", self.stopping.state_dict())
        return sd | {k: v.clone() for k, v in self._params.items()}

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Restore from ``state_dict()``; raises if it was trained with other lrs."""
        if "lr" in sd and not torch.equal(sd["lr"].cpu(), torch.tensor(self.lrs)):
            raise ValueError(f"{self.name}: checkpoint lrs {sd['lr'].tolist()} != {self.lrs}")
        super().load_state_dict(sd)
        self._step = int(sd["step"])
        keys = ("W", "b", "mW", "vW", "mb", "vb", "lr", "n_tokens")
        self._params = {k: sd[k].clone() for k in keys if k in sd}
        if self.stopping is not None and "stopping.trace" in sd:
            self.stopping.load_state_dict(unprefixed("stopping.", sd))
