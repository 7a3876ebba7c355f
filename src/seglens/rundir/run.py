"""``RunDir``: one run directory, its config and its ``results.json``.

``RunDir.create(config)`` prepares a new run (an existing one is refused unless ``overwrite`` or
``resume``), ``RunDir.open(path, **overrides)`` opens a finished one with its saved config, and
``put_section`` is the only read-modify-write of ``results.json``: every analysis adds its section
through it, validated against ``seglens.rundir.schema``.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seglens.rundir import identity, journal, lock, schema
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
WARMUP = "train.warmup"  # the sgd warm-up phase of a checkpoint (seglens.experiments.training)
#: Everything seglens writes inside a run directory (what ``--overwrite`` replaces).
RUN_OUTPUTS = (RESULTS, CONFIG, identity.IDENTITY, "report.html", CHECKPOINT, "probes")
RUN_OUTPUTS += ("arrays", "figures", "tables", journal.SECTIONS)


def _holds(path: Path) -> bool:
    """Whether ``path`` is part of a run: ``results.json``, or a ``checkpoint/`` that records
    progress past the warm-up (a start that failed before that, e.g. on data that gives the
    standardisers nothing to see, has cost a few batches and must not block running again)."""
    if path.name != CHECKPOINT:
        return path.exists()
    for meta in path.glob("rank*.json") if path.is_dir() else ():
        try:
            saved = read_json(meta)
        except ValueError:
            return True  # unreadable: keep it, the user decides
        current = (saved.get("current") or {}).get("phase")
        if (
            saved.get("complete")
            or set(saved.get("done") or ()) - {WARMUP}
            or current
            not in (
                None,
                WARMUP,
            )
        ):
            return True
    return False


def _sibling(path: Path, what: str) -> Path:
    return path.parent / f".{path.name}.{what}"


def prepare(path: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Check the run directory ``path`` and return the folder to build the run in.

    A folder that holds a run (``results.json`` or a ``checkpoint/`` of an interrupted one) is
    refused unless ``overwrite`` or ``resume`` is given. With ``overwrite`` the new run is built
    in the hidden sibling ``.<name>.overwrite`` and replaces the old one only once it is complete
    (``commit_overwrite``): until then the old run is untouched. Otherwise ``path`` itself is
    returned (created if needed). The caller holds the run's lock (``seglens.rundir.lock``).
    """
    path = Path(path)
    _recover(path)
    held = [name for name in (RESULTS, CHECKPOINT) if _holds(path / name)]
    if held and not (overwrite or resume):
        raise FileExistsError(
            f"{path} already holds a run ({held[0]} exists); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    build = path
    if held and overwrite and not resume:
        build = _sibling(path, "overwrite")
        if build.exists():  # a replacement that failed or was killed (we hold the lock)
            log.info("removing %s, left by an --overwrite that did not finish", build)
            shutil.rmtree(build)
        _PENDING[build.absolute()] = path.absolute()
    build.mkdir(parents=True, exist_ok=True)
    # A killed write leaves its hidden temporary file (the target itself is intact): sweep them.
    for stale in build.rglob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return build


#: Runs being built beside the run they replace: building folder -> final folder.
_PENDING: dict[Path, Path] = {}
_OPEN: list[RunDir] = []  # RunDirs of pending folders, moved along when they are committed


def commit_overwrite(build: str | Path) -> Path:
    """Replace the old run with the complete new run built in ``build`` (``prepare`` with
    ``overwrite``); a no-op for any other folder. Called when the run is complete
    (``Checkpointer.complete``).

    The old run is renamed aside, the new one renamed into place, files that seglens did not
    write (anything but ``RUN_OUTPUTS``) are carried over from the old one, and the old one is
    deleted. Every ``RunDir`` of ``build`` now points at the final folder.
    """
    from seglens.distributed import barrier, is_main

    key = Path(build).absolute()
    final = _PENDING.pop(key, None)
    if final is None:
        return Path(build)
    barrier()  # every rank has written its last file into ``build``
    if is_main():
        old = _sibling(final, "replaced")
        os.rename(final, old)
        os.rename(key, final)
        _carry_over(old, final)
        shutil.rmtree(old)
        log.info("replaced the previous run in %s", final)
    for run in [r for r in _OPEN if r.path.absolute() == key]:
        run.path = final if run.path.is_absolute() else Path(os.path.relpath(final))
        _OPEN.remove(run)
    barrier()  # no rank writes into the final folder before it is there
    return final


def _carry_over(old: Path, new: Path) -> None:
    """Move what the user kept in the old run (not seglens's outputs) into the new one."""
    for item in old.iterdir():
        if item.name not in RUN_OUTPUTS and not (new / item.name).exists():
            os.rename(item, new / item.name)


def _recover(path: Path) -> None:
    """Finish or undo a replacement killed between its two renames (``commit_overwrite``)."""
    old = _sibling(path, "replaced")
    if not old.exists():
        return
    if path.exists():  # the new run is in place: finish the clean-up
        _carry_over(old, path)
        shutil.rmtree(old)
    else:  # killed between the renames: put the old run back
        os.rename(old, path)
        log.warning("%s: restored the previous run after an interrupted --overwrite", path)


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
    journal.record_section(run_dir, name, node[leaf])
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
        if self.path.absolute() in _PENDING:
            _OPEN.append(self)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, config: Any) -> RunDir:
        """Lock ``config.out``, check it (``prepare``) and record the run's config and identity.

        The data root and a local model folder are made absolute first, so that a later command
        run from another directory opens the same data and model. With ``config.resume`` the
        recorded identity (``identity.json``) and the checkpoint's config must match the
        requested ones; a mismatch is refused before anything is written. With
        ``config.overwrite`` the run is built beside the old one (see ``prepare``). Under
        torch.distributed rank 0 locks and checks, and every rank returns once it has.
        """
        from seglens.distributed import barrier, is_main

        config = _absolute_paths(config)
        final = Path(config.out)
        build = final
        if is_main():
            lock.acquire(final, "seglens (new run)" if not config.resume else "seglens --resume")
            build = prepare(final, overwrite=config.overwrite, resume=config.resume)
        elif config.overwrite and (_holds(final / RESULTS) or _holds(final / CHECKPOINT)):
            build = _sibling(final, "overwrite")  # rank 0 builds there (same rule)
            _PENDING[build.absolute()] = final.absolute()
        run = cls(build, config)
        if is_main():
            run._record_identity()
        barrier()  # no rank writes (a checkpoint) before rank 0 has checked the directory
        return run

    def _record_identity(self) -> None:
        """Write ``identity.json`` (and ``config.yaml``) of a new run; on resume, refuse a
        run whose identity or checkpointed config differs from the requested one."""
        saved_path = self.path / identity.IDENTITY
        now = identity.run_identity(self.config)
        if self.config.resume:
            fix = "resume with the run's settings and data, or pass --overwrite to start again"
            meta = self.path / CHECKPOINT / "rank0.json"
            if meta.is_file():  # every key of the config that differs, as the checkpoint sees it
                from seglens.checkpoint import config_differences

                saved = read_json(meta).get("fingerprint") or {}
                diff = config_differences(saved, fingerprint(self.config))
                if diff:
                    raise ValueError(
                        f"cannot resume {self.path}: it was run with another config ("
                        + "; ".join(diff)
                        + f"); {fix}"
                    )
            if saved_path.is_file():  # then the data files and the model
                what = f"cannot resume {self.path}: the requested run"
                identity.check(read_json(saved_path), now, what, fix)
            if saved_path.is_file() and (self.path / CONFIG).is_file():
                return  # nothing to record: both are on file and match
        write_json(saved_path, now)
        self.save_config()

    @classmethod
    def open(cls, path: str | Path, **overrides: Any) -> RunDir:
        """Open a run directory with its saved config and dotted ``overrides``
        (``{"knockout.top_k": 3}``; None values are skipped).

        The run is locked for this process and its recorded identity (``identity.json``: data
        files, model, options) must match what the saved config names now; a mismatch is
        refused, naming the first difference.
        """
        from seglens.config import load_config
        from seglens.distributed import is_main

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
        if is_main():
            lock.acquire(path, "seglens (reading and adding to the run)")
        run = cls(path, config)
        run.check_identity()
        return run

    def check_identity(self) -> None:
        """Refuse when the data or model the run's config names is no longer what the run was
        made with (``identity.json``); runs of older versions without one are checked only for
        a relative data root, which would be resolved against the working directory."""
        saved_path = self.path / identity.IDENTITY
        if not saved_path.is_file():
            root = self.config.data.root
            if root is not None and not Path(root).is_absolute():
                raise ValueError(
                    f"{self.path / CONFIG} names the relative data.root {root!r} and the run "
                    f"has no {identity.IDENTITY} (an older seglens): it cannot be told which "
                    "folder was meant. Write the absolute path into data.root there"
                )
            log.warning("%s has no %s (an older seglens): not checked", self.path, "identity")
            return
        try:
            now = identity.run_identity(self.config)
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"{self.path} was made from data that is no longer there: {e}"
            ) from e
        fix = (
            "restore the data and model the run was made with, or make a new run with "
            "`seglens probe --out NEW`"
        )
        identity.check(read_json(saved_path), now, f"{self.path}: the data or model", fix)

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
        journal.record_header(self.path, data)
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


def _absolute_paths(config: Any) -> Any:
    """``config`` with its data root, and its model when that is a local folder, absolute."""
    changes: dict[str, str] = {}
    if config.data.root is not None:
        changes["data.root"] = str(Path(config.data.root).expanduser().resolve())
    name = config.model.name
    if not Path(name).is_absolute() and Path(name).expanduser().is_dir():
        from seglens.models.loading import NAMED_MODELS, TINY_MODELS

        if name not in TINY_MODELS and name not in NAMED_MODELS:
            changes["model.name"] = str(Path(name).expanduser().resolve())
    return config.replace(**changes) if changes else config


def fingerprint(config: Any) -> dict[str, Any]:
    """The config values that shape probing results (not the run folder, resume or workers)."""
    full = _plain(config.to_dict())
    data = {k: v for k, v in full["data"].items() if k != "num_workers"}
    return {"seed": full["seed"], "model": full["model"], "data": data, "probe": full["probe"]}
