"""lda statistics updates at LLaVA-1.5-7B width (D = 4096, M = 576 tokens, C = 150), per path.

``LDAProbe._update`` adds a batch's scatter to its running sum. Timed side by side over >= 5
interleaved rounds, each mode doing ``--updates`` updates (default 15 x 576 rows, so the float32
path's flush into float64 every 8192 rows is included, amortised as in a run):

- ``exact (float64)``: ``probe.exact``, float64 products of raw features (upper block triangle),
  the arithmetic before issue 25;
- ``float32 (shifted)``: the default, float32 GEMMs of features shifted by the first batch's
  mean, added into the float64 sums;
- ``bfloat16 GEMMs``: the same with the GEMMs' inputs rounded to bf16 (``probe.gemm``).

Prints the ratios to the exact path and, per path, the largest relative gap of the solved
coefficients to the exact path's on features with LLM-like offsets (mean 3, massive dimension).
Usage: ``python bench/bench_lda.py [--rounds 5] [--dim 4096] [--updates 15]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from _rounds import interleaved, ratio_table
from seglens.probes._common import targets
from seglens.probes.lda import LDAProbe

PATHS = {
    "exact (float64)": dict(exact=True),
    "float32 (shifted)": dict(),
    "bfloat16 GEMMs": dict(gemm="bfloat16"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5)")
    parser.add_argument("--dim", type=int, default=4096, help="D, the feature width")
    parser.add_argument("--tokens", type=int, default=576, help="M, tokens per update")
    parser.add_argument("--updates", type=int, default=15, help="updates per mode and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    C, D, M = 150, args.dim, args.tokens
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (M,), generator=gen)
    means = 0.5 * torch.randn(C, D, generator=gen)
    x = torch.randn(M, D, generator=gen) + means[y] + 3.0
    x[:, 0] += 1e3  # a massive dimension
    T, valid = targets(y, None, C)
    probes = {name: LDAProbe(C, **kw) for name, kw in PATHS.items()}

    def mode(probe: LDAProbe):
        def run() -> None:
            for _ in range(args.updates):
                probe._update(x, T, valid)

        return run

    modes = {name: mode(p) for name, p in probes.items()}
    start = time.perf_counter()
    times = interleaved(modes, args.rounds)
    print(
        f"# {args.updates} updates per mode and round: D={D}, M={M}, C={C}, "
        f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds, "
        f"{time.perf_counter() - start:.0f} s"
    )
    for line in ratio_table(times, "exact (float64)", below=tuple(modes)):
        print(line)
    exact = probes["exact (float64)"].finalize().coef_.double()
    for name, probe in probes.items():
        gap = float((probe.finalize().coef_.double() - exact).abs().max() / exact.abs().max())
        print(f"{name:20s} solved coef_, max relative gap to exact: {gap:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
