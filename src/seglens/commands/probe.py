"""``seglens probe``: train one linear probe per stage and score it (``run_probing``)."""

from __future__ import annotations

import argparse

from seglens.cli import FLAG, add_run_options, command, resolve_config


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


@command("probe", "train a linear probe per stage and score segmentation (mIoU) per stage")(
    _probe_args
)
def _probe(args: argparse.Namespace) -> int:
    from seglens.commands import draw
    from seglens.experiments.probing import run_probing

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
