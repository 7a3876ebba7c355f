"""``seglens organism train``: train the model organism from scratch (see ``seglens.organism``)."""

from __future__ import annotations

import argparse

from seglens.cli import FLAG, command


def _organism_args(p: argparse.ArgumentParser) -> None:
    from seglens.organism import Recipe

    p.add_argument("action", choices=["train"], help="train: train an organism from scratch")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--seed", type=int, default=0, help="weights, scenes and batch order (0)")
    p.add_argument("--overwrite", **FLAG, help="replace an existing folder")
    defaults = Recipe()
    for name in ("scenes", "tower_steps", "text_steps", "steps", "batch_size"):
        p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=int,
            default=getattr(defaults, name),
            help=f"recipe: {name} (default {getattr(defaults, name)})",
        )


@command("organism", "train the model organism (a tiny LLaVA on synthetic scenes)")(_organism_args)
def _organism(args: argparse.Namespace) -> int:
    from seglens.organism import Recipe, train_organism

    recipe = Recipe(
        scenes=args.scenes,
        tower_steps=args.tower_steps,
        text_steps=args.text_steps,
        steps=args.steps,
        batch_size=args.batch_size,
    )
    out = train_organism(args.out, seed=args.seed, recipe=recipe, overwrite=bool(args.overwrite))
    print(f"organism: {out}")
    return 0
