"""Synthetic evidence sections for the report fixture: paired intervals of a probing condition,
of the knockout (per control pool), of the bidirectional analysis, and attention to anchors."""

from __future__ import annotations

from typing import Any

import numpy as np

POOLS = ("outside_pair", "pair", "image")


def interval(rng: np.random.Generator, centre: float, width: float = 0.05) -> dict[str, Any]:
    est = float(centre + rng.normal(0, 0.01))
    return {"estimate": est, "low": est - width, "high": est + width, "n_images": 4}


def probing_differences(stages: list[str], rng: np.random.Generator) -> dict[str, Any]:
    llm = [s for s in stages if s.startswith("llm.")]
    return {
        "level": "patch",
        "metric": "miou",
        "n_resamples": 100,
        "confidence": 0.95,
        "seed": 0,
        "adapter_minus_encoder": interval(rng, -0.1),
        "llm_minus_adapter": {s: interval(rng, 0.02 * i) for i, s in enumerate(llm)},
        "best_llm_minus_adapter": {"stage": llm[-1], **interval(rng, 0.1)},
    }


def convergence(stages: list[str]) -> dict[str, Any]:
    return {
        "not_converged": stages[-1:],
        "not_checked": [],
        "lr_at_grid_edge": stages[:1],
        "warnings": [],
    }


def knockout_differences(layers: int, rng: np.random.Generator) -> dict[str, Any]:
    stages = [f"llm.{i}" for i in range(1, layers + 1)]
    names = ("block_correct_minus_control", "block_incorrect_minus_control")
    names += ("block_correct_minus_none", "block_incorrect_minus_none")
    names += ("control_correct_minus_none", "control_incorrect_minus_none")
    return {
        "metric": "accuracy",
        "n_resamples": 100,
        "confidence": 0.95,
        "seed": 0,
        "n_images": 4,
        "minus_none": {
            s: {"block_correct": interval(rng, -0.1), "block_incorrect": interval(rng, -0.02)}
            for s in stages
        },
        "pools": {p: {s: {n: interval(rng, -0.05) for n in names} for s in stages} for p in POOLS},
    }


def bidirectional_differences(stages: list[str], layer: str, rng) -> dict[str, Any]:
    return {
        "level": "patch",
        "metric": "miou",
        "n_resamples": 100,
        "confidence": 0.95,
        "seed": 0,
        "bidirectional_minus_causal": {s: interval(rng, 0.03) for s in stages},
        "early_minus_late_gain": {"stage": layer, **interval(rng, 0.1)},
        "missing": [],
    }


def attention(layers: int, pairs: list[list[int]], rng: np.random.Generator) -> dict[str, Any]:
    stages = [f"llm.{i}" for i in range(1, layers + 1)]
    categories = ["anchors", "other_image", "text"]

    def cell() -> dict[str, Any]:
        share = rng.dirichlet([2, 5, 3])
        uniform = rng.dirichlet([2, 5, 3])
        return {
            "queries": 10,
            "share": dict(zip(categories, share.tolist(), strict=True)),
            "uniform": dict(zip(categories, uniform.tolist(), strict=True)),
            "ratio": dict(zip(categories, (share / uniform).tolist(), strict=True)),
        }

    pooled = {
        s: {g: cell() | {"anchor_ratio": interval(rng, 1.2)} for g in ("incorrect", "correct")}
        for s in stages
    }
    return {
        "categories": categories,
        "query_groups": ["incorrect", "correct"],
        "pairs": [
            {
                "classes": p,
                "names": [f"class_{c}" for c in p],
                "images": 3,
                "layers": {s: {g: cell() for g in ("incorrect", "correct")} for s in stages},
            }
            for p in pairs
        ],
        "pooled": pooled,
        "anchor_layers": {"incorrect": stages, "correct": []},
        "statement": "Reference-incorrect tokens read same-class anchors above the uniform "
        f"baseline at {layers} of {layers} LLM layers.",
        "n_resamples": 100,
        "confidence": 0.95,
        "seed": 0,
        "reference_stage": "adapter",
    }
