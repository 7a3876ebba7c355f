"""Property-based tests (hypothesis): geometry and patch labelling on random image sizes, modes
and label maps, and the query -> key semantics of the attention-mask builder on random token
sets. That no query row is ever empty, padding included, is shown by
``test_interventions.test_no_query_row_is_ever_empty``."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seglens.data.base import IGNORE_INDEX
from seglens.data.geometry import MODES, Geometry, patch_labels
from seglens.interventions import Knockout, TokenSet, allowed_edges
from seglens.models.vlm import Batch

SIZES = st.integers(20, 400)


@st.composite
def labelled_images(draw):
    """(geometry, H, W, mask, C, min_valid): a random mode, S = g * p and a random label map."""
    mode = draw(st.sampled_from(MODES))
    grid, patch = draw(st.integers(2, 8)), draw(st.sampled_from([4, 7, 14]))
    height, width = draw(SIZES), draw(SIZES)
    C = draw(st.integers(2, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Blocky maps (as segmentations are) with sprinkled ignore pixels.
    block = draw(st.integers(1, 40))
    coarse = rng.integers(0, C, (-(-height // block), -(-width // block)))
    mask = np.kron(coarse, np.ones((block, block), np.int64))[:height, :width]
    mask[rng.random((height, width)) < draw(st.floats(0, 0.5))] = IGNORE_INDEX
    min_valid = draw(st.floats(0.05, 1.0))
    return Geometry(mode, grid * patch), grid, height, width, mask, C, min_valid


@settings(max_examples=150, deadline=None)
@given(labelled_images())
def test_patch_labels_on_random_sizes_and_maps(case):
    geometry, g, height, width, mask, C, min_valid = case
    S, p = geometry.size, geometry.size // g
    t = geometry.plan(height, width)
    warped = t.warp_mask(mask)
    assert warped.shape == (S, S)
    assert set(np.unique(warped)) <= set(np.unique(mask)) | {IGNORE_INDEX}

    labels, hist = patch_labels(warped, g, C, min_valid)
    assert labels.shape == (g * g,) and hist.shape == (g * g, C)
    assert (((labels >= 0) & (labels < C)) | (labels == IGNORE_INDEX)).all()
    blocks = warped.reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, p * p)
    for k in range(C):  # the histogram counts every labelled pixel of each token
        np.testing.assert_array_equal(hist[:, k], (blocks == k).sum(1))
    counts = hist.sum(1)
    np.testing.assert_array_equal(counts, (blocks != IGNORE_INDEX).sum(1))
    kept = counts >= min_valid * p * p
    np.testing.assert_array_equal(labels[kept], hist[kept].argmax(1))  # majority, low id on ties
    assert (labels[~kept] == IGNORE_INDEX).all()

    # A token whose every pixel centre falls outside the image (padding) is ignore, empty.
    centres = np.arange(S) + 0.5
    ys, xs = t.to_original(centres, centres)
    inside = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]
    token_inside = inside.reshape(g, p, g, p).transpose(0, 2, 1, 3).reshape(g * g, -1).any(1)
    assert (labels[~token_inside] == IGNORE_INDEX).all() and (hist[~token_inside] == 0).all()
    if geometry.mode != "pad":
        assert inside.all()  # crop and resize cover the model input with image

    # A constant map warps to that constant inside the image and to ignore outside.
    value = int(np.random.default_rng(height * width).integers(0, C))
    const = t.warp_mask(np.full((height, width), value))
    assert (const[inside] == value).all() and (const[~inside] == IGNORE_INDEX).all()

    # The scored region is exactly where original pixel centres land in [0, S).
    cy, cx = t.to_model(np.arange(height) + 0.5, np.arange(width) + 0.5)
    expected = ((cy >= 0) & (cy < S))[:, None] & ((cx >= 0) & (cx < S))[None, :]
    np.testing.assert_array_equal(t.scored_region(), expected)
    if geometry.mode != "crop":
        assert expected.all()  # only a crop drops pixels


def _batch(lengths: list[int], start: int, n: int, total: int) -> Batch:
    B = len(lengths)
    attention = torch.zeros(B, total, dtype=torch.long)
    for b, length in enumerate(lengths):
        attention[b, :length] = 1  # right padding
    return Batch(
        input_ids=torch.zeros(B, total, dtype=torch.long),
        attention_mask=attention,
        pixel_values=torch.zeros(B, 3, 1, 1),
        image_positions=(start + torch.arange(n)).expand(B, n).clone(),
    )


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(9, 14), min_size=1, max_size=3),
    queries=st.sets(st.integers(0, 5)),
    keys=st.sets(st.integers(0, 5)),
)
def test_knockout_blocks_exactly_its_query_to_key_edges(lengths, queries, keys):
    N, start, total = 6, 2, max(lengths)
    batch = _batch(lengths, start, N, total)
    spec = Knockout(queries=TokenSet.from_slots(queries), keys=TokenSet.from_slots(keys))
    allowed = allowed_edges([spec], batch)
    plain = allowed_edges([], batch)
    real = batch.attention_mask.bool()
    idx = torch.arange(total)
    causal = (idx[None, :] <= idx[:, None])[None] & real[:, None, :]
    assert plain[real].equal(causal[real])  # no spec: causal over real keys
    q = torch.zeros(total, dtype=torch.bool)
    k = torch.zeros(total, dtype=torch.bool)
    q[[start + i for i in queries]] = True
    k[[start + j for j in keys]] = True
    blocked = q[:, None] & k[None, :]  # [query, key]: query i loses key j
    blocked &= ~torch.eye(total, dtype=torch.bool)  # a token always keeps itself
    blocked[:, 0] = False  # and BOS
    expected = causal & ~blocked[None]
    assert allowed[real].equal(expected[real])
    # Direction matters: swapping the sets blocks the transposed (query, key) pairs instead.
    swapped = Knockout(queries=TokenSet.from_slots(keys), keys=TokenSet.from_slots(queries))
    transposed = causal & ~blocked.T[None]
    assert allowed_edges([swapped], batch)[real].equal(transposed[real])
