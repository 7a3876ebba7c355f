"""Decoding image and label-map files into the toolkit's arrays, whatever their PIL mode.

``read_image`` always returns (H, W, 3) uint8 RGB in display orientation; ``read_mask`` returns
the raw integer labels of a single-channel file (palette indices for palette PNGs) without any
remapping, which is left to each dataset loader. Both only read, and turn every decoding failure
into a ``BadSampleError`` that names the file.
"""

from __future__ import annotations

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


def read_image(path: str | PathLike) -> np.ndarray:
    """Decode an image file into RGB, applying its EXIF orientation.

    Grayscale is replicated to three channels, alpha is dropped (not composited), palette and
    CMYK images are converted to RGB, and 16-bit grayscale is scaled to 8 bits (``v / 257``).

    Args:
        path: the image file.

    Returns:
        (H, W, 3) uint8 RGB, H x W after the EXIF rotation.

    Raises:
        BadSampleError: the file is missing, truncated or not a supported image.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, path)
    except BadSampleError:
        raise
    except Exception as e:
        # PIL raises OSError on missing, truncated or unidentified files, but corrupt headers
        # and EXIF blocks surface as struct.error, IndexError, SyntaxError...: all mean a bad file.
        raise BadSampleError(
            f"{path}: cannot read this image ({type(e).__name__}: {e}). Re-download or re-export "
            "the file, remove it from the dataset, or pass --on-bad-sample skip."
        ) from e


def read_mask(path: str | PathLike) -> np.ndarray:
    """Decode a single-channel label map, keeping the raw values.

    Palette PNGs (Pascal VOC ``SegmentationClass``) give their palette indices, 8-bit and 16-bit
    grayscale give their values. Colour masks are rejected: colours are not labels.

    Args:
        path: the label-map file, usually a PNG.

    Returns:
        (H, W) int64 raw label values.

    Raises:
        BadSampleError: the file is unreadable, or it is not a single-channel label map.
    """
    try:
        with Image.open(path) as im:
            if im.mode == "F":
                raise BadSampleError(
                    f"{path}: mask is floating-point (PIL mode 'F'); masks must be integer label "
                    "maps. Save the class ids as an 8-bit or 16-bit PNG."
                )
            if im.mode not in _LABEL_MODES:
                raise BadSampleError(
                    f"{path}: mask has PIL mode {im.mode!r} ({len(im.getbands())} channels); "
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
            f"{path}: cannot read this mask ({type(e).__name__}: {e}). Re-download or re-export "
            "the file, remove the sample, or pass --on-bad-sample skip."
        ) from e


def _to_rgb(im: Image.Image, path: str | PathLike) -> np.ndarray:
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
            f"{path}: floating-point image (PIL mode 'F'); its intensity range is ambiguous. "
            "Export it as 8-bit or 16-bit."
        )
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX: PIL's own conversions are exact or standard.
    return np.array(im.convert("RGB"))
