"""The random twin: re-initialisation from a recorded seed, a model given itself as twin differs
from it by exactly zero, and the twin's section, figure and report block in a ``seglens run``."""

from __future__ import annotations

import json

import pytest
import torch

from seglens.analyses import twin as twin_module

CONFIG = {
    "seed": 0,
    "model.name": "tiny-clip",
    "model.device": "cpu",
    "data.dataset": "synthetic",
    "data.limit_train": 8,
    "data.limit_eval": 6,
    "data.batch_size": 6,
    "probe.solver": "lda",
    "probe.bootstrap": 50,
    "probe.qualitative": 0,
    "probe.pixel_level": False,
    "knockout.top_k": 1,
    "knockout.min_support": 2,
    "knockout.attention": False,
    "knockout.random_controls": 1,
    "knockout.control_pool": ("outside_pair", "confidence"),
    "umap.enabled": False,
    "lens.enabled": False,
    "twin.enabled": True,
}


@pytest.fixture(scope="module")
def self_twin(tmp_path_factory, tiny_models):
    """``seglens run --twin`` on tiny-clip whose twin is the model itself (no re-initialisation)."""
    from seglens.config import load_config
    from seglens.experiments import pipeline

    out = tmp_path_factory.mktemp("twin") / "run"
    built = []

    def same_model(model, seed):
        built.append(seed)
        return model

    logs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(twin_module, "reinitialise", same_model)
        patch.setattr(pipeline.log, "info", lambda msg, *a: logs.append(msg % a))
        config = load_config(**CONFIG, out=str(out))
        pipeline.run(config, progress=False, report=False)  # the twin's block is drawn below
    return out, json.loads((out / "results.json").read_text()), built, logs


def _intervals(section):
    for finding, entry in section["findings"].items():
        for key, stat in entry["statistics"].items():
            yield finding, key, stat


def test_a_model_given_itself_as_twin_differs_by_exactly_zero(self_twin):
    _, results, built, _ = self_twin
    assert built == [0]  # the twin was built once, from the recorded seed
    section = results["twin"]
    assert section["seed"] == 0 and section["run"] == "twin"
    rows = list(_intervals(section))
    assert {f for f, _, _ in rows} >= {"drop", "recovery", "anchors", "early_positions"}
    for finding, key, stat in rows:
        assert stat["model"] == stat["twin"], (finding, key)
        diff = stat["model_minus_twin"]
        assert (diff["estimate"], diff["low"], diff["high"]) == (0.0, 0.0, 0.0), (finding, key)
    # zero difference: nothing holds beyond the architecture
    assert all(entry["beyond_twin"] is not True for entry in section["findings"].values())


def test_the_confidence_matched_pool_runs_beside_the_others(self_twin):
    _, results, _, _ = self_twin
    knockout = results["knockout"]
    assert knockout["control_pools"] == ["outside_pair", "confidence"]
    stage = knockout["summary_layer"]
    gap = knockout["differences"]["pools"]["confidence"][stage]["block_correct_minus_control"]
    assert gap["low"] <= gap["estimate"] <= gap["high"]  # with its interval
    assert set(results["findings"]["anchors"]["pools"]) == {"outside_pair", "confidence"}
    twin = results["twin"]["findings"]["anchors"]["statistics"]
    assert twin["confidence: block correct - control"]["direction"] == "below"


def test_the_model_side_is_the_findings_own_interval(self_twin):
    """Same images, seed and resamples: the twin table's model column is the finding's interval."""
    _, results, _, _ = self_twin
    found, section = results["findings"], results["twin"]["findings"]
    drop = section["drop"]["statistics"]["adapter_minus_encoder"]["model"]
    assert drop == found["drop"]["adapter_minus_encoder"]
    early = section["early_positions"]["statistics"]
    for key in ("causal_early_minus_late_gain", "bidirectional_minus_causal_early"):
        assert early[key]["model"] == found["early_positions"][key]
    best = found["recovery"]["best_llm_minus_adapter"]
    model = section["recovery"]["statistics"]["best_llm_minus_adapter"]["model"]
    assert model == {k: best[k] for k in ("estimate", "low", "high", "n_images")}


def test_the_run_holds_the_twin_run_plan_figure_and_block(self_twin):
    from seglens.report.page import Page

    out, results, _, logs = self_twin
    twin_results = json.loads((out / "twin" / "results.json").read_text())
    assert twin_results["config"]["twin"]["enabled"] is False  # no twin of the twin
    assert twin_results["dataset"]["eval_images"] == results["dataset"]["eval_images"]
    assert "findings" in twin_results and "twin" not in twin_results
    plan = next(line for line in logs if line.startswith("plan:"))
    assert "twin" in plan and "doubles" in plan and "probing, knockout" in plan
    fig = twin_module.twin_figure(results, out)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "recovery: best_llm_minus_adapter" in labels
    assert len(fig.axes[0].get_legend().get_texts()) == 3  # model, twin, model - twin
    (out / "figures").mkdir(exist_ok=True)
    fig.savefig(out / "figures" / "twin_findings.png")
    page = Page({"figures": {"twin_findings": "figures/twin_findings.png"}}, out)
    html = twin_module.block(results, page)
    assert "holds beyond the architecture" in html and 'id="fig-twin_findings"' in html
    assert html.count("<tr") == 1 + len(list(_intervals(results["twin"])))
    off = twin_module.block({}, page)  # off by default: how to switch it on
    assert "--twin" in off and "Not run" not in off


def test_reinitialise_redraws_every_weight_from_the_seed(tiny_models):
    from copy import deepcopy

    base = tiny_models("clip").model
    state = torch.random.get_rng_state()
    a = twin_module.reinitialise(deepcopy(base), seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    b = twin_module.reinitialise(deepcopy(base), seed=3)
    c = twin_module.reinitialise(deepcopy(base), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    linear = [k for k, v in sa.items() if k.endswith("q_proj.weight")]
    assert linear and all(not torch.equal(sa[k], sc[k]) for k in linear)
    norms = [k for k in sa if "norm" in k and k.endswith("weight")]
    assert norms and all(torch.equal(sa[k], torch.ones_like(sa[k])) for k in norms)
    ref = base.state_dict()
    embeddings = [k for k in sa if "embed_tokens" in k]
    assert embeddings and all(not torch.equal(sa[k], ref[k]) for k in embeddings)


def test_twin_config_errors_name_the_value_and_the_fix():
    from seglens.config import load_config

    with pytest.raises(ValueError, match=r"twin.seed=-1 must be an integer >= 0"):
        load_config(**{"twin.seed": -1})
    with pytest.raises(ValueError, match=r"cannot name the twin itself"):
        load_config(**{"twin.analyses": ["twin"]})
    config = load_config(**{"twin.analyses": ["knockut"]})
    with pytest.raises(ValueError, match=r"no analysis named 'knockut' \(did you mean 'knockout'"):
        twin_module.covered_analyses(config)
    # named analyses bring what they need; the twin never reruns itself
    config = load_config(**{"twin.analyses": ["knockout"]})
    assert twin_module.covered_analyses(config) == ["probing", "knockout"]


def test_compare_refuses_runs_on_different_images(tmp_path, monkeypatch):
    sizes = {"a": 8, "b": 6}
    monkeypatch.setattr(
        "seglens.rundir.load_results",
        lambda path: {"dataset": {"eval_images": sizes[path.parent.name]}},
    )
    with pytest.raises(ValueError, match=r"8 and 6 evaluation images; run both on the same"):
        twin_module.compare(tmp_path / "a", tmp_path / "b")
