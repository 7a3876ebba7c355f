"""Figures, captions and the report block of the attention-knockout analysis.

Everything here is drawn from the ``knockout`` section of ``results.json`` only; each figure
function returns None when the section is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from seglens.report.canvas import (
    as_float,
    interval_bars,
    label_stage_axis,
    llm_layer,
    new_figure,
    order_stages,
    series_colour,
)
from seglens.report.evidence import bars, interval_text, llm_stages
from seglens.report.page import Page, escape, not_run, num, paragraph, table

__all__ = ["FIGURES", "block", "knockout_conditions"]


# --- figures ----------------------------------------------------------------------------------
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
            y = [as_float((curves[cond].get(s) or {}).get(metric)) for s in stages]
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
        values = [as_float(knockout["curves"][c][layer].get(metric)) for c in conditions]
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
            [[as_float((row.get(c) or {}).get(metric)) for c in conditions] for row in sweep]
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


def knockout_gaps_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Per control pool, block-correct and block-incorrect minus their matched control per LLM
    stage, with 95% paired intervals."""
    knockout = results.get("knockout") or {}
    pools = (knockout.get("differences") or {}).get("pools") or {}
    if not pools:
        return None
    fig = new_figure(4.2 * len(pools), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(pools), sharey=True))
    for ax, (pool, per_stage) in zip(axes, pools.items(), strict=True):
        stages = llm_stages(per_stage)
        x = np.arange(len(stages), dtype=float)
        for j, name in enumerate(("block_correct_minus_control", "block_incorrect_minus_control")):
            cells = [(per_stage.get(s) or {}).get(name) or {} for s in stages]
            keep = [i for i, c in enumerate(cells) if c.get("estimate") is not None]
            label = name.replace("_minus_control", " - control")
            bars(ax, x[keep] + 0.15 * j, [cells[i] for i in keep], series_colour(j), label)
        label_stage_axis(ax, stages)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"control pool: {pool}", fontsize=9)
    axes[0].set_ylabel("pair-token accuracy difference")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Knockout ({knockout.get('mode', 'block')}) vs matched controls", fontsize=10)
    return fig


def knockout_text(knockout: dict[str, Any]) -> str:
    """The block-correct gap under each pool at the summary layer, in words."""
    if knockout.get("status") == "nothing_to_test":
        return f"Nothing to test: {knockout.get('reason')}"
    diff = knockout.get("differences") or {}
    layer = knockout.get("summary_layer")
    parts = []
    for pool, per_stage in (diff.get("pools") or {}).items():
        cell = (per_stage.get(layer) or {}).get("block_correct_minus_control")
        parts.append(interval_text(f"block-correct minus control ({pool} pool)", cell))
    none = ((diff.get("minus_none") or {}).get(layer) or {}).get("block_correct")
    if none:
        parts.append(interval_text("block-correct minus none", none))
    if not parts:
        return ""
    return f"At {layer}, pair-token accuracy: " + "; ".join(parts) + "."


# --- captions ---------------------------------------------------------------------------------
MIN_CONTROL_EFFECT = 0.005


def _at(knockout: dict[str, Any], condition: str, metric: str = "accuracy") -> float | None:
    layer = knockout.get("summary_layer")
    return ((knockout.get("curves") or {}).get(condition, {}).get(layer) or {}).get(metric)


def summary_caption(knockout: dict[str, Any]) -> str:
    """Each blocked set's effect at ``summary_layer`` against its random control of equal size."""
    layer = knockout.get("summary_layer")
    base = _at(knockout, "none")
    if base is None:
        return f"Accuracy, 2-class IoU and recovery rate per condition at {layer}."
    sentences = [f"Without knockout, pair accuracy at {layer} is {base:.2f}."]
    for target, words in (("correct", "correctly"), ("incorrect", "incorrectly")):
        blocked, control = _at(knockout, f"block_{target}"), _at(knockout, f"random_{target}")
        if blocked is None:
            continue
        effect = base - blocked
        text = (
            f"Blocking the {words} classified tokens "
            f"{'lowers' if effect >= 0 else 'raises'} accuracy at {layer} by {abs(effect):.2f}"
        )
        if control is not None:
            control_effect = base - control
            if abs(control_effect) >= MIN_CONTROL_EFFECT and effect * control_effect > 0:
                text += (
                    f", {effect / control_effect:.1f}x as much as a random control of the same "
                    f"size ({control_effect:.2f})"
                )
            else:
                text += (
                    f", while a random control of the same size moves it by {-control_effect:+.2f}"
                )
        sentences.append(text + ".")
    recovery = {
        c: _at(knockout, c, "recovery")
        for c in knockout_conditions(knockout)
        if _at(knockout, c, "recovery") is not None
    }
    if recovery:
        listed = ", ".join(f"{c} {v:.2f}" for c, v in recovery.items())
        sentences.append(f"Share of initially incorrect tokens that end correct: {listed}.")
    return " ".join(sentences)


def curves_caption(knockout: dict[str, Any]) -> str:
    """Where along the LLM the strongest knockout's effect is largest."""
    curves = knockout.get("curves") or {}
    if "none" not in curves:
        return "Pair accuracy and 2-class IoU per LLM layer for each knockout condition."
    worst_condition, worst_stage, worst = None, None, 0.0
    for cond in knockout_conditions(knockout):
        for stage, scores in curves[cond].items():
            base = (curves["none"].get(stage) or {}).get("accuracy")
            if base is None or scores.get("accuracy") is None:
                continue
            if base - scores["accuracy"] > worst:
                worst_condition, worst_stage, worst = cond, stage, base - scores["accuracy"]
    pairs = len(knockout.get("pairs") or [])
    text = f"Averaged over {pairs} conflicting class pairs. "
    if worst_condition is None:
        return text + "No knockout lowers pair accuracy at any layer."
    return text + (
        f"The largest accuracy loss is {worst:.2f}, under {worst_condition} at {worst_stage}; "
        "the dashed line marks the summary layer."
    )


def sweep_caption(knockout: dict[str, Any]) -> str | None:
    """Which layer window hurts most when the correctly classified tokens are blocked there."""
    sweep = knockout.get("window_sweep")
    if not sweep:
        return None
    rows = [r for r in sweep if (r.get("block_correct") or {}).get("accuracy") is not None]
    if not rows:
        return "Accuracy and IoU when keys are blocked only within each window of LLM layers."
    worst = min(rows, key=lambda r: r["block_correct"]["accuracy"])
    first, last = worst["layers"]
    return (
        f"Blocking the correctly classified tokens only within llm.{first}-llm.{last} lowers "
        f"accuracy most (to {worst['block_correct']['accuracy']:.2f}, probed at "
        f"{knockout.get('summary_layer')}) among the {len(sweep)} windows tried."
    )


# --- report block -----------------------------------------------------------------------------
def block(results: dict[str, Any], page: Page) -> str:
    """The knockout section of ``report.html``."""
    knockout = results.get("knockout")
    if not knockout:
        return not_run("knockout")
    parts = [
        page.figure("knockout_curves", curves_caption(knockout)),
        page.figure("knockout_summary", summary_caption(knockout)),
        page.figure("knockout_window_sweep", sweep_caption(knockout)),
        page.figure("knockout_gaps", knockout_text(knockout)),
        paragraph(knockout_text(knockout)) if "knockout_gaps" not in page.figures else "",
        _pair_table(knockout),
    ]
    return "\n".join(p for p in parts if p)


def _pair_table(knockout: dict[str, Any]) -> str:
    layer = knockout.get("summary_layer")
    conditions = knockout_conditions(knockout)
    per_pair = {tuple(p.get("classes") or ()): p for p in knockout.get("per_pair") or []}
    rows = []
    for pair in knockout.get("pairs") or []:
        classes = tuple(pair.get("classes") or ())
        names = pair.get("names") or [str(c) for c in classes]
        scores = per_pair.get(classes) or {}
        row = [
            escape(" / ".join(str(n) for n in names)),
            escape(pair.get("images", "n/a")),
            escape(pair.get("support", "n/a")),
        ]
        for cond in conditions:
            cell = (scores.get(cond) or {}).get(layer) or {}
            row.append(f"{num(cell.get('accuracy'))} / {num(cell.get('iou'))}")
        rows.append(row)
    header = ["Pair", "Images", "Support", *(escape(c) for c in conditions)]
    return f"<h3>Per-pair results at {escape(layer)} (accuracy / 2-class IoU)</h3>" + table(
        header, rows
    )


FIGURES = {
    "knockout_curves": knockout_curves_figure,
    "knockout_summary": knockout_summary_figure,
    "knockout_window_sweep": window_sweep_figure,
    "knockout_gaps": knockout_gaps_figure,
}


# --- the first screen's panel: the knockout gap per LLM layer -------------------------------------
PREFERRED_POOL = "outside_pair"  # the paper's control; others are shown in the knockout section


def overview_panel(ax: Any, results: dict[str, Any], run_dir: Any, label: str) -> str | None:
    """The knockout gap (blocking the correct, and the incorrect, tokens minus the control) per
    LLM layer with its paired intervals (``Panel.draw``)."""
    knockout = results.get("knockout")
    if not knockout:
        return "Attention knockout not run\n(seglens knockout --run RUN)."
    if knockout.get("status") == "nothing_to_test":
        return f"Knockout: nothing to test.\n{knockout.get('reason', '')}"
    pools = (knockout.get("differences") or {}).get("pools") or {}
    if not pools:
        return "This knockout has no paired intervals\n(rerun seglens knockout)."
    pool = PREFERRED_POOL if PREFERRED_POOL in pools else next(iter(pools))
    per_stage = pools[pool]
    stages = sorted((s for s in per_stage if llm_layer(s) is not None), key=llm_layer)
    x = np.arange(len(stages), dtype=np.float64)
    for j, (name, treatment) in enumerate(
        (
            ("block_correct_minus_control", "block correct"),
            ("block_incorrect_minus_control", "block incorrect"),
        )
    ):
        cells = [(per_stage.get(s) or {}).get(name) or {} for s in stages]
        est, low, high = ([c.get(k) for c in cells] for k in ("estimate", "low", "high"))
        interval_bars(ax, x + 0.14 * (j - 0.5), est, low, high, series_colour(3 * j), treatment)
    ax.axhline(0, color="k", linewidth=0.8)
    label_stage_axis(ax, stages, fontsize=6.5)
    ax.set_ylabel("pair-token accuracy, minus control", fontsize=8)
    ax.set_title(f"{label} knockout gap vs random control ({pool} pool)", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return None
