"""Sink tokens: a planted massive activation is flagged where it lives, a random model has none;
counts per position and class, scores with and without the sinks, sink keys and their control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from family_checks import cached_model
from seglens.analyses.knockout.sets import sink_key_sets
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


class _RandomProbe:
    """A fixed random linear readout (what ``predict_stages`` needs of a probe)."""

    def __init__(self, width: int, num_classes: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(width, num_classes, generator=g)

    def predict(self, h):
        return (h.float() @ self.weight).argmax(-1)


def test_sink_keys_knockout_blocks_the_planted_token_and_a_random_model_none(vlm, monkeypatch):
    """A planted massive activation is the one sink key knocked out (and its control one other
    token per image); the clean condition equals the probes read off the plain capture of the
    flagging pass on the tokens in neither set; a plain random model has no sink keys and runs no
    forward."""
    import seglens.analyses.knockout.measure as knockout
    from seglens.config import load_config
    from seglens.experiments.common import build_dataset
    from seglens.metrics import ConfusionMatrix
    from seglens.readouts.analysis import sink_keys_html
    from seglens.readouts.run import run_pass
    from seglens.readouts.sinkkeys import SINK_KEY_DIFFERENCES, run_sink_keys

    rc = load_config(
        **{"model.name": "tiny-clip", "data.dataset": "synthetic", "data.batch_size": 4}
    )  # one batch: ``seen`` holds its key sets
    data = build_dataset(rc.data, rc.data.eval_split, 2, rc.seed)
    C, N, D = data.num_classes, vlm.num_image_tokens, vlm.model.config.text_config.hidden_size
    stages = ["encoder", "adapter", "llm.2", "llm.4"]
    probes = {s: _RandomProbe(D, C, i) for i, s in enumerate(("llm.2", "llm.4"))}
    plain = SinkScorer(stages, C, N)
    run_pass(vlm, plain, stages, data, rc.data, progress=False)
    assert plain.images == 2 and plain.keys_ == {}
    monkeypatch.setattr(knockout, "predict_stages", _refuse)
    none = run_sink_keys(vlm, data, plain.keys_, probes, rc, bootstrap=10, progress=False)
    assert none["images"] == 0 and none["differences"] == {}
    monkeypatch.undo()

    seen, passes = [], []
    real = knockout.predict_stages

    def record(vlm_, batch, probes_, keys=None, **spec):
        seen.append((keys, spec))
        return real(vlm_, batch, probes_, keys, **spec)

    def flag(batch, states):
        passes.append((batch, {s: states[s].clone() for s in probes}))
        planted(batch, states)

    monkeypatch.setattr(knockout, "predict_stages", record)
    planted = SinkScorer(stages, C, N)
    handle = _plant(vlm)
    try:
        run_pass(vlm, flag, stages, data, rc.data, progress=False)
        out = run_sink_keys(vlm, data, planted.keys_, probes, rc, bootstrap=10, progress=False)
    finally:
        handle.remove()
    assert set(planted.keys_) == {data.name_of(i) for i in range(2)}
    for row in planted.keys_.values():
        assert np.flatnonzero(row).tolist() == [SLOT]
    assert out["images"] == out["images_with_sinks"] == 2 and out["keys_per_image"] == 1.0
    blocked = [(keys, spec) for keys, spec in seen if keys is not None]
    assert len(blocked) == 2 and all(spec == {"later_only": False} for _, spec in blocked)
    sinks, control = (np.asarray(k) for k, _ in blocked)
    assert np.flatnonzero(sinks.any(0)).tolist() == [SLOT] and sinks.sum() == 2
    assert (control.sum(1) == 1).all() and not control[:, SLOT].any()
    ((batch, states),) = passes
    target = batch.labels.clone()
    target[torch.as_tensor(sinks | control)] = 255  # scored: the tokens in neither set
    for s, probe in probes.items():
        clean = ConfusionMatrix(C).update(probe.predict(states[s]), target)
        assert out["curves"]["none"][s]["miou"] == pytest.approx(clean.miou(), abs=1e-12)
        for name in SINK_KEY_DIFFERENCES:
            d = out["differences"][name][s]
            assert d["low"] <= d["estimate"] <= d["high"] and d["n_images"] == 2
    html = "".join(sink_keys_html({"status": "tested", **out}))
    assert "on 2 of the 2 evaluation images" in html and html.count("<td>llm.") == 2
    assert "not knocked out" in "".join(sink_keys_html({"status": "no_sinks", **none}))


def _refuse(*_args, **_kwargs):
    raise AssertionError("no image has a sink: nothing may run a forward")
