"""The bidirectional-attention analysis: probes trained and scored with the image-token block
causal and bidirectional, per stage and per token position.

The measurement is ``seglens.analyses.bidirectional.measure``; this module holds the rest of the
analysis (config and results sections, CLI subcommand, figures, captions, report block, finding
(d) and the registry entry).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from seglens.analyses.registry import Analysis, Block, Command, Panel, Table
from seglens.config import _help
from seglens.experiments.findings import above, all_of, below, fmt_interval
from seglens.report.canvas import (
    as_float,
    label_stage_axis,
    llm_layer,
    moving_average,
    new_figure,
    order_stages,
    run_arrays,
    series_colour,
)
from seglens.report.evidence import bars, interval_text, significance
from seglens.report.page import Page, not_run, paragraph
from seglens.rundir.schema import Section
from seglens.tables import DIFFERENCE_COLUMNS, interval_columns

__all__ = ["ANALYSIS", "BidirConfig", "Bidirectional", "position_accuracy", "run"]


# --- config section ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BidirConfig:
    enabled: bool = _help("run the causal vs bidirectional image attention experiment", True)
    layer: int | None = _help("LLM layer for per-position accuracy; default the middle one", None)


# --- results section --------------------------------------------------------------------------
@dataclass(eq=False)
class Bidirectional(Section):
    title: ClassVar[str] = "bidirectional"
    layer: str
    conditions: list[str]
    miou: dict[str, dict[str, float | None]]
    level: str
    position_accuracy_file: str
    seed: int
    native_image_attention: str = "causal"


# --- run --------------------------------------------------------------------------------------
def run(run: Any, *, vlm: Any = None, progress: bool = True, **overrides: Any) -> Bidirectional:
    """Train and score probes under the other image attention
    (``seglens.analyses.bidirectional.measure.run_bidirectional``)."""
    from seglens.analyses.bidirectional.measure import run_bidirectional

    return run_bidirectional(run, vlm=vlm, progress=progress, **overrides)


# --- CLI --------------------------------------------------------------------------------------
def _bidir_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="probing run directory (holds config.yaml)")
    p.add_argument("--layer", type=int, help="LLM layer of the per-position accuracy")


def _bidir(args: argparse.Namespace) -> int:
    from seglens.analyses.bidirectional.measure import run_bidirectional
    from seglens.commands import draw

    section = run_bidirectional(args.run, layer=args.layer)
    draw(args.run)
    print(f"{'stage':<16} {'causal':>10} {'bidir':>10}   ({section['level']} mIoU)")
    miou = section["miou"]
    for stage, value in miou["causal"].items():
        other = miou["bidirectional_image"].get(stage)
        cells = [f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in (value, other)]
        print(f"{stage:<16} " + " ".join(cells))
    where = f"{args.run}/{section['position_accuracy_file']}"
    print(f"per-position accuracy at {section['layer']}: {where}")
    return 0


# --- finding (d) ------------------------------------------------------------------------------
def findings(results: Mapping[str, Any], arrays: Callable[[str], Any]) -> dict[str, dict]:
    """Finding (d), *early positions*: under causal attention the first image rows gain less
    over the adapter than the last rows, and bidirectional image attention raises them."""
    from seglens.results import clean_condition

    return {"early_positions": _early_positions(results, arrays, clean_condition(results))}


def paired(results: Mapping[str, Any], arrays: Callable[[str], Any], weights: Any) -> dict:
    """(d)'s statistics on the image weights ``weights`` (R, n_eval), as in ``findings``: the
    causal early-minus-late gain and bidirectional minus causal on the early rows."""
    from seglens.experiments.stats import resampled_metric
    from seglens.rundir.schema import probing_arrays

    sides = _band_sides(results, lambda condition: arrays(probing_arrays(condition)))
    if sides is None:
        return {}
    acc = [resampled_metric(s, "accuracy", weights) for s in sides]
    gap = acc[0] - acc[1] - acc[2] + acc[3]
    return {
        "early_positions": {
            "causal_early_minus_late_gain": {"values": gap, "direction": "below"},
            "bidirectional_minus_causal_early": {"values": acc[4] - acc[0], "direction": "above"},
        }
    }


def _band_sides(results: Mapping, arrays: Callable[[str], Any]) -> list | None:
    """Band accuracy counts: causal early at the layer, early at the adapter, late at the layer,
    late at the adapter, bidirectional early at the layer (None when absent)."""
    from seglens.experiments.differences import counts_from_arrays

    bidir = results.get("bidirectional")
    if not bidir:
        return None
    stage = bidir["layer"]
    causal, full = arrays("causal"), arrays("bidirectional_image")
    if causal is None or full is None:
        return None

    def band(table, s, which):
        return counts_from_arrays(table, s, which, "accuracy")

    sides = [band(causal, stage, "early"), band(causal, "adapter", "early")]
    sides += [band(causal, stage, "late"), band(causal, "adapter", "late")]
    sides += [band(full, stage, "early")]
    return None if any(s is None for s in sides) else sides


def _early_positions(
    results: Mapping, arrays: Callable[[str], Mapping[str, np.ndarray] | None], clean: str
) -> dict:
    from seglens.experiments.stats import bootstrap_contrast, paired_bootstrap

    none = {"holds": None, "text": "the bidirectional analysis did not run"}
    sides = _band_sides(results, arrays)
    if sides is None:
        return none
    stage = results["bidirectional"]["layer"]
    options = dict(n_resamples=1000, seed=int(results.get("seed", 0)))
    share = (results.get("config") or {}).get("probe", {}).get("position_band", 0.25)
    causal_gap = bootstrap_contrast(
        [(1, sides[0]), (-1, sides[1]), (-1, sides[2]), (1, sides[3])], "accuracy", **options
    )
    raised = paired_bootstrap(sides[4], sides[0], "accuracy", **options)
    text = (
        f"at {stage}, causal: first-rows gain minus last-rows gain over the adapter "
        f"{fmt_interval(causal_gap)}; bidirectional minus causal on the first rows "
        f"{fmt_interval(raised)} "
        f"(token accuracy on the first / last {share:.0%} of image positions)"
    )
    return {
        "holds": all_of(below(causal_gap), above(raised)),
        "stage": stage,
        "causal_early_minus_late_gain": causal_gap,
        "bidirectional_minus_causal_early": raised,
        "clean_condition": clean,
        "text": text,
    }


# --- figures ----------------------------------------------------------------------------------
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
        y = [as_float(miou[cond].get(s)) for s in stages]
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


def differences_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """Error bars: bidirectional minus causal mIoU per stage (95% paired intervals)."""
    bidir = (results.get("bidirectional") or {}).get("differences") or {}
    if not bidir.get("bidirectional_minus_causal"):
        return None
    fig = new_figure(7.5, 3.6)
    ax = fig.subplots()
    rows = [(s, d) for s, d in bidir["bidirectional_minus_causal"].items() if d]
    rows = [(s, d) for s, d in rows if d.get("estimate") is not None]
    names = order_stages([s for s, _ in rows])
    by_stage = dict(rows)
    bars(ax, np.arange(len(names)), [by_stage[s] for s in names], series_colour(2), "")
    label_stage_axis(ax, names)
    ax.axhline(0, color="k", lw=0.8)
    band = bidir.get("early_minus_late_gain")
    title = "bidirectional - causal mIoU (95% paired CI)"
    if band and band.get("estimate") is not None:
        title += f"\nearly-minus-late gain at {band['stage']}: {band['estimate']:+.3f}"
    ax.set_title(title, fontsize=9)
    return fig


# --- captions and report block ----------------------------------------------------------------
def miou_caption(section: dict[str, Any]) -> str:
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


def positions_caption(results: dict[str, Any], run_dir: str | Path) -> str:
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


def heatmaps_caption(results: dict[str, Any]) -> str:
    """How to read the grid maps."""
    layer = results["bidirectional"].get("layer")
    return (
        f"Per-position accuracy at {layer} laid out on the image-token grid (row-major, the first "
        "token at the top left). In the difference map red means bidirectional attention helps, "
        "blue that it hurts; the colour scale is centred at 0."
    )


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


def block(results: Mapping[str, Any], page: Page) -> str:
    """The bidirectional section of ``report.html``."""
    section = results.get("bidirectional")
    if not section:
        return not_run("bidirectional")
    parts = [
        page.figure("bidirectional_miou", miou_caption(section)),
        page.figure("bidirectional_positions", positions_caption(results, page.run_dir)),
        page.figure("bidirectional_heatmaps", heatmaps_caption(results)),
        page.figure("bidirectional_differences"),
        paragraph(bidirectional_text(section)),
    ]
    return "\n".join(p for p in parts if p)


# --- table rows, planned forwards -------------------------------------------------------------
def _difference_rows(results: Mapping[str, Any], run_dir: Path) -> Any:
    diff = (results.get("bidirectional") or {}).get("differences") or {}
    base = {"analysis": "bidirectional", "condition": "bidirectional_image"}
    base["level"] = diff.get("level")
    for stage, cell in (diff.get("bidirectional_minus_causal") or {}).items():
        contrast = {"contrast": "bidirectional_minus_causal", "stage": stage}
        yield base | contrast | interval_columns(cell)
    if diff.get("early_minus_late_gain"):
        cell = diff["early_minus_late_gain"]
        contrast = {"contrast": "early_minus_late_gain", "stage": cell.get("stage")}
        yield base | contrast | interval_columns(cell)


def _forwards(config: Any, train: int, evaluation: int, layers: int) -> dict[str, Any]:
    """The bidirectional condition's probes train and evaluate as the clean ones did."""
    from seglens.analyses.probing import probing_forwards

    planned = probing_forwards(config, train, evaluation, layers)
    return {**planned, "detail": "the probing passes again, under bidirectional image attention"}


# --- the first screen's panel: per-position accuracy, causal vs bidirectional ---------------------
def overview_panel(ax: Any, results: dict[str, Any], run_dir: Any, label: str) -> str | None:
    """Per-position accuracy under causal and bidirectional image attention (``Panel.draw``)."""
    section = results.get("bidirectional")
    if not section or not section.get("position_accuracy_file") or run_dir is None:
        return "Bidirectional image attention not run\n(seglens bidir --run RUN)."
    arrays = run_arrays(run_dir, section["position_accuracy_file"])
    conditions = section.get("conditions") or ["causal", "bidirectional_image"]
    missing = [c for c in conditions if c not in arrays]
    if missing:
        return f"{section['position_accuracy_file']} lacks {', '.join(missing)}."
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
    ax.set_title(f"{label} per-position accuracy: causal vs bidirectional", fontsize=9, loc="left")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return None


ANALYSIS = Analysis(
    name="bidirectional",
    title="train and score probes under bidirectional image attention vs causal",
    run=run,
    config_key="bidir",
    config=BidirConfig,
    needs=("probing",),
    sections={"bidirectional": Bidirectional},
    figures={
        "bidirectional_miou": bidirectional_miou_figure,
        "bidirectional_positions": bidirectional_positions_figure,
        "bidirectional_heatmaps": bidirectional_heatmaps_figure,
        "bidirectional_differences": differences_figure,
    },
    report=(Block("bidirectional", "Bidirectional image attention", block),),
    question="Bidirectional image attention asks whether the causal mask starves early image "
    "tokens.",
    findings=findings,
    paired=paired,
    finding_names={"early_positions": "(d) Causal attention starves early image tokens"},
    command=Command(
        "bidir",
        "train and score probes under bidirectional image attention vs causal",
        _bidir_args,
        _bidir,
    ),
    forwards=_forwards,
    tables=(Table("differences", DIFFERENCE_COLUMNS, _difference_rows),),
    overview=Panel(
        "per-position accuracy",
        overview_panel,
        "Per-position pixel accuracy under causal and bidirectional image attention.",
    ),
)
