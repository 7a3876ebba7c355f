"""Layerwise linear probing: one probe per stage, trained and scored from streamed forward passes.

Every batch runs ONE ``vlm.capture`` for all stages; its features update every stage's probe (or
metric accumulator) and are dropped, so nothing is stored per dataset. ``train_probes``
(``training.py``) and ``evaluate_probes`` (``evaluation.py``) are the reusable core (they also run
unchanged inside ``seglens.interventions.intervene``); ``run_probing`` is the public API behind
``seglens probe`` and ``write_condition`` adds one condition's probing section to a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from seglens.checkpoint import Checkpointer, rng_state, set_rng_state
from seglens.config import RunConfig
from seglens.distributed import barrier
from seglens.distributed import gather_object as _gather
from seglens.distributed import rank_world as _rank_world
from seglens.experiments.differences import count_arrays, probing_differences
from seglens.experiments.evaluation import StageResults, evaluate_probes
from seglens.experiments.streaming import qualitative_stages, resolve_stages, split_holdout
from seglens.experiments.training import train_probes
from seglens.models import VLM, Batch
from seglens.probes import ProbeBank
from seglens.probes.convergence import convergence_warnings
from seglens.rundir import CHECKPOINT, RunDir
from seglens.rundir.run import fingerprint
from seglens.rundir.schema import (
    Condition,
    Dataset,
    Qualitative,
    clean_condition,
    probing_arrays,
    summary_of,
)

__all__ = ["StageResults", "evaluate_probes", "qualitative_stages", "resolve_stages"]
__all__ += ["run_probing", "split_holdout", "train_probes", "write_condition"]

log = logging.getLogger(__name__)


def write_condition(
    run: RunDir, condition: str, results: StageResults, bank: ProbeBank
) -> Condition:
    """Save one condition's probes and arrays and put its section into ``results.json``.

    Writes ``probes/<condition>/<stage>.{safetensors,json}``, ``arrays/probing_<condition>.npz``
    and ``results["probing"][condition]`` (``RunDir.put_section``). Only rank 0 writes under
    torch.distributed.

    Returns:
        The condition's section.
    """
    metrics = results.metrics()
    records = bank.convergence()
    for stage, probe in bank.probes.items():
        lr = float(probe.lr_) if bank.solver == "sgd" else None
        metrics[stage]["probe"] = {"file": f"probes/{condition}/{stage}", "lr": lr}
        metrics[stage]["probe"]["convergence"] = records[stage]
    warnings = convergence_warnings(records, getattr(next(iter(bank.probes.values())), "lrs", ()))
    for message in warnings if _rank_world()[0] == 0 else []:
        log.warning("%s: %s", condition, message)
    level = "pixel" if results.pixel is not None else "patch"
    per_image = results.pixel_images if level == "pixel" else results.patch_images
    extra = {
        "differences": probing_differences(
            per_image, results.stages, level=level, n_resamples=results.bootstrap, seed=results.seed
        ),
        "convergence": {
            "not_converged": [s for s, r in records.items() if r.get("converged") is False],
            "not_checked": [s for s, r in records.items() if r.get("converged") is None],
            "lr_at_grid_edge": [s for s, r in records.items() if r.get("lr_at_grid_edge")],
            "warnings": warnings,
        },
    }
    section = Condition(
        stages=list(results.stages),
        solver=bank.solver,
        metrics=metrics,
        summary=summary_of(metrics, list(results.stages), level),
        arrays=probing_arrays(condition),
        extra=extra,
    )
    if _rank_world()[0] != 0:
        return section
    bank.save(run.file(f"probes/{condition}"))
    tables = dict(patch=results.patch_images, pixel=results.pixel_images)
    tables |= dict(early=results.early_images, late=results.late_images)
    run.save_arrays(section.arrays, **results.arrays(), **count_arrays(tables))
    return run.put_section(f"probing.{condition}", section)


def run_probing(
    run: RunDir | RunConfig,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    on_eval_batch: Callable[[Batch, dict[str, torch.Tensor]], None] | None = None,
    **overrides: Any,
) -> Condition:
    """The layerwise probing experiment behind ``seglens probe``; returns the clean condition.

    Prepares the run directory (``RunDir.create``: an existing run is refused unless
    ``config.overwrite`` or ``config.resume``), seeds once, trains the probes on the training
    split, scores them on the evaluation split, and writes ``config.yaml``, ``results.json``,
    ``probes/<condition>/``, ``arrays/probing_<condition>.npz`` and ``arrays/qualitative.npz``
    (the condition is the model's native attention, ``schema.clean_condition``). Figures are
    left to the caller. ``RUN/checkpoint/`` is written every ``config.checkpoint_every`` batches
    and at the end of every phase; with ``config.resume`` a killed run continues from it and
    ends with the results of an uninterrupted run (a resume with a config that changes the
    results is refused, naming the keys).

    Args:
        run: a ``RunDir`` from ``RunDir.create`` or the ``RunConfig`` to create one from.
        vlm: an already loaded model (default: ``build_model(config.model)``).
        progress: show progress bars.
        on_eval_batch: passed to ``evaluate_probes`` as ``on_batch`` (shares its forward pass).
        **overrides: ``ProbeConfig`` fields, e.g. ``solver="lda"``; None = as configured.
    """
    from seglens.experiments.common import build_dataset, build_model

    dotted = {f"probe.{k}": v for k, v in overrides.items()}
    if isinstance(run, RunDir):
        run = RunDir.of(run, **dotted)
    else:
        run = RunDir.create(run.replace(**dotted))
    config = run.config
    rank, world = _rank_world()
    ckpt = Checkpointer(
        run.file(CHECKPOINT),
        every=config.checkpoint_every,
        fingerprint=fingerprint(config),
        resume=config.resume,
        rank=rank,
        world=world,
    )
    if len({repr(where) for where in _gather(ckpt.where())}) > 1:
        raise ValueError(
            f"the processes' checkpoints in {run.file(CHECKPOINT)} stop at different points "
            "(killed between two ranks' writes); pass --overwrite to start again"
        )
    if ckpt.complete_:
        log.info("%s is complete; nothing to resume", run.path)
        return run.clean_probing()
    torch.manual_seed(config.seed)
    vlm = build_model(config.model) if vlm is None else vlm
    # After the model: its random init drew from the seeded RNGs in the killed run too.
    ckpt.register("rng", rng_state, set_rng_state)
    data = config.data
    train = build_dataset(data, data.train_split, data.limit_train, config.seed)
    evaluation = build_dataset(data, data.eval_split, data.limit_eval, config.seed)
    if train.num_classes != evaluation.num_classes:
        raise ValueError(
            f"train split has {train.num_classes} classes, eval split {evaluation.num_classes}"
        )
    stages = resolve_stages(vlm, config.probe)
    log.info(
        "probing %d stages of %s (%s, %d processes)",
        len(stages),
        vlm.name,
        config.probe.solver,
        world,
    )
    options = dict(data_config=data, seed=config.seed, progress=progress, checkpoint=ckpt)
    clean = clean_condition({"model": vlm.info()})  # the model's native attention
    bank = train_probes(vlm, train, stages, config.probe, condition=clean, **options)
    results = evaluate_probes(
        vlm, bank, evaluation, stages, config.probe, on_batch=on_eval_batch, **options
    )
    skipped = dict(bank.training_["skipped"]) | dict(results.skipped)
    dataset = Dataset(
        name=data.dataset,
        train_split=data.train_split,
        eval_split=data.eval_split,
        num_classes=train.num_classes,
        class_names=list(train.class_names),
        palette=np.asarray(train.palette).tolist(),
        train_images=bank.training_["train_images"],
        holdout_images=bank.training_["holdout_images"],
        eval_images=results.images,
        skipped={"count": len(skipped), "samples": [list(kv) for kv in skipped.items()]},
    )
    qualitative = Qualitative(
        file="arrays/qualitative.npz",
        stages=results.qualitative_stages,
        images=results.qualitative_names,
    )
    model = vlm.info()
    if rank == 0:
        run.save_config()
        run.begin(model=model, dataset=dataset, probing={}, qualitative=qualitative, figures={})
        run.save_arrays(qualitative.file, **results.qualitative)
    section = write_condition(run, clean, results, bank)
    ckpt.complete()
    barrier()  # under torchrun no rank goes on before rank 0 has written the results
    log.info("probing results in %s", run.file("results.json"))
    return section
