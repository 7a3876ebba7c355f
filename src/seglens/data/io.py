"""Decoding image and label-map files into the toolkit's arrays, whatever their PIL mode.

``read_image`` always returns (H, W, 3) uint8 RGB in display orientation (EXIF applied, as PIL's
``ImageOps.exif_transpose`` does); ``read_mask`` returns the raw integer labels of a single-channel
file (palette indices for palette PNGs) without any remapping, which is left to each dataset
loader. Both read a path or encoded bytes, and turn every decoding failure into a
``BadSampleError`` that names the file.
"""

from __future__ import annotations

import io
import logging
from os import PathLike

import numpy as np
from PIL import Image, ImageOps

from seglens.data.base import BadSampleError

logger = logging.getLogger(__name__)

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
# Single-channel modes whose pixel values are labels (palette PNGs: the indices, not colours).
_LABEL_MODES = ("L", "P", "1", *_SIXTEEN_BIT)
_ORIENTATION_TAG = 0x0112
#: EXIF orientations that swap width and height (transpose, rotate 90 / 270, transverse).
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

#: A file path, or the encoded bytes of a file (Hugging Face datasets store images so).
Source = str | PathLike | bytes


def _open(source: Source) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def read_image(path: Source, where: str | None = None) -> np.ndarray:
    """Decode an image file into RGB, applying its EXIF orientation.

    Grayscale is replicated to three channels, alpha is dropped (not composited), palette and
    CMYK images are converted to RGB, and 16-bit grayscale is scaled to 8 bits (``v / 257``).

    Args:
        path: the image file, or its encoded bytes.
        where: the name used in error messages (default: the path).

    Returns:
        (H, W, 3) uint8 RGB, H x W after the EXIF rotation.

    Raises:
        BadSampleError: the file is missing, truncated or not a supported image.
    """
    return read_image_oriented(path, where)[0]


def read_image_oriented(path: Source, where: str | None = None) -> tuple[np.ndarray, int]:
    """``read_image`` plus the EXIF orientation it applied (1 = none, 2..8 = a turn or mirror).

    Args:
        path: the image file, or its encoded bytes.
        where: the name used in error messages (default: the path).

    Returns:
        (H, W, 3) uint8 RGB upright, and the EXIF orientation tag of the stored pixels.

    Raises:
        BadSampleError: the file is missing, truncated or not a supported image.
    """
    where = _where(path, where)
    try:
        with _open(path) as im:
            orientation = int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, where), orientation if 1 <= orientation <= 8 else 1
    except BadSampleError:
        raise
    except Exception as e:
        # PIL raises OSError on missing, truncated or unidentified files, but corrupt headers
        # and EXIF blocks surface as struct.error, IndexError, SyntaxError...: all mean a bad file.
        raise BadSampleError(
            f"{where}: cannot read this image ({type(e).__name__}: {e}). Re-download or re-export "
            "the file, remove it from the dataset, or pass --on-bad-sample skip."
        ) from e


def _where(path: Source, where: str | None) -> str:
    if where is not None:
        return where
    return f"<{len(path)} bytes>" if isinstance(path, bytes) else str(path)


def read_mask(path: Source, where: str | None = None) -> np.ndarray:
    """Decode a single-channel label map, keeping the raw values.

    Palette PNGs (Pascal VOC ``SegmentationClass``) give their palette indices, 8-bit and 16-bit
    grayscale give their values. Colour masks are rejected: colours are not labels.

    Args:
        path: the label-map file, usually a PNG, or its encoded bytes.
        where: the name used in error messages (default: the path).

    Returns:
        (H, W) int64 raw label values.

    Raises:
        BadSampleError: the file is unreadable, or it is not a single-channel label map.
    """
    where = _where(path, where)
    try:
        with _open(path) as im:
            if im.mode == "F":
                raise BadSampleError(
                    f"{where}: mask is floating-point (PIL mode 'F'); masks must be integer label "
                    "maps. Save the class ids as an 8-bit or 16-bit PNG."
                )
            if im.mode not in _LABEL_MODES:
                raise BadSampleError(
                    f"{where}: mask has PIL mode {im.mode!r} ({len(im.getbands())} channels); "
                    "masks must be single-channel label maps (8/16-bit grayscale or palette "
                    "PNG whose values are class ids), not colour images. Convert colours to "
                    "class ids first."
                )
            return np.array(im, dtype=np.int64)
    except BadSampleError:
        raise
    except Exception as e:
        # PIL raises OSError on missing, truncated or unidentified files, but corrupt headers
        # and EXIF blocks surface as struct.error, IndexError, SyntaxError...: all mean a bad file.
        raise BadSampleError(
            f"{where}: cannot read this mask ({type(e).__name__}: {e}). Re-download or re-export "
            "the file, remove the sample, or pass --on-bad-sample skip."
        ) from e


def _to_rgb(im: Image.Image, where: str) -> np.ndarray:
    """(H, W, 3) uint8 from an opened image of any supported mode."""
    mode = im.mode
    if mode == "RGB":
        return np.array(im)
    if mode in _SIXTEEN_BIT:
        # PNG 16-bit grayscale decodes as I;16 (or I on older Pillow): full range is 0..65535.
        values = np.clip(np.asarray(im, dtype=np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode in _WITH_ALPHA or (mode == "P" and "transparency" in im.info):
        # Drop alpha without compositing; premultiplied and palette modes are unpacked first.
        rgba = np.array(im.convert("LA" if mode in ("LA", "La") else "RGBA"))
        color = rgba[..., :-1]
        return np.repeat(color, 3, axis=-1) if color.shape[-1] == 1 else color
    if mode == "F":
        raise BadSampleError(
            f"{where}: floating-point image (PIL mode 'F'); its intensity range is ambiguous. "
            "Export it as 8-bit or 16-bit."
        )
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX: PIL's own conversions are exact or standard.
    return np.array(im.convert("RGB"))


def check_exif_fit(
    mask_shape: tuple[int, ...],
    image_shape: tuple[int, ...],
    orientation: int,
    mask_where: str,
    image_where: str,
) -> str | None:
    """Check a mask against an EXIF-oriented image under seglens's one convention.

    The convention: images are turned upright as ``ImageOps.exif_transpose`` does, and masks are
    taken as drawn on the upright image. A mask that fits only the stored (un-rotated) image is
    refused. Where the mask fits either way (a square image turned by 90 degrees, or any image
    turned by 180 degrees or mirrored), nothing can tell which was meant: the sample is kept and
    a note returned, for the stream to count and warn about.

    Args:
        mask_shape: (H, W) of the decoded mask.
        image_shape: (H, W, ...) of the image after the EXIF turn.
        orientation: the image's EXIF orientation tag (1 = none).
        mask_where: the mask's name in messages.
        image_where: the image's name in messages.

    Returns:
        None when the image carries no orientation, else a note for an undecidable case.

    Raises:
        BadSampleError: the mask has the stored image's size, not the upright image's.
    """
    if orientation == 1:
        return None
    h, w = image_shape[:2]
    swaps = orientation in SWAPPING_ORIENTATIONS
    if swaps and h != w and tuple(mask_shape) == (w, h):
        raise BadSampleError(
            f"{mask_where}: mask is {h}x{w} (WxH), the size of its image {image_where} as stored, "
            f"but the image carries EXIF orientation {orientation} and is read upright as "
            f"{w}x{h}. seglens takes masks as drawn on the upright image (PIL's "
            "ImageOps.exif_transpose). Turn the mask the same way (exif_transpose with the "
            "image's orientation), or, if the pixels are already upright, remove the EXIF "
            "orientation tag from the image; or pass --on-bad-sample skip."
        )
    if (swaps and h != w) or tuple(mask_shape) != (h, w):
        return None  # the mask fits the upright image only, or neither (check_mask names both)
    return (
        f"{image_where}: EXIF orientation {orientation} on a "
        f"{'square image' if swaps else 'turn/mirror that keeps the size'}; the mask fits both "
        "the stored and the upright image and is taken as drawn on the upright one"
    )
