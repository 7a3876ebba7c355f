"""UMAP experiment: cluster scores on planted clusters, seeded embeddings, token sampling, run."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from seglens.analyses.umap.measure import (
    cluster_scores,
    embed,
    run_umap,
    sample_tokens,
    shown_classes,
    umap_stages,
)
from seglens.config import load_config
from seglens.data import IGNORE_INDEX, SyntheticDataset
from seglens.results import SCHEMA_VERSION, load_arrays, read_json, write_json

C, PER_CLASS, D = 5, 60, 32  # 300 points: small enough for a quick UMAP


@pytest.fixture(scope="module")
def blobs():
    """(300, 32) features in 5 well separated Gaussian blobs and their (300,) labels."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (C, D))
    labels = np.repeat(np.arange(C), PER_CLASS)
    features = centres[labels] + rng.normal(0, 1, (len(labels), D))
    return features.astype(np.float32), labels


def test_scores_high_on_planted_clusters(blobs):
    features, labels = blobs
    scores = cluster_scores(features, labels, neighbors=15, seed=0)
    assert scores["silhouette"] > 0.5
    assert scores["knn_accuracy"] > 0.95


def test_scores_at_chance_on_shuffled_labels(blobs):
    features, labels = blobs
    shuffled = np.random.default_rng(1).permutation(labels)
    scores = cluster_scores(features, shuffled, neighbors=15, seed=0)
    assert scores["silhouette"] < 0.1
    assert scores["knn_accuracy"] < 1 / C + 0.15


def test_scores_drop_single_token_classes(blobs):
    features, labels = blobs
    lonely = np.concatenate([labels, [C]])  # class C has one token: dropped, not an error
    with_lonely = cluster_scores(np.vstack([features, features[:1]]), lonely, seed=0)
    assert with_lonely == pytest.approx(cluster_scores(features, labels, seed=0), abs=0.02)
    undefined = cluster_scores(features[:3], np.array([0, 1, 2]))
    assert np.isnan(undefined["silhouette"]) and np.isnan(undefined["knn_accuracy"])


def test_scores_refuse_non_finite_features(blobs):
    features, labels = blobs
    bad = features.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        cluster_scores(bad, labels)


def test_embedding_is_seeded(blobs):
    features, _ = blobs
    first = embed(features, neighbors=15, seed=0)
    assert first.shape == (len(features), 2) and first.dtype == np.float32
    assert np.array_equal(first, embed(features, neighbors=15, seed=0))
    assert not np.array_equal(first, embed(features, neighbors=15, seed=1))


def test_default_stages_spread_over_depth():
    assert umap_stages(32) == ["encoder", "adapter", "llm.8", "llm.16", "llm.24", "llm.32"]
    assert umap_stages(2) == ["encoder", "adapter", "llm.1", "llm.2"]
    assert umap_stages(1) == ["encoder", "adapter", "llm.1"]


def test_shown_classes_most_frequent_first():
    assert shown_classes(np.array([3, 3, 1, 1, 2, 0, 0, 0]), 2) == [0, 1]


def test_sample_tokens_same_tokens_for_every_stage(tiny_vlm):
    dataset = SyntheticDataset(num_images=6, split="val")
    stages = ["encoder", "adapter", "llm.2"]
    kwargs = dict(tokens=200, seed=0, batch_size=4, progress=False)
    features, labels = sample_tokens(tiny_vlm, dataset, stages, **kwargs)
    assert set(features) == set(stages)
    assert labels.shape == (200,) and labels.dtype == np.int64
    assert not (labels == IGNORE_INDEX).any()
    widths = tiny_vlm.info()["stages"]
    for stage in stages:
        assert features[stage].shape == (200, widths[stage])
        assert features[stage].dtype == np.float32
    # Each stage alone (same seed, same data) picks the same tokens: rows line up across stages.
    for stage in stages:
        alone, alone_labels = sample_tokens(tiny_vlm, dataset, [stage], **kwargs)
        np.testing.assert_array_equal(alone_labels, labels)
        np.testing.assert_allclose(alone[stage], features[stage], rtol=1e-5, atol=1e-5)
    other, _ = sample_tokens(tiny_vlm, dataset, ["adapter"], **{**kwargs, "seed": 1})
    assert not np.array_equal(other["adapter"], features["adapter"])
    # Asking for more than the split holds gives every labelled token, once.
    everything, all_labels = sample_tokens(
        tiny_vlm, dataset, ["adapter"], **{**kwargs, "tokens": 10**6}
    )
    assert len(all_labels) <= 6 * tiny_vlm.num_image_tokens
    assert len(np.unique(everything["adapter"], axis=0)) == len(all_labels)


def test_sample_tokens_refuses_bad_requests(tiny_vlm):
    dataset = SyntheticDataset(num_images=2, split="val")
    with pytest.raises(ValueError, match="tokens=0 must be >= 1"):
        sample_tokens(tiny_vlm, dataset, ["adapter"], tokens=0, seed=0)
    with pytest.raises(ValueError, match="no stages"):
        sample_tokens(tiny_vlm, dataset, [], tokens=10, seed=0)


@pytest.fixture
def run_dir(tmp_path):
    """A minimal run directory: resolved config and a results.json with no analyses yet."""
    config = load_config(**{"model.name": "tiny-clip", "data.limit_eval": 4, "umap.tokens": 200})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    write_json(tmp_path / "results.json", {"schema_version": SCHEMA_VERSION, "figures": {}})
    return tmp_path


@pytest.fixture
def drawn(monkeypatch):
    """A stand-in ``seglens.report.figures`` recording the ``results.json`` each draw saw."""
    seen = []
    figures = types.ModuleType("seglens.report.figures")
    figures.draw_all = lambda run_dir: seen.append(read_json(Path(run_dir) / "results.json"))
    monkeypatch.setitem(sys.modules, "seglens.report.figures", figures)
    return seen


def test_run_umap_writes_results_and_arrays(run_dir, tiny_vlm, drawn):
    section = run_umap(run_dir, vlm=tiny_vlm, progress=False)
    results = read_json(run_dir / "results.json")
    assert results["figures"] == {} and results["schema_version"] == SCHEMA_VERSION  # kept
    assert results["umap"] == section
    assert drawn == []  # figures are the caller's (the CLI, `seglens run`), drawn once
    stages = umap_stages(tiny_vlm.num_llm_layers)
    assert section["stages"] == stages
    assert section["tokens"] == 200 and section["neighbors"] == 15 and section["seed"] == 0
    assert set(section["scores"]) == set(stages)
    for score in section["scores"].values():
        assert -1 <= score["silhouette"] <= 1 and 0 <= score["knn_accuracy"] <= 1
    arrays = load_arrays(run_dir / section["file"])
    assert set(arrays) == {f"{kind}__{s}" for kind in ("embedding", "labels") for s in stages}
    labels = arrays[f"labels__{stages[0]}"]
    for stage in stages:
        assert arrays[f"embedding__{stage}"].shape == (200, 2)
        assert arrays[f"embedding__{stage}"].dtype == np.float32
        assert arrays[f"labels__{stage}"].dtype == np.int64
        np.testing.assert_array_equal(arrays[f"labels__{stage}"], labels)
    assert section["classes"] == shown_classes(labels, 10)
    assert set(section["classes"]) == set(np.unique(labels).tolist())  # 6 classes <= 10 shown


def test_run_umap_errors_name_the_problem(tmp_path, run_dir, tiny_vlm):
    with pytest.raises(FileNotFoundError, match=r"results\.json does not exist"):
        run_umap(tmp_path / "nowhere", vlm=tiny_vlm)
    with pytest.raises(ValueError, match=r"unknown stages \['llm.99'\]"):
        run_umap(run_dir, vlm=tiny_vlm, stages=["llm.99"])


def test_run_umap_overrides_reach_the_run(run_dir, tiny_vlm, drawn):
    section = run_umap(run_dir, vlm=tiny_vlm, progress=False, stages=["adapter"], tokens=60)
    assert section.stages == ["adapter"] and section.tokens == 60
    assert drawn == []


def test_cli_umap(run_dir, capsys):
    from seglens.cli import main

    assert main(["umap", "--run", str(run_dir), "--stages", "adapter", "--tokens", "50"]) == 0
    results = read_json(run_dir / "results.json")
    section = results["umap"]
    assert section["stages"] == ["adapter"] and section["tokens"] == 50
    assert results["figures"] == {"umap": "figures/umap.png"}  # the command draws once
    assert (run_dir / "report.html").is_file()
    assert "umap.npz" in capsys.readouterr().out
