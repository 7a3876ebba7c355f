"""The probes' float32 default path against the float64 ``exact`` path: the case that motivated
float64 (an absent class's gradient cancels to rounding noise, which AdamW's first steps blow
up to +-lr) is handled by the noise floor in AdamW's denominator, so splitting a batch (as two
ranks do) changes the step by far less than lr; bf16 GEMMs stay close to float32 ones."""

from __future__ import annotations

import pytest
import torch

from seglens.probes import LDAProbe, LinearProbe, ProbeBank
from seglens.probes import sgd as sgd_module
from seglens.probes._common import targets

C, D, M, LR = 6, 64, 512, 0.1
ABSENT = [3, 4, 5]  # classes with no token in the batch


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(M, D) features in +-pairs (v, -v), shuffled, with LLM-like massive dimensions (~1e3),
    and (M,) labels of classes 0-2 only (the -v rows one class on): every column sums to
    exactly 0, so an absent class's first gradient, (1/C) * sum of the rows, is exactly 0 and
    what a GEMM returns for it is rounding noise."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (M // 2,), generator=g)
    v = torch.randn(M // 2, D, generator=g) + 0.7 * torch.randn(3, D, generator=g)[y]
    v[:, :4] *= 1e3  # massive activations
    order = torch.randperm(M, generator=g)
    return torch.cat([v, -v])[order], torch.cat([y, (y + 1) % 3])[order]


def first_step(x: torch.Tensor, y: torch.Tensor, exact: bool, split: bool) -> torch.Tensor:
    """W (D, C) after one AdamW step on raw features (standardiser: mean 0, scale 1).
    ``split``: the gradient is summed from two halves, as two ranks' all_reduce does."""
    probe = LinearProbe(C, lrs=(LR,), warmup_batches=1, exact=exact)
    probe.standardizer.set_moments(torch.zeros(D), torch.ones(D), 1.0)
    T, valid = targets(y, None, C)
    if split:
        halves = [probe._gradients(x[i], T[i], valid[i]) for i in (slice(0, 200), slice(200, M))]
        probe._apply({k: halves[0][k] + halves[1][k] for k in halves[0]})
    else:
        probe._update(x, T, valid)
    return probe._params["W"][:, 0, :]


def test_absent_class_noise_becomes_lr_steps_without_the_floor(batch, monkeypatch):
    """The motivating case: with float32 gradients and plain AdamW, the absent classes' weights
    move by ~lr in directions set by rounding, so a split batch disagrees with the whole."""
    monkeypatch.setattr(sgd_module, "NOISE_FLOOR", 0.0)
    whole, split = first_step(*batch, exact=False, split=False), first_step(*batch, False, True)
    gap = (whole - split)[:, ABSENT].abs().max().item()
    assert gap > 0.5 * LR
    assert whole[:, ABSENT].abs().max().item() > 0.5 * LR  # noise-driven steps of ~lr


def test_the_noise_floor_keeps_absent_classes_still_and_split_batches_equal(batch):
    whole, split = first_step(*batch, exact=False, split=False), first_step(*batch, False, True)
    limit = LR / sgd_module.NOISE_FLOOR
    assert whole[:, ABSENT].abs().max().item() < limit  # noise no longer steps by lr
    assert (whole - split)[:, ABSENT].abs().max().item() < limit
    present = [0, 1, 2]  # real gradients: full AdamW steps of lr, the same from either split
    assert whole[:, present].abs().max().item() == pytest.approx(LR, rel=1e-3)
    assert (whole - split)[:, present].abs().max().item() < 1e-3 * LR


def test_exact_path_is_split_invariant_at_float64(batch):
    """float64 resolves the true (tiny, nonzero) gradient: both splits step the same way."""
    whole, split = first_step(*batch, exact=True, split=False), first_step(*batch, True, True)
    assert (whole - split).abs().max().item() < 1e-6 * LR


@pytest.mark.parametrize("gemm", ["bfloat16", "tf32"])
def test_low_precision_gemms_train_close_to_float32(batch, gemm):
    """bf16 GEMMs (inputs rounded to 8-bit significands) and tf32 (float32 off CUDA) train
    probes whose predictions agree with float32's on >= 98% of tokens."""
    x, y = batch
    banks = {}
    for name in ("float32", gemm):
        bank = ProbeBank(["s"], C, lrs=(1e-2,), warmup_batches=1, gemm=name)
        for _ in range(20):
            for xb, yb in zip(x.split(128), y.split(128), strict=True):
                bank.partial_fit({"s": xb}, yb)
        banks[name] = bank.probes["s"]._candidate_logits(x)[:, 0].argmax(-1)
    assert (banks[gemm] == banks["float32"]).float().mean().item() >= 0.98


def test_gemm_and_exact_are_checked():
    with pytest.raises(ValueError, match=r"gemm must be one of .* got 'fp8'"):
        LinearProbe(C, gemm="fp8")
    with pytest.raises(ValueError, match="float32 with exact=True"):
        LinearProbe(C, gemm="bfloat16", exact=True)
    with pytest.raises(ValueError, match="float32 with exact=True"):
        LDAProbe(C, gemm="tf32", exact=True)
