"""A record of every write to ``results.json``, from which a damaged one is rebuilt.

``results.json`` is replaced whole on every write, so a crash never leaves it half-written; but a
copy that a disk, a sync tool or an editor damaged would otherwise lose what exists only there
(training counts, skipped samples, convergence records, knockout scores). Each write is therefore
also kept as one small file in ``RUN/sections/``: the header that starts the run, then every
section as ``put_section`` wrote it, with a sequence number. ``rebuild`` replays them in order and
gives, byte for byte, the ``results.json`` that the run last wrote.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from seglens.rundir.files import read_json, write_json

__all__ = ["SECTIONS", "rebuild", "record_header", "record_section", "restore"]

#: Folder of the records, inside the run directory.
SECTIONS = "sections"
_HEADER = "_header.json"
_LAST = [0]  # the last sequence number this process gave (the clock may step back)


def _seq() -> int:
    _LAST[0] = max(time.time_ns(), _LAST[0] + 1)
    return _LAST[0]


def record_header(run_dir: str | Path, data: dict[str, Any]) -> None:
    """Start the record of a fresh ``results.json`` (``RunDir.begin``): earlier records go."""
    folder = Path(run_dir) / SECTIONS
    if folder.is_dir():
        for old in folder.glob("*.json"):
            old.unlink()
    write_json(folder / _HEADER, {"seq": _seq(), "results": data})


def record_section(run_dir: str | Path, name: str, section: Any) -> None:
    """Record that ``put_section`` wrote ``section`` (JSON-ready) under the dotted ``name``."""
    folder = Path(run_dir) / SECTIONS
    if not (folder / _HEADER).is_file():
        return  # a run written before records existed: nothing to keep in step with
    write_json(folder / f"{name}.json", {"seq": _seq(), "name": name, "section": section})


def rebuild(run_dir: str | Path) -> dict[str, Any]:
    """The ``results.json`` that the records of ``run_dir`` describe.

    Raises:
        ValueError: the run has no records (a run of an older seglens, or ``sections/`` deleted).
    """
    folder = Path(run_dir) / SECTIONS
    if not (folder / _HEADER).is_file():
        raise ValueError(
            f"{folder} holds no record of the run's results (a run of an older seglens, or the "
            "folder was deleted), so results.json cannot be rebuilt; restore it from a backup "
            f"or run the command that made it again with `--config {Path(run_dir) / 'config.yaml'}"
            " --overwrite`"
        )
    data = read_json(folder / _HEADER)["results"]
    records = [read_json(p) for p in folder.glob("*.json") if p.name != _HEADER]
    for record in sorted(records, key=lambda r: r["seq"]):
        node = data
        *parents, leaf = record["name"].split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = record["section"]
    return data


def restore(run_dir: str | Path) -> Path:
    """Rewrite ``RUN/results.json`` from its records (``rebuild``) and return its path."""
    path = Path(run_dir) / "results.json"
    write_json(path, rebuild(run_dir))
    return path
