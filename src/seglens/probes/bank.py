"""One probe per stage, fed from the same forward pass: what an experiment calls per batch.

``ProbeBank`` flattens and checks every stage of a batch with one host sync, builds the targets
once per device, and saves, loads and checkpoints all its probes together. ``load_probe`` reads
one probe back by its solver name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from seglens.distributed import world
from seglens.probes._common import Tensor, all_reduce_sum, check_batch, targets, unprefixed
from seglens.probes.base import _Probe
from seglens.probes.io import FORMAT, read_meta, read_probe, write_meta
from seglens.probes.lda import LDAProbe
from seglens.probes.sgd import LinearProbe, pack_gradients, unpack_gradients

log = logging.getLogger(__name__)

_PROBES: dict[str, type[_Probe]] = {"sgd": LinearProbe, "lda": LDAProbe}
SOLVERS = tuple(_PROBES)
_STAGE_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def load_probe(stem: str | os.PathLike, map_location: str | torch.device = "cpu") -> _Probe:
    """Load a probe written by ``save(stem)``: it predicts bit for bit as the saved one did.

    The result is for inference: optimiser moments and LDA statistics live in ``state_dict``.
    ``map_location`` is where its tensors go (default the CPU, whatever device it was saved
    from); features on any other device are moved to it when predicting.
    """
    meta, tensors = read_probe(stem, _PROBES, map_location)
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["hyperparameters"].items()}
    cls = _PROBES[meta["solver"]]
    probe = cls(meta["n_classes"], class_names=meta["class_names"], name=meta["name"], **hyper)
    probe._load_fitted(tensors, meta)
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
        return check_batch({s: f[0] for s, f in flat.items()}, y, h, self.n_classes), flat

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
        per_device: dict[torch.device, tuple[Tensor, Tensor]] = {}  # targets once per device
        if self.solver == "sgd" and world() > 1:
            return self._sgd_step(flat, per_device)
        for stage, (x, y, h) in flat.items():
            if x.device not in per_device:
                per_device[x.device] = targets(y, h, self.n_classes)
            self.probes[stage]._update(x, *per_device[x.device])
        return self

    def _sgd_step(self, flat: Mapping[str, tuple], per_device: dict) -> ProbeBank:
        """sgd under torch.distributed: every stage's gradients (all K lrs) in one flat buffer
        per device, summed over ranks by ONE all_reduce, then every stage's AdamW step."""
        grads: dict[str, dict[str, Tensor]] = {}
        for stage, (x, y, h) in flat.items():
            if x.device not in per_device:
                per_device[x.device] = targets(y, h, self.n_classes)
            g = self.probes[stage]._gradients(x, *per_device[x.device])
            if g is not None:  # warming up or stopped: the same on every rank
                grads[stage] = g
        by_device: dict[torch.device, list[str]] = {}
        for stage, g in grads.items():
            by_device.setdefault(g["W"].device, []).append(stage)
        for stages in by_device.values():
            parts = [grads[s] for s in stages]
            summed = all_reduce_sum([pack_gradients(parts)])[0]
            for stage, g in zip(stages, unpack_gradients(summed, parts), strict=True):
                self.probes[stage]._apply(g)
        return self

    def validate(self, features: Mapping[str, Tensor], labels: Tensor) -> ProbeBank:
        """Accumulate validation confusion on held-out *training* images (never eval ones)."""
        for stage, (x, y, _) in self._batch(features, labels)[1].items():
            self.probes[stage]._validate(x, y)
        return self

    def end_epoch(self, epoch: int | None = None) -> ProbeBank:
        """sgd early stopping: close epoch ``epoch`` (0-based) of held-out scoring (``validate``
        on the holdout first) for every probe that is still training."""
        return self.end_check(epoch, epoch)

    def end_check(self, check: int | None = None, epoch: int | None = None) -> ProbeBank:
        """sgd early stopping within a pass: close held-out check ``check`` (0-based over all
        epochs; ``validate`` on the holdout first), which falls in ``epoch``, for every probe."""
        for probe in self.probes.values():
            probe.end_check(check, epoch)
        return self

    @property
    def stopped(self) -> bool:
        """Every probe has stopped early (the trainer can end the epochs)."""
        return all(getattr(p, "stopped", False) for p in self.probes.values())

    def convergence(self) -> dict[str, dict]:
        """{stage: plain-JSON convergence record} (lda: closed form, always converged)."""
        out = {}
        for stage, probe in self.probes.items():
            if isinstance(probe, LDAProbe):
                out[stage] = {"early_stopping": False, "converged": True, "closed_form": True}
            else:
                out[stage] = probe.convergence()
        return out

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
        meta = {"format": FORMAT, "solver": self.solver, "n_classes": self.n_classes}
        write_meta(directory / "bank.json", meta | {"stages": list(self.probes)})

    @classmethod
    def load(
        cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> ProbeBank:
        """Load a bank written by ``save``, ready to predict, its tensors on ``map_location``."""
        meta = read_meta(Path(directory) / "bank.json", SOLVERS)
        bank = cls(meta["stages"], meta["n_classes"], solver=meta["solver"])
        bank.probes = {s: load_probe(Path(directory) / s, map_location) for s in meta["stages"]}
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
            probe.load_state_dict(unprefixed(f"{stage}/", sd))
