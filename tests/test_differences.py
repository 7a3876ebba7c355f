"""Paired intervals of a probing run: the adapter change, the LLM gains, bidirectional minus
causal, the early-minus-late band; equal to the stats functions on the saved per-image counts."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import results_of
from seglens.analyses.bidirectional.measure import run_bidirectional
from seglens.analyses.probing.measure import run_probing
from seglens.config import load_config
from seglens.experiments.differences import counts_from_arrays, probing_differences
from seglens.experiments.stats import bootstrap_contrast, paired_bootstrap
from seglens.metrics import PerImageCounts
from seglens.results import load_arrays

R = 60
KEYS = {"estimate", "low", "high", "n_images"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_models):
    out = tmp_path_factory.mktemp("differences") / "run"
    overrides = {
        "data.limit_train": 16,
        "data.limit_eval": 8,
        "probe.solver": "lda",
        "probe.bootstrap": R,
        "probe.pixel_level": False,
        "probe.qualitative": 0,
        "out": str(out),
    }
    vlm = tiny_models("clip")
    run_probing(load_config(**overrides), vlm=vlm, progress=False)
    run_bidirectional(out, vlm=vlm, progress=False)
    return out


def test_probing_section_matches_the_saved_counts(run):
    res = results_of(run)
    causal = res["probing"]["causal"]
    diff, summary = causal["differences"], causal["summary"]
    arrays = load_arrays(run / causal["arrays"])
    counts = {s: counts_from_arrays(arrays, s, "patch", "miou") for s in causal["stages"]}
    assert diff["level"] == "patch" and diff["n_resamples"] == R
    change = diff["adapter_minus_encoder"]
    assert set(change) == KEYS and change["n_images"] == 8
    assert change["estimate"] == pytest.approx(summary["adapter_change"])
    expected = paired_bootstrap(counts["adapter"], counts["encoder"], n_resamples=R, seed=0)
    assert change == pytest.approx(expected)
    for s in ("llm.1", "llm.2", "llm.3", "llm.4"):
        d = diff["llm_minus_adapter"][s]
        m = causal["metrics"][s]["patch"]["miou"] - causal["metrics"]["adapter"]["patch"]["miou"]
        assert d["estimate"] == pytest.approx(m) and d["low"] <= d["high"]
    best = diff["best_llm_minus_adapter"]
    assert best["estimate"] == pytest.approx(summary["llm_gain"])
    assert best["low"] <= best["high"]


def test_best_layer_interval_rechooses_the_layer_in_every_resample():
    rng = np.random.default_rng(0)
    n, C = 10, 3
    target = rng.integers(0, C, (n, 20))
    per_stage = {}
    for s, noise in (("adapter", 0.5), ("llm.1", 0.3), ("llm.2", 0.32)):
        pred = np.where(rng.random((n, 20)) < noise, rng.integers(0, C, (n, 20)), target)
        per_stage[s] = PerImageCounts(C).add_batch(pred, target)
    got = probing_differences(per_stage, list(per_stage), level="patch", n_resamples=100, seed=3)
    idx = np.random.default_rng(3).integers(0, n, (100, n))

    def miou(counts, rows):
        inter, union = counts.intersection[rows].sum(0), counts.union[rows].sum(0)
        return np.mean(inter[union > 0] / union[union > 0])

    values = [
        max(miou(per_stage[s], r) for s in ("llm.1", "llm.2")) - miou(per_stage["adapter"], r)
        for r in idx
    ]
    low, mid, high = np.quantile(values, [0.025, 0.5, 0.975])
    best = got["best_llm_minus_adapter"]
    centred = (best["estimate"] + low - mid, best["estimate"] + high - mid)  # centred_interval
    assert (best["low"], best["high"]) == pytest.approx(centred, abs=1e-12)
    assert got["adapter_minus_encoder"] is None  # no encoder stage given


def test_bidirectional_section(run):
    res = results_of(run)
    section = res["bidirectional"]
    diff = section["differences"]
    assert diff["missing"] == []
    for s, d in diff["bidirectional_minus_causal"].items():
        m = section["miou"]["bidirectional_image"][s] - section["miou"]["causal"][s]
        assert set(d) == KEYS and d["estimate"] == pytest.approx(m)
    for s in ("encoder", "adapter"):  # the intervention acts inside the LLM only
        assert diff["bidirectional_minus_causal"][s]["estimate"] == 0
    band = diff["early_minus_late_gain"]
    assert band["stage"] == section["layer"] == "llm.2"
    b = load_arrays(run / "arrays/probing_bidirectional_image.npz")
    c = load_arrays(run / "arrays/probing_causal.npz")
    terms = [
        (w, counts_from_arrays(x, "llm.2", band_name, "accuracy"))
        for w, x, band_name in ((1, b, "early"), (-1, c, "early"), (-1, b, "late"), (1, c, "late"))
    ]
    assert band == {"stage": "llm.2", **bootstrap_contrast(terms, "accuracy", n_resamples=R)}


def test_band_counts_equal_an_independent_recomputation(run, tiny_models):
    """Reload the causal llm.2 probe, predict every evaluation image, count the first and last
    quarter of the positions per image: the saved band counts are exactly these."""
    from seglens.data import iterate_samples
    from seglens.experiments.common import build_dataset
    from seglens.probes import load_probe

    vlm = tiny_models("clip")
    config = load_config(run / "config.yaml")
    data = build_dataset(config.data, "val", 8, config.seed)
    probe = load_probe(run / "probes/causal/llm.2")
    stream = iterate_samples(data, batch_size=4, transform=vlm.preprocessor(6), progress=False)
    hits, valid = [], []
    for prepared in stream:
        batch = vlm.collate(prepared)
        pred = probe.predict(vlm.capture(batch, ["llm.2"])["llm.2"]).numpy()
        labels = batch.labels.numpy()
        hits.append((pred == labels) & (labels != 255))
        valid.append(labels != 255)
    hits, valid = np.concatenate(hits), np.concatenate(valid)
    arrays = load_arrays(run / "arrays/probing_causal.npz")
    N = hits.shape[1]
    k = round(0.25 * N)
    for name, cols in (("early", slice(0, k)), ("late", slice(N - k, N))):
        correct, total = counts_from_arrays(arrays, "llm.2", name, "accuracy")
        np.testing.assert_array_equal(correct, hits[:, cols].sum(1))
        np.testing.assert_array_equal(total, valid[:, cols].sum(1))
