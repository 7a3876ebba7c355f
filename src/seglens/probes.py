"""Linear probes that read per-token semantics out of one stage's features, trained from a stream.

Each stage of a forward pass feeds its own probe (D -> C with bias) and the batch is then dropped.
``LinearProbe`` (solver ``sgd``) is softmax regression with several learning rates trained side by
side, the best chosen on a held-out part of the *training* split (never the evaluation split);
``LDAProbe`` (solver ``lda``) is closed form from float64 sufficient statistics that sum across
processes. ``ProbeBank`` holds one probe per stage name and is what an experiment calls per batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from seglens import __version__
from seglens.data.base import IGNORE_INDEX
from seglens.results import atomic_write

__all__ = ["SOLVERS", "LDAProbe", "LinearProbe", "ProbeBank", "Standardizer", "load_probe"]

log = logging.getLogger(__name__)
Tensor = torch.Tensor
SOLVERS = ("sgd", "lda")
_FORMAT = "seglens.probe/1"
_STAGE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` summed over ranks (plain copies without torch.distributed)."""
    out = [t.clone() for t in tensors]
    if _world_size() > 1:
        for t in out:
            torch.distributed.all_reduce(t)
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through ``seglens.results.atomic_write``: readers never see half a file."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def _check_batch(
    xs: Mapping[str, Tensor], y: Tensor | None, hist: Tensor | None, n_classes: int
) -> bool:
    """Raise on non-finite features or bad labels; return whether to train on the batch.

    All checks are reduced on the device and read back with one host sync per batch. A batch
    without valid tokens is skipped, except under torch.distributed, where every rank must step
    (and all_reduce) together.
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
    return y is None or bool(host[-1]) or _world_size() > 1


def _targets(y: Tensor, hist: Tensor | None, n_classes: int) -> tuple[Tensor, Tensor]:
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


def _miou(conf: Tensor) -> Tensor:
    """(K, C, C) confusion (rows = truth) -> (K,) mIoU over classes with union > 0."""
    conf = conf.double()
    inter = conf.diagonal(dim1=1, dim2=2)
    union = conf.sum(2) + conf.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), 0.0)
    return iou.sum(1) / (union > 0).sum(1).clamp_min(1)


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
        self._sum = self._sumsq = None  # (D,) float64 running sums
        self._count = self._batches = 0
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
        self._batches += 1
        if self.warmup_tokens is not None:
            done = self._count >= self.warmup_tokens
        else:
            done = self._batches >= self.warmup_batches
        return self.freeze() if done else self

    def fit(self, x: Tensor, chunk: int = 65536) -> Standardizer:
        """Estimate on all of ``x`` (M, D) (in-memory data, no warmup limit) and freeze."""
        self._sum = self._sumsq = self.mean_ = self.scale_ = None
        self._count = self._batches = 0
        for part in x.split(chunk):
            self._accumulate(part)
        return self.freeze()

    def _accumulate(self, x: Tensor) -> None:
        x64 = x.reshape(-1, x.shape[-1]).double()
        if self._sum is None:
            self._sum, self._sumsq = x64.new_zeros(x64.shape[1]), x64.new_zeros(x64.shape[1])
        self._sum += x64.sum(0)
        self._sumsq += x64.square().sum(0)
        self._count += x64.shape[0]

    def freeze(self) -> Standardizer:
        """Freeze from the accumulated moments, summed over ranks under torch.distributed."""
        if self._sum is None:
            raise ValueError("the standardiser saw no data: feed training batches first")
        n = self._sum.new_tensor(float(self._count))
        return self.set_moments(*_all_reduce_sum([self._sum, self._sumsq, n]))

    def set_moments(self, s: Tensor, ss: Tensor, n: Tensor | float) -> Standardizer:
        """Freeze from feature sums ``s`` (D,), sums of squares ``ss`` (D,) and count ``n``."""
        mean = s / n
        std = (ss / n - mean.square()).clamp_min(0).sqrt()
        self.mean_, self.scale_ = mean.float(), torch.where(std < self.eps, 1.0, std).float()
        return self

    def transform(self, x: Tensor) -> Tensor:
        """(..., D) any float dtype -> (..., D) fp32 standardised."""
        if not self.frozen:
            raise ValueError("the standardiser is not frozen yet: feed its warmup batches first")
        return (x.float() - self.mean_) / self.scale_

    def state_dict(self) -> dict[str, Tensor]:
        sd = {"count": torch.tensor(self._count), "batches": torch.tensor(self._batches)}
        for key in ("_sum", "_sumsq", "mean_", "scale_"):
            if getattr(self, key) is not None:
                sd[key.strip("_")] = getattr(self, key).clone()
        return sd

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        self._count, self._batches = int(sd["count"]), int(sd["batches"])
        self._sum, self._sumsq = sd.get("sum"), sd.get("sumsq")
        self.mean_, self.scale_ = sd.get("mean"), sd.get("scale")


class _Probe:
    """Interface shared by the solvers: checks, fit, validation, selection, prediction, save.

    A solver defines ``_update(x (M, D), T (M, C), valid (M,))``, ``_candidate_logits(x) ->
    (M, K, C)``, ``_candidate_weights(k) -> ((D, C), (C,))``, ``_hyperparameters()``,
    ``_fit_info()`` and its ``state_dict``.
    """

    solver = ""
    n_candidates = 1
    epochs, batch_size, seed = 1, 65536, 0  # used by ``fit``

    def __init__(
        self,
        n_classes: int,
        *,
        soft_labels: bool,
        class_names: Sequence[str] | None,
        name: str | None,
    ):
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        if class_names is not None and len(class_names) != n_classes:
            raise ValueError(f"got {len(class_names)} class_names for n_classes={n_classes}")
        self.n_classes, self.soft_labels, self.name = n_classes, soft_labels, name or self.solver
        self.class_names = list(class_names) if class_names is not None else None
        self.standardizer = Standardizer()
        self.n_features_in_: int | None = None
        self.val_miou_: Tensor | None = None  # (K,) after select(), if validated
        self._conf: Tensor | None = None  # (K, C, C) int64 validation confusion, rows = truth
        self._fitted: tuple[int, Tensor, Tensor] | None = None  # (k, coef (D, C), intercept (C,))

    def _flat(self, x: Tensor, y: Tensor | None = None, hist: Tensor | None = None) -> tuple:
        """(..., D), (...), (..., C) -> (M, D), (M,), (M, C); labels moved to the features."""
        if x.ndim < 2:
            raise ValueError(f"features must be (B, N, D) or (M, D), got shape {tuple(x.shape)}")
        if self.n_features_in_ is None:
            self.n_features_in_ = x.shape[-1]
        elif x.shape[-1] != self.n_features_in_:
            raise ValueError(
                f"{self.name}: features have D={x.shape[-1]}, the probe was fit with "
                f"D={self.n_features_in_}"
            )
        lead = x.shape[:-1]
        if y is not None:
            if y.shape != lead or y.is_floating_point():
                raise ValueError(
                    f"labels must be integer with shape {tuple(lead)} (the features' leading "
                    f"dims), got {y.dtype} labels shape {tuple(y.shape)}"
                )
            y = y.reshape(-1).to(x.device, torch.int64, non_blocking=True)
        if hist is not None and self.soft_labels:
            if hist.shape != (*lead, self.n_classes):
                raise ValueError(
                    f"histograms must have shape {(*lead, self.n_classes)}, got {tuple(hist.shape)}"
                )
            hist = hist.reshape(-1, self.n_classes).to(x.device, non_blocking=True)
        else:
            hist = None  # hard labels: histograms are ignored
        return x.reshape(-1, x.shape[-1]), y, hist

    def _need_hist(self, hist: Tensor | None) -> None:
        if self.soft_labels and hist is None:
            raise ValueError(f"{self.name}: soft_labels=True needs per-token histograms (hist=)")

    def partial_fit(self, x: Tensor, y: Tensor, hist: Tensor | None = None) -> _Probe:
        """Update from one batch of training tokens.

        Args:
            x: (B, N, D) or (M, D) features, any float dtype and device.
            y: (B, N) or (M,) int64 labels, ``IGNORE_INDEX`` (255) ignored.
            hist: (B, N, C) or (M, C) per-token class histograms, used iff ``soft_labels``
                (normalised per token; tokens with no valid pixel are ignored).
        """
        self._need_hist(hist)
        x2, y2, h2 = self._flat(x, y, hist)
        if _check_batch({self.name: x2}, y2, h2, self.n_classes):
            self._update(x2, *_targets(y2, h2, self.n_classes))
        return self

    def fit(
        self,
        X: Tensor,
        y: Tensor,
        hist: Tensor | None = None,
        *,
        X_val: Tensor | None = None,
        y_val: Tensor | None = None,
    ) -> _Probe:
        """Train on in-memory data: ``epochs`` passes over minibatches shuffled with ``seed``.

        Args:
            X: (B, N, D) or (M, D); y: (B, N) or (M,); hist: (..., C) if ``soft_labels``.
            X_val, y_val: held-out part of the training split to select a candidate. Without
                them and with several candidates, ``validation_fraction`` of X is held out.
        """
        self._need_hist(hist)
        x2, y2, h2 = self._flat(X, y, hist)
        _check_batch({self.name: x2}, y2, h2, self.n_classes)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.arange(x2.shape[0])
        if X_val is None and self.n_candidates > 1:
            order = torch.randperm(x2.shape[0], generator=gen)
            n_val = max(1, int(self.validation_fraction * x2.shape[0]))
            val, order = order[:n_val].to(x2.device), order[n_val:]
            X_val, y_val = x2[val], y2[val]
        self._prefit(x2[order.to(x2.device)])
        for _ in range(self.epochs):
            shuffled = order[torch.randperm(len(order), generator=gen)].to(x2.device)
            for idx in shuffled.split(self.batch_size):
                h = None if h2 is None else h2[idx]
                self._update(x2[idx], *_targets(y2[idx], h, self.n_classes))
        if X_val is not None:
            self.validate(X_val, y_val)
        return self.select()

    def _prefit(self, x: Tensor) -> None:
        pass

    def validate(self, x: Tensor, y: Tensor) -> _Probe:
        """Accumulate per-candidate confusion on held-out *training* tokens (never eval ones)."""
        x2, y2, _ = self._flat(x, y)
        _check_batch({self.name: x2}, y2, None, self.n_classes)
        self._validate(x2, y2)
        return self

    def _validate(self, x: Tensor, y: Tensor) -> None:
        pred = self._candidate_logits(x).argmax(-1)  # (M, K)
        K, C = pred.shape[1], self.n_classes
        idx = (torch.arange(K, device=x.device) * C + y[:, None]) * C + pred
        idx = idx.masked_fill((y == IGNORE_INDEX)[:, None], K * C * C)  # dump bin, no sync
        conf = torch.bincount(idx.reshape(-1), minlength=K * C * C + 1)[:-1].view(K, C, C)
        self._conf = conf if self._conf is None else self._conf + conf

    def select(self) -> _Probe:
        """Pick the candidate with the best validation mIoU (the first on ties)."""
        k = 0
        if self._conf is not None:
            self.val_miou_ = _miou(*_all_reduce_sum([self._conf])).cpu()
            k = int(self.val_miou_.argmax())
        elif self.n_candidates > 1:
            raise ValueError(
                f"{self.name}: {self.n_candidates} candidates but no validation data; call "
                "validate(x, y) on a held-out part of the training split before select()"
            )
        coef, intercept = self._candidate_weights(k)
        # Contiguous copies: predictions then match a reloaded probe bit for bit.
        self._fitted = (k, coef.contiguous().clone(), intercept.clone())
        log.debug("%s: selected candidate %d, val mIoU %s", self.name, k, self.val_miou_)
        return self

    def _weights(self) -> tuple[Tensor, Tensor]:
        if self._fitted is None:
            if self.n_candidates > 1:
                raise ValueError(f"{self.name}: call validate() then select() first")
            self.select()
        return self._fitted[1], self._fitted[2]

    @property
    def coef_(self) -> Tensor:
        """(D, C) fp32 weights of the selected candidate, on standardised features."""
        return self._weights()[0]

    @property
    def intercept_(self) -> Tensor:
        """(C,) fp32 bias of the selected candidate (-inf for classes LDA never saw)."""
        return self._weights()[1]

    @property
    def mean_(self) -> Tensor | None:
        return self.standardizer.mean_

    @property
    def scale_(self) -> Tensor | None:
        return self.standardizer.scale_

    def decision_function(self, x: Tensor) -> Tensor:
        """(..., D) features -> (..., C) fp32 logits of the selected candidate."""
        coef, intercept = self._weights()
        z = self.standardizer.transform(self._flat(x)[0])
        return (z @ coef + intercept).view(*x.shape[:-1], -1)

    def predict(self, x: Tensor) -> Tensor:
        """(..., D) features -> (...,) int64 class ids."""
        return self.decision_function(x).argmax(-1)

    def score(self, x: Tensor, y: Tensor) -> float:
        """Token accuracy over labels != ``IGNORE_INDEX``."""
        y = y.to(x.device)
        return float((self.predict(x) == y)[y != IGNORE_INDEX].float().mean())

    def save(self, stem: str | os.PathLike) -> None:
        """Write ``<stem>.safetensors`` (coef, intercept, mean, scale) and ``<stem>.json``."""
        coef, intercept = self._weights()
        tensors = {"coef": coef, "intercept": intercept, "mean": self.mean_, "scale": self.scale_}
        meta = {
            "format": _FORMAT,
            "seglens_version": __version__,
            "solver": self.solver,
            "name": self.name,
            "n_features": self.n_features_in_,
            "n_classes": self.n_classes,
            "class_names": self.class_names,
            "hyperparameters": self._hyperparameters(),
            "selected": self._fitted[0],
            "val_miou": None if self.val_miou_ is None else self.val_miou_.tolist(),
            **self._fit_info(),
        }
        blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        _atomic_write(Path(f"{stem}.safetensors"), blob)
        _atomic_write(Path(f"{stem}.json"), json.dumps(meta, indent=2).encode())

    def _load_fitted(self, tensors: Mapping[str, Tensor], meta: Mapping) -> None:
        self.n_features_in_ = meta["n_features"]
        self.standardizer.mean_, self.standardizer.scale_ = tensors["mean"], tensors["scale"]
        self._fitted = (meta["selected"], tensors["coef"], tensors["intercept"])
        if meta["val_miou"] is not None:
            self.val_miou_ = torch.tensor(meta["val_miou"], dtype=torch.float64)

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of all running state (a checkpoint): flat names, safetensors-ready."""
        sd = {f"standardizer.{k}": v for k, v in self.standardizer.state_dict().items()}
        return sd | ({} if self._conf is None else {"val_conf": self._conf.clone()})

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        pre = "standardizer."
        self.standardizer.load_state_dict({k[13:]: v for k, v in sd.items() if k.startswith(pre)})
        self._conf, self._fitted = sd.get("val_conf"), None
        moments = self.standardizer._sum if self.standardizer._sum is not None else self.mean_
        if moments is not None:  # so that a probe saved right after a resume records D
            self.n_features_in_ = moments.shape[-1]


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
        self.lrs = tuple(float(lr) for lr in lrs)
        self.weight_decay, self.betas, self.eps = float(weight_decay), tuple(betas), float(eps)
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.validation_fraction = validation_fraction
        self.warmup_batches, self.warmup_tokens = warmup_batches, warmup_tokens
        self.standardizer = Standardizer(warmup_batches, warmup_tokens)
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

    def _update(self, x: Tensor, T: Tensor, valid: Tensor) -> None:
        if not self.standardizer.frozen:
            self.standardizer.partial_fit(x)
            return
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
        logits = torch.addmm(p["b"].view(-1), z, p["W"].view(D, K * C)).view(-1, K, C)
        n_valid = valid.sum()
        # Sum of per-token gradients (M, K, C), divided by the valid-token count below. The sums
        # are float64: a class absent from a batch gets a gradient that cancels to rounding noise
        # (~1e-8), which AdamW would blow up to +-lr; in float64 the noise stays ~1e-16, so the
        # result does not depend on how tokens are split into batches or over ranks.
        G = (logits.softmax(-1) - T[:, None, :]).mul_(valid.float()[:, None, None]).double()
        grads = {"W": (z.double().T @ G.view(-1, K * C)).view(D, K, C), "b": G.sum(0)}
        n = n_valid
        if self.sync_gradients and _world_size() > 1:
            # Sum gradients and counts separately: the mean over ALL ranks' valid tokens, i.e.
            # exactly one process's step on the union of the ranks' batches (not a mean of means).
            grads["W"], grads["b"], n = _all_reduce_sum([grads["W"], grads["b"], n])
            if not n > 0:  # no rank had a valid token: one process would skip this batch
                return
        # Mean over valid tokens, as ignore_index does.
        self._adamw({k: (g / n.clamp_min(1)).float() for k, g in grads.items()})
        p["n_tokens"] += n  # over all ranks

    def _adamw(self, grads: Mapping[str, Tensor]) -> None:
        """torch.optim.AdamW's update, with the (K,) lrs broadcast over the candidate axis."""
        self._step += 1
        (b1, b2), p = self.betas, self._params
        bc1, bc2_sqrt = 1 - b1**self._step, math.sqrt(1 - b2**self._step)
        for key, lr in (("W", p["lr"].view(1, -1, 1)), ("b", p["lr"].view(-1, 1))):
            g, m, v, param = grads[key], p["m" + key], p["v" + key], p[key]
            if key == "W" and self.weight_decay:
                param.mul_(1 - lr * self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            param.sub_(m / (v.sqrt() / bc2_sqrt + self.eps) * (lr / bc1))

    def _trained(self) -> dict[str, Tensor]:
        if not self._params:
            raise ValueError(
                f"{self.name}: not trained yet; the first {self.warmup_batches} batches only "
                "estimate the standardiser (lower warmup_batches for short streams)"
            )
        return self._params

    def _candidate_logits(self, x: Tensor) -> Tensor:
        p = self._trained()
        D, K, C = p["W"].shape
        z = self.standardizer.transform(x)
        return torch.addmm(p["b"].view(-1), z, p["W"].view(D, K * C)).view(-1, K, C)

    def _candidate_weights(self, k: int) -> tuple[Tensor, Tensor]:
        p = self._trained()
        return p["W"][:, k, :], p["b"][k]

    def _hyperparameters(self) -> dict:
        keys = ("lrs", "weight_decay", "betas", "eps", "warmup_batches", "warmup_tokens")
        keys += ("epochs", "batch_size", "seed", "validation_fraction", "soft_labels")
        return {k: getattr(self, k) for k in keys}

    def _fit_info(self) -> dict:
        n = int(self._params["n_tokens"]) if self._params else None
        return {"lr": self.lrs[self._fitted[0]], "n_steps": self._step, "n_train_tokens": n}

    def state_dict(self) -> dict[str, Tensor]:
        sd = super().state_dict() | {"step": torch.tensor(self._step)}
        return sd | {k: v.clone() for k, v in self._params.items()}

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        if "lr" in sd and not torch.equal(sd["lr"].cpu(), torch.tensor(self.lrs)):
            raise ValueError(f"{self.name}: checkpoint lrs {sd['lr'].tolist()} != {self.lrs}")
        super().load_state_dict(sd)
        self._step = int(sd["step"])
        keys = ("W", "b", "mW", "vW", "mb", "vb", "lr", "n_tokens")
        self._params = {k: sd[k].clone() for k in keys if k in sd}


class LDAProbe(_Probe):
    """Solver ``lda``: shrunk pooled-covariance LDA from streamed float64 sufficient statistics.

    ``partial_fit`` accumulates, on the features' device, the token count n, the feature sum,
    per-class weights n_c and feature sums, and the scatter sum x x^T, all of *raw* features and
    valid tokens only. They add up across batches and processes (``merge``; an all_reduce at
    ``finalize`` under torch.distributed). ``finalize`` standardises with the full-pass mean/std
    (free from the same sums, so the result depends on neither batch order nor sharding), forms
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
        self._stats: dict[str, Tensor] = {}  # n (), xsum (D,), count (C,), csum (C, D), S (D, D)
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
        s["S"].addmm_(x64.T, x64)

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
        n, xsum, count, csum, S = _all_reduce_sum([self._stats[k] for k in keys])
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
        return super().state_dict() | {f"stats.{k}": v.clone() for k, v in self._stats.items()}

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        super().load_state_dict(sd)
        self._stats = {k[6:]: v.clone() for k, v in sd.items() if k.startswith("stats.")}
        self._lda = None
        if self._stats:
            self.n_features_in_ = self._stats["xsum"].shape[0]


_PROBES: dict[str, type[_Probe]] = {"sgd": LinearProbe, "lda": LDAProbe}


def load_probe(stem: str | os.PathLike, device: str | torch.device = "cpu") -> _Probe:
    """Load a probe written by ``save(stem)``: it predicts bit for bit as the saved one did.

    The result is for inference: optimiser moments and LDA statistics live in ``state_dict``.
    """
    meta = json.loads(Path(f"{stem}.json").read_text())
    if meta.get("format") != _FORMAT or meta.get("solver") not in _PROBES:
        raise ValueError(f"{stem}.json is not a {_FORMAT} probe (format {meta.get('format')!r})")
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["hyperparameters"].items()}
    cls = _PROBES[meta["solver"]]
    probe = cls(meta["n_classes"], class_names=meta["class_names"], name=meta["name"], **hyper)
    probe._load_fitted(load_file(f"{stem}.safetensors", device=str(device)), meta)
    return probe


class ProbeBank:
    """One probe per stage, all updated from the same forward pass.

    Args:
        stages: stage names (``encoder``, ``adapter``, ``llm.1``...); they also name the files.
        n_classes: C.
        solver: ``sgd`` or ``lda``.
        class_names: optional, recorded with each saved probe.
        **probe_kwargs: passed to ``LinearProbe`` / ``LDAProbe``.
    """

    def __init__(
        self,
        stages: Sequence[str],
        n_classes: int,
        *,
        solver: str = "sgd",
        class_names: Sequence[str] | None = None,
        **probe_kwargs,
    ):
        if solver not in _PROBES:
            raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        if not stages or len(set(stages)) != len(stages) or not all(map(_STAGE_RE.match, stages)):
            raise ValueError(f"stages must be unique names of [A-Za-z0-9_.-], got {list(stages)}")
        self.solver, self.n_classes = solver, n_classes
        self.probes: dict[str, _Probe] = {
            s: _PROBES[solver](n_classes, class_names=class_names, name=s, **probe_kwargs)
            for s in stages
        }

    def _batch(
        self, features: Mapping[str, Tensor], labels: Tensor | None, hist: Tensor | None = None
    ) -> tuple[bool, dict[str, tuple]]:
        """Flatten every stage and run all checks with one host sync; nothing is updated yet."""
        if set(features) != set(self.probes):
            raise ValueError(
                f"features have stages {sorted(features)}, the bank has {sorted(self.probes)}"
            )
        flat = {s: self.probes[s]._flat(x, labels, hist) for s, x in features.items()}
        _, y, h = next(iter(flat.values()))
        return _check_batch({s: f[0] for s, f in flat.items()}, y, h, self.n_classes), flat

    def partial_fit(
        self, features: Mapping[str, Tensor], labels: Tensor, hist: Tensor | None = None
    ) -> ProbeBank:
        """Update every probe from one batch.

        Args:
            features: {stage: (B, N, D)} any float dtype, each stage on any device.
            labels: (B, N) int64, 255 ignored. hist: (B, N, C) if the probes use soft labels.
        """
        next(iter(self.probes.values()))._need_hist(hist)
        train, flat = self._batch(features, labels, hist)
        if not train:
            log.debug("batch without valid tokens skipped")
            return self
        targets: dict[torch.device, tuple[Tensor, Tensor]] = {}  # once per device, not per stage
        for stage, (x, y, h) in flat.items():
            if x.device not in targets:
                targets[x.device] = _targets(y, h, self.n_classes)
            self.probes[stage]._update(x, *targets[x.device])
        return self

    def validate(self, features: Mapping[str, Tensor], labels: Tensor) -> ProbeBank:
        """Accumulate validation confusion on held-out *training* images (never eval ones)."""
        for stage, (x, y, _) in self._batch(features, labels)[1].items():
            self.probes[stage]._validate(x, y)
        return self

    def select(self) -> ProbeBank:
        """Select every probe's candidate (sgd: the lr with the best val mIoU; lda: finalize)."""
        for probe in self.probes.values():
            if isinstance(probe, LDAProbe):
                probe.finalize()
            else:
                probe.select()
        return self

    def decision_function(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{stage: (..., D)} -> {stage: (..., C) fp32 logits}."""
        self._batch(features, None)
        return {s: self.probes[s].decision_function(x) for s, x in features.items()}

    def predict(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{stage: (..., D)} -> {stage: (...,) int64 class ids}."""
        return {s: v.argmax(-1) for s, v in self.decision_function(features).items()}

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``<dir>/<stage>.{safetensors,json}`` per stage, then ``<dir>/bank.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for stage, probe in self.probes.items():
            probe.save(directory / stage)
        meta = {"format": _FORMAT, "solver": self.solver, "n_classes": self.n_classes}
        meta["stages"] = list(self.probes)
        _atomic_write(directory / "bank.json", json.dumps(meta, indent=2).encode())

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> ProbeBank:
        """Load a bank written by ``save``, ready to predict."""
        meta = json.loads((Path(directory) / "bank.json").read_text())
        bank = cls(meta["stages"], meta["n_classes"], solver=meta["solver"])
        bank.probes = {s: load_probe(Path(directory) / s, device) for s in meta["stages"]}
        return bank

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"<stage>/<key>": tensor}`` of all running state (save it with safetensors)."""
        return {f"{s}/{k}": v for s, p in self.probes.items() for k, v in p.state_dict().items()}

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Restore from ``state_dict()``; raises on stages that do not match."""
        stages = {k.split("/", 1)[0] for k in sd}
        if stages != set(self.probes):
            raise ValueError(f"checkpoint stages {sorted(stages)} != bank {sorted(self.probes)}")
        for stage, probe in self.probes.items():
            n = len(stage) + 1
            probe.load_state_dict({k[n:]: v for k, v in sd.items() if k[:n] == stage + "/"})
