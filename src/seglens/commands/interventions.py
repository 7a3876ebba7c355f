"""``seglens knockout`` and ``seglens bidir``: the attention interventions on an existing run."""

from __future__ import annotations

import argparse

from seglens.cli import command


# --- knockout ---------------------------------------------------------------------------------
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
        choices=("outside_pair", "pair", "image"),
        help="pools the random controls are drawn from (one control per pool)",
    )
    p.add_argument(
        "--mode", choices=("block", "keep_only"), help="block the sets, or keep only them readable"
    )


@command("knockout", "block attention to correct / incorrect / random image tokens per class pair")(
    _knockout_args
)
def _knockout(args: argparse.Namespace) -> int:
    from seglens.commands import draw
    from seglens.experiments.knockout import run_knockout

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


# --- bidirectional ----------------------------------------------------------------------------
def _bidir_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="probing run directory (holds config.yaml)")
    p.add_argument("--layer", type=int, help="LLM layer of the per-position accuracy")


@command("bidir", "train and score probes under bidirectional image attention vs causal")(
    _bidir_args
)
def _bidir(args: argparse.Namespace) -> int:
    from seglens.commands import draw
    from seglens.experiments.bidirectional import run_bidirectional

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
