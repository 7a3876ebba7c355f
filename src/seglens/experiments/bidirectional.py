"""Causal vs bidirectional image attention: does the causal mask starve early image tokens?

The ``bidirectional_image`` condition lets every image token read every image token (all other
edges stay causal) at inference, in every LLM layer. Its probes are trained and scored inside
that intervention on the same data, stages and seed as the probing run's clean (``causal``) ones,
which are reused as they are. ``run_bidirectional`` is the public API behind ``seglens bidir``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglens.config import load_config
from seglens.experiments.differences import bidirectional_differences, count_arrays
from seglens.experiments.probing import evaluate_probes, train_probes, write_condition
from seglens.interventions import BidirectionalImage, CausalImage, intervene
from seglens.models import VLM
from seglens.results import (
    CONFIG,
    RESULTS,
    clean_condition,
    load_arrays,
    read_json,
    save_arrays,
    write_json,
)
from seglens.stages import middle_layer

__all__ = ["CONDITIONS", "POSITIONS_FILE", "default_layer", "run_bidirectional"]

log = logging.getLogger(__name__)

CONDITIONS = ("causal", "bidirectional_image")
POSITIONS_FILE = "arrays/bidirectional.npz"


default_layer = middle_layer  # the middle LLM layer, ``ceil(L / 2)`` (1-based)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _miou(metrics: dict[str, dict], level: str) -> dict[str, float | None]:
    return {s: (m.get(level) or {}).get("miou") for s, m in metrics.items()}


def run_bidirectional(
    run_dir: str | Path,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    layer: int | None = None,
    draw: bool = True,
) -> dict[str, Any]:
    """Train and score probes under bidirectional image attention; compare with the causal run.

    Uses the model, data, stages, probe settings and seed of the probing run (its
    ``config.yaml``). Writes ``probes/bidirectional_image/``, ``arrays/probing_bidirectional_
    image.npz`` and ``results["probing"]["bidirectional_image"]`` (``write_condition``), the
    per-position accuracy at the chosen layer in ``arrays/bidirectional.npz`` (``causal``,
    ``bidirectional_image`` and ``difference`` = bidirectional - causal, each (N,), nan where no
    token was scored), and the ``bidirectional`` section of ``results.json``; then redraws the
    figures.

    Args:
        run_dir: a probing run directory (holds ``config.yaml``, ``results.json`` and the causal
            probing results).
        vlm: the model to use instead of building the one the config names (must match it).
        progress: show progress bars.
        layer: 1-based LLM layer of the per-position accuracy; default ``bidir.layer`` of the
            config, else the middle layer ``ceil(L / 2)``.
        draw: redraw the run's figures afterwards (``seglens run`` draws once, at the end).

    Returns:
        The ``bidirectional`` section: ``{"layer": "llm.k", "conditions", "miou": {condition:
        {stage: float}}, "level", "position_accuracy_file"}``.
    """
    from seglens.experiments.common import build_dataset, build_model

    run_dir = Path(run_dir)
    results = read_json(run_dir / RESULTS)
    clean = clean_condition(results)  # the unmodified model's run: causal, or native bidirectional
    causal = (results.get("probing") or {}).get(clean)
    if not causal:
        raise ValueError(f"{run_dir} has no probing results; run `seglens probe` first")
    config = load_config(run_dir / CONFIG, **{"bidir.layer": layer})
    vlm = build_model(config.model) if vlm is None else vlm
    L = vlm.num_llm_layers
    number = default_layer(L) if config.bidir.layer is None else config.bidir.layer
    if not 1 <= number <= L:
        raise ValueError(f"bidir.layer={number} is not an LLM layer of this model (1..{L})")
    stage, stages = f"llm.{number}", list(causal["stages"])
    if stage not in stages:
        raise ValueError(f"{stage} was not probed in {run_dir}; probed stages: {stages}")
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
            vlm, train, stages, config.probe, data_config=data, seed=config.seed, progress=progress
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
    other = write_condition(run_dir, trained, scored, bank)  # rank 0 writes
    clean_arrays = load_arrays(run_dir / causal["arrays"])
    positions = {
        clean: clean_arrays[f"position_accuracy__{stage}"],
        trained: scored.positions[stage].accuracy(),
    }
    positions["difference"] = positions["bidirectional_image"] - positions["causal"]
    if _rank() == 0:
        save_arrays(run_dir / POSITIONS_FILE, **{k: np.asarray(v) for k, v in positions.items()})
    sections = {clean: causal, trained: other}
    pixel = all(m.get("pixel") for s in sections.values() for m in s["metrics"].values())
    level = "pixel" if pixel else "patch"
    section = {
        "layer": stage,
        "conditions": list(CONDITIONS),
        "native_image_attention": native,
        "miou": {c: _miou(sections[c]["metrics"], level) for c in CONDITIONS},
        "level": level,
        "position_accuracy_file": POSITIONS_FILE,
        "seed": config.seed,
    }
    tables = dict(patch=scored.patch_images, pixel=scored.pixel_images)
    tables |= dict(early=scored.early_images, late=scored.late_images)
    arrays = {clean: clean_arrays, trained: count_arrays(tables)}
    section["differences"] = bidirectional_differences(
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
    if _rank() != 0:  # under torchrun every rank holds the totals; one writes
        return section
    # Read again right before writing: other analyses may have added sections meanwhile.
    results = read_json(run_dir / RESULTS)
    results["bidirectional"] = section
    write_json(run_dir / RESULTS, results)
    if draw:
        from seglens.report.figures import draw_all

        draw_all(run_dir)
    return section
