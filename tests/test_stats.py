"""Paired bootstrap intervals over images: equal to a naive resampling loop, paired, checked."""

import numpy as np
import pytest

from seglens.experiments.stats import (
    bootstrap_contrast,
    paired_bootstrap,
    resample_weights,
    significant,
)
from seglens.metrics import ConfusionMatrix, PerImageCounts


def _images(rng, n, C, noise):
    """n images of 30 labels each and a prediction that is wrong with probability ``noise``."""
    target = rng.integers(0, C, size=(n, 30))
    wrong = rng.random((n, 30)) < noise
    pred = np.where(wrong, rng.integers(0, C, size=(n, 30)), target)
    return pred, target


def _counts(pred, target, C):
    return PerImageCounts(C).add_batch(pred, target)


def _naive_miou(pred, target, C):
    cm = ConfusionMatrix(C)
    cm.update(pred.reshape(-1), target.reshape(-1))
    return cm.miou()


def _naive_interval(pairs, weights, C, metric, R, seed, confidence=0.95):
    """Resample image indices one resample at a time and recompute every side from labels."""
    n = len(pairs[0][0])
    idx = np.random.default_rng(seed).integers(0, n, size=(R, n))
    values = []
    for r in range(R):
        value = 0.0
        for w, (pred, target) in zip(weights, pairs, strict=True):
            p, t = pred[idx[r]], target[idx[r]]
            value += w * (_naive_miou(p, t, C) if metric == "miou" else (p == t).mean())
        values.append(value)
    alpha = (1 - confidence) / 2
    return np.quantile(values, [alpha, 1 - alpha])


@pytest.mark.parametrize("metric", ["miou", "accuracy"])
def test_paired_interval_equals_a_naive_resampling_loop(metric):
    rng = np.random.default_rng(3)
    C, n = 4, 12
    a = _images(rng, n, C, 0.2)
    b = (np.where(rng.random((n, 30)) < 0.3, rng.integers(0, C, (n, 30)), a[0]), a[1])
    got = paired_bootstrap(_counts(*a, C), _counts(*b, C), metric, n_resamples=200, seed=5)
    low, high = _naive_interval([a, b], [1, -1], C, metric, 200, 5)
    if metric == "miou":
        est = _naive_miou(*a, C) - _naive_miou(*b, C)
    else:
        est = (a[0] == a[1]).mean() - (b[0] == b[1]).mean()
    assert got["n_images"] == n
    assert got["estimate"] == pytest.approx(est, abs=1e-12)
    assert got["low"] == pytest.approx(low, abs=1e-12)
    assert got["high"] == pytest.approx(high, abs=1e-12)
    assert got["low"] <= got["estimate"] <= got["high"]


def test_contrast_of_four_terms_equals_a_naive_loop():
    rng = np.random.default_rng(0)
    C, n = 3, 9
    sides = [_images(rng, n, C, noise) for noise in (0.1, 0.3, 0.2, 0.5)]
    weights = [1, -1, -1, 1]
    terms = [
        (w, ((p == t).sum(1), np.full(n, 30))) for w, (p, t) in zip(weights, sides, strict=True)
    ]
    got = bootstrap_contrast(terms, "accuracy", n_resamples=150)
    low, high = _naive_interval(sides, weights, C, "accuracy", 150, 0)
    assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-12)


def test_one_side_equals_per_image_counts_bootstrap():
    rng = np.random.default_rng(1)
    counts = _counts(*_images(rng, 10, 5, 0.4), 5)
    got = bootstrap_contrast([(1.0, counts)], "miou", n_resamples=300, seed=2)
    assert (got["low"], got["high"]) == pytest.approx(counts.bootstrap("miou", 300, seed=2))
    assert got["estimate"] == pytest.approx(counts.miou())


def test_pairing_narrows_the_interval_of_correlated_sides():
    """Image difficulty varies a lot; b is a with a few more errors: the pair moves together."""
    rng = np.random.default_rng(4)
    n, C = 40, 3
    target = rng.integers(0, C, size=(n, 30))
    hard = rng.random(n)[:, None]  # per-image error rate
    pa = np.where(rng.random((n, 30)) < hard, (target + 1) % C, target)
    pb = np.where(rng.random((n, 30)) < 0.05, (target + 2) % C, pa)
    a, b = _counts(pa, target, C), _counts(pb, target, C)
    paired = paired_bootstrap(a, b, "accuracy", n_resamples=500)
    # Unpaired: independent resamples for the two sides.
    wa, wb = resample_weights(n, 500, 0), resample_weights(n, 500, 1)
    unpaired = (wa @ a.correct) / (wa @ a.total) - (wb @ b.correct) / (wb @ b.total)
    lo, hi = np.quantile(unpaired, [0.025, 0.975])
    assert paired["high"] - paired["low"] < 0.5 * (hi - lo)
    assert significant(paired) is True and paired["low"] > 0


def test_resample_weights_count_n_draws_per_resample():
    w = resample_weights(7, 20, seed=3)
    assert w.shape == (20, 7) and (w.sum(1) == 7).all()


def test_undefined_sides_and_off_switch():
    zero = (np.zeros(3), np.zeros(3))
    out = paired_bootstrap(zero, zero, "accuracy", n_resamples=10)
    assert out == {"estimate": None, "low": None, "high": None, "n_images": 3}
    ones = (np.ones(3), np.full(3, 2.0))
    off = paired_bootstrap(ones, zero, "accuracy", n_resamples=0)
    assert off["low"] is None and off["high"] is None and off["n_images"] == 3
    empty = (np.zeros(0), np.zeros(0))
    assert paired_bootstrap(empty, empty, "accuracy")["estimate"] is None
    assert significant(off) is None
    assert significant({"low": -0.1, "high": 0.2}) is False


def test_bad_inputs_name_the_problem():
    a = (np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="same images; got image counts"):
        paired_bootstrap(a, (np.ones(4), np.ones(4)), "accuracy")
    with pytest.raises(ValueError, match="metric 'iou' is not one of"):
        paired_bootstrap(a, a, "iou")
    with pytest.raises(ValueError, match=r"needs two \(n_images, C\) arrays"):
        paired_bootstrap(a, a, "miou")
    with pytest.raises(ValueError, match="numerator <= denominator"):
        paired_bootstrap((np.full(3, 2.0), np.ones(3)), a, "accuracy")
    with pytest.raises(ValueError, match="0 < confidence < 1"):
        paired_bootstrap(a, a, "accuracy", confidence=1.0)
    with pytest.raises(ValueError, match="PerImageCounts or a"):
        paired_bootstrap(3, a, "accuracy")
