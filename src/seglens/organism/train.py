"""Train the organism from scratch on its synthetic scenes, in three stages, on a CPU.

0. Tower: image-level multi-label presence (mean-pooled patch tokens -> LayerNorm -> linear,
   BCE) on scenes of a *different* texture contrast than the organism's evaluation domain, as a
   pretrained encoder meets a shifted domain. Horizontal flips, with the diagonal pair's labels
   swapped (a flipped diagonal is an antidiagonal). It never sees patch labels.
1. Text-only caption language modelling of the Llama, so the LLM is not random.
2. Adapter + LLM on captions (loss on caption tokens only, image before text, causal), the tower
   frozen; its features are computed once.

The result is a standard ``LlavaForConditionalGeneration`` folder (fp16 safetensors, tokenizer
with chat template, image-processor config) plus ``training.json``. The same seed and thread count
give the same weights.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from seglens.data.organism import FLIPPED, NUM_CLASSES, SceneStyle, draw_scene, scene_rng
from seglens.organism.build import Architecture, build_organism, patch_states, pixel_values

log = logging.getLogger(__name__)

PROMPT = "Describe the image."


@dataclass(frozen=True)
class Recipe:
    """Everything that shapes the organism besides the seed (recorded in ``training.json``)."""

    scenes: int = 8000  # training scenes (captions; the tower sees its own scenes)
    val_scenes: int = 400  # caption validation scenes
    batch_size: int = 128
    tower_steps: int = 300
    tower_lr: float = 2e-3
    tower_contrast: float = 0.28  # the tower's pretraining domain (the organism's is 0.12)
    text_steps: int = 150
    text_lr: float = 3e-3
    steps: int = 800  # adapter + LLM caption steps
    lr: float = 1e-3
    weight_decay: float = 0.01
    dtype: str = "float16"  # of the saved weights (training is fp32)
    architecture: Architecture = dataclasses.field(default_factory=Architecture)

    def __post_init__(self):
        for name in ("scenes", "val_scenes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"organism recipe: {name}={getattr(self, name)} must be >= 1")
        for name in ("tower_steps", "text_steps", "steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"organism recipe: {name}={getattr(self, name)} must be >= 0")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"organism recipe: dtype={self.dtype!r} must be float16 or float32")


def _scenes(seed: int, stream: str, n: int, style: SceneStyle, progress: bool):
    """(n, 64, 64, 3) uint8 images, (n, 64, 64) masks and n caption word lists."""
    images, masks, captions = [], [], []
    for i in tqdm(range(n), desc=f"scenes {stream}", disable=not progress, leave=False):
        image, mask, words = draw_scene(scene_rng(seed, f"organism:{stream}", i), style)
        images.append(image)
        masks.append(mask)
        captions.append(words)
    return np.stack(images), np.stack(masks), captions


def _one_cycle(params, lr: float, steps: int, weight_decay: float):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    return optimizer, schedule


def _update(optimizer, schedule, loss: torch.Tensor, losses: list[float]) -> None:
    """One optimiser step on ``loss``, then the schedule; the loss is appended to ``losses``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    losses.append(loss.item())


def _trace(losses: list[float], every: int = 10) -> list[float]:
    """Mean loss over consecutive windows of ``every`` steps (what training.json keeps)."""
    return [float(np.mean(losses[i : i + every])) for i in range(0, len(losses), every)]


def train_tower(model, recipe: Recipe, seed: int, gen: torch.Generator, progress: bool) -> dict:
    """Stage 0: presence pretraining of the vision tower (its own scenes, flips)."""
    tower = model.model.vision_tower
    images, masks, _ = _scenes(
        seed, "tower", recipe.scenes, SceneStyle(contrast=recipe.tower_contrast), progress
    )
    present = np.stack([np.bincount(m.ravel(), minlength=NUM_CLASSES) > 0 for m in masks])
    flipped_images = images[:, :, ::-1].copy()
    flipped_present = present[:, list(FLIPPED)]
    width = model.config.vision_config.hidden_size
    head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, NUM_CLASSES))
    params = [p for p in tower.parameters() if p.requires_grad] + list(head.parameters())
    optimizer, schedule = _one_cycle(params, recipe.tower_lr, recipe.tower_steps, 0.0)
    tower.train()
    losses = []
    for _ in tqdm(range(recipe.tower_steps), desc="organism: tower", disable=not progress):
        idx = torch.randint(len(images), (recipe.batch_size,), generator=gen).numpy()
        flip = torch.rand(recipe.batch_size, generator=gen).numpy() < 0.5
        batch = np.where(flip[:, None, None, None], flipped_images[idx], images[idx])
        target = np.where(flip[:, None], flipped_present[idx], present[idx])
        tokens = patch_states(tower, pixel_values(batch))[-1]  # (B, N, Dv)
        logits = head(tokens.mean(dim=1))
        loss = nn.functional.binary_cross_entropy_with_logits(
            logits, torch.as_tensor(target, dtype=torch.float32)
        )
        _update(optimizer, schedule, loss, losses)
    tower.eval()
    return {"steps": recipe.tower_steps, "loss": _trace(losses)}


class _Captions:
    """Token ids of the training sequences: [prompt with image slots] caption </s>.

    ``corpus`` holds the caption words of the training scenes, in scene order.
    """

    def __init__(self, processor, model, corpus: list[list[str]]):
        self.corpus = corpus
        self.tokenizer = processor.tokenizer
        self.image_id = model.config.image_token_index
        grid = model.config.image_seq_length
        rendered = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
            add_generation_prompt=True,
            tokenize=False,
        )
        expanded = rendered.replace(processor.image_token, processor.image_token * grid)
        self.prompt = self.tokenizer(expanded)["input_ids"]
        self.image_slots = [i for i, t in enumerate(self.prompt) if t == self.image_id]

    def words(self, captions: list[list[str]], *, with_prompt: bool):
        """(ids (B, T), attention (B, T), labels (B, T)): right-padded, loss on caption + </s>."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        head = self.prompt if with_prompt else [self.tokenizer.bos_token_id]
        rows = [[*self.tokenizer.convert_tokens_to_ids(words), eos] for words in captions]
        T = len(head) + max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), T), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(head) + len(row)
            ids[b, :n] = torch.tensor(head + row)
            labels[b, len(head) : n] = torch.tensor(row)
            attention[b, :n] = 1
        return ids, attention, labels


def _lm_loss(model, embeds, attention, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on the labelled positions, and per-token correctness."""
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention)
    logits = model.lm_head(hidden.last_hidden_state[:, :-1])
    target = labels[:, 1:]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    keep = target != -100
    correct = (logits.argmax(-1) == target)[keep]
    return loss, correct


def train_text(model, captions, recipe: Recipe, gen: torch.Generator, progress: bool) -> dict:
    """Stage 1: the Llama learns the caption language alone (no image)."""
    lm = model.model.language_model
    params = list(lm.parameters()) + list(model.lm_head.parameters())
    optimizer, schedule = _one_cycle(params, recipe.text_lr, recipe.text_steps, recipe.weight_decay)
    losses = []
    model.train()
    for _ in tqdm(range(recipe.text_steps), desc="organism: text", disable=not progress):
        idx = torch.randint(len(captions.corpus), (recipe.batch_size,), generator=gen)
        ids, attention, labels = captions.words(
            [captions.corpus[i] for i in idx], with_prompt=False
        )
        loss, _ = _lm_loss(model, lm.embed_tokens(ids), attention, labels)
        _update(optimizer, schedule, loss, losses)
    model.eval()
    return {"steps": recipe.text_steps, "loss": _trace(losses)}


@torch.inference_mode()
def tower_features(model, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """(n, N, Dv) the features the adapter reads (penultimate tower layer, CLS dropped)."""
    tower, layer = model.model.vision_tower, model.config.vision_feature_layer
    return torch.cat(
        [
            patch_states(tower, pixel_values(images[i : i + batch_size]))[layer]
            for i in range(0, len(images), batch_size)
        ]
    )


def _embed(model, captions: _Captions, features, ids) -> torch.Tensor:
    """Token embeddings with the adapter output placed at the image slots."""
    embeds = model.model.language_model.embed_tokens(ids)
    projected = model.model.multi_modal_projector(features)  # (B, N, D)
    embeds = embeds.clone()
    embeds[:, captions.image_slots] = projected
    return embeds


def train_captions(
    model, captions, features, val, recipe: Recipe, gen: torch.Generator, progress: bool
) -> dict:
    """Stage 2: adapter + LLM on image captions; the tower stays frozen."""
    params = list(model.model.multi_modal_projector.parameters())
    params += list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    optimizer, schedule = _one_cycle(params, recipe.lr, recipe.steps, recipe.weight_decay)
    losses = []
    model.train()
    for _ in tqdm(range(recipe.steps), desc="organism: captions", disable=not progress):
        idx = torch.randint(len(features), (recipe.batch_size,), generator=gen)
        ids, attention, labels = captions.words([captions.corpus[i] for i in idx], with_prompt=True)
        loss, _ = _lm_loss(model, _embed(model, captions, features[idx], ids), attention, labels)
        _update(optimizer, schedule, loss, losses)
    model.eval()
    val_features, val_captions = val
    with torch.inference_mode():
        ids, attention, labels = captions.words(val_captions, with_prompt=True)
        loss, correct = _lm_loss(
            model, _embed(model, captions, val_features, ids), attention, labels
        )
    return {
        "steps": recipe.steps,
        "loss": _trace(losses),
        "val_loss": float(loss),
        "val_token_accuracy": float(correct.float().mean()),
    }


def train_organism(
    out: str | Path,
    *,
    seed: int = 0,
    recipe: Recipe | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Train an organism from scratch and save it as an HF checkpoint folder.

    Args:
        out: the checkpoint folder to create (written to a temporary sibling, then renamed).
        seed: seeds the weights, the scenes and the batch order.
        recipe: the training recipe (default ``Recipe()``: 3.5 minutes on 2 quiet CPU cores).
        overwrite: replace an existing folder.
        progress: show progress bars per stage.

    Returns:
        The folder, loadable with ``seglens.models.load_model(out)``.
    """
    from seglens.rundir.files import file_mode, versions, write_json

    recipe = recipe or Recipe()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if seed < 0:
        raise ValueError(f"seed={seed} must be a non-negative integer")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    model, processor = build_organism(recipe.architecture, seed=seed)
    stages, timing = {}, {}

    def timed(name, fn):
        t = time.perf_counter()
        stages[name] = fn()
        timing[name] = round(time.perf_counter() - t, 1)
        log.info("organism: %s done in %.1f s", name, timing[name])

    with torch.random.fork_rng(devices=[]):  # seeded here; the caller's RNG is left untouched
        torch.manual_seed(seed)
        timed("tower", lambda: train_tower(model, recipe, seed, gen, progress))
        images, _, corpus = _scenes(seed, "train", recipe.scenes, SceneStyle(), progress)
        val_images, _, val_corpus = _scenes(seed, "val", recipe.val_scenes, SceneStyle(), progress)
        captions = _Captions(processor, model, corpus)
        timed("text", lambda: train_text(model, captions, recipe, gen, progress))
        features = tower_features(model, images)
        val = (tower_features(model, val_images), val_corpus)
        timed(
            "captions",
            lambda: train_captions(model, captions, features, val, recipe, gen, progress),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        # Stored in fp16 to stay small; config.json keeps float32, the dtype it was trained in
        # and the one ``dtype="auto"`` loads it as.
        stored = getattr(torch, recipe.dtype)
        model.save_pretrained(
            tmp, state_dict={k: v.to(stored) for k, v in model.state_dict().items()}
        )
        processor.save_pretrained(tmp)
        write_json(
            tmp / "training.json",
            {
                "seed": seed,
                "recipe": dataclasses.asdict(recipe),
                "threads": torch.get_num_threads(),
                "stages": stages,
                "seconds": {**timing, "total": round(time.perf_counter() - start, 1)},
                "versions": versions(),
            },
        )
        for path in tmp.iterdir():  # safetensors writes 0600 files; follow the umask
            path.chmod(file_mode())
        tmp.chmod(file_mode() | (file_mode() & 0o444) >> 2)  # a folder: r -> rx, as mkdir does
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("organism saved to %s (%.0f s)", out, time.perf_counter() - start)
    return out
