"""Hugging Face ``datasets`` on disk (a ``save_to_disk`` folder, or parquet files), read offline.

``HFDataset`` serves one split of such a dataset in the toolkit's label convention: it finds the
image and label-map columns, takes the class names from the label column's ``ClassLabel``, a
``classes.txt`` / ``id2label.json`` beside the data or a registered dataset's names, and checks
every label map it decodes against the convention, naming the row, column and value. Images are
decoded by seglens itself (EXIF applied as for files), never by ``datasets``, so a row reads
exactly as the same file in a folder layout. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from seglens.data.base import IGNORE_INDEX, BadSampleError, Sample, SegDataset
from seglens.data.io import check_exif_fit, read_image_oriented, read_mask

logger = logging.getLogger(__name__)

#: Label-map columns looked for, in order, when ``label_column`` is not given.
LABEL_COLUMNS = ("annotation", "mask", "label")
# A requested split -> the names it may have on disk, in order.
_SPLIT_ALIASES = {
    "train": ("train", "training"),
    "training": ("training", "train"),
    "val": ("val", "validation", "valid"),
    "validation": ("validation", "val", "valid"),
}
_SPLIT_WORDS = ("train", "training", "val", "validation", "valid", "test", "testing")
_FIX = "Check data.hf_label_column, data.hf_classes and data.hf_reduce_zero_label"


def import_datasets():
    """The ``datasets`` module, offline.

    Raises:
        ValueError: ``datasets`` is not installed (a setting, ``--dataset hf``, needs it, as
            ``device_map`` needs accelerate); the message says how to install it.
    """
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # before the import: datasets reads it once
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            "--dataset hf needs the Hugging Face datasets library, which is not installed: "
            "pip install 'seglens[hf]'"
        ) from e
    return datasets


def _split_of_file(path: Path) -> str:
    """The split a parquet file belongs to, by the Hugging Face file-naming conventions.

    ``train-00000-of-00002.parquet`` and ``train/0000.parquet`` -> train; a split word anywhere
    in the name counts (``ade20k_validation.parquet`` -> validation); else the name's first part.
    """
    words = re.split(r"[-_.]", path.stem.lower())
    known = next((w for w in words if w in _SPLIT_WORDS), None)
    if known is not None:
        return known
    head = path.stem.split("-")[0]
    return path.parent.name if head.isdigit() else head


def _pick_split(available: Sequence[str], split: str, root: Path) -> str:
    for name in _SPLIT_ALIASES.get(split, (split,)):
        if name in available:
            return name
    only = len(available) == 1
    raise ValueError(
        f"hf: {root} has no split {split!r}; it holds {'only ' if only else ''}"
        f"{', '.join(repr(s) for s in available)}. "
        + (
            "Training and evaluation need two different splits: save a DatasetDict with both "
            "(DatasetDict({'train': ..., 'validation': ...}).save_to_disk(...)) or put "
            "train-*.parquet and validation-*.parquet files in one folder and pass the folder."
            if only
            else "Pass --train-split / --eval-split with one of them."
        )
    )


class _ParquetRows:
    """Rows of parquet files read with pyarrow, one row group at a time (no copy, no cache)."""

    def __init__(self, files: Sequence[Path]):
        import pyarrow.parquet as pq

        self.files = list(files)
        self.schema = pq.read_schema(self.files[0])
        self.index: list[tuple[int, int, int]] = []  # row -> (file, row group, offset)
        for f, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            for g in range(meta.num_row_groups):
                self.index.extend((f, g, o) for o in range(meta.row_group(g).num_rows))
        self._group: tuple[tuple[int, int], list[dict]] | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_group": None}

    def __len__(self) -> int:
        return len(self.index)

    def row(self, i: int, columns: list[str]) -> dict:
        import pyarrow.parquet as pq

        f, g, o = self.index[i]
        if self._group is None or self._group[0] != (f, g):
            table = pq.ParquetFile(self.files[f]).read_row_group(g, columns=columns)
            self._group = ((f, g), table.to_pylist())
        return self._group[1][o]

    def paths(self, column: str) -> list[Any]:
        import pyarrow.parquet as pq

        return [
            p for f in self.files for p in pq.read_table(f, columns=[f"{column}.path"]).column(0)
        ]


class _ArrowRows:
    """Rows of a ``save_to_disk`` Dataset (memory-mapped arrow), undecoded."""

    def __init__(self, dataset):
        self.dataset = dataset.with_format("arrow")
        self.schema = dataset.data.schema
        self.files = [Path(f["filename"]) for f in dataset.cache_files]

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, i: int, columns: list[str]) -> dict:
        return self.dataset[i].select(columns).to_pylist()[0]

    def paths(self, column: str) -> list[Any]:
        import pyarrow.compute as pc

        chunks = self.dataset.data.column(column).chunks
        return [p for chunk in chunks for p in pc.struct_field(chunk, "path")]


def _open_rows(root: Path, split: str) -> tuple[Any, str, Path]:
    """(rows, split name on disk, folder beside the data) of one split under ``root``."""
    datasets = import_datasets()
    if root.is_file():
        if root.suffix != ".parquet":
            from seglens.data.datasets import not_a_folder

            raise ValueError(
                f"hf: {not_a_folder(root)[:-1]}, or one .parquet file, or a folder of them."
            )
        name = _pick_split([_split_of_file(root)], split, root)
        return _ParquetRows([root]), name, root.parent
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            name = _pick_split(list(loaded), split, root)
            return _ArrowRows(loaded[name]), name, root
        name = _pick_split([loaded.split or "train"], split, root)
        return _ArrowRows(loaded), name, root
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"hf: {root} holds neither a save_to_disk dataset (dataset_dict.json or state.json) "
            f"nor .parquet files. Expected layout: {HFDataset.layout}"
        )
    by_split: dict[str, list[Path]] = {}
    for path in files:
        by_split.setdefault(_split_of_file(path), []).append(path)
    name = _pick_split(sorted(by_split), split, root)
    return _ParquetRows(by_split[name]), name, root


def _class_label_names(feature) -> list[str] | None:
    """Names of a ClassLabel inside a (nested) label-column feature, if any."""
    datasets = import_datasets()
    while True:
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        inner = getattr(feature, "feature", None)
        if inner is None:
            return None
        feature = inner


def _read_names_file(path: Path) -> list[str]:
    if path.suffix == ".json":
        try:
            mapping = {int(k): str(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError) as e:
            raise ValueError(
                f"hf: {path} is not an id2label mapping ({e}); write it as "
                '{"0": "first class", "1": "second class", ...}'
            ) from e
        ids = sorted(mapping)
        if ids != list(range(len(ids))):
            raise ValueError(
                f"hf: {path} maps ids {ids[:5]}...; class ids must run 0..C-1 without gaps"
            )
        return [mapping[i] for i in ids]
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _class_names(classes: str | None, feature, folder: Path, column: str, columns: list[str]):
    """(names, palette, where they came from)."""
    from seglens.data import datasets as registry

    known = {
        "ade20k": (registry.ADE20K_CLASSES, registry.voc_palette(150, start=1)),
        "voc": (registry.VOC_CLASSES, registry.voc_palette(21)),
        "cityscapes": (registry.CITYSCAPES_CLASSES, [rgb for *_, rgb in registry._CITYSCAPES]),
        "coco-stuff": (
            registry.COCO_STUFF_CLASSES,
            registry.voc_palette(len(registry.COCO_STUFF_CLASSES), start=1),
        ),
    }
    if classes is not None:
        if classes in known:
            names, palette = known[classes]
            return list(names), palette, f"the {classes} class names"
        path = Path(classes).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"hf: data.hf_classes={classes!r} is neither a file nor one of {sorted(known)}"
            )
        names = _read_names_file(path)
        return names, None, str(path)
    names = _class_label_names(feature)
    if names is not None:
        return names, None, f"the ClassLabel of column {column!r}"
    for candidate in (folder / "classes.txt", folder / "id2label.json"):
        if candidate.is_file():
            return _read_names_file(candidate), None, str(candidate)
    hint = ""
    if {"annotation", "scene_category"} <= set(columns):
        hint = (
            " The columns are scene_parse_150's (ADE20K): pass --hf-classes ade20k "
            "--hf-reduce-zero-label."
        )
    raise FileNotFoundError(
        f"hf: no class names for {folder}: column {column!r} holds no ClassLabel and there is no "
        f"classes.txt or id2label.json beside the data. Write {folder / 'classes.txt'} (one name "
        "per line, in label order), or set data.hf_classes (--hf-classes) to a names file or "
        f"to one of {', '.join(sorted(known))}.{hint}"
    )


class HFDataset(SegDataset):
    """One split of a Hugging Face dataset on disk: image and label-map columns, read offline.

    Labels follow the toolkit's convention (classes ``0..C-1``, 255 ignore) as stored, or, with
    ``reduce_zero_label``, ADE20K-style: raw 0 (other) -> ignore, raw k -> class k - 1, 255 stays
    ignore. A decoded label map with any other value raises ``BadSampleError`` naming the row,
    the column and the values.
    """

    name = "hf"
    accepts_files = True
    layout = (
        "a datasets save_to_disk folder (DatasetDict with train/validation splits), a folder of "
        "parquet files named by split (train-00000-of-00002.parquet, validation-....parquet, or "
        "train/0000.parquet), or one .parquet file; columns image and annotation (or mask, label)"
    )

    def __init__(
        self,
        root: str | PathLike,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = None,
        reduce_zero_label: bool = False,
        classes: str | None = None,
    ):
        datasets = import_datasets()
        root = Path(root)
        rows, disk_split, folder = _open_rows(root, split)
        features = datasets.Features.from_arrow_schema(rows.schema)
        columns = list(features)
        label_column = label_column or next((c for c in LABEL_COLUMNS if c in features), None)
        for role, column in (("image", image_column), ("label", label_column)):
            if column not in features:
                option = "data.hf_image_column" if role == "image" else "data.hf_label_column"
                raise ValueError(
                    f"hf: {root} split {disk_split!r} has no {role} column "
                    f"{column or ' / '.join(LABEL_COLUMNS)!r}; its columns are {columns}. Set "
                    f"{option} (--hf-{role}-column) to the column that holds the {role}s."
                )
        feature = features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            raise ValueError(
                f"hf: column {label_column!r} of {root} is a ClassLabel (one class per image: a "
                "classification dataset); seglens needs a per-pixel label map. Set "
                "data.hf_label_column to the column of the masks."
            )
        names, palette, source = _class_names(classes, feature, folder, label_column, columns)
        if not 1 <= len(names) < IGNORE_INDEX:
            raise ValueError(
                f"hf: {source} lists {len(names)} classes; need 1..254 (255 is ignore)"
            )
        if palette is None:
            from seglens.data.datasets import voc_palette

            palette = voc_palette(len(names), start=1)
        super().__init__(range(len(rows)), names, palette)
        self.root, self.split = root, disk_split
        self.image_column, self.label_column = image_column, label_column
        self.reduce_zero_label = reduce_zero_label
        self.class_source = source
        #: sha256 of the data files' (name, size, mtime): a run's identity records it, so a
        #: changed or other dataset under the same root is noticed (see seglens.rundir.identity).
        self.fingerprint = _fingerprint(rows.files)
        self._rows = rows
        self._names = _row_names(rows, image_column, disk_split)
        logger.info(
            "hf: %s split %r, %d rows, columns %r / %r, %d classes from %s%s",
            root,
            disk_split,
            len(rows),
            image_column,
            label_column,
            len(names),
            source,
            ", reduce_zero_label" if reduce_zero_label else "",
        )

    def __repr__(self) -> str:
        return f"HFDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"

    def _name(self, key: int) -> str:
        return self._names[key]

    def _load(self, key: int) -> Sample:
        row = self._rows.row(key, [self.image_column, self.label_column])
        where = f"{self.root} split {self.split!r} row {key}"
        image_where = f"{where}, column {self.image_column!r}"
        label_where = f"{where}, column {self.label_column!r}"
        image, orientation = _decode(row[self.image_column], image_where, self._folder, True)
        raw = _decode(row[self.label_column], label_where, self._folder, False)
        note = check_exif_fit(raw.shape, image.shape, orientation, label_where, image_where)
        labels = self._convention(raw, label_where)
        labels = self.check_mask(labels, image, label_where)
        return Sample(image=image, mask=labels, name=self._name(key), notes=(note,) if note else ())

    @property
    def _folder(self) -> Path:
        return self.root if self.root.is_dir() else self.root.parent

    def _convention(self, raw: np.ndarray, where: str) -> np.ndarray:
        """Raw stored labels -> toolkit labels; BadSampleError naming the values outside."""
        c = self.num_classes
        # One lookup table (raw value -> label, -1 = outside the convention): a single gather.
        lut = np.full(max(c + 1, IGNORE_INDEX) + 1, -1, dtype=np.int64)
        lut[IGNORE_INDEX] = IGNORE_INDEX
        if self.reduce_zero_label:
            lut[0], lut[1 : c + 1] = IGNORE_INDEX, np.arange(c)
            allowed = f"0 (other -> ignore), 1..{c} and {IGNORE_INDEX} (ignore)"
        else:
            lut[:c] = np.arange(c)
            allowed = f"0..{c - 1} and {IGNORE_INDEX} (ignore)"
        inside = (raw >= 0) & (raw < len(lut))
        labels = lut[np.where(inside, raw, 0)]
        bad = ~inside | (labels < 0)
        if not bad.any():
            return labels
        values = sorted({int(v) for v in np.unique(raw[bad])})[:10]
        hint = ""
        if not self.reduce_zero_label and raw.max() == c:
            hint = (
                f" Values run up to {c}: if 0 means 'other' (ADE20K-style), set "
                "data.hf_reduce_zero_label: true (--hf-reduce-zero-label)."
            )
        raise BadSampleError(
            f"{where}: label value(s) {values} are outside the convention "
            f"({'reduce_zero_label' if self.reduce_zero_label else 'labels as stored'} with "
            f"{c} classes from {self.class_source} allows {allowed}).{hint} {_FIX}, or pass "
            "--on-bad-sample skip."
        )


def _decode(value: Any, where: str, folder: Path, image: bool):
    """An image (with its EXIF orientation) or a raw label map from one cell of a row."""
    if value is None:
        raise BadSampleError(f"{where}: the cell is empty (None). Use a split with labels.")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        source = value.get("bytes")
        if source is None and value.get("path"):
            path = Path(value["path"])
            source = path if path.is_absolute() else folder / path
        if source is None:
            raise BadSampleError(f"{where}: the cell has neither bytes nor a path")
        return read_image_oriented(source, where) if image else read_mask(source, where)
    array = np.asarray(value)
    if image:
        if array.ndim != 3 or array.shape[-1] != 3 or array.dtype.kind not in "iu":
            raise BadSampleError(
                f"{where}: expected an Image or an (H, W, 3) integer array, got shape "
                f"{array.shape} of {array.dtype}"
            )
        return array.astype(np.uint8), 1
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise BadSampleError(
            f"{where}: expected an Image (a PNG label map) or an (H, W) integer array, got shape "
            f"{array.shape} of {array.dtype}"
        )
    return array.astype(np.int64)


def _fingerprint(files: Sequence[Path]) -> str:
    entries = []
    for path in files:
        stat = path.stat()
        entries.append([path.name, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _row_names(rows, image_column: str, split: str) -> list[str]:
    """The stems of the images' stored paths when they are all there and unique, else row ids."""
    fallback = [f"{split}-{i:06d}" for i in range(len(rows))]
    try:
        paths = [p.as_py() for p in rows.paths(image_column)]
    except Exception:  # an array column, or no path field: the row ids serve
        return fallback
    if any(not p for p in paths):
        return fallback
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else fallback
