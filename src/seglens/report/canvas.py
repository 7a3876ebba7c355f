"""Drawing primitives shared by the figure modules: figures, saving, intervals, stage order and
colours.

Figures are ``matplotlib.figure.Figure`` objects on an Agg canvas (no pyplot, no global state),
saved through ``atomic_write``. Stage order, class colours and the drawing of intervals
(``interval_bars``, ``interval_band``: any interval, from its low to its high end) are defined
once here so every figure and the HTML report agree on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seglens.rundir.files import atomic_write, load_arrays
from seglens.stages import llm_layer, relative_depth  # noqa: F401  (the figures' names)
from seglens.stages import order as order_stages  # noqa: F401
from seglens.stages import sort_key as stage_key  # noqa: F401

IGNORE = 255
GREY = (0.72, 0.72, 0.72)
DPI = 110


def new_figure(width: float, height: float) -> Any:
    """A constrained-layout ``Figure`` with its own Agg canvas (never registered with pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: str | Path, dpi: int = DPI) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and return the path."""
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)
    return path


def run_arrays(run_dir: str | Path, relative: str) -> dict[str, np.ndarray]:
    """Load ``RUN/<relative>`` (an ``.npz`` named in results.json), naming it when missing."""
    path = Path(run_dir) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is named in results.json but does not exist; rerun the experiment that "
            "writes it or remove its section from results.json"
        )
    return load_arrays(path)


# --- stages -----------------------------------------------------------------------------------
def label_stage_axis(ax: Any, stages: Sequence[str], fontsize: float = 7.0) -> None:
    """Categorical x ticks at 0..len-1 named by stage, rotated when there are many."""
    ax.set_xticks(range(len(stages)))
    rotation = 90 if len(stages) > 8 else 0
    ax.set_xticklabels(stages, rotation=rotation, fontsize=fontsize)
    ax.set_xlim(-0.5, len(stages) - 0.5)


# --- colours ----------------------------------------------------------------------------------
def palette_array(dataset: dict[str, Any], num_classes: int | None = None) -> np.ndarray:
    """(C, 3) float RGB in [0, 1] from the dataset palette; a fixed colour cycle if absent."""
    count = num_classes or dataset.get("num_classes") or len(dataset.get("class_names") or [])
    palette = dataset.get("palette")
    if palette:
        colours = np.asarray(palette, dtype=np.float64).reshape(-1, 3) / 255.0
        if len(colours) >= count:
            return colours
    from matplotlib import colormaps

    cycle = colormaps["tab20"](np.arange(max(count, 1)) % 20)[:, :3]
    if palette:  # a short palette keeps its colours and is padded with the cycle
        cycle[: len(colours)] = colours
    return cycle


def colourise(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class map -> (H, W, 3) float image; ignore (255) and unknown ids are black."""
    labels = np.asarray(labels)
    image = np.zeros((*labels.shape, 3), dtype=np.float64)
    valid = (labels >= 0) & (labels < len(palette))
    image[valid] = palette[labels[valid]]
    return image


def class_name(dataset: dict[str, Any], class_id: int) -> str:
    """The dataset's name for ``class_id`` ("class 7" when the names are not recorded)."""
    names = dataset.get("class_names") or []
    return str(names[class_id]) if 0 <= class_id < len(names) else f"class {class_id}"


def class_legend(
    fig: Any, dataset: dict[str, Any], palette: np.ndarray, ids: Iterable[int]
) -> None:
    """A figure-level legend with one coloured patch per class id."""
    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=palette[i], edgecolor="0.3", label=class_name(dataset, i))
        for i in ids
        if 0 <= i < len(palette)
    ]
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(len(handles), 6),
            fontsize=7,
            frameon=False,
        )


def series_colour(index: int) -> tuple[float, float, float]:
    """Colour of the ``index``-th condition or run in line plots."""
    from matplotlib import colormaps

    return tuple(colormaps["tab10"](index % 10)[:3])


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of a 1D series, ignoring NaNs; same length as ``values``."""
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(int(window), len(values)))
    finite = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    counts = np.convolve(finite.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# --- intervals --------------------------------------------------------------------------------
def interval_arrays(
    estimate: Sequence[Any], low: Sequence[Any], high: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three float arrays (None -> nan), the ends ordered so that low <= high where both exist.

    An interval is drawn from its low to its high end whatever the estimate: one that excludes
    its estimate, is empty (low == high) or has one end missing is still drawn (or skipped).
    """

    def floats(values: Sequence[Any]) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)

    est, lo, hi = floats(estimate), floats(low), floats(high)
    return est, np.minimum(lo, hi), np.maximum(lo, hi)  # nan if either end is missing


def interval_bars(
    ax: Any,
    x: Sequence[float],
    estimate: Sequence[Any],
    low: Sequence[Any],
    high: Sequence[Any],
    colour: Any,
    label: str | None = None,
    marker: str = "o",
) -> None:
    """Estimates as markers and each interval as a vertical bar with caps from low to high.

    Never raises on the values: None/nan estimates draw no marker, an interval with a missing end
    draws no bar, and a bar need not contain its estimate (unlike ``ax.errorbar``'s offsets).
    """
    x = np.asarray(x, dtype=np.float64)
    est, lo, hi = interval_arrays(estimate, low, high)
    both = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(x)
    if both.any():
        ax.vlines(x[both], lo[both], hi[both], color=colour, linewidth=1.2)
        width = 0.12 * (np.ptp(x) / max(len(x) - 1, 1) if len(x) > 1 else 1.0)
        for end in (lo, hi):
            ax.hlines(end[both], x[both] - width, x[both] + width, color=colour, linewidth=1.0)
    shown = np.isfinite(est) & np.isfinite(x)
    ax.plot(x[shown], est[shown], marker, ms=3, linestyle="none", color=colour, label=label)


def interval_band(
    ax: Any, x: Sequence[float], low: Sequence[Any], high: Sequence[Any], colour: Any
) -> None:
    """A shaded band from low to high along x; gaps where an end is missing; never raises."""
    x = np.asarray(x, dtype=np.float64)
    _, lo, hi = interval_arrays([None] * len(x), low, high)
    both = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(x)
    if both.any():
        ax.fill_between(
            x,
            np.where(both, lo, 0),
            np.where(both, hi, 0),
            where=both,
            color=colour,
            alpha=0.18,
            linewidth=0,
        )


def as_float(value: Any) -> float:
    """``value`` as a float, NaN for None (a missing number plots as a gap)."""
    return np.nan if value is None else float(value)
