"""What a run's numbers depend on, recorded once and compared wherever a run or a cache is reused.

A run's identity is the absolute data root, the dataset's class names and a fingerprint of the
files of each split, the model's identity (registry name and options, resolved folder with a
fingerprint of its files, or hub id with its cached revision) and every option that shapes the
features and the probes. ``RunDir`` stores it as ``RUN/identity.json`` and compares it on every
reopen and ``--resume``; ``seglens.cache`` keys its entries by ``cache_identity``. A mismatch is
refused with the first difference (``first_difference``); this module is the only place that
computes or compares identities.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "IDENTITY", "cache_identity", "check", "dataset_identity", "digest"]
__all__ += ["first_difference", "folder_identity", "model_identity", "run_identity"]

FORMAT = "seglens.identity/1"
IDENTITY = "identity.json"
#: Files of a set up to this many bytes in all are fingerprinted by content (sha256), larger sets
#: by name, size and modification time: hashing ADE20K's 1 GB (or a 7B model's 14 GB) on every
#: reopen would cost minutes, while any rewrite of a file changes its size or mtime.
CONTENT_LIMIT = 64 * 2**20
#: File lists up to this length are stored entry by entry, so a refusal can name the file that
#: changed; longer ones only by their digest.
LISTED_FILES = 50_000


# --- fingerprints -----------------------------------------------------------------------------
def digest(value: Any) -> str:
    """sha256 of the canonical JSON of ``value`` (sorted keys)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_list(paths: Sequence[Path]) -> dict[str, Any]:
    """Fingerprint of ``paths``: their common folder, and per file (relative name, size, mtime
    in ns) or, for a set of at most ``CONTENT_LIMIT`` bytes, (relative name, size, sha256)."""
    paths = [Path(os.path.abspath(p)) for p in paths]
    stats = [p.stat() for p in paths]
    base = Path(os.path.commonpath(paths)) if paths else Path()
    if len(paths) == 1:
        base = base.parent
    total = sum(s.st_size for s in stats)
    mode = "content" if total <= CONTENT_LIMIT else "stat"
    entries = [
        [str(p.relative_to(base)), s.st_size, _sha256(p) if mode == "content" else s.st_mtime_ns]
        for p, s in zip(paths, stats, strict=True)
    ]
    out: dict[str, Any] = {"base": str(base), "mode": mode, "count": len(entries)}
    out |= {"bytes": total, "sha256": digest(entries)}
    if len(entries) <= LISTED_FILES:
        out["files"] = entries
    return out


def _key_paths(key: Any) -> list[Path]:
    if isinstance(key, Path):
        return [key]
    if isinstance(key, list | tuple):
        return [p for part in key for p in _key_paths(part)]
    return []


def dataset_identity(dataset: Any) -> dict[str, Any]:
    """Class names and item fingerprint of a ``SegDataset`` (or a view of one).

    File-backed datasets (item keys are paths, e.g. (image, mask)) get a file-list fingerprint
    (``_file_list``); generated ones (synthetic, organism) their type, scalar parameters (seed,
    split, sizes) and a digest of their item keys.
    """
    keys = list(dataset._keys)
    out: dict[str, Any] = {"items": len(keys), "class_names": list(dataset.class_names)}
    paths = [p for key in keys for p in _key_paths(key)]
    if paths:
        return out | {"kind": "files", **_file_list(paths)}
    scalars = (bool, int, float, str)
    params = {
        k: v
        for k, v in sorted(vars(dataset).items())
        if not k.startswith("_") and k not in ("class_names",) and isinstance(v, scalars)
    }
    return (
        out
        | {"kind": "generated", "type": type(dataset).__name__, "params": params}
        | {"keys": digest([repr(k) for k in keys])}
    )


def folder_identity(path: str | Path) -> dict[str, Any]:
    """A local model folder: its absolute path and the fingerprint of its files (hidden ones
    and sub-folders of caches excluded)."""
    path = Path(path).expanduser().resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    return {"path": str(path), **_file_list(files)}


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def model_identity(name: str) -> dict[str, Any]:
    """Identity of the model ``name`` names, without loading it.

    Tiny registry models: name, family and build options (their weights are drawn from a fixed
    seed). Named models (``organism``) and local folders: the resolved folder and a fingerprint
    of its files. Hub ids: the id and the revision (commit) of the cached snapshot, when cached.
    """
    from seglens.models.loading import NAMED_MODELS, TINY_MODELS

    if name in TINY_MODELS:
        spec = TINY_MODELS[name]
        options = {"kwargs": spec.kwargs, "family_options": spec.family_options}
        return {"source": "tiny", "name": name, "family": spec.family.name} | _plain(options)
    if name in NAMED_MODELS:
        return {"source": "named", "name": name, **folder_identity(NAMED_MODELS[name]())}
    if Path(name).expanduser().is_dir():
        return {"source": "folder", **folder_identity(name)}
    return {"source": "hub", "id": name, "revision": _hub_revision(name)}


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot of ``repo_id`` (None when not cached)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library refuses is reported by the loader, not here
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def _plain(value: Any) -> Any:
    """Canonical JSON data (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, default=str))


# --- identities -------------------------------------------------------------------------------
def run_identity(config: Any) -> dict[str, Any]:
    """Everything a run's results depend on, for ``config`` (a resolved ``RunConfig``).

    Builds the splits (listing their files) but never loads the model. Where the run keeps
    or reads its files (``out``, ``probe.cache_dir``), resume/overwrite flags, checkpoint
    cadence, workers and devices are left out: they do not change the numbers.
    """
    from seglens.experiments.common import build_dataset

    full = _plain(config.to_dict())
    data_options = {k: v for k, v in full["data"].items() if k not in ("num_workers", "root")}
    data: dict[str, Any] = {"root": _absolute(config.data.root), **data_options, "splits": {}}
    limits = {config.data.train_split: config.data.limit_train}
    limits.setdefault(config.data.eval_split, config.data.limit_eval)
    for split, limit in limits.items():
        dataset = build_dataset(config.data, split, limit, config.seed)
        data["splits"][split] = dataset_identity(dataset)
    drop = ("name", "device", "device_map")
    model = {"identity": model_identity(config.model.name)}
    model |= {k: v for k, v in full["model"].items() if k not in drop}
    probe = {k: v for k, v in full["probe"].items() if k != "cache_dir"}
    return {"format": FORMAT, "data": data, "model": model, "probe": probe, "seed": full["seed"]}


def cache_identity(
    vlm: Any,
    dataset: Any,
    *,
    stages: Iterable[str],
    condition: str,
    min_valid: float,
    on_bad_sample: str,
    tokens_per_image: int | None,
    seed: int,
    dtype: str,
) -> dict[str, Any]:
    """Everything the features of a cache entry depend on: the model (identity and its
    description: geometry, prompt, dtype, grid, normalisation, attention), the cached images
    (``dataset_identity``), the attention condition and what is stored."""
    info = {k: v for k, v in vlm.info().items() if k != "name"}
    return _plain(
        {
            "format": FORMAT,
            "model": {"identity": model_identity(vlm.name), **info},
            "data": dataset_identity(dataset) | {"min_valid": min_valid},
            "on_bad_sample": on_bad_sample,
            "condition": condition,
            "stages": sorted(stages),
            "tokens_per_image": tokens_per_image,
            "seed": seed if tokens_per_image is not None else None,
            "dtype": dtype,
        }
    )


def _absolute(root: str | None) -> str | None:
    return None if root is None else str(Path(root).expanduser().resolve())


# --- comparison -------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, leaf) in insertion order; lists (file lists, class names) stay whole."""
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], value


def _file_difference(key: str, saved: list, now: list, base: str | None) -> str:
    a = {e[0]: e[1:] for e in saved}
    b = {e[0]: e[1:] for e in now}
    for rel in sorted(set(a) | set(b)):
        name = rel if base is None else str(Path(base) / rel)
        if rel not in b:
            return f"{key}: {name} is gone ({len(a)} -> {len(b)} files)"
        if rel not in a:
            return f"{key}: {name} is new ({len(a)} -> {len(b)} files)"
        if a[rel] != b[rel]:
            what = "content" if isinstance(a[rel][1], str) else "modification time"
            if a[rel][0] != b[rel][0]:
                what = f"size {a[rel][0]} -> {b[rel][0]} bytes"
            return f"{key}: {name} changed ({what})"
    return f"{key}: the file list changed"


def first_difference(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The first difference between two identities, as ``key: saved -> now`` (a file list
    names its first changed, new or missing file); None when they are equal.

    Keys present on one side only are passed over: an option added by a later seglens (or
    removed) does not make older runs and caches unusable; what it changes shows elsewhere (in
    the file lists or the model's description).
    """
    a, b = dict(_flatten(_plain(saved))), dict(_flatten(_plain(now)))
    for key in a:
        if key not in b or a[key] == b[key]:
            continue
        parent = key.rpartition(".")[0]
        files = f"{parent}.files"
        listed = isinstance(a.get(files), list) and isinstance(b.get(files), list)
        if key.endswith((".count", ".bytes", ".sha256", ".files")) and listed:
            return _file_difference(files, a[files], b[files], b.get(f"{parent}.base"))
        return f"{key}: {a[key]!r} -> {b[key]!r}"
    return None


def check(saved: Mapping[str, Any], now: Mapping[str, Any], what: str, fix: str) -> None:
    """Refuse (``ValueError``) when ``now`` differs from ``saved``: ``{what} ...: {first
    difference}; {fix}``."""
    difference = first_difference(saved, now)
    if difference is not None:
        raise ValueError(f"{what} differs from what it was made with ({difference}); {fix}")
