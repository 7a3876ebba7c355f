"""Token order conditions: the reorder context, its invariants, and the order statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from family_checks import cached_model, edit_llm_input
from seglens.analyses.order.measure import (
    condition_names,
    follows_sequence,
    order_differences,
    order_tables,
    permutations,
    reorder,
)


def _llm(vlm):
    return [f"llm.{i}" for i in range(1, vlm.num_llm_layers + 1)]


@pytest.fixture(scope="module")
def batch(tiny_models):
    vlm = tiny_models("clip")
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (120, 150, 3), dtype=np.uint8) for _ in range(2)]
    return vlm.prepare(images)


@pytest.fixture(scope="module")
def plain(tiny_models, batch):
    """The plain model's adapter and LLM stages on ``batch`` (computed once)."""
    vlm = tiny_models("clip")
    return vlm.capture(batch, ["adapter", *_llm(vlm)])


def test_permutations_are_the_named_orders():
    perm = permutations("column_major", ["a"], (2, 3))
    assert perm.tolist() == [[0, 3, 1, 4, 2, 5]]
    assert permutations("reversed", ["a"], (2, 3)).tolist() == [[5, 4, 3, 2, 1, 0]]
    one, two = permutations("shuffled", ["a", "b"], (4, 4), seed=1)
    assert sorted(one) == list(range(16)) and not np.array_equal(one, two)
    again = permutations("shuffled", ["b"], (4, 4), seed=1)[0]  # per image, not per batch
    assert np.array_equal(two, again)
    with pytest.raises(ValueError, match="not one of raster, reversed"):
        permutations("backwards", ["a"], (2, 2))
    with pytest.raises(ValueError, match=r"permutation of 0\.\.3"):
        permutations([0, 0, 1, 2], ["a"], (2, 2))
    assert condition_names(("raster", "reversed"), ("token",)) == ["raster", "reversed/token"]


def test_identity_order_is_bitwise_the_plain_model(tiny_models, batch, plain):
    vlm = tiny_models("clip")
    for order, ids in (("raster", "sequence"), (np.arange(vlm.num_image_tokens), "token")):
        with reorder(vlm, order, ids):
            same = vlm.capture(batch, ["adapter", *_llm(vlm)])
        assert all(torch.equal(plain[s], same[s]) for s in plain)
    assert vlm.token_positions is None


def test_states_follow_their_tokens_and_ids_are_used(tiny_models, batch, plain):
    vlm = tiny_models("clip")
    with reorder(vlm, "reversed", "sequence"):
        seq = vlm.capture(batch, ["adapter", *_llm(vlm)])
    with reorder(vlm, "reversed", "token"):
        tok = vlm.capture(batch, _llm(vlm))
    last = f"llm.{vlm.num_llm_layers}"
    # Raster token N-1 is read first in the reversed order: under causal attention its state
    # is then that of a one-image-token sequence, unlike in raster order.
    assert not torch.equal(seq[last][:, -1], plain[last][:, -1])
    assert not torch.equal(seq[last], tok[last])  # the position ids option is not ignored
    assert torch.equal(seq["adapter"], plain["adapter"])


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_first_placed_token_reads_no_other_image_token(tiny_models, batch, plain, order):
    vlm = tiny_models("clip")
    first = permutations(order, batch.names, vlm.grid)[:, 0]  # (B,) raster index of slot 0
    keep = torch.zeros(len(batch), vlm.num_image_tokens, 1, dtype=torch.bool)
    keep[torch.arange(len(batch)), torch.from_numpy(first)] = True

    def bump(x):  # every image token but the one placed first, at the LLM input
        return torch.where(keep, x, x + 1.0)

    with reorder(vlm, order, "token"):
        base = vlm.capture(batch, _llm(vlm))
    handle = edit_llm_input(vlm, batch, bump)
    try:
        with reorder(vlm, order, "token"):
            bumped = vlm.capture(batch, _llm(vlm))
        plain_bumped = vlm.capture(batch, _llm(vlm))
    finally:
        handle.remove()
    rows = torch.arange(len(batch))
    for s in base:
        assert torch.equal(base[s][rows, first], bumped[s][rows, first])
        assert not torch.equal(base[s], bumped[s])
        # In raster order the same tokens sit late in the sequence and do move.
        assert not torch.equal(plain[s][rows, first], plain_bumped[s][rows, first])


def test_reorder_refuses_misuse(tiny_models, batch):
    vlm = tiny_models("clip")
    bad = "position_ids 'slot' is not one of sequence, token"
    with pytest.raises(ValueError, match=bad), reorder(vlm, "reversed", "slot"):
        pass
    with reorder(vlm, "reversed"):
        with pytest.raises(RuntimeError, match="already active"), reorder(vlm, "raster"):
            pass
        stale = r"did not come from vlm\.capture"
        with pytest.raises(RuntimeError, match=stale), torch.inference_mode():
            vlm.family.forward(batch.input_ids, batch.pixel_values, batch.attention_mask)
    assert vlm.token_positions is None


def _planted(follow: str, seed: int = 0):
    """(M, N) correctness on a 4 x 4 grid where the first 4 *sequence slots* (follow='sequence')
    or the first image row (follow='row') are right 40% of the time, others 90%."""
    rng = np.random.default_rng(seed)
    M, rows, cols = 300, 4, 4
    N = rows * cols
    valid = np.ones((M, N), bool)
    tables = {}
    for name, order in (("raster", "raster"), ("reversed/sequence", "reversed")):
        perm = permutations(order, [str(i) for i in range(M)], (rows, cols))
        slot_of = np.argsort(perm, axis=1)  # sequence slot of each raster token
        hard = slot_of < cols if follow == "sequence" else np.arange(N)[None] < cols
        correct = rng.random((M, N)) < np.where(hard, 0.4, 0.9)
        tables[name] = order_tables(correct, valid, perm, (rows, cols), band_rows=1)
    return order_differences(tables, n_resamples=300, seed=0)


def test_planted_sequence_deficit_is_found_and_a_content_deficit_is_not():
    bands, diff = _planted("sequence")
    moved = diff["reversed/sequence"]
    assert moved["by_row.first"]["low"] > 0.3  # the top row leaves the starved slots
    assert moved["by_row.last"]["high"] < -0.3  # the bottom row enters them
    assert abs(moved["by_sequence.first"]["estimate"]) < 0.1  # the slots stay starved
    assert bands["raster"]["by_sequence"]["first"] == pytest.approx(0.4, abs=0.05)
    assert follows_sequence(diff, "reversed/sequence") is True
    _, diff = _planted("row")  # the deficit belongs to the content: it moves with the tokens
    moved = diff["reversed/sequence"]
    assert follows_sequence(diff, "reversed/sequence") is False
    assert moved["by_row.first"]["low"] < 0 < moved["by_row.first"]["high"]
    assert moved["by_sequence.last"]["high"] < -0.3  # the top row now sits in the last slots


def _two_images(vlm):
    rng = np.random.default_rng(0)
    return vlm.prepare([rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(2)])


def test_mrope_ids_identity_is_bitwise_and_token_ids_differ():
    vlm = cached_model("tiny-qwen2-vl")  # (t, h, w) ids: each token keeps or gets the slot's
    batch = _two_images(vlm)
    plain = vlm.capture(batch, _llm(vlm))
    with reorder(vlm, "raster", "token"):
        same = vlm.capture(batch, _llm(vlm))
    assert all(torch.equal(plain[s], same[s]) for s in plain)
    last = _llm(vlm)[-1]
    with reorder(vlm, "reversed", "token"):
        token = vlm.capture(batch, [last])[last]
    with reorder(vlm, "reversed", "sequence"):
        sequence = vlm.capture(batch, [last])[last]
    assert not torch.equal(token, sequence)


def test_token_ids_make_a_bidirectional_image_block_order_free():
    # Gemma3's image tokens read each other both ways: with their own rotary angles, a token's
    # state does not depend on the order (up to float summation order); with the slot's it does.
    vlm = cached_model("tiny-gemma3")
    batch = _two_images(vlm)
    plain = vlm.capture(batch, _llm(vlm))
    with reorder(vlm, "shuffled", "token", seed=3):
        token = vlm.capture(batch, _llm(vlm))
    with reorder(vlm, "shuffled", "sequence", seed=3):
        sequence = vlm.capture(batch, _llm(vlm))
    for s in plain:
        torch.testing.assert_close(token[s], plain[s], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(sequence[s], plain[s], rtol=1e-4, atol=1e-5)


def test_blocks_say_when_the_analysis_was_off(tmp_path):
    from seglens.analyses import heads, order
    from seglens.report.page import Page

    page = Page({}, tmp_path)
    for module, key in ((order, "order"), (heads, "heads")):
        off = module.block({"config": {key: {"enabled": False}}}, page)
        assert f"Off in this run ({key}.enabled: false)" in off and "Not run" not in off
        assert "Not run" in module.block({"config": {key: {"enabled": True}}}, page)
