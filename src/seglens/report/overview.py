"""The report's first figure: the run at a glance, in the three panels of the paper's Figure 1.

(a) the layerwise probe curve with the drop at the adapter and the recovery across the LLM marked,
(b) the knockout gap (blocking the correctly classified tokens, and the incorrect ones, minus a
matched random control) per LLM layer with its 95% paired intervals, (c) per-position accuracy
under causal and bidirectional image attention. Drawn only from ``results.json`` and the arrays
it names; a panel whose analysis is absent says so instead of vanishing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from seglens.report.canvas import (
    interval_band,
    interval_bars,
    label_stage_axis,
    moving_average,
    new_figure,
    run_arrays,
    series_colour,
)
from seglens.rundir.schema import level_values, main_condition, probing_summary
from seglens.stages import llm_layer

__all__ = ["PREFERRED_POOL", "overview_figure"]

PREFERRED_POOL = "outside_pair"  # the paper's control; others are shown in the knockout section
DROP, RECOVERY = "crimson", "seagreen"


def overview_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Three panels: layerwise curve (drop and recovery), knockout gap, per-position accuracy.

    Args:
        results: a run's ``results.json``.
        run_dir: the run directory (for the per-position arrays); None skips panel (c).

    Returns:
        A ``Figure``, or None when the run has no probing results (nothing to overview).
    """
    if not results.get("probing"):
        return None
    fig = new_figure(12.0, 3.7)
    curve, knockout, positions = fig.subplots(1, 3, width_ratios=[1.25, 1.0, 1.0])
    _curve_panel(curve, results)
    _knockout_panel(knockout, results)
    _positions_panel(positions, results, run_dir)
    model = (results.get("model") or {}).get("name", "model")
    dataset = (results.get("dataset") or {}).get("name", "dataset")
    fig.suptitle(f"{model} on {dataset}: the run at a glance", fontsize=11)
    return fig


def _absent(ax: Any, title: str, text: str) -> None:
    ax.set_title(title, fontsize=9, loc="left")
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        fontsize=9,
        color="0.35",
        wrap=True,
        transform=ax.transAxes,
    )
    ax.set_xticks([])
    ax.set_yticks([])


# --- (a) layerwise curve ----------------------------------------------------------------------
def _curve_panel(ax: Any, results: dict[str, Any]) -> None:
    title = "(a) probe mIoU per stage"
    block = results["probing"][main_condition(results)]
    level = (block.get("summary") or {}).get("level") or "patch"
    summary = probing_summary(block, level) or probing_summary(block, "patch")
    if summary is None:
        _absent(ax, title, "No stage has a probe score.")
        return
    level = summary["level"]
    metrics = level_values(block, level)
    stages = list(metrics)
    x = np.arange(len(stages), dtype=np.float64)
    miou = [metrics[s].get("miou") for s in stages]
    ci = [(metrics[s].get("ci") or {}).get("miou") or [None, None] for s in stages]
    interval_band(ax, x, [c[0] for c in ci], [c[1] for c in ci], series_colour(0))
    values = np.array([np.nan if v is None else v for v in miou], dtype=np.float64)
    ax.plot(x, values, "o-", color=series_colour(0), markersize=3, linewidth=1.5)
    at = {s: i for i, s in enumerate(stages)}
    if summary["adapter_change"] is not None:
        _arrow(
            ax,
            at["encoder"],
            summary["encoder_miou"],
            at["adapter"],
            summary["adapter_miou"],
            DROP,
            f"adapter {summary['adapter_change']:+.2f}",
        )
    peak = summary["llm_peak_stage"]
    if summary["llm_gain"] is not None:
        _arrow(
            ax,
            at["adapter"],
            summary["adapter_miou"],
            at[peak],
            summary["llm_peak_miou"],
            RECOVERY,
            f"LLM {summary['llm_gain']:+.2f} (to {peak})",
        )
    best = summary["best_stage"]
    ax.plot(at[best], summary["best_miou"], "*", color="goldenrod", markersize=13, zorder=5)
    ticks = [s for s in stages if llm_layer(s) is None or s == peak or s == stages[-1]]
    label_stage_axis(ax, stages, fontsize=6.5)
    ax.set_xticks([at[s] for s in ticks], ticks, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(f"{level} mIoU (95% interval)", fontsize=8)
    ax.set_title(f"{title}: drop and recovery", fontsize=9, loc="left")
    ax.grid(alpha=0.3)


def _arrow(ax: Any, x0: float, y0: float, x1: float, y1: float, colour: str, text: str) -> None:
    ax.annotate(
        "",
        xy=(x1, y1),
        xytext=(x0, y0),
        arrowprops={"arrowstyle": "->", "color": colour, "linewidth": 1.8},
    )
    ax.annotate(
        text,
        xy=((x0 + x1) / 2, (y0 + y1) / 2),
        xytext=(4, -12 if y1 < y0 else 6),
        textcoords="offset points",
        color=colour,
        fontsize=8,
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.75, "pad": 1},
    )


# --- (b) knockout gap -------------------------------------------------------------------------
def _knockout_panel(ax: Any, results: dict[str, Any]) -> None:
    title = "(b) knockout gap"
    knockout = results.get("knockout")
    if not knockout:
        _absent(ax, title, "Attention knockout not run\n(seglens knockout --run RUN).")
        return
    if knockout.get("status") == "nothing_to_test":
        _absent(ax, title, f"Knockout: nothing to test.\n{knockout.get('reason', '')}")
        return
    pools = (knockout.get("differences") or {}).get("pools") or {}
    if not pools:
        _absent(ax, title, "This knockout has no paired intervals\n(rerun seglens knockout).")
        return
    pool = PREFERRED_POOL if PREFERRED_POOL in pools else next(iter(pools))
    per_stage = pools[pool]
    stages = sorted((s for s in per_stage if llm_layer(s) is not None), key=llm_layer)
    x = np.arange(len(stages), dtype=np.float64)
    for j, (name, label) in enumerate(
        (
            ("block_correct_minus_control", "block correct"),
            ("block_incorrect_minus_control", "block incorrect"),
        )
    ):
        cells = [(per_stage.get(s) or {}).get(name) or {} for s in stages]
        est, low, high = ([c.get(k) for c in cells] for k in ("estimate", "low", "high"))
        interval_bars(ax, x + 0.14 * (j - 0.5), est, low, high, series_colour(3 * j), label)
    ax.axhline(0, color="k", linewidth=0.8)
    label_stage_axis(ax, stages, fontsize=6.5)
    ax.set_ylabel("pair-token accuracy, minus control", fontsize=8)
    ax.set_title(f"{title} vs random control ({pool} pool)", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)


# --- (c) per-position accuracy ----------------------------------------------------------------
def _positions_panel(ax: Any, results: dict[str, Any], run_dir: str | Path | None) -> None:
    title = "(c) per-position accuracy"
    section = results.get("bidirectional")
    if not section or not section.get("position_accuracy_file") or run_dir is None:
        _absent(ax, title, "Bidirectional image attention not run\n(seglens bidir --run RUN).")
        return
    arrays = run_arrays(run_dir, section["position_accuracy_file"])
    conditions = section.get("conditions") or ["causal", "bidirectional_image"]
    missing = [c for c in conditions if c not in arrays]
    if missing:
        _absent(ax, title, f"{section['position_accuracy_file']} lacks {', '.join(missing)}.")
        return
    count = len(arrays[conditions[0]])
    grid = (results.get("model") or {}).get("grid") or []
    window = int(grid[1]) if len(grid) == 2 and int(grid[0]) * int(grid[1]) == count else 1
    window = window if window > 1 else max(1, count // 24)
    positions = np.arange(count)
    for i, condition in enumerate(conditions):
        smooth = moving_average(np.asarray(arrays[condition], dtype=np.float64), window)
        ax.plot(positions, smooth, color=series_colour(i), label=condition.replace("_", " "))
    ax.set_xlabel(f"image token position (raster; mean over {window})", fontsize=8)
    ax.set_ylabel(f"pixel accuracy at {section.get('layer', '?')}", fontsize=8)
    ax.set_title(f"{title}: causal vs bidirectional", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
