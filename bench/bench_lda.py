"""One lda statistics update at LLaVA-1.5-7B width (D = 4096, M = 576 tokens, C = 150).

``LDAProbe._update`` adds a batch's float64 scatter x^T x to its running sum. Timed side by side
over >= 5 interleaved rounds, per update:

- ``full scatter``: the update before this bench's change (its code, inline below): counts,
  sums, class sums and the whole D x D product in one GEMM;
- ``LDAProbe._update``: the shipped update, which accumulates the same but only the upper block
  triangle of the symmetric scatter (``probes/lda.py``, about half the flops).

Prints the ratios to ``full scatter`` and checks that the mirrored triangle equals the full
product and the other statistics are identical.
Usage: ``python bench/bench_lda.py [--rounds 5] [--dim 4096]``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from _rounds import interleaved, ratio_table
from seglens.probes._common import targets
from seglens.probes.lda import LDAProbe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5)")
    parser.add_argument("--dim", type=int, default=4096, help="D, the feature width")
    parser.add_argument("--tokens", type=int, default=576, help="M, tokens per update")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    C, D, M = 150, args.dim, args.tokens
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, D, generator=gen) + 3.0
    y = torch.randint(0, C, (M,), generator=gen)
    T, valid = targets(y, None, C)
    zeros = torch.zeros
    st = dict(n=zeros((), dtype=torch.float64), xsum=zeros(D, dtype=torch.float64))
    st |= dict(count=zeros(C, dtype=torch.float64), csum=zeros(C, D, dtype=torch.float64))
    st["S"] = zeros(D, D, dtype=torch.float64)
    probe = LDAProbe(C)

    def old() -> None:
        x64 = x.double() * valid[:, None]
        T64 = T.double()
        st["n"] += valid.sum()
        st["xsum"] += x64.sum(0)
        st["count"] += T64.sum(0)
        st["csum"].addmm_(T64.T, x64)
        st["S"].addmm_(x64.T, x64)

    modes = {"full scatter": old, "LDAProbe._update": lambda: probe._update(x, T, valid)}
    for mode in modes.values():
        mode()
    start = time.perf_counter()
    times = interleaved(modes, args.rounds)
    S = probe._stats["S"]
    mirrored = S.triu() + S.triu(1).T
    gap = float((mirrored - st["S"]).abs().max() / st["S"].abs().max())
    same = all(torch.equal(probe._stats[k], st[k]) for k in ("n", "xsum", "count", "csum"))
    print(
        f"# one update: D={D}, M={M}, C={C}, float64, {torch.get_num_threads()} threads, "
        f"{args.rounds} interleaved rounds, {time.perf_counter() - start:.0f} s"
    )
    for line in ratio_table(times, "full scatter", below=tuple(modes)):
        print(line)
    print(f"mirrored upper triangle vs full scatter, max relative gap: {gap:.1e}")
    print(f"counts, sums and class sums identical: {same}")
    return 0 if gap < 1e-12 and same else 1


if __name__ == "__main__":
    sys.exit(main())
