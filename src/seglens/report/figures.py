"""Figures of a run, drawn only from ``RUN/results.json`` and ``RUN/arrays/*.npz``.

``draw_all`` draws every figure the results support into ``RUN/figures/`` and records them under
``results["figures"]``. Each figure has one function ``(results, run_dir) -> Figure | None`` that
returns None when its section is absent. This module holds the probing figures (layerwise curve,
per-class IoU, qualitative maps) and ``compare_runs``; the knockout, bidirectional and UMAP
figures live in ``seglens.report.mechanisms``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglens.report import evidence, mechanisms
from seglens.report.canvas import (
    IGNORE,
    class_legend,
    class_name,
    colourise,
    interval_band,
    label_stage_axis,
    llm_layer,
    new_figure,
    order_stages,
    palette_array,
    relative_depth,
    run_arrays,
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
MAX_CLASS_BARS = 40
MAX_LEGEND_CLASSES = 24


# --- numbers shared with the HTML readings: the schema's (one rule, one sign) -------------------
__all__ = ["FIGURES", "compare_figure", "compare_runs", "draw_all", "level_values"]
__all__ += ["main_condition"]
__all__ += ["probing_summary"]


def _series(block: dict[str, Any], stages: Sequence[str], level: str) -> np.ndarray:
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


def _levels_present(blocks: Sequence[dict[str, Any]]) -> list[str]:
    return [lv for lv in LEVELS if any(probing_summary(b, lv) for b in blocks)]


def _plot_series(ax: Any, x: np.ndarray, series: np.ndarray, colour: Any, label: str) -> None:
    ax.plot(x, series[:, 0], "o-", color=colour, markersize=3, linewidth=1.5, label=label)
    interval_band(ax, x, series[:, 1], series[:, 2], colour)


# --- layerwise curve --------------------------------------------------------------------------
def layerwise_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Probe mIoU per stage (patch and pixel panels), 95% CI bands, one line per condition.

    The main condition carries the annotations: an arrow from encoder to adapter with the change,
    a star at the best stage and the LLM gain.
    """
    probing = results.get("probing")
    if not probing:
        return None
    conditions = list(probing)
    blocks = [probing[c] for c in conditions]
    levels = _levels_present(blocks)
    if not levels:
        return None
    stages = order_stages(s for b in blocks for s in (b.get("stages") or b.get("metrics", {})))
    x = np.arange(len(stages), dtype=np.float64)
    fig = new_figure(max(7.0, 0.26 * len(stages) + 2.0), 3.2 * len(levels) + 0.4)
    axes = fig.subplots(len(levels), 1, sharex=True, squeeze=False)[:, 0]
    main = main_condition(results)
    for ax, level in zip(axes, levels, strict=True):
        for i, (cond, block) in enumerate(zip(conditions, blocks, strict=True)):
            _plot_series(ax, x, _series(block, stages, level), series_colour(i), cond)
        summary = probing_summary(probing[main], level)
        if summary:
            _annotate_curve(ax, stages, summary)
        ax.set_ylabel(f"{level} mIoU")
        ax.grid(alpha=0.3)
        if len(conditions) > 1:
            ax.legend(fontsize=8, loc="lower right")
    label_stage_axis(axes[-1], stages)
    model = (results.get("model") or {}).get("name", "model")
    dataset = (results.get("dataset") or {}).get("name", "dataset")
    fig.suptitle(f"Layerwise linear probes: {model} on {dataset}", fontsize=10)
    return fig


def _annotate_curve(ax: Any, stages: list[str], summary: dict[str, Any]) -> None:
    values = summary["values"]
    if summary["adapter_change"] is not None:
        x0, x1 = stages.index("encoder"), stages.index("adapter")
        ax.annotate(
            "",
            xy=(x1, summary["adapter_miou"]),
            xytext=(x0, summary["encoder_miou"]),
            arrowprops={"arrowstyle": "->", "color": "crimson", "linewidth": 1.6},
        )
        ax.annotate(
            f"{summary['adapter_change']:+.2f}",
            xy=((x0 + x1) / 2, (summary["encoder_miou"] + summary["adapter_miou"]) / 2),
            xytext=(6, -12),
            textcoords="offset points",
            color="crimson",
            fontsize=8,
        )
    best = summary["best_stage"]
    ax.plot(stages.index(best), values[best], "*", color="goldenrod", markersize=15, zorder=5)
    ax.annotate(
        f"best {best}: {values[best]:.2f}",
        xy=(stages.index(best), values[best]),
        xytext=(0, 9),
        textcoords="offset points",
        ha="center",
        fontsize=8,
    )
    if summary["llm_gain"] is not None:
        ax.text(
            0.01,
            0.96,
            f"LLM gain {summary['llm_gain']:+.2f}",
            transform=ax.transAxes,
            va="top",
            fontsize=9,
        )
    low = min(values.values())
    high = max(values.values())
    ax.set_ylim(max(0.0, low - 0.1), min(1.05, high + 0.12))


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
    levels = _levels_present(blocks)
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
            series = _series(block, stages, level)
            _plot_series(ax, x, series, series_colour(i), label)
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
def per_class_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Per-class IoU at the best stage next to the adapter (main condition, summary level)."""
    probing = results.get("probing")
    if not probing:
        return None
    block = probing[main_condition(results)]
    level = (block.get("summary") or {}).get("level") or "patch"
    summary = probing_summary(block, level) or probing_summary(block, "patch")
    if summary is None:
        return None
    values = level_values(block, summary["level"])
    best = summary["best_stage"]
    shown = [s for s in dict.fromkeys(["adapter", best]) if s in values]
    per_class = {s: values[s].get("per_class_iou") or [] for s in shown}
    num_classes = max(len(v) for v in per_class.values())
    ids = [c for c in range(num_classes) if any(_get(per_class[s], c) is not None for s in shown)]
    if not ids:
        return None
    ids.sort(key=lambda c: -(_get(per_class[best], c) or 0.0))
    dropped = max(0, len(ids) - MAX_CLASS_BARS)
    ids = ids[:MAX_CLASS_BARS]
    dataset = results.get("dataset") or {}
    fig = new_figure(7.0, 0.2 * len(ids) * len(shown) / 2 + 1.6)
    ax = fig.subplots()
    y = np.arange(len(ids), dtype=np.float64)
    height = 0.8 / len(shown)
    for i, stage in enumerate(shown):
        iou = [_get(per_class[stage], c) for c in ids]
        iou = [np.nan if v is None else v for v in iou]
        colour = "0.6" if stage == "adapter" and stage != best else series_colour(i)
        ax.barh(y + (i - (len(shown) - 1) / 2) * height, iou, height, color=colour, label=stage)
    ax.set_yticks(y)
    ax.set_yticklabels([class_name(dataset, c) for c in ids], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{summary['level']} IoU")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    extra = f" (top {len(ids)} of {len(ids) + dropped} classes)" if dropped else ""
    ax.set_title(f"Per-class IoU: best stage {best} vs adapter{extra}", fontsize=10)
    return fig


def _get(values: Sequence[float | None], index: int) -> float | None:
    return values[index] if index < len(values) else None


# --- qualitative maps -------------------------------------------------------------------------
def qualitative_figure(results: dict[str, Any], run_dir: str | Path) -> Any:
    """Rows = images; columns = input, ground truth and the probe's map at each stage."""
    section = results.get("qualitative")
    if not section:
        return None
    arrays = run_arrays(run_dir, section["file"])
    stages = list(section.get("stages") or [])
    names = list(section.get("images") or [])
    count = len(names) or sum(k.startswith("image__") for k in arrays)
    if count == 0:
        return None
    dataset = results.get("dataset") or {}
    palette = palette_array(dataset)
    cols = 2 + len(stages)
    height, width = arrays["mask__0"].shape[:2]
    fig = new_figure(1.8 * cols, 1.8 * count * min(height / width, 1.5) + 1.0)
    axes = fig.subplots(count, cols, squeeze=False)
    counts: dict[int, int] = {}
    for row in range(count):
        mask = arrays[f"mask__{row}"]
        panels = [("input", arrays[f"image__{row}"]), ("ground truth", mask)]
        panels += [(s, arrays[f"pred__{s}__{row}"]) for s in stages]
        for col, (title, data) in enumerate(panels):
            ax = axes[row, col]
            if col == 0:
                ax.imshow(data)
            else:
                ax.imshow(colourise(data, palette), interpolation="nearest")
                ids, n = np.unique(data[data != IGNORE], return_counts=True)
                for i, k in zip(ids.tolist(), n.tolist(), strict=True):
                    counts[i] = counts.get(i, 0) + k
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(names[row] if row < len(names) else f"image {row}", fontsize=7)
    present = sorted(counts, key=lambda i: -counts[i])[:MAX_LEGEND_CLASSES]
    class_legend(fig, dataset, palette, present)
    fig.suptitle("Probe predictions per stage (black: ignore / not scored)", fontsize=10)
    return fig


# --- everything -------------------------------------------------------------------------------
FigureFn = Callable[[dict[str, Any], Path], Any]

FIGURES: dict[str, FigureFn] = {
    "overview": overview_figure,  # the report's first screen
    "layerwise_miou": layerwise_figure,
    "per_class_iou": per_class_figure,
    "qualitative": qualitative_figure,
    "knockout_curves": mechanisms.knockout_curves_figure,
    "knockout_summary": mechanisms.knockout_summary_figure,
    "knockout_window_sweep": mechanisms.window_sweep_figure,
    "bidirectional_miou": mechanisms.bidirectional_miou_figure,
    "bidirectional_positions": mechanisms.bidirectional_positions_figure,
    "bidirectional_heatmaps": mechanisms.bidirectional_heatmaps_figure,
    "umap": mechanisms.umap_figure,
    "differences": evidence.differences_figure,
    "knockout_gaps": evidence.knockout_gaps_figure,
    "attention_anchors": evidence.attention_figure,
}
"""Every figure ``draw_all`` knows, by name (the PNG is ``figures/<name>.png``)."""


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
    for name, draw in FIGURES.items():
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
