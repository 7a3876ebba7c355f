"""Reproducibility of the organism: train several seeds from scratch, analyse each, and print per
finding the mean and spread over seeds (and whether it holds on every seed).

    python bench/organism.py --out runs/organism-seeds            # 3 seeds, ~25 min on 2 cores
    python bench/organism.py --out runs/organism-seeds --reuse    # analyse folders already there

Each seed: ``seglens organism train`` (the default recipe), then ``seglens run`` with the settings
of ``seglens.organism.ANALYSIS`` (UMAP off), then the four findings of
``seglens.experiments.findings``. The first seed's run is ``seglens run --twin``: its random twin
(the same architecture re-initialised by HF ``_init_weights``, ``twin.seed`` 0) is the "random"
column, and every seed is compared with that twin on the same images (``seglens.analyses.twin.
compare``: model minus twin, paired over images; the twin does not depend on the trained weights,
so one twin serves every seed). Not part of ``make bench`` (it trains models).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def analyse(model: str, out: Path, twin: bool = False) -> dict:
    from seglens.config import load_config
    from seglens.experiments.pipeline import run
    from seglens.organism import ANALYSIS
    from seglens.rundir.files import read_json

    overrides = {**ANALYSIS, "model.name": model, "out": str(out), "overwrite": True}
    overrides |= {"umap.enabled": False, "probe.cache_dir": str(out) + "-cache"}
    overrides |= {"twin.enabled": twin}
    run(load_config(**overrides), progress=False)
    return read_json(out / "results.json")


def numbers(results: dict) -> dict[str, float | None]:
    """The headline number of each finding (and its interval bounds) from one run."""
    from seglens.stages import llm_layer

    f = results["findings"]
    metrics = results["probing"]["causal"]["metrics"]
    out = {
        "encoder mIoU": metrics["encoder"]["patch"]["miou"],
        "adapter mIoU": metrics["adapter"]["patch"]["miou"],
        "best LLM mIoU": max(
            m["patch"]["miou"] for s, m in metrics.items() if llm_layer(s) is not None
        ),
    }
    rows = {
        "(a) adapter - encoder": f["drop"].get("adapter_minus_encoder"),
        "(b) best LLM - adapter": f["recovery"].get("best_llm_minus_adapter"),
        **{
            f"(c) block {side} - control ({pool})": intervals[f"block_{side}_minus_control"]
            for pool, intervals in (f["anchors"].get("pools") or {}).items()
            for side in ("correct", "incorrect")
        },
        "(d) causal early - late gain": f["early_positions"].get("causal_early_minus_late_gain"),
        "(d) bidir - causal, early rows": f["early_positions"].get(
            "bidirectional_minus_causal_early"
        ),
    }
    for name, interval in rows.items():
        for part in ("estimate", "low", "high"):
            out[f"{name} {part}"] = (interval or {}).get(part)
    for key, found in f.items():
        out[f"holds: {key}"] = found.get("holds")
    return out


def beyond(versus: dict) -> dict[str, float | bool | None]:
    """Model minus twin per directed statistic (estimate and bounds) and the verdict per finding,
    from ``seglens.analyses.twin.compare``."""
    out: dict[str, float | bool | None] = {}
    for finding, entry in versus.items():
        for key, stat in entry["statistics"].items():
            if stat["direction"] is None:
                continue
            for part in ("estimate", "low", "high"):
                out[f"{finding} {key} - twin {part}"] = (stat["model_minus_twin"] or {}).get(part)
        out[f"beyond twin: {finding}"] = entry["beyond_twin"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/organism-seeds", help="folder for models and runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reuse", action="store_true", help="reuse trained seed folders")
    args = parser.parse_args(argv)

    from seglens.analyses.twin import TWIN_DIR, compare
    from seglens.organism import train_organism
    from seglens.rundir.files import read_json

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    table: dict[str, dict] = {}
    twin_dir = root / f"run{args.seeds[0]}" / TWIN_DIR
    for i, seed in enumerate(args.seeds):
        folder = root / f"seed{seed}"
        start = time.perf_counter()
        if not (args.reuse and (folder / "config.json").is_file()):
            train_organism(folder, seed=seed, overwrite=True, progress=False)
        trained = time.perf_counter() - start
        run = root / f"run{seed}"
        results = analyse(str(folder), run, twin=i == 0)
        table[f"seed {seed}"] = numbers(results) | beyond(compare(run, twin_dir))
        print(f"seed {seed}: trained in {trained:.0f} s", flush=True)
    twin = numbers(read_json(twin_dir / "results.json"))
    table["random twin"] = twin | dict.fromkeys(set(table[f"seed {args.seeds[0]}"]) - set(twin))

    seeds = [k for k in table if k.startswith("seed")]
    print(f"\n{'quantity':36s} " + " ".join(f"{k:>9s}" for k in table) + "      mean    spread")
    for row in table[seeds[0]]:
        values = [table[k].get(row) for k in table]
        cells = " ".join(f"{_cell(v):>9s}" for v in values)
        trained = [table[k].get(row) for k in seeds]
        if all(isinstance(v, float) for v in trained):
            summary = f"{statistics.mean(trained):+9.3f} {max(trained) - min(trained):9.3f}"
        elif all(isinstance(v, bool) for v in trained):
            summary = f"{'all seeds' if all(trained) else 'NOT all':>19s}"
        else:
            summary = ""
        print(f"{row:36s} {cells} {summary}")
    (root / "table.json").write_text(json.dumps(table, indent=1))
    return 0


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:+.3f}"
    return "n/a"


if __name__ == "__main__":
    sys.exit(main())
