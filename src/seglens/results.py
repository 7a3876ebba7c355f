"""The run directory: atomic writes, provenance (versions, git hash) and ``results.json`` I/O.

Every file seglens writes goes through ``atomic_write``: a temporary file in the same folder,
then ``os.replace``, so a crash never leaves a half-written result, probe or figure.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from seglens.rundir.files import (  # noqa: F401  (the names this module has always exported)
    atomic_write,
    git_hash,
    load_arrays,
    read_json,
    save_arrays,
    save_tensors,
    versions,
    write_json,
)
from seglens.rundir.files import provenance as _provenance

SCHEMA_VERSION = 1
RESULTS = "results.json"
CONFIG = "config.yaml"
CHECKPOINT = "checkpoint"  # folder of a run's resumable state (seglens.checkpoint)


def provenance(seed: int) -> dict[str, Any]:
    """Schema version, software versions, git hash, seed and time for ``results.json``."""
    return _provenance(seed, SCHEMA_VERSION)


def clean_condition(results: dict[str, Any]) -> str:
    """The probing condition of the unmodified model: named after its native image attention.

    ``"causal"`` for LLaVA-style models, ``"bidirectional_image"`` for models whose image tokens
    already attend to each other (Gemma3); the other condition is the intervention.
    """
    native = (results.get("model") or {}).get("native_image_attention", "causal")
    return "causal" if native == "causal" else "bidirectional_image"


#: Everything seglens writes inside a run directory (what ``--overwrite`` replaces).
RUN_OUTPUTS = (RESULTS, CONFIG, "report.html", CHECKPOINT, "probes", "arrays", "figures")


def _holds(path: Path) -> bool:
    """Whether ``path`` is part of a run: ``results.json``, or a ``checkpoint/`` that holds a
    checkpoint (a start that failed before its first checkpoint leaves none, and must not block
    running the same command again)."""
    if path.name == CHECKPOINT:
        return path.is_dir() and any(path.glob("rank*.json"))
    return path.exists()


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Create the run directory; refuse one that already holds a run (``results.json`` or a
    ``checkpoint/`` of an interrupted one) unless ``overwrite`` or ``resume`` is given."""
    path = Path(path)
    held = [name for name in (RESULTS, CHECKPOINT) if _holds(path / name)]
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
