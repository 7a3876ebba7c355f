"""Loaders for the standard segmentation datasets in their real on-disk layouts, and the registry.

Each loader pairs image and mask files at construction (sorted, so sharding is reproducible),
decodes them lazily in ``_load`` and translates its dataset's label encoding into the toolkit's
convention (classes ``0..C-1``, ignore ``255``). ``load_dataset(name, root, split)`` is the one
entry point the CLI and experiments use.
"""

from __future__ import annotations

import difflib
import logging
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

import numpy as np

from seglens.data.base import IGNORE_INDEX, BadSampleError, Sample, SegDataset
from seglens.data.hf import HFDataset
from seglens.data.io import check_exif_fit, read_image_oriented, read_mask
from seglens.data.organism import OrganismDataset
from seglens.data.synthetic import SyntheticDataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(","))


ADE20K_CLASSES = _names(
    "wall, building, sky, floor, tree, ceiling, road, bed, windowpane, grass, cabinet, sidewalk, "
    "person, earth, door, table, mountain, plant, curtain, chair, car, water, painting, sofa, "
    "shelf, house, sea, mirror, rug, field, armchair, seat, fence, desk, rock, wardrobe, lamp, "
    "bathtub, railing, cushion, base, box, column, signboard, chest of drawers, counter, sand, "
    "sink, skyscraper, fireplace, refrigerator, grandstand, path, stairs, runway, case, "
    "pool table, pillow, screen door, stairway, river, bridge, bookcase, blind, coffee table, "
    "toilet, flower, book, hill, bench, countertop, stove, palm, kitchen island, computer, "
    "swivel chair, boat, bar, arcade machine, hovel, bus, towel, light, truck, tower, "
    "chandelier, awning, streetlight, booth, television receiver, airplane, dirt track, "
    "apparel, pole, land, bannister, escalator, ottoman, bottle, buffet, poster, stage, van, "
    "ship, fountain, conveyer belt, canopy, washer, plaything, swimming pool, stool, barrel, "
    "basket, waterfall, tent, bag, minibike, cradle, oven, ball, food, step, tank, trade name, "
    "microwave, pot, animal, bicycle, lake, dishwasher, screen, blanket, sculpture, hood, "
    "sconce, vase, traffic light, tray, ashcan, fan, pier, crt screen, plate, monitor, "
    "bulletin board, shower, radiator, glass, clock, flag"
)

VOC_CLASSES = _names(
    "background, aeroplane, bicycle, bird, boat, bottle, bus, car, cat, chair, cow, "
    "diningtable, dog, horse, motorbike, person, pottedplant, sheep, sofa, train, tvmonitor"
)

# (name, labelId, RGB) in trainId order, from cityscapesScripts' labels.py.
_CITYSCAPES = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)
CITYSCAPES_CLASSES = tuple(name for name, _, _ in _CITYSCAPES)

COCO_STUFF_CLASSES = _names(
    # 80 things
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light, "
    "fire hydrant, stop sign, parking meter, bench, bird, cat, dog, horse, sheep, cow, elephant, "
    "bear, zebra, giraffe, backpack, umbrella, handbag, tie, suitcase, frisbee, skis, snowboard, "
    "sports ball, kite, baseball bat, baseball glove, skateboard, surfboard, tennis racket, "
    "bottle, wine glass, cup, fork, knife, spoon, bowl, banana, apple, sandwich, orange, "
    "broccoli, carrot, hot dog, pizza, donut, cake, chair, couch, potted plant, bed, "
    "dining table, toilet, tv, laptop, mouse, remote, keyboard, cell phone, microwave, oven, "
    "toaster, sink, refrigerator, book, clock, vase, scissors, teddy bear, hair drier, "
    "toothbrush, "
    # 91 stuff
    "banner, blanket, branch, bridge, building-other, bush, cabinet, cage, cardboard, carpet, "
    "ceiling-other, ceiling-tile, cloth, clothes, clouds, counter, cupboard, curtain, "
    "desk-stuff, dirt, door-stuff, fence, floor-marble, floor-other, floor-stone, floor-tile, "
    "floor-wood, flower, fog, food-other, fruit, furniture-other, grass, gravel, ground-other, "
    "hill, house, leaves, light, mat, metal, mirror-stuff, moss, mountain, mud, napkin, net, "
    "paper, pavement, pillow, plant-other, plastic, platform, playingfield, railing, railroad, "
    "river, road, rock, roof, rug, salad, sand, sea, shelf, sky-other, skyscraper, snow, "
    "solid-other, stairs, stone, straw, structural-other, table, tent, textile-other, towel, "
    "tree, vegetable, wall-brick, wall-concrete, wall-other, wall-panel, wall-stone, wall-tile, "
    "wall-wood, water-other, waterdrops, window-blind, window-other, wood"
)
# stuffthingmaps store COCO category id - 1 (0..181). These thing ids have no annotations
# (COCO ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91: street sign, hat, shoe, eye glasses,
# plate, mirror, window, desk, door, blender, hair brush), which leaves 171 classes.
COCO_STUFF_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

# Split names accepted -> folder on disk.
_ADE20K_SPLITS = {
    "train": "training",
    "training": "training",
    "val": "validation",
    "validation": "validation",
}
# Split names served by the seeded division of a flat folder dataset.
_FLAT_SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val"}
_COCO_STUFF_SPLITS = {
    "train": "train2017",
    "train2017": "train2017",
    "val": "val2017",
    "val2017": "val2017",
}


def voc_palette(n: int, start: int = 0) -> np.ndarray:
    """The Pascal VOC colormap: the bits of the index interleaved into R, G and B.

    Args:
        n: number of colours.
        start: index of the first colour (1 skips the black of index 0).

    Returns:
        (n, 3) uint8, distinct colours for indices below 256.
    """
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, rgb = start + i, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((c >> channel) & 1) << (7 - bit)
            c >>= 3
        palette[i] = rgb
    return palette


def _lookup(size: int, default: int, mapping: dict[int, int]) -> np.ndarray:
    lut = np.full(size, default, dtype=np.int64)
    for raw, label in mapping.items():
        lut[raw] = label
    return lut


def _remap(raw: np.ndarray, lut: np.ndarray, where: str, encoding: str) -> np.ndarray:
    """Raw on-disk values -> toolkit labels; raw values outside ``lut`` or mapped to -1 are bad."""
    inside = (raw >= 0) & (raw < len(lut))
    labels = lut[np.where(inside, raw, 0)]
    bad = ~inside | (labels < 0)
    if bad.any():
        values = sorted({int(v) for v in np.unique(raw[bad])})[:10]
        raise BadSampleError(
            f"{where}: raw label values {values} are not valid {encoding}. Check that the "
            "dataset name matches the files, or pass --on-bad-sample skip."
        )
    return labels


def _find_base(candidates: Sequence[Path], probe: str, what: str, layout: str) -> Path:
    """The first candidate folder containing ``probe``, or FileNotFoundError naming them all."""
    for base in candidates:
        if (base / probe).is_dir():
            return base
    expected = " or ".join(str(base / probe) for base in candidates)
    raise FileNotFoundError(f"{what}: folder {expected} not found. Expected layout: {layout}")


def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {path} not found. Expected layout: {layout}")
    return path


def _split_folder(split: str, aliases: dict[str, str], what: str) -> str:
    if split not in aliases:
        raise ValueError(f"{what}: unknown split {split!r}; use one of {sorted(aliases)}")
    return aliases[split]


def _list_images(folder: Path, pattern: str, what: str, layout: str) -> list[Path]:
    """Sorted image files under ``folder`` matching ``pattern``; ValueError when there are none."""
    images = sorted(
        p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not images:
        raise ValueError(
            f"{what}: no images matching {pattern!r} in {folder}; the dataset would be empty. "
            f"Expected layout: {layout}"
        )
    return images


def _pair(
    images: Sequence[Path], mask_of: Callable[[Path], Path], what: str
) -> list[tuple[Path, Path]]:
    """(image, mask) pairs; FileNotFoundError naming the first image whose mask is missing."""
    pairs = [(image, mask_of(image)) for image in images]
    existing: dict[Path, set[str]] = {}
    missing = []
    for image, mask in pairs:
        if mask.parent not in existing:
            folder = mask.parent
            existing[folder] = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
        if mask.name not in existing[mask.parent]:
            missing.append((image, mask))
    if missing:
        image, mask = missing[0]
        raise FileNotFoundError(
            f"{what}: image {image} has no mask {mask} ({len(missing)} of {len(pairs)} images "
            "lack a mask). Restore the masks or remove the unlabelled images."
        )
    return pairs


def _warn_unpaired_masks(pairs: Sequence[tuple[Path, Path]], mask_dir: Path, what: str) -> None:
    """Log masks in ``mask_dir`` that no image uses: counts that differ hint at a broken copy."""
    used = {mask.name for _, mask in pairs}
    extra = sorted(p.name for p in mask_dir.glob("*.png") if p.name not in used)
    if extra:
        logger.warning(
            "%s: %d masks in %s have no image and are ignored (first: %s); %d images are used. "
            "Restore the missing images if they belong to the split.",
            what,
            len(extra),
            mask_dir,
            extra[0],
            len(pairs),
        )


class _PairedDataset(SegDataset):
    """Image + label-map files on disk, with the dataset's raw-label encoding as a lookup table."""

    layout = ""
    encoding = "label ids"
    _lut: np.ndarray | None = None

    def __init__(self, pairs, class_names, palette, root: Path, split: str | None):
        super().__init__(pairs, class_names, palette)
        self.root = root
        self.split = split

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
        )

    def _name(self, key: tuple[Path, Path]) -> str:
        return key[0].stem

    def _load(self, key: tuple[Path, Path]) -> Sample:
        image_path, mask_path = key
        image, orientation = read_image_oriented(image_path)
        raw = read_mask(mask_path)
        note = check_exif_fit(raw.shape, image.shape, orientation, str(mask_path), str(image_path))
        labels = raw if self._lut is None else _remap(raw, self._lut, str(mask_path), self.encoding)
        labels = self.check_mask(labels, image, str(mask_path))
        notes = () if note is None else (note,)
        return Sample(image=image, mask=labels, name=self._name(key), notes=notes)


class ADE20K(_PairedDataset):
    """ADE20K SceneParsing (ADEChallengeData2016): raw 0 is unlabelled -> 255, raw k -> k - 1."""

    name = "ade20k"
    layout = (
        "root/ADEChallengeData2016/images/{training,validation}/*.jpg and "
        "root/ADEChallengeData2016/annotations/{training,validation}/*.png "
        "(root may also be ADEChallengeData2016 itself)"
    )
    encoding = "ADE20K SceneParsing ids (0 = unlabelled, 1..150 = classes)"
    _lut = _lookup(151, IGNORE_INDEX, {k: k - 1 for k in range(1, 151)})

    def __init__(self, root: str | PathLike, split: str = "train"):
        root = Path(root)
        folder = _split_folder(split, _ADE20K_SPLITS, self.name)
        base = _find_base(
            [root / "ADEChallengeData2016", root], f"images/{folder}", self.name, self.layout
        )
        image_dir = base / "images" / folder
        mask_dir = _require_dir(base / "annotations" / folder, self.name, self.layout)
        images = _list_images(image_dir, "*.jpg", self.name, self.layout)
        pairs = _pair(images, lambda p: mask_dir / f"{p.stem}.png", self.name)
        _warn_unpaired_masks(pairs, mask_dir, self.name)
        super().__init__(pairs, ADE20K_CLASSES, voc_palette(150, start=1), base, folder)


class PascalVOC(_PairedDataset):
    """Pascal VOC 2012 segmentation: palette-PNG indices 0..20 (0 = background), 255 = boundary.

    ``mask_dir="SegmentationClassAug"`` reads the SBD-augmented grayscale masks instead.
    """

    name = "voc"
    layout = (
        "root/VOCdevkit/VOC2012 (or root/VOC2012, or root) containing JPEGImages/*.jpg, "
        "SegmentationClass/*.png (palette PNGs) and ImageSets/Segmentation/{train,val,trainval}.txt"
    )
    _SPLITS = ("train", "val", "trainval")

    def __init__(
        self, root: str | PathLike, split: str = "train", mask_dir: str = "SegmentationClass"
    ):
        root = Path(root)
        if split not in self._SPLITS:
            raise ValueError(f"{self.name}: unknown split {split!r}; use one of {self._SPLITS}")
        candidates = [root / "VOCdevkit" / "VOC2012", root / "VOC2012", root]
        base = _find_base(candidates, "JPEGImages", self.name, self.layout)
        masks = _require_dir(base / mask_dir, self.name, self.layout)
        list_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise FileNotFoundError(
                f"{self.name}: split list {list_file} not found. Expected layout: {self.layout}"
            )
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"{self.name}: split list {list_file} is empty; no images to load")
        images = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
        present = {p.name for p in (base / "JPEGImages").iterdir()}
        absent = [p for p in images if p.name not in present]
        if absent:
            raise FileNotFoundError(
                f"{self.name}: image {absent[0]} listed in {list_file} not found "
                f"({len(absent)} of {len(images)} missing)."
            )
        pairs = _pair(images, lambda p: masks / f"{p.stem}.png", self.name)
        super().__init__(pairs, VOC_CLASSES, voc_palette(21), base, split)


class Cityscapes(_PairedDataset):
    """Cityscapes fine annotations: ``*_gtFine_labelIds.png`` -> the 19 official trainIds."""

    name = "cityscapes"
    layout = (
        "root/leftImg8bit/{train,val,test}/{city}/*_leftImg8bit.png and "
        "root/gtFine/{train,val,test}/{city}/*_gtFine_labelIds.png"
    )
    encoding = "Cityscapes labelIds (0..255)"
    _lut = _lookup(256, IGNORE_INDEX, {lid: tid for tid, (_, lid, _) in enumerate(_CITYSCAPES)})
    _SPLITS = ("train", "val", "test")

    def __init__(self, root: str | PathLike, split: str = "train"):
        root = Path(root)
        if split not in self._SPLITS:
            raise ValueError(f"{self.name}: unknown split {split!r}; use one of {self._SPLITS}")
        image_dir = _require_dir(root / "leftImg8bit" / split, self.name, self.layout)
        mask_dir = _require_dir(root / "gtFine" / split, self.name, self.layout)
        images = _list_images(image_dir, "*/*_leftImg8bit.png", self.name, self.layout)

        def mask_of(image: Path) -> Path:
            stem = image.name[: -len("_leftImg8bit.png")]
            return mask_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"

        pairs = _pair(images, mask_of, self.name)
        palette = [rgb for _, _, rgb in _CITYSCAPES]
        super().__init__(pairs, CITYSCAPES_CLASSES, palette, root, split)

    def _name(self, key: tuple[Path, Path]) -> str:
        return key[0].name[: -len("_leftImg8bit.png")]


class COCOStuff(_PairedDataset):
    """COCO-Stuff 164k stuffthingmaps: the 171 used ids (of 0..181) -> 0..170, all else 255."""

    name = "coco-stuff"
    layout = (
        "root/images/{train2017,val2017}/*.jpg and root/annotations/{train2017,val2017}/*.png "
        "(stuffthingmaps: COCO id - 1, 255 = unlabelled)"
    )
    encoding = "COCO-Stuff stuffthingmaps ids (0..255)"
    _lut = _lookup(
        256,
        IGNORE_INDEX,
        {
            raw: label
            for label, raw in enumerate(r for r in range(182) if r not in COCO_STUFF_UNUSED_IDS)
        },
    )

    def __init__(self, root: str | PathLike, split: str = "train"):
        root = Path(root)
        folder = _split_folder(split, _COCO_STUFF_SPLITS, self.name)
        image_dir = _require_dir(root / "images" / folder, self.name, self.layout)
        mask_dir = _require_dir(root / "annotations" / folder, self.name, self.layout)
        images = _list_images(image_dir, "*.jpg", self.name, self.layout)
        pairs = _pair(images, lambda p: mask_dir / f"{p.stem}.png", self.name)
        _warn_unpaired_masks(pairs, mask_dir, self.name)
        palette = voc_palette(len(COCO_STUFF_CLASSES), start=1)
        super().__init__(pairs, COCO_STUFF_CLASSES, palette, root, folder)


class FolderDataset(_PairedDataset):
    """A generic folder: ``images/*``, ``masks/<same stem>.png`` and ``classes.txt``.

    Masks hold class ids ``0..C-1`` (C = lines of ``classes.txt``) and 255 for ignore. With a
    split, ``root/{split}/images`` is used when it exists. A flat folder (no ``train/`` or
    ``val/``) is divided into a seeded, disjoint train / val part (``val_fraction`` of the images,
    drawn with ``split_seed``), so a run never scores its probes on its training images; without
    a split (``split=None``) it serves all its images.
    """

    name = "folder"
    layout = (
        "root/images/*.{jpg,png,...}, root/masks/<image stem>.png (single-channel class ids, "
        "255 = ignore) and root/classes.txt (one class name per line); optionally per split: "
        "root/{split}/images, root/{split}/masks"
    )

    def __init__(
        self,
        root: str | PathLike,
        split: str | None = None,
        val_fraction: float = 0.2,
        split_seed: int = 0,
    ):
        root = Path(root)
        candidates = [root / split, root] if split is not None else [root]
        base = _find_base(candidates, "images", self.name, self.layout)
        image_dir = base / "images"
        mask_dir = _require_dir(base / "masks", self.name, self.layout)
        classes_file = next(
            (p for p in (base / "classes.txt", root / "classes.txt") if p.is_file()), None
        )
        if classes_file is None:
            raise FileNotFoundError(
                f"{self.name}: {root / 'classes.txt'} not found; write one class name per line. "
                f"Expected layout: {self.layout}"
            )
        names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
        if not 1 <= len(names) < IGNORE_INDEX:
            raise ValueError(
                f"{self.name}: {classes_file} lists {len(names)} classes; need 1..254 "
                f"(label {IGNORE_INDEX} is reserved for ignore)"
            )
        images = _list_images(image_dir, "*", self.name, self.layout)
        pairs = _pair(images, lambda p: mask_dir / f"{p.stem}.png", self.name)
        _warn_unpaired_masks(pairs, mask_dir, self.name)
        # Divide root/images only when no split has a folder of its own: beside root/val,
        # root/images is the train set as it always was.
        flat = base == root and not any((root / s / "images").is_dir() for s in _FLAT_SPLITS)
        if split is not None and flat:
            pairs = split_flat(pairs, split, val_fraction, split_seed, root)
        #: The seeded division this split came from (None: the split has its own folder).
        self.division = {"val_fraction": val_fraction, "seed": split_seed} if flat else None
        super().__init__(pairs, names, voc_palette(len(names), start=1), base, split)


def split_flat(
    pairs: Sequence[tuple[Path, Path]],
    split: str,
    val_fraction: float,
    seed: int,
    root: Path,
) -> list[tuple[Path, Path]]:
    """One part of a seeded division of a flat folder's sorted pairs into train and val.

    ``round(val_fraction * n)`` images (at least one) go to val, drawn by a permutation seeded
    with ``seed``; the rest, at least one, to train. Each part keeps the sorted order.

    Args:
        pairs: all (image, mask) pairs of the folder, sorted.
        split: ``train``/``training`` or ``val``/``validation``.
        val_fraction: share of the images in the val part, in (0, 1).
        seed: seed of the permutation (``data.folder_split_seed``).
        root: the folder, for messages.

    Returns:
        The pairs of the requested part.

    Raises:
        ValueError: an unknown split name, a fraction outside (0, 1), or too few images to
            divide; each message says how to lay out ``train/`` and ``val/`` instead.
    """
    fix = (
        f"or lay out {root}/train/{{images,masks}} and {root}/val/{{images,masks}} "
        "(classes.txt in either or in the root)"
    )
    part = _FLAT_SPLITS.get(split)
    if part is None:
        raise ValueError(
            f"folder: no {root / split / 'images'} for split {split!r}, and a flat folder only "
            f"divides into {sorted(_FLAT_SPLITS)}. Use one of those splits, {fix}."
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(
            f"folder: {root} is flat (no train/ and val/ folders) and data.folder_val_fraction="
            f"{val_fraction} leaves no disjoint train and val part; set it in (0, 1), {fix}."
        )
    n = len(pairs)
    n_val = max(1, round(val_fraction * n))
    if n - n_val < 1:
        raise ValueError(
            f"folder: {root} is flat and holds {n} image(s): too few to divide into disjoint "
            f"train and val parts with data.folder_val_fraction={val_fraction}. Add images, {fix}."
        )
    in_val = np.zeros(n, dtype=bool)
    in_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    chosen = [pair for pair, v in zip(pairs, in_val, strict=True) if v == (part == "val")]
    logger.info(
        "folder: %s is flat; seeded split (data.folder_split_seed=%d, data.folder_val_fraction="
        "%s): %d train, %d val images; split %r has %d",
        root,
        seed,
        val_fraction,
        n - n_val,
        n_val,
        split,
        len(chosen),
    )
    return chosen


def not_a_folder(root: Path) -> str:
    """What a file given as the dataset root is (zip, tar or other), and how to fix it."""
    extracted = root.parent / root.name.split(".")[0]
    if zipfile.is_zipfile(root):
        return (
            f"dataset root {root} is a zip archive, not a folder. Unzip it "
            f"(unzip {root} -d {extracted}) and pass the extracted folder as --data-root."
        )
    if tarfile.is_tarfile(root):
        return (
            f"dataset root {root} is a tar archive, not a folder. Extract it (mkdir {extracted} "
            f"&& tar -xf {root} -C {extracted}) and pass the extracted folder as --data-root."
        )
    return (
        f"dataset root {root} is a file, not a folder. Pass the folder that holds the dataset "
        "as --data-root."
    )


DATASETS: dict[str, type[SegDataset]] = {
    "ade20k": ADE20K,
    "voc": PascalVOC,
    "cityscapes": Cityscapes,
    "coco-stuff": COCOStuff,
    "folder": FolderDataset,
    "hf": HFDataset,
    "synthetic": SyntheticDataset,
    "organism": OrganismDataset,
}
#: Datasets generated on the fly from a seed: they take no root folder.
GENERATED = (SyntheticDataset, OrganismDataset)


def load_dataset(
    name: str, root: str | PathLike | None = None, split: str | None = "train", **options
) -> SegDataset:
    """Build a dataset from the registry.

    Args:
        name: a key of ``DATASETS`` (case and ``_``/``-`` insensitive).
        root: the dataset folder; must be None for the generated ``synthetic`` and ``organism``.
        split: ``train``/``val`` (dataset-specific aliases such as ``validation`` work too);
            None serves all images of a flat ``folder`` dataset, undivided (to inspect it).
        **options: passed to the dataset class (e.g. ``num_images`` for ``synthetic``).

    Returns:
        The dataset, its items ordered deterministically.

    Raises:
        ValueError: unknown name (with a suggestion), missing root, a root that is a file (an
            archive: the message says how to extract it), or an empty dataset.
        FileNotFoundError: the expected folder or a mask is missing; the message shows the layout.
    """
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        close = difflib.get_close_matches(key, list(DATASETS), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}. Known datasets: {', '.join(DATASETS)}.")
    cls = DATASETS[key]
    if cls in GENERATED:
        if root is not None:
            raise ValueError(
                f"dataset {key!r} is generated on the fly and takes no root (got {root!r})"
            )
        return cls(split=split, **options)
    if root is None:
        raise ValueError(f"dataset {key!r} needs a root folder. Expected layout: {cls.layout}")
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"{key}: dataset root {root} does not exist. Expected layout: {cls.layout}"
        )
    if not root.is_dir() and not getattr(cls, "accepts_files", False):
        raise ValueError(f"{key}: {not_a_folder(root)} Expected layout: {cls.layout}")
    dataset = cls(root, split, **options)
    logger.info("loaded %r", dataset)
    return dataset
