"""Device handling without a GPU: stages and probes on virtual ``cuda:0`` / ``cuda:1``
(``tests/virtual_cuda.py``: real values, CUDA's same-device rule) run evaluation and probe
prediction as a ``device_map`` split or a feature cache on one GPU would, and give the CPU's
results; host syncs per evaluation batch are counted and pinned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seglens.config import DataConfig, ProbeConfig
from seglens.data import SyntheticDataset
from seglens.experiments.evaluation import evaluate_probes
from seglens.experiments.training import train_probes
from seglens.probes import load_probe
from virtual_cuda import VirtualTensor, virtual_cuda

C = 6
DATA = DataConfig(batch_size=4)
STAGES = ["encoder", "adapter", "llm.1", "llm.2", "llm.3", "llm.4"]
CFG = ProbeConfig(solver="lda", bootstrap=0, qualitative=2)


class SplitVLM:
    """A model whose stages come out on the given devices (as under ``device_map``)."""

    def __init__(self, vlm, devices: dict[str, str]):
        self._vlm, self._devices = vlm, devices

    def __getattr__(self, name):
        return getattr(self._vlm, name)

    @property
    def device(self) -> torch.device:
        return torch.device(self._devices["encoder"])

    def capture(self, batch, stages):
        states = self._vlm.capture(batch, stages)
        return {s: x.to(self._devices[s]) for s, x in states.items()}


@pytest.fixture(scope="module")
def small_vlm():
    from seglens.models import tiny_llava

    return tiny_llava("clip", image_size=112)


@pytest.fixture(scope="module")
def trained(small_vlm, tmp_path_factory):
    """LDA probes trained on CPU and saved; the CPU evaluation as the reference."""
    train = SyntheticDataset(num_images=8, num_classes=C, split="train")
    evaluation = SyntheticDataset(num_images=8, num_classes=C, split="val")
    bank = train_probes(small_vlm, train, STAGES, CFG, data_config=DATA, progress=False)
    directory = tmp_path_factory.mktemp("bank")
    bank.save(directory)
    ref = evaluate_probes(
        small_vlm, bank, evaluation, STAGES, CFG, data_config=DATA, progress=False
    )
    return bank, directory, evaluation, ref


def _same_results(res, ref) -> None:
    assert res.metrics() == ref.metrics()
    got, want = res.arrays(), ref.arrays()
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert res.qualitative.keys() == ref.qualitative.keys()
    for key in ref.qualitative:
        np.testing.assert_array_equal(res.qualitative[key], ref.qualitative[key])


def test_the_harness_follows_cuda_rules():
    with virtual_cuda(2) as mode:
        a = torch.ones(3, device="cuda:0")
        b = torch.arange(3.0).to("cuda:1")
        assert isinstance(a, VirtualTensor) and str(b.device) == "cuda:1"
        with pytest.raises(RuntimeError, match=r"same device.*cuda:0 and cuda:1"):
            a + b
        with pytest.raises(RuntimeError, match="same device"):
            a + torch.ones(3)  # a CPU operand (not a 0-dim scalar)
        with pytest.raises(TypeError, match="numpy"):
            np.asarray(a)
        assert (a + b.to("cuda:0")).cpu().tolist() == [1.0, 2.0, 3.0]
        assert mode.total == 1  # the copy back
        float(a.sum())
        a[a > 0].sum()
        assert mode.syncs == {"copy_to_cpu": 1, "_local_scalar_dense": 1, "boolean_mask_index": 1}


def test_evaluation_under_a_device_map(small_vlm, trained):
    """Defect 1: stages (and their probes) alternate between cuda:0 and cuda:1, as a
    ``device_map`` puts them; before the fix the per-stage logits could not be stacked."""
    _, directory, evaluation, ref = trained
    devices = {s: f"cuda:{k % 2}" for k, s in enumerate(STAGES)}
    with virtual_cuda(2):
        vlm = SplitVLM(small_vlm, devices)
        bank = type(trained[0]).load(directory)
        for s in STAGES:
            bank.probes[s] = load_probe(directory / s, map_location=devices[s])
            assert bank.probes[s].device == torch.device(devices[s])
        res = evaluate_probes(vlm, bank, evaluation, STAGES, CFG, data_config=DATA, progress=False)
        _same_results(res, ref)


def test_probes_take_features_to_their_own_device(small_vlm, trained):
    """Defect 2: probes trained on cuda:0 (the feature cache's device) score features that come
    from cuda:1, and a probe loaded on the CPU predicts CUDA features (the README's
    ``load_probe(...).predict(vlm.capture(b)[s])``)."""
    bank, directory, evaluation, ref = trained
    devices = {s: f"cuda:{k % 2}" for k, s in enumerate(STAGES)}
    batch = small_vlm.prepare([evaluation[i].image for i in range(2)])
    features = small_vlm.capture(batch, STAGES)
    want = {s: bank.probes[s].predict(features[s]) for s in STAGES}
    with virtual_cuda(2):
        for s in STAGES:
            on_gpu = features[s].to(devices[s])
            on_cpu = load_probe(directory / s)
            assert on_cpu.device == torch.device("cpu")
            assert torch.equal(on_cpu.predict(on_gpu), want[s])
            cached = load_probe(directory / s, map_location="cuda:0")
            got = cached.predict(on_gpu)
            assert got.device == torch.device("cuda:0")
            assert torch.equal(got.cpu(), want[s])
            assert cached.score(on_gpu, torch.zeros_like(want[s]).to(devices[s])) >= 0
        vlm = SplitVLM(small_vlm, devices)
        cached_bank = type(bank).load(directory, map_location="cuda:0")
        res = evaluate_probes(
            vlm, cached_bank, evaluation, STAGES, CFG, data_config=DATA, progress=False
        )
        _same_results(res, ref)
