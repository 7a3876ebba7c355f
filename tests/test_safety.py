"""Atomic outputs and safe loading: an interrupted write (an exception or a SIGKILL) leaves the
previous file whole; no module unpickles or evaluates anything; weights load only from
safetensors; ``trust_remote_code`` stays off unless asked and is logged when on."""

from __future__ import annotations

import ast
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from seglens.probes import ProbeBank
from seglens.results import (
    atomic_write,
    load_arrays,
    prepare_run_dir,
    save_arrays,
    save_tensors,
    write_json,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "seglens"


class Crash(BaseException):
    """An interruption in the middle of a write."""


# --- atomic writes -------------------------------------------------------------------------------
def _bank(value: float) -> ProbeBank:
    bank = ProbeBank(["adapter"], 3, solver="lda")
    x = torch.full((2, 8, 4), value) + torch.arange(4.0)
    x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    bank.partial_fit({"adapter": x}, torch.arange(16).remainder(3).view(2, 8))
    return bank.select()


def _figure(path: Path, value: float) -> None:
    from seglens.report.canvas import new_figure, save_figure

    fig = new_figure(1, 1)
    fig.add_subplot().plot([0, value])
    save_figure(fig, path)


WRITERS = {
    "results.json": lambda path, v: write_json(path, {"value": v}),
    "arrays.npz": lambda path, v: save_arrays(path, x=np.full(3, v)),
    "state.safetensors": lambda path, v: save_tensors(path, {"x": torch.full((3,), v)}),
    "probes": lambda path, v: _bank(v).save(path),
    "figure.png": _figure,
}


def _snapshot(path: Path) -> dict[str, bytes]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


@pytest.mark.parametrize("name", list(WRITERS))
def test_an_interrupted_write_leaves_the_previous_file_and_no_temp(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path, 1.0)
    before = _snapshot(path)
    with mock.patch("os.fsync", side_effect=Crash), pytest.raises(Crash):
        WRITERS[name](path, 2.0)  # dies after the data went to the temp file, before the rename
    assert _snapshot(path) == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    WRITERS[name](path, 3.0)
    assert _snapshot(path) != before


def test_an_exception_inside_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"value": 1})

    def write_half() -> None:
        with atomic_write(path) as handle:
            handle.write('{"value": 2, "half')
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError, match="crash mid-write"):
        write_half()
    assert json.loads(path.read_text()) == {"value": 1}
    assert os.listdir(tmp_path) == ["results.json"]


_WRITER = """
import sys, time
from seglens.results import atomic_write
with atomic_write(sys.argv[1]) as handle:
    handle.write('{"value": 2, "half')
    handle.flush()
    open(sys.argv[2], "w").close()
    time.sleep(60)
"""


def test_a_sigkilled_write_leaves_the_old_file_and_the_next_run_sweeps_its_temp(tmp_path):
    path, ready = tmp_path / "results.json", tmp_path / "ready"
    write_json(path, {"value": 1})
    env = dict(os.environ, PYTHONPATH=str(SRC.parent))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(ready)], env=env)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert ready.exists(), "the writer never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(path.read_text()) == {"value": 1}
    assert len(list(tmp_path.glob(".results.json.*.tmp"))) == 1  # SIGKILL runs no cleanup
    prepare_run_dir(tmp_path, resume=True)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_arrays_load_without_pickle(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with open(tmp_path / "objects.npz", "wb") as handle:
        np.savez(handle, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_arrays(tmp_path / "objects.npz")["x"]


# --- nothing in the source unpickles or evaluates ------------------------------------------------
_BANNED_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "shelve",
    "marshal",
    "joblib",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def _violations(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(SRC.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            bad = [n for n in names if n.split(".")[0] in _BANNED_MODULES]
            found += [f"{where}: imports {n}" for n in bad]
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in ("eval", "exec", "compile", "__import__"):
            found.append(f"{where}: calls {name}()")
        if name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append(f"{where}: {name} (use yaml.safe_load)")
        if name.split(".")[-1] in ("load", "save") and _keyword(node, "allow_pickle") is True:
            found.append(f"{where}: allow_pickle=True")
        if _keyword(node, "trust_remote_code") is True:
            found.append(f"{where}: trust_remote_code=True hard-coded")
        if _keyword(node, "use_safetensors") is False:
            found.append(f"{where}: use_safetensors=False")
    return found


def test_the_source_never_unpickles_or_evaluates():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [v for path in files for v in _violations(path)]
    assert not found, "\n".join(found)


def test_the_checker_catches_what_it_looks_for(tmp_path):
    bad = SRC / "_safety_probe_tmp.py"
    code = "import pickle\nimport torch, yaml\ntorch.load('x')\nyaml.load(s)\neval('1')\n"
    code += "np.load(p, allow_pickle=True)\nf(trust_remote_code=True)\nm.eval()\n"
    bad.write_text(code)
    try:
        found = _violations(bad)
    finally:
        bad.unlink()
    assert len(found) == 6, found  # ``m.eval()`` (a module's eval mode) is fine


# --- model loading -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tiny_models):
    folder = tmp_path_factory.mktemp("tiny")
    vlm = tiny_models("clip", "sdpa")
    vlm.model.save_pretrained(folder)
    vlm.processor.save_pretrained(folder)
    return folder


def test_trust_remote_code_is_off_by_default_and_logged_when_on(saved_tiny, caplog):
    from seglens.models import load_model

    with caplog.at_level(logging.WARNING, logger="seglens.models.loading"):
        load_model(str(saved_tiny), dtype="float32")
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="seglens.models.loading"):
        load_model(str(saved_tiny), dtype="float32", trust_remote_code=True)
    assert f"trust_remote_code=True: code shipped with {saved_tiny} will run" in caplog.text


def test_pickled_weights_are_refused(saved_tiny, tmp_path):
    from safetensors.torch import load_file

    from seglens.models import load_model

    folder = tmp_path / "pickled"
    folder.mkdir()
    for path in saved_tiny.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            (folder / path.name).write_bytes(path.read_bytes())
    weights = {}
    for shard in saved_tiny.glob("*.safetensors"):
        weights |= load_file(shard)
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="reads weights only from safetensors files"):
        load_model(str(folder), dtype="float32")


def test_overwrite_replaces_only_what_seglens_wrote(tmp_path):
    """--overwrite builds the new run beside the old one; once complete it replaces the old
    run's outputs (no stale probe or figure survives) and keeps files seglens did not write."""
    from seglens.results import RUN_OUTPUTS, prepare_run_dir
    from seglens.rundir.run import commit_overwrite

    run = tmp_path / "run"
    (run / "probes" / "causal").mkdir(parents=True)
    (run / "probes" / "causal" / "llm.9.safetensors").write_bytes(b"old")
    (run / "figures").mkdir()
    (run / "figures" / "old.png").write_bytes(b"old")
    (run / "results.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds a run"):
        prepare_run_dir(run)
    build = prepare_run_dir(run, overwrite=True)
    assert build == tmp_path / ".run.overwrite" and (run / "figures" / "old.png").exists()
    (build / "results.json").write_text('{"new": 1}')
    assert commit_overwrite(build) == run.absolute()
    assert not any((run / name).exists() for name in RUN_OUTPUTS if name != "results.json")
    assert (run / "results.json").read_text() == '{"new": 1}'
    assert (run / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _tree(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def test_an_overwrite_that_fails_leaves_the_old_run_intact_and_one_that_succeeds_replaces_it(
    tmp_path, tiny_vlm
):
    """--overwrite builds the new run in a hidden sibling: a new run that fails (here: a stage
    that does not exist, after the model is loaded) leaves the old run byte-identical; the next
    one that succeeds replaces it, keeping the user's own files."""
    from seglens.analyses.probing.measure import run_probing
    from seglens.config import load_config
    from seglens.rundir import lock

    run = tmp_path / "run"
    (run / "probes" / "causal").mkdir(parents=True)
    (run / "probes" / "causal" / "llm.9.safetensors").write_bytes(b"old probe")
    (run / "results.json").write_text('{"old": true}')
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    options = {
        "model.name": "tiny-clip",
        "data.limit_train": 8,
        "data.limit_eval": 4,
        "probe.solver": "lda",
        "probe.bootstrap": 0,
        "probe.pixel_level": False,
        "out": str(run),
        "overwrite": True,
    }
    failing = load_config(**options, **{"probe.stages": ["llm.99"]})
    with pytest.raises(ValueError, match=r"unknown stage 'llm\.99'"):
        run_probing(failing, vlm=tiny_vlm, progress=False)
    assert _tree(run) == before
    run_probing(load_config(**options), vlm=tiny_vlm, progress=False)
    results = json.loads((run / "results.json").read_text())
    assert "probing" in results and results["config"]["out"] == str(run)
    assert not (run / "probes" / "causal" / "llm.9.safetensors").exists()
    assert (run / "notes.txt").read_text() == "mine"
    lock.release(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no sibling left behind


def test_an_overwrite_killed_between_its_renames_restores_the_old_run(tmp_path):
    from seglens.results import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"old": true}')
    before = _tree(run)
    os.rename(run, tmp_path / ".run.replaced")  # the first rename happened, not the second
    assert prepare_run_dir(run, resume=True) == run
    assert _tree(run) == before and not (tmp_path / ".run.replaced").exists()


@pytest.mark.slow
def test_an_overwritten_seglens_run_writes_its_later_analyses_into_the_final_folder(tmp_path):
    """`seglens run --overwrite`: probing completes in the hidden build, which then replaces the
    old run; the analyses after it (here bidirectional) and the report land in the final
    folder, through the same RunDir."""
    from seglens.config import load_config
    from seglens.experiments.pipeline import run as run_all
    from seglens.rundir import lock

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    (out / "notes.txt").write_text("mine")
    options = {
        "model.name": "tiny-clip",
        "data.limit_train": 8,
        "data.limit_eval": 4,
        "probe.solver": "lda",
        "probe.bootstrap": 0,
        "probe.pixel_level": False,
        "probe.qualitative": 1,
        "knockout.enabled": False,
        "umap.enabled": False,
        "out": str(out),
        "overwrite": True,
    }
    report = run_all(load_config(**options), progress=False)
    results = json.loads((out / "results.json").read_text())
    assert set(results["probing"]) == {"causal", "bidirectional_image"}
    assert (out / "probes" / "bidirectional_image").is_dir() and report == out / "report.html"
    assert report.is_file() and (out / "notes.txt").read_text() == "mine"
    lock.release(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_every_rundir_of_a_committed_overwrite_points_at_the_final_folder(tmp_path):
    """The fast form of the test above: once the checkpoint completes, the build replaces the
    old run and every RunDir made for the build (``RunDir.of`` copies too) writes into the
    final folder."""
    from seglens.checkpoint import Checkpointer
    from seglens.config import load_config
    from seglens.rundir import RunDir, lock

    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text('{"old": true}')
    config = load_config(**{"model.name": "tiny-clip", "out": str(out), "overwrite": True})
    run = RunDir.create(config)
    copy = RunDir.of(run, **{"knockout.top_k": 3})
    assert run.path == copy.path == tmp_path / ".run.overwrite"
    assert json.loads((out / "results.json").read_text()) == {"old": True}
    run.begin(probing={})
    Checkpointer(run.file("checkpoint")).complete()
    assert run.path == copy.path == out.absolute() and not (tmp_path / ".run.overwrite").exists()
    copy.put_section("later", {"x": 1})
    assert json.loads((out / "results.json").read_text())["later"] == {"x": 1}
    assert (out / "identity.json").is_file() and (out / "config.yaml").is_file()
    lock.release(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
