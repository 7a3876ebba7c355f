"""One command, one report: probing, knockout, bidirectional attention and UMAP in sequence.

One ``RunDir`` and one model are shared by every analysis; each analysis adds its section to the
same ``results.json``, and the figures and ``report.html`` are drawn once, at the end. Forward
passes are shared where the conditions allow: UMAP draws its tokens from the probing evaluation
pass (same split, same order, same causal model) instead of running its own.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from seglens.config import RunConfig, load_config
from seglens.experiments.common import build_model
from seglens.organism import ANALYSIS as ORGANISM_ANALYSIS
from seglens.rundir import RunDir

log = logging.getLogger(__name__)

#: The embedded demo: the trained organism (``seglens.organism``) on its scenes, CPU, < 3 minutes.
DEMO = {
    "out": "runs/demo",
    "overwrite": True,
    **ORGANISM_ANALYSIS,
    "umap.tokens": 1500,
}


def run(config: RunConfig | str | Path, *, progress: bool = True, **overrides) -> Path:
    """Run every enabled analysis into one ``RunDir`` and write the report.

    Args:
        config: a ``RunConfig`` or the path of a YAML config.
        progress: show progress bars.
        overrides: dotted config overrides (``{"probe.solver": "lda"}``).

    Returns:
        The path of ``report.html``.
    """
    from seglens.distributed import barrier, is_main, world
    from seglens.experiments.attention import run_attention
    from seglens.experiments.bidirectional import run_bidirectional
    from seglens.experiments.knockout import run_knockout
    from seglens.experiments.probing import resolve_stages, run_probing
    from seglens.experiments.umap import run_umap, umap_sampler
    from seglens.report import write_report

    if not isinstance(config, RunConfig):
        config = load_config(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    run_dir = RunDir.create(config)
    vlm = build_model(config.model)
    sampler = None
    if config.umap.enabled and world() == 1 and not config.resume:
        candidate = umap_sampler(config, vlm)
        if set(candidate.stages) <= set(resolve_stages(vlm, config.probe)):
            sampler = candidate
    shared = dict(vlm=vlm, progress=progress)
    feed = (lambda batch, states: sampler.offer(batch.labels, states)) if sampler else None
    steps = [("probing", lambda: run_probing(run_dir, on_eval_batch=feed, **shared))]
    if config.knockout.enabled:
        steps.append(("knockout", lambda: run_knockout(run_dir, **shared)))
    if config.knockout.enabled and config.knockout.attention:
        steps.append(("attention", lambda: run_attention(run_dir, **shared)))
    if config.bidir.enabled:
        steps.append(("bidirectional", lambda: run_bidirectional(run_dir, **shared)))
    if config.umap.enabled:
        steps.append(("umap", lambda: run_umap(run_dir, sampler=sampler, **shared)))
    for name, step in steps:
        start = time.perf_counter()
        log.info("%s: starting", name)
        step()
        barrier()  # under torchrun the next analysis reads what rank 0 just wrote
        log.info("%s: done in %.1f s", name, time.perf_counter() - start)
    report = run_dir.file("report.html")
    if is_main():
        from seglens.experiments.findings import write_findings

        write_findings(config.out)
        report = write_report(run_dir.path, redraw=True)  # every figure, drawn once
    barrier()
    return report


def demo(out: str | None = None, *, progress: bool = True) -> Path:
    """The full analysis on the shipped organism and its scenes (no GPU, no download)."""
    overrides = dict(DEMO)
    if out is not None:
        overrides["out"] = out
    # The probes train from a feature cache inside the run directory, rebuilt on every demo: a
    # cache is keyed by model name, and a retrained organism keeps its name.
    cache = Path(overrides["out"]) / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    overrides["probe.cache_dir"] = str(cache)
    return run(load_config(**overrides), progress=progress)
