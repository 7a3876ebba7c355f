"""The layerwise-probing analysis: one linear probe per stage, scored as segmentation (mIoU).

Every other analysis builds on it: its probes define the correct tokens of the knockout, its
evaluation pass feeds UMAP, its section ``probing.<condition>`` holds the curve the report opens
with. The config section is ``seglens.config.ProbeConfig`` (shared with the probe trainers and
the feature cache), the results types ``Condition`` and ``Summary`` live in
``seglens.rundir.schema`` (every analysis reads them); the measurement is
``seglens.analyses.probing.measure``; figures, captions and report blocks are in ``.report``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from seglens.analyses.probing import report
from seglens.analyses.probing.tables import TABLES
from seglens.analyses.registry import Analysis, Block, Command, Panel
from seglens.cli import FLAG, add_run_options, resolve_config
from seglens.config import ProbeConfig
from seglens.experiments.findings import above, below, fmt_interval
from seglens.rundir.schema import Condition, Section

__all__ = ["ANALYSIS", "Qualitative", "run"]


# --- results section --------------------------------------------------------------------------
@dataclass(eq=False)
class Qualitative(Section):
    title: ClassVar[str] = "qualitative"
    file: str
    stages: list[str]
    images: list[str]


# --- run --------------------------------------------------------------------------------------
def run(
    run: Any,
    *,
    vlm: Any = None,
    progress: bool = True,
    on_eval_batch: Callable[[Any, Mapping[str, Any]], None] | None = None,
    **overrides: Any,
) -> Condition:
    """Train and score the probes (``seglens.analyses.probing.measure.run_probing``); ``run`` is a
    ``RunDir`` or a ``RunConfig``, and ``on_eval_batch(batch, states)`` sees every evaluation
    batch (the taps of other analyses)."""
    from seglens.analyses.probing.measure import run_probing

    return run_probing(run, vlm=vlm, progress=progress, on_eval_batch=on_eval_batch, **overrides)


# --- CLI --------------------------------------------------------------------------------------
def _probe_args(p: argparse.ArgumentParser) -> None:
    add_run_options(p)
    p.add_argument("--solver", dest="probe.solver", choices=["sgd", "lda"])
    p.add_argument("--epochs", dest="probe.epochs", type=int, help="sgd passes over train")
    p.add_argument("--lrs", dest="probe.lrs", type=float, nargs="+", help="sgd learning rates")
    p.add_argument("--holdout-fraction", dest="probe.holdout_fraction", type=float)
    p.add_argument("--warmup-batches", dest="probe.warmup_batches", type=int)
    p.add_argument("--shrinkage", dest="probe.shrinkage", type=float, help="lda shrinkage")
    p.add_argument("--exact", dest="probe.exact", **FLAG)
    p.add_argument("--gemm", dest="probe.gemm", choices=["float32", "tf32", "bfloat16"])
    p.add_argument("--eval-every", dest="probe.eval_every", type=int, help="held-out check")
    p.add_argument("--soft-labels", dest="probe.soft_labels", **FLAG)
    p.add_argument("--stages", dest="probe.stages", nargs="+", help="e.g. encoder adapter llm.8")
    p.add_argument("--vision-blocks", dest="probe.vision_blocks", **FLAG)
    p.add_argument("--final-norm", dest="probe.final_norm", **FLAG)
    p.add_argument("--pixel-level", dest="probe.pixel_level", **FLAG)
    p.add_argument("--bootstrap", dest="probe.bootstrap", type=int, help="resamples (0: off)")
    p.add_argument("--qualitative", dest="probe.qualitative", type=int, help="images drawn")
    p.add_argument("--cache-dir", dest="probe.cache_dir", help="train from a feature cache here")
    p.add_argument("--cache-stages", dest="probe.cache_stages", nargs="+", help="cached stages")
    p.add_argument(
        "--cache-tokens-per-image",
        dest="probe.cache_tokens_per_image",
        type=int,
        help="cache a seeded subset of tokens per image",
    )


def _probe(args: argparse.Namespace) -> int:
    from seglens.analyses.probing.measure import run_probing
    from seglens.commands import draw

    config = resolve_config(args)
    section = run_probing(config)
    draw(config.out)
    print(f"{'stage':<16} {'patch mIoU':>10} {'pixel mIoU':>10}")
    for stage in section.stages:
        m = section.metrics[stage]
        cells = [(m[level] or {}).get("miou") for level in ("patch", "pixel")]
        print(
            f"{stage:<16} "
            + " ".join(f"{c:>10.4f}" if c is not None else f"{'-':>10}" for c in cells)
        )
    best = section.summary
    print(f"best: {best.best_stage} ({best.level} mIoU {best.best_miou:.4f})")
    print(f"results: {config.out}/results.json")
    return 0


# --- findings (a) and (b) ---------------------------------------------------------------------
def findings(results: Mapping[str, Any], arrays: Callable[[str], Any]) -> dict[str, dict]:
    """Findings (a) *drop* (the adapter's patch mIoU is below the encoder's) and (b) *recovery*
    (the best LLM layer is above the adapter), on paired intervals of the clean condition."""
    from seglens.results import clean_condition

    clean = clean_condition(results)
    diff = _patch_differences(results, arrays(clean) or {}, clean)
    metrics = results["probing"][clean]["metrics"]
    names = list(results["dataset"]["class_names"])
    return {"drop": _drop(diff, metrics), "recovery": _recovery(diff, metrics, names)}


def _patch_differences(results: Mapping, table: Mapping[str, Any], clean: str) -> dict:
    """Paired patch-level mIoU intervals of the clean condition (whatever level its summary uses:
    patch labels are what the probes are trained on, and the less noisy level)."""
    from seglens.experiments.differences import counts_from_arrays, probing_differences

    stages = results["probing"][clean]["stages"]
    counts = {s: c for s in stages if (c := counts_from_arrays(table, s, "patch", "miou"))}
    return probing_differences(counts, stages, level="patch", seed=int(results.get("seed", 0)))


def _drop(diff: Mapping, metrics: Mapping) -> dict:
    interval = diff.get("adapter_minus_encoder")
    if not interval:
        return {"holds": None, "text": "the encoder or the adapter was not probed"}
    enc, ada = (metrics[s]["patch"]["miou"] for s in ("encoder", "adapter"))
    text = (
        f"encoder {enc:.3f} -> adapter {ada:.3f} patch mIoU, change {fmt_interval(interval)} "
        f"(paired 95% interval over {interval['n_images']} images)"
    )
    return {"holds": below(interval), "adapter_minus_encoder": interval, "text": text}


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
        f"the adapter {fmt_interval(best)} (the best layer re-chosen in every resample); of the "
        f"{len(hit)} classes the adapter loses IoU on, {len(regained)} regain it at {stage}"
    )
    return {
        "holds": above(best),
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


def paired(results: Mapping[str, Any], arrays: Callable[[str], Any], weights: Any) -> dict:
    """(a) and (b)'s statistics on the image weights ``weights`` (R, n_eval): adapter minus
    encoder patch mIoU, and the best LLM layer (re-chosen per row) minus the adapter, as in
    ``findings`` (see ``Analysis.paired``)."""
    import numpy as np

    from seglens.experiments.differences import counts_from_arrays
    from seglens.experiments.stats import resampled_metric
    from seglens.results import clean_condition
    from seglens.rundir.schema import probing_arrays
    from seglens.stages import llm_layer

    clean = clean_condition(results)
    table = arrays(probing_arrays(clean)) or {}
    stages = results["probing"][clean]["stages"]
    counts = {s: c for s in stages if (c := counts_from_arrays(table, s, "patch", "miou"))}
    miou = {s: resampled_metric(c, "miou", weights) for s, c in counts.items()}  # (R,) each
    out: dict[str, dict] = {}
    if "adapter" in miou and "encoder" in miou:
        values = miou["adapter"] - miou["encoder"]
        out["drop"] = {"adapter_minus_encoder": {"values": values, "direction": "below"}}
    llm = [s for s in stages if llm_layer(s) is not None and s in miou]
    if "adapter" in miou and llm:
        per_layer = np.stack([miou[s] for s in llm])  # (L, R)
        with np.errstate(all="ignore"):
            best = np.nanmax(np.where(np.isnan(per_layer), -np.inf, per_layer), axis=0)
        values = np.where(np.isfinite(best), best, np.nan) - miou["adapter"]
        out["recovery"] = {"best_llm_minus_adapter": {"values": values, "direction": "above"}}
    return out


# --- planned forwards -------------------------------------------------------------------------
def probing_forwards(config: Any, train: int, evaluation: int, layers: int) -> dict[str, Any]:
    """Training (warm-up, epochs, held-out checks; or lda's one pass) and the evaluation pass."""
    probe, batch = config.probe, config.data.batch_size
    if probe.solver == "lda":
        return {"forwards": train + evaluation, "bound": False, "detail": "1 train + 1 eval pass"}
    hold = 0 if probe.holdout_fraction <= 0 else max(1, round(probe.holdout_fraction * train))
    fit = train - hold
    early = probe.early_stopping and hold > 0
    checks = (
        1 if not early or probe.eval_every is None else math.ceil(fit / (probe.eval_every * batch))
    )
    held = hold * checks * (probe.epochs if early else 1) if hold else 0
    if probe.cache_dir is not None:  # one pass fills the cache; the held-out checks stay live
        training = fit
        detail = f"cache fill ({fit}) + held-out checks ({held}) + eval ({evaluation})"
    else:
        warmup = min(probe.warmup_batches, math.ceil(fit / batch)) * batch
        training = min(warmup, fit) + probe.epochs * fit
        detail = (
            f"warm-up + {probe.epochs} epochs ({training}) + held-out checks ({held}) "
            f"+ eval ({evaluation})"
        )
    return {"forwards": training + held + evaluation, "bound": early, "detail": detail}


ANALYSIS = Analysis(
    name="probing",
    title="train a linear probe per stage and score segmentation (mIoU) per stage",
    run=run,
    config_key="probe",
    config=ProbeConfig,
    enabled=lambda config: True,  # every other analysis reads its probes
    sections={"probing.*": Condition, "qualitative": Qualitative},
    figures=report.FIGURES,
    report=(
        Block("probing", "Layerwise probing", report.block),
        Block("qualitative", "Qualitative maps", report.qualitative_block),
    ),
    question="A linear probe at every stage (the vision encoder, the adapter that maps image "
    "features into the language model, and every LLM layer) predicts the semantic class of "
    "each image token; its segmentation quality (mIoU) traces how much of that information "
    "each stage carries.",
    findings=findings,
    paired=paired,
    finding_names={
        "drop": "(a) Drop at the adapter",
        "recovery": "(b) Recovery in the LLM",
    },
    command=Command(
        "probe",
        "train a linear probe per stage and score segmentation (mIoU) per stage",
        _probe_args,
        _probe,
    ),
    forwards=probing_forwards,
    tables=TABLES,
    overview=Panel(
        "probe mIoU per stage",
        report.overview_panel,
        "Probe mIoU per stage with its 95% interval: the change at the adapter (red) and the "
        "gain across the LLM to its best layer (green); the star marks the best stage.",
        width=1.25,
    ),
)
