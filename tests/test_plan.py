"""The planned forwards of ``seglens run`` equal the forwards counted on the model (or bound them
where the run decides: early stopping), and the knockout's count per pair image."""

from __future__ import annotations

import json

import pytest

from family_checks import cached_model
from seglens.analyses.knockout import (
    knockout_forwards_per_image,
    knockout_layer_forwards_per_image,
)
from seglens.config import load_config
from seglens.experiments.common import build_dataset
from seglens.experiments.plan import RunPlan, plan_run, remaining_hours
from seglens.experiments.training import train_probes


class _Counter:
    """Images embedded by the model (one per image per forward)."""

    def __init__(self, vlm):
        self.images = 0
        embed = vlm.model.get_input_embeddings()
        self.handle = embed.register_forward_pre_hook(self._count)

    def _count(self, _module, args):
        self.images += int(args[0].shape[0])


def test_sgd_training_runs_the_planned_forwards():
    """Warm-up, two epochs and a held-out check every batch (patience too long to stop early)."""
    vlm = cached_model("tiny-clip")
    overrides = {
        "model.name": "tiny-clip",
        "data.dataset": "synthetic",
        "data.batch_size": 2,
        "probe.solver": "sgd",
        "probe.stages": ["llm.1"],
        "probe.epochs": 2,
        "probe.holdout_fraction": 0.25,
        "probe.warmup_batches": 1,
        "probe.eval_every": 1,
        "probe.patience": 100,
    }
    config = load_config(**overrides)
    train = build_dataset(config.data, config.data.train_split, 4, config.seed)
    plan = plan_run(config, ["probing"], train=4, evaluation=0, num_layers=vlm.num_llm_layers)
    counter = _Counter(vlm)
    try:
        train_probes(vlm, train, ["llm.1"], config.probe, data_config=config.data, progress=False)
    finally:
        counter.handle.remove()
    # 3 trained, 1 held out; warm-up 1 batch (2); 2 epochs x 3; a check per batch: 2 x 2 x 1
    assert plan["probing"]["forwards"] == 2 + 2 * 3 + 2 * 2 * 1 == counter.images
    assert plan["probing"]["bound"]  # early stopping may stop sooner


def test_knockout_forwards_per_image_and_the_hours_left():
    config = load_config(**{"knockout.window_sweep": 8})
    # 9 conditions (none, 2 treatments, 2 controls x 3 pools); each knocked-out set once over
    # all layers and once per window (32 layers: 4 windows of 8)
    assert knockout_forwards_per_image(load_config().knockout, 32) == 1 + 8
    assert knockout_forwards_per_image(config.knockout, 32) == 1 + 8 * 5
    plan = plan_run(
        config, ["probing", "knockout", "twin"], train=100, evaluation=10, num_layers=32
    )
    assert plan["knockout"] == {
        "forwards": 10 * 10 * 41,
        "bound": True,
        "detail": "<= 10 pairs x <= 10 images x 41 per image; shared prefix: tower once, 29.0 "
        "full-depth LLM forwards per image",
    }
    # by hand: the clean 32 layers, then 8 key sets x (32 + windows from layers 1, 9, 17, 25)
    assert knockout_layer_forwards_per_image(config.knockout, 32) == 32 + 8 * (
        32 + 32 + 24 + 16 + 8
    )
    unshared = config.replace(**{"knockout.shared_prefix": False}).knockout
    assert knockout_layer_forwards_per_image(unshared, 32) == 41 * 32
    assert plan["twin"]["forwards"] is None  # an analysis without a planner
    assert remaining_hours(plan, ["probing"], 0.36) == pytest.approx(4100 * 0.36 / 3600)


class _Run:
    """What ``RunPlan`` needs of a ``RunDir``: ``file`` and ``put_section``."""

    def __init__(self, path):
        self.path = path

    def file(self, relative):
        return self.path / relative

    def put_section(self, name, section):
        data = json.loads(self.file("results.json").read_text())
        self.file("results.json").write_text(json.dumps({**data, name: section}))


def test_a_resumed_run_prices_its_plan_and_each_analysis_records_its_rate(tmp_path, caplog):
    earlier = {"plan": {"measured": {"probing": {"images_per_s": 4.0}}}}
    (tmp_path / "results.json").write_text(json.dumps(earlier))
    config = load_config(
        **{"data.limit_train": 10, "data.limit_eval": 5, "probe.solver": "lda", "seed": 0}
    )
    vlm = cached_model("tiny-clip")
    with caplog.at_level("INFO", logger="seglens.experiments.plan"):
        plan = RunPlan(config, ["probing", "umap"], vlm, _Run(tmp_path))
        try:
            assert "at 4.0 images/s" in caplog.text
            assert "probing        15, ~0.00 h (1 train + 1 eval pass)" in caplog.text
            plan.images = 15  # as the counting hook would after probing's forwards
            plan.done("probing", 3.0)
        finally:
            plan.close()
    measured = json.loads((tmp_path / "results.json").read_text())["plan"]["measured"]
    assert measured["probing"] == {"seconds": 3.0, "forwards": 15, "images_per_s": 5.0}
    assert "the rest (umap) should take ~0.00 h" in caplog.text


def test_the_order_analysis_runs_its_planned_forwards(make_probe_run, tiny_models):
    """lda: each condition (raster and reversed/token) one training and one evaluation pass."""
    from seglens.analyses.order.measure import run_order

    vlm = tiny_models("clip")
    run = make_probe_run("order_plan")
    overrides = {"order.orders": ("reversed",), "order.position_ids": ("token",)}
    config = load_config(**{"probe.solver": "lda", **overrides})
    plan = plan_run(config, ["order"], train=16, evaluation=8, num_layers=vlm.num_llm_layers)
    counter = _Counter(vlm)
    try:
        run_order(run, vlm=vlm, progress=False, orders=("reversed",), position_ids=("token",))
    finally:
        counter.handle.remove()
    assert plan["order"] == {
        "forwards": 2 * (16 + 8),
        "bound": False,
        "detail": "2 conditions x the probing passes (24)",
    }
    assert counter.images == plan["order"]["forwards"]
