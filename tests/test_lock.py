"""One process per run directory (issue 19, item 4): a second process is refused with the
holder's PID and host, a refusal changes nothing, and a lock left by a dead process is taken
over with a log line."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from seglens.rundir import lock

SRC = Path(__file__).resolve().parents[1] / "src"

# Holds the lock of argv[1]; with "fork", a child keeps the flock and the holder exits.
_HOLDER = """
import os, sys, time
from seglens.rundir import lock
lock.acquire(sys.argv[1], "test holder")
if sys.argv[2] == "fork":
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
    print("ready", child, flush=True)
    os._exit(0)
print("ready", os.getpid(), flush=True)
time.sleep(60)
"""


def hold(run: Path, mode: str = "stay") -> tuple[subprocess.Popen, int]:
    """A process holding the lock of ``run``, and the PID of the process that keeps it."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run), mode], stdout=subprocess.PIPE, text=True, env=env
    )
    word, pid = proc.stdout.readline().split()
    assert word == "ready"
    return proc, int(pid)


def tree(path: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def run(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "results.json").write_text("{}")
    yield path
    lock.release(path)


def test_a_second_process_is_refused_with_the_holders_pid_and_host(run, caplog):
    holder, _ = hold(run)
    try:
        before = tree(run)
        with pytest.raises(lock.RunInUseError) as error:
            lock.acquire(run)
        message = str(error.value)
        assert f"is in use by PID {holder.pid} on host {socket.gethostname()}" in message
        assert "test holder" in message and "choose another --out" in message
        assert tree(run) == before and not lock.held(run)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's flock: taken over, with a log line naming it.
    with caplog.at_level(logging.WARNING, logger="seglens.rundir.lock"):
        lock.acquire(run)
    assert lock.held(run)
    assert f"taking over the stale lock of PID {holder.pid}" in caplog.text
    recorded = json.loads(lock.lock_file(run).read_text())
    assert recorded["pid"] == os.getpid() and recorded["host"] == socket.gethostname()
    lock.release(run)
    assert not lock.lock_file(run).exists()


def test_a_lock_kept_by_the_dead_holders_child_is_broken(run, caplog):
    """A killed run's data loader workers may outlive it and keep its flock: the recorded
    holder is dead on this host, so the lock is taken over."""
    holder, child = hold(run, "fork")
    holder.wait()
    try:
        with caplog.at_level(logging.WARNING, logger="seglens.rundir.lock"):
            lock.acquire(run)
        assert lock.held(run)
        assert f"taking over the lock of PID {holder.pid}" in caplog.text
        assert "no longer running" in caplog.text
    finally:
        lock.release(run)
        os.kill(child, signal.SIGKILL)  # the forked child still holds the old lock file


def test_the_lock_is_reentrant_within_a_process(run):
    first = lock.acquire(run)
    assert lock.acquire(run) == first == run.parent / ".run.lock"
    lock.release(run)
    assert not first.exists() and not lock.held(run)


def test_a_locked_run_refuses_a_second_command_at_the_cli(tmp_path, capsys, monkeypatch):
    """Two `seglens probe --out RUN`: the later one stops before loading the model, with one
    line naming the holder, and leaves the run directory as it was."""
    from seglens.cli import main
    from seglens.experiments import common

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(common, "build_model", no_model)
    out = tmp_path / "run"
    holder, _ = hold(out)
    try:
        argv = ["probe", "--model", "tiny-clip", "--limit", "4", "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"seglens probe: error: {out} is in use by PID {holder.pid}" in err
        assert not out.exists()  # nothing was created, let alone a model loaded
    finally:
        holder.kill()
        holder.wait()
