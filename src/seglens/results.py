"""The run-directory helpers under their first import path; they live in ``seglens.rundir``.

``seglens.rundir.files`` writes files (atomically, respecting the umask), ``seglens.rundir.schema``
holds the schema of ``results.json`` and ``seglens.rundir.run`` the ``RunDir``.
"""

from __future__ import annotations

from typing import Any

from seglens.rundir.files import (
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
from seglens.rundir.run import CHECKPOINT, CONFIG, RESULTS, RUN_OUTPUTS
from seglens.rundir.run import prepare as prepare_run_dir
from seglens.rundir.schema import SCHEMA_VERSION, clean_condition

__all__ = ["CHECKPOINT", "CONFIG", "RESULTS", "RUN_OUTPUTS", "SCHEMA_VERSION", "atomic_write"]
__all__ += ["clean_condition", "git_hash", "load_arrays", "prepare_run_dir", "provenance"]
__all__ += ["read_json", "save_arrays", "save_tensors", "versions", "write_json"]


def provenance(seed: int) -> dict[str, Any]:
    """Schema version, software versions, git hash, seed and time for ``results.json``."""
    return _provenance(seed, SCHEMA_VERSION)
