"""Scale and speed of probing: one table of ratios, every number measured side by side in one run.

Rows:
(a) ``train_probes`` + ``evaluate_probes`` end to end (sgd, pixel level) vs a forward loop to
    the same depth (the last probed stage) over the same images, with the same loader
    (``stream_batches``: loading and collation in both): the cost floor.
(b) peak RSS of the same run at N and 4N training images, each in a fresh subprocess: streaming
    keeps it flat (ratio ~1).
(c) ``train_probes`` (lda) throughput with 2 gloo processes x 1 thread vs 1 process x 2 threads
    (torchrun); on a 2-core CPU there are no extra cores, so this shows the overhead of going
    distributed, not a speed-up.
(d) lda vs sgd (1 epoch): time and mean patch mIoU over stages.
(e) sgd for 3 epochs: fp16 feature cache (write once, then 3 epochs from disk) vs re-running the
    model every epoch: time ratio and the largest probe weight difference.

Every ratio is measured in each of >= 5 interleaved rounds (order rotated; subprocess rows
launch a fresh process per round) and printed as min / median / max over the rounds.

Usage: ``python bench/bench_scale.py [--images 32] [--eval-images 16] [--threads 2] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from _rounds import check_rounds, interleaved, ratios, spread
from seglens.analyses.probing.measure import evaluate_probes, train_probes
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SyntheticDataset
from seglens.experiments.streaming import stream_batches
from seglens.models import tiny_llava

C = 12
SIZES = dict(text_width=384, text_layers=6, vision_width=128, vision_layers=4, heads=8)
STAGES = ["encoder", "adapter", "llm.2", "llm.4", "llm.6"]
DATA = DataConfig(batch_size=8)
SGD = ProbeConfig(  # one fixed epoch (no early stopping: there is no holdout here)
    solver="sgd",
    lrs=(1e-2,),
    epochs=1,
    early_stopping=False,
    holdout_fraction=0.0,
    warmup_batches=1,
    bootstrap=0,
    qualitative=0,
)


def datasets(n: int, n_eval: int):
    train = SyntheticDataset(num_images=n, num_classes=C, split="train")
    return train, SyntheticDataset(num_images=n_eval, num_classes=C, split="val")


def probe_run(vlm, train, evaluation, cfg: ProbeConfig) -> tuple[float, float, object]:
    """(seconds, mean patch mIoU over stages, bank) of train + evaluate."""
    start = time.perf_counter()
    bank = train_probes(vlm, train, STAGES, cfg, data_config=DATA, progress=False)
    res = evaluate_probes(
        vlm, bank, evaluation, STAGES, cfg, data_config=DATA, qualitative=[], progress=False
    )
    seconds = time.perf_counter() - start
    miou = sum(m["patch"]["miou"] for m in res.metrics().values()) / len(STAGES)
    return seconds, miou, bank


def floor_forward(vlm, datasets_) -> float:
    """Seconds to load, collate and forward ``datasets_`` to the last probed stage (the same
    loader and depth as ``probe_run``)."""
    start = time.perf_counter()
    for dataset in datasets_:
        for b in stream_batches(vlm, dataset, DATA, C, {}, False, "floor"):
            vlm.capture(b, STAGES[-1:])
    return time.perf_counter() - start


def weight_gap(a, b) -> float:
    return max(float((a.probes[s].coef_ - b.probes[s].coef_).abs().max()) for s in STAGES)


# --- subprocess workers ---------------------------------------------------------------------
def worker_memory(n: int, n_eval: int) -> None:
    vlm = tiny_llava("clip", **SIZES)
    train, evaluation = datasets(n, n_eval)
    probe_run(vlm, train, evaluation, replace(SGD, pixel_level=True))
    print(json.dumps({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def worker_throughput(n: int) -> None:
    from seglens import distributed

    with distributed.process_group():
        vlm = tiny_llava("clip", **SIZES)
        train, _ = datasets(n, 1)
        cfg = replace(SGD, solver="lda")
        train_probes(vlm, train.limit(DATA.batch_size), STAGES, cfg, data_config=DATA)  # warm
        distributed.barrier()
        start = time.perf_counter()
        train_probes(vlm, train, STAGES, cfg, data_config=DATA, progress=False)
        distributed.barrier()
        seconds = time.perf_counter() - start
        if distributed.is_main():
            print(json.dumps({"seconds": seconds}))


def _run_json(cmd: list[str], env: dict) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32, help="training images (N)")
    parser.add_argument("--eval-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in total")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5)")
    parser.add_argument("--worker", choices=["memory", "throughput"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker == "memory":
        worker_memory(args.images, args.eval_images)
        return 0
    if args.worker == "throughput":
        worker_throughput(args.images)
        return 0

    n, n_eval = args.images, args.eval_images
    print(
        f"{platform.machine()}, {platform.processor() or '?'}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, {args.threads} threads; N = {n}, eval {n_eval}"
    )
    vlm = tiny_llava("clip", **SIZES)
    train, evaluation = datasets(n, n_eval)
    rows = []

    R = check_rounds(args.rounds)

    def row(name: str, values: list[float], detail: str) -> None:
        rows.append((name, *spread(values), detail))

    # (a) end to end vs the floor: both load, collate and forward the warm-up batch, the N
    # training and the eval images to the same depth (the last probed stage)
    probe_run(vlm, train.limit(8), evaluation.limit(8), SGD)  # warm caches
    floor_sets = [train.limit(DATA.batch_size), train, evaluation]
    pixel = replace(SGD, pixel_level=True)
    t = interleaved(
        {
            "floor": lambda: floor_forward(vlm, floor_sets),
            "probe": lambda: probe_run(vlm, train, evaluation, pixel)[0],
        },
        R,
    )
    images = DATA.batch_size + n + n_eval
    med = {k: statistics.median(v) for k, v in t.items()}
    row(
        "(a) probe / forward floor, time",
        ratios(t["probe"], t["floor"]),
        f"{images / med['probe']:.1f} vs {images / med['floor']:.1f} img/s",
    )

    # (b) peak memory, a fresh process per size and round
    me = [sys.executable, __file__, "--threads", str(args.threads), "--worker", "memory"]

    def memory(k: int):
        cmd = [*me, "--images", str(k * n), "--eval-images", str(k * n_eval)]
        return lambda: float(_run_json(cmd, {})["maxrss_kib"])

    rss = interleaved({1: memory(1), 4: memory(4)}, R, timer=lambda fn: fn())
    row(
        "(b) peak RSS 4N / N",
        ratios(rss[4], rss[1]),
        f"{statistics.median(rss[1]) / 1024:.0f} vs {statistics.median(rss[4]) / 1024:.0f} MiB",
    )

    # (c) 2 gloo processes vs 1 (same total threads); each launch reports its steady-state
    # seconds (after a warm-up pass), so start-up is excluded on both sides
    torchrun = str(Path(sys.executable).with_name("torchrun"))

    def launch(procs: int):
        threads = str(max(1, args.threads // procs))
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(procs), __file__]
        cmd += ["--worker", "throughput", "--images", str(2 * n), "--threads", threads]
        return lambda: float(_run_json(cmd, {"OMP_NUM_THREADS": threads})["seconds"])

    tput = interleaved({1: launch(1), 2: launch(2)}, R, timer=lambda fn: fn())
    row(
        "(c) 2 procs / 1 proc, throughput",
        ratios(tput[2], tput[1], inverse=True),
        f"{2 * n / statistics.median(tput[2]):.1f} vs {2 * n / statistics.median(tput[1]):.1f}"
        " img/s (lda)",
    )

    # (d) lda vs sgd
    found = {}

    def solver_run(name: str, cfg: ProbeConfig):
        def run() -> float:
            seconds, found[name], _ = probe_run(vlm, train, evaluation, cfg)
            return seconds

        return run

    t = interleaved(
        {"sgd": solver_run("sgd", SGD), "lda": solver_run("lda", replace(SGD, solver="lda"))},
        R,
        timer=lambda fn: fn(),
    )
    row(
        "(d) lda / sgd, time",
        ratios(t["lda"], t["sgd"]),
        f"{statistics.median(t['lda']):.1f} s vs {statistics.median(t['sgd']):.1f} s",
    )
    gap = found["lda"] - found["sgd"]
    rows.append(
        (
            "(d) lda - sgd, mean patch mIoU",
            gap,
            gap,
            gap,
            f"{found['lda']:.4f} vs {found['sgd']:.4f}",
        )
    )

    # (e) cache vs re-running the model, 3 epochs
    three = replace(SGD, epochs=3)
    banks = {}

    def epochs_run(name: str):
        def run() -> float:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = (
                    replace(three, cache_dir=str(Path(tmp) / "cache")) if name == "cache" else three
                )
                seconds, found[name], banks[name] = probe_run(vlm, train, evaluation, cfg)
            return seconds

        return run

    t = interleaved(
        {"live": epochs_run("live"), "cache": epochs_run("cache")}, R, timer=lambda fn: fn()
    )
    row(
        "(e) cache / live, 3 epochs, time",
        ratios(t["cache"], t["live"]),
        f"{statistics.median(t['cache']):.1f} s vs {statistics.median(t['live']):.1f} s"
        " (incl. eval)",
    )
    w = weight_gap(banks["cache"], banks["live"])
    rows.append(
        (
            "(e) cache vs live, max |coef| gap",
            w,
            w,
            w,
            f"mIoU {found['cache']:.4f} vs {found['live']:.4f} (fp16 cache)",
        )
    )

    print(f"\n{R} interleaved rounds; min / median / max of the per-round ratio")
    print(f"{'measurement':<36} {'min':>8} {'median':>8} {'max':>8}   detail")
    for name, lo, med, hi, detail in rows:
        print(f"{name:<36} {lo:>8.3g} {med:>8.3g} {hi:>8.3g}   {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
