"""``seglens report`` and ``seglens compare``: figures and the HTML page of finished runs."""

from __future__ import annotations

import argparse

from seglens.cli import command


# --- report -----------------------------------------------------------------------------------
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (holds results.json)")
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="first rebuild a damaged results.json from the run's record of every section "
        "written (RUN/sections/)",
    )


@command("report", "redraw a run's figures and write its self-contained report.html")(_report_args)
def _report(args: argparse.Namespace) -> int:
    from seglens.report import write_report
    from seglens.rundir.journal import restore

    if args.rebuild:
        print(f"rebuilt {restore(args.run)}")
    path = write_report(args.run, redraw=True)
    print(path)
    return 0


# --- compare ----------------------------------------------------------------------------------
def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories to overlay")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: model names)")


@command("compare", "overlay the layerwise probe curves of several runs in one PNG")(_compare_args)
def _compare(args: argparse.Namespace) -> int:
    from seglens.report import compare_runs

    path = compare_runs(args.runs, args.out, labels=args.labels)
    print(path)
    return 0
