"""``--dataset hf``: Hugging Face datasets on disk, read offline. Small local datasets in the
``scene_parse_150`` schema (image, annotation 0..150, scene_category) and a VOC parquet schema
(image, mask with 255 borders) must give the same images, masks and patch labels as the same
files in the raw folder layouts; every wrong setting fails naming the row, column and value."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglens.data import BadSampleError, Geometry, load_dataset, patch_labels
from seglens.data.datasets import VOC_CLASSES, voc_palette

datasets = pytest.importorskip("datasets")

SHAPES = ((40, 56), (48, 36), (33, 33))  # (H, W): landscape, portrait, square


def _jpeg(path: Path, seed: int, shape: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (shape[0] // 4 + 1, shape[1] // 4 + 1, 3), dtype=np.uint8)
    image = np.kron(small, np.ones((4, 4, 1), np.uint8))[: shape[0], : shape[1]]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=90)
    return path.read_bytes()


def _png(path: Path, labels: np.ndarray, palette: bool = False) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8))
    if palette:
        im.putpalette(voc_palette(256).reshape(-1).tolist())
    im.save(path)
    return path.read_bytes()


def _blocks(seed: int, shape: tuple[int, int], values: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.choice(values, size=(shape[0] // 8 + 1, shape[1] // 8 + 1))
    return np.kron(coarse, np.ones((8, 8), np.int64))[: shape[0], : shape[1]]


def _to_disk(table: dict[str, dict[str, list]], features, root: Path) -> tuple[Path, Path]:
    """The same rows as a save_to_disk DatasetDict and as a folder of per-split parquet files."""
    splits = {k: datasets.Dataset.from_dict(v, features=features) for k, v in table.items()}
    datasets.DatasetDict(splits).save_to_disk(str(root / "disk"))
    for name, split in splits.items():
        split.to_parquet(str(root / "parquet" / "data" / f"{name}-00000-of-00001.parquet"))
    return root / "disk", root / "parquet"


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    """Raw ADEChallengeData2016 folders and the same images in the scene_parse_150 schema."""
    tmp = tmp_path_factory.mktemp("ade")
    raw = tmp / "raw" / "ADEChallengeData2016"
    table: dict[str, dict[str, list]] = {}
    values = np.array([0, 1, 2, 13, 77, 150])  # 0 = other, up to the last class
    for split, folder, tag in (("train", "training", "train"), ("validation", "validation", "val")):
        rows = table.setdefault(split, {"image": [], "annotation": [], "scene_category": []})
        for i, shape in enumerate(SHAPES):
            stem = f"ADE_{tag}_{i + 1:08d}"
            seed = i + 100 * (split == "validation")
            image = _jpeg(raw / "images" / folder / f"{stem}.jpg", seed, shape)
            mask = _png(raw / "annotations" / folder / f"{stem}.png", _blocks(seed, shape, values))
            rows["image"].append({"bytes": image, "path": f"{stem}.jpg"})
            rows["annotation"].append({"bytes": mask, "path": f"{stem}.png"})
            rows["scene_category"].append(i % 2)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "annotation": datasets.Image(),
            "scene_category": datasets.ClassLabel(names=["bathroom", "bedroom"]),
        }
    )
    disk, parquet = _to_disk(table, features, tmp)
    return {"raw": raw.parent, "disk": disk, "parquet": parquet}


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """A raw VOC2012 folder and the same images as parquet (image, mask with 255 borders)."""
    tmp = tmp_path_factory.mktemp("voc")
    raw = tmp / "raw" / "VOC2012"
    table: dict[str, dict[str, list]] = {}
    for split in ("train", "val"):
        rows = table.setdefault(split, {"image": [], "mask": []})
        ids = []
        for i, shape in enumerate(SHAPES):
            stem = f"2007_{split}{i:02d}"
            ids.append(stem)
            labels = _blocks(i + 7 * (split == "val"), shape, np.array([0, 3, 15, 20]))
            labels[:2] = labels[-2:] = labels[:, :2] = 255  # object borders: ignore
            image = _jpeg(raw / "JPEGImages" / f"{stem}.jpg", i + 10 * (split == "val"), shape)
            mask = _png(raw / "SegmentationClass" / f"{stem}.png", labels, palette=True)
            rows["image"].append({"bytes": image, "path": f"{stem}.jpg"})
            rows["mask"].append({"bytes": mask, "path": None})
        lists = raw / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("\n".join(ids) + "\n")
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    folder = tmp / "parquet"
    folder.mkdir()
    for split, rows in table.items():
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            str(folder / f"{split}.parquet")
        )
    return {"raw": raw, "parquet": folder}


GEOMETRIES = [Geometry(mode, 28) for mode in ("pad", "crop", "resize")]


def _same_samples(hf, raw, grid=4) -> None:
    assert len(hf) == len(raw) and hf.class_names == raw.class_names
    for i in range(len(raw)):
        a, b = hf[i], raw[i]
        assert a.name == b.name
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        for geometry in GEOMETRIES:
            plan = geometry.plan(*b.mask.shape)
            labels_a, hist_a = patch_labels(plan.warp_mask(a.mask), grid, hf.num_classes)
            labels_b, hist_b = patch_labels(plan.warp_mask(b.mask), grid, raw.num_classes)
            np.testing.assert_array_equal(labels_a, labels_b)
            np.testing.assert_array_equal(hist_a, hist_b)
            assert (labels_b != 255).any()  # the comparison is not between two empty maps


@pytest.mark.parametrize("layout", ["disk", "parquet"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_scene_parse_150_equals_the_raw_ade20k_folder(ade, layout, split):
    hf = load_dataset("hf", ade[layout], split, reduce_zero_label=True, classes="ade20k")
    raw = load_dataset("ade20k", ade["raw"], split)
    assert hf.split == ("validation" if split == "val" else "train")
    _same_samples(hf, raw)
    assert set(np.unique(hf[0].mask)) <= {*range(150), 255}


def test_voc_parquet_equals_the_raw_voc_folder(voc):
    for split in ("train", "val"):
        hf = load_dataset("hf", voc["parquet"], split, classes="voc")
        _same_samples(hf, load_dataset("voc", voc["raw"], split))
        assert hf.label_column == "mask"  # recognised without being named


def test_one_parquet_file_and_a_classes_file_beside_it(voc, tmp_path):
    (voc["parquet"] / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    try:
        hf = load_dataset("hf", voc["parquet"] / "val.parquet", "val")
        assert hf.class_source == str(voc["parquet"] / "classes.txt")
        _same_samples(hf, load_dataset("voc", voc["raw"], "val"))
        with pytest.raises(ValueError, match=r"has no split 'train'; it holds only 'val'\. Train"):
            load_dataset("hf", voc["parquet"] / "val.parquet", "train")
    finally:
        (voc["parquet"] / "classes.txt").unlink()


def test_nothing_touches_the_network(ade, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for layout in ("disk", "parquet"):
        hf = load_dataset("hf", ade[layout], "val", reduce_zero_label=True, classes="ade20k")
        assert hf[0].mask.shape == SHAPES[0]
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_labels_outside_the_convention_name_row_column_and_value(ade):
    # scene_parse_150 read without reduce_zero_label: 150 is out of range, the hint says why
    hf = load_dataset("hf", ade["disk"], "train", classes="ade20k")
    bad = next(i for i in range(len(hf)) if 150 in _raw(ade, i))
    message = (
        rf"{ade['disk']} split 'train' row {bad}, column 'annotation': label value\(s\) \[150\] "
        r"are outside the convention \(labels as stored with 150 classes from the ade20k class "
        r"names allows 0\.\.149 and 255 \(ignore\)\)\. Values run up to 150: if 0 means 'other' "
        r"\(ADE20K-style\), set data\.hf_reduce_zero_label: true"
    )
    with pytest.raises(BadSampleError, match=message):
        hf[bad]
    voc_names = load_dataset("hf", ade["parquet"], "train", reduce_zero_label=True, classes="voc")
    with pytest.raises(
        BadSampleError, match=r"row \d, column 'annotation': label value\(s\) \[(77|150)"
    ):
        next(voc_names[i] for i in range(len(voc_names)))


def _raw(ade, i: int) -> set[int]:
    path = sorted((ade["raw"] / "ADEChallengeData2016/annotations/training").glob("*.png"))[i]
    return set(np.unique(np.asarray(Image.open(path))).tolist())


def test_bad_rows_are_skipped_and_counted_by_the_stream(ade):
    from seglens.data import iterate_samples

    hf = load_dataset("hf", ade["disk"], "train", classes="ade20k")  # 150s are bad without reduce
    stream = iterate_samples(hf, batch_size=2, on_bad_sample="skip", progress=False)
    kept = [s.name for batch in stream for s in batch]
    bad = [i for i in range(len(hf)) if 150 in _raw(ade, i)]
    assert len(stream.skipped) == len(bad) > 0
    assert len(kept) == len(hf) - len(bad)


def test_class_names_from_a_class_label_of_the_label_column(tmp_path):
    """A label map stored as a 2D list of ClassLabel ids carries its own class names."""
    names = ["road", "car", "sky"]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.List(datasets.List(datasets.ClassLabel(names=names))),
        }
    )
    labels = np.array([[0, 1, 2, 2], [1, 1, 0, 0], [2, 2, 2, 1]])
    image = _jpeg(tmp_path / "x.jpg", 0, (3, 4))
    rows = {"image": [{"bytes": image, "path": None}] * 2, "label": [labels.tolist()] * 2}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows, features=features)}
    ).save_to_disk(str(tmp_path / "d"))
    hf = load_dataset("hf", tmp_path / "d", "train")
    assert hf.class_names == names and hf.class_source == "the ClassLabel of column 'label'"
    np.testing.assert_array_equal(hf[1].mask, labels)
    assert [hf.name_of(i) for i in range(2)] == ["train-000000", "train-000001"]


def test_class_names_from_id2label_json(voc, tmp_path):
    mapping = {str(i): name for i, name in enumerate(VOC_CLASSES)}
    (voc["parquet"] / "id2label.json").write_text(json.dumps(mapping))
    try:
        assert load_dataset("hf", voc["parquet"], "train").class_names == list(VOC_CLASSES)
        (voc["parquet"] / "id2label.json").write_text(json.dumps({"0": "a", "2": "b"}))
        with pytest.raises(ValueError, match=r"id2label\.json maps ids \[0, 2\].* without gaps"):
            load_dataset("hf", voc["parquet"], "train")
        (voc["parquet"] / "id2label.json").write_text(json.dumps(["a", "b"]))
        with pytest.raises(ValueError, match=r"id2label\.json is not an id2label mapping"):
            load_dataset("hf", voc["parquet"], "train")
    finally:
        (voc["parquet"] / "id2label.json").unlink()


@pytest.mark.parametrize(
    ("options", "split", "message"),
    [
        (
            {"classes": "ade20k", "image_column": "img"},
            "train",
            r"split 'train' has no image column 'img'; its columns are \['image', 'annotation', "
            r"'scene_category'\]\. Set data\.hf_image_column \(--hf-image-column\)",
        ),
        (
            {"classes": "ade20k", "label_column": "scene_category"},
            "train",
            r"column 'scene_category' of .* is a ClassLabel \(one class per image: a "
            r"classification dataset\); seglens needs a per-pixel label map",
        ),
        (
            {},
            "train",
            r"no class names for .*disk: column 'annotation' holds no ClassLabel and there is no "
            r"classes\.txt or id2label\.json beside the data\. Write .*classes\.txt .* or set "
            r"data\.hf_classes \(--hf-classes\) .* The columns are scene_parse_150's \(ADE20K\): "
            r"pass --hf-classes ade20k --hf-reduce-zero-label\.",
        ),
        (
            {"classes": "ade20k"},
            "test",
            r"has no split 'test'; it holds 'train', 'validation'\. Pass --train-split",
        ),
        (
            {"classes": "nowhere.txt"},
            "train",
            r"data\.hf_classes='nowhere\.txt' is neither a file nor one of \['ade20k'",
        ),
    ],
)
def test_wrong_settings_are_refused_with_the_fix(ade, options, split, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_dataset("hf", ade["disk"], split, **options)


def test_a_single_dataset_serves_only_its_own_split(tmp_path):
    rows = {"image": [{"bytes": _jpeg(tmp_path / "x.jpg", 0, (8, 8)), "path": None}]}
    rows["annotation"] = [{"bytes": _png(tmp_path / "m.png", np.zeros((8, 8))), "path": None}]
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "one"))
    (tmp_path / "one" / "classes.txt").write_text("thing\n")
    assert len(load_dataset("hf", tmp_path / "one", "train")) == 1
    with pytest.raises(ValueError, match=r"holds only 'train'\. Training and evaluation need two"):
        load_dataset("hf", tmp_path / "one", "val")


def test_a_folder_without_a_dataset_or_a_zip_says_what_is_wrong(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds neither a save_to_disk dataset"):
        load_dataset("hf", tmp_path / "empty")
    zipped = tmp_path / "ade.zip"
    import zipfile

    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(ValueError, match=r"ade\.zip is a zip archive, not a folder\. Unzip it"):
        load_dataset("hf", zipped)


def test_missing_datasets_library_says_how_to_install_it(ade, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    message = r"needs the Hugging Face datasets library, which is not installed: pip install 's"
    with pytest.raises(ValueError, match=message):
        load_dataset("hf", ade["disk"], "train")
    with pytest.raises(ValueError, match=r"pip install 'seglens\[hf\]'"):
        load_dataset("hf", ade["parquet"], "train")


def test_exif_convention_holds_for_rows_too(tmp_path):
    stored = np.zeros((16, 24, 3), np.uint8)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", exif=exif.tobytes())
    rows = {"image": [{"bytes": buffer.getvalue(), "path": None}]}
    rows["annotation"] = [{"bytes": _png(tmp_path / "m.png", np.zeros((16, 24))), "path": None}]
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    (tmp_path / "classes.txt").write_text("thing\n")
    hf = load_dataset("hf", tmp_path / "train.parquet")
    with pytest.raises(BadSampleError, match=r"row 0, column 'annotation': mask is 24x16 .* EXIF"):
        hf[0]


@pytest.mark.slow
def test_probe_runs_on_an_hf_dataset_from_the_cli(ade, tmp_path, caplog):
    """End to end: the --hf-* flags reach the loader and a run records the hf dataset."""
    from seglens.cli import main

    argv = ["probe", "--model", "tiny-clip", "--dataset", "hf", "--data-root", str(ade["disk"])]
    argv += ["--hf-reduce-zero-label", "--hf-classes", "ade20k", "--solver", "lda"]
    argv += ["--bootstrap", "0", "--qualitative", "0", "--no-pixel-level"]
    with caplog.at_level(logging.INFO):
        assert main([*argv, "--batch-size", "3", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["dataset"]["name"] == "hf"
    assert results["dataset"]["num_classes"] == 150
    assert (results["dataset"]["train_images"], results["dataset"]["eval_images"]) == (3, 3)


def test_the_run_identity_sees_which_files_a_split_reads(ade, voc, tmp_path):
    from seglens.rundir.identity import dataset_identity

    def identity(root, split="train", **options):
        return dataset_identity(load_dataset("hf", root, split, **options))

    for layout in ("disk", "parquet"):
        same = identity(ade[layout], classes="ade20k")
        assert same == identity(ade[layout], classes="ade20k")
        assert same != identity(ade[layout], "val", classes="ade20k")
    # a dataset with the same row count and columns, other files: another identity
    assert identity(ade["parquet"], classes="voc") != identity(voc["parquet"], classes="voc")
    copy = tmp_path / "voc_train.parquet"
    copy.write_bytes((voc["parquet"] / "train.parquet").read_bytes())
    before = identity(copy, classes="voc")
    os.utime(copy, ns=(1, 1))  # the same rows, touched: the fingerprint notices
    assert identity(copy, classes="voc") != before


@pytest.mark.parametrize("layout", ["disk", "parquet"])
def test_worker_processes_read_the_same_rows(ade, layout):
    from seglens.data import iterate_samples

    hf = load_dataset("hf", ade[layout], "train", reduce_zero_label=True, classes="ade20k")

    def run(workers):
        stream = iterate_samples(hf, batch_size=2, num_workers=workers, progress=False)
        return [(s.name, s.mask.tobytes(), s.image.tobytes()) for b in stream for s in b]

    assert run(2) == run(0)


@pytest.mark.parametrize(
    ("path", "split"),
    [
        ("data/train-00000-of-00002.parquet", "train"),
        ("data/validation-00001-of-00002.parquet", "validation"),
        ("default/train/0000.parquet", "train"),
        ("ade20k_validation.parquet", "validation"),
        ("scene_parse_150-test.parquet", "test"),
        ("shard.parquet", "shard"),
    ],
)
def test_parquet_file_names_give_their_split(path, split):
    from seglens.data.hf import _split_of_file

    assert _split_of_file(Path(path)) == split


def test_dataset_options_of_another_dataset_are_refused():
    from seglens.config import DataConfig

    with pytest.raises(
        ValueError, match=r"data\.hf_classes='ade20k' applies to --dataset hf only, "
    ):
        DataConfig(dataset="folder", hf_classes="ade20k")
    with pytest.raises(ValueError, match=r"data\.folder_val_fraction=0\.5 applies to --dataset fo"):
        DataConfig(dataset="hf", folder_val_fraction=0.5)
    assert DataConfig(dataset="HF", hf_reduce_zero_label=True).hf_reduce_zero_label


def test_data_config_options_reach_the_loader(ade):
    from seglens.config import DataConfig
    from seglens.experiments.common import build_dataset

    config = DataConfig(
        dataset="hf", root=str(ade["parquet"]), hf_reduce_zero_label=True, hf_classes="ade20k"
    )
    hf = build_dataset(config, "val", 2)
    assert (len(hf), hf.reduce_zero_label, hf.class_source) == (2, True, "the ade20k class names")
    assert hf.label_column == "annotation" and hf.image_column == "image"
