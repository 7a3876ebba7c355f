"""Geometry: each mode puts every class on the tokens it should cover; padding is ignore."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seglens.data.base import IGNORE_INDEX
from seglens.data.geometry import Geometry, patch_labels

S, P = 224, 14
G = S // P


def layout(y: np.ndarray, x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Planted classes: a band 4 at the far left, three vertical bands, and a top strip."""
    label = np.where(x < width / 3, 0, np.where(x < 2 * width / 3, 1, 2))
    label = np.where(y < height / 4, 3, label)
    return np.where(x < 0.12 * width, 4, label)


def expected_token_labels(transform) -> tuple[np.ndarray, np.ndarray]:
    """Analytic reference: the class under each token's corners, and whether all corners agree."""
    expect = np.full((G, G), IGNORE_INDEX)
    clean = np.zeros((G, G), bool)
    for r in range(G):
        for c in range(G):
            vs = np.array([r * P + 0.5, (r + 1) * P - 0.5, r * P + 0.5, (r + 1) * P - 0.5])
            us = np.array([c * P + 0.5, c * P + 0.5, (c + 1) * P - 0.5, (c + 1) * P - 0.5])
            ys, xs = transform.to_original(vs, us)
            inside = (ys >= 0) & (ys < transform.height) & (xs >= 0) & (xs < transform.width)
            if not inside.any():
                expect[r, c], clean[r, c] = IGNORE_INDEX, True
                continue
            labels = layout(ys, xs, transform.height, transform.width)
            if inside.all() and (labels == labels[0]).all():
                expect[r, c], clean[r, c] = labels[0], True
    return expect.ravel(), clean.ravel()


@pytest.mark.parametrize("mode", ["pad", "crop", "resize"])
@pytest.mark.parametrize("shape", [(180, 240), (300, 200)])
def test_planted_layout_lands_on_the_right_tokens(mode, shape):
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    mask = layout(yy, xx, height, width)
    transform = Geometry(mode, S).plan(height, width)
    labels, hist = patch_labels(transform.warp_mask(mask), G, num_classes=5)
    expect, clean = expected_token_labels(transform)
    assert clean.mean() > 0.7
    np.testing.assert_array_equal(labels[clean], expect[clean])
    assert hist.shape == (G * G, 5) and hist.sum() <= S * S

    present = set(np.unique(labels)) - {IGNORE_INDEX}
    if mode == "crop" and width > height:
        assert 4 not in present  # the far-left band is cropped away
        assert not transform.scored_region()[:, : int(0.12 * width)].any()
    else:
        assert 4 in present
    if mode == "pad":
        assert transform.scored_region().all()
        rows = labels.reshape(G, G)
        pad_tokens = int((max(shape) - min(shape)) / 2 * S / max(shape)) // P
        edge = rows[:pad_tokens] if width > height else rows[:, :pad_tokens]
        assert (edge == IGNORE_INDEX).all()  # padding is ignore
    else:
        assert (labels != IGNORE_INDEX).all()


@pytest.mark.parametrize("mode", ["pad", "crop", "resize"])
def test_image_and_mask_share_the_geometry(mode):
    """A planted colour layout in the image warps onto the same pixels as its mask."""
    height, width = 150, 260
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    mask = layout(yy, xx, height, width)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]])
    image = colours[mask].astype(np.uint8)
    geometry = Geometry(mode, S, fill=(7, 7, 7))
    warped_image = geometry.warp_image(image)
    warped_mask = geometry.plan(height, width).warp_mask(mask)
    assert warped_image.shape == (S, S, 3)
    # Bicubic resampling blurs 2 pixels either side of an edge; everywhere else colours match.
    interior = np.ones((S, S), bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            shifted = np.roll(warped_mask, (dy, dx), axis=(0, 1))
            interior &= shifted == warped_mask
    interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False
    valid = interior & (warped_mask != IGNORE_INDEX)
    assert valid.mean() > 0.5
    np.testing.assert_array_equal(warped_image[valid], colours[warped_mask[valid]])
    if mode == "pad":
        np.testing.assert_array_equal(warped_image[interior & ~valid], 7)


def test_crop_matches_hf_clip_processor_geometry():
    """The crop plan reproduces the HF CLIP processor (resize shortest edge, centre crop)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (200, 320, 3), dtype=np.uint8)
    proc = CLIPImageProcessorPil(
        size={"shortest_edge": S},
        crop_size={"height": S, "width": S},
        do_normalize=False,
        do_rescale=False,
        do_convert_rgb=True,
    )
    ref = np.asarray(proc(Image.fromarray(image), return_tensors="np")["pixel_values"][0])
    ours = Geometry("crop", S).warp_image(image).transpose(2, 0, 1).astype(np.float32)
    assert np.abs(ref - ours).mean() < 1.0


def test_patch_labels_majority_and_min_valid():
    mask = np.full((4, 4), IGNORE_INDEX)
    mask[:2, :2] = [[1, 1], [2, IGNORE_INDEX]]  # 3 of 4 valid: majority 1
    mask[:2, 2:] = [[3, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX]]  # 1 of 4 valid: ignore
    mask[2:, :2] = [[0, 0], [2, 2]]  # tie: lower class wins
    labels, hist = patch_labels(mask, 2, num_classes=4)
    assert labels.tolist() == [1, IGNORE_INDEX, 0, IGNORE_INDEX]
    assert hist[0].tolist() == [0, 2, 1, 0] and hist[1].tolist() == [0, 0, 0, 1]


def test_bad_geometry_values():
    with pytest.raises(ValueError, match="'squash' is not one of"):
        Geometry("squash", S)
    with pytest.raises(ValueError, match="not square with a side divisible by 5"):
        patch_labels(np.zeros((8, 8), int), 5, 2)
