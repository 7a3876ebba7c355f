"""Interleaved timing rounds and ratio tables shared by the benches (bench-only helper).

A ratio is measured per round: every mode runs once per round (order rotated from round to
round, so no mode always runs first or last), and each round gives its own ratio mode / floor.
The table prints the min, median and max of those per-round ratios: machine noise shows up as
spread instead of silently moving a best-of-2. A floor does the same loading and the same depth
as what it is compared with, so a ratio below 1 in every round means the bench is wrong (flagged).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

MIN_ROUNDS = 5


def check_rounds(rounds: int) -> int:
    if rounds < MIN_ROUNDS:
        raise SystemExit(f"--rounds {rounds}: ratios need at least {MIN_ROUNDS} interleaved rounds")
    return rounds


def interleaved(
    modes: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    timer: Callable[[Callable[[], object]], float] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Run every mode once per round, rotating the order; return seconds per mode per round.

    ``timer(fn)`` times one call (default: wall clock around ``fn()``; a mode that returns a
    float reports its own seconds, e.g. a subprocess that times only its steady state).
    """
    names = list(modes)
    times: dict[str, list[float]] = {name: [] for name in names}

    def wall(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        value = fn()
        return float(value) if isinstance(value, float) else time.perf_counter() - start

    timer = timer or wall
    for r in range(check_rounds(rounds)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(timer(modes[name]))
        if on_round is not None:
            on_round(r)
    return times


def ratios(values: list[float], base: list[float], *, inverse: bool = False) -> list[float]:
    """Per-round ratios values[r] / base[r] (base[r] / values[r] with ``inverse``)."""
    if len(values) != len(base):
        raise ValueError(f"{len(values)} rounds against {len(base)}")
    return [b / v if inverse else v / b for v, b in zip(values, base, strict=True)]


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def ratio_table(
    times: Mapping[str, list[float]],
    base: str,
    *,
    label: str = "mode",
    unit: float = 1.0,
    below: tuple[str, ...] = (),
) -> list[str]:
    """Lines: mode, median seconds (x ``unit``), min / median / max of the per-round ratio.

    A mode faster than its floor in every round is flagged as a bench bug, except the modes in
    ``below`` (those that do less than the floor by design); a spread max > 1.5 x min as noisy.
    """
    width = max(len(label), *(len(m) for m in times)) + 2
    lines = [
        f"{label:<{width}} {'median s':>9} {'min':>7} {'median':>7} {'max':>7}",
    ]
    for name, values in times.items():
        lo, med, hi = spread(ratios(values, times[base]))
        flag = ""
        if name != base and name not in below and hi < 1.0:
            flag = "  <- below its floor in every round: bench bug"
        elif hi > 1.5 * lo:
            flag = "  (noisy: max > 1.5 x min; rerun on a quiet machine)"
        lines.append(
            f"{name:<{width}} {statistics.median(values) * unit:>9.3f} "
            f"{lo:>7.3f} {med:>7.3f} {hi:>7.3f}{flag}"
        )
    return lines
