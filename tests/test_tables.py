"""Tidy CSV tables of a run and ``open_run``: every number equals results.json or the arrays
(read independently), and ``compare`` draws three runs with their best layers and gains."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from fixtures_results import make_run
from seglens.report.figures import compare_figure, compare_runs
from seglens.results import read_json
from seglens.tables import open_run, table_columns, write_tables

TABLES = table_columns()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A complete synthetic run (two probing conditions, knockout, bidirectional) with tables."""
    path = make_run(
        tmp_path_factory.mktemp("tables"), conditions=("causal", "bidirectional_image"), umap=False
    )
    write_tables(path)
    return path


def _read(run, name):
    with open(run / "tables" / f"{name}.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows


def _num(text):
    return None if text == "" else float(text)


def test_every_table_is_written_with_its_columns(run):
    for name, columns in TABLES.items():
        with open(run / "tables" / f"{name}.csv", newline="") as handle:
            assert next(csv.reader(handle)) == list(columns), name
        assert _read(run, name), f"{name} is empty on a complete run"
    assert not list((run / "tables").glob(".*.tmp")), "atomic_write left a temporary file"


def test_miou_and_per_class_tables_equal_results_json(run):
    results = read_json(run / "results.json")
    rows = {(r["condition"], r["stage"], r["level"]): r for r in _read(run, "miou")}
    per_class = {
        (r["condition"], r["stage"], r["level"], int(r["class_id"])): r
        for r in _read(run, "per_class_iou")
    }
    seen = 0
    for condition, block in results["probing"].items():
        for stage, metrics in block["metrics"].items():
            for level in ("patch", "pixel"):
                m, row = metrics[level], rows[condition, stage, level]
                assert _num(row["miou"]) == m["miou"]  # exact: floats are written by repr
                assert [_num(row["miou_low"]), _num(row["miou_high"])] == m["ci"]["miou"]
                acc = [_num(row["pixel_accuracy_low"]), _num(row["pixel_accuracy_high"])]
                assert acc == m["ci"]["pixel_accuracy"]
                assert _num(row["mean_class_accuracy"]) == m["mean_class_accuracy"]
                for c, iou in enumerate(m["per_class_iou"]):
                    cell = per_class[condition, stage, level, c]
                    assert _num(cell["iou"]) == iou
                    assert cell["class_name"] == results["dataset"]["class_names"][c]
                seen += 1
    assert seen == len(rows) and len(per_class) == seen * results["dataset"]["num_classes"]


def test_difference_tables_equal_results_json(run):
    results = read_json(run / "results.json")
    rows = {
        (r["analysis"], r["condition"], r["contrast"], r["stage"]): r
        for r in _read(run, "differences")
    }
    for condition, block in results["probing"].items():
        for stage, cell in block["differences"]["llm_minus_adapter"].items():
            row = rows["probing", condition, "llm_minus_adapter", stage]
            assert [_num(row[k]) for k in ("estimate", "low", "high")] == [
                cell[k] for k in ("estimate", "low", "high")
            ]
            assert row["significant"] == str(cell["low"] > 0 or cell["high"] < 0)
    for stage, cell in results["bidirectional"]["differences"][
        "bidirectional_minus_causal"
    ].items():
        row = rows["bidirectional", "bidirectional_image", "bidirectional_minus_causal", stage]
        assert _num(row["estimate"]) == cell["estimate"]
    knock = {(r["group"], r["stage"], r["contrast"]): r for r in _read(run, "knockout_differences")}
    diff = results["knockout"]["differences"]
    expected = 0
    for pool, per_stage in diff["pools"].items():
        for stage, cells in per_stage.items():
            for contrast, cell in cells.items():
                row = knock[f"pool:{pool}", stage, contrast]
                assert (_num(row["low"]), _num(row["high"])) == (cell["low"], cell["high"])
                expected += 1
    expected += sum(len(cells) for cells in diff["minus_none"].values())
    assert len(knock) == expected


def test_knockout_table_has_every_pair_condition_and_stage(run):
    results = read_json(run / "results.json")
    knockout = results["knockout"]
    rows = {(r["pair"], r["condition"], r["stage"]): r for r in _read(run, "knockout")}
    names = results["dataset"]["class_names"]
    for condition, per_stage in knockout["curves"].items():
        for stage, m in per_stage.items():
            assert _num(rows["mean", condition, stage]["accuracy"]) == m["accuracy"]
    for pair in knockout["per_pair"]:
        a, b = pair["classes"]
        for condition in knockout["conditions"]:
            for stage, m in pair[condition].items():
                row = rows[f"{names[a]}/{names[b]}", condition, stage]
                assert (int(row["class_a"]), int(row["class_b"])) == (a, b)
                assert [_num(row[k]) for k in ("accuracy", "iou", "recovery")] == [
                    m["accuracy"],
                    m["iou"],
                    m["recovery"],
                ]
    stages = len(knockout["curves"]["none"])
    assert len(rows) == (1 + len(knockout["per_pair"])) * len(knockout["conditions"]) * stages


def test_position_table_equals_the_arrays(run):
    results = read_json(run / "results.json")
    g = results["model"]["grid"][1]
    rows = _read(run, "positions")
    for condition, block in results["probing"].items():
        with np.load(run / block["arrays"]) as arrays:
            for stage in block["stages"]:
                got = [r for r in rows if r["condition"] == condition and r["stage"] == stage]
                expected = arrays[f"position_accuracy__{stage}"]
                assert [float(r["accuracy"]) for r in got] == expected.tolist()
                assert [(int(r["row"]), int(r["col"])) for r in got] == [
                    divmod(p, g) for p in range(len(expected))
                ]


def test_open_run_reads_the_tables_and_computes_missing_ones(run, tmp_path):
    pd = pytest.importorskip("pandas")
    tables = open_run(run)
    assert set(tables) == set(TABLES)
    assert tables.results == read_json(run / "results.json") and tables.path == run
    for name, frame in tables.items():
        assert list(frame.columns) == ["run", *TABLES[name]]
        assert len(frame) == len(_read(run, name))
        assert (frame["run"] == run.name).all()
    assert tables.miou is tables["miou"]
    with pytest.raises(AttributeError, match="no table 'mIoU'; the tables are"):
        _ = tables.mIoU
    # An older run without tables/: the same numbers, computed in memory, nothing written.
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("tables"))
    again = open_run(old, label="run")
    assert not (old / "tables").exists()
    for name in TABLES:
        numeric = [c for c in tables[name].columns if pd.api.types.is_float_dtype(tables[name][c])]
        np.testing.assert_array_equal(
            again[name][numeric].to_numpy(dtype=float), tables[name][numeric].to_numpy(), name
        )
    combined = pd.concat([open_run(run, label=lab).miou for lab in ("a", "b", "c")])
    assert combined.groupby("run").size().to_dict() == {k: len(tables.miou) for k in "abc"}


def test_open_run_names_a_folder_that_is_not_a_run(tmp_path):
    pytest.importorskip("pandas")
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        open_run(tmp_path)


def test_compare_three_runs_marks_best_layers_and_total_gains(tmp_path):
    runs = [
        make_run(tmp_path, name=f"run{i}", layers=layers, seed=i, knockout=False, umap=False)
        for i, layers in enumerate((2, 4, 6))
    ]
    fig = compare_figure(runs, labels=["a", "b", "c"])
    for level, ax in zip(("patch", "pixel"), fig.axes, strict=True):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
        gains = [t.get_text() for t in ax.texts]
        expected = []
        for path in runs:
            m = read_json(path / "results.json")["probing"]["causal"]["metrics"]
            last = max((s for s in m if s.startswith("llm.")), key=lambda s: int(s[4:]))
            expected.append(f"{m[last][level]['miou'] - m['adapter'][level]['miou']:+.2f}")
        assert gains == expected
        stars = [line for line in ax.lines if line.get_marker() == "*"]
        assert len(stars) == 3
    out = compare_runs(runs, tmp_path / "compare.png")
    assert out.is_file() and out.stat().st_size > 0
