"""Which heads carry the anchor effect? Per-head attention to anchors, and top-k head knockouts.

For the knockout's class pairs, the attention share each head of each LLM layer gives the pair's
tokens' same-class anchors (the image tokens of their class the reference probe gets right) is
measured on the fly as in ``seglens.analyses.attention.measure``, on the training split by default
(so the heads are not chosen on the images that test them), and the heads are ranked by it. On
the evaluation images the pair tokens' edges to their anchors are then removed in the top-k
heads only (``head_knockout``: a (B, H, T, T) mask on those layers, every other head's mask
untouched), in k random heads drawn from the same layers, and in every head; the clean probes
score every LLM stage, with paired intervals over images. ``run_heads`` is the public API behind
``seglens heads``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch

from seglens.analyses.attention.measure import (
    SCORE_CHUNK_BYTES,
    attention_keys,
    attention_rows,
    key_category,
    query_chunk,
    query_plan,
    readable_keys,
)
from seglens.distributed import is_main, rank_world
from seglens.experiments.stats import centred_interval, resample_weights
from seglens.interventions import (
    BidirectionalImage,
    BidirectionalPrefix,
    Knockout,
    allowed_edges,
    intervene,
)
from seglens.models import VLM, Batch

__all__ = ["anchor_specs", "draw_random_heads", "head_knockout", "head_shares", "num_heads"]
__all__ += ["rank_heads", "run_heads"]

log = logging.getLogger(__name__)


def num_heads(vlm: VLM) -> int:
    """H, query heads per LLM layer."""
    attn = vlm.family.decoder_layers()[0].self_attn
    return attn.q_proj.out_features // attn.head_dim


# --- per-head attention to anchors ------------------------------------------------------------
@contextmanager
def head_shares(
    layers: Sequence[torch.nn.Module],
    plan: dict[str, torch.Tensor],
    real: torch.Tensor,
    *,
    chunk_bytes: int = SCORE_CHUNK_BYTES,
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """Forward pre-hooks on each layer's attention reducing it, per head, to the anchors.

    Yields:
        Per layer ``(mass (B, H), uniform (B,))``: the attention the plan's valid queries put on
        their anchors, summed over the queries of each image, per head; and what a uniform
        distribution over each query's readable keys would give, summed alike.
    """
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
    handles = []

    def hook(index: int):
        def reduce(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            local = {k: v.to(hidden.device) for k, v in {**plan, "real": real}.items()}
            positions, mask = local["positions"], kwargs.get("attention_mask")
            rope = kwargs.get("position_embeddings")
            keys = attention_keys(module, hidden, rope)
            B, T = hidden.shape[:2]
            heads = module.q_proj.out_features // module.head_dim
            step = query_chunk(B, heads, T, chunk_bytes)
            mass = torch.zeros(B, heads, device=hidden.device)
            uniform = torch.zeros(B, device=hidden.device)
            window = getattr(module, "sliding_window", None)
            for start in range(0, positions.shape[1], step):
                rows = slice(start, start + step)
                readable = readable_keys(mask, positions[:, rows], local["real"], window)
                probs = attention_rows(module, hidden, rope, readable, positions[:, rows], keys)
                anchor = key_category(local, rows) == 0  # (B, q, T)
                valid = local["valid"][:, rows].float()  # (B, q)
                mass += ((probs * anchor[:, None]).sum(-1) * valid[:, None]).sum(-1)
                share = (readable & anchor).sum(-1) / readable.sum(-1).clamp_min(1)
                uniform += (share * valid).sum(-1)
            out[index] = (mass, uniform)

        return reduce

    try:
        for i, layer in enumerate(layers):
            handles.append(layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True))
        yield out
    finally:
        for handle in handles:
            handle.remove()


def rank_heads(
    mass: np.ndarray,
    uniform: np.ndarray,
    queries: np.ndarray,
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Pooled per-head anchor share, its ratio to the uniform share with an interval, ranked.

    Args:
        mass: (I, L, H) per image, summed anchor attention of its pair tokens.
        uniform: (I, L) per image, summed uniform anchor share.
        queries: (I,) pair tokens per image.

    Returns:
        ``{"share": (L, H) list, "ratio": (L, H) list, "ranking": [{"layer", "head", "share",
        "ratio", "low", "high"}, ...] best first}`` (layers 1-based; the interval is on the
        ratio, resampling images; the ranking is by share, which within the measured data
        orders heads as the ratio does, the uniform share being one per layer).
    """
    total = max(float(queries.sum()), 1.0)
    share = mass.sum(0) / total  # (L, H)
    base = uniform.sum(0) / total  # (L,)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(base[:, None] > 0, share / base[:, None], np.nan)
    n = mass.shape[0]
    weights = resample_weights(n, n_resamples, seed) if n and n_resamples else np.zeros((0, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        resampled = np.einsum("ri,ilh->rlh", weights, mass) / (weights @ uniform)[:, :, None]
    H = share.shape[1]
    ranking = []
    for flat in np.argsort(-share, axis=None, kind="stable"):
        layer, head = divmod(int(flat), H)
        value = float(ratio[layer, head]) if np.isfinite(ratio[layer, head]) else None
        low, high = centred_interval(value, resampled[:, layer, head], confidence)
        ranking.append(
            {
                "layer": layer + 1,
                "head": head,
                "share": float(share[layer, head]),
                "ratio": value,
                "low": low,
                "high": high,
            }
        )
    return {
        "share": share.tolist(),
        "ratio": [[None if not np.isfinite(v) else float(v) for v in row] for row in ratio],
        "ranking": ranking,
    }


def draw_random_heads(
    top: Sequence[tuple[int, int]], num_heads: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """k random heads from the layers of ``top``, as many per layer as ``top`` has there.

    In each layer the heads are drawn from those not in ``top`` when there are enough; when the
    layer has too few, all of them are taken and the rest drawn from its top heads (with k = all
    heads of those layers, the control is the treatment).
    """
    chosen = []
    for layer in sorted({layer for layer, _ in top}):
        in_top = sorted(h for lay, h in top if lay == layer)
        others = [h for h in range(num_heads) if h not in in_top]
        count = len(in_top)
        if len(others) >= count:
            picked = rng.choice(others, count, replace=False).tolist()
        else:
            picked = others + rng.choice(in_top, count - len(others), replace=False).tolist()
        chosen += [(layer, int(h)) for h in picked]
    return chosen


# --- per-head knockout --------------------------------------------------------------------------
def anchor_specs(labels: np.ndarray, ref_correct: np.ndarray, pair: Sequence[int]):
    """Knockout specs (and their (B, N) sets): each class's pair tokens may not read the tokens
    of the same class the reference probe gets right (their anchors)."""
    specs, sets = [], {}
    for c in pair:
        tokens = labels == c
        sets[f"tokens_{c}"] = torch.from_numpy(tokens)
        sets[f"anchors_{c}"] = torch.from_numpy(tokens & ref_correct)
        specs.append(Knockout(keys=f"anchors_{c}", queries=f"tokens_{c}"))
    return specs, sets


@contextmanager
def head_knockout(
    vlm: VLM,
    batch: Batch,
    specs: Sequence[Knockout],
    heads: Mapping[int, Sequence[int]],
    sets: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Apply all-layer knockout ``specs`` in the chosen heads only, for one capture of ``batch``.

    On each layer of ``heads`` (1-based layer -> head indices) a forward pre-hook widens the
    (B, 1, T, T) mask ``intervene`` routes to a (B, H, T, T) one in which only the chosen heads
    lose the edges the specs remove (sdpa and eager alike): every other head's mask, hence its
    output, is the plain one. Use it inside ``intervene(vlm, [])`` and capture ``batch`` once.

    Raises:
        ValueError: a layer or head out of range, or a spec limited to layers.
        RuntimeError: a layer got no 4D mask (not inside ``intervene``).
    """
    L, H = vlm.num_llm_layers, num_heads(vlm)
    for layer, chosen in heads.items():
        if not 1 <= layer <= L or any(not 0 <= h < H for h in chosen):
            raise ValueError(
                f"head_knockout: layer {layer} heads {list(chosen)} out of range (layers 1..{L}, "
                f"heads 0..{H - 1})"
            )
    if any(s.layers is not None for s in specs):
        raise ValueError("head_knockout takes all-layer specs; choose layers with heads=")
    native = {"bidirectional": [BidirectionalImage()], "prefix": [BidirectionalPrefix()]}.get(
        getattr(vlm.family, "native_image_attention", "causal"), []
    )
    device = vlm.device
    before = allowed_edges(native, batch, sets=sets, device=device)
    removed = before & ~allowed_edges([*native, *specs], batch, sets=sets, device=device)

    def hook(layer: int):
        select = torch.zeros(H, dtype=torch.bool, device=device)
        select[list(heads[layer])] = True

        def widen(_module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is None or mask.ndim != 4:
                raise RuntimeError(
                    f"llm.{layer}: head_knockout needs the 4D mask of intervene(vlm, []); "
                    "enter it first"
                )
            B, _, T, S = mask.shape
            cut = removed.to(mask.device)[:, None] & select.to(mask.device)[None, :, None, None]
            full = mask.expand(B, H, T, S)
            if mask.dtype == torch.bool:
                new = full & ~cut
            else:
                new = full.masked_fill(cut, torch.finfo(mask.dtype).min)
            return args, {**kwargs, "attention_mask": new}

        return widen

    layers = vlm.family.decoder_layers()
    with ExitStack() as stack:
        for layer in sorted(heads):
            if heads[layer]:
                handle = layers[layer - 1].register_forward_pre_hook(hook(layer), with_kwargs=True)
                stack.callback(handle.remove)
        yield


def _by_layer(heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(layer, []).append(head)
    return out


# --- the run ------------------------------------------------------------------------------------
def _predict(vlm, batch, probes, context) -> np.ndarray:
    stages = list(probes)
    with intervene(vlm, []) if context is None else context:
        features = vlm.capture(batch, stages)
    with torch.inference_mode():
        return torch.stack([probes[s].predict(features[s]).cpu() for s in stages]).numpy()


def _pair_condition_counts(
    vlm: VLM,
    batches: Iterator[tuple[Batch, list[int]]],
    probes: Mapping[str, Any],
    reference: str,
    pair: Sequence[int],
    head_sets: Mapping[str, list[list[tuple[int, int]]]],
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Per image of the pair, ``pair_counts`` of every condition: (D, I, S, 10) each."""
    from seglens.analyses.knockout.sets import pair_counts

    stages = list(probes)
    ref_row = stages.index(reference)
    llm = {s: p for s, p in probes.items() if s.startswith("llm.")}
    ids: list[int] = []
    counts: dict[str, list[list[np.ndarray]]] = {c: [] for c in ["none", "all", *head_sets]}
    for batch, image_ids in batches:
        ids += image_ids
        labels = batch.labels.numpy()
        clean = _predict(vlm, batch, probes, None)
        ref_correct = clean[ref_row] == labels
        found = {"none": [clean[[stages.index(s) for s in llm]]]}
        specs, sets = anchor_specs(labels, ref_correct, pair)
        found["all"] = [_predict(vlm, batch, llm, intervene(vlm, specs, sets))]
        for name, draws in head_sets.items():
            found[name] = []
            for heads in draws:
                with (
                    intervene(vlm, [], sets),
                    head_knockout(vlm, batch, specs, _by_layer(heads), sets),
                ):
                    features = vlm.capture(batch, list(llm))
                with torch.inference_mode():
                    pred = torch.stack([llm[s].predict(features[s]).cpu() for s in llm])
                found[name].append(pred.numpy())
        for name, preds in found.items():
            counts[name].append([pair_counts(p, labels, ref_correct, pair) for p in preds])
    out = {}
    for name, per_batch in counts.items():
        draws = len(per_batch[0]) if per_batch else 1
        table = [np.concatenate([b[d] for b in per_batch], axis=1) for d in range(draws)]
        out[name] = np.stack(table).transpose(0, 2, 1, 3)  # (D, I, S, 10)
    return ids, out


def _measure_pair_heads(vlm, batches, probe, reference, pair) -> dict[str, np.ndarray]:
    from seglens.analyses.knockout.measure import predict_stages

    layers = vlm.family.decoder_layers()
    mass, uniform, queries = [], [], []
    for batch, _ in batches:
        labels = batch.labels.numpy()
        ref_correct = predict_stages(vlm, batch, {reference: probe}, masked=False)[0] == labels
        plan = query_plan(batch, labels, ref_correct, pair)
        with head_shares(layers, plan, batch.attention_mask.bool()) as out:
            vlm.capture(batch, [f"llm.{len(layers)}"])
        mass.append(torch.stack([o[0] for o in out], 1).cpu().double().numpy())  # (B, L, H)
        uniform.append(torch.stack([o[1] for o in out], 1).cpu().double().numpy())  # (B, L)
        queries.append(plan["valid"].sum(1).double().numpy())
    if not mass:
        return {}
    return {
        "mass": np.concatenate(mass),
        "uniform": np.concatenate(uniform),
        "queries": np.concatenate(queries),
    }


def run_heads(
    run: Any,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Any:
    """Rank heads by attention to anchors; knock out the top-k, random-k and all heads.

    The pairs and reference stage are the knockout's (its tested pairs when it ran, else its
    selection rule); each pair's images are the first ``knockout.max_images`` holding both
    classes, in the ranking split (``heads.rank_split``) for the ranking and in the evaluation
    split for the knockouts. Passes per pair image: ranking 2 (reference, measured); knockout
    2 + sum over k of (1 + ``heads.random_draws``) (clean, all heads, top-k, random-k).

    Args:
        run: a probing run (``RunDir`` or its directory).
        vlm: the model to use instead of building the one the config names.
        progress: show progress bars.
        **overrides: ``HeadsConfig`` fields.

    Returns:
        The ``heads`` section.
    """
    from seglens.analyses.attention.measure import _rotary
    from seglens.analyses.heads import HeadsSection
    from seglens.analyses.knockout.measure import _scan_labels, stream_batches
    from seglens.analyses.knockout.sets import knockout_differences, pair_images, select_pairs
    from seglens.experiments.common import build_dataset, build_model
    from seglens.probes import load_probe
    from seglens.rundir import RunDir
    from seglens.rundir.schema import confusion_key

    run = RunDir.of(run, **{f"heads.{k}": v for k, v in overrides.items()})
    clean = run.clean_probing()
    config, results = run.config, run.results()
    settings, knock = config.heads, config.knockout
    reference = knock.reference_stage
    vlm = build_model(config.model) if vlm is None else vlm
    _rotary(vlm.family.decoder_layers()[0].self_attn)  # refuse an unsupported family up front
    L, H = vlm.num_llm_layers, num_heads(vlm)
    stages = [f"llm.{i}" for i in range(1, L + 1)]
    missing = [s for s in [reference, *stages] if s not in clean["stages"]]
    if missing:
        raise ValueError(
            f"the heads analysis needs clean probes at {', '.join(missing)}, which {run.path} "
            f"did not probe; probed stages: {', '.join(clean['stages'])}"
        )
    probes = {
        s: load_probe(run.path / clean["metrics"][s]["probe"]["file"], vlm.device)
        for s in dict.fromkeys([reference, *stages])
    }
    data = config.data
    evaluation = build_dataset(data, data.eval_split, data.limit_eval, config.seed)
    ranking_set = (
        evaluation
        if settings.rank_split == "eval"
        else build_dataset(data, data.train_split, data.limit_train, config.seed)
    )
    names = list(evaluation.class_names)
    eval_ids, eval_labels = _scan_labels(vlm, evaluation, config, progress)
    rank_ids, rank_labels = (
        (eval_ids, eval_labels)
        if ranking_set is evaluation
        else _scan_labels(vlm, ranking_set, config, progress)
    )
    tested = (results.get("knockout") or {}).get("pairs")
    if tested:
        chosen = [list(p["classes"]) for p in tested]
    else:
        confusion = run.load_arrays(clean.arrays)[confusion_key(reference, "patch")]
        chosen = [
            list(p["classes"])
            for p in select_pairs(
                confusion,
                eval_labels,
                top_k=knock.top_k,
                min_support=knock.min_support,
                max_images=knock.max_images,
            )
        ]
    if rank_world()[1] > 1:
        raise ValueError("the heads analysis runs in one process; run it without torchrun")
    start = time.perf_counter()
    parts = {"mass": [], "uniform": [], "queries": []}
    for pair in chosen:
        indices = [rank_ids[r] for r in pair_images(rank_labels, pair, knock.max_images)]
        desc = f"heads rank {names[pair[0]]}/{names[pair[1]]}"
        batches = stream_batches(vlm, ranking_set, indices, config, desc, progress)
        measured = _measure_pair_heads(vlm, batches, probes[reference], reference, pair)
        for k in parts:
            if measured:
                parts[k].append(measured[k])
    shapes = {"mass": (0, L, H), "uniform": (0, L), "queries": (0,)}
    joined = {k: np.concatenate(v) if v else np.zeros(shapes[k]) for k, v in parts.items()}
    ranked = rank_heads(
        joined["mass"],
        joined["uniform"],
        joined["queries"],
        n_resamples=config.probe.bootstrap,
        seed=config.seed,
    )
    ranking_seconds = time.perf_counter() - start
    order = [(r["layer"], r["head"]) for r in ranked["ranking"]]
    ks = sorted({min(int(k), L * H) for k in settings.top_k})
    head_sets, chosen_heads = {}, {}
    for k in ks:
        top = order[:k]
        rng = np.random.default_rng([config.seed, k])
        draws = [draw_random_heads(top, H, rng) for _ in range(settings.random_draws)]
        head_sets[f"top{k}"] = [top]
        head_sets[f"random{k}"] = draws
        chosen_heads[str(k)] = {
            "top": [list(h) for h in top],
            "random": [[list(h) for h in d] for d in draws],
        }
    start = time.perf_counter()
    pairs_out, per_pair = [], []
    for pair in chosen:
        indices = [eval_ids[r] for r in pair_images(eval_labels, pair, knock.max_images)]
        desc = f"heads knockout {names[pair[0]]}/{names[pair[1]]}"
        batches = stream_batches(vlm, evaluation, indices, config, desc, progress)
        ids, counts = _pair_condition_counts(vlm, batches, probes, reference, pair, head_sets)
        if not ids:
            continue
        per_pair.append({"images": ids, "counts": counts})
        pairs_out.append({"classes": pair, "names": [names[c] for c in pair], "images": len(ids)})
    knockout_seconds = time.perf_counter() - start
    conditions = ["none", "all", *head_sets]
    accuracy = _accuracy(per_pair, conditions, stages)
    contrasts = {"all - none": ("all", "none")}
    for k in ks:
        contrasts |= {
            f"top{k} - none": (f"top{k}", "none"),
            f"random{k} - none": (f"random{k}", "none"),
            f"top{k} - random{k}": (f"top{k}", f"random{k}"),
        }
    differences = knockout_differences(
        per_pair, stages, {"heads": contrasts}, n_resamples=config.probe.bootstrap, seed=config.seed
    )
    section = HeadsSection(
        reference_stage=reference,
        rank_split=settings.rank_split,
        num_layers=L,
        num_heads=H,
        pairs=pairs_out,
        share=ranked["share"],
        ratio=ranked["ratio"],
        ranking=ranked["ranking"],
        top_k=ks,
        heads=chosen_heads,
        conditions=conditions,
        accuracy=accuracy,
        differences=differences,
        stage=stages[-1],
        seconds={"ranking": ranking_seconds, "knockout": knockout_seconds},
        passes_per_image={"ranking": 2, "knockout": 2 + len(ks) * (1 + settings.random_draws)},
        seed=config.seed,
    )
    section.extra["statement"] = statement(section)
    log.info("heads: %s", section.extra["statement"])
    if not is_main():
        return section
    return run.put_section("heads", section)


def _accuracy(per_pair, conditions, stages) -> dict[str, dict[str, float | None]]:
    """Pair-token accuracy per condition and stage: mean over pairs of the draw-mean accuracy."""
    out = {}
    for c in conditions:
        out[c] = {}
        for j, s in enumerate(stages):
            values = []
            for p in per_pair:
                table = p["counts"][c][:, :, j]  # (D, I, 10)
                correct, tokens = table[..., 1].sum(1), table[..., 0].sum(1)
                draws = [a / t for a, t in zip(correct, tokens, strict=True) if t > 0]
                if draws:
                    values.append(float(np.mean(draws)))
            out[c][s] = float(np.mean(values)) if values else None
    return out


def statement(section: Any) -> str:
    """The top head and, at the last layer, each top-k knockout against its random heads."""
    from seglens.experiments.findings import fmt_interval

    ranking = section["ranking"]
    if not ranking or not section["pairs"]:
        return "no pair to measure"
    best = ranking[0]
    stage = section["stage"]
    diffs = section["differences"]["heads"][stage]
    parts = [
        f"top head llm.{best['layer']} head {best['head']} (anchor share {best['share']:.3f}, "
        f"{best['ratio'] or float('nan'):.2f}x uniform)"
    ]
    for k in section["top_k"]:
        parts.append(
            f"top-{k} minus none {fmt_interval(diffs[f'top{k} - none'])}, minus random-{k} "
            f"{fmt_interval(diffs[f'top{k} - random{k}'])}"
        )
    parts.append(f"all heads minus none {fmt_interval(diffs['all - none'])}")
    return f"At {stage}, pair-token accuracy: " + "; ".join(parts) + "."
