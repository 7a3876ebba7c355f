"""Attention to anchors: do a pair's misclassified image tokens read its correctly classified ones?

The paper's mechanism ("correctly classified tokens steer misclassified neighbours") is otherwise
only inferred from knockouts. Here it is measured: for each conflicting class pair and LLM layer,
the attention mass (mean over heads) that the pair's reference-incorrect tokens put on (i) image
tokens of their own class that the reference probe gets right (``anchors``), (ii) the other image
tokens, (iii) the text tokens and BOS; the same with the reference-correct tokens as queries.
Each share is also divided by what a uniform distribution over the keys the query may read would
give (ratio 1: no preference). The weights are computed on the fly, per layer, from the attention
module's own inputs (hidden states, rotary embeddings, mask), for the query rows of interest
only, so this works under sdpa and never holds a T x T map, let alone one per layer.
``run_attention`` is the public API behind ``seglens attention``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglens.analyses.knockout.measure import _scan_labels, predict_stages, stream_batches
from seglens.analyses.knockout.sets import pair_images, select_pairs
from seglens.distributed import gather_object, rank_world
from seglens.experiments.stats import centred_interval, resample_weights
from seglens.models import VLM, Batch
from seglens.probes import load_probe
from seglens.rundir import RunDir
from seglens.rundir.schema import confusion_key

__all__ = ["CATEGORIES", "QUERY_GROUPS", "attention_rows", "attention_section", "category_mass"]
__all__ += ["attention_keys", "key_category", "measure_attention", "query_chunk", "query_plan"]
__all__ += ["readable_keys", "run_attention"]

log = logging.getLogger(__name__)

CATEGORIES = ("anchors", "other_image", "text")
QUERY_GROUPS = ("incorrect", "correct")


# --- attention weights of chosen query rows ------------------------------------------------------
def _rotary(module: torch.nn.Module) -> Any:
    apply = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if apply is None or not all(hasattr(module, n) for n in ("q_proj", "k_proj", "scaling")):
        raise ValueError(
            f"attention to anchors needs a q_proj/k_proj attention with rotary embeddings; "
            f"{type(module).__name__} is not supported"
        )
    return apply


def readable_keys(
    mask: torch.Tensor | None,
    query_positions: torch.Tensor,
    real: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """(B, Q, T) bool: which keys each chosen query may read.

    Args:
        mask: the 4D mask the attention module received (bool: True = may attend; float:
            additive, 0 = may attend), or None for plain causal attention.
        query_positions: (B, Q) sequence positions of the queries.
        real: (B, T) bool, real (non-padding) tokens.
        sliding_window: the module's window when ``mask`` is None.
    """
    T = real.shape[1]
    if mask is None:
        keys = torch.arange(T, device=real.device)
        ok = keys[None, None, :] <= query_positions[:, :, None]
        if sliding_window is not None:
            ok &= keys[None, None, :] > query_positions[:, :, None] - sliding_window
        return ok & real[:, None, :]
    rows = mask[:, 0].gather(1, query_positions[:, :, None].expand(-1, -1, mask.shape[-1]))
    if rows.dtype == torch.bool:
        return rows
    return rows > torch.finfo(rows.dtype).min / 2


def attention_rows(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    readable: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention probabilities of the chosen query rows, recomputed from the module's inputs.

    Args:
        module: a decoder layer's attention (q_proj, k_proj, optional q_norm/k_norm, rotary).
        hidden_states: (B, T, D) its input (after the layer's input norm).
        position_embeddings: (cos, sin), each (B, T, d).
        readable: (B, Q, T) bool keys each query may read (``readable_keys``).
        query_positions: (B, Q) positions of the queries.
        keys: (B, Hkv, T, d) float32 rotated keys (``attention_keys``), to share them between
            chunks of queries; computed here when None.

    Returns:
        (B, H, Q, T) float32 probabilities; each row sums to 1 over its readable keys.
    """
    apply = _rotary(module)
    B, T, _ = hidden_states.shape
    Q, d = query_positions.shape[1], module.head_dim
    k = attention_keys(module, hidden_states, position_embeddings) if keys is None else keys
    take = query_positions[:, :, None].expand(-1, -1, hidden_states.shape[-1])
    q = module.q_proj(hidden_states.gather(1, take)).view(B, Q, -1, d)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = q.transpose(1, 2)  # (B, H, Q, d)
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)  # (1 or B, T, d) -> (B, T, d)
    rows = query_positions[:, :, None].expand(-1, -1, cos.shape[-1])
    q = apply(q, q, cos.gather(1, rows), sin.gather(1, rows))[0].float()
    H, Hkv = q.shape[1], k.shape[1]
    # Grouped heads read their shared key head without a repeated (B, H, T, d) copy of K.
    q = q.reshape(B, Hkv, (H // Hkv) * Q, d)
    scores = (q @ k.transpose(-1, -2)).view(B, H, Q, T) * module.scaling  # (B, H, Q, T)
    cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill_(~readable[:, None], -math.inf)
    return scores.softmax(-1)


def attention_keys(
    module: torch.nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """(B, T, D) attention input -> (B, Hkv, T, d) float32 rotated keys (one per key head)."""
    apply = _rotary(module)
    B, T, _ = hidden_states.shape
    k = module.k_proj(hidden_states).view(B, T, -1, module.head_dim)
    if hasattr(module, "k_norm"):
        k = module.k_norm(k)
    k = k.transpose(1, 2)
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)
    return apply(k, k, cos, sin)[1].float()


def category_mass(
    probs: torch.Tensor, category: torch.Tensor, readable: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-mean attention mass and uniform-baseline share per key category.

    Args:
        probs: (B, H, Q, T) attention probabilities.
        category: (B, Q, T) integer key category of each key for each query (``CATEGORIES``).
        readable: (B, Q, T) bool.

    Returns:
        ``(mass, uniform)``, each (B, Q, 3): the share of the query's attention on each category
        (rows sum to 1), and the share a uniform distribution over the readable keys gives.
    """
    mean = probs.mean(1)  # (B, Q, T)
    mass = torch.stack([(mean * (category == c)).sum(-1) for c in range(len(CATEGORIES))], -1)
    counts = torch.stack([(readable & (category == c)).sum(-1) for c in range(len(CATEGORIES))], -1)
    counts = counts.float()
    return mass, counts / counts.sum(-1, keepdim=True).clamp_min(1)


def query_plan(
    batch: Batch, labels: np.ndarray, ref_correct: np.ndarray, pair: Sequence[int]
) -> dict[str, torch.Tensor]:
    """The queries (the pair's tokens) of a batch and what each key is to them, compactly.

    Returns:
        ``{"positions": (B, Q) sequence positions (padded with position 0), "valid": (B, Q)
        bool, "correct": (B, Q) bool reference-correct, "query_class": (B, Q) int16,
        "key_class": (B, T) int16 label of each key (-1: not an image token), "key_correct":
        (B, T) bool reference-correct image keys}``; Q is the most pair tokens in an image.
        ``key_category`` expands it to each query's key categories, chunk by chunk on the device
        (a (B, Q, T) int64 plan would be ~43 MB per batch for LLaVA-1.5, ~1 GB for LLaVA-NeXT).
    """
    tokens = np.isin(labels, pair)  # (B, N)
    B = labels.shape[0]
    T = batch.input_ids.shape[1]
    Q = max(1, int(tokens.sum(1).max()))
    slots = np.zeros((B, Q), np.int64)
    valid = np.zeros((B, Q), bool)
    for b in range(B):
        idx = np.flatnonzero(tokens[b])
        slots[b, : len(idx)], valid[b, : len(idx)] = idx, True
    image_pos = batch.image_positions.numpy()  # (B, N)
    key_class = np.full((B, T), -1, np.int16)
    key_correct = np.zeros((B, T), bool)
    np.put_along_axis(key_class, image_pos, labels.astype(np.int16), 1)
    np.put_along_axis(key_correct, image_pos, ref_correct, 1)
    return {
        "positions": torch.from_numpy(np.take_along_axis(image_pos, slots, 1)),
        "valid": torch.from_numpy(valid),
        "correct": torch.from_numpy(np.take_along_axis(ref_correct, slots, 1)),
        "query_class": torch.from_numpy(np.take_along_axis(labels, slots, 1).astype(np.int16)),
        "key_class": torch.from_numpy(key_class),
        "key_correct": torch.from_numpy(key_correct),
    }


def key_category(plan: dict[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    """(B, q, T) int8 category (``CATEGORIES`` index) of every key for the queries ``rows``.

    Anchors of a query are the image keys of its own class that the reference probe gets right;
    other image keys are ``other_image``; non-image keys (text, BOS) are ``text``.
    """
    key_class, query_class = plan["key_class"], plan["query_class"][:, rows]
    anchor = (key_class[:, None, :] == query_class[:, :, None]) & plan["key_correct"][:, None, :]
    image = (key_class >= 0)[:, None, :]
    category = torch.where(anchor, 0, 1).to(torch.int8)
    return category.masked_fill_(~image, 2)


SCORE_CHUNK_BYTES = 128 * 2**20
"""Default size of one chunk of (B, H, q, T) float32 scores in ``measure_attention``."""


def query_chunk(batch: int, heads: int, keys: int, chunk_bytes: int = SCORE_CHUNK_BYTES) -> int:
    """Queries per chunk so that a (batch, heads, q, keys) float32 score block fits
    ``chunk_bytes`` (at least one query)."""
    return max(1, chunk_bytes // (batch * heads * keys * 4))


@contextmanager
def measure_attention(
    layers: Sequence[torch.nn.Module],
    plan: dict[str, torch.Tensor],
    real: torch.Tensor,
    *,
    chunk_bytes: int = SCORE_CHUNK_BYTES,
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """Forward pre-hooks on each decoder layer's attention that reduce its attention to the
    plan's queries at once (nothing per layer is kept but (B, Q, 3) shares); removed on exit.

    The queries are taken in chunks so that one chunk's (B, H, q, T) float32 scores stay under
    ``chunk_bytes``; the rotated keys are computed once per layer and shared by the chunks. The
    plan goes to each layer's device once per batch (not once per layer), and the shares stay on
    the device: the caller reads them back with one copy.

    Yields:
        A list, per layer, of ``category_mass(...)`` results (on the layer's device), filled by
        the forward.
    """
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
    handles = []
    moved: dict[torch.device, dict[str, torch.Tensor]] = {}

    def on(device: torch.device) -> dict[str, torch.Tensor]:
        if device not in moved:
            items = {**plan, "real": real}
            moved[device] = {k: v.to(device, non_blocking=True) for k, v in items.items()}
        return moved[device]

    def hook(index: int):
        def reduce(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            local = on(hidden.device)
            positions, mask = local["positions"], kwargs.get("attention_mask")
            window = getattr(module, "sliding_window", None)
            rope = kwargs.get("position_embeddings")
            keys = attention_keys(module, hidden, rope)
            B, T = hidden.shape[:2]
            heads = module.q_proj.out_features // module.head_dim
            step = query_chunk(B, heads, T, chunk_bytes)
            parts = []
            for start in range(0, positions.shape[1], step):
                rows = slice(start, start + step)
                readable = readable_keys(mask, positions[:, rows], local["real"], window)
                probs = attention_rows(module, hidden, rope, readable, positions[:, rows], keys)
                parts.append(category_mass(probs, key_category(local, rows), readable))
                del probs, readable
            out[index] = tuple(torch.cat(p, 1) for p in zip(*parts, strict=True))

        return reduce

    try:
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            handles.append(attn.register_forward_pre_hook(hook(i), with_kwargs=True))
        yield out
    finally:
        for handle in handles:
            handle.remove()


# --- one pair -------------------------------------------------------------------------------------
def _measure_pair(
    vlm: VLM,
    batches: Iterator[tuple[Batch, list[int]]],
    probe: Any,
    reference: str,
    pair: Sequence[int],
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Per image of the pair: summed attention shares and uniform shares per layer, query group
    and category, and the query counts. Two forwards per batch: the reference probe's
    predictions, then the measured one (any active intervention applies to both)."""
    layers = vlm.family.decoder_layers()
    L = len(layers)
    ids: list[int] = []
    parts: dict[str, list[np.ndarray]] = {"mass": [], "uniform": [], "queries": []}
    for batch, image_ids in batches:
        ids += image_ids
        labels = batch.labels.numpy()
        ref_correct = predict_stages(vlm, batch, {reference: probe}, masked=False)[0] == labels
        plan = query_plan(batch, labels, ref_correct, pair)
        with measure_attention(layers, plan, batch.attention_mask.bool()) as out:
            vlm.capture(batch, [f"llm.{L}"])  # every layer runs and is measured
        home = out[0][0].device  # one host copy per batch, whatever the layers' devices
        shares = torch.stack([torch.stack(o).to(home, non_blocking=True) for o in out]).cpu()
        groups = torch.stack([plan["valid"] & ~plan["correct"], plan["valid"] & plan["correct"]])
        sel = groups.float()[:, None, :, :, None]  # (2, 1, B, Q, 1)
        mass = (shares[:, 0][None] * sel).sum(3)  # (2, L, B, 3)
        uniform = (shares[:, 1][None] * sel).sum(3)
        parts["mass"].append(mass.permute(2, 1, 0, 3).double().numpy())  # (B, L, 2, 3)
        parts["uniform"].append(uniform.permute(2, 1, 0, 3).double().numpy())
        parts["queries"].append(groups.sum(2).T.numpy())  # (B, 2)
    shapes = {"mass": (0, L, 2, 3), "uniform": (0, L, 2, 3), "queries": (0, 2)}
    return ids, {k: np.concatenate(v) if v else np.zeros(shapes[k]) for k, v in parts.items()}


def _gather(ids: list[int], tables: dict[str, np.ndarray]) -> tuple[list[int], dict]:
    parts = gather_object((ids, tables))
    all_ids = [i for p in parts for i in p[0]]
    order = np.argsort(all_ids, kind="stable")
    joined = {k: np.concatenate([p[1][k] for p in parts])[order] for k in tables}
    return [all_ids[j] for j in order], joined


# --- results ----------------------------------------------------------------------------------
def _cells(mass: np.ndarray, uniform: np.ndarray, queries: float) -> dict[str, Any]:
    """(3,) summed shares and uniform shares over ``queries`` queries -> plain JSON."""
    if queries == 0:
        return {"queries": 0, "share": None, "uniform": None, "ratio": None}
    share, base = mass / queries, uniform / queries
    ratio = [float(s / u) if u > 0 else None for s, u in zip(share, base, strict=True)]
    return {
        "queries": int(queries),
        "share": dict(zip(CATEGORIES, share.tolist(), strict=True)),
        "uniform": dict(zip(CATEGORIES, base.tolist(), strict=True)),
        "ratio": dict(zip(CATEGORIES, ratio, strict=True)),
    }


def attention_section(
    measured: Sequence[dict[str, Any]],
    stages: Sequence[str],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``attention`` results section from per-image measurements.

    Args:
        measured: per pair ``{"classes", "names", "images": ids (I,), "mass": (I, L, 2, 3),
            "uniform": (I, L, 2, 3), "queries": (I, 2)}`` (query groups ``QUERY_GROUPS``).
        stages: the L layer names ``llm.1..llm.L``.

    Returns:
        ``{"categories", "query_groups", "pairs": [{classes, names, images, layers: {stage:
        {group: {queries, share, uniform, ratio}}}}], "pooled": {stage: {group: {...,
        "anchor_ratio": {estimate, low, high, n_images}}}}, "anchor_layers": {group: [stages
        whose anchor ratio interval lies above 1]}, "statement"}``. Pooled values sum the
        queries of every pair; the anchor ratio's interval resamples the evaluation images.
    """
    pairs = []
    for m in measured:
        layers = {}
        for j, s in enumerate(stages):
            layers[s] = {
                g: _cells(
                    m["mass"][:, j, k].sum(0),
                    m["uniform"][:, j, k].sum(0),
                    m["queries"][:, k].sum(),
                )
                for k, g in enumerate(QUERY_GROUPS)
            }
        entry = {k: m[k] for k in ("classes", "names")} | {"images": len(m["images"])}
        pairs.append(entry | {"layers": layers})
    images = sorted({int(i) for m in measured for i in m["images"]})
    col = {i: j for j, i in enumerate(images)}
    n, L = len(images), len(stages)
    mass, uniform, queries = np.zeros((n, L, 2, 3)), np.zeros((n, L, 2, 3)), np.zeros((n, 2))
    for m in measured:
        rows = [col[int(i)] for i in m["images"]]
        np.add.at(mass, rows, m["mass"])
        np.add.at(uniform, rows, m["uniform"])
        np.add.at(queries, rows, m["queries"])
    weights = resample_weights(n, n_resamples, seed) if n and n_resamples else np.zeros((0, n))
    pooled, anchor_layers = {}, {g: [] for g in QUERY_GROUPS}
    for j, s in enumerate(stages):
        pooled[s] = {}
        for k, g in enumerate(QUERY_GROUPS):
            cell = _cells(mass[:, j, k].sum(0), uniform[:, j, k].sum(0), queries[:, k].sum())
            with np.errstate(invalid="ignore", divide="ignore"):
                values = (weights @ mass[:, j, k, 0]) / (weights @ uniform[:, j, k, 0])
            estimate = (cell["ratio"] or {}).get("anchors")
            low, high = centred_interval(estimate, values, confidence)
            cell["anchor_ratio"] = {"estimate": estimate, "low": low, "high": high, "n_images": n}
            if low is not None and low > 1:
                anchor_layers[g].append(s)
            pooled[s][g] = cell
    statement = (
        f"Reference-incorrect tokens read same-class anchors above the uniform baseline (95% "
        f"interval of the ratio above 1) at {len(anchor_layers['incorrect'])} of {L} LLM layers"
        + (f" ({', '.join(anchor_layers['incorrect'])})" if anchor_layers["incorrect"] else "")
        + f"; reference-correct tokens at {len(anchor_layers['correct'])} of {L}."
    )
    return {
        "categories": list(CATEGORIES),
        "query_groups": list(QUERY_GROUPS),
        "pairs": pairs,
        "pooled": pooled,
        "anchor_layers": anchor_layers,
        "statement": statement if measured else "no pair to measure",
        "n_resamples": n_resamples,
        "confidence": confidence,
        "seed": seed,
    }


# --- the run ------------------------------------------------------------------------------------
def run_attention(
    run: RunDir | str | Path,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Attention to anchors on a probing run; the API behind ``seglens attention``.

    The pairs are those of the run's knockout section when it tested some, else the knockout's
    selection rule (``select_pairs`` with the run's ``knockout`` settings); each pair's images
    are the knockout's (the first ``knockout.max_images`` holding both classes). Adds the
    ``attention`` section (``attention_section``, through ``RunDir.put_section``); figures are
    left to the caller. ``overrides`` are ``KnockoutConfig`` fields (the pair selection).

    Returns:
        The ``attention`` section.
    """
    from seglens.experiments.common import build_dataset, build_model

    run = RunDir.of(run, **{f"knockout.{k}": v for k, v in overrides.items()})
    clean = run.clean_probing()  # the clean probes (the model's native attention)
    run_dir, config, results = run.path, run.config, run.results()
    settings = config.knockout
    reference = settings.reference_stage
    if reference not in clean["stages"]:
        raise ValueError(
            f"knockout.reference_stage={reference!r} has no clean probe in {run_dir}; probed "
            f"stages: {', '.join(clean['stages'])}"
        )
    vlm = build_model(config.model) if vlm is None else vlm
    _rotary(vlm.family.decoder_layers()[0].self_attn)  # refuse an unsupported family up front
    probe = load_probe(run_dir / clean["metrics"][reference]["probe"]["file"], vlm.device)
    dataset = build_dataset(
        config.data, config.data.eval_split, config.data.limit_eval, config.seed
    )
    names = list(dataset.class_names)
    image_ids, labels = _scan_labels(vlm, dataset, config, progress)
    knockout = results.get("knockout") or {}
    if knockout.get("pairs"):
        chosen = [p["classes"] for p in knockout["pairs"]]
    else:
        confusion = run.load_arrays(clean.arrays)[confusion_key(reference, "patch")]
        chosen = [
            p["classes"]
            for p in select_pairs(
                confusion,
                labels,
                top_k=settings.top_k,
                min_support=settings.min_support,
                max_images=settings.max_images,
            )
        ]
    rank, world = rank_world()
    measured = []
    for pair in chosen:
        indices = [image_ids[r] for r in pair_images(labels, pair, settings.max_images)]
        desc = f"attention {names[pair[0]]}/{names[pair[1]]}"
        batches = stream_batches(vlm, dataset, indices[rank::world], config, desc, progress)
        ids, tables = _measure_pair(vlm, batches, probe, reference, pair)
        if world > 1:
            ids, tables = _gather(ids, tables)
        measured.append({"classes": list(pair), "names": [names[c] for c in pair]})
        measured[-1] |= {"images": ids, **tables}
    stages = [f"llm.{i}" for i in range(1, vlm.num_llm_layers + 1)]
    section = attention_section(
        measured, stages, n_resamples=config.probe.bootstrap, seed=config.seed
    )
    section["reference_stage"] = reference
    log.info("attention: %s", section["statement"])
    if rank != 0:
        return section
    return run.put_section("attention", section)
