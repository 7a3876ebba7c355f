"""The twin and the matched control on a random LLaVA-1.5-7B-shaped model at reduced depth.

A model that has learned nothing, run as a user runs a checkpoint: ``seglens run --twin`` with
the knockout's outside-pair and confidence-matched controls. Both the model (weights drawn by
``torch.manual_seed(0)``, as ``bench/realsize.py`` builds it) and its twin (HF ``_init_weights``
from ``twin.seed``) are random, so every finding should be *not* beyond the twin: what this
architecture produces on its own is what a trained model's numbers must be read against.

It saves the architecture (CLIP ViT-L/14-336 tower, 2-layer GELU projector, Llama width 4096;
``--llm-layers`` of the 32 decoder blocks and ``--vision-layers`` of the 24 vision blocks; float32
by default, since a CPU without a bf16 unit runs bf16 many times slower) with the tiny models'
byte-level tokenizer to ``OUT/model``, writes a folder dataset of
ADE20K-layout scenes (512 x 683, blocky regions of ``--classes`` classes, 8% ignore) to
``OUT/data``, runs probing (lda) and the knockout with the twin into ``OUT/run`` and prints the
twin table (model, twin, model minus twin, paired 95% intervals over images).

Usage (CPU, about 10 minutes on 2 cores at the defaults):
``python bench/random7b_twin.py --out runs/random7b``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from realsize import ADE_SIZE, build_llava_7b


def write_scenes(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """``images`` ADE20K-layout scenes with ~5 of ``classes`` classes each, as a folder dataset."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    palette = np.random.default_rng(1234).integers(0, 256, (classes, 3))
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(classes)))
    H, W = ADE_SIZE
    for key in range(images):
        rng = np.random.default_rng([seed, key])
        present = rng.choice(classes, size=min(5, classes), replace=False)
        cells = present[rng.integers(0, len(present), size=(16, 21))]
        cells = np.where(rng.random((16, 21)) < 0.08, 255, cells)
        rows, cols = np.arange(H) * 16 // H, np.arange(W) * 21 // W
        mask = cells[rows[:, None], cols[None, :]].astype(np.uint8)
        colour = palette[np.minimum(mask, classes - 1)].astype(np.int16)
        noise = rng.integers(-24, 25, size=(H, W, 3), dtype=np.int16)
        pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"scene{key:04d}.png")
        Image.fromarray(mask).save(root / "masks" / f"scene{key:04d}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/random7b", help="folder for model, data and run")
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=8)
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16 on a GPU"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=36, help="scenes (a third for evaluation)")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2, help="knockout.top_k")
    parser.add_argument("--pair-images", type=int, default=4, help="knockout.max_images")
    args = parser.parse_args(argv)

    from seglens.config import load_config
    from seglens.experiments.pipeline import run as run_pipeline
    from seglens.results import read_json

    out = Path(args.out)
    model_dir, data_dir, run_dir = out / "model", out / "data", out / "run"
    if not (model_dir / "config.json").is_file():
        vlm = build_llava_7b(args.llm_layers, args.vision_layers, getattr(torch, args.dtype), "cpu")
        vlm.model.save_pretrained(model_dir)
        vlm.processor.save_pretrained(model_dir)
        del vlm
    if not (data_dir / "classes.txt").is_file():
        write_scenes(data_dir, args.images, args.classes)
    overrides = {
        "out": str(run_dir),
        "overwrite": True,
        "model.name": str(model_dir),
        "model.dtype": args.dtype,
        "model.device": args.device,
        "data.dataset": "folder",
        "data.root": str(data_dir),
        "data.folder_val_fraction": 1 / 3,
        "data.batch_size": 4,
        "probe.solver": "lda",
        "probe.bootstrap": 1000,
        "probe.qualitative": 0,
        "knockout.top_k": args.pairs,
        "knockout.max_images": args.pair_images,
        "knockout.min_support": 5,
        "knockout.control_pool": ("outside_pair", "confidence"),
        "knockout.attention": False,
        "bidir.enabled": False,
        "umap.enabled": False,
        "lens.enabled": False,
        "twin.enabled": True,
        "twin.analyses": ("probing", "knockout"),
    }
    run_pipeline(load_config(**overrides), progress=True)
    table(read_json(run_dir / "results.json"))
    return 0


def table(results: dict) -> None:
    """The twin section as a Markdown table: model, twin, model minus twin per statistic."""
    from seglens.experiments.findings import fmt_interval as cell

    print(f"\n# {results['model']['name']}; twin: {results['twin']['init'][:60]}...")
    print("| finding: statistic | model | twin | model - twin | beyond twin |")
    print("|---|---|---|---|---|")
    for finding, entry in results["twin"]["findings"].items():
        for key, stat in entry["statistics"].items():
            print(
                f"| {finding}: {key} | {cell(stat['model'])} | {cell(stat['twin'])} | "
                f"{cell(stat['model_minus_twin'])} | {entry['beyond_twin']} |"
            )
    print(json.dumps({k: v.get("holds") for k, v in results["findings"].items()}))


if __name__ == "__main__":
    raise SystemExit(main())
