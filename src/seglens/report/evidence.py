"""Evidence on the report: paired intervals on differences, drawn as error bars and said in words.

Every difference a run reports (``probing.<condition>.differences``, ``knockout.differences``,
``bidirectional.differences``) is an interval ``{estimate, low, high, n_images}``; the analyses'
figures draw them with ``bars`` and word each one with ``interval_text`` ("significant at 95%"
or not), so every analysis says it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from seglens.report.canvas import interval_bars
from seglens.stages import llm_layer
from seglens.stages import order as order_stages

__all__ = ["bars", "interval_text", "llm_stages", "significance"]


def significance(interval: dict[str, Any] | None) -> str:
    """'significant at 95%' / 'not significant at 95%' / 'no interval (bootstrap off)'."""
    if not interval or interval.get("estimate") is None:
        return "undefined"
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return "no interval (bootstrap off)"
    return "significant at 95%" if low > 0 or high < 0 else "not significant at 95%"


def interval_text(label: str, interval: dict[str, Any] | None) -> str:
    """'<label> +0.031 [0.012, 0.050] over 40 images, significant at 95%'."""
    if not interval or interval.get("estimate") is None:
        return f"{label}: undefined"
    text = f"{label} {interval['estimate']:+.3f}"
    if interval.get("low") is not None and interval.get("high") is not None:
        text += f" [{interval['low']:+.3f}, {interval['high']:+.3f}]"
    return f"{text} over {interval.get('n_images')} images, {significance(interval)}"


def llm_stages(stages: Sequence[str]) -> list[str]:
    """The LLM stages among ``stages``, in depth order."""
    return [s for s in order_stages(stages) if llm_layer(s) is not None]


# --- probing ----------------------------------------------------------------------------------
def bars(ax: Any, x: np.ndarray, cells: Sequence[dict], colour: Any, label: str) -> None:
    """Intervals ``cells`` ({estimate, low, high}) at ``x`` as points with interval bars."""
    cells = [c or {} for c in cells]
    est, low, high = ([c.get(k) for c in cells] for k in ("estimate", "low", "high"))
    interval_bars(ax, x, est, low, high, colour, label or None)


# --- knockout ---------------------------------------------------------------------------------
# --- attention to anchors -----------------------------------------------------------------------
