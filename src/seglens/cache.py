"""On-disk feature cache for multi-epoch probe training without re-running the model.

Off by default (DESIGN.md: nothing stores all layers of all images). ``write_cache`` runs one
forward pass per image and writes chosen stages' image-token features as fp16 safetensors shards
plus a ``manifest.json`` (stages, widths, shard files, image names and indices); the disk
estimate is logged before anything is written and a non-empty directory is refused.
``iterate_cache`` streams it back in any image order and ``train_probes_from_cache`` trains a
``ProbeBank`` exactly as ``train_probes`` does on live features, in the same order.
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
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SegDataset
from seglens.models import VLM
from seglens.probes import ProbeBank
from seglens.rundir.files import atomic_write, save_tensors

__all__ = ["FeatureCache", "estimate_bytes", "iterate_cache", "train_probes_cached"]
__all__ += ["train_probes_from_cache", "write_cache"]

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


def _bank(stages: Sequence[str], cfg: ProbeConfig, dataset: SegDataset, warmup: int) -> ProbeBank:
    if cfg.solver == "sgd":
        options = dict(lrs=cfg.lrs, weight_decay=cfg.weight_decay, warmup_batches=warmup)
    else:
        options = dict(shrinkage=cfg.shrinkage)
    return ProbeBank(
        stages,
        dataset.num_classes,
        solver=cfg.solver,
        class_names=dataset.class_names,
        soft_labels=cfg.soft_labels,
        **options,
    )


def _epoch_indices(n: int, seed: int, epoch: int, limit: int | None = None) -> list[int]:
    """This rank's indices of epoch ``epoch``: the order of ``streaming.epoch_order``, cut to
    ``limit``, trimmed to a multiple of the world size and strided (as ``shard_dataset``)."""
    rank, world = distributed.rank_world()
    order = np.random.default_rng([seed, epoch]).permutation(n)[:limit]
    order = order[: len(order) // world * world]
    return order[rank::world].tolist()


def _lda_indices(n: int) -> list[int]:
    """This rank's indices of the one lda pass, as ``shard_dataset(dataset, equal=True)``."""
    rank, world = distributed.rank_world()
    return list(range(n // world * world))[rank::world]


def train_probes_from_cache(
    cache: str | Path | FeatureCache,
    dataset: SegDataset,
    stages: Sequence[str],
    probe_config: ProbeConfig,
    *,
    batch_size: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> ProbeBank:
    """Train probes from cached features in the order ``train_probes`` uses on live features.

    sgd: a warm-up over the first ``warmup_batches`` batches of epoch 1's seeded order, then
    ``epochs`` seeded orders; lda: one pass. Under torch.distributed each rank takes its strided
    part of every epoch's order. Validation (holdout) and ``select()`` are left to the caller.

    Args:
        cache: the cache of ``dataset`` (written by ``write_cache``).
        dataset: the training images the cache was written from (its classes and size).
        stages: stages to train (cached ones).
        probe_config: solver and hyperparameters.
        batch_size: images per step per rank (``data.batch_size``).
        seed: seeds the epoch orders.
        device: where the probes train.

    Returns:
        The bank, trained but not selected; ``bank.cache_images_`` = images trained on (epoch 1).
    """
    cfg = probe_config
    cache = cache if isinstance(cache, FeatureCache) else FeatureCache(cache)
    if len(cache) != len(dataset):
        raise ValueError(f"the cache holds {len(cache)} images, the dataset {len(dataset)}")
    missing = sorted(set(stages) - set(cache.stages))
    if missing:
        raise ValueError(f"stages {missing} are not in the cache {cache.dir} ({cache.stages})")
    world = distributed.world()
    n_local = len(dataset) // world
    warmup = min(cfg.warmup_batches, -(-n_local // batch_size))
    bank = _bank(stages, cfg, dataset, warmup)
    soft = cfg.soft_labels

    def fit(order: list[int]) -> int:
        seen = 0
        for features, labels, hist in iterate_cache(
            cache, order, batch_size=batch_size, stages=stages, device=device
        ):
            bank.partial_fit(features, labels, hist if soft else None)
            seen += len(labels)
        return seen

    n_train = 0
    if cfg.solver == "sgd":
        fit(_epoch_indices(len(dataset), seed, 0, warmup * batch_size * world))
        for probe in bank.probes.values():
            if not probe.standardizer.frozen:
                probe.standardizer.freeze()
        for epoch in range(cfg.epochs):
            n = fit(_epoch_indices(len(dataset), seed, epoch))
            n_train = n if epoch == 0 else n_train
    else:
        n_train = fit(_lda_indices(len(dataset)))
    bank.cache_images_ = n_train
    return bank


def train_probes_cached(
    vlm: VLM,
    train_dataset: SegDataset,
    stages: Sequence[str],
    probe_config: ProbeConfig,
    *,
    data_config: DataConfig,
    seed: int = 0,
    holdout: float | None = None,
    progress: bool = True,
) -> ProbeBank:
    """``train_probes`` with ``probe.cache_dir``: cache the training images once, train from it.

    The holdout split is the same as ``train_probes``'s and is scored live (one pass). The
    cache is written on first use (``probe.cache_stages``, default the probed stages;
    ``probe.cache_tokens_per_image``) and reused when its manifest lists the same images.

    Returns:
        The selected ``ProbeBank`` with ``training_`` as ``train_probes`` sets it.
    """
    from seglens.experiments.streaming import shard_dataset, split_holdout, stream_batches

    cfg, C = probe_config, train_dataset.num_classes
    hold = None
    if cfg.solver == "sgd":
        fraction = cfg.holdout_fraction if holdout is None else holdout
        train_dataset, hold = split_holdout(train_dataset, fraction, seed)
        if hold is None and len(cfg.lrs) > 1:
            raise ValueError(
                f"probe.lrs={list(cfg.lrs)} needs a holdout to choose one; set "
                "probe.holdout_fraction > 0 or give a single learning rate"
            )
    cache_dir = Path(cfg.cache_dir)
    names = [train_dataset.name_of(i) for i in range(len(train_dataset))]
    reuse = (cache_dir / MANIFEST).is_file()
    if reuse:
        cache = FeatureCache(cache_dir)
        if cache.manifest["images"] != names or set(stages) - set(cache.stages):
            raise ValueError(
                f"probe.cache_dir={cache_dir} holds a cache of other images or stages "
                f"({cache.stages}); choose a new directory"
            )
        log.info("reusing the feature cache in %s", cache_dir)
    else:
        cache_stages = list(cfg.cache_stages) if cfg.cache_stages else list(stages)
        write_cache(
            vlm,
            train_dataset,
            cache_stages,
            cache_dir,
            data_config=data_config,
            tokens_per_image=cfg.cache_tokens_per_image,
            seed=seed,
            progress=progress,
        )
        cache = FeatureCache(cache_dir)
    bank = train_probes_from_cache(
        cache,
        train_dataset,
        stages,
        cfg,
        batch_size=data_config.batch_size,
        seed=seed,
        device=vlm.device,
    )
    skipped: dict[str, str] = dict(cache.manifest["skipped"])
    n_hold = 0
    if hold is not None:
        hold = shard_dataset(hold, equal=False)
        for batch in stream_batches(vlm, hold, data_config, C, skipped, progress, "holdout"):
            bank.validate(vlm.capture(batch, stages), batch.labels)
            n_hold += len(batch)
    bank.select()
    gathered = distributed.gather_object((bank.cache_images_, n_hold, skipped))
    bank.training_ = {
        "train_images": sum(g[0] for g in gathered),
        "holdout_images": sum(g[1] for g in gathered),
        "warmup_batches": bank.probes[stages[0]].warmup_batches if cfg.solver == "sgd" else 0,
        "skipped": sorted({k: v for g in gathered for k, v in g[2].items()}.items()),
        "cache_dir": str(cache_dir),
    }
    return bank
