"""The organism's pieces: scenes, the per-patch tower, training determinism, the saved folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from seglens.data import load_dataset
from seglens.data.organism import (
    CLASS_NAMES,
    FLIPPED,
    SceneStyle,
    draw_scene,
    pattern,
    scene_rng,
    vocabulary,
)
from seglens.organism import Recipe, train_organism
from seglens.organism.build import build_organism, patch_states, pixel_values

QUICK = Recipe(scenes=64, val_scenes=16, batch_size=8, tower_steps=2, text_steps=2, steps=3)


@pytest.fixture(scope="module")
def organism():
    return build_organism(seed=0)


def _scenes(n, stream="test"):
    return [draw_scene(scene_rng(0, stream, i), SceneStyle()) for i in range(n)]


def test_scenes_have_exact_masks_and_consistent_captions():
    words = set(vocabulary())
    mates = 0
    for image, mask, caption in _scenes(300):
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.min() >= 0 and mask.max() < 8
        assert set(caption) <= words
        bg = CLASS_NAMES.index(caption[1])
        named = [CLASS_NAMES.index(w) for w in caption if w in CLASS_NAMES]
        # every class in the caption is present; the two mates of a pair are only bg + object
        assert all((mask == k).any() for k in named)
        assert np.bincount(mask.ravel(), minlength=8)[bg] > 0
        mates += (bg ^ 1) in named[1:]
    # the first object is the background's mate in about half the scenes (a few get covered)
    assert 0.35 < mates / 300 < 0.6


def test_flip_maps_each_texture_to_its_flipped_class():
    """A horizontally flipped diagonal is an antidiagonal: the tower's flip augmentation relabels
    with FLIPPED. Checked on the deterministic patterns over all phases."""
    for k in (0, 1, 2, 3, 4, 5, 6):
        flipped = pattern(k, np.random.default_rng(1))[:, ::-1]
        candidates = [pattern(FLIPPED[k], np.random.default_rng(s)) for s in range(64)]
        assert any(np.allclose(flipped, c) for c in candidates), CLASS_NAMES[k]
    assert FLIPPED[4] == 5 and FLIPPED[5] == 4


def test_patch_states_equal_the_hf_tower(organism):
    model, _ = organism
    images = np.stack([s[0] for s in _scenes(3)])
    with torch.inference_mode():
        hf = model.model.vision_tower(pixel_values(images), output_hidden_states=True)
        mine = patch_states(model.model.vision_tower, pixel_values(images))
    assert len(mine) == len(hf.hidden_states)
    for a, b in zip(hf.hidden_states, mine, strict=True):
        assert torch.equal(a[:, 1:], b)


def test_tower_is_per_patch(organism):
    """Changing the pixels of one patch changes that token's vision states only."""
    model, _ = organism
    image = _scenes(1)[0][0][None]
    other = image.copy()
    other[0, 16:24, 24:32] = 255 - other[0, 16:24, 24:32]  # patch (row 2, col 3) = token 19
    with torch.inference_mode():
        a = model.model.vision_tower(pixel_values(image), output_hidden_states=True)
        b = model.model.vision_tower(pixel_values(other), output_hidden_states=True)
    for ha, hb in zip(a.hidden_states[1:], b.hidden_states[1:], strict=True):
        changed = (ha[0, 1:] != hb[0, 1:]).any(dim=-1).nonzero().flatten().tolist()
        assert changed == [19]


def test_training_is_seeded_and_saves_a_standard_checkpoint(tmp_path):
    from safetensors.torch import load_file

    from seglens.models import load_model
    from seglens.organism.train import PROMPT, _Captions

    old = os.umask(0o022)
    try:
        a = train_organism(tmp_path / "a", seed=3, recipe=QUICK, progress=False)
    finally:
        os.umask(old)
    b = train_organism(tmp_path / "b", seed=3, recipe=QUICK, progress=False)
    c = train_organism(tmp_path / "c", seed=4, recipe=QUICK, progress=False)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert all(v.dtype == torch.float16 for v in wa.values())
    assert {p.stat().st_mode & 0o777 for p in a.iterdir()} == {0o644}
    assert a.stat().st_mode & 0o777 == 0o755
    info = json.loads((a / "training.json").read_text())
    assert info["seed"] == 3 and info["recipe"]["steps"] == 3
    assert set(info["stages"]) == {"tower", "text", "captions"}
    assert len(info["stages"]["captions"]["loss"]) == 1 and "val_loss" in info["stages"]["captions"]
    assert {"torch", "transformers"} <= set(info["versions"])
    # the folder is an ordinary checkpoint: fp32 by default, the training prompt is seglens's
    vlm = load_model(str(a))
    assert next(vlm.model.parameters()).dtype == torch.float32
    model, processor = build_organism(seed=0)
    assert vlm.token_ids(PROMPT) == _Captions(processor, model, []).prompt
    # the attention output projections stayed zero through training and saving
    assert all(
        not layer.self_attn.out_proj.weight.any()
        for layer in vlm.model.model.vision_tower.encoder.layers
    )


def test_existing_folder_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        train_organism(tmp_path / "x", recipe=QUICK, progress=False)


def test_recipe_validates():
    with pytest.raises(ValueError, match="steps=-1"):
        Recipe(steps=-1)
    with pytest.raises(ValueError, match="dtype='bfloat16'"):
        Recipe(dtype="bfloat16")


def test_organism_dataset_is_seeded_and_split():
    val = load_dataset("organism", split="val", num_images=4)
    again = load_dataset("organism", split="val", num_images=4)
    train = load_dataset("organism", split="train", num_images=4)
    assert val.class_names == list(CLASS_NAMES) and val.palette.shape == (8, 3)
    assert np.array_equal(val[2].image, again[2].image)
    assert not np.array_equal(val[2].image, train[2].image)
    assert val[1].name == "organism-val-00001"
    with pytest.raises(ValueError, match="takes no root"):
        load_dataset("organism", root="/data")
    with pytest.raises(ValueError, match="reserved"):
        load_dataset("organism", split="organism:train")


def test_cli_trains(tmp_path):
    from seglens.cli import main

    args = ["organism", "train", "--out", str(tmp_path / "o"), "--scenes", "32", "--steps", "1"]
    args += ["--tower-steps", "1", "--text-steps", "1", "--batch-size", "4"]
    assert main(args) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert main(args) == 2  # exists: refused with the fix


def test_demo_config_file_matches_the_demo():
    from pathlib import Path

    from seglens.config import load_config
    from seglens.experiments.pipeline import DEMO

    path = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    demo = dict(DEMO, **{"probe.cache_dir": "runs/demo/cache"})
    assert load_config(path).to_dict() == load_config(**demo).to_dict()


def test_named_organism_loads_in_fp32():
    from seglens.models import load_model

    vlm = load_model("organism")
    assert vlm.name == "organism" and vlm.grid == (8, 8)
    assert next(vlm.model.parameters()).dtype == torch.float32
