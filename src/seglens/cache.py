"""On-disk feature cache for multi-epoch probe training without re-running the model.

Off by default (DESIGN.md: nothing stores all layers of all images). ``write_cache`` runs one
forward pass per image and writes chosen stages' image-token features as fp16 safetensors shards
plus a ``manifest.json`` (stages, widths, shard files, image names and indices); the disk
estimate is logged before anything is written and a non-empty directory is refused.
``iterate_cache`` streams it back in any image order, and ``CachedFeatures`` is the feature
source through which ``train_probes`` (the one trainer) trains from it with the same holdout,
selection, order and checkpoints as from live forward passes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from seglens import distributed
from seglens.checkpoint import Checkpointer
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SegDataset
from seglens.models import VLM
from seglens.rundir.files import atomic_write, save_tensors

__all__ = ["CachedFeatures", "FeatureCache", "cached_features", "estimate_bytes", "iterate_cache"]
__all__ += ["write_cache"]

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_FORMAT = "seglens.cache/1"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def estimate_bytes(
    n_images: int, tokens_per_image: int, widths: Sequence[int], dtype: torch.dtype
) -> int:
    """Feature bytes of a cache: images x tokens x sum of stage widths x bytes per value."""
    return n_images * tokens_per_image * sum(widths) * torch.finfo(dtype).bits // 8


def _dtype_name(dtype: torch.dtype) -> str:
    names = {v: k for k, v in _DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"cache dtype {dtype} is not one of {sorted(_DTYPES)}")
    return names[dtype]


def write_cache(
    vlm: VLM,
    dataset: SegDataset,
    stages: Sequence[str],
    out_dir: str | Path,
    *,
    data_config: DataConfig,
    tokens_per_image: int | None = None,
    dtype: torch.dtype = torch.float16,
    shard_images: int = 256,
    seed: int = 0,
    progress: bool = True,
    source: dict | None = None,
) -> Path:
    """Run the model once over ``dataset`` and store ``stages``' image-token features.

    Under torch.distributed each rank captures its strided shard and writes its own shard files;
    rank 0 writes the manifest. Skipped samples are recorded and left out.

    Args:
        vlm: the model.
        dataset: the images to cache (e.g. the training part of the training split).
        stages: stage names to store.
        out_dir: a new or empty directory (a non-empty one is refused).
        data_config: batch size, workers, bad-sample policy, ``min_valid``.
        tokens_per_image: keep this many of the N tokens per image, chosen by a generator
            seeded with (seed, image index); None keeps all N.
        dtype: storage dtype (float16 default; float32 for exact round trips).
        shard_images: images per shard file.
        seed: seeds the token subsampling.
        progress: show a progress bar.
        source: what the features depend on (``seglens.rundir.identity.cache_identity``),
            recorded in the manifest so that a cache is never reused for other features.

    Returns:
        ``out_dir``. Shards hold ``feat.<stage>`` (n, T, D), ``labels`` (n, T) int64, ``hist``
        (n, T, C) int32, ``tokens`` (n, T) int64 token positions and ``index`` (n,) int64 image
        indices into ``dataset``; T = ``tokens_per_image`` or N.
    """
    from seglens.experiments.streaming import stream_batches

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"feature cache directory {out} is not empty; choose a new directory or delete it"
        )
    stages = list(stages)
    N = vlm.num_image_tokens
    T = N if tokens_per_image is None else tokens_per_image
    if not 1 <= T <= N:
        raise ValueError(f"tokens_per_image={tokens_per_image} must be in 1..{N} (or None)")
    widths = vlm.family.stage_widths()
    total = estimate_bytes(len(dataset), T, [widths[s] for s in stages], dtype)
    log.info(
        "feature cache: %d images x %d tokens x %d values (%d stages) in %s = %.2f GiB on disk",
        len(dataset),
        T,
        sum(widths[s] for s in stages),
        len(stages),
        _dtype_name(dtype),
        total / 2**30,
    )
    rank, world = distributed.rank_world()
    index_of = {key: i for i, key in enumerate(dataset._keys)}
    mine = dataset.shard(rank, world) if world > 1 else dataset
    out.mkdir(parents=True, exist_ok=True)
    skipped: dict[str, str] = {}
    shards: list[dict] = []
    names: dict[int, str] = {}
    pending: dict[str, list[torch.Tensor]] = {}

    def flush() -> None:
        if not pending:
            return
        tensors = {k: torch.cat(v).contiguous() for k, v in pending.items()}
        name = f"shard-r{rank}-{len(shards):05d}.safetensors"
        save_tensors(out / name, tensors)
        shards.append({"file": name, "index": tensors["index"].tolist()})
        pending.clear()

    C = dataset.num_classes
    position = 0  # local image number: maps batches back to dataset indices
    local_keys = mine._keys
    for batch in stream_batches(vlm, mine, data_config, C, skipped, progress, "feature cache"):
        # Skipped samples never reach a batch: match the batch to keys by name.
        idx = []
        while len(idx) < len(batch):
            key = local_keys[position]
            position += 1
            if mine._name(key) in batch.names:
                idx.append(index_of[key])
        features = vlm.capture(batch, stages)  # {stage: (B, N, D)}
        tokens = torch.stack([_token_choice(i, N, T, seed) for i in idx])  # (B, T)
        for stage in stages:
            x = features[stage].to("cpu", dtype)
            pending.setdefault(f"feat.{stage}", []).append(x.gather(1, _expand(tokens, x)))
        pending.setdefault("labels", []).append(batch.labels.gather(1, tokens))
        pending.setdefault("hist", []).append(batch.hist.gather(1, _expand(tokens, batch.hist)))
        pending.setdefault("tokens", []).append(tokens)
        pending.setdefault("index", []).append(torch.tensor(idx, dtype=torch.int64))
        names.update(zip(idx, batch.names, strict=True))
        if sum(len(t) for t in pending["index"]) >= shard_images:
            flush()
    flush()
    gathered = distributed.gather_object((shards, names, skipped))
    if distributed.is_main():
        manifest = {
            "format": _FORMAT,
            "source": source,
            "stages": stages,
            "widths": {s: widths[s] for s in stages},
            "dtype": _dtype_name(dtype),
            "num_classes": C,
            "num_image_tokens": N,
            "tokens_per_image": T,
            "subsampled": tokens_per_image is not None,
            "seed": seed,
            "images": [dataset.name_of(i) for i in range(len(dataset))],
            "cached": sorted(i for g in gathered for i in g[1]),
            "shards": [s for g in gathered for s in g[0]],
            "skipped": sorted({k: v for g in gathered for k, v in g[2].items()}.items()),
            "bytes": total,
        }
        with atomic_write(out / MANIFEST) as handle:
            json.dump(manifest, handle, indent=1)
    distributed.barrier()
    return out


def _token_choice(image: int, N: int, T: int, seed: int) -> torch.Tensor:
    """(T,) sorted token positions of one image (all N when T == N)."""
    if T == N:
        return torch.arange(N)
    rng = np.random.default_rng([seed, image, 0xCAC4E])
    return torch.from_numpy(np.sort(rng.choice(N, T, replace=False)))


def _expand(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return tokens[..., None].expand(-1, -1, like.shape[-1])


class FeatureCache:
    """Read access to a cache written by ``write_cache`` (shards memory-mapped).

    Args:
        cache_dir: the cache directory (holds ``manifest.json``).
    """

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {self.dir} is not a seglens feature cache")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != _FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r} != {_FORMAT!r}")
        self.stages: list[str] = list(self.manifest["stages"])
        self._where: dict[int, tuple[int, int]] = {}  # image index -> (shard, row)
        for s, shard in enumerate(self.manifest["shards"]):
            for row, i in enumerate(shard["index"]):
                self._where[i] = (s, row)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        """Images of the dataset the cache was written from (cached or skipped)."""
        return len(self.manifest["images"])

    def __contains__(self, index: int) -> bool:
        return index in self._where

    def _open(self, s: int):
        if s not in self._handles:
            file = self.dir / self.manifest["shards"][s]["file"]
            self._handles[s] = safe_open(str(file), framework="pt")
        return self._handles[s]

    def read(
        self, indices: Sequence[int], stages: Sequence[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Features, labels and histograms of images ``indices`` (in that order).

        Returns:
            ({stage: (B, T, D)} in the cache dtype, labels (B, T) int64, hist (B, T, C) int32).
        """
        stages = self.stages if stages is None else list(stages)
        keys = [f"feat.{s}" for s in stages] + ["labels", "hist"]
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for i in indices:
            s, row = self._where[i]
            handle = self._open(s)
            for k in keys:
                parts[k].append(handle.get_slice(k)[row : row + 1])
        out = {k: torch.cat(v) for k, v in parts.items()}
        features = {s: out[f"feat.{s}"] for s in stages}
        return features, out["labels"], out["hist"]


def iterate_cache(
    cache_dir: str | Path | FeatureCache,
    order: Sequence[int] | None = None,
    *,
    batch_size: int = 8,
    stages: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Batches of (features {stage: (B, T, D)}, labels (B, T), hist (B, T, C)) in ``order``.

    Args:
        cache_dir: a cache directory or an open ``FeatureCache``.
        order: image indices (into the dataset the cache was written from); default all in
            index order. Indices of skipped images are passed over.
        batch_size: images per batch (B); each batch is the next B cached images of ``order``.
        stages: a subset of the cached stages (default all).
        device: where the tensors go.
    """
    cache = cache_dir if isinstance(cache_dir, FeatureCache) else FeatureCache(cache_dir)
    order = range(len(cache)) if order is None else order
    present = [int(i) for i in order if int(i) in cache]
    for start in range(0, len(present), batch_size):
        features, labels, hist = cache.read(present[start : start + batch_size], stages)
        yield {s: x.to(device) for s, x in features.items()}, labels.to(device), hist.to(device)


# --- a feature source for the trainer ------------------------------------------------------------
class CachedFeatures:
    """The features of training images read from a cache, for ``train_probes(features=...)``.

    ``batches`` takes a phase's images (a view of the dataset the cache was written from, in the
    phase's order and already sharded) and yields them in batches of ``batch_size`` cached
    images, reporting each batch to the checkpoint like the live source does; an interrupted
    phase restarts at its saved position. Images the cache skipped are passed over.

    Args:
        cache: the cache (``FeatureCache`` or its directory).
        dataset: the images it was written from (maps image keys to cache indices).
        stages: the stages to read (cached ones).
        batch_size: images per batch.
        device: where the tensors go.
    """

    def __init__(
        self,
        cache: FeatureCache | str | Path,
        dataset: SegDataset,
        stages: Sequence[str],
        *,
        batch_size: int,
        device: str | torch.device = "cpu",
    ):
        self.cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
        if len(self.cache) != len(dataset):
            raise ValueError(
                f"the cache {self.cache.dir} holds {len(self.cache)} images, the dataset "
                f"{len(dataset)}; it was written from other images: choose a new probe.cache_dir"
            )
        missing = sorted(set(stages) - set(self.cache.stages))
        if missing:
            raise ValueError(
                f"stages {missing} are not in the cache {self.cache.dir} ({self.cache.stages})"
            )
        self.stages, self.batch_size, self.device = list(stages), batch_size, device
        self._index = {key: i for i, key in enumerate(dataset._keys)}
        self.skipped = dict(self.cache.manifest["skipped"])
        self.name = str(self.cache.dir)

    def batches(
        self,
        dataset: SegDataset,
        desc: str,
        checkpoint: Checkpointer | None,
        phase: str,
        skipped: dict[str, str],
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
        """(features {stage: (B, T, D)}, labels (B, T), hist (B, T, C)) of ``dataset``'s images."""
        ckpt = checkpoint or Checkpointer.off()
        skipped.update(self.skipped)
        if ckpt.done(phase):
            return
        start, seen = ckpt.position(phase)
        indices = [self._index[key] for key in dataset._keys]
        position = start
        while position < len(indices):
            chunk = []
            while position < len(indices) and len(chunk) < self.batch_size:
                if indices[position] in self.cache:
                    chunk.append(indices[position])
                position += 1
            if not chunk:
                break
            features, labels, hist = self.cache.read(chunk, self.stages)
            yield (
                {s: x.to(self.device) for s, x in features.items()},
                labels.to(self.device),
                hist.to(self.device),
            )
            seen += len(chunk)
            ckpt.step(phase, position, seen)
        ckpt.end(phase, seen)


def cached_features(
    vlm: VLM,
    dataset: SegDataset,
    stages: Sequence[str],
    probe_config: ProbeConfig,
    *,
    data_config: DataConfig,
    condition: str,
    seed: int = 0,
    progress: bool = True,
) -> CachedFeatures:
    """The feature cache entry of ``dataset`` under ``condition``, written on first use.

    An entry holds ``probe.cache_stages`` (default ``stages``), ``probe.cache_tokens_per_image``
    tokens per image, fp16, and lives in ``<probe.cache_dir>/<condition>/<key>``, where ``key``
    is a digest of its identity (``seglens.rundir.identity.cache_identity``: the model and its
    preprocessing, the images' files, ``min_valid``, the condition, what is stored). A hit needs
    the whole identity; anything else is a new entry written beside the others, never over them
    (the log names the first difference from the latest entry). A folder left without a manifest
    by a killed write is written again.
    """
    from seglens.rundir import identity

    cfg = probe_config
    cached_stages = list(cfg.cache_stages) if cfg.cache_stages else list(stages)
    source = identity.cache_identity(
        vlm,
        dataset,
        stages=cached_stages,
        condition=condition,
        min_valid=data_config.min_valid,
        on_bad_sample=data_config.on_bad_sample,
        tokens_per_image=cfg.cache_tokens_per_image,
        seed=seed,
        dtype="float16",
    )
    parent = Path(cfg.cache_dir) / condition
    cache_dir = parent / identity.digest(source)[:16]
    if (cache_dir / MANIFEST).is_file():
        cache = FeatureCache(cache_dir)
        identity.check(
            cache.manifest.get("source") or {},
            source,
            f"the feature cache entry {cache_dir}",
            f"delete {cache_dir} (its name is a digest of its identity: it was altered)",
        )
        missing = sorted(set(stages) - set(cache.stages))
        if missing:  # cache_stages names fewer stages than are probed
            raise ValueError(
                f"the feature cache {cache_dir} holds stages {cache.stages}, not {missing}; add "
                "them to probe.cache_stages (or leave it unset to cache every probed stage)"
            )
        log.info("reusing the feature cache in %s", cache_dir)
    else:
        _log_miss(parent, cache_dir, source)
        if distributed.is_main() and cache_dir.is_dir():
            partial = list(cache_dir.glob("shard-r*.safetensors"))
            if partial:  # a killed write: no manifest, so nothing has read these shards
                log.warning("%s holds an unfinished cache; writing it again", cache_dir)
            for path in partial:
                path.unlink()
        distributed.barrier()
        write_cache(
            vlm,
            dataset,
            cached_stages,
            cache_dir,
            data_config=data_config,
            tokens_per_image=cfg.cache_tokens_per_image,
            seed=seed,
            progress=progress,
            source=source,
        )
        cache = FeatureCache(cache_dir)
    return CachedFeatures(
        cache, dataset, stages, batch_size=data_config.batch_size, device=vlm.device
    )


def _log_miss(parent: Path, cache_dir: Path, source: dict) -> None:
    """Log that no entry matches, naming the first difference from the latest entry."""
    from seglens.rundir import identity

    entries = sorted(parent.glob(f"*/{MANIFEST}"), key=lambda p: p.stat().st_mtime)
    if not entries:
        log.info("feature cache: writing a new entry in %s", cache_dir)
        return
    try:
        latest = json.loads(entries[-1].read_text()).get("source") or {}
    except ValueError:
        latest = {}
    log.info(
        "feature cache: no entry in %s matches (the latest, %s, differs: %s); writing a new "
        "entry in %s",
        parent,
        entries[-1].parent.name,
        identity.first_difference(latest, source) or "it has no recorded identity",
        cache_dir,
    )
