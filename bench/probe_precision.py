"""The probes' default float32 arithmetic against ``probe.exact`` (float64), measured (issue 25).

    python bench/probe_precision.py organism --out runs/precision   # the shipped organism
    python bench/probe_precision.py realwidth                        # LLaVA-1.5-7B widths

``organism``: ``seglens run`` of the shipped organism with the golden-test settings
(``seglens.organism.ANALYSIS``, UMAP off, sgd from the feature cache) once per path (exact,
float32, and with ``--bf16`` also bfloat16 GEMMs): per-stage patch mIoU of each path minus the
exact one, and whether every finding's verdict (``holds``) is the same.

``realwidth``: the LLaVA-1.5-7B architecture of ``realsize.py`` (random weights, 2 LLM layers,
``--dtype``, float32 by default) on its synthetic ADE20K-sized images (150 classes); the
features of every stage are captured once, then sgd (3 lrs, a few epochs, lr picked on a
holdout) and lda probes are trained on them per path and scored at patch level on separate
images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

PATHS = {"exact": {"probe.exact": True}, "float32": {}, "bfloat16": {"probe.gemm": "bfloat16"}}


def organism(args) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from organism import numbers

    paths = ["exact", "float32"] + (["bfloat16"] if args.bf16 else [])
    rows = {}
    for name in paths:
        start = time.perf_counter()
        done = Path(args.out) / name / "results.json"
        if args.reuse and done.is_file():
            from seglens.rundir.files import read_json

            results = read_json(done)
        else:
            results = analyse(Path(args.out) / name, PATHS[name])
        metrics = results["probing"]["causal"]["metrics"]
        rows[name] = {
            "miou": {s: m["patch"]["miou"] for s, m in metrics.items()},
            "numbers": numbers(results),
            "seconds": time.perf_counter() - start,
        }
        print(f"# {name}: {rows[name]['seconds']:.0f} s", flush=True)
    ref = rows["exact"]
    print(f"\n{'stage':10s} {'exact':>8s} " + " ".join(f"{p + ' - exact':>16s}" for p in paths[1:]))
    for stage, value in ref["miou"].items():
        gaps = " ".join(f"{rows[p]['miou'][stage] - value:+16.4f}" for p in paths[1:])
        print(f"{stage:10s} {value:8.4f} {gaps}")
    verdicts = [k for k in ref["numbers"] if k.startswith("holds: ")]
    for p in paths[1:]:
        worst = max(abs(rows[p]["miou"][s] - v) for s, v in ref["miou"].items())
        same = all(rows[p]["numbers"][k] == ref["numbers"][k] for k in verdicts)
        print(f"{p}: largest |patch mIoU gap| {worst:.4f}; same findings verdicts: {same}")
        for k in verdicts:
            print(f"  {k[7:]:20s} exact {ref['numbers'][k]}  {p} {rows[p]['numbers'][k]}")
    Path(args.out, "precision.json").write_text(json.dumps(rows, indent=1))
    return 0


def analyse(out: Path, overrides: dict) -> dict:
    """``bench/organism.py``'s analysis of the shipped organism with config ``overrides``."""
    from seglens.config import load_config
    from seglens.experiments.pipeline import run
    from seglens.organism import ANALYSIS
    from seglens.rundir.files import read_json

    config = {**ANALYSIS, "model.name": "organism", "out": str(out), "overwrite": True}
    config |= {"umap.enabled": False, "probe.cache_dir": str(out) + "-cache", **overrides}
    run(load_config(**config), progress=False)
    return read_json(out / "results.json")


def realwidth(args) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from realsize import AdeSized, C, build_llava_7b
    from seglens.config import DataConfig
    from seglens.experiments.streaming import stream_batches
    from seglens.probes import ProbeBank
    from seglens.probes._common import confusion, miou

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    vlm = build_llava_7b(2, args.vision_layers, getattr(torch, args.dtype), "cpu")
    stages = vlm.default_stages
    data = DataConfig(batch_size=2)

    def captured(n: int, seed: int) -> list:
        batches = stream_batches(vlm, AdeSized(n, seed=seed), data, C, {}, False, "capture")
        with torch.inference_mode():
            return [(vlm.capture(b, stages), b.labels) for b in batches]

    train, hold, test = captured(args.train, 1), captured(4, 2), captured(args.eval, 3)
    print(f"# features of {args.train} + 4 + {args.eval} images captured in "
          f"{time.perf_counter() - start:.0f} s; stages {stages}", flush=True)  # fmt: skip
    out = {}
    for solver in ("sgd", "lda"):
        for name in ("exact", "float32", "bfloat16"):
            opts = dict(exact=name == "exact", gemm="float32" if name == "exact" else name)
            if solver == "sgd":
                opts |= dict(lrs=(1e-3, 1e-2, 1e-1), warmup_batches=2)
            bank = ProbeBank(stages, C, solver=solver, **opts)
            t0 = time.perf_counter()
            for _ in range(args.epochs if solver == "sgd" else 1):
                for x, y in train:
                    bank.partial_fit(x, y)
            if solver == "sgd":
                for x, y in hold:
                    bank.validate(x, y)
            bank.select()
            conf = dict.fromkeys(stages, 0)
            for x, y in test:
                pred = bank.predict(x)
                for s in stages:
                    conf[s] = conf[s] + confusion(pred[s].reshape(-1, 1), y.reshape(-1), C)
            out[(solver, name)] = {s: float(miou(c)[0]) for s, c in conf.items()}
            print(f"# {solver} {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"\npatch mIoU on {args.eval} images (150 classes), and gap to the exact path")
    for solver in ("sgd", "lda"):
        ref = out[(solver, "exact")]
        for stage in stages:
            gaps = [out[(solver, n)][stage] - ref[stage] for n in ("float32", "bfloat16")]
            print(f"{solver} {stage:8s} exact {ref[stage]:.4f}  float32 {gaps[0]:+.4f}  "
                  f"bfloat16 {gaps[1]:+.4f}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    o = sub.add_parser("organism", help="the shipped organism, seglens run per path")
    o.add_argument("--out", default="runs/precision")
    o.add_argument("--bf16", action="store_true", help="also bfloat16 GEMMs")
    o.add_argument("--reuse", action="store_true", help="reuse finished runs under --out")
    r = sub.add_parser("realwidth", help="LLaVA-1.5-7B widths, random weights, 2 LLM layers")
    r.add_argument("--train", type=int, default=16, help="training images")
    r.add_argument("--eval", type=int, default=8, help="evaluation images")
    r.add_argument("--epochs", type=int, default=5, help="sgd passes")
    r.add_argument("--vision-layers", type=int, default=24)
    r.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the model's dtype (bfloat16 where the CPU or GPU has a bf16 unit)",
    )
    r.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    return organism(args) if args.what == "organism" else realwidth(args)


if __name__ == "__main__":
    sys.exit(main())
