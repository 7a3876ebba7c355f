"""The knockout's tidy tables: pair-token accuracy per pair, condition and LLM layer, and the
paired differences between conditions."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from seglens.analyses.registry import Table
from seglens.tables import Row, interval_columns

__all__ = ["TABLES"]

KNOCKOUT_COLUMNS = (
    "pair", "class_a", "class_b", "condition", "pool", "matches", "stage", "accuracy", "iou",
    "recovery",
)  # fmt: skip


def _knockout_rows(results: Mapping[str, Any], run_dir: Path) -> Iterator[Row]:
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


def _difference_rows(results: Mapping[str, Any], run_dir: Path) -> Iterator[Row]:
    diff = (results.get("knockout") or {}).get("differences") or {}
    groups = {"minus_none": diff.get("minus_none") or {}}
    groups |= {f"pool:{pool}": v for pool, v in (diff.get("pools") or {}).items()}
    for group, per_stage in groups.items():
        for stage, cells in per_stage.items():
            for contrast, cell in (cells or {}).items():
                yield {"group": group, "stage": stage, "contrast": contrast} | (
                    interval_columns(cell)
                )


TABLES = (
    Table("knockout", KNOCKOUT_COLUMNS, _knockout_rows),
    Table(
        "knockout_differences",
        ("group", "stage", "contrast", "estimate", "low", "high", "n_images", "significant"),
        _difference_rows,
    ),
)
