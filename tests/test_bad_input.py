"""Bad input at the command line, end to end: what the loader- and config-level tests
(test_io, test_datasets, test_config, test_knockout) do not already show. A bad sample stops the
run with one line naming the file, or is skipped and counted in ``results.json``; impossible
settings are refused naming the key and what is allowed. docs/robustness.md lists every case."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from seglens.cli import main
from seglens.data import load_dataset

CLASSES = ("sky", "tree", "road")
RUN = ["--model", "tiny-clip", "--dataset", "folder", "--solver", "lda", "--batch-size", "2"]
RUN += ["--bootstrap", "0", "--qualitative", "0", "--no-pixel-level"]


def _folder(root: Path, n: int = 6, classes=CLASSES, size=(40, 56)) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    h, w = size
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"img{i}.png"
        )
        labels = np.repeat(np.arange(len(classes), dtype=np.uint8), -(-h // len(classes)))[:h]
        Image.fromarray(np.repeat(labels[:, None], w, 1)).save(root / "masks" / f"img{i}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def _break(root: Path) -> None:
    """img1: a truncated PNG; img4: a mask of another size than its image."""
    image = root / "images" / "img1.png"
    image.write_bytes(image.read_bytes()[:200])
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "img4.png")


def _probe(tmp_path: Path, root: Path, *extra: str) -> int:
    return main(["probe", *RUN, "--data-root", str(root), "--out", str(tmp_path / "run"), *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error message"
    return err[-1]


# --- bad samples ---------------------------------------------------------------------------------
def test_bad_samples_are_skipped_and_counted_in_results(tmp_path):
    root = _folder(tmp_path / "data")
    _break(root)
    assert _probe(tmp_path, root, "--on-bad-sample", "skip") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    skipped = results["dataset"]["skipped"]
    assert skipped["count"] == 2
    names = dict(skipped["samples"])
    assert sorted(names) == ["img1", "img4"]
    assert "img1.png: cannot read this image" in names["img1"]
    assert "img4.png: mask is 10x10" in names["img4"]
    # A flat folder is divided (seeded): 5 train + 1 val images, 2 of the train images bad.
    assert (results["dataset"]["train_images"], results["dataset"]["eval_images"]) == (3, 1)


def test_a_bad_sample_stops_the_run_with_one_line_naming_the_file(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    _break(root)
    assert _probe(tmp_path, root) == 2
    line = _error(capsys)
    assert line.startswith("seglens probe: error: ")
    assert "img1.png: cannot read this image" in line and "--on-bad-sample skip" in line
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_mask_of_another_size_names_both_sizes(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(root / "masks" / "img2.png")
    assert _probe(tmp_path, root) == 2
    assert "img2.png: mask is 12x10" in _error(capsys)


# --- datasets ------------------------------------------------------------------------------------
def test_train_and_eval_splits_with_different_classes_are_refused(tmp_path, capsys):
    root = tmp_path / "data"
    _folder(root / "train")
    _folder(root / "val", classes=("sky", "tree"))
    assert _probe(tmp_path, root) == 2
    assert "train split has 3 classes, eval split 2" in _error(capsys)


def test_masks_without_images_are_reported(tmp_path, caplog):
    root = _folder(tmp_path / "data", n=3)
    (root / "images" / "img2.png").unlink()
    with caplog.at_level(logging.WARNING, logger="seglens.data.datasets"):
        assert len(load_dataset("folder", root, None)) == 2
    assert "1 masks in" in caplog.text and "have no image and are ignored (first: img2.png)" in (
        caplog.text
    )


def test_an_image_without_its_mask_is_refused_at_the_cli(tmp_path, capsys):
    root = _folder(tmp_path / "data", n=3)
    (root / "masks" / "img1.png").unlink()
    assert _probe(tmp_path, root) == 2
    line = _error(capsys)
    assert "img1.png has no mask" in line and "1 of 3 images lack a mask" in line


def test_a_missing_data_root_is_refused(tmp_path, capsys):
    assert _probe(tmp_path, tmp_path / "nowhere") == 2
    line = _error(capsys)
    assert "nowhere does not exist" in line and "Expected layout" in line


# --- impossible settings -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"probe": {"stages": ["llm.99"]}},
            r"unknown stage 'llm\.99'.* This model has: .*encoder, adapter, llm\.1\.\.llm\.4",
        ),
        ({"probe": {"holdout_fraction": 1.0}}, r"probe\.holdout_fraction=1\.0 must be in \[0, 1\)"),
        ({"probe": {"lrs": 0.01}}, r"config key 'probe\.lrs' must be a list, got 0\.01"),
        ({"data": {"limit_train": 0}}, r"data\.limit_train=0 must be >= 1"),
        ({"checkpoint_every": -1}, r"checkpoint_every=-1 must be >= 0"),
        ({"resume": True, "overwrite": True}, r"resume=True and overwrite=True contradict"),
        ({"modle": {}}, r"unknown config key 'modle' \(did you mean 'model'\?\)"),
    ],
)
def test_impossible_config_is_a_one_line_error_naming_the_key(tmp_path, capsys, config, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    root = _folder(tmp_path / "data", n=2)
    assert _probe(tmp_path, root, "--config", str(path)) == 2
    line = _error(capsys)
    assert line.startswith("seglens probe: error: ")
    assert re.search(message, line), line


def test_a_native_resolution_size_off_the_merge_unit_names_a_valid_one():
    """``config.seglens_image_size`` must be a multiple of patch x merge (28 here)."""
    from seglens.models.families.mistral3 import Mistral3Family, tiny_mistral3_hf
    from seglens.models.families.qwen2_vl import Qwen2VLFamily, tiny_qwen2_vl_hf

    for build, family in ((tiny_mistral3_hf, Mistral3Family), (tiny_qwen2_vl_hf, Qwen2VLFamily)):
        model, _ = build()
        model.config.seglens_image_size = 100
        with pytest.raises(ValueError, match=r"image size 100 must be .* = 28 .*e\.g\. 84\)"):
            family(model)
