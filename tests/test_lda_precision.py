"""LDA statistics at LLM-like offsets (features with a mean of 1e3..3e3 and a spread of 1): the
probe equals a two-pass float64 solve where raw float32 moments would not, for one block of the
scatter or several; batch order, splits, merges and checkpoints (older ones holding the full
scatter too) change nothing beyond float64 round-off."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from seglens.probes import LDAProbe
from seglens.probes import lda as lda_module
from seglens.probes._common import prefixed, targets

C, D, M = 5, 48, 300  # classes, width, tokens per batch
TOL = 1e-6  # largest error allowed, relative to the largest |value| of the reference


@pytest.fixture(params=[True, False], ids=["exact", "float32"])
def exact(request):
    """exact: float64 products of raw features; float32: shifted features, float32 GEMMs."""
    return request.param


@pytest.fixture(params=[None, 20], ids=["one-block", "three-blocks"])
def block(request, monkeypatch):
    """The scatter in one block (the default at D = 48) or in blocks of 20, 20 and 8 rows."""
    if request.param is not None:
        monkeypatch.setattr(lda_module, "_BLOCK", request.param)


def offset_batches(n_batches: int = 6, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float32 (M, D) features with per-feature means in [1e3, 3e3], class means of spread 0.5
    and unit noise; (M,) labels with ~10% ignored."""
    g = torch.Generator().manual_seed(seed)
    offset = 1e3 + 2e3 * torch.rand(D, generator=g, dtype=torch.float64)
    means = 0.5 * torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n_batches * M,), generator=g)
    x = offset + means[y] + torch.randn(n_batches * M, D, generator=g, dtype=torch.float64)
    y[torch.rand(n_batches * M, generator=g) < 0.1] = 255
    return list(zip(x.float().split(M), y.split(M), strict=True))


def streamed(batches, **kw) -> LDAProbe:
    probe = LDAProbe(C, **kw)
    for xb, yb in batches:
        probe.partial_fit(xb, yb)
    return probe.finalize()


def reference(batches, mean: torch.Tensor, scale: torch.Tensor, shrinkage: float = 0.1):
    """Two-pass float64 LDA on all valid tokens at once: ((D, C) coef, (C,) intercept), on
    features standardised with the probe's own fp32 ``mean``/``scale`` (as its ``transform``)."""
    x = torch.cat([xb for xb, _ in batches]).double()
    y = torch.cat([yb for _, yb in batches])
    x, y = x[y != 255], y[y != 255]
    counts = torch.bincount(y, minlength=C).double()
    mu = torch.stack([x[y == c].mean(0) for c in range(C)])  # every class is present
    within = x - mu[y]
    m, sd = mean.double(), scale.double()
    sigma = within.T @ within / (len(y) - C) / torch.outer(sd, sd)
    eye = torch.eye(D, dtype=torch.float64)
    sigma = (1 - shrinkage) * sigma + shrinkage * sigma.trace() / D * eye
    mu = (mu - m) / sd
    W = torch.linalg.solve(sigma, mu.T)
    return W, -0.5 * (mu * W.T).sum(1) + torch.log(counts / len(y))


def raw_stats(batches, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The statistics of raw features with the full scatter, each batch's products in ``dtype``
    and summed in float64: float64 is what checkpoints held before the block triangle."""
    sums = {}
    for xb, yb in batches:
        T, valid = targets(yb, None, C)
        xv, T = (xb.to(dtype) * valid[:, None]), T.to(dtype)
        part = {"n": valid.sum(), "xsum": xv.sum(0), "count": T.sum(0)}
        part |= {"csum": T.T @ xv, "S": xv.T @ xv}
        for k, v in part.items():
            sums[k] = sums.get(k, 0) + v.double()
    return sums


def from_stats(stats: dict[str, torch.Tensor], exact: bool = True) -> LDAProbe:
    """A probe holding raw float64 statistics, as an exact (or older) checkpoint does; the
    float32 path re-expresses them around their mean on loading."""
    probe = LDAProbe(C, exact=exact)
    probe.load_state_dict(LDAProbe(C, exact=exact).state_dict() | prefixed("stats.", stats))
    return probe


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


def test_solve_equals_two_pass_float64_where_raw_float32_moments_do_not(block, exact):
    batches = offset_batches()
    probe = streamed(batches, exact=exact)
    x = torch.cat([xb for xb, _ in batches])[torch.cat([yb for _, yb in batches]) != 255]
    x = x.double()
    mean, std = x.mean(0), x.std(0, correction=0)
    assert error(probe.mean_, mean) < 1e-7 and error(probe.scale_, std) < TOL
    W, b = reference(batches, probe.mean_, probe.scale_)
    assert error(probe.coef_, W) < TOL and error(probe.intercept_, b) < TOL
    # The same statistics from float32 products of raw features lose the covariance to
    # cancellation: the std misses the tolerance above by orders of magnitude, and the pooled
    # covariance is not even positive definite.
    raw32 = from_stats(raw_stats(batches, torch.float32))
    with pytest.raises(ValueError, match="singular"):
        raw32.finalize()  # sets the standardiser's moments, then fails in the Cholesky
    assert error(raw32.scale_, std) > 1e4 * TOL


def test_order_splits_and_merges_change_nothing_beyond_round_off(block, exact):
    batches = offset_batches()
    whole = streamed(batches, exact=exact)
    tokens = [torch.cat(parts) for parts in zip(*batches, strict=True)]
    resplit = list(zip(tokens[0].split(128), tokens[1].split(128), strict=True))
    halves = [streamed(batches[:2], exact=exact), streamed(batches[2:], exact=exact)]
    for other in (
        streamed(batches[::-1], exact=exact),
        streamed(resplit, exact=exact),
        halves[0].merge(halves[1]),
    ):
        other.finalize()
        tol = TOL if exact else 5 * TOL  # float32 GEMMs: the batching shows at ~1e-6
        assert error(other.coef_, whole.coef_.double()) < tol
        assert error(other.intercept_, whole.intercept_.double()) < tol
        torch.testing.assert_close(other.mean_, whole.mean_, rtol=3e-7, atol=0)  # 2 fp32 ulp
        # float32 products of shifted features: the spread to ~1e-6 (exact: 2 fp32 ulp)
        torch.testing.assert_close(other.scale_, whole.scale_, rtol=3e-7 if exact else 2e-6, atol=0)


def test_checkpoint_round_trip_is_bitwise(block, exact):
    batches = offset_batches()
    probe = LDAProbe(C, exact=exact)
    for xb, yb in batches[:3]:
        probe.partial_fit(xb, yb)
    resumed = LDAProbe(C, exact=exact)
    resumed.load_state_dict(st_load(st_save(probe.state_dict())))
    for p in (probe, resumed):
        for xb, yb in batches[3:]:
            p.partial_fit(xb, yb)
    for key, value in probe.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert torch.equal(resumed.finalize().coef_, probe.finalize().coef_)


def test_checkpoint_with_the_full_scatter_loads_and_resumes(block, exact):
    batches = offset_batches()
    whole = streamed(batches, exact=exact)
    old = from_stats(raw_stats(batches[:3], torch.float64), exact)
    assert error(old.finalize().coef_, streamed(batches[:3], exact=exact).coef_.double()) < TOL
    for xb, yb in batches[3:]:
        old.partial_fit(xb, yb)
    old.finalize()
    assert error(old.coef_, whole.coef_.double()) < TOL
    assert error(old.intercept_, whole.intercept_.double()) < TOL
