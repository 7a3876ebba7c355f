"""One process per run directory: an advisory lock held from before the model loads to the end.

The lock is ``fcntl.flock`` on a hidden sibling file ``.<run>.lock`` (beside the run, so that a
refused command leaves the run directory untouched and the lock survives ``--overwrite``
replacing the directory). The file names the holder (PID, host, start time); a second process
is refused with those. The kernel drops a flock when its holder dies, so a lock left by a killed
run is taken over with a log line; one still held by processes the dead holder forked (loader
workers) is broken when the recorded PID is dead on this host. Locks are re-entrant within a
process and released at exit (``release_all``); under torchrun only rank 0 takes one.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["RunInUseError", "acquire", "lock_file", "release", "release_all"]

log = logging.getLogger(__name__)

_HELD: dict[Path, int] = {}  # run directory -> file descriptor of its locked lock file


class RunInUseError(RuntimeError):
    """Another live process holds the run directory's lock."""


def lock_file(run: str | Path) -> Path:
    """The lock file of run directory ``run``: ``<parent>/.<name>.lock``."""
    run = _key(run)
    return run.parent / f".{run.name}.lock"


def _key(run: str | Path) -> Path:
    return Path(os.path.abspath(Path(run).expanduser()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def _describe(holder: dict) -> str:
    return (
        f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"(since {holder.get('since', '?')}, {holder.get('command', '?')})"
    )


def acquire(run: str | Path, command: str = "seglens") -> Path:
    """Lock run directory ``run`` for this process (a no-op when it already holds it).

    Returns:
        The lock file.

    Raises:
        RunInUseError: another live process holds it; the message names its PID and host.
    """
    run = _key(run)
    path = lock_file(run)
    if run in _HELD:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            pid = holder.get("pid")
            if holder.get("host") == host and isinstance(pid, int) and not _alive(pid):
                # The holder died; processes it forked (data loader workers) still hold the
                # flock. Break it: a new lock file, which they never locked.
                log.warning(
                    "%s: taking over the lock of %s: that process is no longer running",
                    run,
                    _describe(holder),
                )
                path.unlink(missing_ok=True)
                continue
            raise RunInUseError(
                f"{run} is in use by {_describe(holder)}: one process per run directory. Wait "
                f"for it to finish, stop it, or choose another --out (lock file: {path})"
            ) from None
        if not _same_file(fd, path):  # unlinked by its releasing holder meanwhile: try again
            os.close(fd)
            continue
        holder = _holder(fd)
        if holder.get("pid") not in (None, os.getpid()):
            log.warning(
                "%s: taking over the stale lock of %s, which ended without releasing it",
                run,
                _describe(holder),
            )
        mine = {"pid": os.getpid(), "host": host, "command": command}
        mine["since"] = datetime.now(UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        if not _HELD:
            atexit.register(release_all)
        _HELD[run] = fd
        return path
    raise RunInUseError(f"{run}: could not take its lock {path}; try again")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def release(run: str | Path) -> None:
    """Release this process's lock of ``run`` (the lock file is removed)."""
    run = _key(run)
    fd = _HELD.pop(run, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if _same_file(fd, lock_file(run)):
            lock_file(run).unlink()
    os.close(fd)


def release_all() -> None:
    """Release every lock this process holds (at exit, and at the end of a CLI command)."""
    for run in list(_HELD):
        release(run)


def held(run: str | Path) -> bool:
    """Whether this process holds the lock of ``run``."""
    return _key(run) in _HELD
