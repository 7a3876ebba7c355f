"""Feature cache: probes trained from the cache equal probes trained on live features in the same
order (exact on an fp32 cache, close on fp16), the disk estimate comes first, a non-empty
directory is refused, and token subsampling and reading order behave."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from seglens.cache import FeatureCache, iterate_cache, train_probes_from_cache, write_cache
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SyntheticDataset, iterate_samples
from seglens.experiments.probing import train_probes

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
    cached = train_probes_from_cache(tmp_path / "c", train, STAGES, cfg, batch_size=4, seed=5)
    cached.select()
    a, b = weights(live), weights(cached)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_fp16_cache_through_the_config_is_close_to_live(tmp_path, vlm, train):
    cfg = ProbeConfig(solver="sgd", epochs=2, warmup_batches=1, holdout_fraction=0.25)
    live = train_probes(vlm, train, STAGES, cfg, data_config=DATA, seed=1, progress=False)
    cached_cfg = replace(cfg, cache_dir=str(tmp_path / "c"))
    cached = train_probes(vlm, train, STAGES, cached_cfg, data_config=DATA, seed=1, progress=False)
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
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
