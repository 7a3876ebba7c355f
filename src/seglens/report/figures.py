"""Figures of a run, drawn only from ``RUN/results.json`` and ``RUN/arrays/*.npz``.

``draw_all`` draws every figure the results support into ``RUN/figures/`` and records them under
``results["figures"]``. Each figure has one function ``(results, run_dir) -> Figure | None`` that
returns None when its section is absent; each analysis lists its own figures in the registry
(``seglens.analyses``). This module holds the drawing loop, the stage series every probing curve
shares, and ``compare_runs`` (the layerwise curves of several runs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglens.report.canvas import (
    interval_band,
    label_stage_axis,
    llm_layer,
    new_figure,
    order_stages,
    relative_depth,
    save_figure,
    series_colour,
)
from seglens.report.overview import overview_figure
from seglens.rundir import RESULTS, load_results, put_section
from seglens.rundir.schema import level_values, main_condition, probing_summary
from seglens.stages import vision_block

log = logging.getLogger(__name__)

FIGURE_DIR = "figures"
LEVELS = ("patch", "pixel")
# --- numbers shared with the HTML readings: the schema's (one rule, one sign) -------------------
__all__ = ["all_figures", "compare_figure", "compare_runs", "draw_all", "level_values"]
__all__ += ["levels_present", "main_condition", "plot_series", "probing_summary", "stage_series"]


def stage_series(block: dict[str, Any], stages: Sequence[str], level: str) -> np.ndarray:
    """(S, 3) mIoU, CI low, CI high per stage (NaN where absent)."""
    values = level_values(block, level)
    out = np.full((len(stages), 3), np.nan)
    for i, stage in enumerate(stages):
        metric = values.get(stage)
        if not metric or metric.get("miou") is None:
            continue
        ci = (metric.get("ci") or {}).get("miou") or [None, None]
        out[i] = [metric["miou"], *(np.nan if v is None else v for v in ci)]
    return out


def levels_present(blocks: Sequence[dict[str, Any]]) -> list[str]:
    return [lv for lv in LEVELS if any(probing_summary(b, lv) for b in blocks)]


def plot_series(ax: Any, x: np.ndarray, series: np.ndarray, colour: Any, label: str) -> None:
    ax.plot(x, series[:, 0], "o-", color=colour, markersize=3, linewidth=1.5, label=label)
    interval_band(ax, x, series[:, 1], series[:, 2], colour)


# --- layerwise curve --------------------------------------------------------------------------
# --- several runs -----------------------------------------------------------------------------
def compare_runs(
    run_dirs: Sequence[str | Path],
    out_path: str | Path,
    labels: Sequence[str] | None = None,
) -> Path:
    """Overlay the layerwise curves (main condition) of any number of runs in one PNG.

    The paper's Figure 3: one curve per run with its 95% interval band, a star at the run's best
    stage, and its total LLM gain (last LLM layer minus adapter) written at the right edge. Runs
    with the same stages share categorical stage ticks; runs whose LLMs differ in depth are
    placed on a relative depth axis (adapter at 0, the last LLM block at 1).

    Args:
        run_dirs: run directories, each holding a ``results.json`` with a ``probing`` section.
        out_path: the PNG to write.
        labels: one legend label per run (default: model names, or folder names when those
            repeat).

    Returns:
        ``out_path`` as a Path.
    """
    return save_figure(compare_figure(run_dirs, labels), out_path)


def compare_figure(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None) -> Any:
    """The ``compare_runs`` figure (a ``Figure``, not saved)."""
    if not run_dirs:
        raise ValueError("compare_runs needs at least one run directory")
    runs = [load_results(Path(d) / RESULTS) for d in run_dirs]
    labels = _run_labels(run_dirs, runs, labels)
    blocks = []
    for run_dir, results in zip(run_dirs, runs, strict=True):
        if not results.get("probing"):
            raise ValueError(f"{run_dir} has no probing results; run `seglens probe` there first")
        blocks.append(results["probing"][main_condition(results)])
    stage_lists = [order_stages(b.get("stages") or b["metrics"]) for b in blocks]
    depths = {sum(llm_layer(s) is not None for s in stages) for stages in stage_lists}
    normalise = len(depths) > 1
    union = order_stages(s for stages in stage_lists for s in stages)
    levels = levels_present(blocks)
    fig = new_figure(max(7.0, 0.26 * len(union) + 2.0), 3.2 * max(len(levels), 1) + 0.6)
    axes = fig.subplots(max(len(levels), 1), 1, sharex=True, squeeze=False)[:, 0]
    for ax, level in zip(axes, levels, strict=False):
        for i, (stages, block, label) in enumerate(zip(stage_lists, blocks, labels, strict=True)):
            if normalise:
                num_llm = sum(llm_layer(s) is not None for s in stages)
                num_vision = sum(vision_block(s) is not None for s in stages)
                x = np.array([relative_depth(s, num_llm, num_vision) for s in stages])
            else:
                x = np.array([union.index(s) for s in stages], dtype=np.float64)
            series = stage_series(block, stages, level)
            plot_series(ax, x, series, series_colour(i), label)
            if np.isfinite(series[:, 0]).any():
                best = int(np.nanargmax(series[:, 0]))
                ax.plot(x[best], series[best, 0], "*", color=series_colour(i), markersize=13)
            _mark_total_gain(ax, stages, series, series_colour(i))
        ax.set_ylabel(f"{level} mIoU")
        ax.set_title("star: best stage; right edge: last LLM layer - adapter", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if normalise:
        ticks = [(-0.15, "encoder"), (0.0, "adapter")] + [(f, f"{f:.0%}") for f in (0.25, 0.5, 1)]
        axes[-1].set_xticks([t for t, _ in ticks])
        axes[-1].set_xticklabels([n for _, n in ticks], fontsize=8)
        axes[-1].set_xlabel("relative LLM depth (block l of L at l / L)")
    else:
        label_stage_axis(axes[-1], union)
    fig.suptitle("Layerwise linear probes across runs", fontsize=10)
    return fig


def _mark_total_gain(ax: Any, stages: list[str], series: np.ndarray, colour: Any) -> None:
    """Write the run's total LLM gain (last LLM layer minus adapter) at the axes' right edge,
    level with the last LLM layer's value."""
    llm = [i for i, s in enumerate(stages) if llm_layer(s) is not None]
    if "adapter" not in stages or not llm:
        return
    last, adapter = series[llm[-1], 0], series[stages.index("adapter"), 0]
    if not (np.isfinite(last) and np.isfinite(adapter)):
        return
    ax.annotate(
        f"{last - adapter:+.2f}",
        xy=(1.0, last),
        xycoords=("axes fraction", "data"),
        xytext=(4, 0),
        textcoords="offset points",
        va="center",
        fontsize=8,
        color=colour,
        annotation_clip=False,
    )


def _run_labels(
    run_dirs: Sequence[str | Path], runs: list[dict[str, Any]], labels: Sequence[str] | None
) -> list[str]:
    if labels is not None:
        if len(labels) != len(run_dirs):
            raise ValueError(
                f"got {len(labels)} labels for {len(run_dirs)} runs; give one label per run"
            )
        return [str(label) for label in labels]
    names = [str((r.get("model") or {}).get("name") or "") for r in runs]
    if all(names) and len(set(names)) == len(names):
        return names
    return [Path(d).name for d in run_dirs]


# --- per-class IoU ----------------------------------------------------------------------------
# --- qualitative maps -------------------------------------------------------------------------
# --- everything -------------------------------------------------------------------------------
FigureFn = Callable[[dict[str, Any], Path], Any]

#: Figures of the whole run, drawn before the analyses' own.
FRAME_FIGURES: dict[str, FigureFn] = {"overview": overview_figure}  # the report's first screen


def all_figures() -> dict[str, FigureFn]:
    """Every figure ``draw_all`` knows, by name (the PNG is ``figures/<name>.png``): the run's
    overview, then those of the registered analyses, in their order."""
    from seglens.analyses import ordered

    return FRAME_FIGURES | {name: draw for a in ordered() for name, draw in a.figures.items()}


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # import machinery probes (__path__, ...)
        raise AttributeError(name)
    if name == "FIGURES":  # the registry can grow after import: computed on access
        return all_figures()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def draw_all(run_dir: str | Path) -> dict[str, str]:
    """Draw every figure the run's results support and record them in ``results.json``.

    Args:
        run_dir: a run directory holding ``results.json`` (and the arrays it names).

    Returns:
        ``{name: "figures/<name>.png"}`` for the figures drawn, also written to
        ``results["figures"]`` (replacing what was there).
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir / RESULTS)
    drawn: dict[str, str] = {}
    for name, draw in all_figures().items():
        fig = draw(results, run_dir)
        if fig is None:
            log.debug("skipping figure %s: its section is absent from results.json", name)
            continue
        relative = f"{FIGURE_DIR}/{name}.png"
        save_figure(fig, run_dir / relative)
        drawn[name] = relative
    put_section(run_dir, "figures", drawn)
    log.info("drew %d figures into %s", len(drawn), run_dir / FIGURE_DIR)
    return drawn
