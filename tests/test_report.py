"""Figures, the HTML report and the report CLI, on synthetic run directories (no model)."""

from __future__ import annotations

import base64
import html
import io
import re

import numpy as np
import pytest
from PIL import Image

from fixtures_results import make_run
from seglens.report import compare_runs, draw_all, write_report
from seglens.report.canvas import moving_average, order_stages, relative_depth
from seglens.report.figures import FIGURES, probing_summary
from seglens.report.html import SECTIONS
from seglens.results import read_json, write_json

PROBING_ONLY = {"overview", "layerwise_miou", "per_class_iou", "qualitative", "differences"}


def _assert_png(path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 0 and image.size[1] > 0


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One complete run (two probing conditions) with figures and report drawn once."""
    run = make_run(
        tmp_path_factory.mktemp("full"),
        conditions=("causal", "bidirectional_image"),
        order=True,
        heads=True,
    )
    figures = draw_all(run)
    report = write_report(run)
    return run, figures, report


# --- figures ----------------------------------------------------------------------------------
def test_draw_all_writes_every_figure(full_run):
    run, figures, _ = full_run
    assert set(figures) == set(FIGURES) - {"lens", "sinks"}  # no lens section: test_lens_plugin
    assert read_json(run / "results.json")["figures"] == figures
    for relative in figures.values():
        assert relative.startswith("figures/") and relative.endswith(".png")
        _assert_png(run / relative)
    assert not list((run / "figures").glob(".*.tmp")), "atomic_write left a temporary file"


def test_probing_only_run_skips_missing_sections(tmp_path):
    run = make_run(tmp_path, knockout=False, bidirectional=False, umap=False)
    figures = draw_all(run)
    assert set(figures) == PROBING_ONLY
    for relative in figures.values():
        _assert_png(run / relative)


def test_run_without_qualitative_or_pixel_level(tmp_path):
    run = make_run(tmp_path, knockout=False, bidirectional=False, umap=False, qualitative=False)
    results = read_json(run / "results.json")
    for metrics in results["probing"]["causal"]["metrics"].values():
        metrics["pixel"] = None
    write_json(run / "results.json", results)
    assert set(draw_all(run)) == {"overview", "layerwise_miou", "per_class_iou", "differences"}


def test_draw_all_keeps_the_rest_of_results(tmp_path):
    run = make_run(tmp_path, knockout=False, umap=False)
    before = read_json(run / "results.json")
    draw_all(run)
    after = read_json(run / "results.json")
    assert after["figures"] and not before["figures"]
    assert {k: v for k, v in after.items() if k != "figures"} == {
        k: v for k, v in before.items() if k != "figures"
    }


def test_missing_array_file_is_named(tmp_path):
    run = make_run(tmp_path, knockout=False, bidirectional=False)
    (run / "arrays/umap.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"umap\.npz is named in results\.json"):
        draw_all(run)


def test_compare_runs_with_different_depths(tmp_path):
    runs = [
        make_run(tmp_path, name=f"run{layers}", layers=layers, knockout=False, umap=False)
        for layers in (2, 4, 8)
    ]
    out = compare_runs(runs, tmp_path / "out" / "compare.png", labels=["clip", "dino", "siglip"])
    _assert_png(out)
    same = compare_runs(runs[1:2] * 2, tmp_path / "same.png")  # same depth: stage-name axis
    _assert_png(same)


def test_compare_runs_rejects_wrong_labels(tmp_path):
    run = make_run(tmp_path, knockout=False, bidirectional=False, umap=False)
    with pytest.raises(ValueError, match="got 1 labels for 2 runs"):
        compare_runs([run, run], tmp_path / "c.png", labels=["one"])


def test_stage_order_and_relative_depth():
    stages = ["llm.10", "adapter", "llm.2", "vision.1", "encoder", "llm.final_norm", "llm.1"]
    assert order_stages(stages) == [
        "vision.1",
        "encoder",
        "adapter",
        "llm.1",
        "llm.2",
        "llm.10",
        "llm.final_norm",
    ]
    assert relative_depth("llm.16", 32) == relative_depth("llm.20", 40) == 0.5
    assert (
        relative_depth("encoder", 32) < relative_depth("adapter", 32) < relative_depth("llm.1", 32)
    )


def test_moving_average_ignores_nan():
    values = np.array([1.0, np.nan, 3.0, 3.0])
    smooth = moving_average(values, 3)
    assert smooth.shape == values.shape
    np.testing.assert_allclose(smooth, [1.0, 2.0, 3.0, 3.0])


def test_probing_summary_landmarks(tmp_path):
    run = make_run(tmp_path, knockout=False, bidirectional=False, umap=False)
    block = read_json(run / "results.json")["probing"]["causal"]
    summary = probing_summary(block, "patch")
    values = {s: m["patch"]["miou"] for s, m in block["metrics"].items()}
    assert summary["adapter_change"] == pytest.approx(values["adapter"] - values["encoder"])
    assert summary["best_stage"] == block["summary"]["best_stage"] == max(values, key=values.get)
    llm = {s: v for s, v in values.items() if s.startswith("llm.")}
    assert summary["llm_gain"] == pytest.approx(max(llm.values()) - values["adapter"])
    # One sign: the stored summary, the figure's numbers and the reading agree.
    assert block["summary"]["adapter_change"] == pytest.approx(summary["adapter_change"])
    assert summary["adapter_change"] < 0  # the fixture's adapter drop


# --- HTML -------------------------------------------------------------------------------------
def _page(report) -> str:
    return report.read_text(encoding="utf-8")


def test_report_has_every_section_and_figure(full_run):
    _, figures, report = full_run
    page = _page(report)
    for heading in SECTIONS.values():
        assert f"<h2>{html.escape(heading)}</h2>" in page
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == len(figures)
    for data in uris:
        _assert_png(io.BytesIO(base64.b64decode(data)))
    assert "<details>" in page and "<script" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must not load anything"


def test_report_stage_table_has_one_row_per_stage_with_intervals(full_run):
    run, _, report = full_run
    page = _page(report)
    results = read_json(run / "results.json")
    for condition, block in results["probing"].items():
        start = page.index(f"Per-stage scores: {condition}")
        table = page[start : page.index("</table>", start)]
        rows = re.findall(r"<tr(?: class=\"best\")?><td>([^<]+)</td>", table)
        assert rows == block["stages"]
        for stage in block["stages"]:
            metric = block["metrics"][stage]["patch"]
            lo, hi = metric["ci"]["miou"]
            assert f"{metric['miou']:.3f} [{lo:.3f}, {hi:.3f}]" in table
        assert table.count('class="best"') == 1


def test_report_knockout_pairs_and_skipped(full_run):
    run, _, report = full_run
    page = _page(report)
    results = read_json(run / "results.json")
    for pair in results["knockout"]["pairs"]:
        assert " / ".join(pair["names"]) in page
    assert "2 samples skipped" in page
    for name in results["dataset"]["skipped"]["samples"]:
        assert f"<code>{name}</code>" in page


def test_report_readings_come_from_the_numbers(full_run):
    run, _, report = full_run
    page = html.unescape(_page(report))
    results = read_json(run / "results.json")
    block = results["probing"]["causal"]
    summary = probing_summary(block, "patch")
    assert f"falls by {-summary['adapter_change']:.2f} from the encoder" in page
    assert f"peaking at {summary['llm_peak_stage']}" in page
    assert "x as much as a random control of the same size" in page
    assert "bidirectional image attention changes the mean accuracy" in page


def test_report_escapes_text_from_results(tmp_path):
    run = make_run(tmp_path, bidirectional=False)
    results = read_json(run / "results.json")
    evil = "<script>alert(1)</script>"
    results["dataset"]["class_names"][0] = evil
    results["knockout"]["pairs"][0]["names"][0] = evil
    results["dataset"]["skipped"]["samples"].append(f"{evil}.png")
    results["model"]["name"] = f"tiny {evil}"
    write_json(run / "results.json", results)
    page = _page(write_report(run))
    assert "<script" not in page
    assert html.escape(evil) in page


def test_report_draws_missing_figures_and_says_not_run(tmp_path):
    run = make_run(tmp_path, knockout=False, bidirectional=False, umap=False)
    page = _page(write_report(run))  # no figures drawn yet
    assert set(read_json(run / "results.json")["figures"]) == PROBING_ONLY
    assert page.count("data:image/png;base64,") == len(PROBING_ONLY)
    for section in ("knockout", "bidirectional", "umap"):
        assert f"no <code>{section}</code> section" in page


# --- CLI --------------------------------------------------------------------------------------
def test_cli_report_and_compare(tmp_path, capsys):
    from seglens.cli import main

    run = make_run(tmp_path, knockout=False, umap=False)
    other = make_run(tmp_path, name="other", layers=6, knockout=False, umap=False)
    assert main(["report", "--run", str(run)]) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    assert (run / "report.html").is_file()
    out = tmp_path / "compare.png"
    assert main(["compare", str(run), str(other), "--out", str(out), "--labels", "a", "b"]) == 0
    _assert_png(out)
    assert main(["report", "--run", str(tmp_path / "nowhere")]) == 2
    assert "is this a seglens run directory" in capsys.readouterr().err


# --- main condition and schema versions --------------------------------------------------------
def _annotated_best(fig) -> set[str]:
    return {t.get_text() for ax in fig.axes for t in ax.texts if t.get_text().startswith("best ")}


@pytest.mark.parametrize(
    ("native", "main"), [("causal", "causal"), ("bidirectional", "bidirectional_image")]
)
def test_main_curve_is_the_native_attention(tmp_path, native, main):
    """A Gemma3 run (natively bidirectional image attention) with the bidirectional analysis
    holds both conditions; the report annotates the unmodified model's, not the intervention."""
    from seglens.analyses.probing.report import layerwise_caption as layerwise
    from seglens.analyses.probing.report import layerwise_figure

    run = make_run(tmp_path, conditions=("causal", "bidirectional_image"), native=native)
    results = read_json(run / "results.json")
    other = ({"causal", "bidirectional_image"} - {main}).pop()

    def stars(condition: str) -> set[str]:  # one annotated best stage per level panel
        found = [probing_summary(results["probing"][condition], lv) for lv in ("patch", "pixel")]
        return {f"best {f['best_stage']}: {f['best_miou']:.2f}" for f in found}

    assert stars(main) != stars(other)
    assert _annotated_best(layerwise_figure(results)) == stars(main)
    ours = probing_summary(results["probing"][main], "patch")
    text = layerwise(results)
    assert f"to the adapter ({ours['adapter_miou']:.2f})" in text
    assert f"Under {other} the best patch-level stage" in text


def test_previous_schema_version_is_read_and_a_newer_one_is_refused(tmp_path, capsys):
    from seglens.cli import main
    from seglens.rundir.schema import SCHEMA_VERSION, load_results

    run = make_run(tmp_path, knockout=False, bidirectional=False, umap=False)
    results = read_json(run / "results.json")
    # As version 1 wrote it: the summary held adapter_drop = encoder - adapter.
    block = results["probing"]["causal"]
    summary = block["summary"]
    change = summary.pop("adapter_change")
    for key in ("llm_peak_stage", "llm_peak_miou"):
        summary.pop(key)
    summary["adapter_drop"] = -change
    write_json(run / "results.json", {**results, "schema_version": 1})
    upgraded = load_results(run / "results.json")
    assert upgraded["schema_version"] == SCHEMA_VERSION and upgraded["upgraded_from"] == 1
    assert upgraded["probing"]["causal"]["summary"]["adapter_change"] == pytest.approx(change)
    assert main(["report", "--run", str(run)]) == 0
    assert f"falls by {-change:.2f} from the encoder" in html.unescape(_page(run / "report.html"))
    write_json(run / "results.json", {**results, "schema_version": SCHEMA_VERSION + 1})
    assert main(["report", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"schema version {SCHEMA_VERSION + 1}" in err and "upgrade seglens" in err


def test_schema_names_a_missing_key_and_keeps_unknown_sections(tmp_path):
    from seglens.rundir import put_section
    from seglens.rundir.schema import load_results

    run = make_run(tmp_path, knockout=False, bidirectional=False, umap=False)
    put_section(run, "attention", {"entropy": [0.5]})  # a section this version does not type
    put_section(run, "umap", {**_umap_section(), "pools": {"outside": 1}})  # extra keys survive
    results = load_results(run / "results.json")
    assert results["attention"] == {"entropy": [0.5]} and results["umap"]["pools"] == {"outside": 1}
    broken = {k: v for k, v in _umap_section().items() if k != "tokens"}
    with pytest.raises(ValueError, match=r"umap lacks 'tokens'"):
        put_section(run, "umap", broken)
    assert read_json(run / "results.json")["umap"]["tokens"] == 200  # refused before writing


def _umap_section() -> dict:
    return {
        "stages": ["adapter"],
        "file": "arrays/umap.npz",
        "tokens": 200,
        "scores": {"adapter": {"silhouette": 0.1, "knn_accuracy": 0.5}},
        "classes": [0],
        "neighbors": 15,
        "seed": 0,
    }


# --- intervals that figures must draw whatever they are (issue 19 item 8) -----------------------
ODD_INTERVALS = [
    (0.030, 0.034, 0.167),  # entirely above its estimate (the interval)
    (0.5, 0.1, 0.2),  # entirely below
    (0.3, 0.3, 0.3),  # empty
    (0.4, 0.45, 0.2),  # ends swapped
    (0.2, None, 0.4),  # one end missing
    (None, 0.1, 0.2),  # no estimate
    (0.2, float("nan"), float("nan")),  # nan ends
    (0.2, 0.0, 0.9),  # wide, asymmetric
]


def _make_intervals_odd(node, counter):
    """Rewrite every interval ({estimate, low, high} dicts and ``ci`` pairs) in place, cycling
    through ``ODD_INTERVALS``."""
    if isinstance(node, dict):
        if {"estimate", "low", "high"} <= set(node):
            _, low, high = ODD_INTERVALS[next(counter) % len(ODD_INTERVALS)]
            node["low"], node["high"] = low, high
        if isinstance(node.get("ci"), dict):
            for metric in node["ci"]:
                _, low, high = ODD_INTERVALS[next(counter) % len(ODD_INTERVALS)]
                node["ci"][metric] = [low, high]
        for value in node.values():
            _make_intervals_odd(value, counter)
    elif isinstance(node, list):
        for value in node:
            _make_intervals_odd(value, counter)


INTERVAL_FIGURES = ("layerwise_miou", "differences", "knockout_gaps")


def test_every_figure_draws_any_interval(full_run, tmp_path):
    import copy
    import itertools

    run, _, _ = full_run
    results = copy.deepcopy(read_json(run / "results.json"))
    counter = itertools.count()
    _make_intervals_odd(results, counter)
    assert next(counter) > 3 * len(ODD_INTERVALS)  # the rewrite reached many intervals
    from seglens.report.overview import overview_figure

    for name in INTERVAL_FIGURES:
        fig = FIGURES[name](results, run)
        assert fig is not None, name
        fig.canvas.draw()  # rendering is where matplotlib checks error bars
    overview_figure(results, run).canvas.draw()
    odd = tmp_path / "odd"
    odd.mkdir()
    write_json(odd / "results.json", results)
    _assert_png(compare_runs([odd, run], tmp_path / "compare.png"))


def test_interval_bars_span_low_to_high_whatever_the_estimate():
    from seglens.report.canvas import interval_bars, new_figure

    fig = new_figure(3, 2)
    ax = fig.subplots()
    est, low, high = (list(v) for v in zip(*ODD_INTERVALS, strict=True))
    interval_bars(ax, range(len(est)), est, low, high, "k", "odd")
    (bars,) = [
        c
        for c in ax.collections
        if len(c.get_segments()) and c.get_segments()[0][0, 0] == c.get_segments()[0][1, 0]
    ]
    spans = sorted(
        (float(s[0, 0]), *sorted((float(s[0, 1]), float(s[1, 1])))) for s in bars.get_segments()
    )
    # Bars exactly where both ends exist, from the lower end to the upper one.
    assert spans == [
        (0, 0.034, 0.167),
        (1, 0.1, 0.2),
        (2, 0.3, 0.3),
        (3, 0.2, 0.45),
        (5, 0.1, 0.2),
        (7, 0.0, 0.9),
    ]
    (markers,) = ax.lines
    assert list(markers.get_xdata()) == [0, 1, 2, 3, 4, 6, 7]  # every finite estimate
    fig.canvas.draw()


def test_write_report_writes_the_tables(full_run):
    from seglens.tables import table_columns

    run, _, _ = full_run
    written = sorted(p.name for p in (run / "tables").iterdir())
    assert written == sorted(f"{n}.csv" for n in table_columns())
