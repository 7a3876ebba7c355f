"""Tidy CSV tables of a run, and ``open_run`` to read them as pandas DataFrames.

``write_tables`` turns ``RUN/results.json`` and the arrays it names into one long-format CSV per
kind of number under ``RUN/tables/`` (one row per observation, one column per variable, the
layout pandas, seaborn and R expect), so a notebook can plot or compare runs without knowing the
results schema. ``write_report`` calls it, so every run with a report has its tables.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from seglens.rundir import RESULTS, load_results
from seglens.rundir.files import atomic_write
from seglens.rundir.schema import position_key

__all__ = ["TABLES", "TABLE_DIR", "RunTables", "open_run", "table_rows", "write_tables"]

TABLE_DIR = "tables"
Row = dict[str, Any]

# name -> columns, in order. Every table is long format; a missing value is an empty field.
TABLES: dict[str, tuple[str, ...]] = {
    "miou": (
        "condition", "stage", "level", "miou", "miou_low", "miou_high", "pixel_accuracy",
        "pixel_accuracy_low", "pixel_accuracy_high", "mean_class_accuracy", "count",
    ),
    "per_class_iou": ("condition", "stage", "level", "class_id", "class_name", "iou"),
    "differences": (
        "analysis", "condition", "level", "contrast", "stage", "estimate", "low", "high",
        "n_images", "significant",
    ),
    "knockout": (
        "pair", "class_a", "class_b", "condition", "pool", "matches", "stage", "accuracy", "iou",
        "recovery",
    ),
    "knockout_differences": (
        "group", "stage", "contrast", "estimate", "low", "high", "n_images", "significant",
    ),
    "positions": ("condition", "stage", "position", "row", "col", "accuracy"),
}  # fmt: skip
"""Every table ``write_tables`` writes (``RUN/tables/<name>.csv``) and its columns."""


def _significant(cell: Mapping[str, Any]) -> bool | None:
    low, high = cell.get("low"), cell.get("high")
    if low is None or high is None:
        return None
    return bool(low > 0 or high < 0)


def _interval(cell: Mapping[str, Any] | None) -> Row:
    cell = cell or {}
    row = {k: cell.get(k) for k in ("estimate", "low", "high", "n_images")}
    return row | {"significant": _significant(cell)}


def _miou_rows(results: Mapping[str, Any]) -> Iterator[Row]:
    for condition, block in (results.get("probing") or {}).items():
        for stage, metrics in (block.get("metrics") or {}).items():
            for level in ("patch", "pixel"):
                m = metrics.get(level)
                if not m:
                    continue
                ci = m.get("ci") or {}
                miou_ci = ci.get("miou") or [None, None]
                acc_ci = ci.get("pixel_accuracy") or [None, None]
                yield {
                    "condition": condition,
                    "stage": stage,
                    "level": level,
                    "miou": m.get("miou"),
                    "miou_low": miou_ci[0],
                    "miou_high": miou_ci[1],
                    "pixel_accuracy": m.get("pixel_accuracy"),
                    "pixel_accuracy_low": acc_ci[0],
                    "pixel_accuracy_high": acc_ci[1],
                    "mean_class_accuracy": m.get("mean_class_accuracy"),
                    "count": m.get("tokens" if level == "patch" else "pixels"),
                }


def _per_class_rows(results: Mapping[str, Any]) -> Iterator[Row]:
    names = (results.get("dataset") or {}).get("class_names") or []
    for condition, block in (results.get("probing") or {}).items():
        for stage, metrics in (block.get("metrics") or {}).items():
            for level in ("patch", "pixel"):
                for c, iou in enumerate((metrics.get(level) or {}).get("per_class_iou") or []):
                    name = names[c] if c < len(names) else f"class {c}"
                    yield {
                        "condition": condition,
                        "stage": stage,
                        "level": level,
                        "class_id": c,
                        "class_name": name,
                        "iou": iou,
                    }


def _difference_rows(results: Mapping[str, Any]) -> Iterator[Row]:
    for condition, block in (results.get("probing") or {}).items():
        diff = block.get("differences") or {}
        base = {"analysis": "probing", "condition": condition, "level": diff.get("level")}
        if diff.get("adapter_minus_encoder"):
            cell = diff["adapter_minus_encoder"]
            yield base | {"contrast": "adapter_minus_encoder", "stage": "adapter"} | _interval(cell)
        for stage, cell in (diff.get("llm_minus_adapter") or {}).items():
            yield base | {"contrast": "llm_minus_adapter", "stage": stage} | _interval(cell)
        if diff.get("best_llm_minus_adapter"):
            cell = diff["best_llm_minus_adapter"]
            yield (
                base
                | {"contrast": "best_llm_minus_adapter", "stage": cell.get("stage")}
                | (_interval(cell))
            )
    diff = (results.get("bidirectional") or {}).get("differences") or {}
    base = {"analysis": "bidirectional", "condition": "bidirectional_image"}
    base["level"] = diff.get("level")
    for stage, cell in (diff.get("bidirectional_minus_causal") or {}).items():
        yield base | {"contrast": "bidirectional_minus_causal", "stage": stage} | _interval(cell)
    if diff.get("early_minus_late_gain"):
        cell = diff["early_minus_late_gain"]
        yield (
            base
            | {"contrast": "early_minus_late_gain", "stage": cell.get("stage")}
            | (_interval(cell))
        )


def _knockout_rows(results: Mapping[str, Any]) -> Iterator[Row]:
    knockout = results.get("knockout") or {}
    controls = knockout.get("controls") or {}
    names = (results.get("dataset") or {}).get("class_names") or []

    def rows(pair: str, a: Any, b: Any, curves: Mapping[str, Any]) -> Iterator[Row]:
        for condition in knockout.get("conditions") or []:
            control = controls.get(condition) or {}
            for stage, m in (curves.get(condition) or {}).items():
                m = m or {}
                yield {
                    "pair": pair,
                    "class_a": a,
                    "class_b": b,
                    "condition": condition,
                    "pool": control.get("pool"),
                    "matches": control.get("matches"),
                    "stage": stage,
                    **{k: m.get(k) for k in ("accuracy", "iou", "recovery")},
                }

    yield from rows("mean", None, None, knockout.get("curves") or {})
    for pair in knockout.get("per_pair") or []:
        a, b = pair.get("classes") or (None, None)
        label = "/".join(names[c] if c < len(names) else f"class {c}" for c in (a, b))
        yield from rows(label, a, b, pair)


def _knockout_difference_rows(results: Mapping[str, Any]) -> Iterator[Row]:
    diff = (results.get("knockout") or {}).get("differences") or {}
    groups = {"minus_none": diff.get("minus_none") or {}}
    groups |= {f"pool:{pool}": v for pool, v in (diff.get("pools") or {}).items()}
    for group, per_stage in groups.items():
        for stage, cells in per_stage.items():
            for contrast, cell in (cells or {}).items():
                row = {"group": group, "stage": stage, "contrast": contrast} | _interval(cell)
                yield row


def _position_rows(results: Mapping[str, Any], run_dir: Path) -> Iterator[Row]:
    from seglens.report.canvas import run_arrays

    grid = (results.get("model") or {}).get("grid") or []
    cols = int(grid[1]) if len(grid) == 2 else None
    for condition, block in (results.get("probing") or {}).items():
        if not block.get("arrays"):
            continue
        arrays = run_arrays(run_dir, block["arrays"])
        for stage in block.get("stages") or block.get("metrics") or []:
            values = arrays.get(position_key(stage))
            if values is None:
                continue
            for p, accuracy in enumerate(values.tolist()):
                square = cols is not None and len(values) == cols * int(grid[0])
                row, col = divmod(p, cols) if square else (None, None)
                yield {
                    "condition": condition,
                    "stage": stage,
                    "position": p,
                    "row": row,
                    "col": col,
                    "accuracy": accuracy,
                }


def table_rows(run_dir: str | Path, results: Mapping[str, Any] | None = None) -> dict:
    """Every table of a run as rows, without writing anything.

    Args:
        run_dir: the run directory (its arrays are read for the per-position table).
        results: the run's results (default: read ``RUN/results.json``).

    Returns:
        ``{name: [row dict, ...]}`` for every name in ``TABLES``; a section the run lacks gives
        an empty table.
    """
    run_dir = Path(run_dir)
    if results is None:
        results = load_results(run_dir / RESULTS)
    return {
        "miou": list(_miou_rows(results)),
        "per_class_iou": list(_per_class_rows(results)),
        "differences": list(_difference_rows(results)),
        "knockout": list(_knockout_rows(results)),
        "knockout_differences": list(_knockout_difference_rows(results)),
        "positions": list(_position_rows(results, run_dir)),
    }


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    return value


def write_tables(run_dir: str | Path, results: Mapping[str, Any] | None = None) -> list[Path]:
    """Write every table of ``TABLES`` to ``RUN/tables/<name>.csv`` (atomically; header only
    when the run lacks that section) and return the paths.

    Args:
        run_dir: the run directory.
        results: the run's results (default: read ``RUN/results.json``).
    """
    run_dir = Path(run_dir)
    paths = []
    for name, rows in table_rows(run_dir, results).items():
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=TABLES[name], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        path = run_dir / TABLE_DIR / f"{name}.csv"
        with atomic_write(path, "w") as handle:
            handle.write(text.getvalue())
        paths.append(path)
    return paths


class RunTables(dict):
    """``{table name: DataFrame}`` of one run, also readable as attributes (``run.miou``).

    Attributes:
        path: the run directory.
        results: its ``results.json`` as a dict.
    """

    def __init__(self, path: Path, results: dict[str, Any], frames: dict[str, Any]):
        super().__init__(frames)
        self.path, self.results = path, results

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no table {name!r}; the tables are {sorted(self)}") from None


def open_run(path: str | Path, label: str | None = None) -> RunTables:
    """A run's tables as pandas DataFrames, each with a leading ``run`` column.

    Reads ``RUN/tables/*.csv``; a run without them (written before tables existed) gets them
    computed from its results.json and arrays, without writing into the run. Concatenate several
    runs' frames with ``pandas.concat`` to compare them.

    Args:
        path: a run directory (holds ``results.json``).
        label: the ``run`` column's value (default: the directory's name).

    Returns:
        ``RunTables``: ``{name: DataFrame}`` for every name in ``TABLES``, plus ``.results``.
    """
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(
            "seglens.open_run needs pandas: pip install 'seglens[tables]' (or pip install pandas)"
        ) from e
    path = Path(path)
    if not (path / RESULTS).is_file():
        raise FileNotFoundError(
            f"{path} is not a run directory (no {RESULTS}); give the --out folder of a run"
        )
    results = load_results(path / RESULTS)
    label = path.resolve().name if label is None else label
    frames = {}
    computed = None
    for name, columns in TABLES.items():
        csv_path = path / TABLE_DIR / f"{name}.csv"
        if csv_path.is_file():
            frame = pd.read_csv(csv_path, float_precision="round_trip")  # exact floats
        else:
            computed = computed if computed is not None else table_rows(path, results)
            frame = pd.DataFrame(computed[name], columns=list(columns))
        frame.insert(0, "run", label)
        frames[name] = frame
    return RunTables(path, results, frames)
