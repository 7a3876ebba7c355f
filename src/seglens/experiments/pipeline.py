"""One command, one report: probing, knockout, bidirectional attention and UMAP in sequence.

The model is loaded once and shared by every analysis; each analysis adds its section to the same
``results.json`` and the run ends with ``report.html``. Forward passes are shared where the
conditions allow: UMAP draws its tokens from the probing evaluation pass (same split, same order,
same causal model) instead of running its own.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from seglens.config import RunConfig, load_config
from seglens.experiments.common import build_model

log = logging.getLogger(__name__)

#: The embedded demo: tiny seeded LLaVA (CLIP tower) on synthetic scenes, CPU, a few minutes.
DEMO = {
    "out": "runs/demo",
    "overwrite": True,
    "model.name": "tiny-clip",
    "model.device": "cpu",
    "data.dataset": "synthetic",
    "data.synthetic_images": 96,
    "data.synthetic_classes": 6,
    "probe.epochs": 2,
    "knockout.top_k": 3,
    "knockout.min_support": 5,
    "knockout.window_sweep": 2,
    "umap.tokens": 1500,
}


def run(config: RunConfig | str | Path, *, progress: bool = True, **overrides) -> Path:
    """Run every enabled analysis into ``config.out`` and write the report.

    Args:
        config: a ``RunConfig`` or the path of a YAML config.
        progress: show progress bars.
        overrides: dotted config overrides (``{"probe.solver": "lda"}``).

    Returns:
        The path of ``report.html``.
    """
    from seglens.experiments.bidirectional import run_bidirectional
    from seglens.experiments.knockout import run_knockout
    from seglens.experiments.probing import run_probing
    from seglens.experiments.umap import run_umap
    from seglens.report import write_report

    if not isinstance(config, RunConfig):
        config = load_config(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    from seglens.distributed import barrier, is_main, world
    from seglens.experiments.probing import resolve_stages
    from seglens.experiments.umap import umap_sampler

    vlm = build_model(config.model)
    sampler = None
    if config.umap.enabled and world() == 1 and not config.resume:
        candidate = umap_sampler(config, vlm)
        if set(candidate.stages) <= set(resolve_stages(vlm, config.probe)):
            sampler = candidate

    def feed(batch, states):
        sampler.offer(batch.labels, states)

    steps = [
        (
            "probing",
            lambda: run_probing(
                config,
                vlm=vlm,
                progress=progress,
                on_eval_batch=feed if sampler else None,
                draw=False,
            ),
        )
    ]
    if config.knockout.enabled:
        steps.append(
            ("knockout", lambda: run_knockout(config.out, vlm=vlm, progress=progress, draw=False))
        )
    if config.bidir.enabled:
        steps.append(
            (
                "bidirectional",
                lambda: run_bidirectional(config.out, vlm=vlm, progress=progress, draw=False),
            )
        )
    if config.umap.enabled:
        steps.append(
            (
                "umap",
                lambda: run_umap(
                    config.out, vlm=vlm, sampler=sampler, progress=progress, draw=False
                ),
            )
        )
    for name, step in steps:
        start = time.perf_counter()
        log.info("%s: starting", name)
        step()
        barrier()  # under torchrun the next analysis reads what rank 0 just wrote
        log.info("%s: done in %.1f s", name, time.perf_counter() - start)
    report = Path(config.out) / "report.html"
    if is_main():
        report = write_report(config.out, redraw=True)  # every figure, drawn once
    barrier()
    return report


def demo(out: str | None = None, *, progress: bool = True) -> Path:
    """The full analysis on the embedded tiny model and synthetic data (no GPU, no download)."""
    overrides = dict(DEMO)
    if out is not None:
        overrides["out"] = out
    return run(load_config(**overrides), progress=progress)
