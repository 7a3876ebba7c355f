"""UMAP projections of patch tokens per stage, with cluster-quality scores in the original space.

One pass over the evaluation split draws a seeded sample of labelled tokens, the same tokens for
every stage, so stages are comparable point for point. Each stage gets a silhouette score and a
k-NN accuracy computed on its standardised features (not on the 2D map, which distorts distances),
and a 2D UMAP embedding saved for the figures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglens import distributed
from seglens.config import RunConfig
from seglens.data import IGNORE_INDEX, SegDataset, iterate_samples
from seglens.models import VLM
from seglens.rundir import RunDir
from seglens.rundir.schema import Umap, embedding_key, labels_key
from seglens.stages import spread

log = logging.getLogger(__name__)

UMAP_FILE = "arrays/umap.npz"
SILHOUETTE_POINTS = 2000  # silhouette is O(M^2); a seeded subsample of this size is plenty
KNN_FOLDS = 5


def umap_stages(num_llm_layers: int) -> list[str]:
    """Default stages: ``encoder``, ``adapter`` and 4 LLM layers spread over depth.

    Args:
        num_llm_layers: L, decoder blocks of the LLM.

    Returns:
        ``["encoder", "adapter", "llm.{round(L/4)}", ..., "llm.{L}"]``, deduplicated (a shallow
        LLM gives fewer than 4 layers).
    """
    return ["encoder", "adapter"] + [f"llm.{layer}" for layer in spread(num_llm_layers, 4)]


# --- sampling ---------------------------------------------------------------------------------
class TokenSampler:
    """A seeded bottom-k sample of labelled image tokens, fed batch by batch.

    Every labelled token seen gets a seeded uniform key and the ``tokens`` smallest keys are kept,
    so the sample is uniform over the labelled tokens of the images visited, and only the kept
    tokens' features are held (memory ``tokens x D`` per stage). The sampler is ``done`` once at
    least ``ceil(tokens / per_image)`` images and ``tokens`` labelled tokens have been seen, which
    spreads the sample over many images (tokens of one image are correlated). It can be fed by its
    own pass (``sample_tokens``) or by any other pass over the same split in the same order (the
    probing evaluation in ``seglens run``): both give the same sample.

    Args:
        stages: stage names to keep features of.
        tokens: M, tokens to draw.
        seed: seeds the keys.
        num_tokens: N, image tokens per image.
        per_image: tokens drawn per image on average at most; sets how many images are visited.
    """

    def __init__(
        self, stages: Sequence[str], *, tokens: int, seed: int, num_tokens: int, per_image: int = 16
    ):
        if tokens < 1:
            raise ValueError(f"tokens={tokens} must be >= 1")
        if per_image < 1:
            raise ValueError(f"per_image={per_image} must be >= 1")
        if not stages:
            raise ValueError("sample_tokens() got no stages; name at least one (e.g. 'adapter')")
        self.stages = list(stages)
        self.tokens = tokens
        self.num_tokens = num_tokens
        self.min_images = math.ceil(tokens / per_image)
        self._rng = np.random.default_rng(seed)
        self.keys = np.empty(0, dtype=np.float64)  # (K,) kept keys, K <= tokens
        self.where = np.empty(0, dtype=np.int64)  # (K,) global token index: image * N + position
        self.labels = np.empty(0, dtype=np.int64)  # (K,)
        self.features: dict[str, np.ndarray] = {}  # stage -> (K, D) float32
        self.images = self.labelled = 0
        self._pending: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def done(self) -> bool:
        return self.images >= self.min_images and self.labelled >= self.tokens

    def candidates(self, labels: torch.Tensor) -> bool:
        """Draw keys for a batch's labelled tokens; True when any can enter (then ``add``)."""
        b_idx, n_idx = np.nonzero(labels.numpy() != IGNORE_INDEX)
        new_keys = self._rng.random(len(b_idx))
        self.labelled += len(b_idx)
        if len(self.keys) == self.tokens:  # full: only keys below the k-th smallest can enter
            enter = new_keys < self.keys.max()
            b_idx, n_idx, new_keys = b_idx[enter], n_idx[enter], new_keys[enter]
        self._pending = (b_idx, n_idx, new_keys)
        return bool(len(b_idx))

    def add(self, labels: torch.Tensor, states: dict[str, torch.Tensor] | None) -> None:
        """Keep the batch's entering tokens (``states`` may be None when none can enter)."""
        b_idx, n_idx, new_keys = self._pending
        self._pending = None
        if len(b_idx):
            b_t, n_t = torch.from_numpy(b_idx), torch.from_numpy(n_idx)
            self.keys = np.concatenate([self.keys, new_keys])
            where = (self.images + b_idx) * self.num_tokens + n_idx
            self.where = np.concatenate([self.where, where])
            self.labels = np.concatenate([self.labels, labels[b_t, n_t].numpy()])
            for stage in self.stages:
                x = states[stage]
                x = x[b_t.to(x.device), n_t.to(x.device)].to("cpu", torch.float32).numpy()
                old = self.features.get(stage)
                self.features[stage] = x if old is None else np.concatenate([old, x])
            if len(self.keys) > self.tokens:
                keep = np.sort(np.argpartition(self.keys, self.tokens - 1)[: self.tokens])
                self.keys, self.where, self.labels = (
                    self.keys[keep],
                    self.where[keep],
                    self.labels[keep],
                )
                self.features = {stage: x[keep] for stage, x in self.features.items()}
        self.images += len(labels)

    def offer(self, labels: torch.Tensor, states: dict[str, torch.Tensor]) -> None:
        """Feed one batch whose states were already captured (a shared forward pass)."""
        if not self.done:
            self.candidates(labels)
            self.add(labels, states)

    def result(self, where: str = "the split") -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``({stage: (M, D) float32}, (M,) int64 labels)``, rows in data order."""
        if len(self.labels) == 0:
            raise ValueError(
                f"no labelled tokens in {self.images} images of {where}; check the dataset's "
                "masks or lower data.min_valid"
            )
        if len(self.labels) < self.tokens:
            log.warning(
                "only %d labelled tokens in %d images (asked for %d); using all of them",
                len(self.labels),
                self.images,
                self.tokens,
            )
        return dict(self.features), self.labels.copy()


def sample_tokens(
    vlm: VLM,
    dataset: SegDataset,
    stages: Sequence[str],
    *,
    tokens: int,
    seed: int,
    batch_size: int = 8,
    num_workers: int = 0,
    per_image: int = 16,
    min_valid: float = 0.5,
    on_bad_sample: str = "error",
    progress: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Draw one seeded sample of labelled image tokens and their features at every stage.

    Runs its own pass with a ``TokenSampler`` (see there), stopping as soon as it is done;
    a batch none of whose tokens can enter the sample skips its forward pass.

    Args:
        vlm: the model.
        dataset: the evaluation split.
        stages: stage names; all come from one ``vlm.capture`` per batch.
        tokens: M, tokens to draw (fewer when the images visited hold fewer labelled tokens).
        seed: seeds the keys; same seed and data give the same tokens.
        batch_size: images per forward pass.
        num_workers: loader worker processes.
        per_image: tokens drawn per image on average at most; sets how many images are visited.
        min_valid: labelled pixel fraction below which a token is ignore.
        on_bad_sample: ``"error"`` or ``"skip"`` (see ``iterate_samples``).
        progress: show a progress bar.

    Returns:
        ``({stage: (M, D) float32}, (M,) int64 labels)``; row i is the same token at every
        stage, rows in data order (image, then raster position). No label is ignore.
    """
    sampler = TokenSampler(
        stages, tokens=tokens, seed=seed, num_tokens=vlm.num_image_tokens, per_image=per_image
    )
    stream = iterate_samples(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        transform=vlm.preprocessor(dataset.num_classes, min_valid),
        on_bad_sample=on_bad_sample,
        progress=progress,
        desc="umap tokens",
    )
    for prepared in stream:
        batch = vlm.collate(prepared)
        if batch.labels is None:
            raise ValueError(f"dataset {dataset!r} gives no label maps; UMAP colours need labels")
        states = vlm.capture(batch, sampler.stages) if sampler.candidates(batch.labels) else None
        sampler.add(batch.labels, states)
        if sampler.done:
            break
    return sampler.result(repr(dataset))


# --- scores and embedding ---------------------------------------------------------------------
def _standardise(features: np.ndarray) -> np.ndarray:
    """(M, D) -> (M, D) float32 with zero mean and unit variance per feature (constant ones 0).

    LLM hidden states have a few massive dimensions that would otherwise dominate distances.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (M, D), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(
            "features hold NaN or inf (an fp16 overflow?); rerun with model.dtype=float32"
        )
    std = x.std(axis=0)
    return ((x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)).astype(np.float32)


def cluster_scores(
    features: np.ndarray, labels: np.ndarray, *, neighbors: int = 15, seed: int = 0
) -> dict[str, float]:
    """How well the classes separate in the original (standardised) feature space.

    Classes with a single token are dropped first. With fewer than 2 classes left both scores
    are NaN (written as null).

    Args:
        features: (M, D) token features of one stage.
        labels: (M,) class ids.
        neighbors: k of the k-NN classifier.
        seed: seeds the silhouette subsample and the cross-validation folds.

    Returns:
        ``{"silhouette": float, "knn_accuracy": float}``: the euclidean silhouette on at most
        2000 seeded points, in [-1, 1]; and the accuracy of a k-NN classifier under 5-fold
        stratified cross-validation (fewer folds when a class has fewer than 5 tokens), whose
        chance level is the majority-class share.
    """
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels)
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    classes, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, classes[counts >= 2])
    x, y = _standardise(features)[keep], labels[keep]
    counts = counts[counts >= 2]
    if len(counts) < 2:
        log.warning("fewer than 2 classes with 2+ tokens; cluster scores are undefined")
        return {"silhouette": float("nan"), "knn_accuracy": float("nan")}
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(y), size=min(len(y), SILHOUETTE_POINTS), replace=False))
    n_labels = len(np.unique(y[pick]))
    silhouette = (
        float(silhouette_score(x[pick], y[pick], metric="euclidean"))
        if 2 <= n_labels < len(pick)
        else float("nan")
    )
    folds = int(min(KNN_FOLDS, counts.min()))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # The smallest training fold bounds k (sklearn refuses k > training points).
    k = max(1, min(neighbors, len(y) - math.ceil(len(y) / folds)))
    predicted = cross_val_predict(KNeighborsClassifier(n_neighbors=k), x, y, cv=cv)
    return {"silhouette": silhouette, "knn_accuracy": float(np.mean(predicted == y))}


def embed(features: np.ndarray, *, neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """2D UMAP of standardised features; the same seed gives the same embedding.

    Args:
        features: (M, D) token features, M >= 4.
        neighbors: UMAP ``n_neighbors`` (capped at M - 1).
        seed: UMAP ``random_state`` (makes UMAP single-threaded and deterministic).

    Returns:
        (M, 2) float32 embedding.
    """
    import umap  # slow to import (numba); only when needed

    from seglens.experiments.numba_cache import cache_umap_compilation

    cache_umap_compilation()  # numba compiles umap's layout once per machine, not per run
    x = _standardise(features)
    if len(x) < 4:
        raise ValueError(f"UMAP needs at least 4 tokens, got {len(x)}; sample more tokens")
    reducer = umap.UMAP(
        n_neighbors=min(neighbors, len(x) - 1),
        min_dist=0.1,
        n_components=2,
        random_state=seed,
        n_jobs=1,  # implied by random_state; saying so silences umap's warning
    )
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)


def shown_classes(labels: np.ndarray, count: int) -> list[int]:
    """The ``count`` most frequent class ids in ``labels`` (ties: smaller id first)."""
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    order = np.lexsort((classes, -counts))
    return [int(c) for c in classes[order][:count]]


# --- the run ----------------------------------------------------------------------------------
def umap_sampler(config: RunConfig, vlm: VLM) -> TokenSampler:
    """The sampler a run's UMAP uses: configured stages (default ``umap_stages``), tokens, seed."""
    settings = config.umap
    stages = list(settings.stages) if settings.stages else umap_stages(vlm.num_llm_layers)
    unknown = [s for s in stages if s not in vlm.stages]
    if unknown:
        raise ValueError(f"unknown stages {unknown} for {vlm.name}; available: {vlm.stages}")
    return TokenSampler(
        stages, tokens=settings.tokens, seed=config.seed, num_tokens=vlm.num_image_tokens
    )


def run_umap(
    run: RunDir | str | Path,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    sampler: TokenSampler | None = None,
    **overrides: Any,
) -> Umap:
    """Project the tokens of a run's evaluation split per stage and score their clustering.

    The public API behind ``seglens umap --run RUN``. Writes ``RUN/arrays/umap.npz``
    (``embedding__<stage>`` (M, 2) float32, ``labels__<stage>`` (M,) int64) and adds the ``umap``
    section to ``RUN/results.json``; figures are left to the caller. ``config.umap.enabled`` is
    for pipelines that chain analyses; calling this function always runs it.

    Args:
        run: a run (``RunDir`` or its directory, holding ``config.yaml`` and ``results.json``).
        vlm: the model to use instead of building the one the config names (must match it).
        progress: show a progress bar.
        sampler: a ``TokenSampler`` (from ``umap_sampler``) already fed by another pass over the
            evaluation split in the same order, e.g. the probing evaluation; then no forward pass
            runs here. Without one, this function makes its own pass.
        **overrides: ``UmapConfig`` fields, e.g. ``stages=["adapter"], tokens=500``.

    Returns:
        The ``umap`` section: ``stages``, ``file``, ``tokens``, ``scores`` {stage:
        {"silhouette", "knn_accuracy"}}, ``classes``, ``neighbors``, ``seed``.
    """
    from seglens.experiments.common import build_dataset, build_model

    run = RunDir.of(run, **{f"umap.{k}": v for k, v in overrides.items()})
    if distributed.rank() != 0:
        # A few thousand tokens need no data parallelism: rank 0 samples, embeds and writes.
        distributed.barrier()
        return Umap.from_dict(run.results()["umap"])
    config = run.config
    if vlm is None:
        vlm = build_model(config.model)
    settings = config.umap
    if sampler is not None:
        stages = sampler.stages
        features, labels = sampler.result("the evaluation split")
    else:
        stages = umap_sampler(config, vlm).stages
        dataset = build_dataset(
            config.data, config.data.eval_split, config.data.limit_eval, config.seed
        )
        features, labels = sample_tokens(
            vlm,
            dataset,
            stages,
            tokens=settings.tokens,
            seed=config.seed,
            batch_size=config.data.batch_size,
            num_workers=config.data.num_workers,
            min_valid=config.data.min_valid,
            on_bad_sample=config.data.on_bad_sample,
            progress=progress,
        )
    scores, arrays = {}, {}
    for stage in stages:
        scores[stage] = cluster_scores(
            features[stage], labels, neighbors=settings.neighbors, seed=config.seed
        )
        arrays[embedding_key(stage)] = embed(
            features[stage], neighbors=settings.neighbors, seed=config.seed
        )
        arrays[labels_key(stage)] = labels.astype(np.int64)
        log.info(
            "%s: silhouette %.3f, %d-NN accuracy %.3f",
            stage,
            scores[stage]["silhouette"],
            settings.neighbors,
            scores[stage]["knn_accuracy"],
        )
    run.save_arrays(UMAP_FILE, **arrays)
    section = Umap(
        stages=stages,
        file=UMAP_FILE,
        tokens=len(labels),
        scores=scores,
        classes=shown_classes(labels, settings.classes),
        neighbors=settings.neighbors,
        seed=config.seed,
    )
    section = run.put_section("umap", section)
    distributed.barrier()
    return section
