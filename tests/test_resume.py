"""Checkpoint and resume: a killed run, resumed, ends with exactly the results of an uninterrupted
one (results.json, probe files and arrays, bit for bit), whether it was SIGKILLed in a subprocess
or crashed in-process at any phase; a resume with a config that changes the results is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from seglens.analyses.probing.measure import run_probing
from seglens.checkpoint import Checkpointer, config_differences
from seglens.cli import main
from seglens.config import load_config
from seglens.results import load_arrays

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny-clip", "--dataset", "synthetic", "--warmup-batches", "1"]
ARGS += ["--batch-size", "2", "--bootstrap", "50", "--qualitative", "2"]


# --- comparing two runs --------------------------------------------------------------------------
def assert_same_run(a: Path, b: Path) -> None:
    """Everything a run measured is identical: results.json (but its time, commit and the run
    options: other commits may land between two runs), every probe file byte for byte, every
    saved array exactly."""
    ra, rb = (json.loads((run / "results.json").read_text()) for run in (a, b))
    for r in (ra, rb):
        for key in ("created", "git_hash", "config"):
            r.pop(key)
    assert ra == rb
    probes = sorted(p.relative_to(a) for p in (a / "probes").rglob("*") if p.is_file())
    assert probes == sorted(p.relative_to(b) for p in (b / "probes").rglob("*") if p.is_file())
    assert len(probes) > 3
    for rel in probes:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for npz in ("arrays/probing_causal.npz", "arrays/qualitative.npz"):
        xa, xb = load_arrays(a / npz), load_arrays(b / npz)
        assert sorted(xa) == sorted(xb)
        for key in xa:
            np.testing.assert_array_equal(xa[key], xb[key], err_msg=key)


# --- SIGKILL in a subprocess ---------------------------------------------------------------------
def _env() -> dict[str, str]:
    # One thread everywhere: the three runs then sum in the same order (exact comparison).
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(out: Path, extra: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "seglens", "probe", *ARGS, *extra, "--out", str(out)]
    return subprocess.Popen(cmd, env=_env(), stdout=log.open("w"), stderr=subprocess.STDOUT)


def _checkpoint(out: Path) -> dict | None:
    try:
        return json.loads((out / "checkpoint" / "rank0.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _kill_mid(proc: subprocess.Popen, out: Path, phase: str, timeout: float = 60.0) -> dict:
    """SIGKILL ``proc`` once its checkpoint shows progress inside ``phase``; the checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        state = _checkpoint(out)
        current = (state or {}).get("current") or {}
        if current.get("phase") == phase and current.get("consumed", 0) > 0:
            proc.send_signal(signal.SIGSTOP)  # freeze it, then read where it stands
            state = _checkpoint(out)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return state
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"the run ended or stalled before reaching {phase} (rc {proc.poll()})")


@pytest.mark.parametrize(
    ("solver", "phase"),
    [(["--solver", "sgd", "--epochs", "2"], "train.epoch1"), (["--solver", "lda"], "train.lda")],
    ids=["sgd", "lda"],
)
def test_sigkilled_run_resumes_to_the_uninterrupted_results(tmp_path, solver, phase):
    extra = [*solver, "--limit", "24", "--limit-eval", "6", "--checkpoint-every", "1"]
    reference = _start(tmp_path / "reference", extra, tmp_path / "reference.log")
    killed = _start(tmp_path / "run", extra, tmp_path / "killed.log")
    state = _kill_mid(killed, tmp_path / "run", phase)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "results.json").exists() and not state["complete"]
    if phase == "train.epoch1":
        assert {"train.warmup", "train.epoch0"} <= set(state["done"])

    resumed = _start(tmp_path / "run", [*extra, "--resume"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=120) == 0, (tmp_path / "resumed.log").read_text()
    assert reference.wait(timeout=120) == 0, (tmp_path / "reference.log").read_text()
    log = (tmp_path / "resumed.log").read_text()
    assert f"{state['current']['phase']} at image {state['current']['consumed']}" in log
    assert_same_run(tmp_path / "reference", tmp_path / "run")
    assert _checkpoint(tmp_path / "run")["complete"]
    assert not list((tmp_path / "run" / "checkpoint").glob("*.safetensors"))


# --- crashes in-process at every phase -----------------------------------------------------------
class Crash(BaseException):
    """Stands in for a kill: nothing in seglens catches a BaseException that is not an Exception."""


def _crash_after(vlm, calls: int):
    """Patch ``vlm.capture`` to raise ``Crash`` on forward pass ``calls + 1``."""
    real, count = vlm.capture, [0]

    def capture(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Crash
        return real(*args, **kwargs)

    return mock.patch.object(vlm, "capture", capture)


def _config(out: Path, *args: str, **overrides):
    from seglens.cli import build_parser, resolve_config

    argv = ["probe", *ARGS, "--limit", "12", "--limit-eval", "6", "--out", str(out), *args]
    return resolve_config(build_parser().parse_args(argv)).replace(**overrides)


@pytest.fixture(scope="module")
def small_vlm():
    """A 112 px tiny LLaVA (8 x 8 tokens): the in-process runs stay quick."""
    from seglens.models import tiny_llava

    return tiny_llava("clip", image_size=112)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, small_vlm):
    runs = {}
    for solver in ("sgd", "lda"):
        out = tmp_path_factory.mktemp("reference") / solver
        run_probing(
            _config(out, "--solver", solver, "--epochs", "2"), vlm=small_vlm, progress=False
        )
        runs[solver] = out
    return runs


# 11 training images + 1 holdout in batches of 2: forward passes 1 warm-up, 2-7 epoch 1,
# 8-13 epoch 2, 14 holdout, 15-17 evaluation. LDA: 1-6 training, 7-9 evaluation.
@pytest.mark.parametrize(
    ("solver", "crash_after", "every"),
    [
        ("sgd", 1, 1),  # right after the warm-up
        ("sgd", 10, 3),  # inside epoch 2, the last checkpoint a few batches back
        ("sgd", 14, 50),  # after the holdout: only phase-end checkpoints
        ("sgd", 16, 1),  # inside evaluation
        ("lda", 3, 2),  # inside the LDA pass
        ("lda", 8, 1),  # inside evaluation
    ],
)
def test_crash_anywhere_then_resume_equals_uninterrupted(
    tmp_path, small_vlm, reference_runs, solver, crash_after, every
):
    vlm, out = small_vlm, tmp_path / "run"
    config = _config(out, "--solver", solver, "--epochs", "2", checkpoint_every=every)
    with _crash_after(vlm, crash_after), pytest.raises(Crash):
        run_probing(config, vlm=vlm, progress=False)
    assert not (out / "results.json").exists()
    run_probing(config.replace(resume=True), vlm=vlm, progress=False)
    assert_same_run(reference_runs[solver], out)


def test_crash_while_writing_then_resume(tmp_path, small_vlm, reference_runs):
    vlm, out = small_vlm, tmp_path / "run"
    config = _config(out, "--solver", "sgd", "--epochs", "2")
    target = "seglens.rundir.run.put_section"  # the write of the probing section
    with mock.patch(target, side_effect=Crash), pytest.raises(Crash):
        run_probing(config, vlm=vlm, progress=False)
    with _crash_after(vlm, 0):  # everything up to the writing is restored, nothing recomputed
        run_probing(config.replace(resume=True), vlm=vlm, progress=False)
    assert_same_run(reference_runs["sgd"], out)


def test_resuming_a_complete_run_is_a_no_op(tmp_path, small_vlm, reference_runs):
    vlm, out = small_vlm, tmp_path / "run"
    config = _config(out, "--solver", "lda")
    run_probing(config, vlm=vlm, progress=False)
    before = (out / "results.json").read_text()
    with _crash_after(vlm, 0):
        results = run_probing(config.replace(resume=True), vlm=vlm, progress=False)
    assert (out / "results.json").read_text() == before
    assert results.solver == "lda" and results == json.loads(before)["probing"]["causal"]


# --- refusals ------------------------------------------------------------------------------------
def test_resume_with_a_config_that_changes_results_is_refused(tmp_path, small_vlm, capsys):
    vlm, out = small_vlm, tmp_path / "run"
    config = _config(out, "--solver", "sgd")
    with _crash_after(vlm, 3), pytest.raises(Crash):
        run_probing(config, vlm=vlm, progress=False)
    changed = config.replace(**{"resume": True, "probe.epochs": 3, "data.batch_size": 4})
    epochs = load_config(None).probe.epochs
    message = rf"another config \(data\.batch_size: 2 -> 4; probe\.epochs: {epochs} -> 3\)"
    with pytest.raises(ValueError, match=message):
        run_probing(changed, vlm=vlm, progress=False)
    # Options that do not change the results may differ.
    fine = config.replace(**{"resume": True, "data.num_workers": 1, "checkpoint_every": 7})
    run_probing(fine, vlm=vlm, progress=False)
    assert (out / "results.json").is_file()


def test_an_interrupted_run_is_refused_without_resume_or_overwrite(tmp_path, small_vlm, capsys):
    vlm, out = small_vlm, tmp_path / "run"
    with _crash_after(vlm, 2), pytest.raises(Crash):
        run_probing(_config(out, "--solver", "lda", checkpoint_every=1), vlm=vlm, progress=False)
    assert main(["probe", *ARGS, "--limit", "12", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoint exists); pass --resume to continue it" in err
    with pytest.raises(ValueError, match="resume=True and overwrite=True contradict"):
        load_config(None, resume=True, overwrite=True)
    with pytest.raises(ValueError, match="checkpoint_every=-1 must be >= 0"):
        load_config(None, checkpoint_every=-1)


def test_a_start_that_failed_before_its_first_checkpoint_does_not_block_a_rerun(tmp_path, capsys):
    """A bad mask stops the run at once; once the mask is fixed, the very same command runs."""
    from PIL import Image

    from test_bad_input import RUN, _folder

    root = _folder(tmp_path / "data")
    mask = root / "masks" / "img2.png"
    good = mask.read_bytes()
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    argv = ["probe", *RUN, "--data-root", str(root), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "img2.png: mask is 12x10" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()
    mask.write_bytes(good)
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "results.json").is_file()


def test_one_training_image_cannot_hold_a_holdout_out():
    from seglens.data import SyntheticDataset
    from seglens.experiments.streaming import split_holdout

    one = SyntheticDataset(num_images=1, num_classes=3, split="train")
    with pytest.raises(ValueError, match=r"needs at least two training images .* got 1"):
        split_holdout(one, 0.5, seed=0)
    assert split_holdout(one, 0.0, seed=0) == (one, None)


def test_run_files_respect_the_umask(tmp_path, small_vlm):
    """Under umask 022 every file of a run is 0644 and every folder 0755 (temp + rename used to
    leave 0600 files nobody else could read)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        run_probing(
            _config(out, "--solver", "lda", checkpoint_every=1), vlm=small_vlm, progress=False
        )
        from seglens.report import write_report

        write_report(out)
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"results.json", "config.yaml", "report.html", "rank0.json"} <= {p.name for p in files}
    assert any(p.suffix == ".safetensors" for p in files) and any(p.suffix == ".png" for p in files)
    modes = {p.relative_to(out).as_posix(): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o644"}, modes
    folders = {oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_dir()}
    assert folders == {"0o755"}


def test_resume_without_a_checkpoint_starts_from_the_beginning(
    tmp_path, small_vlm, reference_runs, caplog
):
    out = tmp_path / "run"
    config = _config(out, "--solver", "lda", "--epochs", "2", resume=True)
    run_probing(config, vlm=small_vlm, progress=False)
    assert "no checkpoint in" in caplog.text
    assert_same_run(reference_runs["lda"], out)


def test_checkpoint_round_trips_nested_state_and_names_differences(tmp_path):
    import torch

    state = {
        "t": torch.arange(6, dtype=torch.float64).view(2, 3),
        "empty": np.zeros((0, 4), np.int64),
        "nested": {"n": 3, "names": ["a", "b"], "u8": torch.tensor([1, 2], dtype=torch.uint8)},
    }
    ckpt = Checkpointer(tmp_path, every=1, fingerprint={"a": {"b": 1}})
    ckpt.register("x", lambda: state, lambda s: None)
    ckpt.step("p", 2, 2)
    got = {}
    again = Checkpointer(tmp_path, resume=True, fingerprint={"a": {"b": 1}})
    again.register("x", lambda: state, got.update)
    assert again.position("p") == (2, 2) and not again.done("p")
    assert torch.equal(got["t"], state["t"]) and got["t"].dtype == torch.float64
    assert got["empty"].shape == (0, 4) and isinstance(got["empty"], np.ndarray)
    assert got["nested"]["names"] == ["a", "b"] and torch.equal(
        got["nested"]["u8"], state["nested"]["u8"]
    )
    assert config_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2}) == ["a.b: 1 -> 2"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
