"""The findings section: verdicts on paired intervals, equal to a direct computation from the
saved per-image counts, and None (never guessed) where an analysis did not run."""

from __future__ import annotations

import numpy as np

from seglens.experiments.findings import FINDINGS, read_findings
from seglens.experiments.stats import paired_bootstrap

C, N = 3, 40
STAGES = ["encoder", "adapter", "llm.1", "llm.2"]


def _counts(rng, quality):
    union = rng.integers(5, 20, size=(N, C))
    inter = np.minimum(union, rng.binomial(union, quality))
    correct = inter.sum(1)
    return inter, union, correct, union.sum(1)


def _run(qualities):
    rng = np.random.default_rng(0)
    arrays, metrics = {}, {}
    for stage, q in zip(STAGES, qualities, strict=True):
        inter, union, correct, total = _counts(rng, q)
        for level in ("patch", "early", "late"):
            arrays[f"image_counts__{stage}__{level}"] = np.column_stack(
                [inter, union, correct, total]
            )
        iou = inter.sum(0) / union.sum(0)
        metrics[stage] = {"patch": {"miou": float(iou.mean()), "per_class_iou": iou.tolist()}}
    results = {
        "seed": 0,
        "model": {"native_image_attention": "causal"},
        "dataset": {"class_names": ["a", "b", "c"]},
        "probing": {"causal": {"stages": STAGES, "metrics": metrics}},
    }
    return results, arrays


def test_drop_and_recovery_equal_paired_intervals_on_the_saved_counts():
    results, arrays = _run([0.8, 0.6, 0.7, 0.9])
    found = read_findings(results, lambda condition: arrays if condition == "causal" else None)
    assert set(found) == set(FINDINGS)

    def side(stage):
        table = arrays[f"image_counts__{stage}__patch"]
        return table[:, :C], table[:, C : 2 * C]

    expected = paired_bootstrap(side("adapter"), side("encoder"), "miou", seed=0)
    assert found["drop"]["adapter_minus_encoder"] == expected
    assert found["drop"]["holds"] is (expected["high"] < 0) is True
    assert found["recovery"]["holds"] is True
    assert found["recovery"]["best_llm_minus_adapter"]["stage"] == "llm.2"
    # analyses that did not run are not measured, not guessed
    assert found["anchors"]["holds"] is None and found["early_positions"]["holds"] is None


def test_no_drop_when_the_adapter_keeps_everything():
    results, arrays = _run([0.6, 0.8, 0.8, 0.8])
    found = read_findings(results, lambda condition: arrays)
    assert found["drop"]["holds"] is False
    assert found["recovery"]["hit_at_adapter"] == []  # no class loses IoU at the adapter
