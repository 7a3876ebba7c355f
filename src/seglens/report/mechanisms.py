"""Figures of the mechanism experiments: attention knockout, bidirectional attention and UMAP.

Each function takes ``(results, run_dir)`` and returns a ``Figure``, or None when its section of
``results.json`` is absent; ``seglens.report.figures.draw_all`` saves them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from seglens.report.canvas import (
    GREY,
    class_legend,
    label_stage_axis,
    llm_layer,
    moving_average,
    new_figure,
    order_stages,
    palette_array,
    run_arrays,
    series_colour,
)

METRICS = ("accuracy", "iou", "recovery")
CONDITION_COLOURS = {
    "none": (0.1, 0.1, 0.1),
    "block_correct": (0.84, 0.15, 0.16),
    "block_incorrect": (0.12, 0.47, 0.71),
    "random_correct": (1.0, 0.5, 0.05),
    "random_incorrect": (0.17, 0.63, 0.17),
}


def _condition_colour(condition: str, index: int) -> Any:
    return CONDITION_COLOURS.get(condition, series_colour(index))


def _number(value: Any) -> float:
    return np.nan if value is None else float(value)


# --- knockout ---------------------------------------------------------------------------------
def knockout_conditions(knockout: dict[str, Any]) -> list[str]:
    """The knockout conditions in their recorded order (those with curves only)."""
    curves = knockout.get("curves") or {}
    listed = knockout.get("conditions") or list(curves)
    return [c for c in listed if c in curves]


def _knockout_window(knockout: dict[str, Any]) -> str:
    layers = knockout.get("layers")
    return f"keys blocked at llm.{layers[0]}-llm.{layers[1]}" if layers else "all LLM layers"


def knockout_curves_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Pair accuracy and 2-class IoU per LLM layer, one line per knockout condition."""
    knockout = results.get("knockout")
    if not knockout or not knockout_conditions(knockout):
        return None
    conditions = knockout_conditions(knockout)
    curves = knockout["curves"]
    stages = order_stages(s for c in conditions for s in curves[c])
    numeric = all(llm_layer(s) is not None for s in stages)
    x = np.array([llm_layer(s) if numeric else i for i, s in enumerate(stages)], dtype=float)
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(11.0, 3.8)
    axes = fig.subplots(1, 2)
    for ax, metric, title in zip(
        axes, ("accuracy", "iou"), ("accuracy", "2-class IoU"), strict=True
    ):
        for i, cond in enumerate(conditions):
            y = [_number((curves[cond].get(s) or {}).get(metric)) for s in stages]
            style = "o-" if cond == "none" else ".-"
            ax.plot(x, y, style, color=_condition_colour(cond, i), markersize=4, label=cond)
        summary = knockout.get("summary_layer")
        if summary in stages:
            ax.axvline(x[stages.index(summary)], color="0.5", linestyle="--", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if numeric:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("LLM layer (probe at llm.l)")
        else:
            label_stage_axis(ax, stages)
    axes[0].set_ylabel("pair tokens")
    axes[1].legend(fontsize=8, loc="best")
    pairs = len(knockout.get("pairs") or [])
    fig.suptitle(
        f"Attention knockout over {pairs} class pairs ({_knockout_window(knockout)})", fontsize=10
    )
    return fig


def knockout_summary_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Grouped bars of accuracy, IoU and recovery per condition at ``summary_layer``."""
    knockout = results.get("knockout")
    if not knockout or not knockout_conditions(knockout):
        return None
    layer = knockout.get("summary_layer")
    conditions = [c for c in knockout_conditions(knockout) if layer in knockout["curves"][c]]
    if not conditions:
        return None
    fig = new_figure(max(6.0, 1.3 * len(conditions) + 2), 3.6)
    ax = fig.subplots()
    x = np.arange(len(conditions), dtype=float)
    width = 0.8 / len(METRICS)
    for j, metric in enumerate(METRICS):
        values = [_number(knockout["curves"][c][layer].get(metric)) for c in conditions]
        bars = ax.bar(x + (j - 1) * width, values, width, color=series_colour(j), label=metric)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(x)
    ax.set_xticklabels(conditions, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    ax.set_title(f"Knockout at {layer} ({_knockout_window(knockout)})", fontsize=10)
    return fig


def window_sweep_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Heatmaps (window x condition) of accuracy and IoU when only a layer window is knocked out."""
    knockout = results.get("knockout") or {}
    sweep = knockout.get("window_sweep")
    if not sweep:
        return None
    conditions = [c for c in knockout_conditions(knockout) if any(c in row for row in sweep)]
    if not conditions:
        conditions = list(dict.fromkeys(k for row in sweep for k in row if k != "layers"))
    rows = [f"llm.{row['layers'][0]}-{row['layers'][1]}" for row in sweep]
    fig = new_figure(min(14.0, 2.5 + 1.8 * len(conditions)), 1.6 + 0.3 * len(rows))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "iou"), strict=True):
        grid = np.array(
            [[_number((row.get(c) or {}).get(metric)) for c in conditions] for row in sweep]
        )
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for (r, c), value in np.ndenumerate(grid):
            if np.isfinite(value):
                colour = "black" if value > 0.6 else "white"
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(len(conditions)))
        ax.set_xticklabels(conditions, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows, fontsize=7)
        ax.set_title(metric, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(f"Knockout window sweep (probed at {knockout.get('summary_layer')})", fontsize=10)
    return fig


# --- bidirectional ----------------------------------------------------------------------------
def bidirectional_miou_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Probe mIoU per stage under causal and bidirectional image attention."""
    section = results.get("bidirectional")
    if not section or not section.get("miou"):
        return None
    miou = section["miou"]
    conditions = [c for c in section.get("conditions") or list(miou) if c in miou]
    stages = order_stages(s for c in conditions for s in miou[c])
    fig = new_figure(max(7.0, 0.26 * len(stages) + 2.0), 3.6)
    ax = fig.subplots()
    for i, cond in enumerate(conditions):
        y = [_number(miou[cond].get(s)) for s in stages]
        ax.plot(range(len(stages)), y, "o-", color=series_colour(i), markersize=3, label=cond)
    layer = section.get("layer")
    if layer in stages:
        ax.axvline(stages.index(layer), color="0.5", linestyle="--", linewidth=1)
        ax.text(stages.index(layer), ax.get_ylim()[0], f" {layer}", fontsize=7, va="bottom")
    label_stage_axis(ax, stages)
    ax.set_ylabel("mIoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Causal vs bidirectional image attention", fontsize=10)
    return fig


def position_accuracy(results: dict[str, Any], run_dir: str | Path) -> dict[str, np.ndarray]:
    """``{"causal", "bidirectional_image", "difference"}`` per-position accuracy, each (N,)."""
    section = results["bidirectional"]
    arrays = run_arrays(run_dir, section["position_accuracy_file"])
    causal, bidir = section.get("conditions") or ["causal", "bidirectional_image"]
    out = {"causal": arrays[causal], "bidirectional_image": arrays[bidir]}
    out["difference"] = arrays.get("difference", arrays[bidir] - arrays[causal])
    return out


def _grid(results: dict[str, Any], count: int) -> tuple[int, int] | None:
    grid = (results.get("model") or {}).get("grid")
    if grid and int(grid[0]) * int(grid[1]) == count:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(count)
    return (side, side) if side * side == count else None


def bidirectional_positions_figure(results: dict[str, Any], run_dir: str | Path) -> Any:
    """Per-position accuracy over raster positions (both conditions, then their difference)."""
    section = results.get("bidirectional")
    if not section or not section.get("position_accuracy_file"):
        return None
    acc = position_accuracy(results, run_dir)
    count = len(acc["causal"])
    grid = _grid(results, count)
    window = grid[1] if grid else max(1, count // 24)
    positions = np.arange(count)
    fig = new_figure(10.0, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, cond in enumerate(("causal", "bidirectional_image")):
        colour = series_colour(i)
        top.plot(positions, acc[cond], color=colour, alpha=0.25, linewidth=0.7)
        top.plot(positions, moving_average(acc[cond], window), color=colour, label=cond)
    top.set_ylabel("pixel accuracy")
    top.legend(fontsize=8, loc="lower right")
    diff = acc["difference"]
    bottom.plot(positions, diff, color="0.5", alpha=0.4, linewidth=0.7)
    bottom.plot(positions, moving_average(diff, window), color="crimson", label="difference")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("bidirectional - causal")
    bottom.set_xlabel(f"image token position (raster order; moving average over {window})")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Per-position accuracy at {section.get('layer')}", fontsize=10)
    return fig


def bidirectional_heatmaps_figure(results: dict[str, Any], run_dir: str | Path) -> Any:
    """g x g maps of per-position accuracy: causal, bidirectional and their difference."""
    section = results.get("bidirectional")
    if not section or not section.get("position_accuracy_file"):
        return None
    acc = position_accuracy(results, run_dir)
    grid = _grid(results, len(acc["causal"]))
    if grid is None:
        return None
    fig = new_figure(12.0, 4.0)
    axes = fig.subplots(1, 3)
    for ax, cond in zip(axes[:2], ("causal", "bidirectional_image"), strict=True):
        image = ax.imshow(acc[cond].reshape(grid), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(cond, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    diff = acc["difference"].reshape(grid)
    limit = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    limit = limit or 1e-6
    image = axes[2].imshow(diff, cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes[2].set_title("bidirectional - causal", fontsize=9)
    fig.colorbar(image, ax=axes[2], shrink=0.8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Per-position accuracy on the {grid[0]}x{grid[1]} grid at {section.get('layer')}")
    return fig


# --- UMAP -------------------------------------------------------------------------------------
def umap_figure(results: dict[str, Any], run_dir: str | Path) -> Any:
    """One scatter per stage, the shown classes in palette colours and the rest grey."""
    section = results.get("umap")
    if not section or not section.get("stages"):
        return None
    arrays = run_arrays(run_dir, section["file"])
    stages = list(section["stages"])
    dataset = results.get("dataset") or {}
    palette = palette_array(dataset)
    shown = [int(c) for c in section.get("classes") or []]
    scores = section.get("scores") or {}
    size = float(np.clip(4000 / max(len(arrays[f"labels__{stages[0]}"]), 1), 1, 12))
    cols = min(4, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig = new_figure(3.0 * cols, 3.0 * rows + 0.7)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, stage in zip(axes, stages, strict=False):
        points = arrays[f"embedding__{stage}"]
        labels = arrays[f"labels__{stage}"]
        other = ~np.isin(labels, shown)
        ax.scatter(*points[other].T, s=size, color=GREY, alpha=0.4, linewidths=0, rasterized=True)
        for c in shown:
            if 0 <= c < len(palette) and (labels == c).any():
                chosen = points[labels == c]
                ax.scatter(*chosen.T, s=size * 1.5, color=palette[c], linewidths=0, rasterized=True)
        score = scores.get(stage) or {}
        ax.set_title(
            f"{stage}\nsilhouette {_fmt(score.get('silhouette'))}, "
            f"k-NN {_fmt(score.get('knn_accuracy'))}",
            fontsize=8,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(stages) :]:
        ax.set_axis_off()
    class_legend(fig, dataset, palette, shown)
    fig.suptitle("UMAP of image-token features per stage (grey: other classes)", fontsize=10)
    return fig


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
