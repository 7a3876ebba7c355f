"""``seglens attention``: attention of a pair's misclassified tokens to its anchors, per layer."""

from __future__ import annotations

import argparse

from seglens.cli import command


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="probing run directory (holds config.yaml)")


@command("attention", "measure the attention of incorrect tokens to same-class anchors")(
    _attention_args
)
def _attention(args: argparse.Namespace) -> int:
    from seglens.commands import draw
    from seglens.experiments.attention import run_attention

    section = run_attention(args.run)
    draw(args.run)
    print(section["statement"])
    print(f"results: {args.run}/results.json")
    return 0
