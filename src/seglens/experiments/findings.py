"""Findings read off a finished run: each a verdict on paired 95% intervals.

Every registered analysis may contribute findings (``Analysis.findings``); seglens's own are the
paper's four: (a) *drop* and (b) *recovery* (probing), (c) *anchors* (knockout) and (d) *early
positions* (bidirectional). Every verdict comes from a paired bootstrap over evaluation images
(both sides of each difference resampled together) on the counts the analyses saved; a finding
whose analysis did not run is ``None``, never guessed. This module holds the verdict helpers the
analyses share and the loop over the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["above", "all_of", "below", "findings_of", "fmt_interval", "read_findings"]
__all__ += ["write_findings"]

Interval = dict[str, Any]


def fmt_interval(interval: Interval | None) -> str:
    """'+0.031 [+0.012, +0.050]'; '+0.031' for an estimate without bounds (no resamples); 'n/a'
    without an estimate."""
    if not interval or interval.get("estimate") is None:
        return "n/a"
    if interval.get("low") is None:
        return f"{interval['estimate']:+.3f}"
    return f"{interval['estimate']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def below(interval: Interval | None) -> bool | None:
    """True when the whole interval is below zero (None when there is no interval)."""
    return None if not interval or interval.get("high") is None else interval["high"] < 0


def above(interval: Interval | None) -> bool | None:
    """True when the whole interval is above zero (None when there is no interval)."""
    return None if not interval or interval.get("low") is None else interval["low"] > 0


def all_of(*verdicts: bool | None) -> bool | None:
    """All verdicts hold (None when any of them is undecided)."""
    return None if any(v is None for v in verdicts) else all(verdicts)


def findings_of() -> tuple[str, ...]:
    """The names of every finding the registered analyses contribute, in order."""
    from seglens.analyses import ordered

    return tuple(key for a in ordered() for key in a.finding_names)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # import machinery probes (__path__, ...)
        raise AttributeError(name)
    if name == "FINDINGS":  # the registry can grow after import: computed on access
        return findings_of()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_findings(
    results: Mapping[str, Any], arrays: Callable[[str], Mapping[str, Any] | None]
) -> dict[str, dict]:
    """Every registered analysis's findings on a run (also those whose analysis did not run:
    they say so).

    Args:
        results: the run's ``results.json``.
        arrays: condition name -> that condition's saved probing arrays (``probing_<cond>.npz``),
            or None when it was not saved.

    Returns:
        ``{finding: {"holds": bool | None, "text": str, <intervals>...}}``, in registry order.
    """
    from seglens.analyses import ordered

    found: dict[str, dict] = {}
    for analysis in ordered():
        if analysis.findings is not None:
            found |= analysis.findings(results, arrays)
    return found


def write_findings(run_dir) -> dict[str, dict]:
    """Read the findings off ``run_dir`` and store them as its ``findings`` section."""
    from pathlib import Path

    from seglens.rundir import RESULTS, load_results, put_section
    from seglens.rundir.files import load_arrays
    from seglens.rundir.schema import probing_arrays

    run_dir = Path(run_dir)
    results = load_results(run_dir / RESULTS)

    def arrays(condition: str):
        path = run_dir / probing_arrays(condition)
        return load_arrays(path) if path.is_file() else None

    return put_section(run_dir, "findings", read_findings(results, arrays))
