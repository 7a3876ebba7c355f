"""Sink keys as a knockout source set: does the LLM read its sink tokens to segment the image?

Per evaluation image with at least one sink (a token flagged at any stage by ``SinkScorer``),
three forwards: clean, the sink keys made unreadable to every query at every LLM layer
(``block_sinks``), and a size-matched random set of the image's other tokens made unreadable
(``random_sinks``, ``knockout_sets.sink_key_sets``). The run's clean probes score every LLM stage
on the tokens in neither set (the same tokens under all three conditions), with paired 95%
intervals over images of each difference. An image without sinks has nothing to block and runs
no forward.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seglens.metrics import PerImageCounts

__all__ = ["SINK_KEY_CONDITIONS", "SINK_KEY_DIFFERENCES", "llm_probes", "run_sink_keys"]

log = logging.getLogger(__name__)

SINK_KEY_CONDITIONS = ("none", "block_sinks", "random_sinks")
#: difference name -> (minuend, subtrahend) conditions.
SINK_KEY_DIFFERENCES = {
    "block_sinks_minus_random_sinks": ("block_sinks", "random_sinks"),
    "block_sinks_minus_none": ("block_sinks", "none"),
    "random_sinks_minus_none": ("random_sinks", "none"),
}
# Seeds the random controls apart from every other seeded draw of the run.
_SEED_TAG = 2207


def run_sink_keys(
    vlm: Any,
    dataset: Any,
    keys: Mapping[str, np.ndarray],
    probes: Mapping[str, Any],
    config: Any,
    *,
    max_images: int | None = None,
    bootstrap: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """The sink-keys knockout on the images of ``dataset`` that have sinks.

    Args:
        vlm: the model.
        dataset: the evaluation split the sinks were flagged on.
        keys: image name -> (N,) bool sink tokens (``SinkScorer.keys_``: images with a sink).
        probes: {stage: clean probe} of the LLM stages to score, in depth order.
        config: the run config (data loading and seed).
        max_images: knock out on the first this many images with sinks (None: all).
        bootstrap: resamples of the paired intervals (0: estimates only).
        progress: show a progress bar.

    Returns:
        ``{"conditions", "queries", "scored", "images", "images_with_sinks", "keys_per_image",
        "curves": {condition: {stage: {miou, accuracy}}}, "differences": {name: {stage:
        {estimate, low, high, n_images, significant}}}}``; ``images`` 0 (no forward) when no
        image has a sink.
    """
    from seglens.analyses.knockout.measure import predict_stages, stream_batches
    from seglens.analyses.knockout.sets import sink_key_sets
    from seglens.experiments.stats import paired_bootstrap, significant

    stages = list(probes)
    names = {dataset.name_of(i): i for i in range(len(dataset))}
    indices = sorted(names[n] for n in keys if n in names)
    chosen = indices if max_images is None else indices[:max_images]
    C = dataset.num_classes
    counts = {(c, s): PerImageCounts(C) for c in SINK_KEY_CONDITIONS for s in stages}
    blocked = []
    batches = stream_batches(vlm, dataset, chosen, config, "sink keys", progress) if chosen else ()
    for batch, ids in batches:
        sinks = np.stack([keys[batch.names[j]] for j in range(len(ids))])  # (B, N)
        rngs = [np.random.default_rng([config.seed, _SEED_TAG, i]) for i in ids]
        sets = sink_key_sets(sinks, rngs)
        labels = batch.labels.numpy()
        scored = np.where(sets["block_sinks"] | sets["random_sinks"], 255, labels)
        preds = {"none": predict_stages(vlm, batch, probes)}  # (S, B, N)
        for cond in SINK_KEY_CONDITIONS[1:]:
            preds[cond] = predict_stages(vlm, batch, probes, sets[cond], later_only=False)
        for cond, pred in preds.items():
            for j, s in enumerate(stages):
                counts[cond, s].add_batch(pred[j], scored)
        blocked += sinks.sum(1).tolist()

    def cell(c: PerImageCounts) -> dict[str, float | None]:
        miou, acc = c.miou(), c.pixel_accuracy()
        return {
            "miou": None if np.isnan(miou) else miou,
            "accuracy": None if np.isnan(acc) else acc,
        }

    curves = {c: {s: cell(counts[c, s]) for s in stages} for c in SINK_KEY_CONDITIONS}
    differences: dict[str, dict[str, Any]] = {}
    for name, (a, b) in SINK_KEY_DIFFERENCES.items():
        for s in stages if chosen else []:
            interval = paired_bootstrap(
                counts[a, s], counts[b, s], "miou", n_resamples=bootstrap, seed=config.seed
            )
            interval["significant"] = significant(interval) if bootstrap else None
            differences.setdefault(name, {})[s] = interval
    log.info(
        "sink keys: knocked out on %d of %d images with sinks (%.1f sink keys per image)",
        len(chosen),
        len(indices),
        float(np.mean(blocked)) if blocked else 0.0,
    )
    return {
        "conditions": list(SINK_KEY_CONDITIONS),
        "queries": "all",
        "scored": "tokens in neither set",
        "images": len(chosen),
        "images_with_sinks": len(indices),
        "keys_per_image": float(np.mean(blocked)) if blocked else None,
        "stages": list(stages),
        "curves": curves,
        "differences": differences,
    }


def llm_probes(probes: Mapping[str, Any], stages: Sequence[str]) -> dict[str, Any]:
    """The probes of the LLM block stages among ``stages``, in depth order (what a knockout in
    the LLM can change)."""
    from seglens.stages import by_depth

    return {s: probes[s] for s in by_depth(list(stages)) if s in probes}
