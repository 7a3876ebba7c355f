"""Per-head anchors: head masks, the ranking, random head draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seglens.analyses.heads.measure import draw_random_heads, head_knockout, num_heads, rank_heads
from seglens.interventions import Knockout, TokenSet, intervene


def _per_head_outputs(vlm, batch, layer, heads=None, specs=()):
    """(B, T, H, d) attention output per head (the o_proj input) at ``layer``."""
    attn = vlm.family.decoder_layers()[layer - 1].self_attn
    seen = {}

    def keep(_m, args):
        seen["x"] = args[0].clone()

    handle = attn.o_proj.register_forward_pre_hook(keep)
    try:
        with intervene(vlm, []):
            if heads is None:
                vlm.capture(batch, [f"llm.{layer}"])
            else:
                with head_knockout(vlm, batch, specs, heads):
                    vlm.capture(batch, [f"llm.{layer}"])
    finally:
        handle.remove()
    x = seen["x"]
    return x.view(*x.shape[:2], num_heads(vlm), -1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_per_head_mask_leaves_every_other_head_bitwise_unchanged(tiny_models, attn):
    vlm = tiny_models("clip", attn)
    rng = np.random.default_rng(0)
    batch = vlm.prepare([rng.integers(0, 256, (100, 120, 3), dtype=np.uint8) for _ in range(2)])
    N, H, layer = vlm.num_image_tokens, num_heads(vlm), 2
    specs = [Knockout(keys=TokenSet.from_slots(range(N // 2)))]
    plain = _per_head_outputs(vlm, batch, layer)
    chosen = [1, H - 1]
    cut = _per_head_outputs(vlm, batch, layer, {layer: chosen}, specs)
    for h in range(H):
        same = torch.equal(plain[:, :, h], cut[:, :, h])
        assert same == (h not in chosen), f"head {h} ({attn})"
    # Every head of every layer: the same edges as the plain all-layer knockout.
    every = {layer: list(range(H)) for layer in range(1, vlm.num_llm_layers + 1)}
    last = f"llm.{vlm.num_llm_layers}"
    with intervene(vlm, []), head_knockout(vlm, batch, specs, every):
        by_heads = vlm.capture(batch, [last])[last]
    with intervene(vlm, specs):
        whole = vlm.capture(batch, [last])[last]
    torch.testing.assert_close(by_heads, whole, rtol=0, atol=1e-5)


def test_head_knockout_refuses_misuse(tiny_models):
    vlm = tiny_models("clip")
    batch = vlm.prepare([np.zeros((64, 64, 3), np.uint8)])
    spec = [Knockout(keys="image")]
    with (
        pytest.raises(ValueError, match="out of range"),
        head_knockout(vlm, batch, spec, {1: [num_heads(vlm)]}),
    ):
        pass
    with (
        pytest.raises(RuntimeError, match="needs the 4D mask"),
        head_knockout(vlm, batch, spec, {1: [0]}),
    ):
        vlm.capture(batch, ["llm.1"])


def test_rank_heads_finds_the_planted_head():
    rng = np.random.default_rng(0)
    n, L, H = 40, 3, 4
    queries = rng.integers(5, 10, n).astype(float)
    uniform = np.tile((0.1 * queries)[:, None], (1, L))  # anchors: 10% of the readable keys
    mass = np.tile((0.1 * queries)[:, None, None], (1, L, H)) * rng.uniform(0.8, 1.2, (n, L, H))
    mass[:, 1, 2] = 0.5 * queries  # llm.2 head 2 reads its anchors 5x the uniform share
    ranked = rank_heads(mass, uniform, queries, n_resamples=200)
    best = ranked["ranking"][0]
    assert (best["layer"], best["head"]) == (2, 2)
    assert best["ratio"] == pytest.approx(5.0)
    assert best["low"] > 4 and best["high"] < 6
    assert all(r["low"] < 1.3 for r in ranked["ranking"][1:])
    shares = [r["share"] for r in ranked["ranking"]]
    assert shares == sorted(shares, reverse=True) and len(shares) == L * H


def test_random_heads_come_from_the_same_layers():
    rng = np.random.default_rng(0)
    top = [(2, 0), (2, 1), (4, 3)]
    for _ in range(5):
        drawn = draw_random_heads(top, 4, rng)
        assert sorted(layer for layer, _ in drawn) == [2, 2, 4]
        assert not set(drawn) & set(top)  # enough other heads: none of the top ones
    every = [(1, h) for h in range(4)]
    assert sorted(draw_random_heads(every, 4, rng)) == every  # k = all heads of the layer
