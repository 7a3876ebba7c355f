"""Convergence within one pass (``probe.eval_every``): the held-out loss is scored every N
training batches, a 1-epoch run can stop and say it converged and at which optimiser step, the
pass ends early once every stage has, and one check per epoch equals the per-epoch path."""

from __future__ import annotations

import pytest
import torch

from seglens.config import DataConfig, ProbeConfig
from seglens.data import SyntheticDataset
from seglens.experiments.training import train_probes
from seglens.probes.convergence import convergence_warnings

C = 6
DATA = DataConfig(batch_size=4)
STAGES = ["encoder", "llm.2"]


@pytest.fixture(scope="module")
def vlm():
    from seglens.models import tiny_llava

    return tiny_llava("clip", image_size=112)


@pytest.fixture(scope="module")
def train():
    return SyntheticDataset(num_images=22, num_classes=C, split="train")


def fit(vlm, train, **probe):
    cfg = ProbeConfig(warmup_batches=1, holdout_fraction=0.1, **probe)
    return train_probes(vlm, train, STAGES, cfg, data_config=DATA, seed=0, progress=False)


def test_one_epoch_converges_within_the_pass_and_says_at_which_step(vlm, train):
    # min_delta 0.9: no check can improve the loss by 90%, so every stage stops after
    # 1 + patience checks, at the optimiser step of that check: 2 batches per check.
    bank = fit(vlm, train, epochs=1, eval_every=2, patience=1, min_delta=0.9)
    records = bank.convergence()
    for stage, record in records.items():
        assert record["converged"] is True, stage
        assert record["epochs"] == 1 and record["checks"] == 2
        assert record["steps"] == [2, 4] and record["stopped_at_step"] == 4
        assert record["best_step"] in record["steps"] and record["best_epoch"] == 1
        assert len(record["val_loss"]) == 2
    # The pass ended at the stopping check: 4 batches of 4 of the 20 training images.
    assert bank.training_["train_images"] == 16
    assert not any("did not converge" in m for m in convergence_warnings(records, (1e-2,)))


def test_an_unconverged_pass_reports_its_checks(vlm, train):
    bank = fit(vlm, train, epochs=1, eval_every=2, patience=5, min_delta=0.0)
    record = bank.convergence()["llm.2"]
    assert record["converged"] is False and record["checks"] == 3  # 5 batches: 2+2+1
    assert record["steps"] == [2, 4, 5] and record["stopped_at_step"] is None
    assert bank.training_["train_images"] == 20
    message = convergence_warnings(bank.convergence(), (1e-3, 1e-2, 1e-1))[0]
    assert "did not converge in 1 epochs (3 held-out checks" in message


def test_one_check_per_epoch_equals_the_per_epoch_path(vlm, train):
    """eval_every = the batches of an epoch gives the same probes bit for bit as checks after
    every epoch (the same batches, the same held-out scoring)."""
    per_epoch = fit(vlm, train, epochs=2, patience=5)
    in_pass = fit(vlm, train, epochs=2, patience=5, eval_every=5)  # 20 images / 4 per batch
    for stage in STAGES:
        a, b = per_epoch.probes[stage], in_pass.probes[stage]
        assert torch.equal(a.coef_, b.coef_) and torch.equal(a.intercept_, b.intercept_)
        assert a.stopping.trace == b.stopping.trace


def test_eval_every_is_checked():
    with pytest.raises(ValueError, match=r"probe.eval_every=0 must be >= 1 training batches"):
        ProbeConfig(eval_every=0)
