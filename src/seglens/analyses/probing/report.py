"""Figures, captions and report blocks of the layerwise-probing analysis.

Drawn only from the ``probing`` and ``qualitative`` sections of ``results.json`` and the arrays
they name; each figure function returns None when its section is absent. The captions are plain
sentences built from the same numbers the figures draw (``schema.probing_summary``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglens.report.canvas import (
    IGNORE,
    class_legend,
    class_name,
    colourise,
    interval_band,
    label_stage_axis,
    new_figure,
    order_stages,
    palette_array,
    run_arrays,
    series_colour,
)
from seglens.report.evidence import bars, interval_text, significance
from seglens.report.figures import levels_present, plot_series, stage_series
from seglens.report.page import Page, escape, interval, not_run, num, paragraph, table
from seglens.rundir.schema import level_values, main_condition, probing_summary
from seglens.stages import llm_layer

__all__ = ["FIGURES", "block", "layerwise_figure", "qualitative_block"]

MAX_CLASS_BARS = 40
MAX_LEGEND_CLASSES = 24


# --- figures ----------------------------------------------------------------------------------
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
    levels = levels_present(blocks)
    if not levels:
        return None
    stages = order_stages(s for b in blocks for s in (b.get("stages") or b.get("metrics", {})))
    x = np.arange(len(stages), dtype=np.float64)
    fig = new_figure(max(7.0, 0.26 * len(stages) + 2.0), 3.2 * len(levels) + 0.4)
    axes = fig.subplots(len(levels), 1, sharex=True, squeeze=False)[:, 0]
    main = main_condition(results)
    for ax, level in zip(axes, levels, strict=True):
        for i, (cond, block) in enumerate(zip(conditions, blocks, strict=True)):
            plot_series(ax, x, stage_series(block, stages, level), series_colour(i), cond)
        summary = probing_summary(probing[main], level)
        if summary:
            _annotate_curve(ax, stages, summary)
        lens = _plot_lens(ax, x, stages, results.get("lens"), level, first=len(conditions))
        ax.set_ylabel(f"{level} mIoU")
        ax.grid(alpha=0.3)
        if len(conditions) > 1 or lens:
            ax.legend(fontsize=7, loc="lower right")
    label_stage_axis(axes[-1], stages)
    model = (results.get("model") or {}).get("name", "model")
    dataset = (results.get("dataset") or {}).get("name", "dataset")
    fig.suptitle(f"Layerwise linear probes: {model} on {dataset}", fontsize=10)
    return fig


#: Line style of each lens readout on the layerwise figure (the probe's lines are solid).
LENS_STYLES = {"logit": "--", "embedding": ":"}


def _plot_lens(
    ax: Any,
    x: np.ndarray,
    stages: list[str],
    section: Mapping[str, Any] | None,
    level: str,
    first: int,
) -> list[str]:
    """Draw the ``lens`` section's readouts (every readout and mode it holds, 95% CI bands) at
    ``level`` on the probe's axis, dashed (logit) or dotted (embedding), widening the y range
    to hold them; returns the readouts drawn (none when the section is absent)."""
    drawn = []
    for j, (key, block) in enumerate(((section or {}).get("readouts") or {}).items()):
        series = stage_series(block, stages, level)
        if not np.isfinite(series[:, 0]).any():
            continue
        colour = series_colour(first + j)
        style = LENS_STYLES.get(key.split("/")[0], "-.")
        ax.plot(
            x,
            series[:, 0],
            style,
            marker="s",
            markersize=2.5,
            color=colour,
            linewidth=1.3,
            label=f"{key} lens",
        )
        interval_band(ax, x, series[:, 1], series[:, 2], colour)
        drawn.append(key)
    if drawn:
        lines = [v for line in ax.get_lines() for v in np.asarray(line.get_ydata(), float)]
        finite = [v for v in lines if np.isfinite(v)]
        low, high = ax.get_ylim()
        ax.set_ylim(max(0.0, min([low, *finite]) - 0.03), max(high, *finite))
    return drawn


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


def probing_text(block: dict[str, Any]) -> str:
    """Sentences on one probing condition's paired differences."""
    diff = block.get("differences") or {}
    if not diff:
        return ""
    parts = []
    if diff.get("adapter_minus_encoder"):
        parts.append(interval_text("adapter minus encoder mIoU", diff["adapter_minus_encoder"]))
    best = diff.get("best_llm_minus_adapter")
    if best:
        parts.append(interval_text(f"best LLM layer ({best['stage']}) minus adapter", best))
    per_layer = diff.get("llm_minus_adapter") or {}
    sig = [s for s, d in per_layer.items() if significance(d) == "significant at 95%"]
    if per_layer:
        parts.append(
            f"{len(sig)} of {len(per_layer)} LLM layers differ from the adapter significantly"
            + (f" ({', '.join(sig)})" if sig and len(sig) <= 8 else "")
        )
    level = diff.get("level", "")
    return f"Paired {level}-level intervals over images: " + "; ".join(parts) + "."


def convergence_text(block: dict[str, Any]) -> str:
    """A warning sentence for stages whose probe did not converge or sits at the grid's edge."""
    record = block.get("convergence") or {}
    parts = []
    if record.get("not_converged"):
        parts.append(
            "NOT CONVERGED (held-out loss still improving at the epoch limit; these scores "
            f"measure the optimiser): {', '.join(record['not_converged'])}"
        )
    if record.get("lr_at_grid_edge"):
        parts.append(
            f"learning rate at the edge of the grid: {', '.join(record['lr_at_grid_edge'])}"
        )
    if record.get("not_checked"):
        parts.append(f"convergence not checked: {', '.join(record['not_checked'])}")
    return "; ".join(parts) + "." if parts else ""


def differences_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Error bars: LLM layer minus adapter (and adapter minus encoder) per probing condition."""
    probing = results.get("probing") or {}
    blocks = {c: b["differences"] for c, b in probing.items() if b.get("differences")}
    if not blocks:
        return None
    fig = new_figure(7.5, 3.6)
    ax = fig.subplots()
    stages = None
    for j, (condition, diff) in enumerate(blocks.items()):
        rows = [("adapter", diff.get("adapter_minus_encoder"))]
        rows += list((diff.get("llm_minus_adapter") or {}).items())
        rows = [(s, d) for s, d in rows if d and d.get("estimate") is not None]
        if not rows:
            continue
        stages = stages or [s for s, _ in rows]
        x = np.array([stages.index(s) for s, _ in rows if s in stages], dtype=float)
        bars(ax, x + 0.12 * j, [d for s, d in rows if s in stages], series_colour(j), condition)
    if stages:
        label_stage_axis(ax, stages)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("mIoU difference")
    ax.set_title("adapter - encoder, then each LLM layer - adapter (95% paired CI)", fontsize=9)
    ax.legend(fontsize=7)
    return fig


# --- captions ---------------------------------------------------------------------------------
def _moves(delta: float) -> str:
    """'falls by 0.12' / 'rises by 0.05' / 'stays level'."""
    if abs(delta) < 0.0005:
        return "stays level"
    return f"{'rises' if delta > 0 else 'falls'} by {abs(delta):.2f}"


def layerwise_caption(results: dict[str, Any]) -> str:
    """The adapter drop, the recovery across the LLM and the best stage, per level (of the
    model's native attention, ``schema.main_condition``)."""
    probing = results["probing"]
    main = main_condition(results)
    sentences = []
    for level in ("patch", "pixel"):
        summary = probing_summary(probing[main], level)
        if summary is None:
            continue
        parts = []
        if summary["adapter_change"] is not None:
            parts.append(
                f"{level}-level mIoU {_moves(summary['adapter_change'])} from the encoder "
                f"({summary['encoder_miou']:.2f}) to the adapter ({summary['adapter_miou']:.2f})"
            )
        if summary["llm_gain"] is not None and summary["llm_peak_stage"] is not None:
            verb = "recovers" if summary["llm_gain"] >= 0 else "changes"
            parts.append(
                f"then {verb} by {summary['llm_gain']:+.2f} across the LLM layers, peaking at "
                f"{summary['llm_peak_stage']} ({summary['llm_peak_miou']:.2f})"
            )
        text = ", ".join(parts) if parts else f"{level}-level mIoU is shown per stage"
        text = text[0].upper() + text[1:]
        sentences.append(
            f"{text}; the best stage overall is {summary['best_stage']} "
            f"({summary['best_miou']:.2f})."
        )
    for condition, block in probing.items():
        if condition == main:
            continue
        ours, theirs = probing_summary(block, "patch"), probing_summary(probing[main], "patch")
        if ours and theirs:
            sentences.append(
                f"Under {condition} the best patch-level stage is {ours['best_stage']} "
                f"({ours['best_miou']:.2f}, vs {theirs['best_miou']:.2f} for {main})."
            )
    lens = (results.get("lens") or {}).get("readouts") or {}
    if lens:
        sentences.append(
            "Dashed and dotted: the logit and embedding lens (no training; 'all' scores every "
            "class, 'present' only the image's, an oracle), read from the same images: "
            + "; ".join(_lens_best(key, block) for key, block in lens.items())
            + "."
        )
    sentences.append("Shaded bands are 95% bootstrap intervals over images.")
    return " ".join(sentences)


def _lens_best(key: str, block: Mapping[str, Any]) -> str:
    summary = block.get("summary") or {}
    best = summary.get("best_stage")
    if best is None:
        return f"{key} not scored"
    return f"{key} best at {best} ({summary['miou'][best]:.2f} {summary.get('level', 'patch')})"


def per_class_caption(probing: dict[str, Any], results: dict[str, Any]) -> str:
    """How many classes gain from the adapter to the best stage, and which gain most."""
    block = probing[main_condition(results)]
    level = (block.get("summary") or {}).get("level") or "patch"
    summary = probing_summary(block, level) or probing_summary(block, "patch")
    if summary is None:
        return ""
    values = level_values(block, summary["level"])
    best = summary["best_stage"]
    if "adapter" not in values or best == "adapter":
        return f"Per-class IoU at the best stage, {best}."
    at_best = values[best].get("per_class_iou") or []
    at_adapter = values["adapter"].get("per_class_iou") or []
    deltas = {
        c: b - a
        for c, (b, a) in enumerate(zip(at_best, at_adapter, strict=False))
        if a is not None and b is not None
    }
    if not deltas:
        return f"Per-class IoU at {best} and at the adapter."
    dataset = results.get("dataset") or {}
    gains = sorted(deltas, key=lambda c: -deltas[c])
    top = ", ".join(f"{class_name(dataset, c)} ({deltas[c]:+.2f})" for c in gains[:3])
    better = sum(d > 0 for d in deltas.values())
    return (
        f"{better} of {len(deltas)} classes score a higher IoU at {best} than at the adapter; "
        f"the largest changes are {top}."
    )


def qualitative_caption(section: dict[str, Any]) -> str:
    """What the qualitative panel shows."""
    stages = ", ".join(section.get("stages") or []) or "no stage"
    count = len(section.get("images") or [])
    return (
        f"{count} evaluation images; columns show the input, the ground truth and the probe's "
        f"map at {stages}. Colours follow the dataset palette; black marks ignored or unscored "
        "pixels."
    )


# --- report blocks ----------------------------------------------------------------------------
def _stage_table(block: dict[str, Any]) -> str:
    patch = level_values(block, "patch")
    pixel = level_values(block, "pixel")
    stages = order_stages(block.get("stages") or list(block.get("metrics") or {}))
    summary = probing_summary(block, "patch") or probing_summary(block, "pixel")
    best = summary["best_stage"] if summary else None
    rows, classes = [], []
    for stage in stages:
        p, q = patch.get(stage) or {}, pixel.get(stage) or {}
        acc = q or p  # accuracies at pixel level when it was scored
        rows.append(
            [
                escape(stage),
                interval(p.get("miou"), (p.get("ci") or {}).get("miou")),
                interval(q.get("miou"), (q.get("ci") or {}).get("miou")),
                interval(acc.get("pixel_accuracy"), (acc.get("ci") or {}).get("pixel_accuracy")),
                num(acc.get("mean_class_accuracy")),
            ]
        )
        classes.append("best" if stage == best else "")
    header = [
        "Stage",
        "Patch mIoU [95% CI]",
        "Pixel mIoU [95% CI]",
        "Pixel acc [95% CI]",
        "Mean class acc",
    ]
    return table(header, rows, classes)


def block(results: Mapping[str, Any], page: Page) -> str:
    """The probing section of ``report.html``: curve, per-class bars, a table per condition."""
    probing = results.get("probing")
    if not probing:
        return not_run("probing")
    parts = [page.figure("layerwise_miou", layerwise_caption(results))]
    parts.append(page.figure("per_class_iou", per_class_caption(probing, results)))
    for condition, block in probing.items():
        solver = block.get("solver")
        note = f" (solver: {solver})" if solver else ""
        parts.append(f"<h3>Per-stage scores: {escape(condition)}{escape(note)}</h3>")
        parts.append(_stage_table(block))
        for text in (convergence_text(block), probing_text(block)):
            parts.append(paragraph(text))
    parts.append(page.figure("differences"))
    parts.append(
        '<p class="muted">Intervals are 95% bootstrap intervals over images; the best stage is '
        "highlighted. Accuracies are at pixel level when it was scored, else at patch level.</p>"
    )
    return "\n".join(parts)


def qualitative_block(results: Mapping[str, Any], page: Page) -> str:
    """The qualitative-maps section of ``report.html``."""
    if not results.get("qualitative"):
        return not_run("qualitative")
    return page.figure("qualitative", qualitative_caption(results["qualitative"]))


FIGURES = {
    "layerwise_miou": layerwise_figure,
    "per_class_iou": per_class_figure,
    "qualitative": qualitative_figure,
    "differences": differences_figure,
}


# --- the first screen's panel: the layerwise curve, with the drop and the recovery marked ---------
DROP, RECOVERY = "crimson", "seagreen"


def overview_panel(ax: Any, results: dict[str, Any], run_dir: Any, label: str) -> str | None:
    """The layerwise probe curve with the drop at the adapter and the recovery across the LLM
    marked (``Panel.draw``)."""
    block = results["probing"][main_condition(results)]
    level = (block.get("summary") or {}).get("level") or "patch"
    summary = probing_summary(block, level) or probing_summary(block, "patch")
    if summary is None:
        return "No stage has a probe score."
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
    ax.set_title(f"{label} probe mIoU per stage: drop and recovery", fontsize=9, loc="left")
    ax.grid(alpha=0.3)
    return None


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
