"""The pieces of the knockout protocol that need no model: which pairs, which keys, what counts.

Pairs are ranked by symmetric confusion at the reference stage among the pairs that co-occur in
evaluation images with enough support (a pair no image holds cannot be tested). Key sets are the
pair's reference-correct and reference-incorrect tokens and random controls of matched size per
image, drawn from a chosen pool (``CONTROL_POOLS``). ``mode`` decides what a set does: ``block``
makes it unreadable, ``keep_only`` leaves only it readable among the image tokens. Counts are kept
per image so that ``knockout_differences`` can put paired bootstrap intervals over images on every
condition's difference to ``none`` and to its matched control.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from seglens.experiments.stats import centred_interval, resample_weights

__all__ = ["CONTROL_POOLS", "COUNT_FIELDS", "MODES", "blocked_keys", "control_name", "key_sets"]
__all__ += ["knockout_differences", "layer_windows", "pair_counts", "pair_images", "pair_scores"]
__all__ += ["MATCHED_POOLS", "confidence_matched", "random_control", "select_pairs"]
__all__ += ["sink_key_sets"]

#: Pools of the plain random controls (matched in size only) ...
CONTROL_POOLS = ("outside_pair", "pair", "image")
#: ... and of the controls matched in what the clean probe sees (opt-in: they need its scores).
MATCHED_POOLS = ("confidence",)
MODES = ("block", "keep_only")
# Columns of the (..., 10) count tables ``pair_counts`` returns.
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


def control_name(matched: str, pool: str) -> str:
    """``random_correct`` (pool outside_pair, the historical name), ``random_correct_pair``..."""
    base = matched.replace("block_", "random_")
    return base if pool == "outside_pair" else f"{base}_{pool}"


# --- selection ----------------------------------------------------------------------------------
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


def select_pairs(
    confusion: np.ndarray,
    labels: np.ndarray,
    *,
    top_k: int,
    min_support: int,
    max_images: int | None = None,
    excluded: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The top-K conflicting class pairs that can be tested.

    A pair {a, b} (a < b) conflicts by ``C[a, b] + C[b, a]`` (tokens of one class predicted as
    the other, at the reference stage). Only pairs that co-occur in evaluation images compete:
    their support is the number of tokens labelled a or b in those images (the first
    ``max_images`` of them, the ones the knockout runs on), and it must reach ``min_support``.
    Pairs with no conflict are left out; ties go to the smaller (a, b).

    Args:
        confusion: (C, C) counts, rows true classes, columns predictions.
        labels: (M, N) token labels of the evaluation images (255 = ignore).
        top_k: K, pairs to return at most.
        min_support: minimum tokens labelled a or b in the co-occurring images.
        max_images: cap on the images per pair (None: all).
        excluded: if given, receives the conflicting pairs the support rule left out (with
            ``reason``), most conflicting first.

    Returns:
        Up to K ``{"classes": [a, b], "confusion": int, "selection_support": int,
        "cooccurring_images": int}``, most conflicting first.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a (C, C) matrix, got shape {cm.shape}")
    labels = np.asarray(labels)
    C = len(cm)
    # (M, C) tokens of each class per image, once: a pair's images and support are column ops.
    flat = np.where(labels < C, labels, C).astype(np.int64)
    offsets = np.arange(len(labels))[:, None] * (C + 1)
    per_image = np.bincount((flat + offsets).ravel(), minlength=len(labels) * (C + 1))
    per_image = per_image.reshape(len(labels), C + 1)[:, :C]
    candidates, left = [], []
    for a in range(C):
        for b in range(a + 1, C):
            conflict = int(cm[a, b] + cm[b, a])
            if conflict == 0:
                continue
            rows = np.flatnonzero((per_image[:, a] > 0) & (per_image[:, b] > 0))[:max_images]
            support = int(per_image[rows, a].sum() + per_image[rows, b].sum())
            if len(rows) and support >= min_support:
                candidates.append((-conflict, a, b, support, len(rows)))
            elif excluded is not None:
                reason = (
                    "no evaluation image holds both classes"
                    if not len(rows)
                    else f"{support} tokens in the co-occurring images < min_support"
                )
                left.append((-conflict, a, b, support, len(rows), reason))
    if excluded is not None:
        excluded += [
            {"classes": [a, b], "confusion": -neg, "selection_support": s}
            | {"cooccurring_images": n, "reason": why}
            for neg, a, b, s, n, why in sorted(left)
        ]
    return [
        {"classes": [a, b], "confusion": -neg, "selection_support": s, "cooccurring_images": n}
        for neg, a, b, s, n in sorted(candidates)[:top_k]
    ]


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
    """The named key sets of one pair, per image.

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
    matched: np.ndarray,
    pair_tokens: np.ndarray,
    rngs: Sequence[np.random.Generator],
    pool: str = "outside_pair",
    confidence: np.ndarray | None = None,
) -> np.ndarray:
    """Seeded random image tokens, exactly as many per image as ``matched`` holds.

    Pools:
        ``outside_pair``: first among the image tokens outside the pair (so that a control never
        removes the pair's own evidence); only when an image has too few of those, the rest
        come from the pair's tokens outside ``matched``, and last from ``matched`` itself.
        ``pair``: among the pair's own tokens (correct or not), the matched set included: it
        removes as much of the pair's evidence as the treatment, whatever the tokens' status.
        ``image``: among all the image tokens.

    Args:
        matched: (B, N) bool, the set to match in size (e.g. the pair's correct tokens).
        pair_tokens: (B, N) bool, tokens labelled a or b (``matched`` is inside it).
        rngs: one generator per image.
        pool: one of ``CONTROL_POOLS``.

        ``confidence``: tokens outside ``matched`` matched one to one on ``confidence`` (see
        ``confidence_matched``).

    Returns:
        (B, N) bool with ``out[i].sum() == matched[i].sum()`` for every image i.
    """
    if pool not in CONTROL_POOLS + MATCHED_POOLS:
        raise ValueError(
            f"knockout control pool {pool!r} is not one of {CONTROL_POOLS + MATCHED_POOLS}"
        )
    if pool == "confidence":
        if confidence is None:
            raise ValueError("the confidence control pool needs the tokens' confidence (B, N)")
        rows = [confidence_matched(matched[i], confidence[i], rng) for i, rng in enumerate(rngs)]
        return np.stack(rows) if rows else np.zeros_like(matched, dtype=bool)
    out = np.zeros_like(matched, dtype=bool)
    for i, rng in enumerate(rngs):
        need = int(matched[i].sum())
        if pool == "outside_pair":
            pools = (~pair_tokens[i], pair_tokens[i] & ~matched[i], matched[i])
        elif pool == "pair":
            pools = (pair_tokens[i] | matched[i],)
        else:
            pools = (np.ones_like(matched[i], dtype=bool),)
        for candidates in pools:
            if need == 0:
                break
            idx = np.flatnonzero(candidates & ~out[i])
            take = rng.choice(idx, size=min(need, len(idx)), replace=False)
            out[i, take] = True
            need -= len(take)
    return out


def confidence_matched(
    matched: np.ndarray, confidence: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A control of one image matched to ``matched`` in the clean probe's confidence.

    The confound it removes: the reference-correct tokens are the ones the clean probe reads most
    confidently (the clearest, most class-typical patches), so blocking them removes the most
    readable context whatever their class; a random control of equal size removes less of it.
    Here each token of ``matched`` (in random order) takes the not yet taken token outside
    ``matched`` whose confidence is nearest its own (ties broken at random), so the control has
    the blocked set's confidence distribution as far as the image's other tokens allow; what
    blocking the correct tokens does beyond it is what their being correct adds. Only when the
    image has too few other tokens does the rest come from ``matched`` itself.

    Args:
        matched: (N,) bool, the set to match (e.g. the pair's reference-correct tokens).
        confidence: (N,) the clean probe's confidence per token at the reference stage (max
            softmax probability).
        rng: the image's generator.

    Returns:
        (N,) bool, disjoint from ``matched`` where possible, with ``matched.sum()`` tokens.
    """
    matched = np.asarray(matched, dtype=bool)
    confidence = np.asarray(confidence, dtype=np.float64)
    out = np.zeros_like(matched)
    free = rng.permutation(np.flatnonzero(~matched))  # random order breaks ties at random
    for token in rng.permutation(np.flatnonzero(matched)):
        if not free.size:
            break
        j = int(np.argmin(np.abs(confidence[free] - confidence[token])))
        out[free[j]] = True
        free = np.delete(free, j)
    short = int(matched.sum()) - int(out.sum())
    if short:
        out[rng.choice(np.flatnonzero(matched), size=short, replace=False)] = True
    return out


def sink_key_sets(sinks: np.ndarray, rngs: Sequence[np.random.Generator]) -> dict:
    """Sink tokens as a knockout source set, with its size-matched random control.

    Args:
        sinks: (B, N) bool, the sink tokens of each image (``seglens.readouts.sinks.flag_sinks``
            at a reference stage).
        rngs: one generator per image.

    Returns:
        ``{"block_sinks": sinks, "random_sinks": (B, N) bool}``: the control holds as many
        tokens per image as the sinks, drawn among the image's other tokens (only an image that
        is nearly all sinks gets sinks in its control).
    """
    sinks = np.asarray(sinks, dtype=bool)
    return {"block_sinks": sinks, "random_sinks": random_control(sinks, sinks, rngs)}


def blocked_keys(named: np.ndarray, mode: str) -> np.ndarray:
    """(B, N) bool set of a condition -> the image slots made unreadable under ``mode``.

    ``block``: the set itself. ``keep_only``: every image slot outside it (only the set stays
    readable among the image tokens; text and BOS stay readable either way).
    """
    if mode not in MODES:
        raise ValueError(f"knockout.mode={mode!r} is not one of {MODES}")
    named = np.asarray(named, dtype=bool)
    return named if mode == "block" else ~named


# --- scoring ------------------------------------------------------------------------------------
def pair_counts(
    pred: np.ndarray, labels: np.ndarray, ref_correct: np.ndarray, pair: Sequence[int]
) -> np.ndarray:
    """Count what ``pair_scores`` needs, per stage and image, over the pair's tokens of a batch.

    Args:
        pred: (S, B, N) predicted class per stage.
        labels: (B, N) token labels.
        ref_correct: (B, N) bool, correct at the reference stage (clean model).
        pair: (a, b).

    Returns:
        (S, B, 10) int64 counts, columns ``COUNT_FIELDS``; summed over B, one batch's totals.
    """
    a, b = pair
    tokens = np.isin(labels, pair)  # (B, N)
    hit = (pred == labels[None]) & tokens[None]  # (S, B, N)
    missed = tokens & ~ref_correct
    S = pred.shape[0]

    def per_image(mask: np.ndarray) -> np.ndarray:  # (B, N) or (S, B, N) -> (S, B)
        return np.broadcast_to(mask.sum(-1), (S, labels.shape[0]))

    columns = [per_image(tokens), per_image(hit)]
    for c in (a, b):
        is_c = labels == c
        columns += [per_image(hit & is_c), per_image((pred == c) & tokens), per_image(is_c)]
    columns += [per_image(missed), per_image(hit & missed)]
    return np.stack(columns, axis=-1).astype(np.int64)


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


# --- intervals ----------------------------------------------------------------------------------
def _pair_accuracy(weights: np.ndarray, table: np.ndarray) -> np.ndarray:
    """(R, I) image weights, (D, I, S, 10) counts of D draws -> (R, S) accuracy, draw mean."""
    correct = np.einsum("ri,dis->rds", weights, table[..., 1].astype(np.float64))
    tokens = np.einsum("ri,dis->rds", weights, table[..., 0].astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(tokens > 0, correct / np.where(tokens > 0, tokens, 1), np.nan)
        return _nan_mean_axis1(acc)


def _nan_mean_axis1(x: np.ndarray) -> np.ndarray:
    """(R, D, S) -> (R, S) mean over the defined draws (nan where none is)."""
    defined = np.isfinite(x)
    count = defined.sum(1)
    return np.where(count > 0, np.where(defined, x, 0.0).sum(1) / np.maximum(count, 1), np.nan)


def knockout_differences(
    pairs: Sequence[Mapping[str, Any]],
    stages: Sequence[str],
    contrasts: Mapping[str, Mapping[str, tuple[str, str]]],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired intervals over images on knockout accuracy differences, per group and stage.

    The statistic of a contrast (c1, c2) is the mean over pairs (each pair weighs the same, as in
    the ``curves``) of the pair-token accuracy under c1 minus under c2; random controls are first
    averaged over their draws. A resample draws the evaluation images (the union of the pairs'
    images) with replacement, once for all pairs, conditions and stages, so every difference is
    paired; a pair none of whose images is drawn leaves that resample's mean.

    Args:
        pairs: per tested pair ``{"images": (I,) dataset indices, "counts": {condition:
            (D, I, S, 10) per-draw, per-image, per-stage counts}}``.
        stages: the S stage names.
        contrasts: ``{group: {name: (condition, minus_condition)}}``.
        n_resamples, confidence, seed: of the bootstrap (0: estimates only).

    Returns:
        ``{"metric": "accuracy", "n_resamples", "confidence", "seed", "n_images", group:
        {stage: {name: {estimate, low, high, n_images}}}}``.
    """
    images = sorted({int(i) for p in pairs for i in p["images"]})
    n = len(images)
    column = {image: j for j, image in enumerate(images)}
    out: dict[str, Any] = {"metric": "accuracy", "n_resamples": n_resamples}
    out |= {"confidence": confidence, "seed": seed, "n_images": n}
    full = np.ones((1, n))
    weights = resample_weights(n, n_resamples, seed) if n and n_resamples else np.zeros((0, n))
    needed = {c for group in contrasts.values() for pair in group.values() for c in pair}
    acc: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {c: [] for c in needed}
    for p in pairs:
        cols = [column[int(i)] for i in p["images"]]
        for c in needed:
            table = np.asarray(p["counts"][c])
            acc[c].append(
                (_pair_accuracy(full[:, cols], table), _pair_accuracy(weights[:, cols], table))
            )
    for group, named in contrasts.items():
        out[group] = {s: {} for s in stages}
        for name, (c1, c2) in named.items():
            # (P, 1, S) full-sample and (P, R, S) resampled per-pair differences -> pair mean.
            diffs = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(acc[c1], acc[c2], strict=True)]
            est, res = (_pair_mean([d[k] for d in diffs], len(stages)) for k in (0, 1))
            for j, stage in enumerate(stages):
                value = float(est[0, j]) if len(est) else float("nan")
                low, high = centred_interval(value, res[:, j], confidence)
                out[group][stage][name] = {
                    "estimate": value if np.isfinite(value) else None,
                    "low": low,
                    "high": high,
                    "n_images": n,
                }
    return out


def _pair_mean(per_pair: Sequence[np.ndarray], n_stages: int) -> np.ndarray:
    """Mean over pairs of (R, S) values, nan-skipping (nan where no pair is defined)."""
    if not per_pair:
        return np.full((0, n_stages), np.nan)
    stacked = np.stack(per_pair)  # (P, R, S)
    defined = np.isfinite(stacked)
    total = np.where(defined, stacked, 0.0).sum(0)
    count = defined.sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
