"""Attention knockout: which image tokens does the LLM read to refine a pair of confused classes?

The clean probes of a probing run (no retraining) define, at a reference stage (default
``adapter``), which image tokens are *correct* (the probe there predicts their label). For the
top-K class pairs the reference probe confuses most among those that co-occur in evaluation
images, every evaluation image holding both classes runs once clean and once per condition: the
pair's correct tokens, its incorrect tokens, or seeded random tokens of matched size per image
(one control per ``knockout.control_pool``) are made unreadable (``knockout.mode="block"``) or
left as the only readable image tokens (``"keep_only"``), for all queries, all LLM layers or a
window. The clean probes then score every LLM stage on the pair's tokens: accuracy, 2-class IoU
and the recovery of tokens the reference stage got wrong, with paired bootstrap intervals over
images on every condition minus ``none`` and minus its matched control. ``run_knockout`` is the
public API behind ``seglens knockout``; the pieces without a model live in ``knockout_sets``.

``knockout.queries="after"`` (default) blocks a key for the tokens after it
(``Knockout(later_only=True)``); ``"all"`` also for the tokens before it. Under causal attention
the two are the same edge set; they differ in natively bidirectional image blocks (Gemma3,
PaliGemma), where earlier image tokens read later ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglens.analyses.knockout.sets import (
    CONTROL_POOLS,
    COUNT_FIELDS,
    MATCHED_POOLS,
    blocked_keys,
    control_name,
    key_sets,
    knockout_differences,
    layer_windows,
    pair_counts,
    pair_images,
    pair_scores,
    random_control,
    select_pairs,
)
from seglens.config import KnockoutConfig, RunConfig
from seglens.data import SegDataset, iterate_samples
from seglens.distributed import gather_object, rank_world
from seglens.interventions import Knockout, TokenSet, intervene
from seglens.models import VLM, Batch
from seglens.prefix import shared_prefix
from seglens.probes import load_probe
from seglens.rundir import RunDir
from seglens.rundir.schema import Knockout as KnockoutSection
from seglens.rundir.schema import confusion_key
from seglens.stages import by_depth

__all__ = ["CONDITIONS", "CONTROL_POOLS", "COUNT_FIELDS", "conditions_of", "key_sets"]
__all__ += ["layer_windows", "pair_counts", "pair_images", "pair_scores", "predict_stages"]
__all__ += ["random_control", "run_knockout", "select_pairs"]

log = logging.getLogger(__name__)

TREATMENTS = ("block_correct", "block_incorrect")
# The conditions of the default settings (controls from every pool).
_CONTROLS = tuple(control_name(t, pool) for pool in CONTROL_POOLS for t in TREATMENTS)
CONDITIONS = ("none", *TREATMENTS, *_CONTROLS)


def conditions_of(settings: KnockoutConfig) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """The conditions a setting runs, and {control: (matched treatment, pool)}."""
    controls = {}
    if settings.random_controls:
        for pool in settings.control_pool:
            for t in TREATMENTS:
                controls[control_name(t, pool)] = (t, pool)
    return ["none", *TREATMENTS, *controls], controls


def _span(window: Sequence[int] | None) -> tuple[int, ...] | None:
    """(first, last) inclusive -> the layer numbers; None (all layers) stays None."""
    return None if window is None else tuple(range(window[0], window[1] + 1))


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _average(scores: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Metric-wise mean over draws or pairs (each weighs the same; None values are skipped)."""
    return {m: _mean([s[m] for s in scores]) for m in scores[0]}


# --- forwards -----------------------------------------------------------------------------------
def predict_stages(
    vlm: VLM,
    batch: Batch,
    probes: Mapping[str, Any],
    keys: np.ndarray | None = None,
    *,
    masked: bool = True,
    confidence_of: str | None = None,
    **spec,
) -> Any:
    """One forward (optionally with keys knocked out) -> every stage's clean-probe prediction.

    The clean pass (``keys=None``) runs inside ``intervene(vlm, [])`` like every knocked-out
    pass: both hand the decoder a materialised 4D mask, so both take the same attention kernel.
    A plain forward would let HF send a causal batch to the fused ``is_causal`` (flash) kernel,
    whose bf16 rounding differs from the masked one: "condition - none" would carry kernel noise.
    On CPU the two paths are bitwise equal (``tests/test_knockout.py``).

    Args:
        vlm: the model.
        batch: B images.
        probes: {stage: fitted probe}, in the order of the output.
        keys: (B, N) bool image slots no query may read (None: the clean model).
        masked: route the clean pass through ``intervene(vlm, [])`` (False: the plain forward,
            for callers that need no comparison with a knockout). Inside an active
            ``intervene`` the clean pass already is on the masked path.
        confidence_of: also return this stage's probe confidence (max softmax probability).
        **spec: more ``Knockout`` fields, e.g. ``layers=(3, 4)``.

    Returns:
        (S, B, N) int64 predicted classes; with ``confidence_of``, also (B, N) float32.
    """
    stages = list(probes)
    context = nullcontext()
    if keys is not None:
        knockout = Knockout(keys=TokenSet.from_mask(np.asarray(keys, bool)), **spec)
        context = intervene(vlm, [knockout])
    elif masked and vlm.attention_mask_override is None:
        context = intervene(vlm, [])
    with context:
        features = vlm.capture(batch, stages)
    with torch.inference_mode():
        # Each probe takes its stage's features to its own device (``_Probe._flat``); under a
        # device_map the predictions are gathered on the first stage's device, one host copy.
        preds = [probes[s].predict(features[s]) for s in stages]
        home = preds[0].device
        pred = torch.stack([p.to(home, non_blocking=True) for p in preds])
        if confidence_of is None:
            return pred.cpu().numpy()
        logits = probes[confidence_of].decision_function(features[confidence_of])
        confidence = logits.float().softmax(-1).amax(-1)
    return pred.cpu().numpy(), confidence.cpu().numpy()


def _scan_labels(
    vlm: VLM, dataset: SegDataset, config: RunConfig, progress: bool
) -> tuple[list[int], np.ndarray]:
    """Token labels of every evaluation image (no forward): (dataset indices, (M, N) labels)."""
    index = {dataset.name_of(i): i for i in range(len(dataset))}
    kept, labels = [], []
    data = config.data
    stream = iterate_samples(
        dataset,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        transform=vlm.preprocessor(dataset.num_classes, data.min_valid),
        on_bad_sample=data.on_bad_sample,
        progress=progress,
        desc="knockout labels",
    )
    for prepared in stream:
        for item in prepared:
            if item.labels is None:
                raise ValueError(
                    f"{dataset.name}: knockout needs label maps ({item.name} has none)"
                )
            kept.append(index[item.name])
            labels.append(np.asarray(item.labels, dtype=np.int64))
    return kept, np.stack(labels) if labels else np.zeros((0, vlm.num_image_tokens), np.int64)


def stream_batches(
    vlm: VLM,
    dataset: SegDataset,
    indices: Sequence[int],
    config: RunConfig,
    desc: str,
    progress: bool,
) -> Iterator[tuple[Batch, list[int]]]:
    """Collated batches of the images ``indices`` of ``dataset``, with their dataset indices."""
    view = dataset._view([dataset._keys[i] for i in indices])
    index = {dataset.name_of(i): i for i in indices}
    stream = iterate_samples(
        view,
        batch_size=config.data.batch_size,
        num_workers=config.data.num_workers,
        transform=vlm.preprocessor(dataset.num_classes, config.data.min_valid),
        on_bad_sample=config.data.on_bad_sample,
        progress=progress,
        desc=desc,
    )
    for prepared in stream:
        yield vlm.collate(prepared), [index[p.name] for p in prepared]


# --- one pair -----------------------------------------------------------------------------------
def _run_pair(
    vlm: VLM,
    batches: Iterator[tuple[Batch, list[int]]],
    probes: Mapping[str, Any],
    reference: str,
    llm_stages: Sequence[str],
    pair: Sequence[int],
    settings: KnockoutConfig,
    windows: Sequence[tuple[int, int]],
    seed: int,
) -> tuple[list[int], dict, dict]:
    """Per-image counts of every condition (and random draw) of one pair over its images.

    Per batch: one clean forward (reference stage and LLM stages), then one forward per knocked
    out key set (skipped when no image of the batch has a key to block) and per sweep window.
    With ``knockout.shared_prefix`` these reuse the clean forward's image features and, for a
    layer window, its decoder-layer outputs before the window (``seglens.prefix``; exact).

    Returns:
        ``(image ids (I,), {(condition, draw): (S, I, 10)}, {(window, condition, draw): (10,)})``
        with S = ``len(llm_stages)``; the sweep counts are summed and are those of the last of
        ``llm_stages``.
    """
    stages = list(probes)
    ref_row = stages.index(reference)
    rows = [stages.index(s) for s in llm_stages]
    llm = {s: probes[s] for s in llm_stages}
    _, controls = conditions_of(settings)
    pool_index = {pool: i for i, pool in enumerate(CONTROL_POOLS + MATCHED_POOLS)}
    ids: list[int] = []
    counts: dict = {}
    sweep: dict = {}

    def add(table: dict, key: tuple, value: np.ndarray) -> None:
        table[key] = table.get(key, 0) + value

    matched_on = reference if any(p == "confidence" for _, p in controls.values()) else None
    spans = [_span(window) for window in [settings.layers, *windows] if window is not None]
    record = max((span[0] - 1 for span in spans), default=0)  # layers a window resumes after
    for batch, image_ids in batches:
        ids += image_ids
        labels = batch.labels.numpy()
        with shared_prefix(vlm, record, enabled=settings.shared_prefix) as prefix:
            clean = predict_stages(vlm, batch, probes, confidence_of=matched_on)  # (S_all, B, N)
            clean, confidence = clean if matched_on else (clean, None)
            ref_correct = clean[ref_row] == labels
            clean = clean[rows]
            none = pair_counts(clean, labels, ref_correct, pair)  # (S, B, 10)
            counts.setdefault(("none", 0), []).append(none)
            for w in range(len(windows)):
                add(sweep, (w, "none", 0), none[-1].sum(0))
            sets = {(c, 0): m for c, m in key_sets(labels, ref_correct, pair).items()}
            pair_tokens = np.isin(labels, pair)
            for draw in range(settings.random_controls):
                for name, (matched, pool) in controls.items():
                    k = TREATMENTS.index(matched)
                    # outside_pair keeps the seeds it always had, so old runs reproduce.
                    extra = [] if pool == "outside_pair" else [pool_index[pool]]
                    rngs = [
                        np.random.default_rng([seed, *pair, draw, k, i, *extra]) for i in image_ids
                    ]
                    sets[name, draw] = random_control(
                        sets[matched, 0], pair_tokens, rngs, pool, confidence=confidence
                    )
            for (cond, draw), named in sets.items():
                keys = blocked_keys(named, settings.mode)
                for w, window in [(None, settings.layers), *enumerate(windows)]:
                    if keys.any():  # an empty set blocks nothing: the clean predictions stand
                        span = _span(window)
                        resumed = (
                            nullcontext() if prefix is None else prefix.resume(span and span[0])
                        )
                        with resumed:
                            pred = predict_stages(
                                vlm,
                                batch,
                                llm,
                                keys,
                                layers=span,
                                later_only=settings.queries == "after",
                            )
                    else:
                        pred = clean
                    found = pair_counts(pred, labels, ref_correct, pair)
                    if w is None:
                        counts.setdefault((cond, draw), []).append(found)
                    else:
                        add(sweep, (w, cond, draw), found[-1].sum(0))
    n_stages = len(llm_stages)
    per_image = {
        key: np.concatenate(parts, axis=1) if parts else np.zeros((n_stages, 0, 10), np.int64)
        for key, parts in counts.items()
    }
    return ids, per_image, sweep


def _gather_ranks(ids: list[int], counts: dict, sweep: dict) -> tuple[list[int], dict, dict]:
    """Every rank's images and per-image counts joined in image order; sweep counts summed."""
    parts = gather_object((ids, counts, sweep))
    all_ids = [i for part in parts for i in part[0]]
    order = np.argsort(all_ids, kind="stable")
    keys = dict.fromkeys(k for part in parts for k in part[1])
    joined = {
        k: np.concatenate([part[1][k] for part in parts if k in part[1]], axis=1)[:, order]
        for k in keys
    }
    total: dict = {}
    for part in parts:
        for key, value in part[2].items():
            total[key] = total.get(key, 0) + value
    return [all_ids[j] for j in order], joined, total


def _score_pair(
    counts: Mapping[tuple, np.ndarray],
    sweep: Mapping[tuple, np.ndarray],
    conditions: Sequence[str],
    draws: Mapping[str, int],
    stages: Sequence[str],
    windows: int,
) -> tuple[dict, list[dict]]:
    """One pair's counts (see ``_run_pair``) -> its scores.

    Returns:
        ``({condition: {stage: {accuracy, iou, recovery}}}, [{condition: {accuracy, iou}}]``
        (one row per sweep window); random conditions are averaged over their draws.
    """
    scores = {
        c: {
            s: _average([pair_scores(counts[c, d][j]) for d in range(draws[c])])
            for j, s in enumerate(stages)
        }
        for c in conditions
    }
    rows = []
    for w in range(windows):
        row = {}
        for c in conditions:
            cell = _average([pair_scores(sweep[w, c, d]) for d in range(draws[c])])
            row[c] = {"accuracy": cell["accuracy"], "iou": cell["iou"]}
        rows.append(row)
    return scores, rows


def _check(settings: KnockoutConfig, num_layers: int, probed: Sequence[str]) -> None:
    """Refuse settings the config class cannot judge alone (they need the model or the run)."""
    if settings.reference_stage not in probed:
        raise ValueError(
            f"knockout.reference_stage={settings.reference_stage!r} has no clean probe in this "
            f"run; probed stages: {', '.join(probed)}"
        )
    if settings.layers is not None and settings.layers[1] > num_layers:
        raise ValueError(
            f"knockout.layers={list(settings.layers)} goes past the last LLM layer; this model "
            f"has layers 1..{num_layers}"
        )
    for name, low in (("random_controls", 0), ("min_support", 0), ("max_images", 1)):
        value = getattr(settings, name)
        if value is not None and value < low:
            raise ValueError(f"knockout.{name}={value} must be >= {low}")


# --- the run ------------------------------------------------------------------------------------
def run_knockout(
    run: RunDir | str | Path,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    **overrides: Any,
) -> KnockoutSection:
    """The attention-knockout experiment on a probing run; the API behind ``seglens knockout``.

    Reads the run's ``config.yaml``, its clean probes (``probes/causal``, or
    ``probes/bidirectional_image`` for natively bidirectional models) and the reference
    stage's evaluation confusion (``arrays/probing_<condition>.npz``); selects the top-K conflicting
    pairs (``select_pairs``) and, per pair, the evaluation images holding both classes
    (``pair_images``); runs every condition of ``CONDITIONS`` on them and scores every probed
    LLM stage. Queries: the tokens after a key (``knockout.queries="after"``) or every token
    (``"all"``) lose it; the two differ only in natively bidirectional image blocks. Adds the
    ``knockout`` section (``RunDir.put_section``); figures are left to the caller.

    Args:
        run: a probing run (``RunDir`` or its directory).
        vlm: the model to use instead of building the one the config names (must match it).
        progress: show progress bars.
        **overrides: ``KnockoutConfig`` fields, e.g. ``top_k=3, layers=(3, 4)``; None = as saved.

    Returns:
        The ``knockout`` section: pairs, conditions, ``curves`` {condition: {stage: {accuracy,
        iou, recovery}}} averaged over pairs (each pair weighs the same; random conditions are
        first averaged over their draws), ``per_pair``, ``summary_layer`` (the last probed LLM
        layer) and ``window_sweep``.
    """
    from seglens.experiments.common import build_dataset, build_model

    run = RunDir.of(run, **{f"knockout.{k}": v for k, v in overrides.items()})
    causal = run.clean_probing()  # the clean probes (the model's native attention)
    run_dir, config = run.path, run.config
    settings = config.knockout
    vlm = build_model(config.model) if vlm is None else vlm
    probed = list(causal["stages"])
    _check(settings, vlm.num_llm_layers, probed)
    reference = settings.reference_stage
    llm_stages = by_depth(probed)
    if not llm_stages:
        raise ValueError(f"the run probed no LLM stage ({', '.join(probed)}); nothing to score")
    needed = list(dict.fromkeys([reference, *llm_stages]))
    probes = {
        s: load_probe(run_dir / causal["metrics"][s]["probe"]["file"], vlm.device) for s in needed
    }
    reference_confusion = confusion_key(reference, "patch")
    arrays = run.load_arrays(causal.arrays)
    if reference_confusion not in arrays:
        raise ValueError(
            f"{run_dir / causal.arrays} has no {reference_confusion}; rerun the probing"
        )
    dataset = build_dataset(
        config.data, config.data.eval_split, config.data.limit_eval, config.seed
    )
    names = list(dataset.class_names)
    rank, world = rank_world()
    image_ids, labels = _scan_labels(vlm, dataset, config, progress)
    candidates = select_pairs(
        arrays[reference_confusion],
        labels,
        top_k=settings.top_k,
        min_support=settings.min_support,
        max_images=settings.max_images,
        excluded=(skipped := []),
    )
    windows = (
        layer_windows(vlm.num_llm_layers, settings.window_sweep) if settings.window_sweep else []
    )
    conditions, controls = conditions_of(settings)
    draws = {c: settings.random_controls if c in controls else 1 for c in conditions}
    from seglens.analyses.knockout import knockout_forwards_per_image

    per_image = knockout_forwards_per_image(settings, vlm.num_llm_layers)
    n_images = sum(len(pair_images(labels, c["classes"], settings.max_images)) for c in candidates)
    log.info(
        "knockout: %d pairs on %d pair images, at most %d forwards (%d per image; a key set "
        "with nothing to block runs none)",
        len(candidates),
        n_images,
        n_images * per_image,
        per_image,
    )
    pairs, per_pair, sweeps, tested = [], [], [], []
    for cand in candidates:
        pair = tuple(cand["classes"])
        entry = {"classes": list(pair), "names": [names[c] for c in pair]}
        indices = [image_ids[r] for r in pair_images(labels, pair, settings.max_images)]
        desc = f"knockout {entry['names'][0]}/{entry['names'][1]}"
        # Under torchrun each rank runs every W-th image of the pair; counts are joined.
        local = indices[rank::world]
        batches = stream_batches(vlm, dataset, local, config, desc, progress)
        ids, counts, sweep = _run_pair(
            vlm, batches, probes, reference, llm_stages, pair, settings, windows, config.seed
        )
        if world > 1:
            ids, counts, sweep = _gather_ranks(ids, counts, sweep)
        summed = {key: value.sum(axis=1) for key, value in counts.items()}  # (S, 10)
        none = summed["none", 0][0]
        incorrect = int(none[COUNT_FIELDS.index("ref_incorrect")])
        support = int(none[COUNT_FIELDS.index("tokens")])
        entry.update(images=len(indices), support=support, correct=support - incorrect)
        pairs.append({**entry, "incorrect": incorrect, **cand})
        scores, rows = _score_pair(summed, sweep, conditions, draws, llm_stages, len(windows))
        per_pair.append({"classes": list(pair), **scores})
        sweeps.append(rows)
        # (D, I, S, 10) per condition, for the intervals over images.
        stacked = {
            c: np.stack([counts[c, d].transpose(1, 0, 2) for d in range(draws[c])])
            for c in conditions
        }
        tested.append({"images": ids, "counts": stacked})
        log.info(
            "pair %s: %d images, %d tokens (%d incorrect at %s)",
            entry["names"],
            len(indices),
            support,
            incorrect,
            reference,
        )
    section = {
        "status": "tested" if pairs else "nothing_to_test",
        "reason": None,
        "reference_stage": reference,
        "layers": None if settings.layers is None else list(settings.layers),
        "mode": settings.mode,
        "control_pools": list(settings.control_pool) if settings.random_controls else [],
        "pairs": pairs,
        "skipped_pairs": skipped[:20],
        "conditions": conditions,
        "controls": {c: {"matches": m, "pool": pool} for c, (m, pool) in controls.items()},
        "curves": {},
        "per_pair": per_pair,
        "summary_layer": llm_stages[-1],
        "window_sweep": None,
        "differences": None,
        "settings": asdict(settings),
        "seed": config.seed,
    }
    if not pairs:
        section["reason"] = (
            f"no class pair confused at {reference} co-occurs in an evaluation image with >= "
            f"{settings.min_support} of its tokens (knockout.min_support); use more evaluation "
            "images or lower knockout.min_support"
        )
        log.warning("knockout: nothing to test: %s", section["reason"])
    else:
        section["curves"] = {
            c: {s: _average([p[c][s] for p in per_pair]) for s in llm_stages} for c in conditions
        }
        if windows:
            section["window_sweep"] = [
                {"layers": list(window)}
                | {c: _average([rows[w][c] for rows in sweeps]) for c in conditions}
                for w, window in enumerate(windows)
            ]
        section["differences"] = _differences(tested, llm_stages, controls, config)
    section = KnockoutSection.from_dict(section)
    if rank != 0:  # every rank holds the joined counts; one writes
        return section
    if tested:  # the per-image counts, so a later comparison (the twin) can resample them
        run.save_arrays(COUNTS_FILE, **count_arrays(tested, llm_stages))
    return run.put_section("knockout", section)


#: The knockout's per-image counts in a run directory (``count_arrays``).
COUNTS_FILE = "arrays/knockout.npz"


def count_arrays(tested: Sequence[Mapping[str, Any]], stages: Sequence[str]) -> dict:
    """Per tested pair k: ``pair<k>__images`` (I,) evaluation image indices and
    ``pair<k>__<condition>`` (D, I, S, 10) counts; ``stages`` (S,) names the stages."""
    out: dict[str, np.ndarray] = {"stages": np.array(list(stages))}
    for k, pair in enumerate(tested):
        out[f"pair{k}__images"] = np.asarray(pair["images"], dtype=np.int64)
        for condition, table in pair["counts"].items():
            out[f"pair{k}__{condition}"] = np.asarray(table)
    return out


def _differences(
    tested: Sequence[Mapping[str, Any]],
    stages: Sequence[str],
    controls: Mapping[str, tuple[str, str]],
    config: RunConfig,
) -> dict[str, Any]:
    """The ``differences`` section: every treatment minus ``none``, and per control pool the
    treatments minus their matched control and the controls minus ``none``."""
    groups = {"minus_none": {t: (t, "none") for t in TREATMENTS}}
    for pool in dict.fromkeys(pool for _, pool in controls.values()):
        ctrl = {m: c for c, (m, p) in controls.items() if p == pool}
        groups[pool] = {
            "block_correct_minus_control": ("block_correct", ctrl["block_correct"]),
            "block_incorrect_minus_control": ("block_incorrect", ctrl["block_incorrect"]),
            "block_correct_minus_none": ("block_correct", "none"),
            "block_incorrect_minus_none": ("block_incorrect", "none"),
            "control_correct_minus_none": (ctrl["block_correct"], "none"),
            "control_incorrect_minus_none": (ctrl["block_incorrect"], "none"),
        }
    out = knockout_differences(
        tested, stages, groups, n_resamples=config.probe.bootstrap, seed=config.seed
    )
    out["minus_none"] = out.pop("minus_none")
    out["pools"] = {pool: out.pop(pool) for pool in list(groups)[1:]}
    return out
