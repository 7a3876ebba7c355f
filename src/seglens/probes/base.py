"""What every probe solver shares: input checks, in-memory ``fit``, validation and selection of a
candidate, prediction, saving and checkpoint state.

A solver (``LinearProbe``, ``LDAProbe``) trains K candidate classifiers (D -> C with bias) from a
stream of batches; this base class validates the candidates on held-out *training* tokens, keeps
the best, and predicts with it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch

from seglens.data.base import IGNORE_INDEX
from seglens.probes._common import (
    Tensor,
    all_reduce_sum,
    check_batch,
    confusion,
    miou,
    prefixed,
    targets,
    unprefixed,
)
from seglens.probes.io import write_probe
from seglens.probes.standardize import Standardizer

log = logging.getLogger(__name__)


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

    # --- inputs ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device | None:
        """Where the probe's state lives; None before its first batch (it then follows it)."""
        fitted = None if self._fitted is None else self._fitted[1]
        state = [fitted, self.standardizer.mean_, self.standardizer._sum]
        for solver_state in ("_params", "_stats"):  # sgd weights, lda sums (dicts of tensors)
            state += list((getattr(self, solver_state, None) or {}).values())
        return next((t.device for t in state if isinstance(t, Tensor)), None)

    def _flat(self, x: Tensor, y: Tensor | None = None, hist: Tensor | None = None) -> tuple:
        """(..., D), (...), (..., C) -> (M, D), (M,), (M, C), all on the probe's device.

        The one place where inputs go to the probe: under a ``device_map`` (or with features
        cached on one GPU) a stage's features may come from another device than its probe's.
        """
        device = self.device
        if device is not None and x.device != device:
            x = x.to(device, non_blocking=True)
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

    def _checked(self, x: Tensor, y: Tensor, hist: Tensor | None = None) -> tuple[bool, tuple]:
        """``_flat`` then ``check_batch``: (whether to train on the batch, (x, y, hist) flat)."""
        x2, y2, h2 = flat = self._flat(x, y, hist)
        return check_batch({self.name: x2}, y2, h2, self.n_classes), flat

    def _need_hist(self, hist: Tensor | None) -> None:
        if self.soft_labels and hist is None:
            raise ValueError(f"{self.name}: soft_labels=True needs per-token histograms (hist=)")

    # --- training ----------------------------------------------------------------------------
    def partial_fit(self, x: Tensor, y: Tensor, hist: Tensor | None = None) -> _Probe:
        """Update from one batch of training tokens.

        Args:
            x: (B, N, D) or (M, D) features, any float dtype and device.
            y: (B, N) or (M,) int64 labels, ``IGNORE_INDEX`` (255) ignored.
            hist: (B, N, C) or (M, C) per-token class histograms, used iff ``soft_labels``
                (normalised per token; tokens with no valid pixel are ignored).
        """
        self._need_hist(hist)
        train, (x2, y2, h2) = self._checked(x, y, hist)
        if train:
            self._update(x2, *targets(y2, h2, self.n_classes))
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
            X_val, y_val: held-out part of the training split to select a candidate (and, with
                early stopping, to score the loss after every epoch). Without them and with
                several candidates or early stopping, ``validation_fraction`` of X is held out.
        """
        self._need_hist(hist)
        _, (x2, y2, h2) = self._checked(X, y, hist)
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.arange(x2.shape[0])
        early = getattr(self, "stopping", None) is not None
        if X_val is None and (self.n_candidates > 1 or early):
            order = torch.randperm(x2.shape[0], generator=gen)
            n_val = max(1, int(self.validation_fraction * x2.shape[0]))
            val, order = order[:n_val].to(x2.device), order[n_val:]
            X_val, y_val = x2[val], y2[val]
        self._prefit(x2[order.to(x2.device)])
        for _ in range(self.epochs):
            shuffled = order[torch.randperm(len(order), generator=gen)].to(x2.device)
            for idx in shuffled.split(self.batch_size):
                h = None if h2 is None else h2[idx]
                self._update(x2[idx], *targets(y2[idx], h, self.n_classes))
            if early:  # score the held-out loss after every epoch; stop on it
                self.validate(X_val, y_val)
                self.end_epoch()
                if self.stopped:
                    break
        if X_val is not None and not early:
            self.validate(X_val, y_val)
        return self.select()

    def _prefit(self, x: Tensor) -> None:
        pass

    # --- selection ---------------------------------------------------------------------------
    def validate(self, x: Tensor, y: Tensor) -> _Probe:
        """Accumulate per-candidate confusion on held-out *training* tokens (never eval ones)."""
        _, (x2, y2, _) = self._checked(x, y)
        self._validate(x2, y2)
        return self

    def _validate(self, x: Tensor, y: Tensor) -> None:
        conf = confusion(self._candidate_logits(x).argmax(-1), y, self.n_classes)  # (K, C, C)
        self._conf = conf if self._conf is None else self._conf + conf

    def select(self) -> _Probe:
        """Pick the candidate with the best validation mIoU (the first on ties)."""
        k = 0
        if self._conf is not None:
            self.val_miou_ = miou(*all_reduce_sum([self._conf])).cpu()
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

    # --- prediction --------------------------------------------------------------------------
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
        pred = self.predict(x)
        y = y.to(pred.device)
        return float((pred == y)[y != IGNORE_INDEX].float().mean())

    # --- persistence -------------------------------------------------------------------------
    def save(self, stem: str | os.PathLike) -> None:
        """Write ``<stem>.safetensors`` (coef, intercept, mean, scale) and ``<stem>.json``."""
        coef, intercept = self._weights()
        tensors = {"coef": coef, "intercept": intercept, "mean": self.mean_, "scale": self.scale_}
        meta = {
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
        write_probe(stem, tensors, meta)

    def _load_fitted(self, tensors: Mapping[str, Tensor], meta: Mapping) -> None:
        self.n_features_in_ = meta["n_features"]
        self.standardizer.mean_, self.standardizer.scale_ = tensors["mean"], tensors["scale"]
        self._fitted = (meta["selected"], tensors["coef"], tensors["intercept"])
        if meta["val_miou"] is not None:
            self.val_miou_ = torch.tensor(meta["val_miou"], dtype=torch.float64)

    def state_dict(self) -> dict[str, Tensor]:
        """Copies of all running state (a checkpoint): flat names, safetensors-ready."""
        sd = prefixed("standardizer.", self.standardizer.state_dict())
        return sd | ({} if self._conf is None else {"val_conf": self._conf.clone()})

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Restore from ``state_dict()``; the selection is redone by ``select()``."""
        self.standardizer.load_state_dict(unprefixed("standardizer.", sd))
        self._conf, self._fitted = sd.get("val_conf"), None
        moments = self.standardizer._sum if self.standardizer._sum is not None else self.mean_
        if moments is not None:  # so that a probe saved right after a resume records D
            self.n_features_in_ = moments.shape[-1]
