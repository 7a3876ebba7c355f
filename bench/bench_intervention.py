"""Cost of attention interventions: plain forward vs the same forward under ``intervene``.

Runs every condition once per round (order rotated), >= 5 rounds, and prints the min / median /
max of the per-round ratio intervened / plain (target <= 1.3).
Usage: ``python bench/bench_intervention.py [--reps 15]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial

import numpy as np
import torch
import transformers

from _rounds import interleaved, ratio_table
from seglens.interventions import BidirectionalImage, Knockout, TokenSet, intervene
from seglens.models import tiny_llava


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds (>= 5)")
    parser.add_argument("--batch", type=int, default=4, help="images per forward")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--padded", action="store_true", help="mix two prompt lengths")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    vlm = tiny_llava(
        "clip", attn_implementation=args.attn, text_width=256, text_layers=8, heads=4,
        vision_width=128, vision_layers=4,
    )  # fmt: skip
    L, N = vlm.num_llm_layers, vlm.num_image_tokens
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(args.batch)]
    prompts = None
    if args.padded:
        long = "What is in this picture? Answer in detail, naming every object."
        prompts = ["Describe the image.", long] * (args.batch // 2) + [long] * (args.batch % 2)
    batch = vlm.prepare(images, prompts=prompts)
    later = TokenSet.from_slots(range(N // 2, N))
    conditions = {
        "plain": None,
        "empty spec (mask path)": [],
        "knockout, all layers (mask)": [Knockout(keys=later)],
        f"knockout, layers 3-{L - 2} (hooks)": [
            Knockout(keys=later, layers=tuple(range(3, L - 1)))
        ],
        "bidirectional image (mask)": [BidirectionalImage()],
    }
    stage = [f"llm.{L}"]

    def forward(specs) -> float:
        start = time.perf_counter()
        if specs is None:
            vlm.capture(batch, stage)
        else:
            with intervene(vlm, specs):
                vlm.capture(batch, stage)
        return time.perf_counter() - start

    for specs in conditions.values():  # warm-up
        forward(specs)
    times = interleaved(
        {name: partial(forward, specs) for name, specs in conditions.items()}, args.reps
    )

    cfg = vlm.model.config.text_config
    print(f"# seglens intervention bench  {time.strftime('%Y-%m-%d %H:%M')}")
    print(
        f"# {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    )
    print(f"# torch {torch.__version__} | transformers {transformers.__version__}")
    print(
        f"# tiny LLaVA: {L} LLM layers, width {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
        f"B={args.batch}, T={batch.input_ids.shape[1]}, N={N}, attn={args.attn}, "
        f"padded={not batch.attention_mask.all().item()}, {args.reps} interleaved rounds"
    )
    print("# ratio: intervened / plain per round (every condition runs the same capture)")
    for line in ratio_table(times, "plain", label="condition"):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
