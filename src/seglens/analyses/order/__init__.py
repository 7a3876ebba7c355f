"""The token-order analysis: the image tokens fed in raster, reversed, column-major or shuffled
order, with position ids that follow the sequence or the token, probes trained per condition.

The measurement is ``seglens.analyses.order.measure``; this module holds the rest of the analysis
(config and results sections, CLI subcommand, figure, report block and the registry entry).
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
from seglens.report.canvas import new_figure, run_arrays, series_colour
from seglens.report.page import Page, escape, not_run, paragraph, switched_off, table
from seglens.rundir.schema import Section

__all__ = ["ANALYSIS", "OrderConfig", "OrderSection", "order_figure", "run"]

_ORDERS = ("raster", "reversed", "column_major", "shuffled")
_IDS = ("sequence", "token")


# --- config section ---------------------------------------------------------------------------
@dataclass(frozen=True)
class OrderConfig:
    enabled: bool = _help("run the token-order conditions (probes trained per condition)", False)
    orders: tuple[str, ...] = _help(
        "token orders besides raster: reversed, column_major, shuffled (seeded per image)",
        ("reversed", "column_major", "shuffled"),
    )
    position_ids: tuple[str, ...] = _help(
        "position ids per order: sequence (follow the new order) and/or token (stay with it)",
        ("sequence", "token"),
    )
    layer: int | None = _help("LLM layer probed per condition; default the middle one", None)

    def __post_init__(self):
        bad = [o for o in self.orders if o not in _ORDERS]
        if bad or not self.orders:
            raise ValueError(
                f"order.orders={list(self.orders)} must be a non-empty list of {', '.join(_ORDERS)}"
            )
        bad = [p for p in self.position_ids if p not in _IDS]
        if bad or not self.position_ids:
            raise ValueError(
                f"order.position_ids={list(self.position_ids)} must be a non-empty list of "
                f"{', '.join(_IDS)}"
            )


# --- results section --------------------------------------------------------------------------
@dataclass(eq=False)
class OrderSection(Section):
    title: ClassVar[str] = "order"
    layer: str
    grid: list[int]
    band_rows: int
    conditions: list[str]
    accuracy: dict[str, float | None]
    bands: dict[str, dict[str, dict[str, float | None]]]
    differences: dict[str, dict[str, dict[str, Any]]]
    seconds: dict[str, float]
    arrays_file: str
    seed: int
    images: dict[str, int]
    position_ids_meaning: dict[str, str]


# --- run --------------------------------------------------------------------------------------
def run(run: Any, *, vlm: Any = None, progress: bool = True, **overrides: Any) -> OrderSection:
    """Train and score probes per token order (``seglens.analyses.order.measure.run_order``)."""
    from seglens.analyses.order.measure import run_order

    return run_order(run, vlm=vlm, progress=progress, **overrides)


# --- CLI --------------------------------------------------------------------------------------
def _order_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="probing run directory (holds config.yaml)")
    p.add_argument("--layer", type=int, help="LLM layer probed per condition")
    p.add_argument("--orders", nargs="+", choices=_ORDERS[1:], help="orders besides raster")
    p.add_argument("--position-ids", nargs="+", choices=_IDS, help="position-id modes")


def _order(args: argparse.Namespace) -> int:
    from seglens.commands import draw

    overrides = {"layer": args.layer, "orders": args.orders, "position_ids": args.position_ids}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    section = run(args.run, **{k: v for k, v in overrides.items() if v is not None})
    draw(args.run)
    print(section.get("statement", ""))
    print(f"results: {args.run}/results.json")
    return 0


# --- figure -----------------------------------------------------------------------------------
def order_figure(results: dict[str, Any], run_dir: str | Path) -> Any:
    """Accuracy by sequence slot (moving average over one grid row) and by image row, one line
    per condition."""
    section = results.get("order")
    if not section or not section.get("arrays_file"):
        return None
    arrays = run_arrays(run_dir, section["arrays_file"])
    rows, cols = section["grid"]
    fig = new_figure(11.0, 3.8)
    left, right = fig.subplots(1, 2)
    for i, name in enumerate(section["conditions"]):
        key = name.replace("/", ".")
        sequence, by_row = arrays[f"{key}.sequence"], arrays[f"{key}.row"]
        style = "-" if name == "raster" or name.endswith("/sequence") else "--"
        smooth = np.convolve(np.nan_to_num(sequence), np.ones(cols) / cols, mode="valid")
        x = np.arange(len(smooth)) + (cols - 1) / 2
        left.plot(x, smooth, style, color=series_colour(i), label=name)
        right.plot(np.arange(rows), by_row, style, marker="o", ms=3, color=series_colour(i))
    left.set_xlabel(f"sequence slot (moving average over {cols})")
    right.set_xlabel("image row (top = 0)")
    for ax in (left, right):
        ax.set_ylabel("token accuracy")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(
        f"Token order at {section['layer']}: by sequence slot and by image row", fontsize=10
    )
    return fig


# --- report block -----------------------------------------------------------------------------
def block(results: Mapping[str, Any], page: Page) -> str:
    """The token-order section of ``report.html``."""
    section = results.get("order")
    if not section:
        return switched_off(results, "order", "order") or not_run("order")
    rows = []
    for name in section["conditions"]:
        diff = (section.get("differences") or {}).get(name) or {}
        bands = section["bands"][name]
        rows.append(
            [
                escape(name),
                escape(f"{section['seconds'][name]:.1f}"),
                escape(_num(section["accuracy"].get(name))),
                escape(_num(bands["by_row"]["first"])),
                escape(_num(bands["by_row"]["last"])),
                *(escape(fmt_interval(diff.get(k))) for k in _DIFF_KEYS),
            ]
        )
    header = [
        "condition",
        "seconds",
        "accuracy",
        "first rows",
        "last rows",
        "- raster, first rows",
        "- raster, last rows",
        "- raster, first slots",
        "- raster, last slots",
    ]
    caption = (
        f"Accuracy of probes trained per condition at {section['layer']}; bands are the first / "
        f"last {section['band_rows']} image rows (by_row) or as many sequence slots. Intervals "
        "are paired 95% bootstrap intervals over images (condition minus raster)."
    )
    meaning = "; ".join(f"{k}: {v}" for k, v in (section.get("position_ids_meaning") or {}).items())
    parts = [
        page.figure("order_positions", caption),
        table(header, rows),
        paragraph(section.get("statement")),
        paragraph(f"Position ids. {meaning}." if meaning else ""),
    ]
    return "\n".join(p for p in parts if p)


_DIFF_KEYS = ("by_row.first", "by_row.last", "by_sequence.first", "by_sequence.last")


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# --- planned forwards -------------------------------------------------------------------------
def _forwards(config: Any, train: int, evaluation: int, layers: int) -> dict[str, Any]:
    """Each condition (raster and every order x position ids) trains its probe and scores it as
    the probing analysis does."""
    from seglens.analyses.order.measure import condition_names
    from seglens.analyses.probing import probing_forwards

    conditions = len(condition_names(config.order.orders, config.order.position_ids))
    per = probing_forwards(config, train, evaluation, layers)
    return {
        "forwards": conditions * per["forwards"],
        "bound": per["bound"],
        "detail": f"{conditions} conditions x the probing passes ({per['forwards']})",
    }


ANALYSIS = Analysis(
    name="order",
    title="train and score probes with the image tokens in another order (sequence vs content)",
    run=run,
    config_key="order",
    config=OrderConfig,
    needs=("probing",),
    sections={"order": OrderSection},
    figures={"order_positions": order_figure},
    report=(Block("order", "Token order: sequence or content", block),),
    question="Token order asks whether the early-position deficit follows the causal sequence "
    "or the top of the picture.",
    command=Command(
        "order",
        "train and score probes with the image tokens reordered (raster, reversed, ...)",
        _order_args,
        _order,
    ),
    forwards=_forwards,
)
