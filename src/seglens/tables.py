"""Tidy CSV tables of a run, and ``open_run`` to read them as pandas DataFrames.

``write_tables`` turns ``RUN/results.json`` and the arrays it names into one long-format CSV per
kind of number under ``RUN/tables/`` (one row per observation, one column per variable, the
layout pandas, seaborn and R expect), so a notebook can plot or compare runs without knowing the
results schema. ``write_report`` calls it, so every run with a report has its tables. Each table
and its rows come from the analyses that declare it (``Analysis.tables``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seglens.rundir import RESULTS, load_results
from seglens.rundir.files import atomic_write

__all__ = ["DIFFERENCE_COLUMNS", "TABLE_DIR", "RunTables", "interval_columns", "open_run"]
__all__ += ["table_columns", "table_rows", "write_tables"]

TABLE_DIR = "tables"
Row = dict[str, Any]

#: The columns of the ``differences`` table, to which several analyses add their contrasts.
DIFFERENCE_COLUMNS = (
    "analysis", "condition", "level", "contrast", "stage", "estimate", "low", "high", "n_images",
    "significant",
)  # fmt: skip


def table_columns() -> dict[str, tuple[str, ...]]:
    """Every table ``write_tables`` writes (``RUN/tables/<name>.csv``) and its columns, from the
    registered analyses, in their order. Every table is long format; a missing value is an empty
    field."""
    from seglens.analyses import analyses

    columns: dict[str, tuple[str, ...]] = {}
    for analysis in analyses().values():
        for table in analysis.tables:
            columns.setdefault(table.name, table.columns)
    return columns


def interval_columns(cell: Mapping[str, Any] | None) -> Row:
    """The columns ``estimate, low, high, n_images, significant`` of one interval cell of
    ``results.json`` (``significant``: the interval excludes 0; empty when it has no bounds)."""
    cell = cell or {}
    row = {k: cell.get(k) for k in ("estimate", "low", "high", "n_images")}
    low, high = cell.get("low"), cell.get("high")
    significant = None if low is None or high is None else bool(low > 0 or high < 0)
    return row | {"significant": significant}


def table_rows(run_dir: str | Path, results: Mapping[str, Any] | None = None) -> dict:
    """Every table of a run as rows, without writing anything.

    Args:
        run_dir: the run directory (some tables read its arrays).
        results: the run's results (default: read ``RUN/results.json``).

    Returns:
        ``{name: [row dict, ...]}`` for every name of ``table_columns()``; a section the run
        lacks gives an empty table.
    """
    from seglens.analyses import analyses

    run_dir = Path(run_dir)
    if results is None:
        results = load_results(run_dir / RESULTS)
    rows: dict[str, list[Row]] = {name: [] for name in table_columns()}
    for analysis in analyses().values():
        for table in analysis.tables:
            rows[table.name].extend(table.rows(results, run_dir))
    return rows


def _cell(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same float
    return value


def write_tables(run_dir: str | Path, results: Mapping[str, Any] | None = None) -> list[Path]:
    """Write every table of ``table_columns()`` to ``RUN/tables/<name>.csv`` (atomically; header
    only when the run lacks that section) and return the paths.

    Args:
        run_dir: the run directory.
        results: the run's results (default: read ``RUN/results.json``).
    """
    run_dir = Path(run_dir)
    paths = []
    columns = table_columns()
    for name, rows in table_rows(run_dir, results).items():
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns[name], lineterminator="\n")
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
        ``RunTables``: ``{name: DataFrame}`` for every name of ``table_columns()``, plus
        ``.results``.
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
    for name, columns in table_columns().items():
        csv_path = path / TABLE_DIR / f"{name}.csv"
        if csv_path.is_file():
            frame = pd.read_csv(csv_path, float_precision="round_trip")  # exact floats
        else:
            computed = computed if computed is not None else table_rows(path, results)
            frame = pd.DataFrame(computed[name], columns=list(columns))
        frame.insert(0, "run", label)
        frames[name] = frame
    return RunTables(path, results, frames)
