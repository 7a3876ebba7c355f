"""One bincount per stage-image (``score_target`` + ``confusion_of`` + ``add_confusion``), or per
image for all its stages (``tables``, ``add_tables``), gives
exactly the counts of ``ConfusionMatrix.update`` and ``PerImageCounts.add``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seglens.metrics import ConfusionMatrix, PerImageCounts, confusion_of, score_target


def _pairs(seed: int, C: int, shape=(37, 53)):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, C, shape)
    target[rng.random(shape) < 0.2] = 255
    return torch.from_numpy(rng.integers(0, C, shape)), torch.from_numpy(target)


@pytest.mark.parametrize("C", [2, 7, 150])
def test_fused_counts_equal_the_update_paths(C: int):
    cm_ref, cm = ConfusionMatrix(C), ConfusionMatrix(C)
    per_ref, per = PerImageCounts(C), PerImageCounts(C)
    for seed in range(4):
        pred, target = _pairs(seed, C)
        cm_ref.update(pred, target)
        per_ref.add(pred, target)
        confusion = confusion_of(pred, *score_target(target, C), C)
        cm.matrix += confusion
        per.add_confusion(confusion)
    assert torch.equal(cm.matrix, cm_ref.matrix)
    assert np.array_equal(per._table(), per_ref._table())
    assert per.miou() == cm_ref.miou()
    assert per.bootstrap("miou", 50) == per_ref.bootstrap("miou", 50)


def test_add_confusion_takes_a_batch():
    C = 5
    preds, targets = zip(*(_pairs(s, C) for s in range(3)), strict=True)
    per_ref, per = PerImageCounts(C), PerImageCounts(C)
    per_ref.add_batch(torch.stack(preds), torch.stack(targets))
    per.add_confusion(
        torch.stack(
            [confusion_of(p, *score_target(t, C), C) for p, t in zip(preds, targets, strict=True)]
        )
    )
    assert np.array_equal(per._table(), per_ref._table())


def test_bad_target_and_bad_shape_are_named():
    with pytest.raises(ValueError, match=r"target values \[9\] are outside 0\.\.4"):
        score_target(torch.tensor([[0, 9], [1, 255]]), 5)
    with pytest.raises(ValueError, match=r"expected \(B, 5, 5\)"):
        PerImageCounts(5).add_confusion(torch.zeros(4, 4, dtype=torch.int64))


def test_stages_of_one_image_in_one_bincount_equal_one_per_stage():
    """``confusion_of`` with leading dimensions and ``tables`` / ``add_tables`` for all stages at
    once (the path ``evaluate_probes`` takes) give each stage's own counts."""
    C = 7
    _, target = _pairs(0, C)
    scored = score_target(target, C)
    preds = torch.stack([_pairs(seed, C)[0] for seed in range(1, 7)]).view(2, 3, 37, 53)
    batched = confusion_of(preds, *scored, C)
    assert batched.shape == (2, 3, C, C)
    for a in range(2):
        for b in range(3):
            assert torch.equal(batched[a, b], confusion_of(preds[a, b], *scored, C))
    tables = PerImageCounts.tables(batched.view(6, C, C))
    one, each = PerImageCounts(C), PerImageCounts(C)
    for k in range(6):
        one.add_tables(tables[k : k + 1])
        each.add(preds.view(6, 37, 53)[k], target)
    assert np.array_equal(one._table(), each._table())


def test_batched_shapes_are_checked():
    _, target = _pairs(0, 5)
    with pytest.raises(ValueError, match=r"pred shape \(2, 37, 52\) does not end in \(37, 53\)"):
        confusion_of(torch.zeros(2, 37, 52, dtype=torch.int64), *score_target(target, 5), 5)
    with pytest.raises(ValueError, match=r"tables have shape \(1, 11\); expected \(B, 12\)"):
        PerImageCounts(5).add_tables(np.zeros((1, 11), np.int64))
