"""Figures and the HTML report of a run, drawn only from its ``results.json`` and saved arrays."""

from seglens.report.figures import compare_runs, draw_all
from seglens.report.html import write_report

__all__ = ["compare_runs", "draw_all", "write_report"]
