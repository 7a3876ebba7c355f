"""The attention-knockout analysis: block attention to a class pair's correct, incorrect or random
image tokens and score the clean probes again at every LLM layer.

This module is the analysis as seglens sees it (config section, results section, CLI subcommand,
finding (c) and the registry entry); the measurement is ``seglens.analyses.knockout.measure`` (its
key sets in ``.sets``), the figures, captions, report block and first-screen panel are in
``.report`` and its tidy tables in ``.tables``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from seglens.analyses.knockout import report
from seglens.analyses.knockout.tables import TABLES
from seglens.analyses.registry import Analysis, Block, Command, Panel
from seglens.config import _check_choice, _help
from seglens.experiments.findings import all_of, below, fmt_interval
from seglens.rundir.schema import Section

__all__ = ["ANALYSIS", "Knockout", "KnockoutConfig", "run"]


# --- config section ---------------------------------------------------------------------------
@dataclass(frozen=True)
class KnockoutConfig:
    enabled: bool = _help("run the attention-knockout experiment", True)
    reference_stage: str = _help("stage whose clean probe defines correct tokens", "adapter")
    top_k: int = _help("conflicting class pairs to test", 10)
    min_support: int = _help(
        "minimum tokens of a pair (a or b) in the evaluation images that hold both classes", 20
    )
    layers: tuple[int, int] | None = _help(
        "LLM layer window [first, last] (1-based, inclusive); default all layers", None
    )
    window_sweep: int | None = _help("also sweep windows of this many layers over depth", None)
    random_controls: int = _help("random key sets of matched size per image", 1)
    queries: str = _help(
        "which queries lose the keys: 'after' (tokens after the key) or 'all' (also earlier ones "
        "in a natively bidirectional image block)",
        "after",
    )
    max_images: int | None = _help("cap on evaluation images per pair", None)
    control_pool: tuple[str, ...] = _help(
        "pools of the random controls, one control per pool: outside_pair (image tokens outside "
        "the pair first), pair (the pair's own tokens), image (any image token), confidence "
        "(tokens outside the blocked set matched one to one on the clean probe's confidence at "
        "the reference stage)",
        ("outside_pair", "pair", "image"),
    )
    mode: str = _help(
        "block: the condition's tokens become unreadable; keep_only: only they stay readable "
        "among the image tokens",
        "block",
    )
    attention: bool = _help(
        "seglens run also measures the attention of the pairs' tokens to same-class anchors",
        True,
    )
    shared_prefix: bool = _help(
        "run the vision tower and adapter once per batch for all its conditions, and resume a "
        "layer window from the clean pass's states (exact; false recomputes them per condition)",
        True,
    )

    def __post_init__(self):
        pools = ("outside_pair", "pair", "image", "confidence")  # CONTROL_POOLS + MATCHED_POOLS
        if not self.control_pool or any(p not in pools for p in self.control_pool):
            raise ValueError(
                f"knockout.control_pool={list(self.control_pool)} must be a non-empty list of "
                f"{pools}"
            )
        if len(set(self.control_pool)) != len(self.control_pool):
            raise ValueError(f"knockout.control_pool={list(self.control_pool)} repeats a pool")
        _check_choice("knockout.mode", self.mode, ("block", "keep_only"))
        if self.top_k < 1:
            raise ValueError(f"knockout.top_k={self.top_k} must be >= 1")
        if self.layers is not None and (
            len(self.layers) != 2 or self.layers[0] > self.layers[1] or self.layers[0] < 1
        ):
            raise ValueError(
                f"knockout.layers={self.layers} must be [first, last], 1 <= first <= last"
            )
        _check_choice("knockout.queries", self.queries, ("after", "all"))


# --- results section --------------------------------------------------------------------------
@dataclass(eq=False)
class Knockout(Section):
    title: ClassVar[str] = "knockout"
    reference_stage: str
    layers: list[int] | None
    pairs: list[dict[str, Any]]
    conditions: list[str]
    curves: dict[str, dict[str, dict[str, float | None]]]
    per_pair: list[dict[str, Any]]
    summary_layer: str
    seed: int
    skipped_pairs: list[dict[str, Any]] = field(default_factory=list)
    window_sweep: list[dict[str, Any]] | None = None
    settings: dict[str, Any] = field(default_factory=dict)


# --- run --------------------------------------------------------------------------------------
def run(run: Any, *, vlm: Any = None, progress: bool = True, **overrides: Any) -> Knockout:
    """Run the knockout on a probed run (``seglens.analyses.knockout.measure.run_knockout``)."""
    from seglens.analyses.knockout.measure import run_knockout

    return run_knockout(run, vlm=vlm, progress=progress, **overrides)


# --- CLI --------------------------------------------------------------------------------------
def _knockout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="probing run directory (holds config.yaml)")
    p.add_argument("--reference-stage", help="stage whose clean probe defines correct tokens")
    p.add_argument("--top-k", type=int, help="conflicting class pairs to test")
    p.add_argument("--min-support", type=int, help="minimum tokens of a pair (a or b)")
    p.add_argument(
        "--layers", type=int, nargs=2, metavar=("FIRST", "LAST"), help="LLM layer window"
    )
    p.add_argument("--window-sweep", type=int, help="also sweep windows of this many layers")
    p.add_argument("--random-controls", type=int, help="random key sets of matched size")
    p.add_argument("--max-images", type=int, help="cap on evaluation images per pair")
    p.add_argument(
        "--control-pool",
        nargs="+",
        choices=("outside_pair", "pair", "image", "confidence"),
        help="pools the random controls are drawn from (one control per pool)",
    )
    p.add_argument(
        "--mode", choices=("block", "keep_only"), help="block the sets, or keep only them readable"
    )


def _knockout(args: argparse.Namespace) -> int:
    from seglens.analyses.knockout.measure import run_knockout
    from seglens.commands import draw

    section = run_knockout(
        args.run,
        reference_stage=args.reference_stage,
        top_k=args.top_k,
        min_support=args.min_support,
        layers=args.layers,
        window_sweep=args.window_sweep,
        random_controls=args.random_controls,
        max_images=args.max_images,
        control_pool=None if args.control_pool is None else tuple(args.control_pool),
        mode=args.mode,
    )
    draw(args.run)
    if section["status"] == "nothing_to_test":
        print(f"knockout: nothing to test: {section['reason']}")
        return 0
    layer = section["summary_layer"]
    print(f"{len(section['pairs'])} pairs; pair-token scores at {layer}:")
    print(f"{'condition':<18} {'accuracy':>9} {'iou':>9} {'recovery':>9}")
    for cond in section["conditions"]:
        cells = [section["curves"][cond][layer][m] for m in ("accuracy", "iou", "recovery")]
        print(
            f"{cond:<18} " + " ".join(f"{c:>9.4f}" if c is not None else f"{'-':>9}" for c in cells)
        )
    print(f"results: {args.run}/results.json")
    return 0


# --- finding (c) ------------------------------------------------------------------------------
def findings(results: Mapping[str, Any], arrays: Callable[[str], Any]) -> dict[str, dict]:
    """Finding (c), *anchors*: blocking the reference-correct tokens hurts more than a matched
    random control, under every control pool, and blocking the incorrect ones does not."""
    return {"anchors": _anchors(results.get("knockout"))}


def _anchors(knockout: Mapping | None) -> dict:
    """(c) under every control pool the run used (a finding must survive the fairest control)."""
    none = {"holds": None, "text": "the knockout analysis did not run or found no pair to test"}
    if not knockout or not (knockout.get("differences") or {}).get("pools"):
        return none
    stage = knockout.get("summary_layer")
    pools, verdicts, parts = {}, [], []
    for pool, per_stage in knockout["differences"]["pools"].items():
        diff = per_stage.get(stage) or {}
        correct = diff.get("block_correct_minus_control")
        incorrect = diff.get("block_incorrect_minus_control")
        not_below = None if (incorrect or {}).get("high") is None else incorrect["high"] >= 0
        verdicts.append(all_of(below(correct), not_below))
        pools[pool] = {
            "block_correct_minus_control": correct,
            "block_incorrect_minus_control": incorrect,
        }
        parts.append(
            f"{pool}: correct {fmt_interval(correct)}, incorrect {fmt_interval(incorrect)}"
        )
    text = (
        f"at {stage}, pair-token accuracy of blocking the reference-correct (incorrect) tokens "
        f"minus a size-matched random control, per control pool: " + "; ".join(parts)
    )
    return {"holds": all_of(*verdicts), "stage": stage, "pools": pools, "text": text}


def paired(results: Mapping[str, Any], arrays: Callable[[str], Any], weights: Any) -> dict:
    """(c)'s statistics on the image weights ``weights`` (R, n_eval), as in its differences:
    per control pool, at the summary layer, the mean over pairs of block-correct (incorrect)
    minus its control's pair-token accuracy. Block correct minus control is directed (below);
    block incorrect minus control is shown."""
    import numpy as np

    from seglens.analyses.knockout.measure import COUNTS_FILE
    from seglens.analyses.knockout.sets import _pair_accuracy, _pair_mean

    knockout = results.get("knockout")
    table = arrays(COUNTS_FILE)
    if not knockout or not knockout.get("pairs") or table is None:
        return {}
    stages = [str(s) for s in table["stages"]]
    j = stages.index(knockout["summary_layer"])
    n_pairs = len({k.split("__")[0] for k in table if k.startswith("pair")})
    accuracy: dict[str, list] = {}  # condition -> per pair (R, S)

    def pair_accuracy(condition: str) -> list:
        if condition not in accuracy:
            accuracy[condition] = [
                _pair_accuracy(
                    weights[:, table[f"pair{k}__images"]], table[f"pair{k}__{condition}"]
                )
                for k in range(n_pairs)
            ]
        return accuracy[condition]

    stats = {}
    for pool in knockout.get("control_pools") or []:
        control = {
            c["matches"]: name
            for name, c in (knockout.get("controls") or {}).items()
            if c["pool"] == pool
        }
        for side, direction in (("correct", "below"), ("incorrect", None)):
            treated = pair_accuracy(f"block_{side}")
            matched = pair_accuracy(control[f"block_{side}"])
            diffs = [a - b for a, b in zip(treated, matched, strict=True)]
            values = _pair_mean(diffs, len(stages))[:, j]
            key = f"{pool}: block {side} - control"
            stats[key] = {"values": np.asarray(values), "direction": direction}
    return {"anchors": stats} if stats else {}


# --- planned forwards -------------------------------------------------------------------------
def knockout_forwards_per_image(settings: Any, num_layers: int) -> int:
    """Forwards per pair image: the clean one, then each knocked-out key set (two treatments and
    their random controls, per pool and draw) once over all layers (or ``knockout.layers``) and
    once per sweep window."""
    from seglens.analyses.knockout.sets import layer_windows

    windows = len(layer_windows(num_layers, settings.window_sweep)) if settings.window_sweep else 0
    controls = 2 * len(settings.control_pool) * settings.random_controls
    return 1 + (2 + controls) * (1 + windows)


def knockout_layer_forwards_per_image(settings: Any, num_layers: int) -> int:
    """Decoder-layer forwards per pair image. Recomputed: every forward runs every layer. With
    ``shared_prefix``: the clean forward runs every layer, a knocked-out set over all layers (or
    over ``knockout.layers`` = ``s..e``) runs layers ``s..L`` and one over a sweep window
    ``s..e`` likewise; layers ``1..s-1`` come from the clean pass."""
    from seglens.analyses.knockout.sets import layer_windows

    if not settings.shared_prefix:
        return knockout_forwards_per_image(settings, num_layers) * num_layers
    windows = layer_windows(num_layers, settings.window_sweep) if settings.window_sweep else []
    sets = 2 + 2 * len(settings.control_pool) * settings.random_controls
    first = 1 if settings.layers is None else settings.layers[0]
    runs = [num_layers - first + 1] + [num_layers - s + 1 for s, _ in windows]
    return num_layers + sets * sum(runs)


def knockout_forwards(config: Any, train: int, evaluation: int, layers: int) -> dict[str, Any]:
    """Pairs and their images are chosen at run time: at most ``top_k`` pairs, each on at most
    ``max_images`` (or every) evaluation image."""
    settings = config.knockout
    per_pair = evaluation if settings.max_images is None else min(settings.max_images, evaluation)
    per_image = knockout_forwards_per_image(settings, layers)
    detail = f"<= {settings.top_k} pairs x <= {per_pair} images x {per_image} per image"
    if settings.shared_prefix:
        full = knockout_layer_forwards_per_image(settings, layers) / layers
        detail += f"; shared prefix: tower once, {full:.1f} full-depth LLM forwards per image"
    return {"forwards": settings.top_k * per_pair * per_image, "bound": True, "detail": detail}


ANALYSIS = Analysis(
    name="knockout",
    title="block attention to correct / incorrect / random image tokens per class pair",
    run=run,
    config_key="knockout",
    config=KnockoutConfig,
    needs=("probing",),
    sections={"knockout": Knockout},
    figures=report.FIGURES,
    report=(Block("knockout", "Attention knockout", report.block),),
    question="Attention knockout asks which image tokens the LLM relies on to refine it.",
    findings=findings,
    paired=paired,
    finding_names={"anchors": "(c) Semantic anchors"},
    command=Command(
        "knockout",
        "block attention to correct / incorrect / random image tokens per class pair",
        _knockout_args,
        _knockout,
    ),
    forwards=knockout_forwards,
    tables=TABLES,
    overview=Panel(
        "knockout gap",
        report.overview_panel,
        "Pair-token accuracy when the tokens the reference probe classifies correctly (or "
        "incorrectly) are blocked, minus a size-matched random control, per LLM layer, with 95% "
        "paired intervals.",
    ),
)
