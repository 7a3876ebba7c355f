"""Cost of streamed layerwise probing, on a model with LLaVA-1.5-7B's probe/forward FLOP ratio.

Prints, from one run with >= 5 interleaved rounds (min / median / max of per-round ratios):
1. per batch: (forward + capture + every stage's probe update) / (a forward to the same depth),
   target <= 1.15 for sgd (K lrs side by side); also capture alone and lda updates;
2. end to end: ``train_probes`` (streamed: sgd 1 epoch, sgd E epochs, lda) against the naive
   route (cache all stages' features of all training images, then scikit-learn
   LogisticRegression per stage): time ratio, the cache's memory, and the patch-level mIoU of
   each on the same evaluation features.

Usage: ``python bench/bench_probe.py [--reps 5] [--images 64] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
import transformers

from _rounds import interleaved, ratio_table, ratios, spread
from seglens.analyses.probing.measure import train_probes
from seglens.config import DataConfig, ProbeConfig
from seglens.data import SyntheticDataset, iterate_samples
from seglens.metrics import ConfusionMatrix
from seglens.models import tiny_llava
from seglens.probes import ProbeBank

C, K = 12, 3  # classes (the synthetic maximum), learning rates side by side
SIZES = dict(text_width=384, text_layers=6, vision_width=128, vision_layers=4, heads=8)


def flop_ratio(vlm, stages: list[str]) -> float:
    """Probe FLOPs (fwd + bwd, K lrs) / forward FLOPs, per image."""
    inner = vlm.model.model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    lm = inner.language_model
    n_llm = count(lm) - lm.embed_tokens.weight.numel()
    N, T = vlm.num_image_tokens, len(vlm.token_ids())
    forward = 2 * n_llm * T + 2 * count(inner.vision_tower) * (N + 1)
    forward += 2 * count(inner.multi_modal_projector) * N
    widths = vlm.family.stage_widths()
    return sum(2 * widths[s] * C * K * 3 for s in stages) * N / forward


def llava_ratio() -> float:
    forward = 2 * 6.7e9 * (576 + 40)
    return 34 * 2 * 4096 * 150 * K * 3 * 576 / forward


def collate_all(vlm, dataset, batch_size: int) -> list:
    stream = iterate_samples(
        dataset, batch_size=batch_size, transform=vlm.preprocessor(C), progress=False
    )
    return [vlm.collate(prepared) for prepared in stream]


def patch_miou(predict, eval_features: list[dict], eval_labels: list, stage: str) -> float:
    cm = ConfusionMatrix(C)
    for features, labels in zip(eval_features, eval_labels, strict=True):
        cm.update(predict(features[stage]), labels)
    return cm.miou()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds (>= 5)")
    parser.add_argument("--images", type=int, default=64, help="training images")
    parser.add_argument("--eval-images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the multi-epoch route")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    vlm = tiny_llava("clip", **SIZES)
    stages = vlm.default_stages
    train = SyntheticDataset(args.images, C, split="train")
    evaluation = SyntheticDataset(args.eval_images, C, split="val")
    batches = collate_all(vlm, train, args.batch)
    print(f"model: tiny LLaVA {SIZES}, {len(stages)} stages, C={C}, K={K}")
    ours, theirs = flop_ratio(vlm, stages), llava_ratio()
    print(f"probe/forward FLOPs: this model {ours:.4f}, LLaVA-1.5-7B {theirs:.4f}")
    threads, cpus = torch.get_num_threads(), os.cpu_count()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, ", end="")
    print(f"{platform.machine()}, {threads} threads, {cpus} cpus")

    # 1. per batch, loading excluded: the same pre-collated batches for every mode, every mode
    # stopping at the same depth (the last stage), so the floor is a forward to that stage.
    first = vlm.capture(batches[0], stages)
    last = [stages[-1]]

    def sgd_bank() -> ProbeBank:
        bank = ProbeBank(stages, C, solver="sgd", warmup_batches=1)
        return bank.partial_fit(first, batches[0].labels)  # freezes the standardisers (untimed)

    def timed(run, prepare=lambda: None):
        def mode() -> float:
            state = prepare()
            start = time.perf_counter()
            run(state)
            return time.perf_counter() - start

        return mode

    def floor(_) -> None:
        for b in batches:
            vlm.capture(b, last)

    def capture(_) -> None:
        for b in batches:
            vlm.capture(b, stages)

    def stream(bank) -> None:
        for b in batches:
            bank.partial_fit(vlm.capture(b, stages), b.labels)

    modes = {
        "floor: forward to last stage": timed(floor),
        "capture": timed(capture),
        "capture + sgd updates": timed(stream, sgd_bank),
        "capture + lda updates": timed(stream, lambda: ProbeBank(stages, C, solver="lda")),
    }
    for mode in modes.values():  # warm up kernels and allocator
        mode()
    times = interleaved(modes, args.reps)
    print(
        f"\nper pass over {len(batches)} batches of {args.batch}, {args.reps} interleaved rounds,"
    )
    print("ratio to the floor per round:")
    for line in ratio_table(times, "floor: forward to last stage"):
        print(line)

    # 2. end to end: streamed train_probes vs caching everything and fitting scikit-learn.
    data = DataConfig(batch_size=args.batch)
    eval_batches = collate_all(vlm, evaluation, args.batch)
    eval_features = [vlm.capture(b, stages) for b in eval_batches]
    eval_labels = [b.labels for b in eval_batches]
    routes = {
        "streamed sgd, 1 epoch": ProbeConfig(epochs=1, early_stopping=False),
        f"streamed sgd, {args.epochs} epochs": ProbeConfig(
            epochs=args.epochs, early_stopping=False
        ),
        "streamed lda, 1 pass": ProbeConfig(solver="lda"),
    }
    banks: dict[str, object] = {}
    naive: dict[str, tuple] = {}
    cache_bytes = [0]

    def streamed(name: str, config: ProbeConfig):
        def route() -> None:
            banks[name] = train_probes(vlm, train, stages, config, data_config=data, progress=False)

        return route

    def naive_route() -> None:  # loading + capture of every stage, then sklearn per stage
        cache: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
        labels = []
        for b in collate_all(vlm, train, args.batch):
            for stage, x in vlm.capture(b, stages).items():
                cache[stage].append(x.reshape(-1, x.shape[-1]).float())
            labels.append(b.labels.reshape(-1))
        y = torch.cat(labels).numpy()
        keep = y != 255
        cache_bytes[0] = sum(sum(x.numel() * x.element_size() for x in v) for v in cache.values())
        for stage in stages:
            X = torch.cat(cache[stage]).numpy()[keep]
            scaler = StandardScaler().fit(X)
            model = LogisticRegression(max_iter=200).fit(scaler.transform(X), y[keep])
            naive[stage] = (scaler, model)

    NAIVE = "naive: cache + sklearn"
    routes_run = {name: streamed(name, config) for name, config in routes.items()}
    routes_run[NAIVE] = naive_route
    seconds = interleaved(routes_run, args.reps)

    def sk_predict(stage):
        scaler, model = naive[stage]
        return lambda x: torch.from_numpy(
            model.predict(scaler.transform(x.reshape(-1, x.shape[-1]).numpy()))
        ).view(x.shape[:-1])

    naive_miou = [patch_miou(sk_predict(s), eval_features, eval_labels, s) for s in stages]
    print(f"\nend to end, {args.images} training images, patch mIoU on {args.eval_images} eval")
    print(f"images; naive feature cache {cache_bytes[0] / 2**20:.0f} MiB (fp32); {args.reps}")
    print("interleaved rounds, speed-up naive / route per round (min median max)")
    head = f"{'median s':>8} {'min':>6} {'median':>6} {'max':>6} {'mIoU':>7} {'vs naive':>8}"
    print(f"{'route':<26} {head}")
    for name, t in seconds.items():
        if name in banks:
            probes = banks[name].probes
            miou = [patch_miou(probes[s].predict, eval_features, eval_labels, s) for s in stages]
        else:
            miou = naive_miou
        diff = np.mean(miou) - np.mean(naive_miou)
        lo, med, hi = spread(ratios(t, seconds[NAIVE], inverse=True))
        print(
            f"{name:<26} {statistics.median(t):>8.2f} {lo:>6.2f} {med:>6.2f} {hi:>6.2f} "
            f"{np.mean(miou):>7.4f} {diff:>+8.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
