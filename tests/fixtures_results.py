"""A synthetic run directory for report tests (no model, no data set), built through the schema.

``make_run`` writes ``results.json`` with ``RunDir.begin`` and ``put_section`` (every section a
typed ``seglens.rundir.schema`` section, validated on the way in) and every array file it names,
with random but plausible numbers: a drop at the adapter, recovery across the LLM layers,
blocking correct tokens hurting most, bidirectional attention helping early positions. When the
schema changes, these fixtures change with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import fixtures_evidence as evidence
from seglens.rundir import RunDir
from seglens.rundir.files import save_arrays
from seglens.rundir.schema import (
    Bidirectional,
    Condition,
    Dataset,
    Knockout,
    Qualitative,
    Umap,
    confusion_key,
    embedding_key,
    labels_key,
    position_key,
    probing_arrays,
    summary_of,
)

KNOCKOUT_CONDITIONS = [
    "none",
    "block_correct",
    "block_incorrect",
    "random_correct",
    "random_incorrect",
]
KNOCKOUT_EFFECT = {
    "none": 0.0,
    "block_correct": 0.25,
    "block_incorrect": 0.06,
    "random_correct": 0.08,
    "random_incorrect": 0.03,
}


def _curve(stages: list[str], rng: np.random.Generator, shift: float = 0.0) -> list[float]:
    """mIoU per stage: encoder 0.45, adapter 0.33, then rising to a peak at 2/3 LLM depth."""
    llm = [s for s in stages if s.startswith("llm.")]
    values = []
    for stage in stages:
        if stage.startswith("vision."):
            value = 0.2 + 0.2 * int(stage.split(".")[1]) / 3
        elif stage == "encoder":
            value = 0.45
        elif stage == "adapter":
            value = 0.33
        else:
            depth = (llm.index(stage) + 1) / len(llm)
            value = (
                0.33
                + 0.22 * np.sin(np.pi * min(depth / 0.67, 1.0) / 2)
                - 0.05 * max(0.0, depth - 0.67)
            )
        values.append(float(np.clip(value + shift + rng.normal(0, 0.01), 0.01, 0.99)))
    return values


def _level(miou: float, num_classes: int, rng: np.random.Generator) -> dict[str, Any]:
    per_class = np.clip(miou + rng.normal(0, 0.1, num_classes), 0, 1).tolist()
    per_class[-1] = None  # a class that never occurs
    return {
        "miou": miou,
        "pixel_accuracy": min(0.99, miou + 0.3),
        "mean_class_accuracy": min(0.99, miou + 0.15),
        "per_class_iou": per_class,
        "ci": {
            "miou": [miou - 0.03, miou + 0.03],
            "pixel_accuracy": [miou + 0.27, min(0.995, miou + 0.33)],
        },
    }


def _probing(
    condition: str, stages: list[str], num_classes: int, rng: np.random.Generator, run: Path
) -> Condition:
    shift = 0.03 if condition == "bidirectional_image" else 0.0
    curve = _curve(stages, rng, shift)
    metrics = {}
    arrays = {}
    for stage, miou in zip(stages, curve, strict=True):
        metrics[stage] = {
            "patch": _level(miou, num_classes, rng),
            "pixel": _level(max(0.0, miou - 0.02), num_classes, rng),
            "probe": {"file": f"probes/{condition}/{stage}.safetensors", "lr": 1e-3},
        }
        arrays[position_key(stage)] = rng.uniform(0.3, 0.9, 16)
        for level in ("patch", "pixel"):
            arrays[confusion_key(stage, level)] = rng.integers(0, 50, (num_classes,) * 2)
    save_arrays(run / probing_arrays(condition), **arrays)
    return Condition(
        stages=stages,
        solver="lda",
        metrics=metrics,
        summary=summary_of(metrics, stages, "patch"),
        arrays=probing_arrays(condition),
        extra={
            "differences": evidence.probing_differences(stages, rng),
            "convergence": evidence.convergence(stages),
        },
    )


def _qualitative(
    run: Path, stages: list[str], num_classes: int, rng: np.random.Generator
) -> dict[str, Any]:
    arrays = {}
    names = ["img_000.jpg", "img_001.jpg"]
    for i in range(len(names)):
        arrays[f"image__{i}"] = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        mask = np.repeat(np.arange(32)[None, :] * num_classes // 32, 24, axis=0).astype(np.uint8)
        mask[:3] = 255
        arrays[f"mask__{i}"] = mask
        for stage in stages:
            pred = mask.copy()
            noise = rng.random(mask.shape) < 0.2
            pred[noise] = rng.integers(0, num_classes, int(noise.sum()))
            arrays[f"pred__{stage}__{i}"] = pred
    save_arrays(run / "arrays/qualitative.npz", **arrays)
    return Qualitative(file="arrays/qualitative.npz", stages=stages, images=names)


def _knockout(layers: int, class_names: list[str], rng: np.random.Generator) -> Knockout:
    stages = [f"llm.{layer}" for layer in range(1, layers + 1)]
    pairs_ids = [[0, 1], [2, 3]]

    def scores(scale: float) -> dict[str, dict[str, dict[str, float]]]:
        out = {}
        for cond in KNOCKOUT_CONDITIONS:
            out[cond] = {}
            for i, stage in enumerate(stages):
                base = 0.6 + 0.2 * (i + 1) / layers
                acc = base - scale * KNOCKOUT_EFFECT[cond] * (i + 1) / layers
                out[cond][stage] = {
                    "accuracy": float(acc + rng.normal(0, 0.005)),
                    "iou": float(acc - 0.2),
                    "recovery": float(0.4 - KNOCKOUT_EFFECT[cond]),
                }
        return out

    return Knockout(
        reference_stage="adapter",
        layers=None,
        pairs=[
            {
                "classes": p,
                "names": [class_names[c] for c in p],
                "images": 3 + i,
                "support": 120 + 10 * i,
            }
            for i, p in enumerate(pairs_ids)
        ],
        conditions=KNOCKOUT_CONDITIONS,
        curves=scores(1.0),
        per_pair=[{"classes": p, **scores(0.8 + 0.4 * i)} for i, p in enumerate(pairs_ids)],
        summary_layer=f"llm.{layers}",
        seed=0,
        window_sweep=[
            {
                "layers": [a, min(a + 1, layers)],
                **{
                    c: {"accuracy": 0.8 - KNOCKOUT_EFFECT[c] / a, "iou": 0.6 - KNOCKOUT_EFFECT[c]}
                    for c in KNOCKOUT_CONDITIONS
                },
            }
            for a in range(1, layers + 1, 2)
        ],
    )


def _bidirectional(
    run: Path, stages: list[str], layers: int, grid: int, rng: np.random.Generator
) -> Bidirectional:
    n = grid * grid
    positions = np.arange(n)
    causal = np.clip(0.5 + 0.3 * positions / n + rng.normal(0, 0.03, n), 0, 1)
    bidir = np.clip(0.75 + 0.05 * positions / n + rng.normal(0, 0.03, n), 0, 1)
    save_arrays(
        run / "arrays/bidirectional.npz",
        causal=causal,
        bidirectional_image=bidir,
        difference=bidir - causal,
    )
    return Bidirectional(
        layer=f"llm.{max(1, layers // 2)}",
        conditions=["causal", "bidirectional_image"],
        miou={
            "causal": dict(zip(stages, _curve(stages, rng), strict=True)),
            "bidirectional_image": dict(zip(stages, _curve(stages, rng, 0.03), strict=True)),
        },
        level="patch",
        position_accuracy_file="arrays/bidirectional.npz",
        seed=0,
    )


def _umap(run: Path, stages: list[str], num_classes: int, rng: np.random.Generator) -> Umap:
    arrays = {}
    scores = {}
    for i, stage in enumerate(stages):
        labels = rng.integers(0, num_classes, 200)
        centres = rng.normal(0, 3, (num_classes, 2))
        arrays[embedding_key(stage)] = centres[labels] * (i + 1) / len(stages) + rng.normal(
            0, 1, (200, 2)
        )
        arrays[labels_key(stage)] = labels
        scores[stage] = {"silhouette": 0.1 + 0.1 * i, "knn_accuracy": 0.5 + 0.1 * i}
    save_arrays(run / "arrays/umap.npz", **arrays)
    shown = list(range(min(3, num_classes)))
    return Umap(
        stages=stages,
        file="arrays/umap.npz",
        tokens=200,
        scores=scores,
        classes=shown,
        neighbors=15,
        seed=0,
    )


def _order(run: Path, layers: int, grid: int, rng: np.random.Generator):
    """An ``order`` section measured by the real statistics on random per-image arrays."""
    from seglens.analyses.order import OrderSection
    from seglens.analyses.order.measure import (
        MEANING,
        order_differences,
        order_tables,
        permutations,
        statement,
    )

    M, N = 6, grid * grid
    valid = rng.random((M, N)) < 0.9
    arrays, tables = {}, {}
    for name, order in (("raster", "raster"), ("reversed/token", "reversed")):
        perm = permutations(order, [str(i) for i in range(M)], (grid, grid))
        correct = valid & (rng.random((M, N)) < 0.8)
        tables[name] = order_tables(correct, valid, perm, (grid, grid), 1)
        key = name.replace("/", ".")
        arrays |= {f"{key}.{k}": tables[name][k] for k in ("sequence", "token", "row")}
    save_arrays(run / "arrays/order.npz", **arrays)
    bands, differences = order_differences(tables, n_resamples=50)
    section = OrderSection(
        layer=f"llm.{layers // 2}",
        grid=[grid, grid],
        band_rows=1,
        conditions=list(tables),
        accuracy=dict.fromkeys(tables, 0.8),
        bands=bands,
        differences=differences,
        seconds=dict.fromkeys(tables, 1.0),
        arrays_file="arrays/order.npz",
        seed=0,
        images={"train": 8, "eval": M},
        position_ids_meaning=dict(MEANING),
    )
    section.extra["statement"] = statement(section)
    return section


def _heads(layers: int, pairs: list, rng: np.random.Generator):
    """A ``heads`` section: the real ranking on random shares, knockout intervals made up."""
    from seglens.analyses.heads import HeadsSection
    from seglens.analyses.heads.measure import rank_heads, statement

    H, n = 2, 5
    queries = rng.integers(3, 9, n).astype(float)
    ranked = rank_heads(
        rng.uniform(0, 1, (n, layers, H)) * queries[:, None, None],
        np.tile(0.5 * queries[:, None], (1, layers)),
        queries,
        n_resamples=50,
    )
    conditions = ["none", "all", "top1", "random1"]
    stages = [f"llm.{i}" for i in range(1, layers + 1)]
    accuracy = {c: {s: float(rng.uniform(0.5, 0.9)) for s in stages} for c in conditions}

    def cell():
        low = float(rng.uniform(-0.2, 0.0))
        return {"estimate": low + 0.05, "low": low, "high": low + 0.1, "n_images": n}

    names = ("all - none", "top1 - none", "random1 - none", "top1 - random1")
    section = HeadsSection(
        reference_stage="adapter",
        rank_split="train",
        num_layers=layers,
        num_heads=H,
        pairs=[{"classes": list(p), "names": [str(c) for c in p], "images": n} for p in pairs],
        share=ranked["share"],
        ratio=ranked["ratio"],
        ranking=ranked["ranking"],
        top_k=[1],
        heads={"1": {"top": [[1, 0]], "random": [[[1, 1]]]}},
        conditions=conditions,
        accuracy=accuracy,
        differences={"heads": {s: {k: cell() for k in names} for s in stages}},
        stage=stages[-1],
        seconds={"ranking": 1.0, "knockout": 2.0},
        passes_per_image={"ranking": 2, "knockout": 4},
        seed=0,
    )
    section.extra["statement"] = statement(section)
    return section


def make_run(
    tmp_path: Path,
    *,
    conditions: tuple[str, ...] = ("causal",),
    knockout: bool = True,
    bidirectional: bool = True,
    umap: bool = True,
    twin: bool | None = None,
    num_classes: int = 5,
    layers: int = 4,
    grid: int = 4,
    qualitative: bool = True,
    name: str = "run",
    seed: int = 0,
    native: str = "causal",
    order: bool = False,
    heads: bool = False,
) -> Path:
    """Write a run directory ``tmp_path/name`` and return its path (``native``: the model's
    native image attention, ``causal`` or ``bidirectional`` as Gemma3's)."""
    from seglens.config import RunConfig

    rng = np.random.default_rng(seed)
    run = RunDir(Path(tmp_path) / name, RunConfig(out=str(Path(tmp_path) / name), seed=seed))
    stages = ["encoder", "adapter", *(f"llm.{layer}" for layer in range(1, layers + 1))]
    class_names = [f"class_{c}" for c in range(num_classes)]
    palette = rng.integers(0, 256, (num_classes, 3)).tolist()
    model = {
        "name": f"tiny-clip-L{layers}",
        "grid": [grid, grid],
        "num_llm_layers": layers,
        "geometry": "pad",
        "native_image_attention": native,
    }
    dataset = Dataset(
        name="synthetic",
        train_split="train",
        eval_split="val",
        num_classes=num_classes,
        class_names=class_names,
        palette=palette,
        train_images=8,
        holdout_images=0,
        eval_images=4,
        skipped={"count": 2, "samples": ["bad_0.png", "bad_1.png"]},
    )
    run.path.mkdir(parents=True, exist_ok=True)
    run.save_config()
    run.begin(model=model, dataset=dataset, probing={}, figures={})
    for condition in conditions:
        run.put_section(
            f"probing.{condition}", _probing(condition, stages, num_classes, rng, run.path)
        )
    if qualitative:
        qual_stages = ["encoder", "adapter", f"llm.{layers}"]
        run.put_section("qualitative", _qualitative(run.path, qual_stages, num_classes, rng))
    if knockout:
        section = _knockout(layers, class_names, rng)
        section.extra["differences"] = evidence.knockout_differences(layers, rng)
        run.put_section("knockout", section)
        pairs = [p["classes"] for p in section.pairs]
        run.put_section("attention", evidence.attention(layers, pairs, rng))
    if bidirectional:
        section = _bidirectional(run.path, stages, layers, grid, rng)
        diff = evidence.bidirectional_differences(stages, section.layer, rng)
        section.extra["differences"] = diff
        run.put_section("bidirectional", section)
    if umap:
        run.put_section("umap", _umap(run.path, ["adapter", f"llm.{layers}"], num_classes, rng))
    if order:
        run.put_section("order", _order(run.path, layers, grid, rng))
    if heads:
        run.put_section("heads", _heads(layers, [(0, 1)], rng))
    if knockout and bidirectional and umap if twin is None else twin:  # a full run has one
        run.put_section("twin", _twin(rng))
    return run.path


def _twin(rng) -> dict:
    """A ``twin`` section: one directed statistic per finding, model / twin / model - twin."""

    def interval(centre: float) -> dict:
        half = float(rng.uniform(0.005, 0.02))
        return {"estimate": centre, "low": centre - half, "high": centre + half, "n_images": 8}

    findings = {}
    for finding, key, direction, model, twin in (
        ("recovery", "best_llm_minus_adapter", "above", 0.12, 0.01),
        ("anchors", "outside_pair: block correct - control", "below", -0.2, -0.05),
    ):
        stat = {"direction": direction, "model": interval(model), "twin": interval(twin)}
        stat["model_minus_twin"] = interval(model - twin)
        findings[finding] = {"model_holds": True, "twin_holds": False, "beyond_twin": True}
        findings[finding] |= {"statistics": {key: stat}, "text": key}
    return {"seed": 0, "analyses": ["probing", "knockout"], "run": "twin", "init": "HF"} | {
        "findings": findings
    }
