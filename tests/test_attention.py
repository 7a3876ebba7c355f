"""Attention to anchors: the shares recomputed for chosen query rows equal eager attention
weights (HF ``output_attentions`` and the eager module's own weights, also under a knockout
mask), sum to 1 per query, agree under sdpa, and the run writes its section and figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import results_of
from seglens.analyses.attention.measure import (
    CATEGORIES,
    category_mass,
    key_category,
    measure_attention,
    query_plan,
    run_attention,
)
from seglens.interventions import Knockout, TokenSet, intervene


def _plan_inputs(vlm, random_images, seed=0):
    batch = vlm.prepare(random_images(2))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (2, vlm.num_image_tokens))
    ref_correct = rng.random(labels.shape) < 0.5
    return batch, labels, ref_correct


def _expected(weights, plan):
    """Direct shares from full (B, H, T, T) weights at the plan's query rows."""
    rows = weights.float().mean(1)  # (B, T, T)
    pos = plan["positions"]
    probs = torch.stack([rows[b, pos[b]] for b in range(len(pos))])  # (B, Q, T)
    onehot = torch.nn.functional.one_hot(key_category(plan).long(), 3).float()
    return torch.einsum("bqt,bqtc->bqc", probs, onehot)


def test_shares_equal_eager_output_attentions_and_sum_to_one(tiny_models, random_images):
    vlm = tiny_models("clip", "eager")
    batch, labels, ref_correct = _plan_inputs(vlm, random_images)
    plan = query_plan(batch, labels, ref_correct, (0, 1))
    layers = vlm.family.decoder_layers()
    with measure_attention(layers, plan, batch.attention_mask.bool()) as got:
        vlm.capture(batch, [f"llm.{len(layers)}"])
    inputs = dict(
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
    )
    with torch.no_grad():
        ref = vlm.model(**inputs, output_attentions=True)
    valid = plan["valid"]
    assert len(ref.attentions) == len(layers) == 4
    for layer, weights in enumerate(ref.attentions):
        mass, uniform = got[layer]
        expected = _expected(weights, plan)
        torch.testing.assert_close(mass[valid], expected[valid], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass.sum(-1)[valid], torch.ones(int(valid.sum())))
        torch.testing.assert_close(uniform.sum(-1)[valid], torch.ones(int(valid.sum())))
        # Uniform share = readable keys of the category / readable keys (causal, no padding).
        b, q = torch.nonzero(valid)[0]
        pos = int(plan["positions"][b, q])
        cats = key_category(plan)[b, q, : pos + 1].long()
        counts = torch.bincount(cats, minlength=3).float() / (pos + 1)
        torch.testing.assert_close(uniform[b, q], counts)


def test_sdpa_and_a_knockout_mask(tiny_models, random_images):
    """Under sdpa (no weights returned) the shares equal eager's; under a knockout the blocked
    keys get no mass and the shares equal the eager module's own weights."""
    eager, sdpa = tiny_models("clip", "eager"), tiny_models("clip", "sdpa")
    batch, labels, ref_correct = _plan_inputs(eager, random_images, seed=1)
    plan = query_plan(batch, labels, ref_correct, (1, 2))
    real = batch.attention_mask.bool()
    blocked = np.zeros((2, eager.num_image_tokens), bool)
    blocked[:, 10:60] = True
    results = {}
    for name, vlm in (("eager", eager), ("sdpa", sdpa)):
        layers = vlm.family.decoder_layers()
        weights = []
        handles = [
            layer.self_attn.register_forward_hook(lambda m, a, out, w=weights: w.append(out[1]))
            for layer in layers
        ]
        spec = Knockout(keys=TokenSet.from_mask(blocked), later_only=True)
        try:
            with intervene(vlm, [spec]), measure_attention(layers, plan, real) as got:
                vlm.capture(batch, [f"llm.{len(layers)}"])
        finally:
            for h in handles:
                h.remove()
        results[name] = got
        if name == "eager":
            valid = plan["valid"]
            for layer, w in enumerate(weights):
                expected = _expected(w, plan)
                torch.testing.assert_close(
                    got[layer][0][valid], expected[valid], atol=1e-5, rtol=1e-5
                )
    for layer in range(4):
        for k in range(2):
            torch.testing.assert_close(
                results["sdpa"][layer][k], results["eager"][layer][k], atol=1e-5, rtol=1e-4
            )


def test_query_chunks_bound_the_scores_and_change_nothing(tiny_models, random_images):
    """With a chunk of 3 queries' scores, no softmax sees more than 3 query rows, and the shares
    equal those of one chunk holding every query."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Softmaxes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten._softmax, torch.ops.aten.softmax):
                self.shapes.append(tuple(out.shape))
            return out

    vlm = tiny_models("clip", "sdpa")
    batch, labels, ref_correct = _plan_inputs(vlm, random_images, seed=2)
    plan = query_plan(batch, labels, ref_correct, (0, 2))
    layers, real = vlm.family.decoder_layers(), batch.attention_mask.bool()
    heads = vlm.model.config.text_config.num_attention_heads
    T = batch.input_ids.shape[1]
    with measure_attention(layers, plan, real, chunk_bytes=1 << 40) as whole:
        vlm.capture(batch, [f"llm.{len(layers)}"])
    mode = Softmaxes()
    three = 2 * heads * T * 4 * 3  # B = 2 images, 3 queries
    with measure_attention(layers, plan, real, chunk_bytes=three) as chunked, mode:
        vlm.capture(batch, [f"llm.{len(layers)}"])
    scores = [s for s in mode.shapes if len(s) == 4 and s[1] == heads and s[-1] == T]
    Q = plan["positions"].shape[1]
    assert Q > 3 and len(scores) == len(layers) * -(-Q // 3)
    assert max(s[2] for s in scores) == 3
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a[1], b[1])
    assert plan["key_class"].dtype == torch.int16 and key_category(plan).dtype == torch.int8


def test_category_mass_by_hand():
    probs = torch.tensor([[[[0.5, 0.3, 0.2, 0.0]], [[0.1, 0.1, 0.8, 0.0]]]])  # (1, 2, 1, 4)
    category = torch.tensor([[[2, 0, 1, 1]]])
    readable = torch.tensor([[[True, True, True, False]]])
    mass, uniform = category_mass(probs, category, readable)
    torch.testing.assert_close(mass[0, 0], torch.tensor([0.2, 0.5, 0.3]))
    torch.testing.assert_close(uniform[0, 0], torch.tensor([1 / 3, 1 / 3, 1 / 3]))


@pytest.fixture(scope="module")
def attention_run(make_probe_run, tiny_models):
    run = make_probe_run("attention")
    section = run_attention(run, vlm=tiny_models("clip"), progress=False)
    return run, section


def test_run_writes_the_section_and_the_figure(attention_run):
    from seglens.report import draw_all  # the caller draws (run_attention only measures)

    run, section = attention_run
    draw_all(run)
    res = results_of(run)
    assert res["attention"] == section and section["categories"] == list(CATEGORIES)
    assert section["pairs"], "the tiny run has confused pairs that co-occur"
    for pair in section["pairs"]:
        assert set(pair["layers"]) == {f"llm.{i}" for i in range(1, 5)}
        for cells in pair["layers"].values():
            for group in ("incorrect", "correct"):
                cell = cells[group]
                if cell["queries"]:
                    assert sum(cell["share"].values()) == pytest.approx(1.0)
                    assert sum(cell["uniform"].values()) == pytest.approx(1.0)
                    for c in CATEGORIES:
                        if cell["uniform"][c] > 0:
                            assert cell["ratio"][c] == pytest.approx(
                                cell["share"][c] / cell["uniform"][c]
                            )
    assert "LLM layers" in section["statement"]
    assert (run / res["figures"]["attention_anchors"]).stat().st_size > 0
