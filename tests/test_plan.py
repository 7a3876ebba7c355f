"""The planned forwards of ``seglens run`` equal the forwards counted on the model (or bound them
where the run decides: early stopping), and the knockout's count per pair image."""

from __future__ import annotations

import pytest

from family_checks import cached_model
from seglens.config import load_config
from seglens.experiments.common import build_dataset
from seglens.experiments.plan import knockout_forwards_per_image, plan_run, remaining_hours
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
    train = build_dataset(config.data, config.data.train_split, 6, config.seed)
    plan = plan_run(config, ["probing"], train=6, evaluation=0, num_layers=vlm.num_llm_layers)
    counter = _Counter(vlm)
    try:
        train_probes(vlm, train, ["llm.1"], config.probe, data_config=config.data, progress=False)
    finally:
        counter.handle.remove()
    # 4 trained, 2 held out; warm-up 1 batch (2); 2 epochs x 4; a check per batch: 2 x 2 x 2
    assert plan["probing"]["forwards"] == 2 + 2 * 4 + 2 * 2 * 2 == counter.images
    assert plan["probing"]["bound"]  # early stopping may stop sooner


def test_knockout_forwards_per_image_and_the_hours_left():
    config = load_config(**{"knockout.window_sweep": 8})
    # 9 conditions (none, 2 treatments, 2 controls x 3 pools); each knocked-out set once over
    # all layers and once per window (32 layers: 4 windows of 8)
    assert knockout_forwards_per_image(load_config().knockout, 32) == 1 + 8
    assert knockout_forwards_per_image(config.knockout, 32) == 1 + 8 * 5
    plan = plan_run(
        config, ["probing", "knockout", "mine"], train=100, evaluation=10, num_layers=32
    )
    assert plan["knockout"] == {
        "forwards": 10 * 10 * 41,
        "bound": True,
        "detail": "<= 10 pairs x <= 10 images x 41 per image",
    }
    assert plan["mine"]["forwards"] is None  # an analysis without a planner
    assert remaining_hours(plan, ["probing"], 0.36) == pytest.approx(4100 * 0.36 / 3600)
