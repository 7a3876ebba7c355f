"""Knockout controls matched on the clean probe's confidence: a planted case whose answer is known
(the control has the blocked set's confidence distribution), a random draw that must fail the same
check. The pool end to end, beside the others and through the twin, is in tests/test_twin.py."""

from __future__ import annotations

import numpy as np
import pytest

from seglens.analyses.knockout.sets import confidence_matched, random_control

TOLERANCE = 0.03  # largest gap between the sorted confidences of blocked set and control


def _planted(seed: int = 0):
    """One image of 256 tokens: 24 blocked tokens read confidently (0.80-0.98), the others
    spread over the whole range, so a confidence match exists for every blocked token."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.05, 1.0, 256)
    matched = np.zeros(256, dtype=bool)
    matched[rng.choice(256, 24, replace=False)] = True
    confidence[matched] = rng.uniform(0.80, 0.98, 24)
    return matched, confidence


def _gap(matched, control, confidence) -> float:
    return float(np.abs(np.sort(confidence[matched]) - np.sort(confidence[control])).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_matched_control_has_the_blocked_sets_confidence(seed):
    matched, confidence = _planted(seed)
    control = confidence_matched(matched, confidence, np.random.default_rng(seed))
    assert control.sum() == matched.sum() and not (control & matched).any()
    assert _gap(matched, control, confidence) < TOLERANCE
    assert abs(confidence[control].mean() - confidence[matched].mean()) < TOLERANCE / 3


def test_a_random_control_fails_the_same_check():
    """The check is not vacuous: a size-matched random draw from the image does not pass it."""
    matched, confidence = _planted(0)
    rngs = [np.random.default_rng(0)]
    control = random_control(matched[None], matched[None], rngs, "image")[0]
    assert control.sum() == matched.sum()
    assert _gap(matched, control, confidence) > 10 * TOLERANCE
    assert confidence[control].mean() < confidence[matched].mean() - 0.2


def test_the_matched_control_is_seeded_and_fills_from_the_set_when_short():
    matched, confidence = _planted(0)
    a, b = (confidence_matched(matched, confidence, np.random.default_rng(5)) for _ in range(2))
    assert np.array_equal(a, b)
    few = np.zeros(6, dtype=bool)
    few[:4] = True  # 4 to match, 2 others
    out = confidence_matched(few, np.linspace(0, 1, 6), np.random.default_rng(0))
    assert out.sum() == 4 and out[4:].all()  # both others first, then 2 from the set


def test_the_confidence_pool_needs_the_confidence():
    with pytest.raises(ValueError, match=r"confidence control pool needs the tokens' confidence"):
        random_control(np.ones((1, 4), bool), np.ones((1, 4), bool), [None], "confidence")
