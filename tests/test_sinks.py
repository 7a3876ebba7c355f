"""Sink tokens: a planted massive activation is flagged where it lives, a random model has none;
counts per position and class, scores with and without the sinks, sink keys and their control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from family_checks import cached_model
from seglens.experiments.knockout_sets import sink_key_sets
from seglens.readouts.sinks import SinkOptions, SinkScorer, flag_sinks

SLOT = 5  # the planted token's image slot


@pytest.fixture(scope="module")
def vlm():
    return cached_model("tiny-clip")


@pytest.fixture(scope="module")
def batch(vlm):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    blocks = np.ones((28, 28), np.int64)
    masks = [np.kron(rng.integers(0, 3, (8, 8)), blocks).astype(np.uint8) for _ in range(3)]
    return vlm.prepare(images, masks, num_classes=3)


def _plant(vlm, value=200.0, dim=3):
    """A massive value in one dimension of one image token, at the adapter output."""

    def hook(_m, _a, out):
        out = out.clone()
        out.view(out.shape[0], -1, out.shape[-1])[:, SLOT, dim] = value
        return out

    return vlm.model.model.multi_modal_projector.register_forward_hook(hook)


@pytest.mark.parametrize("rule", ["norm", "massive", "either"])
def test_planted_massive_activation_is_flagged_and_a_random_model_has_none(vlm, batch, rule):
    opts = SinkOptions(rule=rule)
    plain = vlm.capture(batch, vlm.stages)
    for stage, h in plain.items():
        assert not flag_sinks(h, opts).any(), stage
    handle = _plant(vlm)
    try:
        planted = vlm.capture(batch, ["encoder", "adapter", "llm.1", "llm.4"])
    finally:
        handle.remove()
    assert not flag_sinks(planted["encoder"], opts).any()  # before the plant
    for stage in ("adapter", "llm.1", "llm.4"):  # the residual stream carries it on
        flags = flag_sinks(planted[stage], opts)
        assert flags[:, SLOT].all() and flags.sum() == len(batch), stage


def test_flags_do_not_depend_on_the_other_images(vlm, batch):
    h = vlm.capture(batch, ["llm.2"])["llm.2"].clone()
    h[0, 7] *= 20
    flags = flag_sinks(h)
    assert flags[0, 7] and flags.sum() == 1
    assert torch.equal(flag_sinks(h[1:]), flags[1:])


def test_scorer_counts_positions_classes_and_scores_without_sinks(vlm, batch):
    stages = ["encoder", "adapter", "llm.2"]
    readers = {"constant": lambda s, h: torch.zeros(*h.shape[:2], 3)}  # predicts class 0
    readers["adapter only"] = lambda s, h: None if s != "adapter" else torch.zeros(*h.shape[:2], 3)
    scorer = SinkScorer(stages, 3, vlm.num_image_tokens, readers=readers)
    handle = _plant(vlm)
    try:
        scorer(batch, vlm.capture(batch, stages))
    finally:
        handle.remove()
    out = scorer.section(["a", "b", "c"])
    assert out["rule"] == "norm" and out["images"] == 3
    assert out["stages"]["encoder"]["count"] == 0
    adapter = out["stages"]["adapter"]
    assert adapter["count"] == 3 and adapter["positions"][SLOT] == 3
    assert adapter["share"] == pytest.approx(3 / (3 * vlm.num_image_tokens))
    labels = batch.labels[:, SLOT].tolist()
    want = {}
    for label in labels:
        key = "abc"[label] if label != 255 else "ignore"
        want[key] = want.get(key, 0) + 1
    assert adapter["classes"] == want
    scores = adapter["scores"]["constant"]
    assert scores["all"]["tokens"] == scores["without"]["tokens"] + scores["sinks"]["tokens"]
    assert scores["sinks"]["tokens"] == sum(label != 255 for label in labels)
    assert scores["sinks"]["accuracy"] == np.mean([label == 0 for label in labels if label != 255])
    assert set(out["stages"]["llm.2"]["scores"]) == {"constant"}  # the other reads adapter only


def test_sink_keys_and_their_size_matched_control():
    sinks = np.zeros((3, 16), bool)
    sinks[0, [1, 2]] = True
    sinks[2, :15] = True  # nearly all sinks: the control has to reuse some
    sets = sink_key_sets(sinks, [np.random.default_rng(i) for i in range(3)])
    assert np.array_equal(sets["block_sinks"], sinks)
    control = sets["random_sinks"]
    assert control.sum(1).tolist() == [2, 0, 15]
    assert not (control[0] & sinks[0]).any()
    assert control[2, 15]  # the one non-sink comes first


def test_bad_options_are_errors():
    with pytest.raises(ValueError, match="sinks rule 'top' is not one of"):
        SinkOptions(rule="top")
    with pytest.raises(ValueError, match=r"norm_factor=1\.0 must be > 1"):
        SinkOptions(norm_factor=1.0)
