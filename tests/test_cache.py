"""Feature cache: the one trainer over cached features gives the probes it gives over live
features (exact on an fp32 cache, close on fp16), with the same holdout, selection and resume;
one cache per attention condition; the disk estimate comes first, a non-empty directory is
refused, and token subsampling and reading order behave."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from seglens.analyses.probing.measure import train_probes
from seglens.cache import CachedFeatures, FeatureCache, iterate_cache, write_cache
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SyntheticDataset, iterate_samples

C = 6
DATA = DataConfig(batch_size=4)
STAGES = ["encoder", "adapter", "llm.2"]


@pytest.fixture(scope="module")
def vlm():
    from seglens.models import tiny_llava

    return tiny_llava("clip", image_size=112)  # 8 x 8 tokens


@pytest.fixture(scope="module")
def train():
    return SyntheticDataset(num_images=12, num_classes=C, split="train")


def weights(bank) -> dict[str, torch.Tensor]:
    return {
        f"{s}.{k}": v
        for s, p in bank.probes.items()
        for k, v in (("coef", p.coef_), ("intercept", p.intercept_), ("mean", p.mean_))
    }


@pytest.mark.parametrize("solver", ["sgd", "lda"])
def test_fp32_cache_trains_the_same_probes_as_live_features(tmp_path, vlm, train, solver):
    cfg = ProbeConfig(solver=solver, lrs=(1e-2,), holdout_fraction=0.0, epochs=3, warmup_batches=1)
    live = train_probes(vlm, train, STAGES, cfg, data_config=DATA, seed=5, progress=False)
    write_cache(
        vlm,
        train,
        STAGES,
        tmp_path / "c",
        data_config=DATA,
        dtype=torch.float32,
        shard_images=5,
        progress=False,
    )
    features = CachedFeatures(tmp_path / "c", train, STAGES, batch_size=4)
    options = dict(data_config=DATA, seed=5, progress=False, features=features)
    cached = train_probes(vlm, train, STAGES, cfg, **options)
    assert cached.training_["features"] == str(tmp_path / "c")
    assert cached.training_["train_images"] == live.training_["train_images"] == 12
    a, b = weights(live), weights(cached)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_fp16_cache_through_the_config_is_close_to_live(tmp_path, vlm, train):
    cfg = ProbeConfig(
        solver="sgd", epochs=2, warmup_batches=1, holdout_fraction=0.25, early_stopping=False
    )
    live = train_probes(vlm, train, STAGES, cfg, data_config=DATA, seed=1, progress=False)
    cached_cfg = replace(cfg, cache_dir=str(tmp_path / "c"))
    cached = train_probes(vlm, train, STAGES, cached_cfg, data_config=DATA, seed=1, progress=False)
    (path,) = (tmp_path / "c/causal").glob("*/manifest.json")  # one entry, named by its identity
    manifest = json.loads(path.read_text())
    assert manifest["dtype"] == "float16" and manifest["stages"] == STAGES
    assert len(manifest["cached"]) == 9  # the 3 holdout images are scored live, not cached
    assert cached.training_["train_images"] == live.training_["train_images"] == 9
    assert cached.training_["holdout_images"] == live.training_["holdout_images"] == 3
    a, b = weights(live), weights(cached)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=2e-2, atol=2e-2, msg=name)
    # A second run reuses the cache: no forward pass over the training images.
    again = train_probes(vlm, train, STAGES, cached_cfg, data_config=DATA, seed=1, progress=False)
    for name, value in weights(again).items():
        torch.testing.assert_close(value, b[name], rtol=0, atol=0, msg=name)


def test_estimate_is_logged_first_and_non_empty_dir_refused(tmp_path, vlm, train, caplog):
    with caplog.at_level(logging.INFO, logger="seglens.cache"):
        write_cache(
            vlm, train.limit(3), ["adapter"], tmp_path / "c", data_config=DATA, progress=False
        )
    D = vlm.family.stage_widths()["adapter"]
    expected = 3 * 64 * D * 2 / 2**30
    assert any(f"= {expected:.2f} GiB" in r.getMessage() for r in caplog.records)
    with pytest.raises(FileExistsError, match="is not empty"):
        write_cache(vlm, train, ["adapter"], tmp_path / "c", data_config=DATA, progress=False)


def test_token_subsampling_and_order(tmp_path, vlm, train):
    part = train.limit(5)
    write_cache(
        vlm,
        part,
        ["adapter"],
        tmp_path / "c",
        data_config=DATA,
        tokens_per_image=10,
        shard_images=2,
        progress=False,
    )
    cache = FeatureCache(tmp_path / "c")
    assert (
        cache.manifest["tokens_per_image"] == 10 and len(cache.manifest["shards"]) == 2
    )  # whole batches
    batches = list(iterate_cache(cache, [4, 0, 2], batch_size=2))
    assert [b[1].shape for b in batches] == [(2, 10), (1, 10)]
    feats, labels, hist = batches[0]
    assert feats["adapter"].shape == (2, 10, vlm.family.stage_widths()["adapter"])
    assert feats["adapter"].dtype == torch.float16 and hist.shape == (2, 10, C)
    # Same tokens as the live capture of image 4.
    stream = iterate_samples(part, batch_size=5, transform=vlm.preprocessor(C), progress=False)
    prepared = next(iter(stream))
    batch = vlm.collate(prepared)
    live = vlm.capture(batch, ["adapter"])["adapter"][4]
    assert cache.manifest["shards"][1]["index"] == [4]
    tokens = np.sort(np.random.default_rng([0, 4, 0xCAC4E]).choice(64, 10, replace=False))
    torch.testing.assert_close(feats["adapter"][0].float(), live[tokens].half().float())
    assert torch.equal(labels[0], batch.labels[4][tokens])


def test_one_cache_per_condition_and_model(tmp_path, vlm, train):
    """An intervened model's features get their own cache (never the clean one's), and a cache
    is not reused for another model or condition."""
    from seglens.interventions import BidirectionalImage, intervene

    cfg = ProbeConfig(solver="lda", cache_dir=str(tmp_path / "c"))
    options = dict(data_config=DATA, seed=1, progress=False)
    part = train.limit(4)
    train_probes(vlm, part, ["llm.2"], cfg, condition="causal", **options)
    with intervene(vlm, [BidirectionalImage()]):
        train_probes(vlm, part, ["llm.2"], cfg, condition="bidirectional_image", **options)
        stream = iterate_samples(part, batch_size=4, transform=vlm.preprocessor(C), progress=False)
        live = vlm.capture(vlm.collate(next(iter(stream))), ["llm.2"])["llm.2"]
    (causal,) = (FeatureCache(p.parent) for p in (tmp_path / "c/causal").glob("*/manifest.json"))
    (bidir,) = (
        FeatureCache(p.parent) for p in (tmp_path / "c/bidirectional_image").glob("*/manifest.json")
    )
    assert bidir.manifest["source"]["condition"] == "bidirectional_image"
    assert bidir.manifest["source"]["model"] == causal.manifest["source"]["model"]
    (feats_b, *_), (feats_c, *_) = (
        next(iter(iterate_cache(c, [0, 1, 2, 3], batch_size=4))) for c in (bidir, causal)
    )
    torch.testing.assert_close(feats_b["llm.2"].float(), live.half().float())
    assert not torch.equal(feats_b["llm.2"], feats_c["llm.2"])
    # Another model (here: its description altered in place) is a new entry, not a reuse.
    manifest = causal.dir / "manifest.json"
    data = json.loads(manifest.read_text())
    data["source"]["model"]["num_llm_layers"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"model.num_llm_layers: 99 -> \d+\); delete"):
        train_probes(vlm, part, ["llm.2"], cfg, condition="causal", **options)


def test_cached_training_resumes_to_the_uninterrupted_probes(tmp_path, vlm, train):
    """A run killed in the middle of a cached epoch resumes from its checkpoint (the cache is
    reused, no forward pass runs) and ends with the probes of an uninterrupted run."""
    from unittest import mock

    from seglens.checkpoint import Checkpointer

    cfg = ProbeConfig(solver="sgd", epochs=2, warmup_batches=1, holdout_fraction=0.0)
    cfg = replace(cfg, lrs=(1e-2,), cache_dir=str(tmp_path / "c"))
    options = dict(data_config=DATA, seed=3, progress=False)
    torch.manual_seed(0)
    reference = weights(train_probes(vlm, train, STAGES, cfg, **options))

    class Crash(BaseException):
        pass

    real, calls = FeatureCache.read, [0]

    def read(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # inside epoch 1 (warm-up: 1 batch, then 3 batches per epoch)
            raise Crash
        return real(self, *args, **kwargs)

    torch.manual_seed(0)
    ckpt = Checkpointer(tmp_path / "ckpt", every=1)
    with mock.patch.object(FeatureCache, "read", read), pytest.raises(Crash):
        train_probes(vlm, train, STAGES, cfg, checkpoint=ckpt, **options)
    state = json.loads((tmp_path / "ckpt" / "rank0.json").read_text())
    assert state["current"]["phase"] == "train.epoch0" and state["current"]["consumed"] > 0
    torch.manual_seed(0)
    again = Checkpointer(tmp_path / "ckpt", every=1, resume=True)
    with mock.patch.object(vlm, "capture", side_effect=AssertionError("recomputed")):
        resumed = train_probes(vlm, train, STAGES, cfg, checkpoint=again, **options)
    for name, value in weights(resumed).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=0, msg=name)
