"""``seglens info`` and ``seglens capture``: look at a model and its stages before probing."""

from __future__ import annotations

import argparse

from seglens.cli import add_run_options, command, resolve_config


# --- info -------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="tiny name, hub id or local folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("info", "show a model's stages, widths, grid and geometry")(_info_args)
def _info(args: argparse.Namespace) -> int:
    import json

    from seglens.models import load_model

    info = load_model(args.model).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "stages":
            print(f"{key:<20} {value}")
    print(f"{'stages':<20} {len(info['stages'])}")
    for stage, width in info["stages"].items():
        print(f"  {stage:<18} D={width}")
    return 0


# --- capture ----------------------------------------------------------------------------------
def _capture_args(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    p.add_argument("--stages", nargs="+", help="stages to summarise (default: all)")


@command("capture", "capture every stage on a dataset and write per-stage statistics")(
    _capture_args
)
def _capture(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seglens.experiments.capture import STATS_FILE, run_capture
    from seglens.experiments.stats import format_stats

    config = resolve_config(args)
    print(format_stats(run_capture(config, stages=args.stages)))
    print(f"wrote {Path(config.out) / STATS_FILE}")
    return 0
