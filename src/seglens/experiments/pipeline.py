"""One command, one report: every enabled analysis of the registry, in order, then the report.

One ``RunDir`` and one model are shared by every analysis; each analysis adds its section to the
same ``results.json``, and the findings, figures and ``report.html`` are drawn once, at the end.
Forward passes are shared where an analysis asks for it: a ``Feed`` (e.g. UMAP's) sees the
evaluation pass of the analysis it names instead of running its own.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from seglens.config import RunConfig, load_config
from seglens.experiments.common import build_model
from seglens.experiments.plan import RunPlan
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


def run(
    config: RunConfig | str | Path,
    *,
    progress: bool = True,
    vlm: Any = None,
    report: bool = True,
    only: list[str] | None = None,
    **overrides,
) -> Path:
    """Run every enabled analysis into one ``RunDir`` and write the report.

    Args:
        config: a ``RunConfig`` or the path of a YAML config.
        progress: show progress bars.
        vlm: the model to analyse instead of the one ``config.model`` names (the random twin).
        report: draw the figures and ``report.html`` (the findings are always written).
        only: run only these of the enabled analyses (the twin's choice, ``twin.analyses``).
        overrides: dotted config overrides (``{"probe.solver": "lda"}``).

    Returns:
        The path of ``report.html``.
    """
    from seglens.analyses import ordered
    from seglens.distributed import barrier, is_main
    from seglens.report import write_report

    if not isinstance(config, RunConfig):
        config = load_config(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    # A ``last`` analysis (the twin, which reruns the others) comes after every other one.
    chosen = sorted((a for a in ordered() if a.is_enabled(config)), key=lambda a: a.last)
    chosen = [a for a in chosen if only is None or a.name in only]
    names = {a.name for a in chosen}
    for analysis in chosen:
        off = [n for n in analysis.needs if n not in names]
        if off:
            raise ValueError(
                f"analysis {analysis.name!r} needs {off}, which this config switches off; "
                f"enable {' and '.join(off)} or switch {analysis.name!r} off"
            )
    log.info("plan: %s", plan(config, chosen))
    run_dir = RunDir.create(config)
    vlm = build_model(config.model) if vlm is None else vlm
    feeds_of = {a.name: a.feed(config, vlm) for a in chosen if a.feed is not None}
    feeds_of = {n: f for n, f in feeds_of.items() if f is not None and f.source in names}
    forwards = RunPlan(config, [a.name for a in chosen], vlm, run_dir)  # logs planned forwards
    try:
        for analysis in chosen:
            if analysis.last and vlm is not None:  # it loads what it needs: free the model first
                vlm, feeds_of = None, {}
                _free_memory()
            kwargs = {}
            feeds = [f.offer for f in feeds_of.values() if f.source == analysis.name]
            if feeds:
                kwargs["on_eval_batch"] = _fan_out(feeds)
            if analysis.name in feeds_of:
                kwargs["feed"] = feeds_of[analysis.name]
            start = time.perf_counter()
            log.info("%s: starting", analysis.name)
            analysis.run(run_dir, vlm=vlm, progress=progress, **kwargs)
            barrier()  # under torchrun the next analysis reads what rank 0 just wrote
            log.info("%s: done in %.1f s", analysis.name, time.perf_counter() - start)
            forwards.done(analysis.name, time.perf_counter() - start)
    finally:
        forwards.close()  # the counting hook goes, whatever happened
    page = run_dir.file("report.html")
    if is_main():
        from seglens.experiments.findings import write_findings

        write_findings(config.out)
        if report:
            page = write_report(run_dir.path, redraw=True)  # every figure, drawn once
    barrier()
    return page


def plan(config: RunConfig, chosen: list | None = None) -> str:
    """What ``seglens run`` will do under ``config``: the analyses in order, then the lines of
    those that describe their cost (``Analysis.plan``; the twin: it doubles what it covers)."""
    from seglens.analyses import ordered

    if chosen is None:
        chosen = sorted((a for a in ordered() if a.is_enabled(config)), key=lambda a: a.last)
    lines = [" -> ".join(a.name for a in chosen)]
    lines += [a.plan(config) for a in chosen if a.plan is not None]
    return "; ".join(lines)


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fan_out(feeds: list) -> Any:
    """One ``on_eval_batch`` that hands every batch to each feed."""
    if len(feeds) == 1:
        return feeds[0]

    def offer(batch: Any, states: Any) -> None:
        for feed in feeds:
            feed(batch, states)

    return offer


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
