"""``seglens run`` (every analysis from one config, then the report) and ``seglens demo``."""

from __future__ import annotations

import argparse

from seglens.cli import FLAG, add_run_options, command, resolve_config


def _run_args(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    p.add_argument("--solver", dest="probe.solver", choices=["sgd", "lda"])
    p.add_argument(
        "--report",
        dest="draw_report",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="draw the figures, report.html and the tables at the end (--no-report: only "
        "results.json and the findings; draw them later with `seglens report --run RUN`)",
    )
    from dataclasses import fields

    from seglens.analyses import by_config_key

    for key, analysis in by_config_key().items():
        if "enabled" in {f.name for f in fields(analysis.config)}:
            p.add_argument(
                f"--{key.replace('_', '-')}",
                dest=f"{key}.enabled",
                **FLAG,
                help=f"run the {analysis.name} analysis (default: config)",
            )


@command("run", "run every enabled analysis (probing, knockout, ...), then write the report")(
    _run_args
)
def _run(args: argparse.Namespace) -> int:
    from seglens.experiments.pipeline import plan, run

    config = resolve_config(args)
    print(f"plan: {plan(config)}", flush=True)
    report = run(config, report=args.draw_report)
    print(f"report: {report}" if args.draw_report else f"results: {config.out}/results.json")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run directory (default runs/demo)")


@command("demo", "the whole analysis on the embedded tiny model and synthetic data")(_demo_args)
def _demo(args: argparse.Namespace) -> int:
    from seglens.experiments.pipeline import demo

    report = demo(args.out)
    print(f"report: {report.resolve()}")
    return 0
