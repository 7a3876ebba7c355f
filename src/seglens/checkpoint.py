"""Checkpoints of a run's streamed phases, so that a killed run resumes to the same results.

A phase (the sgd warm-up, a training epoch, the holdout pass, the evaluation pass, LDA's pass) is a
deterministic stream of batches: its order depends only on the seed and the epoch. ``Checkpointer``
writes, every ``every`` batches and at the end of every phase, the running state of the registered
components (probe banks with optimiser moments and LDA sums, metric accumulators, counters, skipped
samples), the RNG states and the data position into ``RUN/checkpoint/``: tensors as safetensors,
everything else as JSON, never pickle. The JSON is written last and names its tensor file, so it is
the commit point and a crash at any moment leaves the previous checkpoint whole. On resume,
completed phases are skipped and the interrupted one restarts at its saved position, without
running the model on the batches it had already consumed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglens.results import read_json, save_tensors, write_json

__all__ = ["Checkpointer", "config_differences", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)
FORMAT = "seglens.checkpoint/1"
_TENSOR, _ARRAY = "__tensor__", "__array__"


# --- RNG states ----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": keys.astype(np.int64), "pos": int(pos)},
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }
    state["numpy"] |= {"has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what ``rng_state`` returned (after a save and load)."""
    torch.set_rng_state(state["torch"].cpu())
    npy = state["numpy"]
    keys = np.asarray(npy["keys"]).astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


# --- nested state <-> (JSON, tensors) -------------------------------------------------------------
def _split(value: Any, key: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """Move tensors and arrays out of ``value`` into ``tensors`` under ``key``, leaving markers."""
    if isinstance(value, Mapping):
        return {str(k): _split(v, f"{key}/{k}", tensors, seen) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split(v, f"{key}/{i}", tensors, seen) for i, v in enumerate(value)]
    if isinstance(value, torch.Tensor):
        device = str(value.device)
        t = value.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[key] = t
        return {_TENSOR: key, "device": device}
    if isinstance(value, np.ndarray):
        tensors[key] = torch.from_numpy(np.array(value, copy=True, order="C"))
        return {_ARRAY: key}
    if isinstance(value, np.generic):
        return value.item()
    return value


MapLocation = str | torch.device | Mapping[str, str | torch.device] | None


def _exists(device: torch.device) -> bool:
    """Whether this process can put tensors on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    if device.type == "mps":
        return torch.backends.mps.is_available()
    return device.type == "cpu"


def restore_device(saved: str, map_location: MapLocation = None) -> torch.device:
    """Where a tensor saved from device ``saved`` is restored.

    Args:
        saved: the device string the checkpoint recorded (e.g. ``cuda:3``).
        map_location: None: the saved device when this machine has it, else the CPU (a GPU run
            inspected on a laptop); a device: everything there; a mapping: ``{saved: new}``,
            devices it does not name as with None.
    """
    if isinstance(map_location, Mapping):
        map_location = map_location.get(saved)
    if map_location is not None:
        return torch.device(map_location)
    device = torch.device(saved)
    return device if _exists(device) else torch.device("cpu")


def _join(value: Any, tensors: Mapping[str, torch.Tensor], map_location: MapLocation = None) -> Any:
    """Inverse of ``_split``: markers back to tensors (on ``restore_device``) and arrays."""
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]].to(restore_device(value["device"], map_location))
        if _ARRAY in value:
            return tensors[value[_ARRAY]].numpy()
        return {k: _join(v, tensors, map_location) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors, map_location) for v in value]
    return value


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out |= _flatten(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: data}


def config_differences(saved: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts, as ``key: a -> b``."""
    a, b = _flatten(dict(saved)), _flatten(dict(requested))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


# --- the checkpointer -----------------------------------------------------------------------------
class Checkpointer:
    """Periodic, atomic checkpoints of one run's phases (one train + evaluate).

    Components register a getter and a setter of their state (nested dicts of tensors, arrays and
    JSON-able values); phases report their progress with ``step`` and ``end``. Files are
    ``<directory>/rank<r>.json`` and ``rank<r>-<seq>.safetensors``, one set per process.

    Args:
        directory: ``RUN/checkpoint``.
        every: write every this many batches (0: only at the end of each phase).
        fingerprint: the config values that shape the results; a resume with other values is
            refused, naming the keys.
        resume: load the existing checkpoint (if any) instead of discarding it.
        rank, world: this process and the number of processes (one checkpoint per rank).
        enabled: False keeps only the in-memory bookkeeping and writes nothing.
        map_location: where resumed tensors go (``restore_device``): by default their saved
            device when this machine has it, else the CPU; a device, or ``{saved: new}``.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        every: int = 50,
        fingerprint: Mapping[str, Any] | None = None,
        resume: bool = False,
        rank: int = 0,
        world: int = 1,
        enabled: bool = True,
        map_location: MapLocation = None,
    ):
        if every < 0:
            raise ValueError(f"checkpoint_every={every} must be >= 0 (0: at phase ends only)")
        self.directory, self.every, self.enabled = Path(directory), every, enabled
        self.fingerprint = dict(fingerprint or {})
        self.rank, self.world = rank, world
        self.map_location = map_location
        self._components: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self._pending: dict[str, Any] = {}  # loaded states of components not registered yet
        self._done: dict[str, int] = {}  # completed phase -> images it processed
        self._current: dict[str, Any] | None = None  # {"phase", "consumed", "seen"}
        self.stream_batches, self._seq = 0, 0
        self.complete_ = False
        self.resumed_ = False
        if not enabled:
            return
        # The folder appears with the first checkpoint: a start that fails before it leaves
        # nothing behind that would make the run folder look like a run to resume.
        if resume:
            self._load()
        else:
            self._clear()

    @classmethod
    def off(cls) -> Checkpointer:
        """A checkpointer that only keeps positions in memory (no files)."""
        return cls("", enabled=False)

    # --- files -----------------------------------------------------------------------------------
    @property
    def _meta_path(self) -> Path:
        return self.directory / f"rank{self.rank}.json"

    def _tensor_files(self) -> list[Path]:
        return sorted(self.directory.glob(f"rank{self.rank}-*.safetensors"))

    def _clear(self) -> None:
        for path in [self._meta_path, *self._tensor_files()]:
            path.unlink(missing_ok=True)

    def _load(self) -> None:
        if not self._meta_path.is_file():
            if self.directory.is_dir() and any(self.directory.glob("rank*.json")):
                raise ValueError(
                    f"{self.directory} has no checkpoint for rank {self.rank}: resume with the "
                    "number of processes that wrote it, or --overwrite to start again"
                )
            log.warning("no checkpoint in %s; starting from the beginning", self.directory)
            return
        meta = read_json(self._meta_path)
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{self._meta_path} is not a {FORMAT} checkpoint; pass --overwrite to start again"
            )
        diff = config_differences(meta["fingerprint"], self.fingerprint)
        if diff:
            raise ValueError(
                f"cannot resume {self.directory.parent}: it was run with another config ("
                + "; ".join(diff)
                + "); resume with the saved values or pass --overwrite to start again"
            )
        if meta["world"] != self.world:
            raise ValueError(
                f"{self.directory} was written by {meta['world']} processes, resuming with "
                f"{self.world}; resume with {meta['world']} or pass --overwrite"
            )
        self.complete_ = bool(meta.get("complete"))
        self._done, self._current, self._seq = dict(meta["done"]), meta["current"], meta["seq"]
        if meta.get("tensors"):
            from safetensors.torch import load_file

            tensors = load_file(self.directory / meta["tensors"])
            self._pending = _join(meta["state"], tensors, self.map_location)
        self.resumed_ = True
        log.info("resuming from %s: %s", self._meta_path, self.describe())

    def describe(self) -> str:
        """Where the checkpoint stands, in words."""
        if self.complete_:
            return "run complete"
        where = f"phases done {list(self._done)}"
        if self._current:
            where += f"; {self._current['phase']} at image {self._current['consumed']}"
        return where

    def where(self) -> tuple:
        """A comparable summary of the position (ranks must agree on it to resume)."""
        current = None if self._current is None else tuple(sorted(self._current.items()))
        return tuple(self._done), current, self.complete_

    def save(self) -> None:
        """Write the state of every registered component, the position and the RNG states."""
        if not self.enabled:
            return
        self._seq += 1
        tensors: dict[str, torch.Tensor] = {}
        state = {name: get() for name, (get, _) in self._components.items()}
        state = _split(state | self._pending, "s", tensors, set())
        name = f"rank{self.rank}-{self._seq:06d}.safetensors"
        save_tensors(self.directory / name, tensors)
        self._write_meta(tensors=name, state=state)
        for path in self._tensor_files():
            if path.name != name:
                path.unlink(missing_ok=True)

    def _write_meta(self, **extra: Any) -> None:
        meta = {"format": FORMAT, "rank": self.rank, "world": self.world, "seq": self._seq}
        meta |= {"complete": self.complete_, "fingerprint": self.fingerprint}
        meta |= {"done": self._done, "current": self._current}
        write_json(self._meta_path, meta | extra)

    def complete(self) -> None:
        """Mark the run complete and drop the tensors: a later resume has nothing to redo.

        A run built beside the one it replaces (``--overwrite``) takes its place now
        (``seglens.rundir.run.commit_overwrite``).
        """
        from seglens.rundir.run import commit_overwrite

        self.complete_, self._current = True, None
        if not self.enabled:
            return
        self._write_meta(tensors=None, state=None)
        for path in self._tensor_files():
            path.unlink(missing_ok=True)
        commit_overwrite(self.directory.parent)

    # --- components and phases -------------------------------------------------------------------
    def register(self, name: str, get: Callable[[], Any], set_: Callable[[Any], None]) -> None:
        """Add a component; a resumed checkpoint's state for it is applied at once."""
        self._components[name] = (get, set_)
        if name in self._pending:
            set_(self._pending.pop(name))

    def done(self, phase: str) -> bool:
        """Whether ``phase`` completed (in this process or the checkpointed run)."""
        return phase in self._done

    def seen(self, phase: str) -> int:
        """Images a completed ``phase`` processed (skipped samples excluded)."""
        return self._done[phase]

    def position(self, phase: str) -> tuple[int, int]:
        """(images consumed including skipped ones, images processed) of an interrupted
        ``phase``; (0, 0) for a phase that starts fresh."""
        if self._current is not None and self._current["phase"] == phase:
            return self._current["consumed"], self._current["seen"]
        return 0, 0

    def step(self, phase: str, consumed: int, seen: int) -> None:
        """Record a processed batch; write a checkpoint every ``every`` batches."""
        self._current = {"phase": phase, "consumed": consumed, "seen": seen}
        self.stream_batches += 1
        if self.every and self.stream_batches % self.every == 0:
            self.save()

    def end(self, phase: str, seen: int) -> None:
        """Mark ``phase`` complete and write a checkpoint."""
        self._done[phase], self._current = seen, None
        self.save()
