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
        ValueError: ``<stem>.json`` has another format tag or a solver not in ``solvers``.
    """
    meta = json.loads(Path(f"{stem}.json").read_text())
    if meta.get("format") != FORMAT or meta.get("solver") not in solvers:
        raise ValueError(f"{stem}.json is not a {FORMAT} probe (format {meta.get('format')!r})")
    tensors = load_file(f"{stem}.safetensors", device="cpu")
    return meta, {k: v.to(map_location) for k, v in tensors.items()}
