"""``RunDir``: one run directory, its config and its ``results.json``.

``RunDir.create(config)`` prepares a new run (an existing one is refused unless ``overwrite`` or
``resume``), ``RunDir.open(path, **overrides)`` opens a finished one with its saved config, and
``put_section`` is the only read-modify-write of ``results.json``: every analysis adds its section
through it, validated against ``seglens.rundir.schema``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seglens.rundir import schema
from seglens.rundir.files import (
    atomic_write,
    load_arrays,
    provenance,
    read_json,
    save_arrays,
    write_json,
)

__all__ = ["CHECKPOINT", "CONFIG", "RESULTS", "RUN_OUTPUTS", "RunDir", "prepare", "put_section"]

log = logging.getLogger(__name__)

RESULTS = "results.json"
CONFIG = "config.yaml"
CHECKPOINT = "checkpoint"  # folder of a run's resumable state (seglens.checkpoint)
#: Everything seglens writes inside a run directory (what ``--overwrite`` replaces).
RUN_OUTPUTS = (RESULTS, CONFIG, "report.html", CHECKPOINT, "probes", "arrays", "figures")


def _holds(path: Path) -> bool:
    """Whether ``path`` is part of a run: ``results.json``, or a ``checkpoint/`` that holds a
    checkpoint (a start that failed before its first checkpoint leaves none, and must not block
    running the same command again)."""
    if path.name == CHECKPOINT:
        return path.is_dir() and any(path.glob("rank*.json"))
    return path.exists()


def prepare(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
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


def _json(value: Any) -> Any:
    if isinstance(value, schema.Section):
        return value.to_dict()
    return value


def put_section(run_dir: str | Path, name: str, section: Any) -> Any:
    """Put ``section`` into ``RUN/results.json`` under ``name`` and write it atomically.

    The one read-modify-write of ``results.json``: it is re-read right before the write, so
    sections other analyses wrote meanwhile are kept. ``name`` may be dotted
    (``"probing.causal"``). A typed section (``schema.section_type(name)``) is validated first.

    Returns:
        The section as written (typed when its name has a type).
    """
    kind = schema.section_type(name)
    if kind is not None:
        section = kind.from_dict(section, f"results.json: {name}")
    path = Path(run_dir) / RESULTS
    data = read_json(path)
    node = data
    *parents, leaf = name.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = _json(section)
    write_json(path, data)
    return section


class RunDir:
    """A run directory and the resolved config of its run.

    Attributes:
        path: the directory.
        config: the ``RunConfig`` (``config.out`` is ``path``).
    """

    def __init__(self, path: str | Path, config: Any):
        self.path = Path(path)
        self.config = config

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, config: Any) -> RunDir:
        """Prepare ``config.out`` for a new run (rank 0; see ``prepare``) and save the config.

        Under torch.distributed every rank returns once rank 0 has checked the directory.
        """
        from seglens.distributed import barrier, is_main

        run = cls(config.out, config)
        if is_main():
            prepare(run.path, overwrite=config.overwrite, resume=config.resume)
            run.save_config()
        barrier()  # no rank writes (a checkpoint) before rank 0 has checked the directory
        return run

    @classmethod
    def open(cls, path: str | Path, **overrides: Any) -> RunDir:
        """Open a run directory with its saved config and dotted ``overrides``
        (``{"knockout.top_k": 3}``; None values are skipped)."""
        from seglens.config import load_config

        path = Path(path)
        if not (path / RESULTS).is_file():
            raise FileNotFoundError(
                f"{path / RESULTS} does not exist: is this a seglens run directory? Run "
                "`seglens probe` first (or `seglens run`)"
            )
        if not (path / CONFIG).is_file():
            raise ValueError(
                f"{path} has no {CONFIG}: it holds no finished seglens run; run `seglens probe` "
                "first (or `seglens run`)"
            )
        config = load_config(path / CONFIG, **overrides).replace(out=str(path))
        return cls(path, config)

    @classmethod
    def of(cls, run: RunDir | str | Path | Any, **overrides: Any) -> RunDir:
        """``run`` as a RunDir: a RunDir (with ``overrides`` applied), a path (``open``)."""
        if isinstance(run, RunDir):
            if any(v is not None for v in overrides.values()):
                return cls(run.path, run.config.replace(**overrides))
            return run
        return cls.open(run, **overrides)

    def save_config(self) -> None:
        """Write ``config.yaml`` (the resolved config, every default on record)."""
        import yaml

        with atomic_write(self.path / CONFIG) as handle:
            yaml.safe_dump(_plain(self.config.to_dict()), handle, sort_keys=False)

    # --- results.json ----------------------------------------------------------------------------
    def begin(self, **sections: Any) -> dict[str, Any]:
        """Write a fresh ``results.json``: provenance, the config and ``sections`` (the header
        of a probing run; analyses add theirs with ``put_section``)."""
        data = provenance(self.config.seed, schema.SCHEMA_VERSION)
        data |= {"config": self.config.to_dict()}
        data |= {k: _json(v) for k, v in sections.items()}
        write_json(self.path / RESULTS, data)
        return data

    def results(self) -> dict[str, Any]:
        """``results.json``, validated (and upgraded from the previous schema version)."""
        return schema.load_results(self.path / RESULTS)

    def put_section(self, name: str, section: Any) -> Any:
        """See ``put_section``."""
        return put_section(self.path, name, section)

    def clean_probing(self) -> schema.Condition:
        """The probing section of the unmodified model (see ``schema.clean_condition``)."""
        results = self.results()
        block = (results.get("probing") or {}).get(schema.clean_condition(results))
        if not block:
            raise ValueError(f"{self.path} has no probing results; run `seglens probe` first")
        return schema.Condition.from_dict(block)

    # --- files -----------------------------------------------------------------------------------
    def file(self, relative: str) -> Path:
        """``RUN/<relative>``."""
        return self.path / relative

    def save_arrays(self, relative: str, **arrays: Any) -> None:
        save_arrays(self.path / relative, **arrays)

    def load_arrays(self, relative: str) -> dict[str, Any]:
        path = self.path / relative
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is named in results.json but does not exist; rerun the analysis that "
                "writes it"
            )
        return load_arrays(path)


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (``yaml.safe_dump`` refuses tuples)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def fingerprint(config: Any) -> dict[str, Any]:
    """The config values that shape probing results (not the run folder, resume or workers)."""
    full = _plain(config.to_dict())
    data = {k: v for k, v in full["data"].items() if k != "num_workers"}
    return {"seed": full["seed"], "model": full["model"], "data": data, "probe": full["probe"]}
