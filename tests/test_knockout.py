"""Attention knockout on a tiny probing run: the CLI writes the results schema the report reads;
the clean condition equals an independent recomputation; a layer window cannot act before its
first layer; an empty key set changes nothing; pair selection and random controls are exact."""

from __future__ import annotations

import itertools
import shutil

import numpy as np
import pytest
import torch

from conftest import results_of
from seglens.analyses.knockout.measure import (
    CONDITIONS,
    COUNT_FIELDS,
    key_sets,
    layer_windows,
    pair_counts,
    pair_images,
    pair_scores,
    predict_stages,
    random_control,
    run_knockout,
    select_pairs,
)
from seglens.analyses.knockout.sets import CONTROL_POOLS, blocked_keys, knockout_differences
from seglens.cli import main
from seglens.config import load_config
from seglens.experiments.common import build_dataset
from seglens.interventions import intervene
from seglens.probes import ProbeBank, load_probe

LLM = [f"llm.{i}" for i in range(1, 5)]
SMALL = {"top_k": 2, "max_images": 2, "min_support": 5}


@pytest.fixture(scope="module")
def probe_run(make_probe_run):
    return make_probe_run("knockout")


def copy_run(probe_run, name: str):
    target = probe_run.parent / name
    shutil.copytree(probe_run, target)
    return target


@pytest.fixture(scope="module")
def cli_run(probe_run):
    run = copy_run(probe_run, "cli")
    argv = ["knockout", "--run", str(run), "--top-k", "2", "--max-images", "2"]
    assert main([*argv, "--min-support", "5", "--random-controls", "2"]) == 0
    return run


@pytest.fixture(scope="module")
def window_run(probe_run, tiny_models):
    run = copy_run(probe_run, "window")
    vlm = tiny_models("clip")
    section = run_knockout(run, vlm=vlm, progress=False, layers=(3, 4), window_sweep=2, **SMALL)
    return run, section


# --- end to end ---------------------------------------------------------------------------------
def test_cli_writes_the_schema_the_report_reads(cli_run):
    res = results_of(cli_run)
    ko = res["knockout"]
    assert ko["reference_stage"] == "adapter" and ko["layers"] is None
    assert ko["conditions"] == list(CONDITIONS) and ko["summary_layer"] == "llm.4"
    assert ko["window_sweep"] is None and ko["settings"]["random_controls"] == 2
    assert 1 <= len(ko["pairs"]) <= 2 and len(ko["per_pair"]) == len(ko["pairs"])
    names = res["dataset"]["class_names"]
    for pair, scores in zip(ko["pairs"], ko["per_pair"], strict=True):
        a, b = pair["classes"]
        assert a < b and pair["names"] == [names[a], names[b]]
        assert 1 <= pair["images"] <= 2 and pair["support"] == pair["correct"] + pair["incorrect"]
        assert isinstance(pair["support"], int) and pair["support"] > 0
        assert scores["classes"] == pair["classes"]
        assert all(set(scores[c]) == set(LLM) for c in CONDITIONS)
    for cond in CONDITIONS:
        assert set(ko["curves"][cond]) == set(LLM)
        for stage in LLM:
            cell = ko["curves"][cond][stage]
            assert set(cell) == {"accuracy", "iou", "recovery"}
            assert all(v is None or 0.0 <= v <= 1.0 for v in cell.values())
            assert cell["accuracy"] is not None and cell["iou"] is not None
    for name in ("knockout_curves", "knockout_summary"):
        assert (cli_run / res["figures"][name]).stat().st_size > 0
    assert "knockout_window_sweep" not in res["figures"]
    assert "probing" in res and "causal" in res["probing"]  # other sections are kept


def test_curves_average_pairs_with_equal_weight(cli_run):
    ko = results_of(cli_run)["knockout"]
    for cond, stage in itertools.product(CONDITIONS, LLM):
        values = [p[cond][stage]["accuracy"] for p in ko["per_pair"]]
        assert ko["curves"][cond][stage]["accuracy"] == pytest.approx(np.mean(values))


def test_none_equals_an_independent_recomputation(window_run, tiny_models):
    run, section = window_run
    vlm = tiny_models("clip")
    config = load_config(run / "config.yaml")
    dataset = build_dataset(config.data, "val", config.data.limit_eval, config.seed)
    prepare = vlm.preprocessor(dataset.num_classes)
    samples = [prepare(dataset[i]) for i in range(len(dataset))]
    bank = ProbeBank.load(run / "probes/causal")
    for pair, scores in zip(section["pairs"], section["per_pair"], strict=True):
        a, b = pair["classes"]
        chosen = [s for s in samples if (s.labels == a).any() and (s.labels == b).any()][:2]
        assert pair["images"] == len(chosen)
        batch = vlm.collate(chosen)
        pred = {s: p.numpy() for s, p in bank.predict(vlm.capture(batch, bank.probes)).items()}
        labels = batch.labels.numpy()
        tokens = (labels == a) | (labels == b)
        assert pair["support"] == tokens.sum()
        wrong_at_ref = tokens & (pred["adapter"] != labels)
        assert pair["incorrect"] == wrong_at_ref.sum()
        for stage in LLM:
            hit = (pred[stage] == labels) & tokens
            ious = [
                (((pred[stage] == c) & (labels == c)) & tokens).sum()
                / (((pred[stage] == c) | (labels == c)) & tokens).sum()
                for c in (a, b)
            ]
            got = scores["none"][stage]
            assert got["accuracy"] == pytest.approx(hit.sum() / tokens.sum(), abs=1e-12)
            assert got["iou"] == pytest.approx(np.mean(ious), abs=1e-12)
            if wrong_at_ref.any():
                recovered = (hit & wrong_at_ref).sum() / wrong_at_ref.sum()
                assert got["recovery"] == pytest.approx(recovered, abs=1e-12)
            else:
                assert got["recovery"] is None


def test_a_layer_window_cannot_act_before_its_first_layer(window_run):
    run, section = window_run
    assert section["layers"] == [3, 4] and results_of(run)["knockout"]["layers"] == [3, 4]
    moved = False
    for scores in section["per_pair"]:
        for cond in CONDITIONS:
            for stage in ("llm.1", "llm.2"):
                assert scores[cond][stage] == scores["none"][stage], (cond, stage)
            moved |= any(scores[cond][s] != scores["none"][s] for s in ("llm.3", "llm.4"))
    assert moved  # the knockout did act inside its window


def test_the_shared_prefix_changes_no_count(window_run, probe_run, tiny_models):
    """knockout.shared_prefix (the default) reuses the clean pass's image features and its states
    before each window; recomputing them instead gives every count and interval bit for bit."""
    run, shared = window_run
    unshared_run = copy_run(probe_run, "unshared")
    vlm = tiny_models("clip")
    unshared = run_knockout(
        unshared_run,
        vlm=vlm,
        progress=False,
        layers=(3, 4),
        window_sweep=2,
        shared_prefix=False,
        **SMALL,
    )
    assert shared.settings["shared_prefix"] and not unshared.settings["shared_prefix"]
    a, b = results_of(run)["knockout"], results_of(unshared_run)["knockout"]
    assert a["differences"] and a["window_sweep"]
    assert {k: v for k, v in a.items() if k != "settings"} == {
        k: v for k, v in b.items() if k != "settings"
    }
    with (
        np.load(run / "arrays/knockout.npz") as a,
        np.load(unshared_run / "arrays/knockout.npz") as b,
    ):
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_shared_prefix_puts_back_instance_level_forwards(tiny_models, random_images):
    """accelerate's device_map wraps a module's forward on the instance: after a resumed forward
    the wrapper is back (and the model's own get_image_features too)."""
    from seglens.prefix import SharedPrefix

    vlm = tiny_models("clip")
    layer = vlm.family.decoder_layers()[0]
    original, calls = layer.forward, []

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    layer.forward = wrapped
    try:
        batch = vlm.prepare(random_images(1))
        prefix = SharedPrefix(vlm, layers=1)
        try:
            with intervene(vlm, []):
                clean = vlm.capture(batch, ["llm.2"])
            with prefix.resume(2), intervene(vlm, []):
                resumed = vlm.capture(batch, ["llm.2"])
        finally:
            prefix.close()
        assert torch.equal(clean["llm.2"], resumed["llm.2"])
        assert layer.forward is wrapped and len(calls) == 1  # the resumed pass skipped it
        assert "get_image_features" not in vlm.family._inner.__dict__
        assert prefix.layers_skipped == 1 and prefix.image_reused == 1
    finally:
        del layer.forward


def test_window_sweep_rows(window_run):
    run, section = window_run
    sweep = section["window_sweep"]
    assert [row["layers"] for row in sweep] == [[1, 2], [3, 4]]
    for row in sweep:
        assert set(row) == {"layers", *CONDITIONS}
        assert row["none"]["accuracy"] == pytest.approx(
            section["curves"]["none"]["llm.4"]["accuracy"]
        )
    # The [3, 4] window is the run's own window, scored at the summary layer.
    for cond in CONDITIONS:
        assert sweep[1][cond]["iou"] == pytest.approx(section["curves"][cond]["llm.4"]["iou"])
    from seglens.report import draw_all  # the caller draws (run_knockout only measures)

    assert "knockout_window_sweep" in draw_all(run) == results_of(run)["figures"]
    assert layer_windows(5, 2) == [(1, 2), (3, 4), (5, 5)]


# --- invariants of the pieces -------------------------------------------------------------------
def test_an_empty_key_set_changes_nothing(probe_run, tiny_models, random_images):
    vlm = tiny_models("clip")
    probes = {s: load_probe(probe_run / f"probes/causal/{s}") for s in LLM}
    batch = vlm.prepare(random_images(2))
    clean = predict_stages(vlm, batch, probes)
    empty = np.zeros((2, vlm.num_image_tokens), dtype=bool)
    np.testing.assert_array_equal(predict_stages(vlm, batch, probes, empty), clean)
    mixed = empty.copy()
    mixed[1, :128] = True  # image 0 keeps an empty set in the same batch
    got = predict_stages(vlm, batch, probes, mixed)
    np.testing.assert_array_equal(got[:, 0], clean[:, 0])
    labels = np.where(np.arange(256) % 2, 1, 3)[None].repeat(2, 0)
    ref = np.ones_like(labels, dtype=bool)
    counts = pair_counts(clean[:, :1], labels[:1], ref[:1], (1, 3))
    assert pair_counts(got[:, :1], labels[:1], ref[:1], (1, 3)).tolist() == counts.tolist()


def test_the_clean_pass_takes_the_knockouts_attention_path(probe_run, tiny_models, random_images):
    """The clean condition runs inside ``intervene(vlm, [])`` (a materialised 4D mask, as every
    knockout), and on CPU that path is bitwise the plain model: features and predictions."""
    vlm = tiny_models("clip")
    probes = {s: load_probe(probe_run / f"probes/causal/{s}") for s in LLM}
    batch = vlm.prepare(random_images(2))
    masks = []
    capture = vlm.capture

    def spy(b, stages):
        masks.append(vlm.attention_mask_override)
        return capture(b, stages)

    vlm.capture = spy
    try:
        clean = predict_stages(vlm, batch, probes)
        plain = predict_stages(vlm, batch, probes, masked=False)
    finally:
        del vlm.capture
    assert masks[0] is not None and masks[1] is None
    np.testing.assert_array_equal(clean, plain)
    with intervene(vlm, []):
        routed = vlm.capture(batch, list(LLM))
    reference = vlm.capture(batch, list(LLM))
    for s in LLM:
        assert torch.equal(routed[s], reference[s])


def test_select_pairs_is_the_top_k_of_symmetric_confusion():
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 5, (7, 7)) + np.diag([100] * 5 + [0, 0])
    cm[2, 4], cm[4, 2] = 400, 100  # the most confused pair
    cm[0, 3], cm[3, 0], cm[1, 3], cm[3, 1] = 60, 30, 45, 45  # a tie: (0, 3) before (1, 3)
    cm[5:] = 0
    cm[5, 6], cm[6, 5] = 60, 50  # rare classes: a big conflict, too little support
    sym = cm + cm.T
    rows = cm.sum(1)
    i, j = np.triu_indices(7, k=1)
    keep = (sym[i, j] > 0) & (rows[i] + rows[j] >= 150)
    order = np.lexsort((j[keep], i[keep], -sym[i, j][keep]))[:5]
    expected = [[int(a), int(b)] for a, b in zip(i[keep][order], j[keep][order], strict=True)]
    # One image per class's token count, every class in it: support = the confusion's rows.
    labels = np.concatenate([np.full(int(r), c) for c, r in enumerate(rows)])[None]
    got = select_pairs(cm, labels, top_k=5, min_support=150)
    assert [p["classes"] for p in got] == expected
    assert [p["classes"] for p in got[:3]] == [[2, 4], [0, 3], [1, 3]]
    assert got[0]["confusion"] == 500 and got[0]["selection_support"] == rows[2] + rows[4]
    assert len(select_pairs(cm, labels, top_k=5, min_support=100)) == 5
    assert [5, 6] in [p["classes"] for p in select_pairs(cm, labels, top_k=2, min_support=100)]
    assert select_pairs(np.eye(3, dtype=int) * 50, labels, top_k=3, min_support=0) == []


def test_only_pairs_that_co_occur_with_support_compete():
    """The most confused pair never shares an image: it is not ranked, and the top-K is filled
    by the next pairs (the old rule picked it first and then found nothing to test)."""
    cm = np.zeros((4, 4), dtype=int)
    cm[0, 1], cm[2, 3], cm[0, 2] = 90, 50, 10
    labels = np.array(
        [
            [0] * 6 + [2] * 6 + [3] * 4,  # 0, 2 and 3 co-occur here
            [1] * 16,  # class 1 lives alone
            [2] * 3 + [3] * 3 + [255] * 10,  # another image of 2 and 3
        ]
    )
    excluded = []
    got = select_pairs(cm, labels, top_k=1, min_support=5, excluded=excluded)
    assert [p["classes"] for p in got] == [[2, 3]]
    assert got[0]["selection_support"] == 16 and got[0]["cooccurring_images"] == 2
    assert excluded == [
        {
            "classes": [0, 1],
            "confusion": 90,
            "selection_support": 0,
            "cooccurring_images": 0,
            "reason": "no evaluation image holds both classes",
        }
    ]
    # max_images: the support counts only the images the knockout will run on.
    capped = select_pairs(cm, labels, top_k=3, min_support=11, max_images=1)
    assert [p["classes"] for p in capped] == [[0, 2]]  # (2, 3): 10 tokens in its first image


def test_random_controls_match_their_set_in_size():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, (6, 64))
    labels[4] = np.where(np.arange(64) < 62, 0, 3)  # the pair covers almost every token
    labels[5] = 2  # the pair is absent: empty sets
    ref_correct = rng.random((6, 64)) < 0.7
    sets = key_sets(labels, ref_correct, (0, 1))
    pair_tokens = np.isin(labels, (0, 1))
    for name, matched in sets.items():
        rngs = [np.random.default_rng([7, i]) for i in range(6)]
        control = random_control(matched, pair_tokens, rngs)
        np.testing.assert_array_equal(control.sum(1), matched.sum(1), err_msg=name)
        for i in range(6):  # outside the pair whenever the image has room
            if matched[i].sum() <= (~pair_tokens[i]).sum():
                assert not (control[i] & pair_tokens[i]).any()
        again = random_control(
            matched, pair_tokens, [np.random.default_rng([7, i]) for i in range(6)]
        )
        np.testing.assert_array_equal(again, control)
    assert sets["block_correct"][4].sum() > 2  # the fallback row did need the pair's tokens
    assert not sets["block_correct"][5].any() and not sets["block_incorrect"][5].any()
    np.testing.assert_array_equal(sets["block_correct"] | sets["block_incorrect"], pair_tokens)


def test_pair_scores_by_hand():
    # tokens: labels a a a b b; predictions a b x b b (x: a third class)
    labels = np.array([[5, 5, 5, 9, 9, 0]])
    pred = np.array([[[5, 9, 2, 9, 9, 0]]])
    ref = np.array([[True, False, False, True, True, True]])
    counts = pair_counts(pred, labels, ref, (5, 9))[0, 0]  # stage 0, image 0
    n = dict(zip(COUNT_FIELDS, counts.tolist(), strict=True))
    assert n["tokens"] == 5 and n["correct"] == 3 and n["recovered"] == 0
    scores = pair_scores(counts)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["iou"] == pytest.approx((1 / 3 + 2 / 3) / 2)  # a: 1/(3+1-1), b: 2/(2+3-2)
    assert scores["recovery"] == 0.0
    assert pair_scores(np.zeros(10, dtype=int)) == {"accuracy": None, "iou": None, "recovery": None}


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"reference_stage": "vision.1"}, "has no clean probe in this run"),
        ({"layers": (3, 9)}, "goes past the last LLM layer"),
        ({"random_controls": -1}, "knockout.random_controls=-1 must be >= 0"),
        ({"top_kk": 3}, "did you mean 'knockout.top_k'"),
        ({"control_pool": ("pair", "inside")}, r"control_pool=\['pair', 'inside'\] must be"),
        ({"control_pool": ("pair", "pair")}, "repeats a pool"),
        ({"mode": "keep"}, r"knockout.mode='keep' is not one of \('block', 'keep_only'\)"),
    ],
)
def test_bad_settings_are_refused(probe_run, tiny_models, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_knockout(probe_run, vlm=tiny_models("clip"), progress=False, **overrides)


def test_a_directory_without_probing_is_refused(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="run `seglens probe` first"):
        run_knockout(tmp_path)


# --- control pools, keep_only, per-image counts, intervals ---------------------------------------
def test_each_control_pool_draws_only_from_its_pool_with_the_matched_count():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 5, (8, 64))
    labels[7] = np.where(np.arange(64) < 60, 0, 4)  # few tokens outside the pair
    ref_correct = rng.random((8, 64)) < 0.6
    sets = key_sets(labels, ref_correct, (0, 1))
    pair_tokens = np.isin(labels, (0, 1))
    drawn = {}
    for pool in CONTROL_POOLS:
        for name, matched in sets.items():
            rngs = [np.random.default_rng([3, i]) for i in range(8)]
            control = random_control(matched, pair_tokens, rngs, pool)
            np.testing.assert_array_equal(control.sum(1), matched.sum(1), err_msg=(pool, name))
            drawn[pool, name] = control
            if pool == "pair":
                assert not (control & ~pair_tokens).any()
            if pool == "outside_pair":
                room = matched.sum(1) <= (~pair_tokens).sum(1)
                assert not (control[room] & pair_tokens[room]).any()
    # Over many images, the image pool lands inside and outside the pair.
    image = drawn["image", "block_correct"]
    assert (image & pair_tokens).any() and (image & ~pair_tokens).any()
    # The pair pool removes the pair's tokens whatever their reference status.
    inside = drawn["pair", "block_correct"]
    assert (inside & ~ref_correct).any() and (inside & ref_correct).any()
    with pytest.raises(ValueError, match="control pool 'inside' is not one of"):
        random_control(sets["block_correct"], pair_tokens, rngs, "inside")


def test_keep_only_with_all_keys_equals_the_plain_model(probe_run, tiny_models, random_images):
    """keep_only of every image token blocks nothing (bit for bit the plain model); keep_only of
    all but slot j is the same edge set as blocking j alone."""
    vlm = tiny_models("clip")
    probes = {s: load_probe(probe_run / f"probes/causal/{s}") for s in LLM}
    batch = vlm.prepare(random_images(2))
    N = vlm.num_image_tokens
    clean = predict_stages(vlm, batch, probes)
    every = np.ones((2, N), dtype=bool)
    keep_all = blocked_keys(every, "keep_only")
    assert not keep_all.any()
    np.testing.assert_array_equal(predict_stages(vlm, batch, probes, keep_all), clean)
    features = vlm.capture(batch, LLM)
    from seglens.interventions import Knockout, TokenSet, intervene

    with intervene(vlm, [Knockout(keys=TokenSet.from_mask(keep_all), later_only=True)]):
        inside = vlm.capture(batch, LLM)
    for s in LLM:
        assert torch_equal(inside[s], features[s])
    but_one = every.copy()
    but_one[:, 5] = False
    single = ~but_one
    np.testing.assert_array_equal(
        predict_stages(vlm, batch, probes, blocked_keys(but_one, "keep_only")),
        predict_stages(vlm, batch, probes, blocked_keys(single, "block")),
    )
    with pytest.raises(ValueError, match=r"knockout\.mode='keep' is not one of"):
        blocked_keys(every, "keep")


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_per_image_counts_sum_to_the_batch_counts():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, (5, 40))
    pred = rng.integers(0, 4, (3, 5, 40))
    ref = rng.random((5, 40)) < 0.5
    per_image = pair_counts(pred, labels, ref, (1, 2))
    assert per_image.shape == (3, 5, 10)
    for i in range(5):
        np.testing.assert_array_equal(
            per_image[:, i],
            pair_counts(pred[:, i : i + 1], labels[i : i + 1], ref[i : i + 1], (1, 2))[:, 0],
        )
    tokens = np.isin(labels, (1, 2))
    np.testing.assert_array_equal(per_image[0, :, 0], tokens.sum(1))
    np.testing.assert_array_equal(per_image[1, :, 1], ((pred[1] == labels) & tokens).sum(1))


def test_knockout_intervals_equal_a_naive_resampling_loop():
    """Two pairs sharing image 11; two draws of a control: resample the union of the images,
    recompute each pair's draw-mean accuracy and the pair mean, take percentiles."""
    rng = np.random.default_rng(9)
    S = 2
    pairs = []
    for images in ([10, 11, 12], [11, 13]):
        n = len(images)
        tokens = rng.integers(3, 9, (n, S))
        table = {}
        for cond, draws in (("none", 1), ("block_correct", 1), ("random_correct", 2)):
            t = np.zeros((draws, n, S, 10), dtype=np.int64)
            t[..., 0] = tokens
            t[..., 1] = rng.integers(0, tokens + 1, (draws, n, S))
            table[cond] = t
        pairs.append({"images": images, "counts": table})
    contrasts = {"g": {"gap": ("block_correct", "random_correct"), "d": ("block_correct", "none")}}
    got = knockout_differences(pairs, ["llm.1", "llm.2"], contrasts, n_resamples=80, seed=4)
    union = [10, 11, 12, 13]
    idx = np.random.default_rng(4).integers(0, 4, (80, 4))

    def statistic(rows, c1, c2, s):
        per_pair = []
        for p in pairs:
            drawn = [union[r] for r in rows]
            take = [p["images"].index(i) for i in drawn if i in p["images"]]
            if not take:
                continue

            t1, t2 = (p["counts"][c][:, take, s] for c in (c1, c2))  # (D, k, 10)
            acc1 = np.mean(t1[..., 1].sum(1) / t1[..., 0].sum(1))  # mean over draws
            acc2 = np.mean(t2[..., 1].sum(1) / t2[..., 0].sum(1))
            per_pair.append(acc1 - acc2)
        return np.mean(per_pair)

    for s, stage in enumerate(["llm.1", "llm.2"]):
        for name, (c1, c2) in contrasts["g"].items():
            cell = got["g"][stage][name]
            assert cell["estimate"] == pytest.approx(statistic(range(4), c1, c2, s), abs=1e-12)
            values = [statistic(r, c1, c2, s) for r in idx]
            low, mid, high = np.quantile(values, [0.025, 0.5, 0.975])
            centred = (cell["estimate"] + low - mid, cell["estimate"] + high - mid)
            assert (cell["low"], cell["high"]) == pytest.approx(centred, abs=1e-12)
            assert cell["n_images"] == 4


@pytest.fixture(scope="module")
def pools_run(probe_run, tiny_models):
    run = copy_run(probe_run, "pools")
    section = run_knockout(run, vlm=tiny_models("clip"), progress=False, random_controls=2, **SMALL)
    return run, section


def test_intervals_of_every_pool_match_the_curves(pools_run):
    _, ko = pools_run
    assert ko["status"] == "tested" and ko["mode"] == "block"
    assert ko["control_pools"] == list(CONTROL_POOLS)
    diff = ko["differences"]
    assert set(diff["pools"]) == set(CONTROL_POOLS) and diff["metric"] == "accuracy"
    curves = ko["curves"]
    for pool, per_stage in diff["pools"].items():
        control = ko["controls"]
        ctrl = {m["matches"]: c for c, m in control.items() if m["pool"] == pool}
        for stage in LLM:
            cells = per_stage[stage]
            gap = curves["block_correct"][stage]["accuracy"]
            gap -= curves[ctrl["block_correct"]][stage]["accuracy"]
            assert cells["block_correct_minus_control"]["estimate"] == pytest.approx(gap)
            drop = curves["block_incorrect"][stage]["accuracy"]
            drop -= curves["none"][stage]["accuracy"]
            assert cells["block_incorrect_minus_none"]["estimate"] == pytest.approx(drop)
            for cell in cells.values():
                assert set(cell) == {"estimate", "low", "high", "n_images"}
    assert (
        diff["minus_none"]["llm.4"]["block_correct"]
        == (diff["pools"]["pair"]["llm.4"]["block_correct_minus_none"])
    )


def test_nothing_to_test_is_recorded_not_raised(probe_run, tiny_models):
    run = copy_run(probe_run, "nothing")
    ko = run_knockout(run, vlm=tiny_models("clip"), progress=False, min_support=10**9)
    assert ko["status"] == "nothing_to_test" and "knockout.min_support" in ko["reason"]
    assert ko["pairs"] == [] and ko["curves"] == {} and ko["differences"] is None
    assert results_of(run)["knockout"]["status"] == "nothing_to_test"
    assert ko["skipped_pairs"] and all("reason" in p for p in ko["skipped_pairs"])


def test_selection_support_equals_pair_images_on_random_labels():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 6, (30, 16))
    labels[rng.random(labels.shape) < 0.3] = 255
    labels[:10, :] = np.where(labels[:10] == 5, 0, labels[:10])  # class 5 rarer
    cm = rng.integers(0, 9, (6, 6))
    for cap in (None, 3):
        got = select_pairs(cm, labels, top_k=15, min_support=0, max_images=cap)
        for p in got:
            rows = pair_images(labels, p["classes"], cap)
            assert p["cooccurring_images"] == len(rows)
            assert p["selection_support"] == np.isin(labels[rows], p["classes"]).sum()
