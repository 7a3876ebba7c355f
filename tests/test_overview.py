"""The report's overview figure: three panels drawn from results.json and the arrays, each panel's
marks equal to the numbers it shows, and a panel without data saying so."""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_results import make_run
from seglens.analyses.knockout.report import PREFERRED_POOL
from seglens.report.canvas import moving_average
from seglens.report.overview import overview_figure
from seglens.results import read_json
from seglens.rundir.schema import probing_summary


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("overview"), umap=False, qualitative=False, layers=6)
    return run, read_json(run / "results.json")


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_three_panels_show_the_runs_numbers(full):
    run, results = full
    fig = overview_figure(results, run)
    curve, knockout, positions = fig.axes[:3]
    assert [ax.get_title(loc="left")[:3] for ax in (curve, knockout, positions)] == [
        "(a)",
        "(b)",
        "(c)",
    ]
    # (a) the drop and the recovery, as the schema's summary computes them.
    summary = probing_summary(results["probing"]["causal"], "patch")
    assert f"adapter {summary['adapter_change']:+.2f}" in _texts(curve)
    assert f"LLM {summary['llm_gain']:+.2f} (to {summary['llm_peak_stage']})" in _texts(curve)
    # (b) one bar per LLM layer and treatment, spanning the pool's interval.
    pool = results["knockout"]["differences"]["pools"][PREFERRED_POOL]
    bars = [c for c in knockout.collections if len(c.get_segments()) == len(pool)]
    spans = sorted(
        (round(float(s[0, 1]), 12), round(float(s[1, 1]), 12))
        for c in bars
        for s in c.get_segments()
        if s[0, 0] == s[1, 0]
    )
    expected = sorted(
        (round(cells[name]["low"], 12), round(cells[name]["high"], 12))
        for cells in pool.values()
        for name in ("block_correct_minus_control", "block_incorrect_minus_control")
    )
    assert spans == expected
    # (c) both conditions, smoothed over one grid row.
    with np.load(run / results["bidirectional"]["position_accuracy_file"]) as arrays:
        for line, condition in zip(positions.lines, ("causal", "bidirectional_image"), strict=True):
            g = results["model"]["grid"][1]
            np.testing.assert_allclose(line.get_ydata(), moving_average(arrays[condition], g))
    fig.canvas.draw()


def test_absent_panels_say_so(tmp_path):
    run = make_run(tmp_path, knockout=False, bidirectional=False, umap=False, qualitative=False)
    results = read_json(run / "results.json")
    fig = overview_figure(results, run)
    _, knockout, positions = fig.axes[:3]
    assert _texts(knockout) == ["Attention knockout not run\n(seglens knockout --run RUN)."]
    assert "Bidirectional image attention not run" in _texts(positions)[0]
    results["knockout"] = {"status": "nothing_to_test", "reason": "no pair co-occurs"}
    fig = overview_figure(results, run)
    assert "no pair co-occurs" in _texts(fig.axes[1])[0]
    assert overview_figure({"probing": {}}, run) is None
