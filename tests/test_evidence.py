"""The report words every paired interval as significant at 95% or not, flags probes that did
not converge, and draws the error-bar figures from the evidence sections."""

from __future__ import annotations

import html

import numpy as np

import fixtures_evidence as evidence
from fixtures_results import make_run
from seglens.analyses.knockout.report import knockout_text
from seglens.report import draw_all, write_report
from seglens.report.evidence import interval_text, significance
from seglens.results import read_json, write_json


def test_significance_words():
    assert significance({"estimate": 0.1, "low": 0.01, "high": 0.2}) == "significant at 95%"
    assert significance({"estimate": -0.1, "low": -0.2, "high": -0.01}) == "significant at 95%"
    assert significance({"estimate": 0.1, "low": -0.01, "high": 0.2}) == "not significant at 95%"
    assert significance({"estimate": 0.1, "low": None, "high": None}).startswith("no interval")
    assert significance(None) == "undefined"
    text = interval_text("gain", {"estimate": 0.1, "low": 0.05, "high": 0.15, "n_images": 7})
    assert text == "gain +0.100 [+0.050, +0.150] over 7 images, significant at 95%"


def test_nothing_to_test_is_said():
    assert knockout_text({"status": "nothing_to_test", "reason": "no pair"}) == (
        "Nothing to test: no pair"
    )


def _with_evidence(run):
    """Put the evidence sections into a fixture run (whatever ``make_run`` already wrote)."""
    results = read_json(run / "results.json")
    rng = np.random.default_rng(0)
    causal = results["probing"]["causal"]
    causal["differences"] = evidence.probing_differences(causal["stages"], rng)
    causal["convergence"] = evidence.convergence(causal["stages"])
    layers = results["model"]["num_llm_layers"]
    results["knockout"]["differences"] = evidence.knockout_differences(layers, rng)
    pairs = [p["classes"] for p in results["knockout"]["pairs"]]
    results["attention"] = evidence.attention(layers, pairs, rng)
    bidir = results["bidirectional"]
    bidir["differences"] = evidence.bidirectional_differences(causal["stages"], bidir["layer"], rng)
    write_json(run / "results.json", results)
    return run


def test_report_flags_and_words(tmp_path):
    run = _with_evidence(make_run(tmp_path))
    figures = draw_all(run)
    assert {"differences", "knockout_gaps", "attention_anchors"} <= set(figures)
    page = html.unescape(write_report(run).read_text())
    assert "NOT CONVERGED" in page and "llm.4" in page
    assert "learning rate at the edge of the grid: encoder" in page
    assert "adapter minus encoder mIoU" in page and "significant at 95%" in page
    assert "block-correct minus control (pair pool)" in page
    assert "early-minus-late per-position accuracy gain at llm.2" in page
    assert "same-class anchors above the uniform baseline" in page
    for name in ("differences", "knockout_gaps", "attention_anchors"):
        assert f'id="fig-{name}"' in page
