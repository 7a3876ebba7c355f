"""Dataset loaders on tiny fixtures in each dataset's real layout, the registry, the synthetic
dataset, sharding, and the streaming loader's bad-sample policies."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seglens.data import (
    DATASETS,
    IGNORE_INDEX,
    BadSampleError,
    SyntheticDataset,
    iterate_samples,
    load_dataset,
)
from seglens.data.datasets import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    COCO_STUFF_CLASSES,
    VOC_CLASSES,
    voc_palette,
)
from seglens.data.io import check_exif_fit, read_mask
from seglens.data.synthetic import class_colours

H, W = 6, 8


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _save_image(path: Path, image: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_image() if image is None else image).save(path)


def _save_mask(path: Path, labels: np.ndarray, palette: bool = False) -> None:
    """8-bit grayscale PNG, or a palette PNG (indices + VOC colours) as VOC stores them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(labels.astype(np.uint8))
    if palette:
        im.putpalette(voc_palette(256).reshape(-1).tolist())
        assert im.mode == "P"
    im.save(path)


def _labels(*values: int) -> np.ndarray:
    """(H, W) label map whose first row starts with ``values``, the rest the first value."""
    labels = np.full((H, W), values[0], dtype=np.int64)
    labels[0, : len(values)] = values
    return labels


# ---------------------------------------------------------------- ADE20K


def _ade(root: Path, split: str = "training", n: int = 2, raw: np.ndarray | None = None) -> Path:
    base = root / "ADEChallengeData2016"
    for i in range(n):
        stem = f"ADE_{split[:5]}_{i:08d}"
        _save_image(base / "images" / split / f"{stem}.jpg")
        _save_mask(
            base / "annotations" / split / f"{stem}.png", _labels(0, 1, 150) if raw is None else raw
        )
    return base


def test_ade20k_remaps_zero_to_ignore_and_shifts(tmp_path):
    _ade(tmp_path)
    ds = load_dataset("ade20k", tmp_path, "train")
    assert len(ds) == 2
    assert ds.num_classes == 150 == len(ADE20K_CLASSES)
    assert ds.class_names[0] == "wall"
    assert ds.class_names[-1] == "flag"
    sample = ds[0]
    assert sample.name == "ADE_train_00000000"
    assert sample.image.shape == (H, W, 3)
    assert sample.mask.dtype == np.int64
    np.testing.assert_array_equal(sample.mask[0, :3], [IGNORE_INDEX, 0, 149])
    assert (sample.mask[1:] == IGNORE_INDEX).all()


def test_ade20k_accepts_the_challenge_folder_and_split_aliases(tmp_path):
    base = _ade(tmp_path, split="validation", n=3)
    assert len(load_dataset("ade20k", base, "val")) == 3
    assert len(load_dataset("ADE20K", tmp_path, "validation")) == 3


def test_ade20k_rejects_raw_ids_above_150(tmp_path):
    _ade(tmp_path, n=1, raw=_labels(0, 151))
    ds = load_dataset("ade20k", tmp_path)
    with pytest.raises(BadSampleError, match=r"ADE_train_00000000\.png: raw label values \[151\]"):
        ds[0]


def test_ade20k_missing_split_folder_names_the_path(tmp_path):
    _ade(tmp_path, split="training")
    expected = tmp_path / "ADEChallengeData2016" / "images" / "validation"
    with pytest.raises(FileNotFoundError, match=f"{expected}.*Expected layout"):
        load_dataset("ade20k", tmp_path, "val")


def test_ade20k_unknown_split(tmp_path):
    _ade(tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'test'"):
        load_dataset("ade20k", tmp_path, "test")


def test_ade20k_image_without_mask_names_it(tmp_path):
    base = _ade(tmp_path, n=2)
    (base / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ADE_train_00000001\.jpg has no mask .*1 of 2"):
        load_dataset("ade20k", tmp_path)


def test_ade20k_unreadable_image_names_it(tmp_path):
    base = _ade(tmp_path, n=1)
    (base / "images" / "training" / "ADE_train_00000000.jpg").write_bytes(b"\xff\xd8 broken")
    ds = load_dataset("ade20k", tmp_path)
    with pytest.raises(BadSampleError, match=r"ADE_train_00000000\.jpg: cannot read this image"):
        ds[0]


def test_empty_dataset_names_the_folder(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    (base / "images" / "training").mkdir(parents=True)
    (base / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"no images .* in {base / 'images' / 'training'}"):
        load_dataset("ade20k", tmp_path)


# ---------------------------------------------------------------- Pascal VOC


def _voc(root: Path, ids=("2007_000032", "2007_000039"), split: str = "train") -> Path:
    base = root / "VOCdevkit" / "VOC2012"
    for i in ids:
        _save_image(base / "JPEGImages" / f"{i}.jpg")
        _save_mask(base / "SegmentationClass" / f"{i}.png", _labels(0, 15, 255, 20), palette=True)
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return base


def test_voc_reads_palette_indices_with_boundary_ignore(tmp_path):
    _voc(tmp_path)
    ds = load_dataset("voc", tmp_path, "train")
    assert len(ds) == 2
    assert ds.class_names == list(VOC_CLASSES)
    assert ds.num_classes == 21
    np.testing.assert_array_equal(ds.palette[:3], [[0, 0, 0], [128, 0, 0], [0, 128, 0]])
    sample = ds[0]
    assert sample.name == "2007_000032"
    np.testing.assert_array_equal(sample.mask[0, :4], [0, 15, IGNORE_INDEX, 20])


def test_voc_accepts_voc2012_and_the_folder_itself(tmp_path):
    base = _voc(tmp_path)
    assert len(load_dataset("voc", base, "train")) == 2
    assert len(load_dataset("voc", base.parent, "train")) == 2


def test_voc_missing_split_list_names_it(tmp_path):
    base = _voc(tmp_path)
    expected = base / "ImageSets" / "Segmentation" / "val.txt"
    with pytest.raises(FileNotFoundError, match=f"split list {expected} not found"):
        load_dataset("voc", tmp_path, "val")


def test_voc_label_out_of_range(tmp_path):
    base = _voc(tmp_path, ids=("a",))
    _save_mask(base / "SegmentationClass" / "a.png", _labels(0, 21), palette=True)
    with pytest.raises(BadSampleError, match=r"a\.png: label values \[21\] are outside 0\.\.20"):
        load_dataset("voc", tmp_path)[0]


# ---------------------------------------------------------------- Cityscapes


def _cityscapes(root: Path, split: str = "val") -> None:
    for city, n in (("frankfurt", 1), ("lindau", 2)):
        for i in range(n):
            stem = f"{city}_000000_{i:06d}"
            _save_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            _save_mask(
                root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                _labels(7, 26, 33, 0, 6, 19, 31),
            )


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    _cityscapes(tmp_path)
    ds = load_dataset("cityscapes", tmp_path, "val")
    assert len(ds) == 3
    assert ds.num_classes == 19 == len(CITYSCAPES_CLASSES)
    assert ds.class_names[13] == "car"
    np.testing.assert_array_equal(ds.palette[0], [128, 64, 128])
    sample = ds[0]
    assert sample.name == "frankfurt_000000_000000"
    # road 7 -> 0, car 26 -> 13, bicycle 33 -> 18, unlabeled 0 and ground 6 -> ignore,
    # traffic light 19 -> 6, train 31 -> 16.
    np.testing.assert_array_equal(sample.mask[0, :7], [0, 13, 18, 255, 255, 6, 16])
    assert [ds.name_of(i) for i in range(3)] == [
        "frankfurt_000000_000000",
        "lindau_000000_000000",
        "lindau_000000_000001",
    ]


def test_cityscapes_missing_split_folder(tmp_path):
    _cityscapes(tmp_path, split="val")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'leftImg8bit' / 'train'} not found"):
        load_dataset("cityscapes", tmp_path, "train")


# ---------------------------------------------------------------- COCO-Stuff


def test_coco_stuff_drops_unused_thing_ids(tmp_path):
    _save_image(tmp_path / "images" / "val2017" / "000000000139.jpg")
    raw = _labels(0, 11, 12, 90, 91, 181, 182, 255)
    _save_mask(tmp_path / "annotations" / "val2017" / "000000000139.png", raw)
    ds = load_dataset("coco_stuff", tmp_path, "val")
    assert ds.num_classes == 171 == len(COCO_STUFF_CLASSES)
    assert ds.class_names[:2] == ["person", "bicycle"]
    assert ds.class_names[79:81] == ["toothbrush", "banner"]
    # 0 person -> 0; 11 (street sign, unused) -> 255; 12 stop sign -> 11; 90 (hair brush,
    # unused) -> 255; 91 banner -> 80; 181 wood -> 170; 182 and 255 -> ignore.
    np.testing.assert_array_equal(ds[0].mask[0], [0, 255, 11, 255, 80, 170, 255, 255])


def test_coco_stuff_image_without_mask(tmp_path):
    _save_image(tmp_path / "images" / "train2017" / "1.jpg")
    (tmp_path / "annotations" / "train2017").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"1\.jpg has no mask .*1\.png"):
        load_dataset("coco-stuff", tmp_path, "train")


# ---------------------------------------------------------------- generic folder


def _folder(root: Path, n: int = 3, classes=("sky", "tree", "road")) -> Path:
    for i in range(n):
        _save_image(root / "images" / f"img{i}.jpg")
        _save_mask(root / "masks" / f"img{i}.png", _labels(0, 1, 2, 255))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_folder_reads_images_masks_and_classes(tmp_path):
    _folder(tmp_path)
    ds = load_dataset("folder", tmp_path, None)
    assert len(ds) == 3
    assert ds.class_names == ["sky", "tree", "road"]
    assert ds.palette.shape == (3, 3)
    np.testing.assert_array_equal(ds[1].mask[0, :4], [0, 1, 2, 255])
    assert ds[1].name == "img1"


def test_folder_uses_the_split_subfolder(tmp_path):
    _folder(tmp_path / "val", n=2)
    _folder(tmp_path, n=3)
    assert len(load_dataset("folder", tmp_path, "val")) == 2
    assert len(load_dataset("folder", tmp_path, "train")) == 3


def test_folder_label_out_of_range(tmp_path):
    _folder(tmp_path, n=1)
    _save_mask(tmp_path / "masks" / "img0.png", _labels(0, 5, 7))
    with pytest.raises(
        BadSampleError, match=r"img0\.png: label values \[5, 7\] are outside 0\.\.2"
    ):
        load_dataset("folder", tmp_path, None)[0]


def test_folder_mask_of_another_size(tmp_path):
    _folder(tmp_path, n=1)
    _save_mask(tmp_path / "masks" / "img0.png", np.zeros((H + 1, W), np.uint8))
    with pytest.raises(BadSampleError, match=r"img0\.png: mask is 8x7 .* image is 8x6"):
        load_dataset("folder", tmp_path, None)[0]


def test_folder_colour_mask_is_rejected(tmp_path):
    _folder(tmp_path, n=1)
    Image.fromarray(_image()).save(tmp_path / "masks" / "img0.png")
    with pytest.raises(BadSampleError, match=r"img0\.png: .*single-channel label maps"):
        load_dataset("folder", tmp_path, None)[0]


def test_folder_without_classes_file(tmp_path):
    _folder(tmp_path, n=1)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"classes\.txt not found"):
        load_dataset("folder", tmp_path)


# ---------------------------------------------------------------- registry


def test_registry_names():
    assert set(DATASETS) == {
        "ade20k",
        "voc",
        "cityscapes",
        "coco-stuff",
        "folder",
        "hf",
        "synthetic",
        "organism",
    }


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(ValueError, match=r"unknown dataset 'ade20' \(did you mean 'ade20k'\?\)"):
        load_dataset("ade20")
    with pytest.raises(ValueError, match=r"Known datasets: ade20k, voc, cityscapes"):
        load_dataset("imagenet")


def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match=r"'voc' needs a root folder"):
        load_dataset("voc")
    with pytest.raises(FileNotFoundError, match=f"dataset root {tmp_path / 'nowhere'} does not"):
        load_dataset("voc", tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"takes no root"):
        load_dataset("synthetic", tmp_path)


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_varies_with_seed_and_split():
    a = load_dataset("synthetic", split="train", num_images=3, seed=1)
    b = SyntheticDataset(num_images=3, seed=1, split="train")
    np.testing.assert_array_equal(a[2].image, b[2].image)
    np.testing.assert_array_equal(a[2].mask, b[2].mask)
    other_seed = SyntheticDataset(num_images=3, seed=2, split="train")[2]
    other_split = SyntheticDataset(num_images=3, seed=1, split="val")[2]
    assert not np.array_equal(a[2].image, other_seed.image)
    assert not np.array_equal(a[2].image, other_split.image)
    assert a[2].name == "synthetic-train-00002"


def test_synthetic_sizes_and_range():
    ds = SyntheticDataset(num_images=4, num_classes=5, size=(50, 70))
    assert ds.class_names[:2] == ["grass", "gravel"]
    assert ds.palette.shape == (5, 3)
    for sample in ds:
        assert sample.image.shape == (50, 70, 3)
        assert sample.image.dtype == np.uint8
        assert sample.mask.shape == (50, 70)
        assert sample.mask.min() >= 0
        assert sample.mask.max() < 5
    assert SyntheticDataset()[0].image.shape == (180, 240, 3)


def test_synthetic_regions_carry_their_class_colour():
    # The mask is exact: every region's mean colour points towards its own class tint.
    ds = SyntheticDataset(num_images=6, num_classes=6, seed=3)
    tints = class_colours(6)
    tints = tints / np.linalg.norm(tints, axis=1, keepdims=True)
    checked = 0
    for sample in ds:
        for k in np.unique(sample.mask):
            region = sample.image[sample.mask == k].astype(np.float64)
            if len(region) < 100:
                continue
            direction = region.mean(axis=0) - 0.12 * 255
            assert int(np.argmax(tints @ direction)) == k
            checked += 1
    assert checked >= 10


def test_synthetic_rejects_bad_options():
    with pytest.raises(ValueError, match=r"num_classes=40 must be in 2\.\.12"):
        SyntheticDataset(num_classes=40)
    with pytest.raises(ValueError, match=r"num_images=0"):
        SyntheticDataset(num_images=0)


def test_shards_are_disjoint_and_cover():
    ds = SyntheticDataset(num_images=10)
    names = [ds.name_of(i) for i in range(len(ds))]
    shards = [ds.shard(rank, 3) for rank in range(3)]
    seen = [s.name_of(i) for s in shards for i in range(len(s))]
    assert sorted(seen) == sorted(names)
    assert len(set(seen)) == len(seen)
    assert [len(s) for s in shards] == [4, 3, 3]
    assert shards[1][0].name == ds[1].name


# ---------------------------------------------------------------- streaming loader


def _name_and_sum(sample):
    """A picklable transform, run in the workers."""
    return sample.name, int(sample.mask.sum()), int(sample.image.sum())


def test_loader_order_does_not_depend_on_workers():
    ds = SyntheticDataset(num_images=7, size=(24, 32))
    serial = list(iterate_samples(ds, batch_size=3, transform=_name_and_sum, progress=False))
    parallel = list(
        iterate_samples(ds, batch_size=3, num_workers=2, transform=_name_and_sum, progress=False)
    )
    assert [len(b) for b in serial] == [3, 3, 1]
    assert serial == parallel


def _folder_with_bad_files(root: Path) -> Path:
    _folder(root, n=4)
    (root / "images" / "img1.jpg").write_bytes(b"not an image")
    _save_mask(root / "masks" / "img3.png", _labels(0, 9))
    return root


def test_loader_skip_counts_and_names_bad_samples(tmp_path):
    ds = load_dataset("folder", _folder_with_bad_files(tmp_path), None)
    stream = iterate_samples(ds, batch_size=1, on_bad_sample="skip", progress=False)
    batches = list(stream)
    assert [[s.name for s in b] for b in batches] == [["img0"], ["img2"]]  # no empty batches
    assert [name for name, _ in stream.skipped] == ["img1", "img3"]
    assert "img1.jpg: cannot read this image" in stream.skipped[0][1]
    assert "label values [9]" in stream.skipped[1][1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_error_surfaces_the_original_message(tmp_path, num_workers):
    ds = load_dataset("folder", _folder_with_bad_files(tmp_path), None)
    stream = iterate_samples(ds, batch_size=2, num_workers=num_workers, progress=False)
    with pytest.raises(BadSampleError, match=r"^\S*img1\.jpg: cannot read this image"):
        list(stream)


def test_loader_rejects_bad_options():
    ds = SyntheticDataset(num_images=2)
    with pytest.raises(ValueError, match=r"on_bad_sample='ignore' must be one of"):
        iterate_samples(ds, batch_size=1, on_bad_sample="ignore")
    with pytest.raises(ValueError, match=r"batch_size=0"):
        iterate_samples(ds, batch_size=0)


# ---------------------------------------------------------------- flat folder: seeded split


def test_flat_folder_divides_into_disjoint_seeded_train_and_val(tmp_path):
    _folder(tmp_path, n=10)
    train = load_dataset("folder", tmp_path, "train")
    val = load_dataset("folder", tmp_path, "validation")
    names = lambda ds: [ds.name_of(i) for i in range(len(ds))]  # noqa: E731
    assert (len(train), len(val)) == (8, 2)  # round(0.2 * 10) in val
    assert not set(names(train)) & set(names(val))
    assert sorted(names(train) + names(val)) == sorted(f"img{i}" for i in range(10))
    assert names(train) == sorted(names(train))  # each part keeps the sorted order
    assert names(val) == names(load_dataset("folder", tmp_path, "val"))  # same seed, same part
    assert train.division == {"val_fraction": 0.2, "seed": 0}
    parts = {tuple(names(load_dataset("folder", tmp_path, "val", split_seed=s))) for s in range(6)}
    assert len(parts) > 1  # the seed draws the part
    assert len(load_dataset("folder", tmp_path, "val", val_fraction=0.5)) == 5
    assert len(load_dataset("folder", tmp_path, None)) == 10


def test_flat_folder_split_follows_the_data_config(tmp_path):
    from seglens.config import DataConfig
    from seglens.experiments.common import build_dataset

    _folder(tmp_path, n=10)
    config = DataConfig(dataset="folder", root=str(tmp_path), folder_val_fraction=0.3)
    config = dataclasses.replace(config, folder_split_seed=4)
    train, val = build_dataset(config, "train", None), build_dataset(config, "val", None)
    expected = load_dataset("folder", tmp_path, "val", val_fraction=0.3, split_seed=4)
    assert [val.name_of(i) for i in range(3)] == [expected.name_of(i) for i in range(3)]
    assert (len(train), len(val)) == (7, 3)
    with pytest.raises(ValueError, match=r"data\.folder_val_fraction=0\.0 must be in \(0, 1\)"):
        DataConfig(dataset="folder", folder_val_fraction=0.0)


def test_flat_folder_refusals_say_how_to_lay_out_train_and_val(tmp_path):
    _folder(tmp_path, n=1)
    layout = rf"lay out {tmp_path}/train/\{{images,masks\}} and {tmp_path}/val/"
    with pytest.raises(ValueError, match=rf"holds 1 image\(s\): too few .*{layout}"):
        load_dataset("folder", tmp_path, "train")
    _folder(tmp_path, n=3)
    with pytest.raises(
        ValueError, match=rf"split 'test', and a flat folder only divides .*{layout}"
    ):
        load_dataset("folder", tmp_path, "test")
    with pytest.raises(ValueError, match=rf"folder_val_fraction=1\.0 leaves no .*{layout}"):
        load_dataset("folder", tmp_path, "val", val_fraction=1.0)


def test_folder_with_train_and_val_folders_is_not_divided(tmp_path):
    _folder(tmp_path / "train", n=3)
    _folder(tmp_path / "val", n=2)
    train, val = load_dataset("folder", tmp_path, "train"), load_dataset("folder", tmp_path, "val")
    assert (len(train), len(val), train.division, val.division) == (3, 2, None, None)


# ---------------------------------------------------------------- a file as the root


def test_a_zip_or_other_file_as_root_says_what_it_is_and_how_to_fix_it(tmp_path):
    _folder(tmp_path / "data", n=2)
    archive = shutil.make_archive(str(tmp_path / "data"), "zip", tmp_path / "data")
    with pytest.raises(ValueError, match=r"data\.zip is a zip archive, not a folder\. Unzip it "):
        load_dataset("folder", archive)
    with pytest.raises(ValueError, match=rf"unzip {archive} -d {tmp_path / 'data'}\) and pass"):
        load_dataset("ade20k", archive)
    tarball = shutil.make_archive(str(tmp_path / "voc"), "gztar", tmp_path / "data")
    with pytest.raises(ValueError, match=r"voc\.tar\.gz is a tar archive, not a folder. Extract"):
        load_dataset("voc", tarball)
    with pytest.raises(ValueError, match=r"classes\.txt is a file, not a folder. Pass the folder"):
        load_dataset("folder", tmp_path / "data" / "classes.txt")


# ---------------------------------------------------------------- EXIF orientation


def _exif_image(path: Path, stored: np.ndarray, orientation: int) -> None:
    """Save ``stored`` pixels (JPEG or PNG by suffix) with an EXIF orientation tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes(), **({"quality": 95} if path.suffix == ".jpg" else {}))


def _exif_folder(root: Path, suffix: str, shape: tuple[int, int], orientation: int) -> Path:
    """A folder of one EXIF-tagged image and a mask drawn on the stored pixels."""
    h, w = shape
    stored = np.zeros((h, w, 3), np.uint8)
    stored[: h // 2] = 200
    _exif_image(root / "images" / f"img0{suffix}", stored, orientation)
    labels = np.zeros((h, w), np.uint8)
    labels[: h // 2] = 1
    _save_mask(root / "masks" / "img0.png", labels)
    (root / "classes.txt").write_text("floor\nsky\n")
    return root


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_rotated_image_with_a_mask_of_the_stored_pixels_is_refused(tmp_path, suffix):
    root = _exif_folder(tmp_path, suffix, (16, 24), orientation=6)
    ds = load_dataset("folder", root, None)
    message = (
        rf"img0\.png: mask is 24x16 \(WxH\), the size of its image \S*img0\{suffix} as stored, "
        r"but the image carries EXIF orientation 6 and is read upright as 16x24\. seglens takes "
        r"masks as drawn on the upright image \(PIL's ImageOps\.exif_transpose\)"
    )
    with pytest.raises(BadSampleError, match=message):
        ds[0]


def test_exif_rotated_image_with_a_mask_drawn_upright_is_read_as_drawn(tmp_path):
    root = _exif_folder(tmp_path, ".jpg", (16, 24), orientation=6)
    upright = np.rot90(read_mask(root / "masks" / "img0.png"), k=-1)  # 6: 90 degrees clockwise
    _save_mask(root / "masks" / "img0.png", upright)
    sample = load_dataset("folder", root, None)[0]
    assert sample.image.shape == (24, 16, 3) and sample.notes == ()
    np.testing.assert_array_equal(sample.mask, upright)
    # the image turned the same way: its bright half lies where the mask's class 1 does
    assert sample.image[sample.mask == 1].mean() > 150 > sample.image[sample.mask == 0].mean()


@pytest.mark.parametrize(
    ("suffix", "shape", "orientation"),
    [(".jpg", (16, 16), 6), (".png", (16, 16), 8), (".jpg", (16, 24), 3), (".png", (16, 24), 2)],
)
def test_exif_orientation_that_cannot_be_checked_is_counted_and_warned(
    tmp_path, caplog, suffix, shape, orientation
):
    """A square image turned by 90 degrees, or any image turned by 180 or mirrored: the mask fits
    both readings, so the sample is kept (mask as drawn on the upright image) and counted."""
    root = _exif_folder(tmp_path, suffix, shape, orientation)
    _folder(tmp_path / "plain", n=2)
    for name in ("img0.jpg", "img1.jpg"):
        shutil.copy(tmp_path / "plain" / "images" / name, root / "images" / f"plain_{name}")
    for name in ("img0.png", "img1.png"):
        mask = read_mask(tmp_path / "plain" / "masks" / name).clip(0, 1)
        _save_mask(root / "masks" / f"plain_{name}", mask)
    ds = load_dataset("folder", root, None)
    assert "EXIF orientation" in ds[0].notes[0]
    stream = iterate_samples(ds, batch_size=2, progress=False)
    with caplog.at_level(logging.WARNING, logger="seglens.data.loader"):
        assert sum(len(b) for b in stream) == 3  # kept, not skipped
    assert [name for name, _ in stream.noted] == ["img0"]
    assert "1 of 3 images carry an EXIF orientation that cannot be checked" in caplog.text
    assert f"EXIF orientation {orientation} on a" in caplog.text


def test_check_exif_fit_cases():
    fit = check_exif_fit
    assert fit((4, 6), (4, 6, 3), 1, "m", "i") is None  # no orientation
    assert fit((6, 4), (6, 4, 3), 6, "m", "i") is None  # drawn upright, unambiguous
    assert fit((5, 5), (4, 6, 3), 6, "m", "i") is None  # another size: check_mask's to report
    assert "square image" in fit((5, 5), (5, 5, 3), 5, "m", "i")
    assert "keeps the size" in fit((4, 6), (4, 6, 3), 4, "m", "i")
    with pytest.raises(
        BadSampleError, match=r"m: mask is 6x4 \(WxH\), the size of its image i .* upright as 4x6"
    ):
        fit((4, 6), (6, 4, 3), 7, "m", "i")


def test_a_zip_as_data_root_is_one_line_at_the_cli(tmp_path, capsys):
    from seglens.cli import main

    _folder(tmp_path / "data", n=2)
    archive = shutil.make_archive(str(tmp_path / "data"), "zip", tmp_path / "data")
    argv = ["probe", "--model", "tiny-clip", "--dataset", "folder", "--data-root", archive]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("seglens probe: error: folder: dataset root ")
    assert f"data.zip is a zip archive, not a folder. Unzip it (unzip {archive} -d " in line
    assert "does not exist" not in line
