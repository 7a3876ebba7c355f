"""The knockout with and without its shared prefix (``knockout.shared_prefix``), side by side.

Per batch the knockout runs one clean forward and then one per knocked-out key set and per layer
window. With the shared prefix the vision tower and adapter run once per batch, and a window's
forward resumes from the clean pass's decoder outputs before the window (``seglens.prefix``).
This bench runs ``run_knockout`` both ways on a probed run of the shipped organism (``--run``, or
a probing run it makes first), over >= 5 interleaved rounds, and prints per-round ratios
shared / recomputed (min / median / max), then the work per pair image each way: forwards of the
vision tower and adapter, and decoder-layer forwards, for this model and for LLaVA-1.5-7B
(32 layers) with the shipped config's ``window_sweep: 8``.

Usage: ``python bench/knockout_prefix.py [--rounds 5] [--images 16] [--window-sweep 1]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers

from _rounds import interleaved, ratio_table
from seglens.analyses.knockout import (
    knockout_forwards_per_image,
    knockout_layer_forwards_per_image,
)
from seglens.analyses.knockout.measure import run_knockout
from seglens.config import load_config
from seglens.experiments.common import build_model
from seglens.rundir import RunDir


def work_per_image(settings: Any, layers: int) -> dict[str, int]:
    """Vision-tower passes and decoder-layer forwards per pair image, recomputed vs shared
    (``seglens.analyses.knockout.knockout_layer_forwards_per_image``)."""
    forwards = knockout_forwards_per_image(settings, layers)
    return {
        "forwards": forwards,
        "vision recomputed": forwards,
        "vision shared": 1,
        "layers recomputed": forwards * layers,
        "layers shared": knockout_layer_forwards_per_image(
            replace(settings, shared_prefix=True), layers
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a probed organism run (default: make one)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5)")
    parser.add_argument("--images", type=int, default=16, help="knockout.max_images")
    parser.add_argument("--pairs", type=int, default=2, help="knockout.top_k")
    parser.add_argument("--window-sweep", type=int, default=1, help="knockout.window_sweep")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="seglens-prefix-bench-"))
    try:
        source = Path(args.run) if args.run else _probe_organism(work / "probed")
        run = work / "run"
        shutil.copytree(source, run, ignore=shutil.ignore_patterns("cache", "checkpoint"))
        config = RunDir.of(run).config
        vlm = build_model(config.model)
        settings = {
            "top_k": args.pairs,
            "max_images": args.images,
            "window_sweep": args.window_sweep,
            "attention": False,
        }
        knockout_settings = replace(config.knockout, **settings)

        def knockout(shared: bool) -> float:
            start = time.perf_counter()
            run_knockout(run, vlm=vlm, progress=False, shared_prefix=shared, **settings)
            return time.perf_counter() - start

        knockout(True)  # warm-up (and the pair selection's label scan, cached by the OS)
        times = interleaved(
            {"recomputed": partial(knockout, False), "shared prefix": partial(knockout, True)},
            args.rounds,
        )
        section = RunDir.of(run).results()["knockout"]
        images = sum(p["images"] for p in section["pairs"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"# seglens knockout shared-prefix bench  {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"# {platform.platform()} | {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()} | torch {torch.__version__} | transformers "
        f"{transformers.__version__}"
    )
    print(
        f"# {config.model.name}: {vlm.num_llm_layers} LLM layers; {len(section['pairs'])} pairs, "
        f"{images} pair images, window_sweep {args.window_sweep}, {args.rounds} interleaved rounds"
    )
    print(
        "# ratio: shared prefix / recomputed per round (the same run_knockout, bit-equal results)"
    )
    for line in ratio_table(times, "recomputed", label="knockout", below=("shared prefix",)):
        print(line)
    print(
        "# work per pair image (1 clean forward + every key set, over all layers and per window):"
    )
    seven_b = load_config("configs/llava-1.5-7b-ade20k.yaml").knockout
    for label, settings, layers in (
        (f"{config.model.name}, this bench's settings", knockout_settings, vlm.num_llm_layers),
        ("LLaVA-1.5-7B (32 layers), configs/llava-1.5-7b-ade20k.yaml", seven_b, 32),
    ):  # fmt: skip
        w = work_per_image(settings, layers)
        print(
            f"  {label}: {w['forwards']} forwards; vision tower + adapter {w['vision recomputed']}"
            f" -> {w['vision shared']}; decoder-layer forwards {w['layers recomputed']} -> "
            f"{w['layers shared']} ({w['layers shared'] / w['layers recomputed']:.2f}x, "
            f"{w['layers shared'] / layers:.1f} full-depth forwards)"
        )
    return 0


def _probe_organism(out: Path) -> Path:
    """A probing-only run of the organism (the demo's probe settings)."""
    from seglens.experiments.pipeline import run as run_pipeline

    overrides = {
        "knockout.enabled": False,
        "bidir.enabled": False,
        "umap.enabled": False,
        "lens.enabled": False,
    }
    config = load_config("configs/demo.yaml", out=str(out), **overrides)
    run_pipeline(config, progress=False)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
