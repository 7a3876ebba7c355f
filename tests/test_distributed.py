"""Data parallel on the real user path: ``torchrun --nproc-per-node 2 -m seglens probe`` (gloo,
CPU, tiny model) gives the same probes and metrics as one process, and a failure on one rank
stops both with that rank's message.

The single-process reference uses batch size 2 x B: W ranks with batch B shard each epoch's
seeded global order (rank r takes images r, r + W, ...), so their step k sees exactly the images
of one process's step k with batch W x B, and sgd steps on the summed gradient over the summed
valid-token count (the mean over the union, not a mean of per-rank means).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from seglens.cli import main
from seglens.distributed import interleave

TORCHRUN = Path(sys.executable).with_name("torchrun")
COMMON = ["--model", "tiny-clip", "--dataset", "synthetic", "--limit", "16", "--limit-eval", "8"]
COMMON += ["--warmup-batches", "1", "--bootstrap", "200", "--seed", "3"]
COMMON += ["--epochs", "3"]  # sgd: 3 epochs make the comparison; the suite's time asks no more
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")


def torchrun(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "seglens", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_close(a, b, tol: float, where: str = "") -> None:
    """Nested JSON values equal, numbers to ``tol`` (absolute)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], tol, f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, tol, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=tol), where
    else:
        assert a == b, where


def compare_runs(one: Path, two: Path, probe_tol: float, metric_tol: float) -> None:
    r1, r2 = (json.loads((r / "results.json").read_text()) for r in (one, two))
    for key in ("train_images", "holdout_images", "eval_images", "skipped"):
        assert r1["dataset"][key] == r2["dataset"][key], key
    c1, c2 = r1["probing"]["causal"], r2["probing"]["causal"]
    assert_close(c1["metrics"], c2["metrics"], metric_tol, "metrics")
    assert_close(c1["summary"], c2["summary"], metric_tol, "summary")
    for stage in c1["stages"]:
        p1 = load_file(one / f"probes/causal/{stage}.safetensors")
        p2 = load_file(two / f"probes/causal/{stage}.safetensors")
        for name, value in p1.items():
            finite = np.isfinite(value)
            assert (finite == np.isfinite(p2[name])).all(), (stage, name)
            np.testing.assert_allclose(
                p2[name][finite], value[finite], rtol=0, atol=probe_tol, err_msg=f"{stage} {name}"
            )
    a1, a2 = (np.load(r / "arrays/probing_causal.npz") for r in (one, two))
    for name in a1.files:
        np.testing.assert_array_equal(a1[name], a2[name], err_msg=name)


def miou_gaps(one: Path, two: Path) -> dict[str, float]:
    """{stage/level: |mIoU of one process - mIoU of two|} for patch and pixel level."""
    r1, r2 = (json.loads((r / "results.json").read_text()) for r in (one, two))
    m1, m2 = r1["probing"]["causal"]["metrics"], r2["probing"]["causal"]["metrics"]
    return {
        f"{stage}/{level}": abs(m1[stage][level]["miou"] - m2[stage][level]["miou"])
        for stage in m1
        for level in ("patch", "pixel")
        if level in m1[stage]
    }


def run_one_and_two(tmp_path: Path, *args: str) -> tuple[Path, Path]:
    two = tmp_path / "two"
    done = torchrun("probe", *COMMON, *args, "--batch-size", "2", "--out", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best:" in done.stdout and done.stdout.count("best:") == 1  # rank 0 prints alone
    one = tmp_path / "one"
    assert main(["probe", *COMMON, *args, "--batch-size", "4", "--out", str(one)]) == 0
    return one, two


@pytest.mark.parametrize(
    ("solver", "probe_tol"), [("lda", 1e-6), ("sgd", 1e-5)], ids=["lda", "sgd"]
)
def test_two_gloo_processes_equal_one_on_the_exact_path(tmp_path, solver, probe_tol):
    """probe.exact: float64 probe arithmetic, so two processes equal one to 1e-6."""
    one, two = run_one_and_two(tmp_path, "--solver", solver, "--exact")
    compare_runs(one, two, probe_tol, 1e-6)


@pytest.mark.parametrize("solver", ["lda", "sgd"])
def test_two_gloo_processes_match_one_within_1e4_miou(tmp_path, solver):
    """Default path (float32 GEMMs): the probes differ from one process at float32 round-off,
    which moves every stage's patch and pixel mIoU by less than 1e-4; the data split and the
    per-image scoring layout stay identical."""
    one, two = run_one_and_two(tmp_path, "--solver", solver)
    gaps = miou_gaps(one, two)
    assert gaps and max(gaps.values()) < 1e-4, gaps
    r1, r2 = (json.loads((r / "results.json").read_text()) for r in (one, two))
    for key in ("train_images", "holdout_images", "eval_images", "skipped"):
        assert r1["dataset"][key] == r2["dataset"][key], key


def _folder_dataset(root: Path, n: int, bad: int) -> None:
    """n images with 2-class masks; mask ``bad`` holds class 7 of 2 (out of range)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "images" / f"img{i:02d}.png"
        )
        mask = np.zeros((64, 64), np.uint8)
        mask[:, 32:] = 7 if i == bad else 1
        Image.fromarray(mask).save(root / "masks" / f"img{i:02d}.png")


def test_failure_on_one_rank_stops_both(tmp_path):
    data = tmp_path / "data"
    _folder_dataset(data, n=8, bad=1)  # lda: rank 1 takes images 1, 3, 5, 7
    out = tmp_path / "run"
    args = ["probe", "--model", "tiny-clip", "--dataset", "folder", "--data-root", str(data)]
    done = torchrun(*args, "--solver", "lda", "--batch-size", "2", "--out", str(out))
    assert done.returncode != 0
    assert "seglens probe: error (rank 1 of 2):" in done.stderr
    assert "img01.png" in done.stderr
    assert not (out / "results.json").exists()


def test_interleave_restores_strided_order():
    rows = np.arange(7)[:, None] * np.ones((1, 3), int)
    parts = [rows[r::3] for r in range(3)]
    np.testing.assert_array_equal(interleave(parts), rows)
    # A rank that skipped a sample: lengths no longer fit a strided shard, so concatenate.
    uneven = [rows[:1], rows[1:4], rows[4:5]]
    np.testing.assert_array_equal(interleave(uneven), rows[:5])


def test_full_run_under_torchrun_equals_one_process(tmp_path):
    """`torchrun -m seglens run`: probing and bidirectional (lda) equal one process to 1e-6, the
    knockout (images of each pair sharded over ranks, counts summed) selects the same pairs with
    the same token support, and UMAP (rank 0) gives the same sample."""
    import yaml

    def config(out: Path, batch: int) -> Path:
        data = {
            "out": str(out),
            "seed": 3,
            "model": {"name": "tiny-clip", "device": "cpu"},
            "data": {
                "dataset": "synthetic",
                "limit_train": 16,
                "limit_eval": 8,
                "batch_size": batch,
            },
            # probe.exact: the float64 path, so probing equals one process to 1e-6
            "probe": {"solver": "lda", "exact": True, "bootstrap": 0, "qualitative": 0},
            "knockout": {"top_k": 2, "min_support": 2},
            "umap": {"tokens": 100, "neighbors": 5},
            "lens": {"enabled": False},
        }
        path = out.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(data))
        return path

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", "--config", str(config(one, 4))]) == 0
    done = torchrun("run", "--config", str(config(two, 2)), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r1, r2 = (json.loads((r / "results.json").read_text()) for r in (one, two))
    for condition in ("causal", "bidirectional_image"):
        assert_close(
            r1["probing"][condition]["metrics"],
            r2["probing"][condition]["metrics"],
            1e-6,
            condition,
        )
    k1, k2 = r1["knockout"], r2["knockout"]
    assert [p["classes"] for p in k1["pairs"]] == [p["classes"] for p in k2["pairs"]]
    assert [p["support"] for p in k1["pairs"]] == [p["support"] for p in k2["pairs"]]
    assert_close(k1["curves"]["none"], k2["curves"]["none"], 1e-6, "knockout none")
    assert_close(k1["curves"], k2["curves"], 0.05, "knockout curves")
    u1, u2 = (np.load(r / "arrays/umap.npz") for r in (one, two))
    for name in u1.files:
        np.testing.assert_array_equal(u1[name], u2[name], err_msg=name)
    assert (two / "report.html").is_file()
