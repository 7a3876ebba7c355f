"""The per-head anchors analysis: attention share to same-class anchors per LLM layer and head,
heads ranked by it, and knockouts of the pair tokens' attention to their anchors in the top-k
heads vs k random heads of the same layers vs all heads.

The measurement is ``seglens.analyses.heads.measure``; this module holds the rest of the analysis
(config and results sections, CLI subcommand, figures, report block and the registry entry).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from seglens.analyses.registry import Analysis, Block, Command
from seglens.config import _help
from seglens.experiments.findings import fmt_interval
from seglens.report.canvas import new_figure, series_colour
from seglens.report.evidence import bars
from seglens.report.page import Page, escape, not_run, paragraph, switched_off, table
from seglens.rundir.schema import Section

__all__ = ["ANALYSIS", "HeadsConfig", "HeadsSection", "heads_figure", "run"]


# --- config section ---------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadsConfig:
    enabled: bool = _help("rank heads by attention to anchors and knock out the top-k", False)
    top_k: tuple[int, ...] = _help("head counts k of the top-k knockouts", (1, 4, 16))
    random_draws: int = _help("random head sets per k (drawn from the top-k's layers)", 3)
    rank_split: str = _help("split the heads are ranked on: train (default) or eval", "train")

    def __post_init__(self):
        if not self.top_k or any(not isinstance(k, int) or k < 1 for k in self.top_k):
            raise ValueError(f"heads.top_k={list(self.top_k)} must be positive integers")
        if self.random_draws < 1:
            raise ValueError(f"heads.random_draws={self.random_draws} must be >= 1")
        if self.rank_split not in ("train", "eval"):
            raise ValueError(f"heads.rank_split={self.rank_split!r} is not one of train, eval")


# --- results section --------------------------------------------------------------------------
@dataclass(eq=False)
class HeadsSection(Section):
    title: ClassVar[str] = "heads"
    reference_stage: str
    rank_split: str
    num_layers: int
    num_heads: int
    pairs: list[dict[str, Any]]
    share: list[list[float]]
    ratio: list[list[float | None]]
    ranking: list[dict[str, Any]]
    top_k: list[int]
    heads: dict[str, dict[str, Any]]
    conditions: list[str]
    accuracy: dict[str, dict[str, float | None]]
    differences: dict[str, Any]
    stage: str
    seconds: dict[str, float]
    passes_per_image: dict[str, int]
    seed: int


# --- run --------------------------------------------------------------------------------------
def run(run: Any, *, vlm: Any = None, progress: bool = True, **overrides: Any) -> HeadsSection:
    """Rank heads and knock out the top-k (``seglens.analyses.heads.measure.run_heads``)."""
    from seglens.analyses.heads.measure import run_heads

    return run_heads(run, vlm=vlm, progress=progress, **overrides)


# --- CLI --------------------------------------------------------------------------------------
def _heads_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="probing run directory (holds config.yaml)")
    p.add_argument("--top-k", type=int, nargs="+", help="head counts of the top-k knockouts")
    p.add_argument("--random-draws", type=int, help="random head sets per k")
    p.add_argument("--rank-split", choices=("train", "eval"), help="split the heads are ranked on")


def _heads(args: argparse.Namespace) -> int:
    from seglens.commands import draw

    overrides = {"random_draws": args.random_draws, "rank_split": args.rank_split}
    if args.top_k:
        overrides["top_k"] = tuple(args.top_k)
    section = run(args.run, **{k: v for k, v in overrides.items() if v is not None})
    draw(args.run)
    print(section.get("statement", ""))
    print(f"results: {args.run}/results.json")
    return 0


# --- figures ----------------------------------------------------------------------------------
def heads_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Heat map of the anchor share per layer and head (the top heads numbered by rank)."""
    section = results.get("heads")
    if not section or not section.get("share"):
        return None
    share = np.asarray(section["share"], dtype=float)
    L, H = share.shape
    fig = new_figure(max(5.5, 0.45 * H + 2.5), max(2.8, 0.4 * L + 1.4))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="viridis", aspect="auto")
    for rank, r in enumerate(section["ranking"][: min(8, L * H)]):
        ax.text(r["head"], r["layer"] - 1, str(rank + 1), ha="center", va="center", color="w")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L), [f"llm.{i + 1}" for i in range(L)])
    ax.set_xlabel("head")
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention share to anchors")
    ax.set_title("Attention to same-class anchors per head (numbers: rank)", fontsize=9)
    return fig


def heads_knockout_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Pair-token accuracy change at the last LLM layer per knockout, 95% paired intervals."""
    section = results.get("heads")
    if not section or not section.get("pairs"):
        return None
    cells = section["differences"]["heads"][section["stage"]]
    names = list(cells)
    fig = new_figure(max(5.0, 0.6 * len(names) + 1.5), 3.4)
    ax = fig.subplots()
    bars(ax, np.arange(len(names)), [cells[n] for n in names], series_colour(1), "")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("pair-token accuracy difference")
    ax.set_title(
        f"Knockouts of attention to anchors by head set, at {section['stage']}", fontsize=9
    )
    return fig


# --- report block -----------------------------------------------------------------------------
def block(results: Mapping[str, Any], page: Page) -> str:
    """The per-head anchors section of ``report.html``."""
    section = results.get("heads")
    if not section:
        return switched_off(results, "heads", "heads") or not_run("heads")
    top = [
        [
            escape(str(i + 1)),
            escape(f"llm.{r['layer']} / {r['head']}"),
            escape(f"{r['share']:.3f}"),
            escape(fmt_interval({"estimate": r["ratio"], "low": r["low"], "high": r["high"]})),
        ]
        for i, r in enumerate(section["ranking"][:8])
    ]
    stage = section["stage"]
    cells = section["differences"]["heads"].get(stage) or {}
    acc = section["accuracy"]
    rows = [
        [
            escape(c),
            escape("n/a" if acc[c][stage] is None else f"{acc[c][stage]:.3f}"),
            escape(fmt_interval(cells.get(f"{c} - none"))),
        ]
        for c in section["conditions"]
    ]
    seconds = section["seconds"]
    cost = (
        f"Measured: ranking {seconds['ranking']:.1f} s, knockouts {seconds['knockout']:.1f} s; "
        f"passes per pair image: {section['passes_per_image']['ranking']} to rank, "
        f"{section['passes_per_image']['knockout']} for the knockouts. Heads ranked on the "
        f"{section['rank_split']} split, knockouts scored on the evaluation split."
    )
    parts = [
        page.figure("heads_share", "Attention share of the pair tokens to their anchors."),
        table(["rank", "layer / head", "share", "ratio to uniform [95%]"], top),
        page.figure("heads_knockout", "Knockouts of the pair tokens' edges to their anchors."),
        table(["condition", f"accuracy at {stage}", "minus none [95%]"], rows),
        paragraph(section.get("statement")),
        paragraph(cost),
    ]
    return "\n".join(p for p in parts if p)


ANALYSIS = Analysis(
    name="heads",
    title="rank heads by attention to anchors; knock out the top-k vs random-k vs all heads",
    run=run,
    config_key="heads",
    config=HeadsConfig,
    needs=("probing",),
    sections={"heads": HeadsSection},
    figures={"heads_share": heads_figure, "heads_knockout": heads_knockout_figure},
    report=(Block("heads", "Which heads carry the anchors", block),),
    question="Per-head anchors ask whether a few heads carry the anchor effect.",
    command=Command(
        "heads",
        "rank heads by attention to anchors and knock out the top-k",
        _heads_args,
        _heads,
    ),
)
