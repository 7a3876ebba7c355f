"""Pixel-level scoring of one stage-image at ADE20K size (512 x 683, 150 classes).

What ``evaluate_probes`` does per stage and image once the probe logits exist: upsample the
(C, 24, 24) grid logits through the geometry and take the argmax (``pixel_predictions``), then
count. Two ways to count, timed side by side over >= 5 interleaved rounds:

- ``update + add``: ``ConfusionMatrix.update`` and ``PerImageCounts.add`` (each validates both
  arrays; ``add`` runs three bincounts), the path before issue 15;
- ``fused``: ``score_target`` once per image, then per stage one ``confusion_of`` bincount
  feeding both (``PerImageCounts.add_confusion``), the path ``evaluate_probes`` uses now.

Prints the per-round ratios to ``pixel_predictions`` alone (the upsampling floor) and checks that
both ways give identical counts. Usage: ``python bench/bench_scoring.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from _rounds import interleaved, ratio_table
from seglens.data.geometry import Geometry
from seglens.metrics import (
    ConfusionMatrix,
    PerImageCounts,
    confusion_of,
    pixel_predictions,
    pixel_target,
    score_target,
)

C, H, W, G = 150, 512, 683, 24


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5)")
    parser.add_argument("--stages", type=int, default=4, help="stages scored per image")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transform = Geometry(mode="crop", size=336, fill=(0, 0, 0)).plan(H, W)
    rng = np.random.default_rng(0)
    mask = rng.integers(0, C, (H, W))
    mask[rng.random((H, W)) < 0.1] = 255
    target = torch.from_numpy(pixel_target(mask, transform))
    gen = torch.Generator().manual_seed(0)
    grids = [torch.randn(C, G, G, generator=gen) for _ in range(args.stages)]
    counts = {}

    def upsample() -> None:
        for grid in grids:
            pixel_predictions(grid, transform)

    def old() -> None:
        cm, per = ConfusionMatrix(C), PerImageCounts(C)
        for grid in grids:
            pix = pixel_predictions(grid, transform)
            cm.update(pix, target)
            per.add(pix, target)
        counts["old"] = (cm.matrix, per._table())

    def fused() -> None:
        cm, per = ConfusionMatrix(C), PerImageCounts(C)
        scored = score_target(target, C)
        for grid in grids:
            confusion = confusion_of(pixel_predictions(grid, transform), *scored, C)
            cm.matrix += confusion
            per.add_confusion(confusion)
        counts["fused"] = (cm.matrix, per._table())

    modes = {"pixel_predictions only": upsample, "update + add": old, "fused": fused}
    for mode in modes.values():
        mode()
    start = time.perf_counter()
    times = interleaved(modes, args.rounds)
    same = torch.equal(counts["old"][0], counts["fused"][0])
    same &= np.array_equal(counts["old"][1], counts["fused"][1])
    print(
        f"# {args.stages} stage(s) of one {H}x{W} image, C={C}, crop geometry, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, "
        f"{time.perf_counter() - start:.0f} s"
    )
    for line in ratio_table(times, "pixel_predictions only"):
        print(line)
    print(f"identical counts: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
