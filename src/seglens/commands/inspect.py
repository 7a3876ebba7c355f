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

    from seglens.experiments.common import build_dataset, build_model
    from seglens.experiments.stats import capture_stats, format_stats
    from seglens.results import provenance, write_json

    config = resolve_config(args)
    vlm = build_model(config.model)
    dataset = build_dataset(
        config.data, config.data.train_split, config.data.limit_train, config.seed
    )
    stats = capture_stats(
        vlm,
        dataset,
        args.stages,
        batch_size=config.data.batch_size,
        num_workers=config.data.num_workers,
    )
    out = Path(config.out) / "stage_stats.json"
    write_json(out, {**provenance(config.seed), "model": vlm.info(), "stages": stats})
    print(format_stats(stats))
    print(f"wrote {out}")
    return 0
