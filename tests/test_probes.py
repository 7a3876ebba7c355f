"""Probes: separable planted features are learned, shuffled labels are not, LDA equals
scikit-learn, streaming equals one batch, save/load and checkpoint/resume are exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import confusion_matrix

from seglens.probes import LDAProbe, LinearProbe, ProbeBank, load_probe

C, D, N = 6, 32, 64  # classes, width, tokens per image
MASSIVE = (3, 17)  # LLM-style massive dimensions


def planted(n_images: int, seed: int, spread: float = 2.0, shuffle: bool = False):
    """(B, N, D) fp32 features around C fixed class means, (B, N) labels with ~10% ignore.

    A large shared nuisance direction makes the problem need real training: a classifier from
    the first gradient's sign (what a tiny lr under Adam gives) is far from the optimum.
    """
    fixed = torch.Generator().manual_seed(123)
    means = torch.randn(C, D, generator=fixed) * spread
    nuisance = torch.randn(D, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n_images, N), generator=g)
    x = means[y] + torch.randn(n_images, N, D, generator=g)
    x += 10 * torch.randn(n_images, N, 1, generator=g) * nuisance
    x[..., MASSIVE] = x[..., MASSIVE] * 1e3 + 5e3
    if shuffle:
        y = y.flatten()[torch.randperm(y.numel(), generator=g)].view_as(y)
    y[torch.rand(n_images, N, generator=g) < 0.1] = 255
    return x, y


def batches(x, y, size: int = 8):
    return list(zip(x.split(size), y.split(size), strict=True))


def miou(pred, y):
    valid = y != 255
    cm = confusion_matrix(y[valid].numpy(), pred[valid].numpy(), labels=list(range(C)))
    inter = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - inter
    return float((inter[union > 0] / union[union > 0]).mean())


def train(probe, x, y, xv=None, yv=None):
    for xb, yb in batches(x, y):
        probe.partial_fit(xb, yb)
    if xv is not None:
        probe.validate(xv, yv)
    return probe.finalize() if isinstance(probe, LDAProbe) else probe.select()


def make(solver: str, **kw):
    if solver == "sgd":
        return LinearProbe(C, lrs=kw.pop("lrs", (3e-3, 3e-2)), warmup_batches=2, **kw)
    return LDAProbe(C, **kw)


@pytest.fixture(scope="module")
def data():
    return {"train": planted(160, 0), "val": planted(16, 1), "test": planted(32, 2)}


@pytest.fixture(scope="module")
def fitted(data):
    return {s: train(make(s), *data["train"], *data["val"]) for s in ("sgd", "lda")}


@pytest.mark.parametrize("solver", ["sgd", "lda"])
def test_separable_planted_features_are_learned(fitted, data, solver):
    x, y = data["test"]
    pred = fitted[solver].predict(x)
    assert pred.shape == y.shape and pred.dtype == torch.int64
    assert fitted[solver].decision_function(x).shape == (*y.shape, C)
    assert fitted[solver].score(x, y) >= 0.99
    assert miou(pred, y) >= 0.99


@pytest.mark.parametrize("solver", ["sgd", "lda"])
def test_shuffled_labels_stay_near_chance(solver):
    # Labels independent of the features in train, val and test: nothing can generalise, so
    # held-out accuracy stays within 0.1 of chance (1/C; class frequencies are balanced).
    probe = train(make(solver), *planted(160, 0, shuffle=True), *planted(16, 1, shuffle=True))
    assert probe.score(*planted(32, 2, shuffle=True)) < 1 / C + 0.1


def test_lda_and_sgd_agree(fitted, data):
    x, y = data["test"]
    agree = (fitted["lda"].predict(x) == fitted["sgd"].predict(x))[y != 255].float().mean()
    assert agree >= 0.95  # stated tolerance: two solvers, same optimum on separable data


def test_select_picks_the_good_learning_rate(data):
    probe = train(make("sgd", lrs=(1e-7, 1e-2)), *data["train"], *data["val"])
    assert probe.lr_ == 1e-2
    assert probe.val_miou_[1] > 0.99 and probe.val_miou_[0] < 0.9
    assert torch.equal(probe.coef_, probe._params["W"][:, 1])


def test_several_lrs_need_validation_before_select(data):
    probe = make("sgd")
    for xb, yb in batches(*data["train"])[:4]:
        probe.partial_fit(xb, yb)
    with pytest.raises(ValueError, match=r"no validation data.*validate"):
        probe.select()
    with pytest.raises(ValueError, match=r"call validate\(\) then select\(\)"):
        probe.predict(data["test"][0])


@pytest.mark.parametrize("solver", ["sgd", "lda"])
def test_one_hot_soft_labels_equal_hard_labels(data, solver):
    x, y = data["train"]
    hist = torch.nn.functional.one_hot(y.clamp(max=C - 1), C) * 7 * (y != 255)[..., None]
    hard, soft = make(solver), make(solver, soft_labels=True)
    for i in range(0, len(x), 8):
        hard.partial_fit(x[i : i + 8], y[i : i + 8])
        soft.partial_fit(x[i : i + 8], y[i : i + 8], hist[i : i + 8])
    for key, value in hard.state_dict().items():
        torch.testing.assert_close(soft.state_dict()[key], value, rtol=0, atol=1e-6)


def test_soft_labels_need_histograms(data):
    with pytest.raises(ValueError, match="soft_labels=True needs per-token histograms"):
        make("sgd", soft_labels=True).partial_fit(*data["val"])


@pytest.mark.parametrize(("exact", "atol"), [(True, 1e-6), (False, 1e-3)], ids=["exact", "float32"])
def test_manual_adamw_equals_torch_adamw_on_cross_entropy(data, exact, atol):
    """exact: torch's AdamW to float32 round-off. Default: float32 GEMMs and the noise floor in
    AdamW's denominator, which only damps elements whose feature-error cosine is below ~6e-5:
    after 5 steps of lr = 1e-2 the weights stay within lr / 10 of torch's."""
    x, y = data["train"]
    probe = LinearProbe(C, lrs=(1e-2,), weight_decay=0.05, warmup_batches=1, exact=exact)
    probe.partial_fit(x[:8], y[:8])
    W = torch.zeros(D, C, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    groups = [{"params": [W]}, {"params": [b], "weight_decay": 0.0}]  # no decay on the bias
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05)
    for xb, yb in batches(x[8:48], y[8:48]):
        probe.partial_fit(xb, yb)
        z = probe.standardizer.transform(xb.reshape(-1, D))
        loss = torch.nn.functional.cross_entropy(z @ W + b, yb.reshape(-1), ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.testing.assert_close(probe.coef_, W.detach(), rtol=1e-4, atol=atol)
    torch.testing.assert_close(probe.intercept_, b.detach(), rtol=1e-4, atol=atol)


def test_lda_equals_sklearn_lsqr_on_standardised_features():
    x, y = planted(24, 3, spread=0.2)  # overlapping classes: agreement is informative
    xt, _ = planted(24, 4, spread=0.2)
    probe = LDAProbe(C, shrinkage=0.2).fit(x, y)
    valid = y.flatten() != 255
    z = probe.standardizer.transform(x.reshape(-1, D))[valid].double().numpy()
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.2).fit(z, y.flatten()[valid])
    zt = probe.standardizer.transform(xt.reshape(-1, D)).double().numpy()
    sk_pred = torch.from_numpy(sk.predict(zt))
    assert (probe.predict(xt).flatten() == sk_pred).float().mean() >= 0.99
    # sklearn pools covariances with 1/n, we use 1/(n - C): W differs by exactly that factor and
    # the bias only in its log-prior term.
    n = int(valid.sum())
    factor = n / (n - C)
    log_prior = torch.log(torch.bincount(y.flatten()[valid], minlength=C).double() / n)
    coef, intercept = probe.coef_.double(), probe.intercept_.double()
    torch.testing.assert_close(coef.T * factor, torch.from_numpy(sk.coef_), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        (intercept - log_prior) * factor + log_prior,
        torch.from_numpy(sk.intercept_),
        rtol=1e-4,
        atol=1e-5,
    )


def _assert_stats_close(a: LDAProbe, b: LDAProbe, tol: float = 1e-10) -> None:
    for key in ("n", "xsum", "count", "csum", "S"):
        value = a._stats[key]
        scale = value.abs().max().item()
        torch.testing.assert_close(b._stats[key], value, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "float32"])
def test_lda_streaming_and_merge_equal_one_batch(data, exact):
    """exact: equal to float64 round-off. Default: each probe has its own shift (its first
    batch's mean); around one common shift the statistics agree to float32 round-off."""
    x, y = data["train"]
    whole = LDAProbe(C, exact=exact)
    whole.partial_fit(x, y)
    streamed = LDAProbe(C, exact=exact)
    for xb, yb in batches(x, y, size=3):
        streamed.partial_fit(xb, yb)
    halves = [
        LDAProbe(C, exact=exact).partial_fit(x[i], y[i]) for i in (slice(70), slice(70, None))
    ]
    merged = halves[0].merge(halves[1])
    if not exact:
        assert not torch.equal(whole._stats["shift"], streamed._stats["shift"])
        for probe in (whole, streamed, merged):
            probe._reshift(torch.zeros(D))  # raw statistics, comparable across probes
    _assert_stats_close(whole, streamed, 1e-10 if exact else 1e-6)
    _assert_stats_close(whole, merged, 1e-10 if exact else 1e-6)
    xt = data["test"][0]
    ref = whole.decision_function(xt)  # logits up to ~50 (features with massive dims ~2e4)
    atol = 1e-5 if exact else 2e-5 * ref.abs().max().item()
    torch.testing.assert_close(merged.decision_function(xt), ref, rtol=1.3e-6, atol=atol)


def test_lda_unseen_classes_are_never_predicted(data):
    x, y = data["train"]
    y = y.masked_fill(y == 2, 255)
    probe = LDAProbe(C).fit(x, y)
    assert probe.intercept_[2] == -torch.inf
    assert not (probe.predict(data["test"][0]) == 2).any()


@pytest.mark.parametrize("solver", ["sgd", "lda"])
def test_save_load_round_trip_is_bitwise(fitted, data, solver, tmp_path):
    probe = fitted[solver]
    probe.save(tmp_path / "llm.3")
    loaded = load_probe(tmp_path / "llm.3")
    x = data["test"][0]
    assert torch.equal(loaded.decision_function(x), probe.decision_function(x))
    assert torch.equal(loaded.predict(x), probe.predict(x))
    meta = json.loads((tmp_path / "llm.3.json").read_text())
    assert meta["solver"] == solver and meta["n_features"] == D and meta["n_classes"] == C
    if solver == "sgd":
        assert meta["hyperparameters"]["lrs"] == [3e-3, 3e-2] and meta["lr"] == probe.lr_
        assert meta["hyperparameters"]["weight_decay"] == 0.0
    else:
        assert meta["hyperparameters"]["shrinkage"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llm.3.json", "llm.3.safetensors"]


def _stream(n_images: int, seed: int):
    x, y = planted(n_images, seed)
    feats = [{"encoder": xb, "llm.1": xb.flip(-1).bfloat16()} for xb in x.split(4)]
    return list(zip(feats, y.split(4), strict=True))


@pytest.mark.parametrize("solver", ["sgd", "lda"])
def test_bank_trains_selects_and_round_trips(solver, tmp_path):
    kw = {"lrs": (1e-7, 1e-2), "warmup_batches": 2} if solver == "sgd" else {}
    bank = ProbeBank(["encoder", "llm.1"], C, solver=solver, **kw)
    for feats, yb in _stream(80, 0):
        bank.partial_fit(feats, yb)
    for feats, yb in _stream(8, 1):
        bank.validate(feats, yb)
    bank.select()
    (feats, yb), *_ = _stream(8, 2)
    pred = bank.predict(feats)
    assert set(pred) == {"encoder", "llm.1"}
    for stage in pred:
        assert (pred[stage] == yb)[yb != 255].float().mean() >= 0.99
    bank.save(tmp_path)
    loaded = ProbeBank.load(tmp_path)
    for stage, p in loaded.predict(feats).items():
        assert torch.equal(p, pred[stage])
    assert not list(tmp_path.glob("*.pkl")) + list(tmp_path.glob("*.pt"))
    assert not list(tmp_path.glob(".*tmp"))


def test_non_finite_features_raise_naming_the_stage_and_change_nothing():
    bank = ProbeBank(["encoder", "llm.7"], C, warmup_batches=2)
    (feats, yb), *_ = _stream(8, 0)
    feats = {"encoder": feats["encoder"], "llm.7": feats["llm.1"].half()}
    feats["llm.7"][0, 5, 3] = torch.inf
    with pytest.raises(ValueError, match=r"stage 'llm\.7'.*bf16 or fp32"):
        bank.partial_fit(feats, yb)
    assert bank.probes["encoder"].standardizer.stream_batches == 0  # the batch is all or nothing
    feats["llm.7"][0, 5, 3] = torch.nan
    with pytest.raises(ValueError, match=r"stage 'llm\.7'"):
        bank.validate(feats, yb)


def test_checkpoint_resume_mid_training_is_exact():
    stream = _stream(48, 0)

    def new_bank():
        return ProbeBank(["encoder", "llm.1"], C, lrs=(1e-3, 1e-2), warmup_batches=2)

    full = new_bank()
    for feats, yb in stream:
        full.partial_fit(feats, yb)
    first = new_bank()
    for feats, yb in stream[:5]:
        first.partial_fit(feats, yb)
    blob = st_save(first.state_dict())  # checkpoints go through safetensors, never pickle
    for feats, yb in stream[5:7]:
        first.partial_fit(feats, yb)  # keeps training: the checkpoint must not move
    resumed = new_bank()
    resumed.load_state_dict(st_load(blob))
    for feats, yb in stream[5:]:
        resumed.partial_fit(feats, yb)
    expected, got = full.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys() and "llm.1/mW" in got
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_fit_in_memory_holds_out_validation_and_returns_self(data):
    x, y = data["train"]
    probe = LinearProbe(C, lrs=(1e-7, 1e-2), epochs=2, batch_size=512, seed=0)
    assert probe.fit(x, y) is probe
    assert probe.lr_ == 1e-2 and probe.score(*data["test"]) >= 0.99
    assert probe.coef_.shape == (D, C) and probe.intercept_.shape == (C,)
    assert probe.mean_.shape == probe.scale_.shape == (D,)
    again = LinearProbe(C, lrs=(1e-7, 1e-2), epochs=2, batch_size=512, seed=0).fit(x, y)
    assert torch.equal(again.coef_, probe.coef_)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: LinearProbe(C).partial_fit(torch.zeros(4, D), torch.full((4,), 7)), "0..5 or 255"),
        (
            lambda: LinearProbe(C).partial_fit(torch.zeros(4, D), torch.zeros(5)),
            "labels must be integer",
        ),
        (lambda: LDAProbe(C, shrinkage="auto"), "fourth moments"),
        (lambda: LDAProbe(C).finalize(), "no training tokens"),
        (lambda: LinearProbe(C, lrs=()), "lrs must be"),
        (lambda: ProbeBank(["encoder"], C, solver="svm"), "unknown solver 'svm'"),
        (lambda: ProbeBank(["llm/1"], C), "stages must be"),
        (
            lambda: ProbeBank(["encoder"], C).partial_fit(
                {"adapter": torch.zeros(1, 2, D)}, torch.zeros(1, 2)
            ),
            "the bank has",
        ),
    ],
)
def test_errors_say_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_feature_width_must_not_change(data):
    probe = LDAProbe(C)
    probe.partial_fit(*data["val"])
    with pytest.raises(ValueError, match="D=16, the probe was fit with D=32"):
        probe.partial_fit(data["val"][0][..., :16], data["val"][1])


def test_lda_singular_covariance_without_shrinkage_raises(data):
    x, y = data["val"]
    x = torch.cat([x, torch.ones_like(x[..., :1])], -1)  # a dead dimension: singular covariance
    with pytest.raises(ValueError, match=r"singular.*shrinkage > 0"):
        LDAProbe(C, shrinkage=0.0).fit(x, y)


def test_standardizer_freezes_after_warmup_tokens_and_floors_constant_dims():
    from seglens.probes import Standardizer

    st = Standardizer(warmup_tokens=100)
    x = torch.randn(120, 4).double()
    x[:, 2] = 3.0
    st.partial_fit(x[:60])
    assert not st.frozen
    st.partial_fit(x[60:])
    assert st.frozen and st.scale_[2] == 1.0
    z = st.transform(x)
    assert z.dtype == torch.float32 and torch.all(z[:, 2] == 0)
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-5, rtol=0)


# --- early stopping on held-out loss ---------------------------------------------------------
def test_held_out_loss_equals_cross_entropy_per_candidate(data):
    x, y = data["train"]
    xv, yv = data["test"]
    probe = LinearProbe(C, lrs=(1e-3, 1e-1), epochs=1, early_stopping=True, batch_size=512)
    probe.fit(x, y, X_val=xv, y_val=yv)
    logits = probe._candidate_logits(xv.reshape(-1, D))  # weights of the (only) epoch
    target = yv.reshape(-1)
    for k in range(2):
        expected = torch.nn.functional.cross_entropy(
            logits[:, k].double(), target, ignore_index=255
        )
        assert probe.stopping.trace[0][k] == pytest.approx(float(expected), rel=1e-9)


def test_stopping_rule_by_hand():
    from seglens.probes.convergence import EarlyStopping

    rule = EarlyStopping(patience=2, min_delta=0.005)
    W, b = torch.zeros(3, 1, 2), torch.zeros(1, 2)
    for epoch, loss in enumerate([1.0, 0.9, 0.899, 0.8995]):
        rule._sum, rule._count = torch.tensor([loss], dtype=torch.float64), torch.tensor(1)
        rule.end_epoch(W + epoch, b, None)
        # 0.899 improves on 0.9 by only 0.1% (< 0.5%): epochs 3 and 4 count as no improvement.
        assert rule.stopped == (epoch == 3)
    assert rule.best["epoch"].tolist() == [2]  # weights kept from the lowest loss (epoch 3)
    assert torch.equal(rule.best["W"], W + 2)
    with pytest.raises(ValueError, match="no held-out tokens were scored"):
        rule.end_epoch(W, b, None)


def _losses(rule, rows) -> list[bool]:
    """Feed (K,) held-out losses check by check; whether the rule had stopped after each."""
    W, b = torch.zeros(3, len(rows[0]), 2), torch.zeros(len(rows[0]), 2)
    stopped = []
    for row in rows:
        rule._sum = torch.tensor(row, dtype=torch.float64)
        rule._count = torch.tensor(1)
        rule.end_epoch(W, b, None)
        stopped.append(rule.stopped)
    return stopped


def test_a_slow_candidate_far_behind_the_leader_does_not_hold_the_probe():
    from seglens.probes.convergence import EarlyStopping

    # candidate 0 levels off at 0.27 by check 3; candidate 1 (a small lr) still falls ~2% per
    # check but from 0.5: at that rate it needs ~20 checks to reach 0.27, not the patience of 2.
    leader = [0.40, 0.30, 0.27, 0.2699, 0.2700, 0.2698]
    slow = [0.60, 0.55, 0.53, 0.52, 0.51, 0.50]
    stopped = _losses(
        EarlyStopping(patience=2, min_delta=0.005), list(zip(leader, slow, strict=True))
    )
    assert stopped == [False, False, False, False, True, True]


def test_a_candidate_about_to_overtake_the_leader_holds_the_probe():
    from seglens.probes.convergence import EarlyStopping

    # the large lr (0) leads early and levels off; the small lr (1) closes in fast and overtakes.
    large = [0.30, 0.28, 0.2795, 0.2797, 0.2796, 0.2798, 0.2797, 0.2799]
    small = [0.50, 0.40, 0.33, 0.29, 0.27, 0.262, 0.2619, 0.2620]
    stopped = _losses(
        EarlyStopping(patience=2, min_delta=0.005), list(zip(large, small, strict=True))
    )
    # the lowest loss alone would stop it at check 3; it stops once the small lr levels off
    assert stopped.index(True) == 7


def test_early_stopping_keeps_the_best_epoch_and_converges(data):
    """The probe stops before the epoch limit, and its weights equal a plain run of exactly its
    best epoch count (same seed, same order): the best-epoch snapshot is what is kept. Classes
    overlap, so the held-out loss levels off (on separable data it falls for ever)."""
    x, y = planted(80, 0, spread=0.4)
    xv, yv = planted(16, 1, spread=0.4)
    kwargs = dict(lrs=(3e-2,), batch_size=512, seed=0)
    probe = LinearProbe(C, epochs=60, early_stopping=True, patience=2, **kwargs)
    probe.fit(x, y, X_val=xv, y_val=yv)
    record = probe.convergence()
    assert record["converged"] is True and record["epochs"] < 60
    assert record["epochs"] == len(record["val_loss"]) == len(probe.stopping.trace)
    best = record["best_epoch"]
    assert record["val_loss"][best - 1] == min(record["val_loss"])
    plain = LinearProbe(C, epochs=best, **kwargs).fit(x, y)
    assert torch.equal(plain.coef_, probe.coef_) and torch.equal(plain.intercept_, probe.intercept_)
    assert record["lr_at_grid_edge"] is False  # one lr: no grid
    reloaded = json.loads(json.dumps(record))  # plain JSON
    assert reloaded == record


def test_a_probe_at_the_epoch_limit_has_not_converged_and_flags_the_grid_edge(data):
    from seglens.probes.convergence import convergence_warnings

    x, y = data["train"]
    xv, yv = data["test"]
    probe = LinearProbe(C, lrs=(1e-4, 1e-3, 1e-2), epochs=2, early_stopping=True, batch_size=512)
    probe.fit(x, y, X_val=xv, y_val=yv)
    record = probe.convergence()
    assert record["converged"] is False and record["epochs"] == 2
    assert probe.lr_ == 1e-2 and record["lr_at_grid_edge"] is True
    k = probe._fitted[0]
    assert k == probe.stopping.selected()  # lowest held-out loss wins
    assert record["val_loss"] == [row[k] for row in probe.stopping.trace]
    assert set(record["val_loss_by_lr"]) == {"0.0001", "0.001", "0.01"}
    messages = convergence_warnings({"llm.2": record}, probe.lrs)
    assert "llm.2 did not converge in 2 epochs" in messages[0]
    assert "edge of probe.lrs=[0.0001, 0.001, 0.01]" in messages[1]
    with pytest.raises(ValueError, match="validate"):
        LinearProbe(C, lrs=(1e-3, 1e-2)).convergence()


def test_early_stopping_state_resumes_exactly(data):
    """A bank checkpointed between epochs and restored ends with the same probes and record."""
    x, y = data["train"]
    xv, yv = data["test"]

    def new_bank():
        kwargs = dict(lrs=(1e-2, 1e-1), early_stopping=True, patience=1, warmup_batches=1)
        return ProbeBank(["a"], C, **kwargs)

    def epoch(bank, e):
        for xb, yb in batches(x, y):
            bank.partial_fit({"a": xb}, yb)
        bank.validate({"a": xv}, yv)
        bank.end_epoch(e)

    full = new_bank()
    for e in range(4):
        epoch(full, e)
    full.select()
    part = new_bank()
    for e in range(2):
        epoch(part, e)
    blob = st_save(part.state_dict())
    resumed = new_bank()
    resumed.load_state_dict(st_load(blob))
    resumed.end_epoch(1)  # already closed before the checkpoint: a no-op
    for e in range(2, 4):
        epoch(resumed, e)
    resumed.select()
    assert resumed.convergence() == full.convergence()
    assert torch.equal(resumed.probes["a"].coef_, full.probes["a"].coef_)
