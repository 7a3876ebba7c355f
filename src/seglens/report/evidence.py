"""Evidence on the report: paired intervals on differences, drawn as error bars and said in words.

Every difference a run reports (``probing.<condition>.differences``, ``knockout.differences``,
``bidirectional.differences``) is an interval ``{estimate, low, high, n_images}``; this module
draws them with error bars and words each one as "significant at 95%" or not. It also lists the
probes that did not converge or chose a learning rate at the edge of the grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglens.report.canvas import interval_bars, label_stage_axis, new_figure, series_colour
from seglens.stages import llm_layer
from seglens.stages import order as order_stages

__all__ = ["bidirectional_text", "convergence_text", "differences_figure", "interval_text"]
__all__ += [
    "attention_figure",
    "attention_text",
    "knockout_gaps_figure",
    "knockout_text",
    "probing_text",
    "significance",
]


def significance(interval: dict[str, Any] | None) -> str:
    """'significant at 95%' / 'not significant at 95%' / 'no interval (bootstrap off)'."""
    if not interval or interval.get("estimate") is None:
        return "undefined"
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return "no interval (bootstrap off)"
    return "significant at 95%" if low > 0 or high < 0 else "not significant at 95%"


def interval_text(label: str, interval: dict[str, Any] | None) -> str:
    """'<label> +0.031 [0.012, 0.050] over 40 images, significant at 95%'."""
    if not interval or interval.get("estimate") is None:
        return f"{label}: undefined"
    text = f"{label} {interval['estimate']:+.3f}"
    if interval.get("low") is not None and interval.get("high") is not None:
        text += f" [{interval['low']:+.3f}, {interval['high']:+.3f}]"
    return f"{text} over {interval.get('n_images')} images, {significance(interval)}"


def _llm(stages: Sequence[str]) -> list[str]:
    return [s for s in order_stages(stages) if llm_layer(s) is not None]


# --- probing ----------------------------------------------------------------------------------
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
    """Error bars: LLM layer minus adapter (and adapter minus encoder) per probing condition,
    and bidirectional minus causal per stage when the bidirectional analysis ran."""
    probing = results.get("probing") or {}
    blocks = {c: b["differences"] for c, b in probing.items() if b.get("differences")}
    bidir = (results.get("bidirectional") or {}).get("differences")
    if not blocks:
        return None
    panels = 2 if bidir and bidir.get("bidirectional_minus_causal") else 1
    fig = new_figure(7.5 * panels, 3.6)
    axes = np.atleast_1d(fig.subplots(1, panels))
    ax = axes[0]
    stages = None
    for j, (condition, diff) in enumerate(blocks.items()):
        rows = [("adapter", diff.get("adapter_minus_encoder"))]
        rows += list((diff.get("llm_minus_adapter") or {}).items())
        rows = [(s, d) for s, d in rows if d and d.get("estimate") is not None]
        if not rows:
            continue
        stages = stages or [s for s, _ in rows]
        x = np.array([stages.index(s) for s, _ in rows if s in stages], dtype=float)
        _bars(ax, x + 0.12 * j, [d for s, d in rows if s in stages], series_colour(j), condition)
    if stages:
        label_stage_axis(ax, stages)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("mIoU difference")
    ax.set_title("adapter - encoder, then each LLM layer - adapter (95% paired CI)", fontsize=9)
    ax.legend(fontsize=7)
    if panels == 2:
        ax = axes[1]
        rows = [(s, d) for s, d in bidir["bidirectional_minus_causal"].items() if d]
        rows = [(s, d) for s, d in rows if d.get("estimate") is not None]
        names = order_stages([s for s, _ in rows])
        by_stage = dict(rows)
        _bars(ax, np.arange(len(names)), [by_stage[s] for s in names], series_colour(2), "")
        label_stage_axis(ax, names)
        ax.axhline(0, color="k", lw=0.8)
        band = bidir.get("early_minus_late_gain")
        title = "bidirectional - causal mIoU (95% paired CI)"
        if band and band.get("estimate") is not None:
            title += f"\nearly-minus-late gain at {band['stage']}: {band['estimate']:+.3f}"
        ax.set_title(title, fontsize=9)
    return fig


def _bars(ax: Any, x: np.ndarray, cells: Sequence[dict], colour: Any, label: str) -> None:
    cells = [c or {} for c in cells]
    est, low, high = ([c.get(k) for c in cells] for k in ("estimate", "low", "high"))
    interval_bars(ax, x, est, low, high, colour, label or None)


# --- knockout ---------------------------------------------------------------------------------
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
        stages = _llm(per_stage)
        x = np.arange(len(stages), dtype=float)
        for j, name in enumerate(("block_correct_minus_control", "block_incorrect_minus_control")):
            cells = [(per_stage.get(s) or {}).get(name) or {} for s in stages]
            keep = [i for i, c in enumerate(cells) if c.get("estimate") is not None]
            label = name.replace("_minus_control", " - control")
            _bars(ax, x[keep] + 0.15 * j, [cells[i] for i in keep], series_colour(j), label)
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


def bidirectional_text(section: dict[str, Any]) -> str:
    """The early-minus-late band gain and how many stages bidirectional attention moves."""
    diff = section.get("differences") or {}
    if not diff:
        return ""
    parts = []
    per_stage = diff.get("bidirectional_minus_causal") or {}
    sig = [s for s, d in per_stage.items() if significance(d) == "significant at 95%"]
    if per_stage:
        parts.append(f"bidirectional minus causal mIoU is significant at {len(sig)} stages")
    band = diff.get("early_minus_late_gain")
    if band:
        parts.append(
            interval_text(f"early-minus-late per-position accuracy gain at {band['stage']}", band)
        )
    return "Paired intervals over images: " + "; ".join(parts) + "." if parts else ""


# --- attention to anchors -----------------------------------------------------------------------
def attention_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Per pair, the attention share over the uniform baseline per LLM layer and key category,
    for the pair's reference-incorrect (solid) and reference-correct (dashed) tokens."""
    section = results.get("attention") or {}
    pairs = section.get("pairs") or []
    if not pairs:
        return None
    fig = new_figure(3.6 * len(pairs) + 0.6, 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(pairs), sharey=True))
    for ax, pair in zip(axes, pairs, strict=True):
        stages = _llm(pair["layers"])
        x = np.arange(len(stages))
        for j, category in enumerate(section.get("categories") or ()):
            for group, style in (("incorrect", "-"), ("correct", "--")):
                values = []
                for s in stages:
                    ratio = pair["layers"][s][group].get("ratio") or {}
                    values.append(np.nan if ratio.get(category) is None else ratio[category])
                label = f"{category} ({group} queries)"
                ax.plot(x, values, style, marker="o", ms=3, color=series_colour(j), label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        label_stage_axis(ax, stages)
        ax.set_title(" / ".join(str(n) for n in pair.get("names") or pair["classes"]), fontsize=9)
    axes[0].set_ylabel("attention share / uniform share")
    axes[0].legend(fontsize=6)
    fig.suptitle(
        "Attention to same-class anchors, other image tokens, text (1 = uniform)", fontsize=10
    )
    return fig


def attention_text(section: dict[str, Any]) -> str:
    """The run's statement on anchors, with the anchor ratio of incorrect tokens per layer
    (above the uniform baseline at 95% when the whole interval lies above 1)."""
    if not section:
        return ""
    pooled = section.get("pooled") or {}
    cells = []
    for s in _llm(pooled):
        r = (pooled[s].get("incorrect") or {}).get("anchor_ratio") or {}
        if r.get("estimate") is None:
            continue
        text = f"{s} {r['estimate']:.2f}"
        if r.get("low") is not None:
            text += f" [{r['low']:.2f}, {r['high']:.2f}]"
        cells.append(text)
    ratios = (
        f" Anchor ratio of incorrect tokens (1 = uniform): {'; '.join(cells)}." if cells else ""
    )
    return f"{section.get('statement', '')}{ratios}"
