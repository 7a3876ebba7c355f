"""The paper's four findings, read off a finished run: each a verdict on paired 95% intervals.

(a) *drop*: the adapter's patch mIoU is below the encoder's; (b) *recovery*: the best LLM layer is
above the adapter; (c) *anchors*: at the last LLM layer, blocking attention to the tokens the
reference probe gets right hurts more than a size-matched random set, and blocking the wrong ones
hurts no more than theirs; (d) *early positions*: under causal attention the first image rows gain
less over the adapter than the last rows, and bidirectional image attention raises the first rows'
gain. Every verdict comes from a paired bootstrap over evaluation images (both sides of each
difference resampled together) on the counts the analyses saved; a finding whose analysis did not
run is ``None``, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from seglens.experiments.differences import counts_from_arrays, probing_differences
from seglens.experiments.stats import bootstrap_contrast, paired_bootstrap

__all__ = ["FINDINGS", "read_findings"]

FINDINGS = ("drop", "recovery", "anchors", "early_positions")
Interval = dict[str, Any]


def _fmt(interval: Interval | None) -> str:
    if not interval or interval.get("low") is None:
        return "n/a"
    return f"{interval['estimate']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def _below(interval: Interval | None) -> bool | None:
    """True when the whole interval is below zero (None when there is no interval)."""
    return None if not interval or interval.get("high") is None else interval["high"] < 0


def _above(interval: Interval | None) -> bool | None:
    return None if not interval or interval.get("low") is None else interval["low"] > 0


def _all(*verdicts: bool | None) -> bool | None:
    return None if any(v is None for v in verdicts) else all(verdicts)


def _patch_differences(results: Mapping, table: Mapping[str, np.ndarray], clean: str) -> dict:
    """Paired patch-level mIoU intervals of the clean condition (whatever level its summary uses:
    patch labels are what the probes are trained on, and the less noisy level)."""
    stages = results["probing"][clean]["stages"]
    counts = {s: c for s in stages if (c := counts_from_arrays(table, s, "patch", "miou"))}
    return probing_differences(counts, stages, level="patch", seed=int(results.get("seed", 0)))


def _drop(diff: Mapping, metrics: Mapping) -> dict:
    interval = diff.get("adapter_minus_encoder")
    if not interval:
        return {"holds": None, "text": "the encoder or the adapter was not probed"}
    enc, ada = (metrics[s]["patch"]["miou"] for s in ("encoder", "adapter"))
    text = (
        f"encoder {enc:.3f} -> adapter {ada:.3f} patch mIoU, change {_fmt(interval)} "
        f"(paired 95% interval over {interval['n_images']} images)"
    )
    return {"holds": _below(interval), "adapter_minus_encoder": interval, "text": text}


def _recovery(diff: Mapping, metrics: Mapping, names: list[str]) -> dict:
    best = diff.get("best_llm_minus_adapter")
    if not best:
        return {"holds": None, "text": "the adapter or no LLM layer was probed"}
    stage = best["stage"]
    per_class = _per_class(metrics, stage, names)
    hit = [c for c, v in per_class.items() if v["adapter"] < v["encoder"]]
    regained = [c for c in hit if per_class[c]["best_llm"] > per_class[c]["adapter"]]
    text = (
        f"best LLM layer {stage} at {metrics[stage]['patch']['miou']:.3f} patch mIoU, gain over "
        f"the adapter {_fmt(best)} (the best layer re-chosen in every resample); of the "
        f"{len(hit)} classes the adapter loses IoU on, {len(regained)} regain it at {stage}"
    )
    return {
        "holds": _above(best),
        "best_llm_minus_adapter": best,
        "per_class": per_class,
        "hit_at_adapter": hit,
        "regained_in_llm": regained,
        "text": text,
    }


def _per_class(metrics: Mapping, best: str, names: list[str]) -> dict[str, dict]:
    """Patch IoU per class at the encoder, the adapter and the best LLM layer (classes that
    occur in the evaluation split)."""
    iou = {s: metrics[s]["patch"]["per_class_iou"] for s in ("encoder", "adapter", best)}
    return {
        name: {"encoder": iou["encoder"][k], "adapter": iou["adapter"][k], "best_llm": iou[best][k]}
        for k, name in enumerate(names)
        if None not in (iou["encoder"][k], iou["adapter"][k], iou[best][k])
    }


def _anchors(knockout: Mapping | None) -> dict:
    """(c) under every control pool the run used (a finding must survive the fairest control)."""
    none = {"holds": None, "text": "the knockout analysis did not run or found no pair to test"}
    if not knockout or not (knockout.get("differences") or {}).get("pools"):
        return none
    stage = knockout.get("summary_layer")
    pools, verdicts, parts = {}, [], []
    for pool, per_stage in knockout["differences"]["pools"].items():
        diff = per_stage.get(stage) or {}
        correct = diff.get("block_correct_minus_control")
        incorrect = diff.get("block_incorrect_minus_control")
        not_below = None if (incorrect or {}).get("high") is None else incorrect["high"] >= 0
        verdicts.append(_all(_below(correct), not_below))
        pools[pool] = {
            "block_correct_minus_control": correct,
            "block_incorrect_minus_control": incorrect,
        }
        parts.append(f"{pool}: correct {_fmt(correct)}, incorrect {_fmt(incorrect)}")
    text = (
        f"at {stage}, pair-token accuracy of blocking the reference-correct (incorrect) tokens "
        f"minus a size-matched random control, per control pool: " + "; ".join(parts)
    )
    return {"holds": _all(*verdicts), "stage": stage, "pools": pools, "text": text}


def _early_positions(
    results: Mapping, arrays: Callable[[str], Mapping[str, np.ndarray] | None], clean: str
) -> dict:
    bidir = results.get("bidirectional")
    none = {"holds": None, "text": "the bidirectional analysis did not run"}
    if not bidir:
        return none
    stage = bidir["layer"]
    causal, full = arrays("causal"), arrays("bidirectional_image")
    if causal is None or full is None:
        return none

    def band(table, s, which):
        return counts_from_arrays(table, s, which, "accuracy")

    sides = [band(causal, stage, "early"), band(causal, "adapter", "early")]
    sides += [band(causal, stage, "late"), band(causal, "adapter", "late")]
    sides += [band(full, stage, "early")]
    if any(s is None for s in sides):
        return none
    options = dict(n_resamples=1000, seed=int(results.get("seed", 0)))
    share = (results.get("config") or {}).get("probe", {}).get("position_band", 0.25)
    causal_gap = bootstrap_contrast(
        [(1, sides[0]), (-1, sides[1]), (-1, sides[2]), (1, sides[3])], "accuracy", **options
    )
    raised = paired_bootstrap(sides[4], sides[0], "accuracy", **options)
    text = (
        f"at {stage}, causal: first-rows gain minus last-rows gain over the adapter "
        f"{_fmt(causal_gap)}; bidirectional minus causal on the first rows {_fmt(raised)} "
        f"(token accuracy on the first / last {share:.0%} of image positions)"
    )
    return {
        "holds": _all(_below(causal_gap), _above(raised)),
        "stage": stage,
        "causal_early_minus_late_gain": causal_gap,
        "bidirectional_minus_causal_early": raised,
        "clean_condition": clean,
        "text": text,
    }


def read_findings(
    results: Mapping[str, Any], arrays: Callable[[str], Mapping[str, np.ndarray] | None]
) -> dict[str, dict]:
    """The four findings of a run.

    Args:
        results: the run's ``results.json``.
        arrays: condition name -> that condition's saved probing arrays (``probing_<cond>.npz``),
            or None when it was not saved.

    Returns:
        ``{finding: {"holds": bool | None, "text": str, <intervals>...}}`` for ``FINDINGS``.
    """
    from seglens.results import clean_condition

    clean = clean_condition(results)
    table = arrays(clean) or {}
    diff = _patch_differences(results, table, clean)
    metrics = results["probing"][clean]["metrics"]
    return {
        "drop": _drop(diff, metrics),
        "recovery": _recovery(diff, metrics, list(results["dataset"]["class_names"])),
        "anchors": _anchors(results.get("knockout")),
        "early_positions": _early_positions(results, arrays, clean),
    }


def write_findings(run_dir) -> dict[str, dict]:
    """Read the four findings off ``run_dir`` and store them as its ``findings`` section."""
    from pathlib import Path

    from seglens.rundir import RESULTS, load_results, put_section
    from seglens.rundir.files import load_arrays
    from seglens.rundir.schema import probing_arrays

    run_dir = Path(run_dir)
    results = load_results(run_dir / RESULTS)

    def arrays(condition: str):
        path = run_dir / probing_arrays(condition)
        return load_arrays(path) if path.is_file() else None

    return put_section(run_dir, "findings", read_findings(results, arrays))
