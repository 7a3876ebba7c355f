"""Run every benchmark in sequence with quick sizes (``make bench``; < 10 minutes on 2 CPU cores).

Each script prints its own table of ratios, each from >= 5 interleaved rounds (min / median /
max); pass ``--full`` for the scripts' default sizes and ``--realsize`` to add
``realsize.py --llm-layers 2 --quick`` (LLaVA-1.5-7B widths; several more minutes on CPU).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = {
    "bench_probe.py": ["--reps", "5", "--images", "32", "--eval-images", "16", "--epochs", "3"],
    "bench_intervention.py": ["--reps", "5"],
    "bench_scale.py": ["--images", "32", "--eval-images", "16", "--rounds", "5"],
    "realsize.py": ["--llm-layers", "2", "--quick"],
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    unknown = sorted(set(argv) - {"--full", "--realsize"})
    if unknown:
        print(f"unknown option(s) {unknown}; use --full and/or --realsize", file=sys.stderr)
        return 2
    full = "--full" in argv
    scripts = sorted(HERE.glob("bench_*.py"))
    if "--realsize" in argv:
        scripts.append(HERE / "realsize.py")
    failed = []
    for script in scripts:
        args = [] if full else QUICK.get(script.name, [])
        print(f"\n=== {script.name} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(script), *args], check=False)
        print(f"=== {script.name}: {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
