"""seglens at LLaVA-1.5-7B widths: the cost of each analysis step over the forward pass it needs.

Builds the LLaVA-1.5-7B architecture from its public config values (CLIP ViT-L/14-336 tower,
2-layer GELU projector, Llama width 4096, 32 heads, MLP 11008, vocabulary 32064) with random
weights and no download, keeping ``--llm-layers`` decoder blocks (default 2 on CPU, 32 on a GPU)
and ``--vision-layers`` vision blocks (default 24, all), and streams synthetic ADE20K-sized data
(512 x 683 images, 150 classes) through it. Every mode does the same loading (``stream_batches``)
and stops at the same depth (block ``llm.K``), over >= 5 interleaved rounds:

  floor               forward to llm.K (one hook: the least any analysis needs)
  capture             all stages (encoder, adapter, llm.1..K) from the same pass
  capture + sgd       and every stage's sgd probe update (3 lrs side by side; float32 GEMMs,
                      ``--gemm`` bfloat16 or tf32; ``--exact-modes`` adds the float64 path)
  capture + lda       and every stage's lda statistics (D x D scatter of shifted features in
                      float32, added into float64; ``--exact-modes`` adds the float64 path)
  evaluation          ``evaluate_probes``: capture, probe logits, patch and pixel-level scoring
                      (the argmax of 150-class logits upsampled to each 512 x 683 mask), of a
                      probe after one update (near-uniform logits: the hardest case for pixel
                      scoring, whose cost depends on how many classes can win at a pixel) and
                      of one after 30 updates on the first batch ("trained probe")
  knockout forward    capture of all stages under ``intervene`` (half the image keys blocked)
  evaluation + lens   (``--lens``) the trained probe's evaluation with the logit/embedding lens
                      scored in the same pass (``seglens.readouts``: ADE20K's class names and
                      synonyms, patch and pixel level, both modes); its extra time over the
                      evaluation is the lens's cost, printed per round (min / median / max) over
                      the evaluation and as a share of an ADE20K probing pass

It prints per-round ratios to the floor (min / median / max), the peak memory of each mode, the
ratios projected to 32 decoder layers, and ends with ``probe/forward: X.XX`` (capture + sgd over
the floor, median). ``--check`` adds the numeric checks (capture equals HF ``hidden_states``,
probes and metrics finite) and ``--torchrun`` a 1-process ``torchrun`` run (nccl on CUDA, gloo on
CPU) that must equal the in-process result. ``make bench-gpu`` runs all of it at 32 layers in
bf16 and refuses without CUDA.

Usage: ``python bench/realsize.py --llm-layers 2 --quick`` (CPU, < 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers

from _rounds import check_rounds, interleaved, ratio_table, ratios, spread
from seglens.config import DataConfig, ProbeConfig
from seglens.data.base import IGNORE_INDEX, Sample, SegDataset
from seglens.experiments.evaluation import evaluate_probes
from seglens.experiments.streaming import stream_batches
from seglens.experiments.training import train_probes
from seglens.interventions import Knockout, TokenSet, intervene
from seglens.probes import ProbeBank

C = 150  # ADE20K SceneParsing classes
ADE_SIZE = (512, 683)  # (H, W) of a typical ADE20K image
ADE_TRAIN, ADE_VAL = 20_210, 2_000
# Public config values of llava-hf/llava-1.5-7b-hf (its config.json), nothing downloaded.
VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336,
    patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)  # fmt: skip
TEXT = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
FULL_LLM, FULL_VISION = 32, 24
TRAINED_STEPS = 30  # sgd updates of the "trained probe" evaluated in its own mode
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --- model -----------------------------------------------------------------------------------
def build_llava_7b(llm_layers: int, vision_layers: int, dtype: torch.dtype, device: str):
    """LLaVA-1.5-7B's architecture with random weights (seed 0), wrapped as a seglens ``VLM``.

    The LM head is tied to the input embeddings (saves 0.5 GB; seglens never computes logits).
    The processor is LLaVA-1.5's (336 px, CLIP mean/std, shortest-edge resize + centre crop as
    in llava-hf's ``preprocessor_config.json``) with the tiny models' byte-level tokenizer.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor
    from transformers import LlavaForConditionalGeneration as Llava
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from seglens.models.loading import _wrap
    from seglens.models.tiny import CLIP_MEAN, CLIP_STD, byte_tokenizer, llava_processor

    tokenizer = byte_tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(num_hidden_layers=vision_layers, **VISION),
        text_config=LlamaConfig(num_hidden_layers=llm_layers, tie_word_embeddings=True, **TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Llava._from_config(config, dtype=dtype).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = llava_processor(LlavaProcessor, image_processor, tokenizer, 14, "default", 1)
    name = f"llava-1.5-7b architecture, random, {llm_layers}/{FULL_LLM} LLM layers"
    return _wrap(model, processor, name, None, "Describe the image.")


# --- data ------------------------------------------------------------------------------------
class AdeSized(SegDataset):
    """Seeded synthetic images and label maps of ADE20K's size and class count.

    Each image has ~12 of the 150 classes in blocky regions (a 16 x 21 cell layout upsampled to
    512 x 683), 8% of the cells unlabelled (ignore), and class-coloured noisy pixels.
    """

    name = "ade-sized synthetic"

    def __init__(self, num_images: int, seed: int = 0, size: tuple[int, int] = ADE_SIZE):
        palette = np.random.default_rng(1234).integers(0, 256, (C, 3))
        super().__init__(range(num_images), [f"class{k}" for k in range(C)], palette)
        self.size, self.seed = size, seed

    def _load(self, key: int) -> Sample:
        rng = np.random.default_rng([self.seed, key])
        H, W = self.size
        classes = rng.choice(C, size=12, replace=False)
        cells = classes[rng.integers(0, 12, size=(16, 21))]
        cells = np.where(rng.random((16, 21)) < 0.08, IGNORE_INDEX, cells)
        rows, cols = np.arange(H) * 16 // H, np.arange(W) * 21 // W
        mask = cells[rows[:, None], cols[None, :]].astype(np.int64)
        colour = self.palette[np.minimum(mask, C - 1)].astype(np.int16)
        noise = rng.integers(-24, 25, size=(H, W, 3), dtype=np.int16)
        return Sample(np.clip(colour + noise, 0, 255).astype(np.uint8), mask, f"ade{key:05d}")


# --- measurement -----------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peaks(device: torch.device) -> None:
    with contextlib.suppress(OSError):  # Linux: "5" resets VmHWM, this process's peak RSS
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device: torch.device) -> tuple[float, float | None]:
    """(peak RSS MiB since ``reset_peaks`` (else since start), CUDA max allocated MiB or None)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                rss = int(line.split()[1]) / 1024
    except OSError:
        pass
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rss, cuda


@contextlib.contextmanager
def count_syncs():
    """Count the host syncs CUDA reports in the block (``torch.cuda.set_sync_debug_mode``:
    blocking copies to the host, ``.item()``, ``nonzero``...); yields a one-item list, filled
    on exit. Counting slows the block: it runs on the warm-up call only."""
    counted = [0]
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counted
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counted[0] = sum("synchroniz" in str(w.message) for w in caught)


class Bench:
    """The model, the data and one timed callable per mode."""

    def __init__(self, vlm, args):
        self.vlm, self.args = vlm, args
        self.device = vlm.device
        self.stages = vlm.default_stages
        self.last = self.stages[-1]
        self.data_config = DataConfig(batch_size=args.batch, num_workers=args.workers)
        self.data = AdeSized(args.batch * args.batches, seed=1)
        self.cfg = ProbeConfig(bootstrap=0, qualitative=0)
        first = next(self.batches(self.data.limit(args.batch)))
        self.first = (self.vlm.capture(first, self.stages), first.labels)
        self.memory: dict[str, tuple[float, float | None]] = {}
        self.syncs: dict[str, float] = {}  # host syncs per batch (CUDA: the warm-up call)
        self._trained: ProbeBank | None = None

    def batches(self, data: SegDataset | None = None):
        data = self.data if data is None else data
        return stream_batches(self.vlm, data, self.data_config, C, {}, False, "bench")

    def sgd_bank(self, exact: bool = False) -> ProbeBank:
        """An sgd bank (3 lrs) whose standardisers are already frozen (warm-up done)."""
        opts = dict(exact=exact, gemm="float32" if exact else self.args.gemm)
        bank = ProbeBank(self.stages, C, solver="sgd", lrs=self.cfg.lrs, warmup_batches=1, **opts)
        return bank.partial_fit(*self.first)

    def lda_bank(self, exact: bool = False) -> ProbeBank:
        gemm = "float32" if exact else self.args.gemm
        return ProbeBank(self.stages, C, solver="lda", exact=exact, gemm=gemm)

    def eval_bank(self, steps: int = 1) -> ProbeBank:
        """An sgd bank after ``steps`` updates on the first batch, selected on it."""
        bank = self.sgd_bank()
        for _ in range(steps):
            bank.partial_fit(*self.first)
        return bank.validate(*self.first).select()

    def trained_bank(self) -> ProbeBank:
        """``eval_bank`` after ``TRAINED_STEPS`` updates (built once: evaluation never changes
        a bank): its logits favour one class per token, as a trained probe's do, where one
        update leaves them near uniform (the hardest case for pixel scoring)."""
        if self._trained is None:
            self._trained = self.eval_bank(TRAINED_STEPS)
        return self._trained

    def timed(self, name: str, run, prepare=None):
        """A mode: ``prepare()`` untimed, then ``run(prepared)`` timed (synchronised)."""

        def mode() -> float:
            state = prepare() if prepare is not None else None
            sync(self.device)
            reset_peaks(self.device)
            if name not in self.syncs and self.device.type == "cuda":  # warm-up call: untimed
                with count_syncs() as counted:
                    run(state)
                self.syncs[name] = counted[0] / self.args.batches
                return 0.0
            start = time.perf_counter()
            run(state)
            sync(self.device)
            seconds = time.perf_counter() - start
            rss, cuda = peaks(self.device)
            old = self.memory.get(name, (0.0, None))
            self.memory[name] = (max(old[0], rss), None if cuda is None else max(old[1] or 0, cuda))
            return seconds

        return mode

    def modes(self) -> dict:
        vlm, stages = self.vlm, self.stages

        def floor(_):
            for b in self.batches():
                vlm.capture(b, [self.last])

        def floor_1(_):
            for b in self.batches():
                vlm.capture(b, ["llm.1"])

        def capture(_):
            for b in self.batches():
                vlm.capture(b, stages)

        def stream(bank):
            for b in self.batches():
                bank.partial_fit(vlm.capture(b, stages), b.labels)

        def evaluation(bank):
            evaluate_probes(
                vlm, bank, self.data, stages, self.cfg, data_config=self.data_config,
                qualitative=[], progress=False,
            )  # fmt: skip

        N = vlm.num_image_tokens
        later = TokenSet.from_slots(range(N // 2, N))

        def knockout(_):
            with intervene(vlm, [Knockout(keys=later)]):
                capture(None)

        lda_bank = self.lda_bank
        modes = {
            "floor: forward to llm.K": self.timed("floor", floor),
            "capture, all stages": self.timed("capture", capture),
            "capture + sgd updates": self.timed("sgd", stream, self.sgd_bank),
            "capture + lda updates": self.timed("lda", stream, lda_bank),
            "evaluation, pixel level": self.timed("eval", evaluation, self.eval_bank),
            "evaluation, trained probe": self.timed("eval_trained", evaluation, self.trained_bank),
            "knockout forward + capture": self.timed("knockout", knockout),
        }
        if self.args.exact_modes:  # probe.exact (float64: the arithmetic before issue 25)
            exact_sgd, exact_lda = (lambda: self.sgd_bank(True)), (lambda: self.lda_bank(True))
            modes["capture + sgd, exact"] = self.timed("sgd_exact", stream, exact_sgd)
            modes["capture + lda, exact"] = self.timed("lda_exact", stream, exact_lda)

        def lens(scorer):
            evaluate_probes(
                vlm, self.trained_bank(), self.data, stages, self.cfg,
                data_config=self.data_config, qualitative=[], progress=False, on_batch=scorer,
            )  # fmt: skip

        def lens_scorer():
            from seglens.data.datasets import ADE20K_CLASSES
            from seglens.readouts.scoring import LensOptions, LensScorer

            self.trained_bank()  # built once, outside the timing
            opts = LensOptions(tuple(self.args.lens_readouts), tuple(self.args.lens_modes))
            return LensScorer(vlm, ADE20K_CLASSES, stages, opts, dataset="ade20k", bootstrap=0)

        if self.args.lens:
            modes["evaluation + lens"] = self.timed("lens", lens, lens_scorer)
        if vlm.num_llm_layers > 1:  # gives the cost of one decoder block, for the projection
            modes["forward to llm.1"] = self.timed("floor_1", floor_1)
        modes["attention to anchors"] = self.timed("attention", self.attention)
        return modes

    def attention(self, _) -> None:
        """``seglens attention``'s measured forward with every image token a query (its worst
        case: query chunks of ``SCORE_CHUNK_BYTES`` scores; the keys once per layer)."""
        from seglens.analyses.attention.measure import measure_attention, query_plan

        layers = self.vlm.family.decoder_layers()
        for b in self.batches():
            labels = b.labels.numpy()
            correct = np.random.default_rng(0).random(labels.shape) < 0.5
            plan = query_plan(b, labels, correct, tuple(range(C)))
            with measure_attention(layers, plan, b.attention_mask.bool()) as out:
                self.vlm.capture(b, [self.last])
            torch.stack([torch.stack(o) for o in out]).cpu()  # one copy, as ``_measure_pair``


def project(times: dict[str, list[float]], K: int, full: int = FULL_LLM) -> dict[str, float]:
    """Median ratios projected from K to ``full`` decoder layers.

    One block costs (floor - floor_1) / (K - 1); everything before the blocks costs floor_1 -
    block. A mode's extra time over the floor scales with its K + 1 stages of width 4096 (the
    narrow encoder stage is counted as one too, which slightly overstates the projection).
    """
    if "forward to llm.1" not in times:
        return {}
    base = "floor: forward to llm.K"
    floor = statistics.median(times[base])
    block = max(0.0, (floor - statistics.median(times["forward to llm.1"])) / (K - 1))
    front = floor - K * block
    full_floor = front + full * block
    out = {}
    for name, values in times.items():
        if name in (base, "forward to llm.1"):
            continue
        extra = statistics.median(values) - floor
        stages_now, stages_full = K + 2, full + 2
        out[name] = (full_floor + extra * stages_full / stages_now) / full_floor
    return out


# --- numeric checks --------------------------------------------------------------------------
def check_capture(vlm, batch, tol: float) -> list[tuple[str, float]]:
    """Max |capture - HF| / max |HF| per stage; HF: ``hidden_states`` + the vision tower."""
    model, inner = vlm.model, vlm.model.model
    dev = vlm.device
    inputs = dict(
        input_ids=batch.input_ids.to(dev),
        pixel_values=batch.pixel_values.to(dev, vlm.dtype),
        attention_mask=batch.attention_mask.to(dev),
    )
    got = vlm.capture(batch, vlm.default_stages)
    last = {}
    hook = inner.language_model.layers[-1].register_forward_hook(
        lambda _m, _a, out: last.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.inference_mode():
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            tower = inner.vision_tower(inputs["pixel_values"], output_hidden_states=True)
    finally:
        hook.remove()
    pos = batch.image_positions.to(dev)

    def at_images(h):
        return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))

    ref = {"encoder": tower.hidden_states[-2][:, 1:], "adapter": at_images(out.hidden_states[0])}
    L = vlm.num_llm_layers
    for layer in range(1, L):
        ref[f"llm.{layer}"] = at_images(out.hidden_states[layer])
    ref[f"llm.{L}"] = at_images(last["h"])
    errors = []
    for stage, r in ref.items():
        r, g = r.float(), got[stage].float()
        errors.append((stage, float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))))
    return errors


def finite_probes(bank: ProbeBank) -> bool:
    return all(bool(torch.isfinite(p.coef_).all()) for p in bank.probes.values())


def small_run(vlm, args) -> dict:
    """lda on 2 batches + pixel-level evaluation on 1: per-stage mIoU and coef sums (for the
    torchrun comparison and the finiteness checks)."""
    data_config = DataConfig(batch_size=args.batch, num_workers=args.workers)
    cfg = ProbeConfig(solver="lda", bootstrap=0, qualitative=0)
    stages = vlm.default_stages
    train, evaluation = AdeSized(2 * args.batch, seed=2), AdeSized(args.batch, seed=3)
    bank = train_probes(vlm, train, stages, cfg, data_config=data_config, progress=False)
    res = evaluate_probes(
        vlm, bank, evaluation, stages, cfg, data_config=data_config, qualitative=[],
        progress=False,
    )  # fmt: skip
    metrics = res.metrics()
    return {
        "finite_probes": finite_probes(bank),
        "miou": {s: metrics[s]["pixel"]["miou"] for s in stages},
        "patch_miou": {s: metrics[s]["patch"]["miou"] for s in stages},
        "coef_sum": {s: float(bank.probes[s].coef_.double().sum()) for s in stages},
    }


def release(vlm, bench: Bench) -> None:
    """Free this process's GPU memory (weights to the meta device, cached features and probes
    dropped) before the torchrun worker builds its own model: two 7B copies (~28 GB in bf16,
    plus activations) do not fit a 40-48 GB card. ``vlm`` is unusable afterwards."""
    vlm.model.to("meta")
    bench.first, bench._trained = None, None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated() / 2**20
        print(f"# parent released its model before the torchrun worker: {held:.0f} MiB held")


def torchrun_run(args) -> dict:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc-per-node", "1", __file__, "--worker"]
    cmd += ["--llm-layers", str(args.llm_layers), "--vision-layers", str(args.vision_layers)]
    cmd += ["--dtype", args.dtype, "--batch", str(args.batch), "--workers", str(args.workers)]
    cmd += ["--device", args.device]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        done = subprocess.run([*cmd, "--worker-out", str(out)], check=False, text=True)
        if done.returncode != 0:
            raise SystemExit(f"torchrun worker failed ({done.returncode}): {' '.join(cmd)}")
        return json.loads(out.read_text())


def worker(args) -> int:
    """The torchrun side: join a real process group (nccl on CUDA, gloo on CPU; seglens's own
    ``process_group`` skips a 1-process launch), check a collective on probe-sized tensors, and
    run ``small_run`` inside the group."""
    dist = torch.distributed
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        vlm = build_llava_7b(args.llm_layers, args.vision_layers, DTYPES[args.dtype], args.device)
        result = small_run(vlm, args)
        x = torch.arange(4096 * 150, dtype=torch.float32, device=vlm.device).view(4096, 150)
        y = x.clone()
        dist.all_reduce(y)  # sum over ranks
        result["all_reduce_ok"] = bool(torch.equal(y, x * dist.get_world_size()))
        result["backend"] = dist.get_backend()
        if dist.get_rank() == 0:
            write_json(Path(args.worker_out), result)
    finally:
        dist.destroy_process_group()
    return 0


def write_json(path: Path, obj) -> None:
    """Write through a temporary file in the same folder, then rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(f.name, path)


# --- main ------------------------------------------------------------------------------------
def parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm-layers", type=int, default=FULL_LLM if cuda else 2, help="K")
    p.add_argument("--vision-layers", type=int, default=FULL_VISION)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=None, help="images per forward")
    p.add_argument("--batches", type=int, default=None, help="batches per mode and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5)")
    p.add_argument("--workers", type=int, default=4 if cuda else 0, help="loader processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="CPU sizes: batch 1, 1 batch per pass (default: batch 2, 2 batches)",
    )
    p.add_argument("--check", action="store_true", help="numeric checks (capture vs HF, finite)")
    p.add_argument("--torchrun", action="store_true", help="a 1-process torchrun run must match")
    p.add_argument("--checks-only", action="store_true", help="skip the timing rounds")
    p.add_argument("--require-cuda", action="store_true", help="refuse to run without CUDA")
    p.add_argument("--tolerance", type=float, default=1e-2, help="capture vs HF, relative")
    p.add_argument("--forward-img-s", type=float, default=None, help="H100 7B images/s assumed")
    p.add_argument("--json", default=None, help="also write the measurements here")
    p.add_argument("--lens", action="store_true", help="also time the lens in the evaluation")
    p.add_argument("--lens-readouts", nargs="+", default=["logit", "embedding"])
    p.add_argument("--lens-modes", nargs="+", default=["all", "present"])
    p.add_argument(
        "--exact-modes", action="store_true", help="also time sgd and lda with probe.exact"
    )
    p.add_argument("--gemm", default="float32", choices=["float32", "tf32", "bfloat16"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.batch = args.batch or (8 if on_gpu else 1 if args.quick else 2)
    args.batches = args.batches or (2 if on_gpu or not args.quick else 1)
    if min(args.llm_layers, args.vision_layers, args.batch, args.batches) < 1:
        p.error("--llm-layers, --vision-layers, --batch and --batches must be >= 1")
    if args.checks_only and not (args.check or args.torchrun):
        p.error("--checks-only skips the timing: give --check and/or --torchrun")
    if args.vision_layers < 2:
        p.error("--vision-layers must be >= 2 (the projector reads the second-to-last block)")
    return args


def analysis_hours(ratio: dict[str, float], img_s: float) -> list[str]:
    """Hours of one default sgd probing analysis on ADE20K at a forward speed and the ratios."""
    warmup, hold = 4 * 8, round(0.1 * ADE_TRAIN)
    train = ADE_TRAIN - hold
    floor = (warmup + train + hold + ADE_VAL) / img_s / 3600
    # Evaluation as of a trained probe (one an analysis scores), not of a one-update probe.
    sgd, ev = ratio["capture + sgd updates"], ratio["evaluation, trained probe"]
    # warm-up and holdout passes are capture-only (+ a cheap validation), evaluation as measured
    ours = (warmup + hold) * ratio["capture, all stages"] + train * sgd + ADE_VAL * ev
    ours /= img_s * 3600
    lda = (ADE_TRAIN * ratio["capture + lda updates"] + ADE_VAL * ev) / img_s / 3600
    lda_floor = (ADE_TRAIN + ADE_VAL) / img_s / 3600
    lines = [
        f"ADE20K ({ADE_TRAIN} train + {ADE_VAL} val images) at {img_s:.0f} img/s forward:",
        f"  sgd analysis {ours:.2f} h vs its floor {floor:.2f} h ({ours / floor:.2f}x)",
        f"  lda analysis {lda:.2f} h vs its floor {lda_floor:.2f} h ({lda / lda_floor:.2f}x)",
    ]
    if "evaluation + lens" in ratio:  # the lens runs on the evaluation split only
        lens = ADE_VAL * (ratio["evaluation + lens"] - ev) / img_s / 3600
        lines.append(
            f"  lens adds {lens:.3f} h: {100 * lens / ours:.1f}% of the sgd probing pass, "
            f"{100 * lens / lda:.1f}% of the lda one"
        )
    return lines


def lens_share(times: dict[str, list[float]]) -> tuple[list[str], dict[str, list[float]]]:
    """The lens's added time, round by round (every mode of a round ran side by side): over the
    trained probe's evaluation of the same images, and over a whole ADE20K probing pass (sgd and
    lda; the lens reads the evaluation split only) built from that round's own times, at the
    measured depth. Lines (min / median / max over rounds) and the per-round values."""
    ev, lens = times["evaluation, trained probe"], times["evaluation + lens"]
    cap, sgd = times["capture, all stages"], times["capture + sgd updates"]
    lda = times["capture + lda updates"]
    warmup, hold = 4 * 8, round(0.1 * ADE_TRAIN)
    per_round: dict[str, list[float]] = {"over evaluation": [], "sgd pass": [], "lda pass": []}
    for r in range(len(ev)):
        added = ADE_VAL * (lens[r] - ev[r])
        sgd_pass = (warmup + hold) * cap[r] + (ADE_TRAIN - hold) * sgd[r] + ADE_VAL * ev[r]
        per_round["over evaluation"].append(lens[r] / ev[r])
        per_round["sgd pass"].append(100 * added / sgd_pass)
        per_round["lda pass"].append(100 * added / (ADE_TRAIN * lda[r] + ADE_VAL * ev[r]))
    rows = (
        ("evaluation + lens / evaluation", "over evaluation", "{:.3f}"),
        ("lens added, % of the sgd probing pass", "sgd pass", "{:+.2f}%"),
        ("lens added, % of the lda probing pass", "lda pass", "{:+.2f}%"),
    )
    lines = [f"\nthe lens's cost per round ({len(ev)} interleaved rounds; min / median / max):"]
    for label, key, fmt in rows:
        low, mid, high = spread(per_round[key])
        lines.append(f"  {label:<40} {fmt.format(low)} / {fmt.format(mid)} / {fmt.format(high)}")
    return lines, per_round


def measure(bench: Bench, args) -> dict:
    """The interleaved rounds: print the ratio, memory, projection and hours tables."""
    modes = bench.modes()
    print(
        f"# {args.rounds} interleaved rounds; per mode and round {args.batches} batch(es) of "
        f"{args.batch} images, {len(bench.stages)} stages, loading in every mode "
        f"({args.workers} workers)",
        flush=True,
    )
    for mode in modes.values():  # warm-up: kernels, allocator, loader
        mode()
    bench.memory.clear()
    t0 = time.perf_counter()
    times = interleaved(
        modes,
        args.rounds,
        timer=lambda fn: fn(),
        on_round=lambda r: print(
            f"# round {r + 1} done, {time.perf_counter() - t0:.0f} s", flush=True
        ),
    )
    base = "floor: forward to llm.K"
    images = args.batch * args.batches
    print(f"\nseconds per pass over {images} images; ratio to the floor per round")
    for line in ratio_table(times, base, below=("forward to llm.1",)):
        print(line)
    projected = project(times, args.llm_layers)
    medians = {m: spread(ratios(v, times[base]))[1] for m, v in times.items()}
    keys = {"floor": base, "capture": "capture, all stages", "sgd": "capture + sgd updates"}
    keys |= {"lda": "capture + lda updates", "eval": "evaluation, pixel level"}
    keys |= {"eval_trained": "evaluation, trained probe"}
    keys |= {"knockout": "knockout forward + capture", "floor_1": "forward to llm.1"}
    keys |= {"lens": "evaluation + lens"}
    keys |= {"sgd_exact": "capture + sgd, exact", "lda_exact": "capture + lda, exact"}
    print("\npeak memory per mode (RSS since the mode began; CUDA max allocated)")
    for short, name in keys.items():
        if short in bench.memory:
            rss, cuda = bench.memory[short]
            extra = f", cuda {cuda:.0f} MiB" if cuda is not None else ""
            print(f"  {name:<28} rss {rss:.0f} MiB{extra}")
    if "attention" in bench.memory:
        rss, cuda = bench.memory["attention"]
        extra = f", cuda {cuda:.0f} MiB" if cuda is not None else ""
        print(f"  {'attention to anchors':<28} rss {rss:.0f} MiB{extra}")
    print("\nhost syncs per batch per mode (CUDA sync debug mode, on the untimed warm-up call)")
    for name in modes:
        short = next((k for k, v in {**keys, "attention": "attention to anchors"}.items()
                      if v == name), name)  # fmt: skip
        count = bench.syncs.get(short)
        print(f"  {name:<28} {'n/a (CUDA only)' if count is None else f'{count:.0f}'}")
    if projected:
        print(f"\nmedian ratios projected to {FULL_LLM} LLM layers ({FULL_LLM + 2} stages):")
        for name, value in projected.items():
            print(f"  {name:<28} {value:.3f}")
    floor_s = statistics.median(times[base]) / images
    img_s = args.forward_img_s or (1 / floor_s if args.device.startswith("cuda") else 48.0)
    if args.llm_layers == FULL_LLM or projected:
        at_full = medians if args.llm_layers == FULL_LLM else projected
        print()
        for line in analysis_hours(at_full, img_s):
            print(line)
    report = {"times": times, "medians": medians, "projected": projected}
    if "evaluation + lens" in times:
        lines, report["lens_share"] = lens_share(times)
        for line in lines:
            print(line)
    return report | {"memory": bench.memory, "syncs": bench.syncs, "floor_s_per_image": floor_s}


def run_checks(vlm, bench: Bench, args) -> tuple[bool, dict]:
    """``--check`` (capture vs HF, finite probes and metrics) and ``--torchrun``; (all passed,
    what they measured)."""
    ok, report = True, {}
    if args.check:
        batch = next(bench.batches())
        errors = check_capture(vlm, batch, args.tolerance)
        worst = max(e for _, e in errors)
        ok &= worst <= args.tolerance
        print(f"\ncheck capture == HF hidden_states ({args.dtype}): max relative error {worst:.2e}")
        print(f"  (tolerance {args.tolerance:g}; per stage: ", end="")
        print(", ".join(f"{s} {e:.1e}" for s, e in errors) + ")")
        ok_sgd = finite_probes(bench.eval_bank())
        small = small_run(vlm, args)
        finite = all(v is not None and np.isfinite(v) for v in small["miou"].values())
        ok &= ok_sgd and small["finite_probes"] and finite
        print(f"check sgd probes finite: {ok_sgd}; lda probes finite: {small['finite_probes']}")
        print(f"check pixel mIoU finite at every stage: {finite}")
        report |= {"capture_errors": errors, "small_run": small}
    if args.torchrun:
        if not args.check:
            small = small_run(vlm, args)
        release(vlm, bench)  # the worker builds its own 7B model on the same GPU
        dist = torchrun_run(args)
        gap = max(abs(dist["coef_sum"][s] - small["coef_sum"][s]) for s in small["coef_sum"])
        scale = max(abs(v) for v in small["coef_sum"].values()) or 1.0
        same = dist["miou"] == small["miou"] and gap <= 1e-6 * scale
        ok &= same and dist["all_reduce_ok"]
        print(
            f"check torchrun 1 process ({dist['backend']}) == in-process: {same} "
            f"(pixel mIoU equal: {dist['miou'] == small['miou']}, coef sum gap {gap:.1e}); "
            f"all_reduce of a (4096, 150) tensor: {dist['all_reduce_ok']}"
        )
        report["torchrun"] = dist
    return ok, report


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.require_cuda and not torch.cuda.is_available():
        print(
            f"make bench-gpu needs a CUDA GPU: torch {torch.__version__} sees none here "
            "(torch.cuda.is_available() is False). On a CPU machine run "
            "`python bench/realsize.py --llm-layers 2 --quick` instead.",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    check_rounds(args.rounds)
    dtype = DTYPES[args.dtype]
    start = time.perf_counter()
    vlm = build_llava_7b(args.llm_layers, args.vision_layers, dtype, args.device)
    built = time.perf_counter() - start
    n_params = sum(p.numel() for p in vlm.model.parameters())
    gpu = torch.cuda.get_device_name(vlm.device) if vlm.device.type == "cuda" else "none"
    print(
        f"# {platform.machine()}, {os.cpu_count()} cpus, {torch.get_num_threads()} threads, "
        f"gpu {gpu}, torch {torch.__version__}, transformers {transformers.__version__}"
    )
    print(
        f"# LLaVA-1.5-7B widths: {args.vision_layers}/{FULL_VISION} vision and "
        f"{args.llm_layers}/{FULL_LLM} LLM layers, {n_params / 1e9:.2f}B params, {args.dtype}, "
        f"{args.device}, built in {built:.0f} s; N={vlm.num_image_tokens}, "
        f"T={len(vlm.token_ids())}, C={C}, images {ADE_SIZE[0]}x{ADE_SIZE[1]}"
    )
    bench = Bench(vlm, args)
    report: dict = {"args": vars(args)}
    if not args.checks_only:
        report |= measure(bench, args)
    ok, checks = run_checks(vlm, bench, args)
    report |= checks
    if args.json:
        write_json(Path(args.json), report)
    if args.checks_only:
        print("\nprobe/forward: not measured (--checks-only)")
    else:
        print(f"\nprobe/forward: {report['medians']['capture + sgd updates']:.2f}")
    if not ok:
        print("FAILED: a numeric check did not pass (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
