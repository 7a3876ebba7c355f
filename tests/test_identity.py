"""Run and cache identity (issue 19, items 1 and 2): what a run's numbers depend on is recorded
once, checked on every reopen, resume and cache lookup, and a refusal names the first difference
and changes nothing in the run directory (names, contents and modification times)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglens.config import load_config
from seglens.rundir import RunDir
from seglens.rundir.identity import first_difference, run_identity


def make_folder(root: Path, n: int = 4, seed: int = 0, size: int = 32) -> Path:
    """A folder dataset with train/ and val/ splits of ``n`` images each, 3 classes."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            mask = rng.integers(0, 3, (size, size), dtype=np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"img{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"img{i}.png")
    (root / "classes.txt").write_text("sky\ntree\nroad\n")
    return root


def tree(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``path``: relative name -> (contents, mtime in ns)."""
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def touch_later(path: Path, data: bytes | None = None) -> None:
    """Rewrite ``path`` (same bytes unless given) with a later modification time."""
    path.write_bytes(path.read_bytes() if data is None else data)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def folder_config(root: Path, out: Path, **extra):
    options = {
        "model.name": "tiny-clip",
        "data.dataset": "folder",
        "data.root": str(root),
        "out": str(out),
        "probe.solver": "lda",
        "probe.bootstrap": 0,
    }
    return load_config(**(options | extra))


def finished(config) -> RunDir:
    """A run directory as a finished run leaves it (config, identity, results.json)."""
    run = RunDir.create(config)
    run.begin(probing={})
    return run


def test_identity_is_stable_and_names_the_file_that_changed(tmp_path):
    root = make_folder(tmp_path / "data")
    config = folder_config(root, tmp_path / "run")
    first = run_identity(config)
    assert first == run_identity(config)  # no false refusals
    assert first["data"]["root"] == str(root.resolve())
    split = first["data"]["splits"]["train"]
    assert split["kind"] == "files" and split["count"] == 8 and split["mode"] == "content"
    assert split["class_names"] == ["sky", "tree", "road"]
    mask = root / "train" / "masks" / "img2.png"
    size = mask.stat().st_size
    touch_later(mask, mask.read_bytes() + b"\0")
    text = first_difference(first, run_identity(config))
    assert text == (
        f"data.splits.train.files: {mask.resolve()} changed (size {size} -> {size + 1} bytes)"
    )
    (root / "val" / "images" / "img3.png").unlink()
    (root / "val" / "masks" / "img3.png").unlink()
    changed = run_identity(config)
    text = first_difference(first, changed)  # train comes first
    assert "train/masks/img2.png changed" in text
    first["data"]["splits"]["train"] = changed["data"]["splits"]["train"]
    assert first_difference(first, changed) == "data.splits.val.items: 4 -> 3"


def test_first_difference_orders_and_skips_keys_of_one_side():
    saved = {"data": {"root": "/a", "files": [["x", 1, 5]], "n": 1}, "model": {"dtype": "auto"}}
    now = {"data": {"root": "/a", "files": [["x", 1, 6]], "n": 1}, "model": {"dtype": "bf16"}}
    assert first_difference(saved, now) == "data.files: x changed (modification time)"
    now["data"]["files"] = [["x", 1, 5], ["y", 2, 5]]
    assert first_difference(saved, now) == "data.files: y is new (1 -> 2 files)"
    now["data"]["files"] = saved["data"]["files"]
    assert first_difference(saved, now) == "model.dtype: 'auto' -> 'bf16'"
    now["model"] = {"dtype": "auto", "added_later": 3}  # a newer option: not a difference
    assert first_difference(saved, now) is None


def test_a_relative_data_root_is_recorded_absolute(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    run = RunDir.create(folder_config(Path("data"), tmp_path / "run"))
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.root == str((tmp_path / "data").resolve())
    recorded = json.loads((tmp_path / "run" / "identity.json").read_text())
    assert recorded["data"]["root"] == saved.data.root == run.config.data.root


def test_reopening_a_run_whose_data_changed_is_refused_and_changes_nothing(tmp_path):
    """Case 4: a later command (knockout, bidir, umap, attention: all through RunDir.open)
    checks that the dataset it opens is the run's, even when started from elsewhere."""
    root = make_folder(tmp_path / "data")
    run = finished(folder_config(root, tmp_path / "run"))
    assert RunDir.open(run.path).config.data.root == str(root.resolve())  # unchanged: opens
    touch_later(root / "val" / "masks" / "img0.png", b"not the same mask")
    before = tree(run.path)
    with pytest.raises(ValueError) as error:
        RunDir.open(run.path)
    message = str(error.value)
    assert "the data or model differs from what it was made with" in message
    assert f"data.splits.val.files: {root.resolve()}/val/masks/img0.png changed (size" in message
    assert "restore the data and model the run was made with" in message
    assert tree(run.path) == before


def test_reopening_a_run_whose_model_folder_changed_is_refused(tmp_path):
    root = make_folder(tmp_path / "data")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    run = finished(folder_config(root, tmp_path / "run", **{"model.name": str(model)}))
    touch_later(model / "model.safetensors", b"other weights")
    with pytest.raises(
        ValueError, match=r"model\.identity\.files: \S*/model/model\.safetensors changed"
    ):
        RunDir.open(run.path)


def test_an_older_run_with_a_relative_root_and_no_identity_is_refused(tmp_path):
    root = make_folder(tmp_path / "data")
    run = finished(folder_config(root, tmp_path / "run"))
    (run.path / "identity.json").unlink()
    text = (run.path / "config.yaml").read_text().replace(str(root.resolve()), "data")
    (run.path / "config.yaml").write_text(text)
    with pytest.raises(ValueError, match=r"names the relative data.root 'data' .*absolute path"):
        RunDir.open(run.path)


def _interrupted(config) -> RunDir:
    """A run killed in its first epoch: identity, config and a checkpoint past the warm-up."""
    from seglens.checkpoint import Checkpointer
    from seglens.rundir.run import fingerprint

    run = RunDir.create(config)
    ckpt = Checkpointer(run.file("checkpoint"), fingerprint=fingerprint(run.config))
    ckpt.end("train.warmup", 4)
    ckpt.step("train.epoch0", 4, 4)
    ckpt.save()
    return run


@pytest.mark.parametrize(
    "change",
    ["data", "solver", "geometry", "min_valid"],
)
def test_a_refused_resume_changes_nothing(tmp_path, change):
    """Cases 2 and 5: --resume after the data or a setting changed is refused before anything
    is written (config.yaml is not rewritten with the refused settings)."""
    root = make_folder(tmp_path / "data")
    config = folder_config(root, tmp_path / "run")
    run = _interrupted(config)
    time.sleep(0.01)
    extra = {"resume": True}
    if change == "data":
        fixed = np.zeros((32, 32), dtype=np.uint8)  # a mask fixed between kill and resume
        Image.fromarray(fixed).save(root / "train" / "masks" / "img1.png")
    else:
        key, value = {
            "solver": ("probe.solver", "sgd"),
            "geometry": ("model.geometry", "resize"),
            "min_valid": ("data.min_valid", 0.9),
        }[change]
        extra[key] = value
    before = tree(run.path)
    with pytest.raises(ValueError, match=rf"cannot resume {run.path}") as error:
        RunDir.create(config.replace(**extra))
    assert tree(run.path) == before
    expected = {
        "data": "data.splits.train.files: " + f"{root.resolve()}/train/masks/img1.png changed",
        "solver": "probe.solver: 'lda' -> 'sgd'",
        "geometry": "model.geometry: None -> 'resize'",
        "min_valid": "data.min_valid: 0.5 -> 0.9",
    }[change]
    assert expected in str(error.value)
    assert "resume with the run's settings and data, or pass --overwrite" in str(error.value)


def test_a_refused_resume_at_the_cli_is_one_line_and_changes_nothing(tmp_path, capsys):
    from seglens.cli import main

    root = make_folder(tmp_path / "data")
    run = _interrupted(folder_config(root, tmp_path / "run"))
    before = tree(run.path)
    argv = ["probe", "--model", "tiny-clip", "--dataset", "folder", "--data-root", str(root)]
    argv += ["--out", str(run.path), "--solver", "sgd", "--bootstrap", "0", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "probe.solver: 'lda' -> 'sgd'" in err
    assert tree(run.path) == before


def test_a_matching_resume_is_accepted_and_rewrites_nothing(tmp_path):
    root = make_folder(tmp_path / "data")
    config = folder_config(root, tmp_path / "run")
    run = _interrupted(config)
    before = tree(run.path)
    again = RunDir.create(config.replace(resume=True, checkpoint_every=7))
    assert again.path == run.path and tree(run.path) == before


# --- the feature cache ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    from seglens.models import load_model

    return {g: load_model("tiny-clip", geometry=g) for g in ("pad", "resize")}


def _train(vlm, root: Path, cache: Path, caplog):
    from seglens.config import DataConfig, ProbeConfig
    from seglens.data import load_dataset
    from seglens.experiments.training import train_probes

    dataset = load_dataset("folder", str(root), "train")
    cfg = ProbeConfig(solver="lda", cache_dir=str(cache))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="seglens.cache"):
        bank = train_probes(
            vlm, dataset, ["adapter"], cfg, data_config=DataConfig(batch_size=4), progress=False
        )
    return bank, " | ".join(r.getMessage() for r in caplog.records)


def test_the_cache_is_reused_only_for_the_same_identity(tmp_path, models, caplog):
    """Case 1: a second dataset whose files have the same names, and another geometry, get
    entries of their own beside the first (never reused, never written over); the same
    identity is a hit."""
    cache = tmp_path / "cache"
    a = make_folder(tmp_path / "a", seed=0)
    b = make_folder(tmp_path / "b", seed=1)  # same file names, other pixels
    bank_a, log_a = _train(models["pad"], a, cache, caplog)
    assert "writing a new entry" in log_a
    entries = sorted((cache / "causal").iterdir())
    assert len(entries) == 1
    first = tree(entries[0])
    _, log_again = _train(models["pad"], a, cache, caplog)
    assert "reusing the feature cache" in log_again
    bank_b, log_b = _train(models["pad"], b, cache, caplog)
    assert "no entry in" in log_b and "differs: data.base" in log_b
    _, log_resize = _train(models["resize"], a, cache, caplog)
    assert "differs: model.geometry: 'pad' -> 'resize'" in log_resize
    assert len(list((cache / "causal").iterdir())) == 3
    assert tree(entries[0]) == first  # the first entry is untouched
    coef_a, coef_b = (bank.probes["adapter"].coef_ for bank in (bank_a, bank_b))
    assert not np.allclose(coef_a.numpy(), coef_b.numpy())


def test_an_altered_cache_entry_is_refused(tmp_path, models, caplog):
    cache = tmp_path / "cache"
    a = make_folder(tmp_path / "a")
    _train(models["pad"], a, cache, caplog)
    (manifest,) = (cache / "causal").glob("*/manifest.json")
    data = json.loads(manifest.read_text())
    data["source"]["condition"] = "bidirectional_image"
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"condition: 'bidirectional_image' -> 'causal'.*delete"):
        _train(models["pad"], a, cache, caplog)
