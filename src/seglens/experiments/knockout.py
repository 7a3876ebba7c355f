"""Attention knockout: which image tokens does the LLM read to refine a pair of confused classes?

The clean probes of a probing run (no retraining) define, at a reference stage (default
``adapter``), which image tokens are *correct* (the probe there predicts their label). For the
top-K class pairs the reference probe confuses most, every evaluation image holding both classes
runs once clean and once per knockout condition: keys at the pair's correct tokens, at its
incorrect tokens, or at seeded random tokens of matched size per image are made unreadable (all
queries, all LLM layers or a window). The clean probes then score every LLM stage on the pair's
tokens: accuracy, 2-class IoU and the recovery of tokens the reference stage got wrong.
``run_knockout`` is the public API behind ``seglens knockout``.

Choices the protocol leaves open: random controls are drawn among the image tokens outside the
pair first (``random_control``). ``knockout.queries="after"`` (default) blocks a key for the
tokens after it (``Knockout(later_only=True)``); ``"all"`` also for the tokens before it. Under
causal attention the two are the same edge set; they differ in natively bidirectional image
blocks (Gemma3, PaliGemma), where earlier image tokens read later ones.
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

from seglens.config import KnockoutConfig, RunConfig, load_config
from seglens.data import SegDataset, iterate_samples
from seglens.distributed import gather_object, rank_world
from seglens.interventions import Knockout, TokenSet, intervene
from seglens.models import VLM, Batch
from seglens.probes import load_probe
from seglens.results import CONFIG, RESULTS, clean_condition, load_arrays, read_json, write_json

__all__ = ["CONDITIONS", "COUNT_FIELDS", "key_sets", "layer_windows", "pair_counts", "pair_images"]
__all__ += ["pair_scores", "predict_stages", "random_control", "run_knockout", "select_pairs"]

log = logging.getLogger(__name__)

CONDITIONS = ("none", "block_correct", "block_incorrect", "random_correct", "random_incorrect")
RANDOM = {"random_correct": "block_correct", "random_incorrect": "block_incorrect"}
# Columns of the (S, 10) count table ``pair_counts`` returns, per stage.
COUNT_FIELDS = (
    "tokens",  # pair tokens scored
    "correct",  # of them predicted as their label
    "inter_a",  # label a and predicted a
    "pred_a",  # predicted a (among the pair's tokens)
    "label_a",  # labelled a
    "inter_b",
    "pred_b",
    "label_b",
    "ref_incorrect",  # pair tokens the reference stage gets wrong
    "recovered",  # of them predicted as their label at this stage
)


# --- selection ----------------------------------------------------------------------------------
def select_pairs(confusion: np.ndarray, *, top_k: int, min_support: int) -> list[dict[str, Any]]:
    """The top-K conflicting class pairs of a confusion matrix.

    A pair {a, b} (a < b) conflicts by ``C[a, b] + C[b, a]`` (tokens of one class predicted as
    the other). Pairs with no conflict, or fewer than ``min_support`` tokens labelled a or b
    (``C[a].sum() + C[b].sum()``), are left out; ties go to the smaller (a, b).

    Args:
        confusion: (C, C) counts, rows true classes, columns predictions.
        top_k: K, pairs to return at most.
        min_support: minimum tokens labelled a or b.

    Returns:
        Up to K ``{"classes": [a, b], "confusion": int, "selection_support": int}``, most
        conflicting first.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a (C, C) matrix, got shape {cm.shape}")
    rows = cm.sum(1)
    candidates = []
    for a in range(len(cm)):
        for b in range(a + 1, len(cm)):
            conflict, support = int(cm[a, b] + cm[b, a]), int(rows[a] + rows[b])
            if conflict > 0 and support >= min_support:
                candidates.append((-conflict, a, b, support))
    return [
        {"classes": [a, b], "confusion": -neg, "selection_support": support}
        for neg, a, b, support in sorted(candidates)[:top_k]
    ]


def pair_images(labels: np.ndarray, pair: Sequence[int], max_images: int | None) -> np.ndarray:
    """Indices of the images whose token labels hold both classes of ``pair``, first ones first.

    Args:
        labels: (M, N) token labels of the M evaluation images (255 = ignore).
        pair: (a, b).
        max_images: keep at most this many (None: all).

    Returns:
        (I,) int64 row indices into ``labels``, ascending.
    """
    a, b = pair
    both = np.flatnonzero((labels == a).any(1) & (labels == b).any(1))
    return both if max_images is None else both[:max_images]


def layer_windows(num_layers: int, size: int) -> list[tuple[int, int]]:
    """Consecutive windows of ``size`` layers over 1..L, stride ``size`` (the last may be short).

    Returns:
        ``[(1, size), (size + 1, 2 * size), ..., (.., L)]``, 1-based and inclusive.
    """
    if size < 1:
        raise ValueError(f"knockout.window_sweep={size} must be >= 1 layers per window")
    return [(lo, min(lo + size - 1, num_layers)) for lo in range(1, num_layers + 1, size)]


# --- key sets -----------------------------------------------------------------------------------
def key_sets(labels: np.ndarray, ref_correct: np.ndarray, pair: Sequence[int]) -> dict:
    """The blocked keys of one pair, per image.

    Args:
        labels: (B, N) token labels.
        ref_correct: (B, N) bool, the reference-stage probe predicts the token's label.
        pair: (a, b).

    Returns:
        ``{"block_correct": (B, N) bool, "block_incorrect": (B, N) bool}``: the pair's tokens
        (labelled a or b) that are correct, resp. incorrect, at the reference stage.
    """
    tokens = np.isin(labels, pair)
    return {"block_correct": tokens & ref_correct, "block_incorrect": tokens & ~ref_correct}


def random_control(
    matched: np.ndarray, pair_tokens: np.ndarray, rngs: Sequence[np.random.Generator]
) -> np.ndarray:
    """Seeded random image tokens, exactly as many per image as ``matched`` holds.

    Tokens are drawn first among the image tokens outside the pair (so that a control never
    blocks the pair's own evidence); only when an image has too few of those, the rest come from
    the pair's tokens outside ``matched``, and last from ``matched`` itself.

    Args:
        matched: (B, N) bool, the set to match in size (e.g. the pair's correct tokens).
        pair_tokens: (B, N) bool, tokens labelled a or b.
        rngs: one generator per image.

    Returns:
        (B, N) bool with ``out[i].sum() == matched[i].sum()`` for every image i.
    """
    out = np.zeros_like(matched, dtype=bool)
    for i, rng in enumerate(rngs):
        need = int(matched[i].sum())
        pools = (~pair_tokens[i], pair_tokens[i] & ~matched[i], matched[i])
        for pool in pools:
            if need == 0:
                break
            idx = np.flatnonzero(pool)
            take = rng.choice(idx, size=min(need, len(idx)), replace=False)
            out[i, take] = True
            need -= len(take)
    return out


# --- scoring ------------------------------------------------------------------------------------
def pair_counts(
    pred: np.ndarray, labels: np.ndarray, ref_correct: np.ndarray, pair: Sequence[int]
) -> np.ndarray:
    """Count what ``pair_scores`` needs, per stage, over the pair's tokens of a batch.

    Args:
        pred: (S, B, N) predicted class per stage.
        labels: (B, N) token labels.
        ref_correct: (B, N) bool, correct at the reference stage (clean model).
        pair: (a, b).

    Returns:
        (S, 10) int64 counts, columns ``COUNT_FIELDS``.
    """
    a, b = pair
    tokens = np.isin(labels, pair)
    lab = labels[tokens]  # (M,)
    p = pred[:, tokens]  # (S, M)
    hit = p == lab
    missed = ~ref_correct[tokens]
    S, M = p.shape
    columns = [np.full(S, M), hit.sum(1)]
    for c in (a, b):
        columns += [(hit & (lab == c)).sum(1), (p == c).sum(1), np.full(S, (lab == c).sum())]
    columns += [np.full(S, missed.sum()), (hit & missed).sum(1)]
    return np.stack(columns, axis=1).astype(np.int64)


def _span(window: Sequence[int] | None) -> tuple[int, ...] | None:
    """(first, last) inclusive -> the layer numbers; None (all layers) stays None."""
    return None if window is None else tuple(range(window[0], window[1] + 1))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def pair_scores(counts: np.ndarray) -> dict[str, float | None]:
    """(10,) counts -> accuracy, 2-class IoU and recovery (None where undefined).

    The IoU of class c counts only the pair's tokens (a prediction outside {a, b} is wrong);
    it is averaged over the classes of the pair with a non-empty union.
    """
    n = dict(zip(COUNT_FIELDS, np.asarray(counts).tolist(), strict=True))
    ious = []
    for c in "ab":
        inter, union = n[f"inter_{c}"], n[f"label_{c}"] + n[f"pred_{c}"] - n[f"inter_{c}"]
        if union > 0:
            ious.append(inter / union)
    return {
        "accuracy": _ratio(n["correct"], n["tokens"]),
        "iou": float(np.mean(ious)) if ious else None,
        "recovery": _ratio(n["recovered"], n["ref_incorrect"]),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _average(scores: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Metric-wise mean over draws or pairs (each weighs the same; None values are skipped)."""
    return {m: _mean([s[m] for s in scores]) for m in scores[0]}


# --- forwards -----------------------------------------------------------------------------------
def predict_stages(
    vlm: VLM, batch: Batch, probes: Mapping[str, Any], keys: np.ndarray | None = None, **spec
) -> np.ndarray:
    """One forward (optionally with keys knocked out) -> every stage's clean-probe prediction.

    Args:
        vlm: the model.
        batch: B images.
        probes: {stage: fitted probe}, in the order of the output.
        keys: (B, N) bool image slots no query may read (None: the plain model).
        **spec: more ``Knockout`` fields, e.g. ``layers=(3, 4)``.

    Returns:
        (S, B, N) int64 predicted classes.
    """
    stages = list(probes)
    context = nullcontext()
    if keys is not None:
        knockout = Knockout(keys=TokenSet.from_mask(np.asarray(keys, bool)), **spec)
        context = intervene(vlm, [knockout])
    with context:
        features = vlm.capture(batch, stages)
    with torch.inference_mode():
        # .to: under device_map a stage may live on another GPU than the probes.
        pred = torch.stack([probes[s].predict(features[s].to(vlm.device)) for s in stages])
    return pred.cpu().numpy()


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
) -> tuple[dict, dict]:
    """Counts of every condition (and random draw) of one pair over its images.

    Per batch: one clean forward (reference stage and LLM stages), then one forward per knocked
    out key set (skipped when no image of the batch has a key in it) and per sweep window.

    Returns:
        ``({(condition, draw): (S, 10)}, {(window, condition, draw): (10,)})`` with S =
        ``len(llm_stages)``; the sweep counts are those of the last of ``llm_stages``.
    """
    stages = list(probes)
    ref_row = stages.index(reference)
    rows = [stages.index(s) for s in llm_stages]
    llm = {s: probes[s] for s in llm_stages}
    counts: dict = {}
    sweep: dict = {}

    def add(table: dict, key: tuple, value: np.ndarray) -> None:
        table[key] = table.get(key, 0) + value

    for batch, image_ids in batches:
        labels = batch.labels.numpy()
        clean = predict_stages(vlm, batch, probes)  # (S_all, B, N)
        ref_correct = clean[ref_row] == labels
        clean = clean[rows]
        none = pair_counts(clean, labels, ref_correct, pair)
        add(counts, ("none", 0), none)
        for w in range(len(windows)):
            add(sweep, (w, "none", 0), none[-1])
        sets = {(c, 0): m for c, m in key_sets(labels, ref_correct, pair).items()}
        pair_tokens = np.isin(labels, pair)
        for draw in range(settings.random_controls):
            for k, (cond, matched) in enumerate(RANDOM.items()):
                rngs = [np.random.default_rng([seed, *pair, draw, k, i]) for i in image_ids]
                sets[cond, draw] = random_control(sets[matched, 0], pair_tokens, rngs)
        for (cond, draw), keys in sets.items():
            for w, window in [(None, settings.layers), *enumerate(windows)]:
                if keys.any():  # an empty set blocks nothing: the clean predictions stand
                    pred = predict_stages(
                        vlm,
                        batch,
                        llm,
                        keys,
                        layers=_span(window),
                        later_only=settings.queries == "after",
                    )
                else:
                    pred = clean
                found = pair_counts(pred, labels, ref_correct, pair)
                if w is None:
                    add(counts, (cond, draw), found)
                else:
                    add(sweep, (w, cond, draw), found[-1])
    return counts, sweep


def _sum_over_ranks(counts: dict, sweep: dict) -> tuple[dict, dict]:
    """Every rank's count tables summed key by key (each rank ran a shard of the images)."""
    total: tuple[dict, dict] = ({}, {})
    for part in gather_object((counts, sweep)):
        for table, local in zip(total, part, strict=True):
            for key, value in local.items():
                table[key] = table.get(key, 0) + value
    return total


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


def _llm_layer(stage: str) -> int | None:
    head, _, tail = stage.partition(".")
    return int(tail) if head == "llm" and tail.isdigit() else None


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
    run_dir: str | Path,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    draw: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """The attention-knockout experiment on a probing run; the API behind ``seglens knockout``.

    Reads the run's ``config.yaml``, its clean probes (``probes/causal``, or
    ``probes/bidirectional_image`` for natively bidirectional models) and the reference
    stage's evaluation confusion (``arrays/probing_<condition>.npz``); selects the top-K conflicting
    pairs (``select_pairs``) and, per pair, the evaluation images holding both classes
    (``pair_images``); runs every condition of ``CONDITIONS`` on them and scores every probed
    LLM stage. Queries: the tokens after a key (``knockout.queries="after"``) or every token
    (``"all"``) lose it; the two differ only in natively bidirectional image blocks. Adds the
    ``knockout`` section to ``results.json`` (re-read right before the atomic write) and redraws
    the run's figures.

    Args:
        run_dir: a probing run directory.
        vlm: the model to use instead of building the one the config names (must match it).
        progress: show progress bars.
        draw: redraw the run's figures afterwards (``seglens run`` draws once, at the end).
        **overrides: ``KnockoutConfig`` fields, e.g. ``top_k=3, layers=(3, 4)``; None = as saved.

    Returns:
        The ``knockout`` section: pairs, conditions, ``curves`` {condition: {stage: {accuracy,
        iou, recovery}}} averaged over pairs (each pair weighs the same; random conditions are
        first averaged over their draws), ``per_pair``, ``summary_layer`` (the last probed LLM
        layer) and ``window_sweep``.
    """
    from seglens.experiments.common import build_dataset, build_model

    run_dir = Path(run_dir)
    results = read_json(run_dir / RESULTS)
    causal = (results.get("probing") or {}).get(clean_condition(results))  # the clean probes
    if not causal:
        raise ValueError(f"{run_dir} has no probing results; run `seglens probe` first")
    config = load_config(run_dir / CONFIG, **{f"knockout.{k}": v for k, v in overrides.items()})
    settings = config.knockout
    vlm = build_model(config.model) if vlm is None else vlm
    probed = list(causal["stages"])
    _check(settings, vlm.num_llm_layers, probed)
    reference = settings.reference_stage
    llm_stages = sorted((s for s in probed if _llm_layer(s) is not None), key=_llm_layer)
    if not llm_stages:
        raise ValueError(f"the run probed no LLM stage ({', '.join(probed)}); nothing to score")
    needed = list(dict.fromkeys([reference, *llm_stages]))
    probes = {
        s: load_probe(run_dir / causal["metrics"][s]["probe"]["file"], vlm.device) for s in needed
    }
    confusion_key = f"confusion__{reference}__patch"
    arrays = load_arrays(run_dir / causal["arrays"])
    if confusion_key not in arrays:
        raise ValueError(f"{run_dir / causal['arrays']} has no {confusion_key}; rerun the probing")
    candidates = select_pairs(
        arrays[confusion_key], top_k=settings.top_k, min_support=settings.min_support
    )
    if not candidates:
        raise ValueError(
            f"no class pair is confused at {reference} with >= {settings.min_support} tokens; "
            "lower knockout.min_support"
        )
    dataset = build_dataset(
        config.data, config.data.eval_split, config.data.limit_eval, config.seed
    )
    names = list(dataset.class_names)
    rank, world = rank_world()
    image_ids, labels = _scan_labels(vlm, dataset, config, progress)
    windows = (
        layer_windows(vlm.num_llm_layers, settings.window_sweep) if settings.window_sweep else []
    )
    conditions = list(CONDITIONS if settings.random_controls else CONDITIONS[:3])
    draws = {c: settings.random_controls if c in RANDOM else 1 for c in conditions}
    pairs, skipped, per_pair, sweeps = [], [], [], []
    for cand in candidates:
        pair = tuple(cand["classes"])
        entry = {"classes": list(pair), "names": [names[c] for c in pair]}
        found = pair_images(labels, pair, settings.max_images)
        if len(found) == 0:
            log.warning("pair %s: no evaluation image holds both classes; skipped", entry["names"])
            skipped.append({**entry, **cand, "reason": "no evaluation image holds both classes"})
            continue
        indices = [image_ids[r] for r in found]
        desc = f"knockout {entry['names'][0]}/{entry['names'][1]}"
        # Under torchrun each rank runs every W-th image of the pair; counts are summed.
        local = indices[rank::world]
        batches = stream_batches(vlm, dataset, local, config, desc, progress)
        counts, sweep = _run_pair(
            vlm, batches, probes, reference, llm_stages, pair, settings, windows, config.seed
        )
        if world > 1:
            counts, sweep = _sum_over_ranks(counts, sweep)
        none = counts["none", 0][0]
        incorrect = int(none[COUNT_FIELDS.index("ref_incorrect")])
        support = int(none[COUNT_FIELDS.index("tokens")])
        entry.update(images=len(indices), support=support, correct=support - incorrect)
        pairs.append({**entry, "incorrect": incorrect, **cand})
        scores, rows = _score_pair(counts, sweep, conditions, draws, llm_stages, len(windows))
        per_pair.append({"classes": list(pair), **scores})
        sweeps.append(rows)
        log.info(
            "pair %s: %d images, %d tokens (%d incorrect at %s)",
            entry["names"],
            len(indices),
            support,
            incorrect,
            reference,
        )
    if not pairs:
        raise ValueError(
            f"none of the {len(candidates)} selected pairs co-occurs in an evaluation image; "
            "raise knockout.top_k or use more evaluation images"
        )
    curves = {c: {s: _average([p[c][s] for p in per_pair]) for s in llm_stages} for c in conditions}
    window_sweep = None
    if windows:
        window_sweep = [
            {"layers": list(window)}
            | {c: _average([rows[w][c] for rows in sweeps]) for c in conditions}
            for w, window in enumerate(windows)
        ]
    section = {
        "reference_stage": reference,
        "layers": None if settings.layers is None else list(settings.layers),
        "pairs": pairs,
        "skipped_pairs": skipped,
        "conditions": conditions,
        "curves": curves,
        "per_pair": per_pair,
        "summary_layer": llm_stages[-1],
        "window_sweep": window_sweep,
        "random_controls_from": "image tokens outside the pair first, then the pair's others",
        "settings": asdict(settings),
        "seed": config.seed,
    }
    if rank != 0:  # every rank holds the summed counts; one writes
        return section
    # Read again right before writing: other analyses may have added sections meanwhile.
    results = read_json(run_dir / RESULTS)
    results["knockout"] = section
    write_json(run_dir / RESULTS, results)
    if draw:
        from seglens.report.figures import draw_all

        draw_all(run_dir)
    return section
