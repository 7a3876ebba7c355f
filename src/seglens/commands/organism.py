"""``seglens organism train``: train the model organism from scratch (see ``seglens.organism``)."""

from __future__ import annotations

import argparse

from seglens.cli import FLAG, LazyHelp, command

_RECIPE = ("scenes", "tower_steps", "text_steps", "steps", "batch_size")


def _recipe_help(name: str) -> str:
    from seglens.organism import Recipe  # imports torch: only when this help is printed

    return f"recipe: {name} (default {getattr(Recipe(), name)})"


def _organism_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["train"], help="train: train an organism from scratch")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--seed", type=int, default=0, help="weights, scenes and batch order (0)")
    p.add_argument("--overwrite", **FLAG, help="replace an existing folder")
    for name in _RECIPE:
        help_text = LazyHelp(lambda name=name: _recipe_help(name))
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, help=help_text)


@command("organism", "train the model organism (a tiny LLaVA on synthetic scenes)")(_organism_args)
def _organism(args: argparse.Namespace) -> int:
    from seglens.organism import Recipe, train_organism

    given = {name: getattr(args, name) for name in _RECIPE if getattr(args, name) is not None}
    recipe = Recipe(**given)
    out = train_organism(args.out, seed=args.seed, recipe=recipe, overwrite=bool(args.overwrite))
    print(f"organism: {out}")
    return 0
