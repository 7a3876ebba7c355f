"""One module per group of subcommands, each a thin shell over a public function."""

from __future__ import annotations

from pathlib import Path


def draw(run_dir: str | Path) -> Path:
    """Figures and ``report.html`` of a run, drawn once after its analysis (rank 0 only)."""
    from seglens.distributed import is_main
    from seglens.report import write_report

    return write_report(run_dir, redraw=True) if is_main() else Path(run_dir) / "report.html"
