"""The probing analysis's tidy tables: mIoU per condition, stage and level; per-class IoU; the
paired differences between stages; accuracy per image-token position."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from seglens.analyses.registry import Table
from seglens.rundir.schema import position_key
from seglens.tables import DIFFERENCE_COLUMNS, Row, interval_columns

__all__ = ["TABLES"]

MIOU_COLUMNS = (
    "condition", "stage", "level", "miou", "miou_low", "miou_high", "pixel_accuracy",
    "pixel_accuracy_low", "pixel_accuracy_high", "mean_class_accuracy", "count",
)  # fmt: skip


def _miou_rows(results: Mapping[str, Any], run_dir: Path) -> Iterator[Row]:
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


def _per_class_rows(results: Mapping[str, Any], run_dir: Path) -> Iterator[Row]:
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


def _difference_rows(results: Mapping[str, Any], run_dir: Path) -> Iterator[Row]:
    for condition, block in (results.get("probing") or {}).items():
        diff = block.get("differences") or {}
        base = {"analysis": "probing", "condition": condition, "level": diff.get("level")}
        if diff.get("adapter_minus_encoder"):
            cell = diff["adapter_minus_encoder"]
            yield (
                base
                | {"contrast": "adapter_minus_encoder", "stage": "adapter"}
                | (interval_columns(cell))
            )
        for stage, cell in (diff.get("llm_minus_adapter") or {}).items():
            yield base | {"contrast": "llm_minus_adapter", "stage": stage} | interval_columns(cell)
        if diff.get("best_llm_minus_adapter"):
            cell = diff["best_llm_minus_adapter"]
            contrast = {"contrast": "best_llm_minus_adapter", "stage": cell.get("stage")}
            yield base | contrast | interval_columns(cell)


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


TABLES = (
    Table("miou", MIOU_COLUMNS, _miou_rows),
    Table(
        "per_class_iou",
        ("condition", "stage", "level", "class_id", "class_name", "iou"),
        _per_class_rows,
    ),
    Table("differences", DIFFERENCE_COLUMNS, _difference_rows),
    Table(
        "positions", ("condition", "stage", "position", "row", "col", "accuracy"), _position_rows
    ),
)
