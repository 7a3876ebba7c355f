"""Metrics equal scikit-learn's, accumulate and merge exactly, and map back through the geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    jaccard_score,
)

from seglens.data.base import IGNORE_INDEX
from seglens.data.geometry import Geometry, patch_labels
from seglens.metrics import (
    ConfusionMatrix,
    PerImageCounts,
    PositionAccuracy,
    pixel_predictions,
    pixel_target,
)


def random_labels(
    seed: int, shape: tuple[int, ...], C: int, ignore_frac: float = 0.2, acc: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """(pred, target) of the given shape: targets with some ignore, preds right with prob acc."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, C, size=shape)
    pred = np.where(rng.random(shape) < acc, target, rng.integers(0, C, size=shape))
    target[rng.random(shape) < ignore_frac] = IGNORE_INDEX
    return pred, target


def sklearn_reference(pred: np.ndarray, target: np.ndarray, C: int) -> dict:
    """Scores computed independently with scikit-learn on the non-ignored elements."""
    keep = target.ravel() != IGNORE_INDEX
    t, p = target.ravel()[keep], pred.ravel()[keep]
    labels = list(range(C))
    jac = jaccard_score(t, p, labels=labels, average=None, zero_division=0)
    present = np.isin(labels, t) | np.isin(labels, p)  # union > 0
    return {
        "matrix": confusion_matrix(t, p, labels=labels),
        "jaccard": jac,
        "present": present,
        "miou": float(np.mean(jac[present])),
        "accuracy": accuracy_score(t, p),
        "t": t,
        "p": p,
    }


# ---------------------------------------------------------------- ConfusionMatrix vs scikit-learn


@pytest.mark.filterwarnings("ignore:A single label was found")
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("C", [1, 3, 21])
def test_confusion_matrix_equals_sklearn(seed: int, C: int):
    pred, target = random_labels(seed, (4, 17, 13), C)
    ref = sklearn_reference(pred, target, C)
    cm = ConfusionMatrix(C).update(pred, target)
    np.testing.assert_array_equal(cm.matrix.numpy(), ref["matrix"])
    assert cm.miou() == ref["miou"]
    iou = cm.per_class_iou()
    np.testing.assert_array_equal(iou[ref["present"]], ref["jaccard"][ref["present"]])
    assert np.isnan(iou[~ref["present"]]).all()
    assert cm.pixel_accuracy() == ref["accuracy"]


@pytest.mark.parametrize("seed", range(3))
def test_mean_class_accuracy_equals_balanced_accuracy(seed: int):
    C = 6
    pred, target = random_labels(seed, (2000,), C)
    ref = sklearn_reference(pred, target, C)
    assert set(np.unique(ref["t"])) == set(range(C))
    cm = ConfusionMatrix(C).update(torch.from_numpy(pred), torch.from_numpy(target))
    assert cm.mean_class_accuracy() == pytest.approx(
        balanced_accuracy_score(ref["t"], ref["p"]), rel=1e-12
    )


def test_absent_classes_are_left_out_of_miou():
    C = 5
    target = np.array([0, 0, 1, 1, IGNORE_INDEX])
    pred = np.array([0, 1, 1, 1, 4])  # class 4 predicted only on an ignored pixel
    cm = ConfusionMatrix(C).update(pred, target)
    iou = cm.per_class_iou()
    np.testing.assert_allclose(iou[:2], [1 / 2, 2 / 3])
    assert np.isnan(iou[2:]).all()
    assert cm.miou() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert cm.mean_class_accuracy() == pytest.approx((1 / 2 + 1) / 2)
    inter, union = cm.intersection_union()
    np.testing.assert_array_equal(inter, [1, 2, 0, 0, 0])
    np.testing.assert_array_equal(union, [2, 3, 0, 0, 0])


@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(max_examples=60, deadline=None)
@given(
    C=st.integers(1, 6),
    data=st.data(),
)
def test_confusion_matrix_property(C: int, data):
    n = data.draw(st.integers(1, 120))
    target = np.array(
        data.draw(st.lists(st.sampled_from([*range(C), 255]), min_size=n, max_size=n))
    )
    pred = np.array(data.draw(st.lists(st.integers(0, C - 1), min_size=n, max_size=n)))
    assume((target != IGNORE_INDEX).any())
    ref = sklearn_reference(pred, target, C)
    cm = ConfusionMatrix(C).update(pred, target)
    np.testing.assert_array_equal(cm.matrix.numpy(), ref["matrix"])
    assert cm.miou() == ref["miou"]
    assert cm.pixel_accuracy() == ref["accuracy"]


def test_nothing_scored_gives_nan_and_none():
    cm = ConfusionMatrix(3).update(np.zeros(4, np.int64), np.full(4, IGNORE_INDEX))
    assert np.isnan(cm.miou())
    assert np.isnan(cm.pixel_accuracy())
    assert np.isnan(cm.mean_class_accuracy())
    assert cm.to_dict() == {
        "miou": None,
        "pixel_accuracy": None,
        "mean_class_accuracy": None,
        "per_class_iou": [None, None, None],
    }


def test_to_dict_is_json_and_matches_methods():
    pred, target = random_labels(0, (500,), 4)
    target[target == 3] = 2  # class 3 only ever predicted -> defined IoU 0
    pred[pred == 3] = 1
    cm = ConfusionMatrix(4).update(pred, target)
    out = json.loads(json.dumps(cm.to_dict(), allow_nan=False))
    assert out["miou"] == cm.miou()
    assert out["pixel_accuracy"] == cm.pixel_accuracy()
    assert out["mean_class_accuracy"] == cm.mean_class_accuracy()
    assert out["per_class_iou"][:3] == cm.per_class_iou()[:3].tolist()
    assert out["per_class_iou"][3] is None


# ---------------------------------------------------------------- accumulation, merge, state


def test_batches_equal_one_update_and_merge_equals_whole():
    C = 7
    pred, target = random_labels(1, (10, 9, 11), C)
    whole = ConfusionMatrix(C).update(pred, target)
    batched = ConfusionMatrix(C)
    for i in range(0, 10, 3):
        batched.update(torch.from_numpy(pred[i : i + 3]), target[i : i + 3])
    assert torch.equal(batched.matrix, whole.matrix)
    first = ConfusionMatrix(C).update(pred[:4], target[:4])
    second = ConfusionMatrix(C).update(pred[4:], target[4:])
    first += second
    assert torch.equal(first.matrix, whole.matrix)
    assert first.to_dict() == whole.to_dict()


def test_state_dict_round_trip_and_reset():
    C = 4
    pred, target = random_labels(2, (300,), C)
    cm = ConfusionMatrix(C).update(pred, target)
    restored = ConfusionMatrix(C)
    restored.load_state_dict(cm.state_dict())
    assert torch.equal(restored.matrix, cm.matrix)
    cm.reset()
    assert cm.matrix.sum() == 0
    assert restored.matrix.sum() > 0


def test_mismatched_merge_and_state_raise():
    with pytest.raises(ValueError, match=r"\(5, 255\) does not match \(4, 255\)"):
        ConfusionMatrix(4).merge(ConfusionMatrix(5))
    with pytest.raises(ValueError, match=r"\(4, 0\) does not match \(4, 255\)"):
        ConfusionMatrix(4).merge(ConfusionMatrix(4, ignore_index=0))
    with pytest.raises(ValueError, match="state"):
        ConfusionMatrix(4).load_state_dict(ConfusionMatrix(3).state_dict())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        ([0, 1], [0, 7], r"target values \[7\] are outside 0\.\.4"),
        ([0, 1], [-1, 2], r"target values \[-1\]"),
        ([0, 9], [0, 1], r"prediction values \[9\] are outside 0\.\.4"),
        ([0, 255], [0, 1], r"prediction values \[255\]"),
        ([0, 1, 2], [0, 1], r"prediction shape \((1, )?3,?\) != target shape \((1, )?2,?\)"),
    ],
)
def test_bad_labels_raise_naming_the_value(pred, target, match):
    with pytest.raises(ValueError, match=match):
        ConfusionMatrix(5).update(np.array(pred), np.array(target))
    with pytest.raises(ValueError, match=match):
        PerImageCounts(5).add(np.array(pred), np.array(target))


def test_predictions_on_ignored_pixels_are_not_checked():
    cm = ConfusionMatrix(3).update(np.array([0, -5, 99]), np.array([0, 255, 255]))
    assert cm.matrix.sum() == 1


def test_float_labels_raise():
    with pytest.raises(ValueError, match=r"dtype torch\.float32; pass integer class ids"):
        ConfusionMatrix(3).update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype float64"):
        ConfusionMatrix(3).update(np.zeros(4, np.int64), np.zeros(4))


# ---------------------------------------------------------------- per-image counts and bootstrap


def planted_images(n: int, C: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, 12, 12) preds and targets whose accuracy varies from image to image."""
    rng = np.random.default_rng(seed)
    preds, targets = [], []
    for _ in range(n):
        p, t = random_labels(int(rng.integers(1 << 30)), (12, 12), C, acc=rng.uniform(0.3, 0.9))
        preds.append(p)
        targets.append(t)
    return np.stack(preds), np.stack(targets)


def test_per_image_counts_sum_to_the_confusion_matrix():
    C = 5
    preds, targets = planted_images(30, C)
    counts = PerImageCounts(C)
    for p, t in zip(preds[:10], targets[:10], strict=True):
        counts.add(p, t)
    counts.add_batch(torch.from_numpy(preds[10:]), torch.from_numpy(targets[10:]))
    batched = PerImageCounts(C).add_batch(preds, targets)
    np.testing.assert_array_equal(counts.intersection, batched.intersection)
    np.testing.assert_array_equal(counts.union, batched.union)
    cm = ConfusionMatrix(C).update(preds, targets)
    inter, union = cm.intersection_union()
    np.testing.assert_array_equal(counts.intersection.sum(0), inter)
    np.testing.assert_array_equal(counts.union.sum(0), union)
    assert counts.miou() == cm.miou()
    assert counts.pixel_accuracy() == cm.pixel_accuracy()
    assert len(counts) == 30
    assert counts.total.sum() == (targets != IGNORE_INDEX).sum()
    for i in range(3):  # each row is that image's own confusion matrix
        one = ConfusionMatrix(C).update(preds[i], targets[i])
        np.testing.assert_array_equal(counts.intersection[i], one.intersection_union()[0])
        assert counts.correct[i] == np.trace(one.matrix.numpy())


def test_per_image_merge_and_state():
    C = 5
    preds, targets = planted_images(20, C)
    whole = PerImageCounts(C).add_batch(preds, targets)
    merged = PerImageCounts(C).add_batch(preds[:7], targets[:7])
    merged.merge(PerImageCounts(C).add_batch(preds[7:], targets[7:]))
    restored = PerImageCounts(C)
    restored.load_state_dict(merged.state_dict())
    for other in (merged, restored):
        assert other.bootstrap_miou(200) == whole.bootstrap_miou(200)
        np.testing.assert_array_equal(other.union, whole.union)
    restored.reset()
    assert len(restored) == 0


def naive_bootstrap(counts: PerImageCounts, metric: str, R: int, confidence: float, seed: int):
    """One resample at a time, drawing the same indices as the vectorised version."""
    n = len(counts)
    idx = np.random.default_rng(seed).integers(0, n, size=(R, n))
    values = []
    for r in range(R):
        if metric == "miou":
            inter, union = counts.intersection[idx[r]].sum(0), counts.union[idx[r]].sum(0)
            values.append(np.mean(inter[union > 0] / union[union > 0]))
        else:
            values.append(counts.correct[idx[r]].sum() / counts.total[idx[r]].sum())
    alpha = (1 - confidence) / 2
    low, mid, high = np.quantile(values, [alpha, 0.5, 1 - alpha])
    estimate = counts.miou() if metric == "miou" else counts.pixel_accuracy()
    return (low, high), (estimate + low - mid, estimate + high - mid)


@pytest.mark.parametrize("metric", ["miou", "pixel_accuracy"])
def test_bootstrap_matches_naive_loop(metric: str):
    counts = PerImageCounts(5).add_batch(*planted_images(15))
    percentile, centred = naive_bootstrap(counts, metric, 300, 0.9, 3)
    got = counts.bootstrap(metric, n_resamples=300, confidence=0.9, seed=3)
    np.testing.assert_allclose(got, centred, rtol=1e-12)
    got = counts.bootstrap(metric, n_resamples=300, confidence=0.9, seed=3, method="percentile")
    np.testing.assert_allclose(got, percentile, rtol=1e-12)


@pytest.mark.parametrize("metric", ["miou", "pixel_accuracy"])
def test_bootstrap_contains_estimate_is_deterministic_and_widens(metric: str):
    preds, targets = planted_images(400)
    many = PerImageCounts(5).add_batch(preds, targets)
    few = PerImageCounts(5).add_batch(preds[:25], targets[:25])
    point = many.miou() if metric == "miou" else many.pixel_accuracy()
    low, high = many.bootstrap(metric, seed=1)
    assert low < point < high
    assert many.bootstrap(metric, seed=1) == (low, high)
    assert many.bootstrap(metric, seed=2) != (low, high)
    few_low, few_high = few.bootstrap(metric, seed=1)
    assert few_high - few_low > 2 * (high - low)


def test_bootstrap_of_identical_images_is_a_point():
    pred, target = random_labels(0, (16, 16), 4)
    counts = PerImageCounts(4)
    for _ in range(12):
        counts.add(pred, target)
    assert counts.bootstrap_miou() == (counts.miou(), counts.miou())
    acc = counts.pixel_accuracy()
    assert counts.bootstrap("pixel_accuracy") == (acc, acc)


def test_bootstrap_errors():
    counts = PerImageCounts(3)
    with pytest.raises(ValueError, match="zero images"):
        counts.bootstrap_miou()
    counts.add(np.array([0, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="'dice' is not one of"):
        counts.bootstrap("dice")
    with pytest.raises(ValueError, match=r"confidence=1\.5"):
        counts.bootstrap(confidence=1.5)


# ---------------------------------------------------------------- per-position accuracy


def test_position_accuracy_equals_numpy_reference():
    B, N = 37, 16
    pred, target = random_labels(4, (B, N), 3, ignore_frac=0.4)
    target[:, 5] = IGNORE_INDEX  # a position that is never scored
    pos = PositionAccuracy(N)
    pos.update(pred[:20], target[:20]).update(torch.from_numpy(pred[20:]), target[20:])
    valid = target != IGNORE_INDEX
    with np.errstate(invalid="ignore"):
        ref = ((pred == target) & valid).sum(0) / valid.sum(0)
    np.testing.assert_array_equal(pos.accuracy(), ref)
    assert np.isnan(pos.accuracy()[5])

    halves = PositionAccuracy(N).update(pred[:10], target[:10])
    halves += PositionAccuracy(N).update(pred[10:], target[10:])
    restored = PositionAccuracy(N)
    restored.load_state_dict(halves.state_dict())
    np.testing.assert_array_equal(restored.accuracy(), ref)


def test_position_accuracy_shape_error():
    with pytest.raises(ValueError, match=r"must both be \(B, 16\)"):
        PositionAccuracy(16).update(np.zeros((2, 15), np.int64), np.zeros((2, 15), np.int64))


# ---------------------------------------------------------------- pixel level


def one_hot_logits(labels: np.ndarray, C: int, g: int, margin: float = 10.0) -> torch.Tensor:
    """(N,) grid labels -> (C, g, g) logits with ``margin`` on the label; ignore tokens all 0."""
    logits = torch.zeros(C, g * g)
    keep = labels != IGNORE_INDEX
    logits[labels[keep], np.nonzero(keep)[0]] = margin
    return logits.reshape(C, g, g)


def test_perfect_patch_prediction_on_square_resize_gives_miou_one():
    S, g, side = 64, 8, 96  # an original patch is 12 x 12 pixels
    C = g * g  # a class per block: the argmax of the upsampled one-hot is the nearest token
    blocks = np.random.default_rng(0).permutation(C).reshape(g, g)
    mask = np.kron(blocks, np.ones((side // g, side // g), np.int64))
    transform = Geometry("resize", S).plan(side, side)
    labels, _ = patch_labels(transform.warp_mask(mask), g, C)
    np.testing.assert_array_equal(labels, blocks.ravel())
    pred = pixel_predictions(one_hot_logits(labels, C, g), transform)
    assert pred.shape == (side, side)
    assert pred.dtype == torch.int64
    cm = ConfusionMatrix(C).update(pred, pixel_target(mask, transform))
    assert cm.miou() == 1.0
    assert cm.pixel_accuracy() == 1.0


def test_perfect_patch_prediction_errs_only_at_concave_corners():
    """Bilinear upsampling then argmax is not exact where one class holds 3 of 4 tokens around a
    grid vertex: the odd token loses the pixels near that vertex. Nothing else may be wrong."""
    S, g, side, C = 64, 8, 96, 3
    q = side // g
    blocks = np.random.default_rng(0).integers(0, C, size=(g, g))
    mask = np.kron(blocks, np.ones((q, q), np.int64))
    transform = Geometry("resize", S).plan(side, side)
    labels, _ = patch_labels(transform.warp_mask(mask), g, C)
    pred = pixel_predictions(one_hot_logits(labels, C, g), transform).numpy()
    y, x = np.nonzero(pred != mask)
    assert 0 < len(y) < 0.1 * side * side
    for coord in (y, x):  # within half a patch of a grid vertex along both axes
        centre = coord + 0.5
        assert np.abs(centre - np.round(centre / q) * q).max() < q / 2


@pytest.mark.parametrize("mode", ["pad", "crop", "resize"])
@pytest.mark.parametrize(("height", "width"), [(120, 200), (200, 120)])
@pytest.mark.parametrize("split", [0.5, 0.37])
def test_pixel_predictions_invert_the_geometry(mode: str, height: int, width: int, split: float):
    S, g, C = 64, 16, 4
    transform = Geometry(mode, size=S).plan(height, width)
    y, x = np.mgrid[:height, :width]
    col, row = int(split * width), int((1 - split) * height)  # off-centre when split != 0.5
    mask = (x >= col).astype(np.int64) + 2 * (y >= row)
    labels, _ = patch_labels(transform.warp_mask(mask), g, C)
    pred = pixel_predictions(one_hot_logits(labels, C, g), transform).numpy()
    target = pixel_target(mask, transform)
    scored = target != IGNORE_INDEX
    np.testing.assert_array_equal(scored, transform.scored_region())
    agree = pred == mask

    # One patch, in original pixels along each axis, plus a pixel for rounding.
    patch_y, patch_x = S / g / transform.scale_y + 1, S / g / transform.scale_x + 1
    far = (np.abs(y + 0.5 - row) > patch_y) & (np.abs(x + 0.5 - col) > patch_x)
    assert agree[scored & far].all()
    assert agree[scored].mean() > (0.99 if split == 0.5 else 0.95)

    if mode == "crop":  # the long side loses a band at both ends; nothing else is unscored
        long_axis = 1 if width > height else 0
        lost = ~scored.any(axis=1 - long_axis)
        assert lost[0]
        assert lost[-1]
        assert abs((~lost).sum() - min(height, width)) <= 1  # the kept square, in original pixels
        assert scored.any(axis=long_axis).all()  # the short side is kept whole
        np.testing.assert_array_equal(scored, np.outer(scored.any(1), scored.any(0)))
    else:
        assert scored.all()


def test_chunked_pixel_predictions_equal_unchunked_and_break_ties_low():
    C, g = 7, 6
    logits = torch.randn(C, g, g, generator=torch.Generator().manual_seed(0))
    logits[5] = logits[2]  # exact ties: the lower class must win in every chunking
    logits[2, :3] += 5.0
    transform = Geometry("pad", 48).plan(30, 50)
    whole = pixel_predictions(logits, transform)
    reference = transform.logits_to_original(logits).argmax(dim=0)
    assert torch.equal(whole, reference)
    for max_elements in (1, 2 * 30 * 50, 3 * 30 * 50 + 7):
        assert torch.equal(pixel_predictions(logits, transform, max_elements), reference)
    assert not (whole == 5).any()


def test_pixel_target_keeps_the_input_kind_and_checks_shape():
    transform = Geometry("crop", 32).plan(20, 40)
    mask = np.ones((20, 40), np.uint8)
    as_numpy, as_torch = (
        pixel_target(mask, transform),
        pixel_target(torch.from_numpy(mask), transform),
    )
    assert isinstance(as_numpy, np.ndarray)
    assert as_numpy.dtype == np.int64
    assert isinstance(as_torch, torch.Tensor)
    np.testing.assert_array_equal(as_torch.numpy(), as_numpy)
    assert (as_numpy == IGNORE_INDEX).any()
    assert mask.max() == 1  # the input is untouched
    with pytest.raises(ValueError, match=r"mask shape \(40, 20\) != the transform's image shape"):
        pixel_target(mask.T, transform)
    with pytest.raises(ValueError, match=r"expected \(\.\.\., C, g, g\)"):
        pixel_predictions(torch.zeros(3, 4, 5), transform)
