"""Decoding of every image mode into (H, W, 3) uint8 RGB, and of label maps into raw integers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seglens.data import BadSampleError, read_image, read_mask

H, W = 12, 20


def _gradient() -> np.ndarray:
    """(H, W) uint8 with distinct values, so transposes and flips are detectable."""
    return (np.arange(H * W).reshape(H, W) % 251).astype(np.uint8)


def test_rgb_png_round_trips(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_is_replicated(tmp_path):
    gray = _gradient()
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (H, W, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 2] = 30  # fully transparent: compositing on white would give (255, 255, 255)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (H, W, 3)
    assert (out == [200, 0, 30]).all()


def test_la_drops_alpha(tmp_path):
    alpha = Image.fromarray(np.zeros((H, W), np.uint8))
    Image.merge("LA", [Image.fromarray(_gradient()), alpha]).save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    assert out.shape == (H, W, 3)
    np.testing.assert_array_equal(out[..., 1], _gradient())


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_image_gives_colours(tmp_path, transparency):
    indices = (np.arange(H * W).reshape(H, W) % 3).astype(np.uint8)
    im = Image.fromarray(indices)
    im.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    assert im.mode == "P"
    im.save(tmp_path / "p.png", **({"transparency": 0} if transparency else {}))
    out = read_image(tmp_path / "p.png")
    table = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], dtype=np.uint8)
    np.testing.assert_array_equal(out, table[indices])


def test_sixteen_bit_is_scaled_to_eight(tmp_path):
    values = np.zeros((H, W), dtype=np.uint16)
    values[0, :3] = [257, 65535, 32896]
    Image.fromarray(values).save(tmp_path / "d.png")
    out = read_image(tmp_path / "d.png")
    assert out.shape == (H, W, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :4, 0], [1, 255, 128, 0])


def test_cmyk_jpeg_converts_to_rgb(tmp_path):
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "c.jpg")  # pure red ink
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (H, W, 3)
    assert out.dtype == np.uint8
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200
    assert g < 60
    assert b < 60


@pytest.mark.parametrize(("orientation", "corner"), [(6, (0, -1)), (8, (-1, 0))])
def test_exif_orientation_is_applied(tmp_path, orientation, corner):
    # A white block in the stored top-left corner; orientation 6 (rotate 90 clockwise to display)
    # moves it to the top-right, orientation 8 (90 counter-clockwise) to the bottom-left.
    stored = np.zeros((40, 64, 3), dtype=np.uint8)
    stored[:12, :12] = 255
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (64, 40, 3)
    y, x = corner
    assert out[y, x].mean() > 200
    assert out[0, 0].mean() < 50


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(BadSampleError, match=r"nope\.jpg: cannot read this image"):
        read_image(tmp_path / "nope.jpg")


def test_truncated_image_names_the_file(tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadSampleError, match=r"t\.png: cannot read this image.*on-bad-sample"):
        read_image(tmp_path / "t.png")


def test_garbage_image_names_the_file(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(BadSampleError, match=r"x\.jpg: cannot read this image"):
        read_image(tmp_path / "x.jpg")


def test_palette_mask_gives_indices(tmp_path):
    labels = np.array([[0, 1, 255], [20, 15, 0]], dtype=np.uint8)
    im = Image.fromarray(labels)
    im.putpalette(list(np.random.default_rng(1).integers(0, 256, 768)))
    im.save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, labels)


def test_sixteen_bit_mask_keeps_values(tmp_path):
    labels = np.array([[0, 1000], [65535, 7]], dtype=np.uint16)
    Image.fromarray(labels).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), labels)


def test_rgb_mask_is_rejected(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(BadSampleError, match=r"colour\.png: .*single-channel label maps"):
        read_mask(tmp_path / "colour.png")


def test_missing_mask_names_the_file(tmp_path):
    with pytest.raises(BadSampleError, match=r"gone\.png: cannot read this mask"):
        read_mask(tmp_path / "gone.png")


def test_float_mask_is_rejected(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(BadSampleError, match=r"f\.tif: mask is floating-point"):
        read_mask(tmp_path / "f.tif")


def test_encoded_bytes_read_as_the_file_and_errors_use_the_given_name(tmp_path):
    from seglens.data.io import read_image_oriented

    Image.fromarray(_gradient()).save(tmp_path / "g.png")
    labels = np.array([[0, 3, 255], [7, 7, 1]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "m.png")
    data = (tmp_path / "g.png").read_bytes()
    np.testing.assert_array_equal(read_image(data), read_image(tmp_path / "g.png"))
    np.testing.assert_array_equal(read_mask((tmp_path / "m.png").read_bytes()), labels)
    assert read_image_oriented(data)[1] == 1
    with pytest.raises(BadSampleError, match=r"^row 3, column 'image': cannot read this image"):
        read_image(data[: len(data) // 2], where="row 3, column 'image'")
    with pytest.raises(BadSampleError, match=r"^<9 bytes>: cannot read this mask"):
        read_mask(b"not a png")


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_read_image_oriented_reports_the_exif_tag(tmp_path, orientation):
    from seglens.data.io import read_image_oriented

    im = Image.fromarray(np.zeros((10, 16, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.jpg", exif=exif.tobytes())
    image, tag = read_image_oriented(tmp_path / "o.jpg")
    assert tag == orientation
    assert image.shape == ((16, 10, 3) if orientation in (6, 8) else (10, 16, 3))
