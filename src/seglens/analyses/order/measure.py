"""Token order vs content: does early-position starvation follow the causal sequence or the image?

The same image tokens are fed to the LLM in another order (``raster``, ``reversed``,
``column_major`` or ``shuffled``, seeded per image) with position ids that follow the new sequence
or stay with their tokens (``reorder``). Captured LLM states come back in raster token order, so
labels, maps and probes follow the tokens; probes are trained and scored per condition, and the
accuracy is read both by sequence slot and by image row. ``run_order`` is the public API behind
``seglens order``.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seglens.distributed import gather_object, is_main, rank_world
from seglens.experiments.stats import paired_bootstrap
from seglens.models import VLM, Batch
from seglens.rundir import RunDir
from seglens.stages import middle_layer

__all__ = ["ARRAYS_FILE", "ORDERS", "POSITION_IDS", "condition_names", "follows_sequence"]
__all__ += ["order_differences"]
__all__ += ["order_tables", "permutations", "reorder", "run_order", "score_order"]

log = logging.getLogger(__name__)

ORDERS = ("raster", "reversed", "column_major", "shuffled")
POSITION_IDS = ("sequence", "token")
ARRAYS_FILE = "arrays/order.npz"
BANDS = ("first", "last")
READINGS = ("by_sequence", "by_row")

#: What each ``order.position_ids`` value means, per family kind (recorded in the section).
MEANING = {
    "sequence": "position ids follow the sequence: the token in slot k gets the ids raster slot "
    "k has in the plain model (1-D RoPE: id = its sequence index; Qwen-style 3-D mrope: the "
    "(t, h, w) of the grid cell that slot k shows natively, so the ids describe the slot, not "
    "where the token is in the image)",
    "token": "each token keeps its native position ids (its rotary angles move with it): 1-D "
    "RoPE: only the causal order changes, not the positions; 3-D mrope: the token keeps the "
    "(t, h, w) of its own grid cell (Qwen's convention)",
}


# --- permutations -------------------------------------------------------------------------------
def permutations(
    order: str | Sequence[int], names: Sequence[str], grid: tuple[int, int], seed: int = 0
) -> np.ndarray:
    """(B, N) int64: ``perm[b, k]`` = the raster index of the token placed in sequence slot k.

    Args:
        order: one of ``ORDERS``, or an explicit (N,) permutation used for every image.
        names: per image an identifier; ``shuffled`` seeds each image's order from
            ``(seed, crc32(name))``, so an image gets the same order in every batch and pass.
        grid: (g_rows, g_cols) of the image-token grid.
        seed: the run's seed.
    """
    rows, cols = grid
    N = rows * cols
    if not isinstance(order, str):
        perm = np.asarray(order, dtype=np.int64)
        if perm.shape != (N,) or not np.array_equal(np.sort(perm), np.arange(N)):
            raise ValueError(
                f"an explicit token order must be a permutation of 0..{N - 1}, got shape "
                f"{perm.shape}; or name one of {', '.join(ORDERS)}"
            )
        return np.tile(perm, (len(names), 1))
    if order not in ORDERS:
        raise ValueError(f"token order {order!r} is not one of {', '.join(ORDERS)}")
    if order == "shuffled":
        return np.stack(
            [
                np.random.default_rng([seed, zlib.crc32(str(n).encode())]).permutation(N)
                for n in names
            ]
        ).reshape(len(names), N)
    base = {
        "raster": np.arange(N),
        "reversed": np.arange(N)[::-1],
        "column_major": np.arange(N).reshape(rows, cols).T.ravel(),
    }[order]
    return np.tile(base, (len(names), 1)).astype(np.int64)


def _check_family(vlm: VLM) -> None:
    vision = getattr(vlm.model.config, "vision_config", None)
    if getattr(vision, "deepstack_visual_indexes", None):
        raise ValueError(
            f"token order conditions are not defined for {vlm.family.name}: its deepstack adds "
            "vision features at the image positions after the first decoder layers, in raster "
            "order, which a reordered sequence would pair with the wrong tokens; run the order "
            "analysis on a family without deepstack (order.enabled=false here)"
        )


def _place(x: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., B, T, D) -> a copy where sequence position ``target[b, k]`` holds
    ``x[..., b, source[b, k], :]``: the sequence axis is -2 and the batch axis -3 (hidden
    states (B, T, D); rotary angles (B, T, d), (1, T, d) or, for mrope, (3, B, T, d))."""
    B, N = target.shape
    lead = x.shape[:-3]
    x = x.expand(*lead, B, *x.shape[-2:])
    view = (*([1] * len(lead)), B, N, 1)
    shape = (*lead, B, N, x.shape[-1])
    src = source.to(x.device).view(view).expand(shape)
    dst = target.to(x.device).view(view).expand(shape)
    return x.clone().scatter_(-2, dst, x.gather(-2, src))


@contextmanager
def reorder(
    vlm: VLM,
    order: str | Sequence[int],
    position_ids: str = "sequence",
    *,
    seed: int = 0,
) -> Iterator[None]:
    """Feed the image tokens to the LLM in ``order`` for every ``vlm.capture`` inside the block.

    The LLM input embeddings at the N grid positions are permuted (sequence slot k gets raster
    token ``perm[k]``, see ``permutations``) by a forward pre-hook on decoder layer 1, where the
    embeddings enter the blocks (an element-wise embedding scale, as Gemma's, commutes with it).
    With ``position_ids="token"`` every decoder layer's rotary (cos, sin) is permuted the same
    way, so each token keeps its native angles (1-D and 3-D ids alike, see ``MEANING``); with
    ``"sequence"`` the ids stay with the slots. ``vlm.token_positions`` makes capture read each
    LLM stage at the slot its token went to, so states, labels and maps stay in raster token
    order; the encoder and adapter stages are read before the LLM and do not move. Attention
    masks are by sequence slot: inside ``intervene`` (enter ``reorder`` inside it), image-slot
    token sets name sequence slots. Hooks are removed on exit, also on exceptions.

    Args:
        vlm: the model.
        order: one of ``ORDERS`` or an explicit (N,) permutation.
        position_ids: ``sequence`` or ``token``.
        seed: seeds ``shuffled`` (per image, with its name).

    Raises:
        ValueError: an unknown order or position-id mode, or a family where the order is
            undefined (deepstack).
        RuntimeError: nested ``reorder``, or a forward that did not come from ``vlm.capture``.
    """
    if position_ids not in POSITION_IDS:
        raise ValueError(
            f"order position_ids {position_ids!r} is not one of {', '.join(POSITION_IDS)}"
        )
    permutations(order, ["check"], vlm.grid, seed)  # refuse a bad order before any forward
    _check_family(vlm)
    if vlm.token_positions is not None:
        raise RuntimeError("reorder() is already active on this model; use one at a time")
    state: dict[str, Any] = {}

    def token_positions(batch: Batch) -> torch.Tensor:
        perm = torch.from_numpy(permutations(order, batch.names, vlm.grid, seed))
        slots = batch.image_positions.cpu()  # (B, N) sequence position of raster slot k
        state.update(target=slots, source=slots.gather(1, perm), used=set())
        return slots.gather(1, perm.argsort(1))  # where raster token j now sits

    def check(key: tuple) -> None:
        if "source" not in state or key in state["used"]:
            raise RuntimeError(
                "a forward inside reorder() that did not come from vlm.capture(...) would run "
                "with a stale token order; use vlm.capture"
            )
        state["used"].add(key)

    def first_layer(_module, args, kwargs):
        check(("embeddings",))
        if "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
            return args, {
                **kwargs,
                "hidden_states": _place(hidden, state["source"], state["target"]),
            }
        return (_place(args[0], state["source"], state["target"]), *args[1:]), kwargs

    def rotary(layer: int):
        def keep_angles(_module, args, kwargs):
            check(("angles", layer))
            angles = kwargs.get("position_embeddings")
            if angles is None:
                raise RuntimeError(
                    f"llm.{layer} got no rotary position_embeddings; position_ids='token' needs "
                    "a RoPE family (use position_ids='sequence')"
                )
            B = state["source"].shape[0]
            moved = tuple(
                _place(t.expand(B, *t.shape[1:]), state["source"], state["target"]) for t in angles
            )
            return args, {**kwargs, "position_embeddings": moved}

        return keep_angles

    layers = vlm.family.decoder_layers()
    with ExitStack() as stack:
        vlm.token_positions = token_positions
        stack.callback(setattr, vlm, "token_positions", None)
        handle = layers[0].register_forward_pre_hook(first_layer, with_kwargs=True)
        stack.callback(handle.remove)
        if position_ids == "token":
            for i, layer in enumerate(layers):
                handle = layer.register_forward_pre_hook(rotary(i + 1), with_kwargs=True)
                stack.callback(handle.remove)
        yield


# --- scoring --------------------------------------------------------------------------------------
def condition_names(orders: Sequence[str], position_ids: Sequence[str]) -> list[str]:
    """``raster`` (the reference; its ids are the same either way) then ``order/ids``."""
    names = ["raster"]
    for order in orders:
        if order == "raster":
            continue
        names += [f"{order}/{ids}" for ids in position_ids]
    return names


def _split(condition: str) -> tuple[str, str]:
    order, _, ids = condition.partition("/")
    return order, ids or "sequence"


def score_order(
    vlm: VLM,
    probe: Any,
    stage: str,
    batches: Iterator[tuple[Batch, list[int]]],
    condition: str,
    seed: int,
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Score one condition's probe: per image, which tokens it gets right, in raster order.

    Returns:
        ``(image ids, {"correct": (M, N) bool, "valid": (M, N) bool, "perm": (M, N) int})``.
    """
    order, ids = _split(condition)
    out: dict[str, list[np.ndarray]] = {"correct": [], "valid": [], "perm": []}
    seen: list[int] = []
    for batch, image_ids in batches:
        with reorder(vlm, order, ids, seed=seed):
            states = vlm.capture(batch, [stage])
        with torch.inference_mode():
            pred = probe.predict({stage: states[stage]})[stage].cpu().numpy()
        labels = batch.labels.numpy()
        out["correct"].append((pred == labels) & (labels != 255))
        out["valid"].append(labels != 255)
        out["perm"].append(permutations(order, batch.names, vlm.grid, seed))
        seen += image_ids
    N = vlm.num_image_tokens
    return seen, {
        k: np.concatenate(v) if v else np.zeros((0, N), bool if k != "perm" else np.int64)
        for k, v in out.items()
    }


def order_tables(
    correct: np.ndarray, valid: np.ndarray, perm: np.ndarray, grid: tuple[int, int], band_rows: int
) -> dict[str, Any]:
    """One condition's per-image arrays -> curves and per-image band counts.

    Args:
        correct, valid: (M, N) bool in raster token order.
        perm: (M, N) raster token index in each sequence slot.
        grid: (g_rows, g_cols).
        band_rows: rows in the first / last band (and ``band_rows * g_cols`` sequence slots).

    Returns:
        ``{"sequence": (N,) accuracy per sequence slot, "token": (N,) per raster token, "row":
        (g_rows,) per image row, "counts": {reading: {band: ((M,) correct, (M,) total)}}}``.
    """
    rows, cols = grid
    in_slots = {k: np.take_along_axis(v, perm, 1) for k, v in (("c", correct), ("v", valid))}

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.maximum(den, 1), np.nan)

    span = band_rows * cols
    first, last = slice(0, span), slice(correct.shape[1] - span, None)
    counts = {
        reading: {
            band: (c[:, where].sum(1).astype(np.float64), v[:, where].sum(1).astype(np.float64))
            for band, where in (("first", first), ("last", last))
        }
        for reading, (c, v) in (
            ("by_sequence", (in_slots["c"], in_slots["v"])),
            ("by_row", (correct, valid)),
        )
    }
    by_row = correct.reshape(-1, rows, cols).sum((0, 2)), valid.reshape(-1, rows, cols).sum((0, 2))
    return {
        "sequence": ratio(in_slots["c"].sum(0), in_slots["v"].sum(0)),
        "token": ratio(correct.sum(0), valid.sum(0)),
        "row": ratio(*by_row),
        "counts": counts,
    }


# --- the run ------------------------------------------------------------------------------------
def _stream(vlm, dataset, config, desc, progress):
    from seglens.analyses.knockout.measure import stream_batches

    rank, world = rank_world()
    return stream_batches(
        vlm, dataset, list(range(len(dataset)))[rank::world], config, desc, progress
    )


def run_order(
    run: RunDir | str | Path,
    *,
    vlm: VLM | None = None,
    progress: bool = True,
    **overrides: Any,
) -> Any:
    """Train and score probes with the image tokens in each order; compare with raster.

    Uses the model, data, probe settings and seed of the probing run. Per condition
    (``condition_names``): probes at ``llm.<order.layer>`` trained inside ``reorder`` (one pass
    over the training split per lda / sgd epoch), then one pass over the evaluation split. Writes
    ``arrays/order.npz`` (per condition ``<name>.correct``/``.valid``/``.perm`` (M, N) and the
    curves ``.sequence`` (N,), ``.row`` (g_rows,)) and the ``order`` section: accuracies in the
    first / last bands read by sequence slot and by image row, and per condition its paired
    bootstrap interval minus ``raster`` on each (same images, same resamples).

    Args:
        run: a probing run (``RunDir`` or its directory).
        vlm: the model to use instead of building the one the config names.
        progress: show progress bars.
        **overrides: ``OrderConfig`` fields.

    Returns:
        The ``order`` section.
    """
    from seglens.analyses.order import OrderSection
    from seglens.experiments.common import build_dataset, build_model
    from seglens.experiments.training import train_probes

    run = RunDir.of(run, **{f"order.{k}": v for k, v in overrides.items()})
    run.clean_probing()  # refuse a run that has not been probed
    config = run.config
    settings = config.order
    vlm = build_model(config.model) if vlm is None else vlm
    _check_family(vlm)
    L = vlm.num_llm_layers
    number = middle_layer(L) if settings.layer is None else settings.layer
    if not 1 <= number <= L:
        raise ValueError(f"order.layer={number} is not an LLM layer of this model (1..{L})")
    stage = f"llm.{number}"
    data = config.data
    train = build_dataset(data, data.train_split, data.limit_train, config.seed)
    evaluation = build_dataset(data, data.eval_split, data.limit_eval, config.seed)
    grid = tuple(vlm.grid)
    band_rows = max(1, round(config.probe.position_band * grid[0]))
    names = condition_names(settings.orders, settings.position_ids)
    arrays: dict[str, np.ndarray] = {}
    tables: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    for name in names:
        order, ids = _split(name)
        start = time.perf_counter()
        torch.manual_seed(config.seed)  # every condition starts its probes alike
        with reorder(vlm, order, ids, seed=config.seed):
            bank = train_probes(
                vlm,
                train,
                [stage],
                config.probe,
                data_config=data,
                seed=config.seed,
                progress=progress,
                condition=f"order_{name.replace('/', '_')}",
            )
        batches = _stream(vlm, evaluation, config, f"order {name}", progress)
        seen, table = score_order(vlm, bank, stage, batches, name, config.seed)
        parts = gather_object((seen, table))
        seen = [i for p in parts for i in p[0]]
        sort = np.argsort(seen, kind="stable")
        table = {k: np.concatenate([p[1][k] for p in parts])[sort] for k in table}
        seconds[name] = time.perf_counter() - start
        tables[name] = order_tables(
            table["correct"], table["valid"], table["perm"], grid, band_rows
        )
        key = name.replace("/", ".")
        arrays |= {f"{key}.{k}": v for k, v in table.items()}
        arrays |= {f"{key}.{k}": tables[name][k] for k in ("sequence", "token", "row")}
        log.info("order %s: %.1f s", name, seconds[name])
    bands, differences = order_differences(
        tables, n_resamples=config.probe.bootstrap, seed=config.seed
    )
    accuracy = {
        n: _accuracy(
            arrays[f"{n.replace('/', '.')}.correct"].sum(1),
            arrays[f"{n.replace('/', '.')}.valid"].sum(1),
        )
        for n in names
    }
    section = OrderSection(
        layer=stage,
        grid=list(grid),
        band_rows=band_rows,
        conditions=names,
        accuracy=accuracy,
        bands=bands,
        differences=differences,
        seconds=seconds,
        arrays_file=ARRAYS_FILE,
        seed=config.seed,
        images={"train": len(train), "eval": len(evaluation)},
        position_ids_meaning=dict(MEANING),
    )
    section.extra["follows_sequence"] = {
        name: follows_sequence(differences, name) for name in differences if "reversed" in name
    }
    section.extra["statement"] = statement(section)
    if not is_main():
        return section
    run.save_arrays(ARRAYS_FILE, **arrays)
    return run.put_section("order", section)


def order_differences(
    tables: dict[str, dict[str, Any]], *, n_resamples: int = 1000, seed: int = 0
) -> tuple[dict, dict]:
    """Band accuracies per condition, and each condition minus ``raster`` with paired intervals.

    Args:
        tables: {condition: ``order_tables(...)``} over the same images in the same order;
            must hold ``raster``.
        n_resamples, seed: of the paired bootstrap over images (0: estimates only).

    Returns:
        ``({condition: {reading: {band: accuracy}}}, {condition: {"<reading>.<band>":
        {estimate, low, high, n_images}}})`` with readings ``by_sequence`` / ``by_row`` and
        bands ``first`` / ``last``; ``raster`` has no difference entry.
    """
    if "raster" not in tables:
        raise ValueError(f"order differences need the raster condition; got {list(tables)}")
    base = tables["raster"]["counts"]
    bands, differences = {}, {}
    for name, table in tables.items():
        counts = table["counts"]
        bands[name] = {r: {b: _accuracy(*counts[r][b]) for b in BANDS} for r in READINGS}
        if name != "raster":
            differences[name] = {
                f"{r}.{b}": paired_bootstrap(
                    counts[r][b], base[r][b], "accuracy", n_resamples=n_resamples, seed=seed
                )
                for r in READINGS
                for b in BANDS
            }
    return bands, differences


def follows_sequence(differences: Mapping[str, Any], condition: str) -> bool | None:
    """Whether the first-rows deficit follows the sequence under a reversed ``condition``.

    Reversing moves the first image rows to the end of the sequence and the last rows to its
    start. The verdict holds when the first rows gain (paired interval of condition minus raster
    above 0) and the last rows lose (interval below 0); None without intervals.
    """
    from seglens.experiments.findings import above, all_of, below

    cells = differences.get(condition)
    if not cells:
        return None
    return all_of(above(cells["by_row.first"]), below(cells["by_row.last"]))


def _accuracy(correct: np.ndarray, total: np.ndarray) -> float | None:
    total_sum = float(np.sum(total))
    return float(np.sum(correct) / total_sum) if total_sum > 0 else None


def statement(section: Any) -> str:
    """One sentence per condition: its first-rows difference from raster, read both ways."""
    from seglens.experiments.findings import fmt_interval

    parts = []
    for name, diff in (section["differences"] or {}).items():
        parts.append(
            f"{name} - raster on the first image rows {fmt_interval(diff['by_row.first'])}, "
            f"on the first sequence slots {fmt_interval(diff['by_sequence.first'])}"
        )
    where = f"at {section['layer']} (token accuracy, first {section['band_rows']} rows)"
    if not parts:
        return "only raster was run."
    verdicts = section.get("follows_sequence") or {}
    verdict = "; ".join(
        f"{name}: the first-rows deficit "
        + {True: "follows the sequence", False: "does not follow the sequence"}.get(v, "n/a")
        for name, v in verdicts.items()
    )
    return where + ": " + "; ".join(parts) + "." + (f" Verdict, {verdict}." if verdict else "")
