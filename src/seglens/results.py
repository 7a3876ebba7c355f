"""The run directory: atomic writes, provenance (versions, git hash) and ``results.json`` I/O.

Every file seglens writes goes through ``atomic_write``: a temporary file in the same folder,
then ``os.replace``, so a crash never leaves a half-written result, probe or figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
RESULTS = "results.json"
CONFIG = "config.yaml"
CHECKPOINT = "checkpoint"  # folder of a run's resumable state (seglens.checkpoint)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is this a seglens run directory?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); rerun or restore the run") from e


def save_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    """Atomically write numeric arrays as ``.npz`` (loaded later with ``allow_pickle=False``)."""
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **{k: np.asarray(v) for k, v in arrays.items()})


def save_tensors(path: str | Path, tensors: dict[str, Any]) -> None:
    """Atomically write torch tensors as safetensors (``safetensors.torch.save_file`` streams
    them to a temporary sibling, which is synced and renamed over ``path``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


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


def provenance(seed: int) -> dict[str, Any]:
    """Schema version, software versions, git hash, seed and time for ``results.json``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": versions(),
        "git_hash": git_hash(),
        "seed": seed,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def clean_condition(results: dict[str, Any]) -> str:
    """The probing condition of the unmodified model: named after its native image attention.

    ``"causal"`` for LLaVA-style models, ``"bidirectional_image"`` for models whose image tokens
    already attend to each other (Gemma3); the other condition is the intervention.
    """
    native = (results.get("model") or {}).get("native_image_attention", "causal")
    return "causal" if native == "causal" else "bidirectional_image"


#: Everything seglens writes inside a run directory (what ``--overwrite`` replaces).
RUN_OUTPUTS = (RESULTS, CONFIG, "report.html", CHECKPOINT, "probes", "arrays", "figures")


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run directory; refuse one that already holds a run (``results.json`` or a
    ``checkpoint/`` of an interrupted one) unless ``overwrite`` or ``resume`` is given."""
    path = Path(path)
    held = [name for name in (RESULTS, CHECKPOINT) if (path / name).exists()]
    if held and not (overwrite or resume):
        raise FileExistsError(
            f"{path} already holds a run ({held[0]} exists); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    if held and overwrite and not resume:
        # Replace the old run: drop what seglens wrote there (nothing else), so no stale probe,
        # figure or checkpoint of the old run survives into the new one.
        for name in RUN_OUTPUTS:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    # A killed write leaves its hidden temporary file (the target itself is intact): sweep them.
    for stale in path.rglob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return path
