"""File I/O of the run directory: atomic writes that respect the umask, JSON, arrays, tensors,
and the provenance every ``results.json`` carries (versions, git hash, seed, time).

Every file seglens writes goes through ``atomic_write`` (or ``save_tensors``): a temporary file in
the same folder, then ``os.replace``, so a crash never leaves a half-written result, probe or
figure. ``tempfile.mkstemp`` creates its file with mode 0600 whatever the umask; the file gets the
mode a plain ``open`` would have given it (``0o666 & ~umask``) before it is renamed, so colleagues
on a shared machine can read a run as they read any other file of its owner.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write", "file_mode", "git_hash", "load_arrays", "provenance", "read_json"]
__all__ += ["save_arrays", "save_tensors", "versions", "write_json"]


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file under the umask: ``0o666 & ~umask``."""
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _temporary_sibling(path: Path) -> Iterator[tuple[int, str]]:
    """(fd, name) of a new hidden file next to ``path``, renamed over ``path`` on success and
    removed on failure (the file descriptor is the caller's to close)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        yield fd, tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    with _temporary_sibling(Path(path)) as (fd, _), os.fdopen(fd, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        return None if value != value or value in (float("inf"), float("-inf")) else value
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write JSON (NaN and inf become null; numpy types become Python)."""
    with atomic_write(path) as handle:
        json.dump(_jsonable(data), handle, indent=2, allow_nan=False)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, naming it when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is this a seglens run directory?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fix = "rerun or restore the run"
        if path.name == "results.json" and (path.parent / "sections" / "_header.json").is_file():
            fix = (
                "rebuild it from the run's record of every section written (sections/) with "
                f"`seglens report --run {path.parent} --rebuild`"
            )
        elif path.name == "results.json":
            fix = (
                "it cannot be rebuilt: the run has no sections/ record (an older seglens), and "
                "the training counts, skipped samples and convergence records exist only in "
                "results.json. Restore it from a backup, or "
                f"run the command that made it again with `--config {path.parent / 'config.yaml'}"
                " --overwrite` (the damaged run stays until the new one is complete)"
            )
        raise ValueError(f"{path} is not valid JSON ({e}): damaged; {fix}") from e


def save_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    """Atomically write numeric arrays as ``.npz`` (loaded later with ``allow_pickle=False``)."""
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **{k: np.asarray(v) for k, v in arrays.items()})


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, read without pickle.

    Raises:
        ValueError: the file is truncated or damaged (named, with the fix), or holds objects
            (refused: reading them would unpickle).
    """
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise
        error: Exception = e
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
        error = e
    raise ValueError(
        f"{path} cannot be read ({type(error).__name__}: {error}): truncated or damaged; rerun "
        "the analysis that wrote it (its command with --overwrite, or --resume for a run that "
        "did not finish), or restore the file"
    ) from error


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> None:
    """Atomically write torch tensors as safetensors (``safetensors.torch.save_file`` streams
    them to a temporary sibling, which is synced and renamed over ``path``)."""
    from safetensors.torch import save_file

    with _temporary_sibling(Path(path)) as (fd, tmp):
        os.close(fd)
        save_file(tensors, tmp)  # replaces the file: its mode is mkstemp's 0600 again
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())


def git_hash() -> str | None:
    """The commit of the seglens source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    """Versions of seglens, Python and the libraries that shape the numbers."""
    import sklearn
    import torch
    import transformers

    import seglens

    return {
        "seglens": seglens.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def provenance(seed: int, schema_version: int) -> dict[str, Any]:
    """Schema version, software versions, git hash, seed and time for ``results.json``."""
    return {
        "schema_version": schema_version,
        "versions": versions(),
        "git_hash": git_hash(),
        "seed": seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
