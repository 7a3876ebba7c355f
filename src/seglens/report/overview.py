"""The report's first figure: the run at a glance, one panel per analysis that draws one
(``Analysis.overview``), in registry order. seglens's own give the three panels of the paper's
Figure 1: the layerwise probe curve with the drop and the recovery (probing), the knockout gap
(knockout), per-position accuracy under causal and bidirectional attention (bidirectional).
Drawn only from ``results.json`` and the arrays it names; a panel whose analysis is absent says so
instead of vanishing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from seglens.report.canvas import new_figure

__all__ = ["overview_caption", "overview_figure"]

PANEL_WIDTH = 3.7  # inches per unit of ``Panel.width``


def _panels() -> list[Any]:
    from seglens.analyses import analyses

    return [a.overview for a in analyses().values() if a.overview is not None]


def _label(i: int) -> str:
    return f"({chr(ord('a') + i)})"


def overview_caption() -> str:
    """The figure's caption: one sentence per panel, lettered as the panels are."""
    parts = [f"{_label(i)} {panel.caption}" for i, panel in enumerate(_panels())]
    return " ".join(["The run at a glance.", *parts, "The findings below test each of these."])


def overview_figure(results: dict[str, Any], run_dir: str | Path | None = None) -> Any:
    """One panel per analysis that has one, each drawn from the run or saying it is absent.

    Args:
        results: a run's ``results.json``.
        run_dir: the run directory (for the arrays some panels read); None: those say absent.

    Returns:
        A ``Figure``, or None when the run has no probing results (nothing to overview).
    """
    panels = _panels()
    if not results.get("probing") or not panels:
        return None
    widths = [panel.width for panel in panels]
    fig = new_figure(PANEL_WIDTH * sum(widths), 3.7)
    axes = fig.subplots(1, len(panels), width_ratios=widths, squeeze=False)[0]
    for i, (ax, panel) in enumerate(zip(axes, panels, strict=True)):
        absent = panel.draw(ax, results, run_dir, _label(i))
        if absent is not None:
            _absent(ax, f"{_label(i)} {panel.title}", absent)
    model = (results.get("model") or {}).get("name", "model")
    dataset = (results.get("dataset") or {}).get("name", "dataset")
    fig.suptitle(f"{model} on {dataset}: the run at a glance", fontsize=11)
    return fig


def _absent(ax: Any, title: str, text: str) -> None:
    ax.set_title(title, fontsize=9, loc="left")
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        fontsize=9,
        color="0.35",
        wrap=True,
        transform=ax.transAxes,
    )
    ax.set_xticks([])
    ax.set_yticks([])
