"""``seglens umap``: UMAP projections and cluster scores per stage for an existing run."""

from __future__ import annotations

import argparse

from seglens.cli import command


def _umap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (holds config.yaml, results.json)")
    p.add_argument(
        "--stages", nargs="+", help="stages to project (default: encoder, adapter, 4 LLM layers)"
    )
    p.add_argument("--tokens", type=int, help="tokens sampled from the evaluation split")
    p.add_argument("--neighbors", type=int, help="UMAP n_neighbors and k of the k-NN score")


@command("umap", "project a run's tokens per stage with UMAP and score their clustering")(
    _umap_args
)
def _umap(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seglens.commands import draw
    from seglens.experiments.umap import run_umap

    section = run_umap(args.run, stages=args.stages, tokens=args.tokens, neighbors=args.neighbors)
    draw(args.run)
    print(f"wrote {Path(args.run) / section.file} ({section.tokens} tokens)")
    return 0
