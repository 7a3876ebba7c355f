"""The attention-to-anchors analysis: how much a class pair's tokens attend to same-class anchors
(the tokens the reference probe gets right), other image tokens and text, per LLM layer.

The measurement is ``seglens.analyses.attention.measure``; this module holds the rest of the
analysis (CLI subcommand, figure, caption, report block, registry entry). It is switched on by the
knockout section's ``attention`` option and uses the knockout's pair selection.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from seglens.analyses.registry import Analysis, Block, Command
from seglens.report.canvas import label_stage_axis, new_figure, series_colour
from seglens.report.evidence import llm_stages
from seglens.report.page import Page

__all__ = ["ANALYSIS", "attention_figure", "attention_text", "run"]


def run(run: Any, *, vlm: Any = None, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Measure attention to anchors on a probed run
    (``seglens.analyses.attention.measure.run_attention``)."""
    from seglens.analyses.attention.measure import run_attention

    return run_attention(run, vlm=vlm, progress=progress, **overrides)


def _enabled(config: Any) -> bool:
    settings = config.knockout  # the pairs and the switch are the knockout's
    return bool(settings.enabled and settings.attention)


# --- CLI --------------------------------------------------------------------------------------
def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="probing run directory (holds config.yaml)")


def _attention(args: argparse.Namespace) -> int:
    from seglens.analyses.attention.measure import run_attention
    from seglens.commands import draw

    section = run_attention(args.run)
    draw(args.run)
    print(section["statement"])
    print(f"results: {args.run}/results.json")
    return 0


# --- figure and caption -----------------------------------------------------------------------
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
        stages = llm_stages(pair["layers"])
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
    for s in llm_stages(pooled):
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


def block(results: Mapping[str, Any], page: Page) -> str:
    """The attention section of ``report.html`` (nothing when it did not run)."""
    section = results.get("attention") or {}
    if not section:
        return ""
    return page.figure("attention_anchors", attention_text(section))


def _forwards(config: Any, train: int, evaluation: int, layers: int) -> dict[str, Any]:
    settings = config.knockout
    per_pair = evaluation if settings.max_images is None else min(settings.max_images, evaluation)
    return {
        "forwards": settings.top_k * per_pair * 2,
        "bound": True,
        "detail": f"<= {settings.top_k} pairs x <= {per_pair} images x 2 (reference, measured)",
    }


ANALYSIS = Analysis(
    name="attention",
    title="measure the attention of incorrect tokens to same-class anchors",
    run=run,
    needs=("probing", "knockout"),
    enabled=_enabled,
    sections={"attention": None},
    figures={"attention_anchors": attention_figure},
    report=(Block("attention", "Attention to anchors", block),),
    command=Command(
        "attention",
        "measure the attention of incorrect tokens to same-class anchors",
        _attention_args,
        _attention,
    ),
    forwards=_forwards,
)
