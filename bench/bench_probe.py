"""Cost of streamed layerwise probing, on a model with LLaVA-1.5-7B's probe/forward FLOP ratio.

Prints, from one run with interleaved repeats:
1. per batch: (forward + capture + every stage's probe update) / (bare forward), target <= 1.15
   for sgd (K lrs side by side); also capture alone and lda updates;
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

from seglens.config import DataConfig, ProbeConfig
from seglens.data import SyntheticDataset, iterate_samples
from seglens.experiments.probing import train_probes
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
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds")
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

    # 1. per batch, loading excluded: the same pre-collated batches for every mode.
    first = vlm.capture(batches[0], stages)

    def fresh_bank(solver: str = "sgd") -> ProbeBank:
        if solver == "lda":
            return ProbeBank(stages, C, solver="lda")
        bank = ProbeBank(stages, C, solver="sgd", warmup_batches=1)
        bank.partial_fit(first, batches[0].labels)  # freezes the standardisers (not timed)
        return bank

    def bare(_bank) -> None:
        with torch.inference_mode():
            for b in batches:
                vlm.family.forward(b.input_ids, b.pixel_values, b.attention_mask)

    def capture(_bank) -> None:
        for b in batches:
            vlm.capture(b, stages)

    def stream(bank) -> None:
        for b in batches:
            bank.partial_fit(vlm.capture(b, stages), b.labels)

    modes = {
        "bare forward": bare,
        "capture": capture,
        "capture + sgd updates": stream,
        "capture + lda updates": stream,
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    bare(None)  # warm up kernels and allocator
    for r in range(args.reps):
        order = list(modes)[r % len(modes) :] + list(modes)[: r % len(modes)]
        for mode in order:
            bank = fresh_bank("lda" if "lda" in mode else "sgd")
            start = time.perf_counter()
            modes[mode](bank)
            times[mode].append(time.perf_counter() - start)
    base = statistics.median(times["bare forward"])
    print(f"\nper pass over {len(batches)} batches of {args.batch} (median of {args.reps}):")
    print(f"{'mode':<26} {'seconds':>8} {'ratio':>7}")
    for mode, values in times.items():
        t = statistics.median(values)
        print(f"{mode:<26} {t:>8.2f} {t / base:>7.3f}")

    # 2. end to end: streamed train_probes vs caching everything and fitting scikit-learn.
    data = DataConfig(batch_size=args.batch)
    eval_batches = collate_all(vlm, evaluation, args.batch)
    eval_features = [vlm.capture(b, stages) for b in eval_batches]
    eval_labels = [b.labels for b in eval_batches]
    routes = {
        "streamed sgd, 1 epoch": ProbeConfig(),
        f"streamed sgd, {args.epochs} epochs": ProbeConfig(epochs=args.epochs),
        "streamed lda, 1 pass": ProbeConfig(solver="lda"),
    }
    banks, seconds = {}, {}
    for name, config in routes.items():
        start = time.perf_counter()
        banks[name] = train_probes(vlm, train, stages, config, data_config=data, progress=False)
        seconds[name] = time.perf_counter() - start

    start = time.perf_counter()
    cache: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
    labels = []
    for b in collate_all(vlm, train, args.batch):
        for stage, x in vlm.capture(b, stages).items():
            cache[stage].append(x.reshape(-1, x.shape[-1]).float())
        labels.append(b.labels.reshape(-1))
    y = torch.cat(labels).numpy()
    keep = y != 255
    cache_bytes = sum(sum(x.numel() * x.element_size() for x in v) for v in cache.values())
    naive = {}
    for stage in stages:
        X = torch.cat(cache[stage]).numpy()[keep]
        scaler = StandardScaler().fit(X)
        model = LogisticRegression(max_iter=200).fit(scaler.transform(X), y[keep])
        naive[stage] = (scaler, model)
    seconds["naive: cache + sklearn"] = time.perf_counter() - start

    def sk_predict(stage):
        scaler, model = naive[stage]
        return lambda x: torch.from_numpy(
            model.predict(scaler.transform(x.reshape(-1, x.shape[-1]).numpy()))
        ).view(x.shape[:-1])

    naive_miou = [patch_miou(sk_predict(s), eval_features, eval_labels, s) for s in stages]
    t_naive = seconds["naive: cache + sklearn"]
    print(f"\nend to end, {args.images} training images, patch mIoU on {args.eval_images} eval")
    print(f"images; naive feature cache {cache_bytes / 2**20:.0f} MiB (fp32)")
    print(f"{'route':<26} {'seconds':>8} {'naive/it':>9} {'mean mIoU':>10} {'vs naive':>9}")
    for name, t in seconds.items():
        if name in banks:
            probes = banks[name].probes
            miou = [patch_miou(probes[s].predict, eval_features, eval_labels, s) for s in stages]
        else:
            miou = naive_miou
        diff = np.mean(miou) - np.mean(naive_miou)
        print(f"{name:<26} {t:>8.2f} {t_naive / t:>9.2f} {np.mean(miou):>10.4f} {diff:>+9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
