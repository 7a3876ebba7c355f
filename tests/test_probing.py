"""Layerwise probing end to end: the CLI on a tiny model and synthetic data writes the results
schema, reloadable probes and a round-tripping config; precedence, refusal and determinism hold;
the core functions run unchanged inside ``intervene``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from seglens.analyses.probing.measure import (
    evaluate_probes,
    resolve_stages,
    split_holdout,
    train_probes,
)
from seglens.cli import main
from seglens.config import DataConfig, ProbeConfig, RunConfig, load_config
from seglens.data import SyntheticDataset, iterate_samples
from seglens.interventions import BidirectionalImage, intervene
from seglens.probes import ProbeBank, load_probe
from seglens.results import load_arrays

C = 6
BASE = ["--model", "tiny-clip", "--dataset", "synthetic"]
SMALL = ("--limit", "16", "--limit-eval", "8", "--warmup-batches", "1")
DATA = DataConfig(batch_size=8)


def run_cli(tmp, *extra: str) -> int:
    return main(["probe", *BASE, "--out", str(tmp), *extra])


def results_of(run) -> dict:
    return json.loads((run / "results.json").read_text())


def datasets(n_train: int = 24, n_eval: int = 12):
    train = SyntheticDataset(num_images=n_train, num_classes=C, split="train")
    return train, SyntheticDataset(num_images=n_eval, num_classes=C, split="val")


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("probe") / "run"
    assert run_cli(run, "--limit", "24", "--limit-eval", "12", "--bootstrap", "300") == 0
    return run


@pytest.fixture(scope="module")
def small_vlm():
    """A 112 px tiny LLaVA (8 x 8 tokens) for the in-process tests."""
    from seglens.models import tiny_llava

    return tiny_llava("clip", image_size=112)


# --- end to end ------------------------------------------------------------------------------
def test_results_schema(sgd_run, tiny_models):
    res = results_of(sgd_run)
    for key in ("schema_version", "versions", "git_hash", "seed", "created", "config", "model"):
        assert key in res
    ds = res["dataset"]
    assert ds["num_classes"] == C == len(ds["class_names"]) == len(ds["palette"])
    assert ds["train_images"] + ds["holdout_images"] == 24 and ds["holdout_images"] >= 1
    assert ds["eval_images"] == 12 and ds["skipped"] == {"count": 0, "samples": []}
    causal = res["probing"]["causal"]
    assert causal["stages"] == tiny_models("clip").default_stages and causal["solver"] == "sgd"
    for stage in causal["stages"]:
        m = causal["metrics"][stage]
        assert m["probe"]["file"] == f"probes/causal/{stage}"
        assert m["probe"]["lr"] in RunConfig().probe.lrs
        assert (sgd_run / f"probes/causal/{stage}.safetensors").is_file()
        for level, unit in (("patch", "tokens"), ("pixel", "pixels")):
            M = m[level]
            assert len(M["per_class_iou"]) == C and M[unit] > 0
            for metric in ("miou", "pixel_accuracy"):
                lo, hi = M["ci"][metric]
                assert lo <= M[metric] <= hi, (stage, level, metric)
    summary = causal["summary"]
    assert summary["level"] == "pixel" and summary["best_stage"] in causal["stages"]
    pix = {s: causal["metrics"][s]["pixel"]["miou"] for s in causal["stages"]}
    assert summary["best_miou"] == max(pix.values())
    assert summary["adapter_change"] == pytest.approx(pix["adapter"] - pix["encoder"])
    llm_best = max(v for s, v in pix.items() if s.startswith("llm."))
    assert summary["llm_gain"] == pytest.approx(llm_best - pix["adapter"])
    assert pix["encoder"] > 1 / C  # the tiny random model still separates textures


def test_arrays_and_qualitative(sgd_run):
    res = results_of(sgd_run)
    stages = res["probing"]["causal"]["stages"]
    arrays = load_arrays(sgd_run / res["probing"]["causal"]["arrays"])
    for s in stages:
        assert arrays[f"position_accuracy__{s}"].shape == (256,)
        assert arrays[f"confusion__{s}__patch"].shape == (C, C)
        assert arrays[f"confusion__{s}__pixel"].shape == (C, C)
    qual = res["qualitative"]
    assert qual["stages"] == ["encoder", "adapter", "llm.1", "llm.3", "llm.4"]
    assert qual["images"] == [f"synthetic-val-{i:05d}" for i in range(4)]
    q = load_arrays(sgd_run / qual["file"])
    for i in range(4):
        assert q[f"image__{i}"].dtype == np.uint8 and q[f"image__{i}"].shape == (180, 240, 3)
        for s in qual["stages"]:
            pred = q[f"pred__{s}__{i}"]
            assert pred.shape == (180, 240)
            assert set(np.unique(pred)) <= set(range(C)) | {255}
            assert (pred == 255).any()  # the crop removed the sides: never scored


def test_patch_metrics_equal_recomputation_from_saved_confusion(sgd_run):
    res = results_of(sgd_run)
    arrays = load_arrays(sgd_run / "arrays/probing_causal.npz")
    for stage, m in res["probing"]["causal"]["metrics"].items():
        for level in ("patch", "pixel"):
            cm = arrays[f"confusion__{stage}__{level}"].astype(np.float64)
            inter = np.diag(cm)
            union = cm.sum(0) + cm.sum(1) - inter
            iou = [inter[k] / union[k] if union[k] else None for k in range(C)]
            assert m[level]["per_class_iou"] == pytest.approx(iou)
            assert m[level]["miou"] == pytest.approx(np.mean([v for v in iou if v is not None]))
            assert m[level]["pixel_accuracy"] == pytest.approx(inter.sum() / cm.sum())


def test_reloaded_probe_reproduces_saved_confusion(sgd_run, tiny_models):
    vlm = tiny_models("clip")
    _, evaluation = datasets()
    stage = "llm.2"
    probe = load_probe(sgd_run / "probes/causal" / stage)
    cm = np.zeros((C, C), np.int64)
    for prepared in iterate_samples(
        evaluation, batch_size=8, transform=vlm.preprocessor(C), progress=False
    ):
        batch = vlm.collate(prepared)
        pred = probe.predict(vlm.capture(batch, [stage])[stage]).numpy().ravel()
        y = batch.labels.numpy().ravel()
        np.add.at(cm, (y[y != 255], pred[y != 255]), 1)
    saved = load_arrays(sgd_run / "arrays/probing_causal.npz")[f"confusion__{stage}__patch"]
    np.testing.assert_array_equal(cm, saved)


def test_config_yaml_round_trips(sgd_run):
    loaded = load_config(sgd_run / "config.yaml")
    assert json.loads(json.dumps(loaded.to_dict())) == results_of(sgd_run)["config"]
    assert loaded.data.limit_train == 24 and loaded.data.limit_eval == 12


def test_cli_beats_yaml_explicit_false_included(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"probe": {"solver": "lda", "pixel_level": True}}))
    run = tmp_path / "run"
    argv = (*SMALL, "--config", str(cfg), "--solver", "sgd", "--epochs", "1", "--no-pixel-level")
    assert run_cli(run, *argv) == 0
    res = results_of(run)
    causal = res["probing"]["causal"]
    assert causal["solver"] == "sgd" and res["config"]["probe"]["pixel_level"] is False
    assert causal["summary"]["level"] == "patch"
    assert all(m["pixel"] is None for m in causal["metrics"].values())
    assert "confusion__adapter__pixel" not in load_arrays(run / "arrays/probing_causal.npz")


def test_existing_run_refused_and_lda_is_deterministic(tmp_path, capsys):
    run = tmp_path / "run"
    args = (*SMALL, "--solver", "lda", "--bootstrap", "100", "--qualitative", "0")
    assert run_cli(run, *args) == 0
    first = results_of(run)
    assert run_cli(run, *args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run_cli(run, *args, "--overwrite") == 0
    second = results_of(run)
    assert first["probing"] == second["probing"]
    assert first["probing"]["causal"]["metrics"]["adapter"]["probe"]["lr"] is None
    assert first["qualitative"]["images"] == []


def test_unknown_stage_is_a_one_line_error(tmp_path, capsys):
    assert run_cli(tmp_path / "run", "--stages", "encoder", "llm.9") == 2
    assert "unknown stage 'llm.9'" in capsys.readouterr().err


# --- the core functions ----------------------------------------------------------------------
def test_holdout_split_is_seeded_and_disjoint():
    train, _ = datasets(40)
    a_train, a_hold = split_holdout(train, 0.25, seed=3)
    _, b_hold = split_holdout(train, 0.25, seed=3)
    _, c_hold = split_holdout(train, 0.25, seed=4)
    assert a_hold._keys == b_hold._keys != c_hold._keys
    assert len(a_hold) == 10 and sorted(a_train._keys + a_hold._keys) == train._keys
    assert split_holdout(train, 0.0, seed=3) == (train, None)


def test_several_lrs_need_a_holdout(small_vlm):
    train, _ = datasets()
    cfg = ProbeConfig(holdout_fraction=0.0)
    with pytest.raises(ValueError, match="needs a holdout"):
        train_probes(small_vlm, train, ["adapter"], cfg, data_config=DATA, progress=False)


def test_saved_probe_predicts_as_in_memory_one(small_vlm, tmp_path):
    vlm = small_vlm
    train, evaluation = datasets(16, 4)
    cfg = ProbeConfig(warmup_batches=1)
    stages = ["encoder", "llm.4"]
    bank = train_probes(vlm, train, stages, cfg, data_config=DATA, seed=1, progress=False)
    assert bank.training_["train_images"] + bank.training_["holdout_images"] == 16
    bank.save(tmp_path / "bank")
    batch = vlm.prepare([evaluation[i].image for i in range(4)])  # fresh, unseen images
    features = vlm.capture(batch, stages)
    reloaded = ProbeBank.load(tmp_path / "bank")
    for stage in stages:
        in_memory = bank.probes[stage].decision_function(features[stage])
        single = load_probe(tmp_path / "bank" / stage)
        assert torch.equal(single.decision_function(features[stage]), in_memory)
        assert torch.equal(reloaded.probes[stage].decision_function(features[stage]), in_memory)


def test_runs_unchanged_inside_intervene(small_vlm):
    """An empty spec trains the same probes bit for bit; bidirectional image attention changes
    the LLM stages but not the stages before the LLM."""
    vlm = small_vlm
    train, evaluation = datasets(16, 8)
    cfg = ProbeConfig(solver="lda", bootstrap=0, qualitative=0)
    stages = resolve_stages(vlm, cfg)

    def run():
        bank = train_probes(vlm, train, stages, cfg, data_config=DATA, progress=False)
        res = evaluate_probes(vlm, bank, evaluation, stages, cfg, data_config=DATA, progress=False)
        return bank, res

    plain_bank, plain = run()
    with intervene(vlm, []):
        empty_bank, _ = run()
    with intervene(vlm, [BidirectionalImage()]):
        _, bidir = run()
    for stage in stages:
        assert torch.equal(plain_bank.probes[stage].coef_, empty_bank.probes[stage].coef_)
    for stage in ("encoder", "adapter"):
        assert torch.equal(plain.patch[stage].matrix, bidir.patch[stage].matrix)
    assert not torch.equal(plain.pixel["llm.4"].matrix, bidir.pixel["llm.4"].matrix)
    assert bidir.metrics()["adapter"]["pixel"]["ci"]["miou"] == [None, None]
