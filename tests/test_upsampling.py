"""``upsampled_argmax`` equals the argmax of the dense upsampled logits bit for bit, and the dense
upsampling equals torch's own bilinear resampling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seglens.data.geometry import Geometry
from seglens.metrics import pixel_predictions
from seglens.upsampling import upsampled_argmax


def dense_argmax(logits: torch.Tensor, transform) -> torch.Tensor:
    return transform.logits_to_original(logits).argmax(-3)


def random_case(seed: int):
    """A random geometry and (2, C, g, g) logits of one of several kinds, some adversarial."""
    rng = np.random.default_rng(seed)
    mode = ("pad", "crop", "resize")[seed % 3]
    H, W = (int(v) for v in rng.integers(8, 80, size=2))
    g, C = int(rng.integers(1, 9)), int(rng.integers(1, 14))
    transform = Geometry(mode, g * int(rng.integers(2, 7))).plan(H, W)
    gen = torch.Generator().manual_seed(seed)
    scale = (1e-3, 1.0, 1e3)[seed % 4 % 3]
    logits = torch.randn(2, C, g, g, generator=gen) * scale
    kind = seed % 6
    if kind == 1:  # peaked, like a trained probe: one class per token well above the rest
        labels = torch.randint(0, C, (2, g, g), generator=gen)
        logits += 6 * scale * F.one_hot(labels, C).permute(0, 3, 1, 2)
    elif kind == 2:  # exact ties: duplicated classes, the lower must win
        logits[:, C // 2] = logits[:, 0]
    elif kind == 3:  # classes LDA never saw (-inf stands as -1e30 in evaluation)
        logits[:, : C // 2] = -1e30
    elif kind == 4:  # few distinct values: many exact ties at pixels
        logits = (logits / scale * 2).round() / 2
    elif kind == 5 and C > 1:  # one class a single float32 step above another everywhere
        logits[:, 1] = torch.nextafter(logits[:, 0], torch.tensor(float("inf")))
    return logits, transform, int(rng.integers(1, 400))


@pytest.mark.parametrize("seed", range(60))
def test_upsampled_argmax_equals_the_dense_argmax_bit_for_bit(seed: int):
    logits, transform, max_elements = random_case(seed)
    expected = dense_argmax(logits, transform)
    assert torch.equal(upsampled_argmax(logits, transform), expected)
    assert torch.equal(upsampled_argmax(logits, transform, max_elements), expected)


def test_every_pixel_interpolated_and_every_cell_decided_by_corners_agree():
    """Noise (every sub-cell ambiguous) and strongly peaked logits (none): both exact."""
    transform = Geometry("crop", 96).plan(150, 203)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 40, 12, 12, generator=gen)
    labels = torch.randint(0, 40, (3, 3, 3), generator=gen).repeat_interleave(4, 1)
    blocks = F.one_hot(labels.repeat_interleave(4, 2), 40).permute(0, 3, 1, 2) * 50.0
    for logits in (noise, noise + blocks):
        assert torch.equal(upsampled_argmax(logits, transform), dense_argmax(logits, transform))


def test_a_class_one_step_above_another_at_one_corner_is_kept():
    """The pruning margin must keep a class that beats the best by a single float32 step."""
    transform = Geometry("resize", 32).plan(40, 40)
    logits = torch.zeros(3, 4, 4)
    logits[0] = 1.0
    logits[2] = -5.0
    logits[1] = logits[0]
    logits[1, 2, 2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    pred = upsampled_argmax(logits, transform)
    assert torch.equal(pred, dense_argmax(logits, transform))
    assert (pred == 1).any()  # class 1 wins near token (2, 2)
    assert (pred == 0).any()  # and class 0 (the tie, lower class) elsewhere


def test_leading_dimensions_are_independent_images_of_one_geometry():
    transform = Geometry("pad", 48).plan(30, 50)
    logits = torch.randn(2, 3, 7, 6, 6, generator=torch.Generator().manual_seed(1))
    whole = upsampled_argmax(logits, transform)
    assert whole.shape == (2, 3, 30, 50)
    for a in range(2):
        for b in range(3):
            assert torch.equal(whole[a, b], upsampled_argmax(logits[a, b], transform))
    assert torch.equal(pixel_predictions(logits, transform), whole)


@pytest.mark.parametrize("mode", ["pad", "crop", "resize"])
def test_dense_upsampling_equals_grid_sample(mode: str):
    """``logits_to_original`` against torch's bilinear ``grid_sample`` (border padding, not
    aligned corners) at the pixel centres, an independent implementation."""
    transform = Geometry(mode, 64).plan(77, 120)
    logits = torch.randn(5, 8, 8, generator=torch.Generator().manual_seed(2)) * 10
    ys = (np.arange(77) + 0.5) * transform.scale_y - transform.offset_y
    xs = (np.arange(120) + 0.5) * transform.scale_x - transform.offset_x
    gy = torch.as_tensor(ys / 64 * 2 - 1, dtype=torch.float32)
    gx = torch.as_tensor(xs / 64 * 2 - 1, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
    reference = F.grid_sample(
        logits[None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[0]
    torch.testing.assert_close(transform.logits_to_original(logits), reference, rtol=0, atol=1e-4)


def test_dense_upsampling_equals_interpolate_when_the_image_is_the_model_input():
    transform = Geometry("resize", 48).plan(48, 48)
    logits = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(3))
    reference = F.interpolate(logits[None], size=(48, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(transform.logits_to_original(logits), reference[0])


def test_bad_shapes_are_refused_with_the_expected_shape():
    transform = Geometry("crop", 32).plan(20, 40)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., C, g, g\)"):
        upsampled_argmax(torch.zeros(3, 4, 5), transform)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., C, g, g\)"):
        upsampled_argmax(torch.zeros(4, 4), transform)
