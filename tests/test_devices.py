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


# --- torchrun: one GPU per rank, device set only for nccl, waits outside nccl --------------------
TORCHRUN_ENV = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_each_rank_uses_its_own_gpu_and_conflicts_are_refused(monkeypatch):
    from seglens.distributed import rank_device

    assert rank_device("cuda:0", None) == "cuda:0"  # outside torchrun: as given
    assert rank_device(None, "auto") is None
    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device("cuda", None) == rank_device(None, None) == "cuda:1"
    assert rank_device("cuda:1", None) == "cuda:1" and rank_device("cpu", None) == "cpu"
    with pytest.raises(ValueError, match=r"--device cuda:0 under torchrun .*LOCAL_RANK=1.*--dev"):
        rank_device("cuda:0", None)
    with pytest.raises(ValueError, match=r"--device-map 'auto' under torchrun.*Drop --device-map"):
        rank_device(None, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device(None, None) == "cpu"


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_the_device_is_set_only_for_nccl(monkeypatch, backend):
    """``make bench``'s 2 gloo processes on a 1-GPU machine: rank 1 must not claim cuda:1."""
    from seglens import distributed

    for key, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("group", kw)) or "waits")
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setenv("SEGLENS_WAIT_TIMEOUT", "90")
    with distributed.process_group(backend):
        assert distributed._waits["group"] == "waits"
    expected = [("set_device", 1)] if backend == "nccl" else []
    expected += [("init", {"backend": backend})]
    expected += [("group", {"backend": "gloo", "timeout": distributed.timedelta(seconds=90)})]
    assert calls == [*expected, ("destroy",)] and not distributed._waits


def test_wait_timeout_is_checked(monkeypatch):
    from seglens.distributed import DEFAULT_WAIT_TIMEOUT_S, wait_timeout

    assert wait_timeout().total_seconds() == DEFAULT_WAIT_TIMEOUT_S
    monkeypatch.setenv("SEGLENS_WAIT_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"SEGLENS_WAIT_TIMEOUT='soon'.*seconds, a number > 0"):
        wait_timeout()


def _wait_worker(rank: int, port: int, queue) -> None:
    import os
    import time
    from datetime import timedelta

    os.environ |= {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ["SEGLENS_WAIT_TIMEOUT"] = "60"
    from seglens import distributed

    # Collectives time out after 1 s; rank 0 works alone for 2.5 s, then everyone meets.
    with distributed.process_group("gloo", timeout=timedelta(seconds=1)):
        if rank == 0:
            time.sleep(2.5)
        start = time.perf_counter()
        distributed.barrier()
        waited = time.perf_counter() - start
        total = torch.ones(1)
        distributed.sum_over_ranks(total)
        queue.put((rank, waited, float(total)))


def test_rank_0_alone_outlasts_the_collective_timeout():
    """Rank 0 works alone longer than the collectives' timeout; the others wait in the gloo
    side group (``SEGLENS_WAIT_TIMEOUT``) and the group still works afterwards."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # spawn would import torch twice more (~10 s on 2 cores)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_wait_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r: (w, t) for r, w, t in (queue.get(timeout=60) for _ in range(2))}
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert got[1][0] > 1.0 and got[0][1] == got[1][1] == 2.0  # rank 1 waited past the 1 s


def test_models_load_straight_onto_their_device(monkeypatch, tmp_path, tiny_models, caplog):
    """With accelerate, ``from_pretrained`` places the weights on the accelerator
    (``device_map={"": device}``): no host copy of the whole model first; without it the model
    loads on the CPU and moves, with a warning that says how to avoid the host copy."""
    import importlib.util

    from transformers import AutoModelForImageTextToText

    from seglens.models import loading

    vlm = tiny_models("clip", "sdpa")
    vlm.model.save_pretrained(tmp_path)
    vlm.processor.save_pretrained(tmp_path)
    real = AutoModelForImageTextToText.from_pretrained.__func__
    seen = []

    def spy(cls, *args, **kwargs):  # records the placement, loads on the CPU (no GPU here)
        seen.append(kwargs.pop("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(loading, "rank_device", lambda device, device_map: device)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    for accelerate in (True, False):

        def spec(name, *args, on=accelerate):
            return (on or None) if name == "accelerate" else find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", spec)
        loading.load_model(str(tmp_path), dtype="float32", device="cuda:1")
    assert seen == [{"": torch.device("cuda:1")}, None]
    assert moved == [("cuda:1",)]  # only without accelerate
    assert "accelerate is not installed" in caplog.text and "seglens[gpu]" in caplog.text
    loading.load_model(str(tmp_path), dtype="float32", device="cpu")
    assert seen[-1] is None and len(moved) == 2


def test_checkpoints_restore_where_the_caller_says(tmp_path):
    """A checkpoint written on cuda:3 resumes on a machine without it (the CPU by default),
    or wherever ``map_location`` says (here virtual cuda:1)."""
    import json

    from seglens.checkpoint import Checkpointer

    directory = tmp_path / "checkpoint"
    writer = Checkpointer(directory)
    writer.register("probe", lambda: {"w": torch.arange(4.0)}, lambda _: None)
    writer.save()
    meta_path = directory / "rank0.json"
    meta = json.loads(meta_path.read_text())
    assert meta["state"]["probe"]["w"]["device"] == "cpu"
    meta["state"]["probe"]["w"]["device"] = "cuda:3"  # as a 4-GPU run wrote it
    meta_path.write_text(json.dumps(meta))

    def resumed(**options) -> torch.Tensor:
        got = {}
        Checkpointer(directory, resume=True, **options).register("probe", dict, got.update)
        return got["w"]

    assert resumed().device == torch.device("cpu") and resumed().tolist() == [0, 1, 2, 3]
    assert resumed(map_location="cpu").device == torch.device("cpu")
    with virtual_cuda(2):
        w = resumed(map_location={"cuda:3": "cuda:1"})
        assert w.device == torch.device("cuda:1") and w.cpu().tolist() == [0, 1, 2, 3]
        assert resumed(map_location="cuda:0").device == torch.device("cuda:0")


def test_accumulators_use_a_dtype_the_device_has(monkeypatch):
    """MPS has no float64 kernels: the standardiser's sums and the validation mIoU accumulate
    in ``accumulate_dtype(device)`` (float32 on MPS), float64 elsewhere."""
    from seglens.probes import _common, standardize
    from seglens.probes._common import accumulate_dtype, miou

    assert accumulate_dtype("mps") == torch.float32
    assert accumulate_dtype("cuda:1") == accumulate_dtype("cpu") == torch.float64
    x = torch.randn(8, 5)
    assert standardize.Standardizer(warmup_batches=2).partial_fit(x)._sum.dtype == torch.float64
    as_mps = lambda device: torch.float32  # noqa: E731 (what MPS gets)
    monkeypatch.setattr(standardize, "accumulate_dtype", as_mps)
    monkeypatch.setattr(_common, "accumulate_dtype", as_mps)
    assert standardize.Standardizer(warmup_batches=2).partial_fit(x)._sum.dtype == torch.float32
    assert miou(torch.eye(3, dtype=torch.int64)[None]).dtype == torch.float32


def test_sync_free_counts_equal_the_reference_counters():
    """``count_confusions`` and ``image_tables`` (masked_fill + index_add on a device, bincount
    on the CPU) equal ``ConfusionMatrix`` / ``PerImageCounts``; invalid labels are counted, and
    masks travel as lossless small integers."""
    from seglens.experiments.evaluation import _small_labels
    from seglens.metrics import (
        ConfusionMatrix,
        PerImageCounts,
        count_confusions,
        image_tables,
        invalid_labels,
    )

    rng = np.random.default_rng(0)
    pred = torch.from_numpy(rng.integers(0, C, (3, 4, 50)))  # (S, B, N)
    target = torch.from_numpy(np.where(rng.random((4, 50)) < 0.2, 255, rng.integers(0, C, (4, 50))))
    for device in ("cpu", "cuda:0"):
        with virtual_cuda(1):
            got = count_confusions(pred.to(device), target.to(device), C).cpu()
            rows = image_tables(pred.to(device), target.to(device), C).cpu()
        for s in range(3):
            assert torch.equal(got[s], ConfusionMatrix(C).update(pred[s], target).matrix)
            want = PerImageCounts(C).add_batch(pred[s], target)._table()
            np.testing.assert_array_equal(rows[s].numpy(), want)
    bad = target.clone()
    bad[0, :3] = torch.tensor([6, -1, 300])
    assert int(invalid_labels(bad, C)) == 3 and int(invalid_labels(target, C)) == 0
    assert _small_labels(target.numpy(), C).dtype == np.uint8
    wide = _small_labels(bad.numpy(), C)
    assert wide.dtype == np.int16 and wide.tolist() == bad.tolist()
