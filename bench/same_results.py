"""Are two runs' ``results.json`` the same, number for number? (A refactor must not move any.)

    python bench/same_results.py RUN_BEFORE RUN_AFTER

Walks both files and compares every value (numbers exactly, no tolerance) except provenance
(``created``, ``git_hash``, ``versions``), the list of drawn ``figures``, the two runs' own
folders (``config.out``, ``config.probe.cache_dir``) and the measured timings of the plan
(``plan.measured.*.seconds`` / ``images_per_s``). Prints each
difference with its path and how many values were compared; exits 1 when any differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SKIPPED = ("created", "git_hash", "versions", "figures")
#: Where each run was written (two runs compared are never in the same folder).
PATHS = ("config.out", "config.probe.cache_dir")
#: Timings (``plan.measured.<analysis>.seconds`` / ``.images_per_s``): never equal twice.
TIMINGS = ("seconds", "images_per_s")


def differences(before: Any, after: Any, path: str = "") -> tuple[list[str], int]:
    """(differences as "path: before != after", number of leaf values compared)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found, count = [], 0
        for key in sorted(set(before) | set(after)):
            where = f"{path}.{key}" if path else key
            if (not path and key in SKIPPED) or where in PATHS:
                continue
            if path.startswith("plan.measured.") and key in TIMINGS:
                continue
            if key not in before or key not in after:
                found.append(f"{where}: only in {'after' if key in after else 'before'}")
                continue
            more, n = differences(before[key], after[key], where)
            found += more
            count += n
        return found, count
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{path}: length {len(before)} != {len(after)}"], 1
        found, count = [], 0
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            more, n = differences(b, a, f"{path}[{i}]")
            found += more
            count += n
        return found, count
    same = before == after and type(before) is type(after)
    return ([] if same else [f"{path}: {before!r} != {after!r}"]), 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="run directory (or results.json) before")
    parser.add_argument("after", type=Path, help="run directory (or results.json) after")
    args = parser.parse_args(argv)
    files = [p / "results.json" if p.is_dir() else p for p in (args.before, args.after)]
    before, after = (json.loads(p.read_text()) for p in files)
    found, count = differences(before, after)
    for line in found:
        print(line)
    sections = sorted(k for k in before if k not in SKIPPED)
    print(
        f"{count} values compared in {len(sections)} sections ({', '.join(sections)}); "
        f"{len(found)} differ"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
