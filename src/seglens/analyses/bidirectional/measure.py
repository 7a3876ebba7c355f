"""Causal vs bidirectional image attention: does the causal mask starve early image tokens?

The ``bidirectional_image`` condition lets every image token read every image token (all other
edges stay causal) at inference, in every LLM layer. Its probes are trained and scored inside
that intervention on the same data, stages and seed as the probing run's clean (``causal``) ones,
which are reused as they are. ``run_bidirectional`` is the public API behind ``seglens bidir``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglens.analyses.probing.measure import evaluate_probes, train_probes, write_condition
from seglens.distributed import is_main
from seglens.experiments.differences import count_arrays, counts_from_arrays
from seglens.experiments.stats import bootstrap_contrast, paired_bootstrap
from seglens.interventions import BidirectionalImage, CausalImage, intervene
from seglens.models import VLM
from seglens.rundir import RunDir
from seglens.rundir.schema import CONDITIONS, Bidirectional, clean_condition, position_key
from seglens.stages import middle_layer

__all__ = ["CONDITIONS", "POSITIONS_FILE", "default_layer", "run_bidirectional"]

log = logging.getLogger(__name__)

POSITIONS_FILE = "arrays/bidirectional.npz"


default_layer = middle_layer  # the middle LLM layer, ``ceil(L / 2)`` (1-based)


def _miou(metrics: dict[str, dict], level: str) -> dict[str, float | None]:
    return {s: (m.get(level) or {}).get("miou") for s, m in metrics.items()}


def run_bidirectional(
    run: RunDir | str | Path,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Bidirectional:
    """Train and score probes under the other image attention; compare with the clean run.

    Uses the model, data, stages, probe settings and seed of the probing run (its config). The
    clean condition is the model's native attention (``schema.clean_condition``); the other one
    is the intervention (``bidirectional_image`` for causal models, ``causal`` for natively
    bidirectional ones). Writes ``probes/<other>/``, ``arrays/probing_<other>.npz`` and
    ``results["probing"][<other>]`` (``write_condition``), the per-position accuracy at the
    chosen layer in ``arrays/bidirectional.npz`` (``causal``, ``bidirectional_image`` and
    ``difference`` = bidirectional - causal, each (N,), nan where no token was scored), and the
    ``bidirectional`` section. Figures are left to the caller.

    Args:
        run: a probing run (``RunDir`` or its directory).
        vlm: the model to use instead of building the one the config names (must match it).
        progress: show progress bars.
        **overrides: ``BidirConfig`` fields: ``layer``, the 1-based LLM layer of the
            per-position accuracy (default the middle layer ``ceil(L / 2)``).

    Returns:
        The ``bidirectional`` section.
    """
    from seglens.experiments.common import build_dataset, build_model

    run = RunDir.of(run, **{f"bidir.{k}": v for k, v in overrides.items()})
    causal = run.clean_probing()  # the unmodified model's run: causal, or native bidirectional
    clean = clean_condition(run.results())
    config = run.config
    vlm = build_model(config.model) if vlm is None else vlm
    L = vlm.num_llm_layers
    number = default_layer(L) if config.bidir.layer is None else config.bidir.layer
    if not 1 <= number <= L:
        raise ValueError(f"bidir.layer={number} is not an LLM layer of this model (1..{L})")
    stage, stages = f"llm.{number}", list(causal.stages)
    if stage not in stages:
        raise ValueError(f"{stage} was not probed in {run.path}; probed stages: {stages}")
    data = config.data
    train = build_dataset(data, data.train_split, data.limit_train, config.seed)
    evaluation = build_dataset(data, data.eval_split, data.limit_eval, config.seed)
    log.info("bidirectional image attention: %d stages of %s", len(stages), vlm.name)
    # The clean run holds the model's native attention; the other condition is the intervention.
    native = getattr(vlm.family, "native_image_attention", "causal")
    trained, spec = (
        ("bidirectional_image", BidirectionalImage())
        if clean == "causal"
        else ("causal", CausalImage())
    )
    torch.manual_seed(config.seed)  # as run_probing does before training: same sgd init
    with intervene(vlm, [spec]):
        bank = train_probes(
            vlm,
            train,
            stages,
            config.probe,
            data_config=data,
            seed=config.seed,
            progress=progress,
            condition=trained,
        )
        scored = evaluate_probes(
            vlm,
            bank,
            evaluation,
            stages,
            config.probe,
            data_config=data,
            seed=config.seed,
            qualitative=[],
            progress=progress,
        )
    other = write_condition(run, trained, scored, bank)  # rank 0 writes
    clean_arrays = run.load_arrays(causal.arrays)
    positions = {
        clean: clean_arrays[position_key(stage)],
        trained: scored.positions[stage].accuracy(),
    }
    positions["difference"] = positions["bidirectional_image"] - positions["causal"]
    if is_main():
        run.save_arrays(POSITIONS_FILE, **{k: np.asarray(v) for k, v in positions.items()})
    sections = {clean: causal, trained: other}
    pixel = all(m.get("pixel") for s in sections.values() for m in s["metrics"].values())
    level = "pixel" if pixel else "patch"
    section = Bidirectional(
        layer=stage,
        conditions=list(CONDITIONS),
        native_image_attention=native,
        miou={c: _miou(sections[c]["metrics"], level) for c in CONDITIONS},
        level=level,
        position_accuracy_file=POSITIONS_FILE,
        seed=config.seed,
    )
    tables = dict(patch=scored.patch_images, pixel=scored.pixel_images)
    tables |= dict(early=scored.early_images, late=scored.late_images)
    arrays = {clean: clean_arrays, trained: count_arrays(tables)}
    section.extra["differences"] = bidirectional_differences(
        arrays["bidirectional_image"],
        arrays["causal"],
        stages,
        level=level,
        position_stage=stage,
        n_resamples=config.probe.bootstrap,
        seed=config.seed,
    )
    diff = positions["difference"]
    log.info(
        "%s: per-position accuracy changes by %+.4f on average (bidirectional - causal)",
        stage,
        float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan"),
    )
    if not is_main():  # under torchrun every rank holds the totals; one writes
        return section
    return run.put_section("bidirectional", section)


def bidirectional_differences(
    bidirectional: Mapping[str, np.ndarray],
    causal: Mapping[str, np.ndarray],
    stages: Sequence[str],
    *,
    level: str,
    position_stage: str,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired intervals on bidirectional minus causal: mIoU per stage, and the early-minus-late
    band difference of the per-position accuracy gain at ``position_stage``.

    Args:
        bidirectional, causal: the two conditions' saved arrays (``count_arrays`` keys), rows
            the same evaluation images.
        stages: stages of both conditions.
        level: ``patch`` or ``pixel`` for the per-stage mIoU.
        position_stage: the ``llm.k`` of the per-position accuracy.
        n_resamples, confidence, seed: of the bootstrap.

    Returns:
        ``{"level", "metric", "confidence", "n_resamples", "seed", "interval",
        "bidirectional_minus_causal":
        {stage: I}, "early_minus_late_gain": {"stage", **I} or None, "missing": [...]}`` with I =
        ``{estimate, low, high, n_images}``. The band gain is ``(acc_b(early) - acc_c(early)) -
        (acc_b(late) - acc_c(late))``, band accuracy pooled over the band's tokens; ``missing``
        names the counts a run did not save (older runs).
    """
    options = dict(n_resamples=n_resamples, confidence=confidence, seed=seed)
    out: dict[str, Any] = {"level": level, "metric": "miou", **options, "interval": "centred"}
    out |= {"bidirectional_minus_causal": {}, "early_minus_late_gain": None, "missing": []}
    for s in stages:
        b, c = (counts_from_arrays(x, s, level, "miou") for x in (bidirectional, causal))
        if b is None or c is None:
            out["missing"].append(f"{s} {level}")
            continue
        out["bidirectional_minus_causal"][s] = paired_bootstrap(b, c, "miou", **options)
    bands = {
        (name, band): counts_from_arrays(x, position_stage, band, "accuracy")
        for name, x in (("b", bidirectional), ("c", causal))
        for band in ("early", "late")
    }
    if any(v is None for v in bands.values()):
        out["missing"].append(f"{position_stage} early/late")
        return out
    contrast = [(1.0, bands["b", "early"]), (-1.0, bands["c", "early"])]
    contrast += [(-1.0, bands["b", "late"]), (1.0, bands["c", "late"])]
    interval = bootstrap_contrast(contrast, "accuracy", **options)
    out["early_minus_late_gain"] = {"stage": position_stage, **interval}
    return out
