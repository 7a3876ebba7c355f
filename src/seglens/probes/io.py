"""The on-disk format of a fitted probe: ``<stem>.safetensors`` next to ``<stem>.json``.

The tensors (coef, intercept, mean, scale) go through safetensors, never pickle; the JSON holds
the format tag, the seglens version and the metadata needed to rebuild the probe. Every file is
written atomically (``seglens.results``), so a crash never leaves half a probe.
"""

from __future__ import annotations

import json
import os
from collections.abc import Container, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from seglens import __version__
from seglens.probes._common import Tensor
from seglens.results import atomic_write, save_tensors

FORMAT = "seglens.probe/1"


def write_meta(path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Atomically write ``meta`` as indented JSON."""
    with atomic_write(path) as handle:
        handle.write(json.dumps(meta, indent=2))


def write_probe(
    stem: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    """Write ``<stem>.safetensors`` (``tensors``, moved to CPU) and ``<stem>.json`` (``meta``,
    after the format tag and the seglens version)."""
    save_tensors(
        f"{stem}.safetensors", {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    )
    write_meta(f"{stem}.json", {"format": FORMAT, "seglens_version": __version__, **meta})


def read_probe(
    stem: str | os.PathLike, solvers: Container[str], map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read what ``write_probe`` wrote: (meta, tensors on ``map_location``).

    The tensors are read on the CPU and then moved, so any device torch knows works, whatever
    device the probe was trained on.

    Raises:
        ValueError: a file is truncated or damaged, or ``<stem>.json`` has another format tag or
            a solver not in ``solvers`` (the message names the file and the fix).
        FileNotFoundError: a file is missing.
    """
    meta = read_meta(Path(f"{stem}.json"), solvers)
    tensors = _read_tensors(Path(f"{stem}.safetensors"))
    return meta, {k: v.to(map_location) for k, v in tensors.items()}


_FIX = "rerun the analysis that wrote it (e.g. `seglens probe --overwrite`) or restore it"


def read_meta(path: Path, solvers: Container[str]) -> dict[str, Any]:
    """A probe's JSON, naming the file when it is missing, truncated or of another format."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the probe is missing; {_FIX}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): truncated or damaged; {_FIX}") from e
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} probe (format {found!r}); {_FIX}")
    if meta.get("solver") not in solvers:
        raise ValueError(f"{path}: unknown probe solver {meta.get('solver')!r}; {_FIX}")
    return meta


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """A probe's safetensors on the CPU, naming the file when it is missing or damaged."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (its .json does); {_FIX}")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path} cannot be read ({path.stat().st_size} bytes; {e}): truncated or damaged; "
            f"{_FIX}"
        ) from e
