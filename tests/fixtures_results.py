"""A synthetic, schema-complete run directory for report tests (no model, no data set).

``make_run`` writes ``results.json`` and every array file it names through ``seglens.results``,
with random but plausible numbers: a drop at the adapter, recovery across the LLM layers,
blocking correct tokens hurting most, bidirectional attention helping early positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from seglens.results import SCHEMA_VERSION, save_arrays, write_json

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
) -> dict[str, Any]:
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
        arrays[f"position_accuracy__{stage}"] = rng.uniform(0.3, 0.9, 16)
        for level in ("patch", "pixel"):
            arrays[f"confusion__{stage}__{level}"] = rng.integers(0, 50, (num_classes,) * 2)
    save_arrays(run / f"arrays/probing_{condition}.npz", **arrays)
    best = stages[int(np.argmax(curve))]
    values = dict(zip(stages, curve, strict=True))
    llm_best = max(v for s, v in values.items() if s.startswith("llm."))
    return {
        "stages": stages,
        "solver": "lda",
        "metrics": metrics,
        "summary": {
            "level": "patch",
            "best_stage": best,
            "best_miou": values[best],
            "encoder_miou": values["encoder"],
            "adapter_miou": values["adapter"],
            "adapter_drop": values["encoder"] - values["adapter"],
            "llm_gain": llm_best - values["adapter"],
        },
        "arrays": f"arrays/probing_{condition}.npz",
    }


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
    return {"file": "arrays/qualitative.npz", "stages": stages, "images": names}


def _knockout(layers: int, class_names: list[str], rng: np.random.Generator) -> dict[str, Any]:
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

    return {
        "reference_stage": "adapter",
        "layers": None,
        "pairs": [
            {
                "classes": p,
                "names": [class_names[c] for c in p],
                "images": 3 + i,
                "support": 120 + 10 * i,
            }
            for i, p in enumerate(pairs_ids)
        ],
        "conditions": KNOCKOUT_CONDITIONS,
        "curves": scores(1.0),
        "per_pair": [{"classes": p, **scores(0.8 + 0.4 * i)} for i, p in enumerate(pairs_ids)],
        "summary_layer": f"llm.{layers}",
        "window_sweep": [
            {
                "layers": [a, min(a + 1, layers)],
                **{
                    c: {"accuracy": 0.8 - KNOCKOUT_EFFECT[c] / a, "iou": 0.6 - KNOCKOUT_EFFECT[c]}
                    for c in KNOCKOUT_CONDITIONS
                },
            }
            for a in range(1, layers + 1, 2)
        ],
    }


def _bidirectional(
    run: Path, stages: list[str], layers: int, grid: int, rng: np.random.Generator
) -> dict[str, Any]:
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
    return {
        "layer": f"llm.{max(1, layers // 2)}",
        "conditions": ["causal", "bidirectional_image"],
        "miou": {
            "causal": dict(zip(stages, _curve(stages, rng), strict=True)),
            "bidirectional_image": dict(zip(stages, _curve(stages, rng, 0.03), strict=True)),
        },
        "position_accuracy_file": "arrays/bidirectional.npz",
    }


def _umap(run: Path, stages: list[str], num_classes: int, rng: np.random.Generator) -> dict:
    arrays = {}
    scores = {}
    for i, stage in enumerate(stages):
        labels = rng.integers(0, num_classes, 200)
        centres = rng.normal(0, 3, (num_classes, 2))
        arrays[f"embedding__{stage}"] = centres[labels] * (i + 1) / len(stages) + rng.normal(
            0, 1, (200, 2)
        )
        arrays[f"labels__{stage}"] = labels
        scores[stage] = {"silhouette": 0.1 + 0.1 * i, "knn_accuracy": 0.5 + 0.1 * i}
    save_arrays(run / "arrays/umap.npz", **arrays)
    shown = list(range(min(3, num_classes)))
    return {"stages": stages, "file": "arrays/umap.npz", "scores": scores, "classes": shown}


def make_run(
    tmp_path: Path,
    *,
    conditions: tuple[str, ...] = ("causal",),
    knockout: bool = True,
    bidirectional: bool = True,
    umap: bool = True,
    num_classes: int = 5,
    layers: int = 4,
    grid: int = 4,
    qualitative: bool = True,
    name: str = "run",
    seed: int = 0,
) -> Path:
    """Write a run directory ``tmp_path/name`` and return its path."""
    from seglens.config import RunConfig

    rng = np.random.default_rng(seed)
    run = Path(tmp_path) / name
    stages = ["encoder", "adapter", *(f"llm.{layer}" for layer in range(1, layers + 1))]
    class_names = [f"class_{c}" for c in range(num_classes)]
    palette = rng.integers(0, 256, (num_classes, 3)).tolist()
    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "versions": {"seglens": "0.1.0", "python": "3.11", "torch": "2.x"},
        "git_hash": "0123456789abcdef",
        "seed": seed,
        "created": "2026-01-01T00:00:00+00:00",
        "config": RunConfig(out=str(run), seed=seed).to_dict(),
        "model": {
            "name": f"tiny-clip-L{layers}",
            "grid": [grid, grid],
            "num_llm_layers": layers,
            "geometry": "pad",
        },
        "dataset": {
            "name": "synthetic",
            "num_classes": num_classes,
            "class_names": class_names,
            "palette": palette,
            "train_images": 8,
            "eval_images": 4,
            "skipped": {"count": 2, "samples": ["bad_0.png", "bad_1.png"]},
        },
        "probing": {c: _probing(c, stages, num_classes, rng, run) for c in conditions},
    }
    if qualitative:
        qual_stages = ["encoder", "adapter", f"llm.{layers}"]
        results["qualitative"] = _qualitative(run, qual_stages, num_classes, rng)
    if knockout:
        results["knockout"] = _knockout(layers, class_names, rng)
    if bidirectional:
        results["bidirectional"] = _bidirectional(run, stages, layers, grid, rng)
    if umap:
        results["umap"] = _umap(run, ["adapter", f"llm.{layers}"], num_classes, rng)
    _add_evidence(results, stages, layers, rng)
    write_json(run / "results.json", results)
    return run


def _add_evidence(results: dict, stages: list[str], layers: int, rng) -> None:
    """The paired intervals, convergence record and attention section of each analysis run."""
    import fixtures_evidence as evidence

    for block in results["probing"].values():
        block["differences"] = evidence.probing_differences(stages, rng)
        block["convergence"] = evidence.convergence(stages)
    if "knockout" in results:
        results["knockout"]["differences"] = evidence.knockout_differences(layers, rng)
        pairs = [p["classes"] for p in results["knockout"]["pairs"]]
        results["attention"] = evidence.attention(layers, pairs, rng)
    if "bidirectional" in results:
        layer = results["bidirectional"]["layer"]
        diff = evidence.bidirectional_differences(stages, layer, rng)
        results["bidirectional"]["differences"] = diff
