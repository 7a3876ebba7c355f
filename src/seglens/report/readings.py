"""Plain-language readings of a run's numbers, one per figure of the report.

Each function turns a section of ``results.json`` into one or two sentences of plain text (the
caller escapes it), e.g. "mIoU falls by 0.12 from the encoder to the adapter, then recovers by
0.20 across the LLM layers, peaking at llm.17". Numbers come from the same helpers the figures
use, so text and figures agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from seglens.report.canvas import class_name, llm_layer, order_stages
from seglens.report.figures import level_values, main_condition, probing_summary
from seglens.report.mechanisms import knockout_conditions, position_accuracy

#: A random control that moves accuracy by less than this is "no change" (no ratio is given).
MIN_CONTROL_EFFECT = 0.005


def _moves(delta: float) -> str:
    """'falls by 0.12' / 'rises by 0.05' / 'stays level'."""
    if abs(delta) < 0.0005:
        return "stays level"
    return f"{'rises' if delta > 0 else 'falls'} by {abs(delta):.2f}"


# --- probing ----------------------------------------------------------------------------------
def layerwise(results: dict[str, Any]) -> str:
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
    sentences.append("Shaded bands are 95% bootstrap intervals over images.")
    return " ".join(sentences)


def per_class(probing: dict[str, Any], results: dict[str, Any]) -> str:
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


def qualitative(section: dict[str, Any]) -> str:
    """What the qualitative panel shows."""
    stages = ", ".join(section.get("stages") or []) or "no stage"
    count = len(section.get("images") or [])
    return (
        f"{count} evaluation images; columns show the input, the ground truth and the probe's "
        f"map at {stages}. Colours follow the dataset palette; black marks ignored or unscored "
        "pixels."
    )


# --- knockout ---------------------------------------------------------------------------------
def _at(knockout: dict[str, Any], condition: str, metric: str = "accuracy") -> float | None:
    layer = knockout.get("summary_layer")
    return ((knockout.get("curves") or {}).get(condition, {}).get(layer) or {}).get(metric)


def knockout(knockout: dict[str, Any]) -> str:
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


def knockout_curves(knockout: dict[str, Any]) -> str:
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


def window_sweep(knockout: dict[str, Any]) -> str | None:
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


# --- bidirectional ----------------------------------------------------------------------------
def bidirectional_miou(section: dict[str, Any]) -> str:
    """At how many stages bidirectional image attention beats causal, and by how much."""
    miou = section.get("miou") or {}
    causal, bidir = miou.get("causal") or {}, miou.get("bidirectional_image") or {}
    stages = [s for s in order_stages(causal) if causal.get(s) is not None]
    stages = [s for s in stages if bidir.get(s) is not None]
    if not stages:
        return "Probe mIoU per stage under both attention patterns."
    diffs = {s: bidir[s] - causal[s] for s in stages}
    llm = [s for s in stages if llm_layer(s) is not None]
    best = max(diffs, key=diffs.__getitem__)
    higher = sum(d > 0 for d in diffs.values())
    text = (
        f"Bidirectional image attention scores higher than causal at {higher} "
        f"of {len(stages)} stages; the largest change is {diffs[best]:+.2f} at {best}"
    )
    if llm:
        text += f" (mean over LLM layers {np.mean([diffs[s] for s in llm]):+.2f})"
    return text + "."


def bidirectional_positions(results: dict[str, Any], run_dir: str | Path) -> str:
    """Early- vs late-position accuracy change under bidirectional image attention."""
    section = results["bidirectional"]
    if not section.get("position_accuracy_file"):
        return ""
    diff = position_accuracy(results, run_dir)["difference"]
    quarter = max(1, len(diff) // 4)
    early, late = float(np.nanmean(diff[:quarter])), float(np.nanmean(diff[-quarter:]))
    return (
        f"At {section.get('layer')}, bidirectional image attention changes the mean accuracy of "
        f"the first quarter of image positions (0-{quarter - 1}) by {early:+.2f} and that of the "
        f"last quarter by {late:+.2f}; over all {len(diff)} positions the mean change is "
        f"{float(np.nanmean(diff)):+.2f}."
    )


def heatmaps(results: dict[str, Any]) -> str:
    """How to read the grid maps."""
    layer = results["bidirectional"].get("layer")
    return (
        f"Per-position accuracy at {layer} laid out on the image-token grid (row-major, the first "
        "token at the top left). In the difference map red means bidirectional attention helps, "
        "blue that it hurts; the colour scale is centred at 0."
    )


# --- UMAP -------------------------------------------------------------------------------------
def umap(section: dict[str, Any]) -> str:
    """Where the clusters are tightest (silhouette) and most separable (k-NN accuracy)."""
    scores = section.get("scores") or {}
    parts = []
    for key, label in (("silhouette", "silhouette"), ("knn_accuracy", "k-NN accuracy")):
        values = {s: v[key] for s, v in scores.items() if (v or {}).get(key) is not None}
        if values:
            best = max(values, key=values.__getitem__)
            parts.append(f"{label} is highest at {best} ({values[best]:.2f})")
    text = "; ".join(parts) + ". " if parts else ""
    return text + "Coloured points are the classes chosen for display; grey points are all others."
