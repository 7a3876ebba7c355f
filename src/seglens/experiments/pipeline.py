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


def run(config: RunConfig | str | Path, *, progress: bool = True, **overrides) -> Path:
    """Run every enabled analysis into one ``RunDir`` and write the report.

    Args:
        config: a ``RunConfig`` or the path of a YAML config.
        progress: show progress bars.
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
    chosen = [a for a in ordered() if a.is_enabled(config)]
    names = {a.name for a in chosen}
    for analysis in chosen:
        off = [n for n in analysis.needs if n not in names]
        if off:
            raise ValueError(
                f"analysis {analysis.name!r} needs {off}, which this config switches off; "
                f"enable {' and '.join(off)} or switch {analysis.name!r} off"
            )
    run_dir = RunDir.create(config)
    vlm = build_model(config.model)
    feeds_of = {a.name: a.feed(config, vlm) for a in chosen if a.feed is not None}
    feeds_of = {n: f for n, f in feeds_of.items() if f is not None and f.source in names}
    plan = RunPlan(config, [a.name for a in chosen], vlm, run_dir)  # logs the planned forwards
    for analysis in chosen:
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
        plan.done(analysis.name, time.perf_counter() - start)
    plan.close()
    report = run_dir.file("report.html")
    if is_main():
        from seglens.experiments.findings import write_findings

        write_findings(config.out)
        report = write_report(run_dir.path, redraw=True)  # every figure, drawn once
    barrier()
    return report


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
