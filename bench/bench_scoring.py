"""Pixel-level scoring at ADE20K size (512 x 683, 150 classes, a 24 x 24 grid, crop geometry).

What ``evaluate_probes`` does per image once the probe logits exist: upsample every stage's
(C, 24, 24) grid logits through the geometry, take the argmax and count it against the mask.
Timed side by side over >= 5 interleaved rounds, per image of ``--stages`` stages:

- ``grid_sample + argmax``: the (C, H, W) upsampled logits by ``F.grid_sample``, then argmax,
  per stage (the path before this bench's change);
- ``dense separable + argmax``: ``Transform.logits_to_original`` (the reference expression),
  then argmax, per stage;
- ``upsampled_argmax``: ``metrics.pixel_predictions`` of all stages at once (it forms no
  (C, H, W) tensor), then one batched ``confusion_of`` and ``PerImageCounts.tables``, as
  ``evaluate_probes`` does.

Two kinds of logits: ``noise`` (N(0, 1) per token and class: every sub-cell ambiguous, the worst
case for ``upsampled_argmax``) and ``peaked`` (a blocky label map + 4 on the true class + the
same noise, like a trained probe). Prints ratios to ``grid_sample + argmax`` and checks that
``upsampled_argmax`` equals the dense separable argmax bit for bit. Usage:
``python bench/bench_scoring.py [--rounds 5] [--stages 4]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from _rounds import interleaved, ratio_table
from seglens.data.geometry import Geometry
from seglens.metrics import (
    PerImageCounts,
    confusion_of,
    pixel_predictions,
    pixel_target,
    score_target,
)

C, H, W, G = 150, 512, 683, 24


def grid_sample_argmax(grid: torch.Tensor, transform) -> torch.Tensor:
    """The previous implementation: (C, g, g) -> (H, W) via ``F.grid_sample`` and argmax."""
    ys = (np.arange(transform.height) + 0.5) * transform.scale_y - transform.offset_y
    xs = (np.arange(transform.width) + 0.5) * transform.scale_x - transform.offset_x
    gy = torch.as_tensor(ys / transform.size * 2 - 1, dtype=torch.float32)
    gx = torch.as_tensor(xs / transform.size * 2 - 1, dtype=torch.float32)
    at = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    up = F.grid_sample(grid[None], at, mode="bilinear", padding_mode="border", align_corners=False)
    return up[0].argmax(0)


def logits_of(kind: str, stages: int, rng: np.random.Generator) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(stages, C, G, G, generator=gen)
    if kind == "peaked":
        labels = rng.choice(C, 12, replace=False)[rng.integers(0, 12, (6, 6))]
        labels = torch.from_numpy(np.kron(labels, np.ones((4, 4), np.int64)))
        logits += 4.0 * F.one_hot(labels, C).permute(2, 0, 1)
    return logits


def compare(kind: str, logits: torch.Tensor, transform, scored, rounds: int) -> bool:
    """Time the three paths on one image's (S, C, g, g) logits; print the table; True when
    ``upsampled_argmax`` equals the dense separable argmax."""
    out: dict[str, torch.Tensor] = {}

    def count(pred: torch.Tensor) -> None:
        PerImageCounts.tables(confusion_of(pred, *scored, C))

    def old() -> None:
        out["grid_sample"] = torch.stack([grid_sample_argmax(g, transform) for g in logits])
        for pred in out["grid_sample"]:
            count(pred)

    def dense() -> None:
        out["dense"] = torch.stack([transform.logits_to_original(g).argmax(0) for g in logits])
        for pred in out["dense"]:
            count(pred)

    def new() -> None:
        out["new"] = pixel_predictions(logits, transform)
        count(out["new"])

    modes = {"grid_sample + argmax": old, "dense separable + argmax": dense}
    modes["upsampled_argmax"] = new
    for mode in modes.values():
        mode()
    start = time.perf_counter()
    times = interleaved(modes, rounds)
    same = torch.equal(out["new"], out["dense"])
    agree = float((out["new"] == out["grid_sample"]).float().mean())
    print(
        f"\n# {kind} logits: {len(logits)} stage(s) of one {H}x{W} image, C={C}, crop, "
        f"{torch.get_num_threads()} threads, {rounds} interleaved rounds, "
        f"{time.perf_counter() - start:.0f} s"
    )
    # The base is the previous path, not a floor: faster than it is the point.
    for line in ratio_table(times, "grid_sample + argmax", below=tuple(modes)):
        print(line)
    print(f"upsampled_argmax == dense separable argmax, bit for bit: {same}")
    print(f"pixels where it agrees with grid_sample's argmax: {agree:.7f}")
    return same


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
    scored = score_target(torch.from_numpy(pixel_target(mask, transform)), C)
    ok = True
    for kind in ("noise", "peaked"):
        ok &= compare(kind, logits_of(kind, args.stages, rng), transform, scored, args.rounds)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
