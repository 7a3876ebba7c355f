"""The UMAP analysis: 2-D projections of image-token features per stage, with cluster scores
(silhouette, k-NN accuracy).

The measurement is ``seglens.analyses.umap.measure``; this module holds the rest of the analysis
(config and results sections, CLI subcommand, figure, caption, report block, registry entry).
Under ``seglens run`` it takes its tokens from the probing evaluation pass (a ``Feed``) instead of
running a pass of its own.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from seglens.analyses.registry import Analysis, Block, Command, Feed
from seglens.config import _help
from seglens.report.canvas import GREY, class_legend, new_figure, palette_array, run_arrays
from seglens.report.page import Page, not_run
from seglens.rundir.schema import Section

__all__ = ["ANALYSIS", "Umap", "UmapConfig", "run", "umap_figure"]


# --- config section ---------------------------------------------------------------------------
@dataclass(frozen=True)
class UmapConfig:
    enabled: bool = _help("compute UMAP projections and cluster scores", True)
    stages: tuple[str, ...] | None = _help(
        "stages to project; default encoder, adapter and 4 LLM layers over depth", None
    )
    tokens: int = _help("tokens sampled from the evaluation split per stage", 2000)
    classes: int = _help("most frequent classes shown (others grey)", 10)
    neighbors: int = _help("UMAP n_neighbors and k of the k-NN score", 15)

    def __post_init__(self):
        if self.tokens < 10:
            raise ValueError(f"umap.tokens={self.tokens} must be >= 10")
        if self.classes < 1:
            raise ValueError(f"umap.classes={self.classes} must be >= 1")
        if self.neighbors < 2:
            raise ValueError(f"umap.neighbors={self.neighbors} must be >= 2")


# --- results section --------------------------------------------------------------------------
@dataclass(eq=False)
class Umap(Section):
    title: ClassVar[str] = "umap"
    stages: list[str]
    file: str
    tokens: int
    scores: dict[str, dict[str, float | None]]
    classes: list[int]
    neighbors: int
    seed: int


# --- run --------------------------------------------------------------------------------------
def run(
    run: Any, *, vlm: Any = None, progress: bool = True, feed: Feed | None = None, **overrides: Any
) -> Umap:
    """Project and score a run's tokens (``seglens.analyses.umap.measure.run_umap``); with ``feed``,
    the tokens the probing pass offered it."""
    from seglens.analyses.umap.measure import run_umap

    sampler = feed.state if feed is not None else None
    return run_umap(run, vlm=vlm, progress=progress, sampler=sampler, **overrides)


def feed(config: Any, vlm: Any) -> Feed | None:
    """Sample the UMAP tokens from the probing evaluation pass (same split, order and causal
    model) when that pass holds every UMAP stage; None (a pass of its own) otherwise, and under
    torch.distributed or a resumed run, whose probing pass may not see every image."""
    from seglens.analyses.umap.measure import umap_sampler
    from seglens.distributed import world
    from seglens.experiments.streaming import resolve_stages

    if world() != 1 or config.resume:
        return None
    sampler = umap_sampler(config, vlm)
    if not set(sampler.stages) <= set(resolve_stages(vlm, config.probe)):
        return None
    return Feed("probing", lambda batch, states: sampler.offer(batch.labels, states), sampler)


# --- CLI --------------------------------------------------------------------------------------
def _umap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (holds config.yaml, results.json)")
    p.add_argument(
        "--stages", nargs="+", help="stages to project (default: encoder, adapter, 4 LLM layers)"
    )
    p.add_argument("--tokens", type=int, help="tokens sampled from the evaluation split")
    p.add_argument("--neighbors", type=int, help="UMAP n_neighbors and k of the k-NN score")


def _umap(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seglens.analyses.umap.measure import run_umap
    from seglens.commands import draw

    section = run_umap(args.run, stages=args.stages, tokens=args.tokens, neighbors=args.neighbors)
    draw(args.run)
    print(f"wrote {Path(args.run) / section.file} ({section.tokens} tokens)")
    return 0


# --- figure, caption and report block ---------------------------------------------------------
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


def caption(section: dict[str, Any]) -> str:
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


def block(results: Mapping[str, Any], page: Page) -> str:
    """The UMAP section of ``report.html``."""
    if not results.get("umap"):
        return not_run("umap")
    return page.figure("umap", caption(results["umap"]))


def _forwards(config: Any, train: int, evaluation: int, layers: int) -> dict[str, Any]:
    return {"forwards": 0, "bound": False, "detail": "tokens from the probing evaluation pass"}


ANALYSIS = Analysis(
    name="umap",
    title="project a run's tokens per stage with UMAP and score their clustering",
    run=run,
    config_key="umap",
    config=UmapConfig,
    needs=("probing",),
    sections={"umap": Umap},
    figures={"umap": umap_figure},
    report=(Block("umap", "UMAP of image tokens", block),),
    command=Command(
        "umap",
        "project a run's tokens per stage with UMAP and score their clustering",
        _umap_args,
        _umap,
    ),
    feed=feed,
    forwards=_forwards,
)
