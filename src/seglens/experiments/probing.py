"""Layerwise linear probing: one probe per stage, trained and scored from streamed forward passes.

Every batch runs ONE ``vlm.capture`` for all stages; its features update every stage's probe (or
metric accumulator) and are dropped, so nothing is stored per dataset. ``train_probes``
(``training.py``) and ``evaluate_probes`` (``evaluation.py``) are the reusable core (they also run
unchanged inside ``seglens.interventions.intervene``); ``run_probing`` is the public API behind
``seglens probe`` and ``write_condition`` adds one condition's probing section to a run's
``results.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

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
from seglens.results import (
    CHECKPOINT,
    CONFIG,
    RESULTS,
    atomic_write,
    clean_condition,
    prepare_run_dir,
    provenance,
    read_json,
    save_arrays,
    write_json,
)

__all__ = ["StageResults", "evaluate_probes", "qualitative_stages", "resolve_stages"]
__all__ += ["run_probing", "split_holdout", "train_probes", "write_condition"]

log = logging.getLogger(__name__)


# --- results.json ----------------------------------------------------------------------------
def _summary(metrics: dict[str, dict], level: str) -> dict:
    miou = {s: (m[level] or {}).get("miou") for s, m in metrics.items()}
    scored = {s: v for s, v in miou.items() if v is not None}
    best = max(scored, key=scored.get) if scored else None
    enc, ada = miou.get("encoder"), miou.get("adapter")
    llm = [v for s, v in scored.items() if s.startswith("llm.")]
    return {
        "level": level,
        "best_stage": best,
        "best_miou": scored.get(best),
        "encoder_miou": enc,
        "adapter_miou": ada,
        "adapter_drop": None if enc is None or ada is None else enc - ada,
        "llm_gain": None if not llm or ada is None else max(llm) - ada,
    }


def write_condition(
    run_dir: str | Path, condition: str, results: StageResults, bank: ProbeBank
) -> dict:
    """Save one condition's probes and arrays and put its section into ``results.json``.

    Writes ``probes/<condition>/<stage>.{safetensors,json}``, ``arrays/probing_<condition>.npz``
    and ``results["probing"][condition]`` (read-modify-write of an existing ``results.json``,
    atomic). Only rank 0 writes under torch.distributed.

    Returns:
        The condition's section as written.
    """
    run_dir = Path(run_dir)
    metrics = results.metrics()
    for stage, probe in bank.probes.items():
        lr = float(probe.lr_) if bank.solver == "sgd" else None
        metrics[stage]["probe"] = {"file": f"probes/{condition}/{stage}", "lr": lr}
    level = "pixel" if results.pixel is not None else "patch"
    per_image = results.pixel_images if level == "pixel" else results.patch_images
    section = {
        "stages": list(results.stages),
        "solver": bank.solver,
        "metrics": metrics,
        "summary": _summary(metrics, level),
        "differences": probing_differences(
            per_image, results.stages, level=level, n_resamples=results.bootstrap, seed=results.seed
        ),
        "arrays": f"arrays/probing_{condition}.npz",
    }
    if _rank_world()[0] != 0:
        return section
    bank.save(run_dir / "probes" / condition)
    tables = dict(patch=results.patch_images, pixel=results.pixel_images)
    tables |= dict(early=results.early_images, late=results.late_images)
    save_arrays(run_dir / section["arrays"], **results.arrays(), **count_arrays(tables))
    data = read_json(run_dir / RESULTS)
    data.setdefault("probing", {})[condition] = section
    write_json(run_dir / RESULTS, data)
    return section


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (``yaml.safe_dump`` refuses tuples)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_probing(
    config: RunConfig,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    on_eval_batch: Callable[[Batch, dict[str, torch.Tensor]], None] | None = None,
    draw: bool = True,
) -> dict:
    """The layerwise probing experiment behind ``seglens probe``; returns ``results.json``'s data.

    Prepares ``config.out`` (an existing run is refused unless ``config.overwrite`` or
    ``config.resume``), seeds once, trains the probes on the training split, scores them on the
    evaluation split, and writes ``config.yaml``, ``results.json``, ``probes/causal/``,
    ``arrays/probing_causal.npz`` and ``arrays/qualitative.npz``; figures are drawn if
    ``seglens.report.figures`` is installed. ``RUN/checkpoint/`` is written every
    ``config.checkpoint_every`` batches and at the end of every phase; with ``config.resume`` a
    killed run continues from it and ends with the results of an uninterrupted run (a resume with
    a config that changes the results is refused, naming the keys).

    Args:
        config: the resolved run configuration.
        vlm: an already loaded model (default: ``build_model(config.model)``).
        progress: show progress bars.
        on_eval_batch: passed to ``evaluate_probes`` as ``on_batch`` (shares its forward pass).
        draw: redraw the run's figures afterwards (``seglens run`` draws once, at the end).
    """
    from seglens.experiments.common import build_dataset, build_model

    rank, world = _rank_world()
    run_dir = Path(config.out)
    if rank == 0:
        prepare_run_dir(run_dir, overwrite=config.overwrite, resume=config.resume)
    barrier()  # no rank writes its checkpoint before rank 0 has checked the directory
    ckpt = Checkpointer(
        run_dir / CHECKPOINT,
        every=config.checkpoint_every,
        fingerprint=_fingerprint(config),
        resume=config.resume,
        rank=rank,
        world=world,
    )
    if len({repr(where) for where in _gather(ckpt.where())}) > 1:
        raise ValueError(
            f"the processes' checkpoints in {run_dir / CHECKPOINT} stop at different points "
            "(killed between two ranks' writes); pass --overwrite to start again"
        )
    if ckpt.complete_:
        log.info("%s is complete; nothing to resume", run_dir)
        return read_json(run_dir / RESULTS)
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
    bank = train_probes(vlm, train, stages, config.probe, **options)
    results = evaluate_probes(
        vlm, bank, evaluation, stages, config.probe, on_batch=on_eval_batch, **options
    )
    skipped = dict(bank.training_["skipped"]) | dict(results.skipped)
    out = {
        **provenance(config.seed),
        "config": config.to_dict(),
        "model": vlm.info(),
        "dataset": {
            "name": data.dataset,
            "train_split": data.train_split,
            "eval_split": data.eval_split,
            "num_classes": train.num_classes,
            "class_names": list(train.class_names),
            "palette": np.asarray(train.palette).tolist(),
            "train_images": bank.training_["train_images"],
            "holdout_images": bank.training_["holdout_images"],
            "eval_images": results.images,
            "skipped": {"count": len(skipped), "samples": [list(kv) for kv in skipped.items()]},
        },
        "probing": {},
        "qualitative": {
            "file": "arrays/qualitative.npz",
            "stages": results.qualitative_stages,
            "images": results.qualitative_names,
        },
        "figures": {},
    }
    if rank == 0:
        with atomic_write(run_dir / CONFIG) as handle:
            yaml.safe_dump(_plain(config.to_dict()), handle, sort_keys=False)
        write_json(run_dir / RESULTS, out)
        save_arrays(run_dir / out["qualitative"]["file"], **results.qualitative)
    clean = clean_condition(out)
    out["probing"][clean] = write_condition(run_dir, clean, results, bank)
    if rank == 0 and draw:
        from seglens.report.figures import draw_all

        draw_all(run_dir)
        out = read_json(run_dir / RESULTS)
    ckpt.complete()
    barrier()  # under torchrun no rank goes on before rank 0 has written the results
    log.info("probing results in %s", run_dir / RESULTS)
    return out


def _fingerprint(config: RunConfig) -> dict:
    """The config values that shape probing results (not the run folder, resume or workers)."""
    full = _plain(config.to_dict())
    data = {k: v for k, v in full["data"].items() if k != "num_workers"}
    return {"seed": full["seed"], "model": full["model"], "data": data, "probe": full["probe"]}
