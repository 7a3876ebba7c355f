"""Lens scoring: the probe's confusion counts, the oracle mode, no extra forward in the probing
pass, paired intervals of lens minus probe; a planted model scores 1.0 and a random one chance."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from family_checks import cached_model
from seglens.config import DataConfig, ProbeConfig
from seglens.data.organism import OrganismDataset
from seglens.experiments.evaluation import evaluate_probes
from seglens.experiments.training import train_probes
from seglens.readouts.scoring import LensOptions, LensScorer, lens_section

DATA = DataConfig(batch_size=16)
STAGES = ["encoder", "adapter", "llm.1", "llm.2", "llm.3", "llm.4"]


@pytest.fixture(scope="module")
def organism():
    return cached_model("organism")


@pytest.fixture(scope="module")
def scenes():
    return OrganismDataset(32, split="validation", seed=3)


def _batch(vlm, dataset, n=16):
    pre = vlm.preprocessor(dataset.num_classes)
    return vlm.collate([pre(dataset[i]) for i in range(n)])


def _planted(vlm, batch, rows):
    """A forward hook making the adapter output of a class-c patch the unembedding row of c's
    token (ignore patches keep theirs)."""
    head = vlm.family.unembedding().weight
    labels = batch.labels

    def hook(_m, _a, out):
        out = out.clone()
        lab = labels.reshape(out.shape[0], -1).to(out.device)
        valid = lab != 255
        out[valid] = head[rows[lab[valid]]].to(out.dtype)
        return out

    return vlm.model.model.multi_modal_projector.register_forward_hook(hook)


def _random_twin(vlm, seed=0):
    """The same architecture and tokenizer with re-drawn weights (norm gains kept at one)."""
    twin = copy.deepcopy(vlm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.fill_(1.0 if p.abs().mean() > 0.5 else 0.0)
    return twin


def test_planted_model_scores_one_and_a_random_model_chance(organism, scenes):
    patch = LensOptions(pixel_level=False)  # the planted claim is about tokens
    scorer = LensScorer(organism, scenes.class_names, STAGES, patch, dataset="organism")
    rows = torch.tensor([ids[0] for _, _, ids in scorer.tokens.entries])
    assert len(rows) == scenes.num_classes  # one word per class: entry c is class c
    batch = _batch(organism, scenes)
    handle = _planted(organism, batch, rows)
    try:
        states = organism.capture(batch, STAGES)
    finally:
        handle.remove()
    scorer(batch, states)
    for key in ("logit/all", "logit/present"):
        assert scorer.results[key].patch["adapter"].miou() == 1.0, key

    twin = _random_twin(organism)
    plain = LensScorer(twin, scenes.class_names, STAGES, patch, dataset="organism")
    plain(batch, twin.capture(batch, STAGES))
    res = plain.results["logit/all"]
    for stage in res.stages:
        assert res.patch[stage].miou() < 0.25, stage  # 8 classes: chance, far from 1


def test_patch_counts_equal_sklearn_on_the_lens_argmax(organism, scenes):
    batch = _batch(organism, scenes, 8)
    states = organism.capture(batch, STAGES)
    patch = LensOptions(pixel_level=False)
    scorer = LensScorer(organism, scenes.class_names, STAGES, patch, dataset="organism")
    scorer(batch, states)
    C = scenes.num_classes
    labels = batch.labels.numpy().ravel()
    valid = labels != 255
    for readout in ("logit", "embedding"):
        for stage in scorer.stages:
            z = scorer.lens.read(readout, states[stage])
            pred = z.argmax(-1).numpy().ravel()
            want = confusion_matrix(labels[valid], pred[valid], labels=range(C))
            got = scorer.results[f"{readout}/all"].patch[stage].matrix.numpy()
            np.testing.assert_array_equal(got, want)
            # Oracle: only the image's own classes can be predicted.
            present = [set(np.unique(m[m != 255])) for m in batch.masks]
            res = scorer.results[f"{readout}/present"].patch[stage].matrix.numpy()
            seen = set(np.nonzero(res.sum(0))[0])
            assert seen <= set().union(*present)
            assert res.sum() == want.sum()


def test_scored_in_the_probing_pass_without_an_extra_forward(organism):
    train = OrganismDataset(16, split="train", seed=1)
    evaluation = OrganismDataset(12, split="validation", seed=2)
    stages = ["adapter", "llm.4"]
    cfg = ProbeConfig(solver="lda", bootstrap=50, qualitative=0)
    data = DataConfig(batch_size=4)
    bank = train_probes(organism, train, stages, cfg, data_config=data, progress=False)
    scorer = LensScorer(organism, evaluation.class_names, stages, dataset="organism", bootstrap=50)
    calls = []
    projector = organism.model.model.multi_modal_projector  # runs once per forward
    handle = projector.register_forward_hook(lambda *_: calls.append(1))
    try:
        probe = evaluate_probes(
            organism,
            bank,
            evaluation,
            stages,
            cfg,
            data_config=data,
            progress=False,
            on_batch=scorer,
        )
    finally:
        handle.remove()
    assert len(calls) == 3  # one forward per batch of 4: the lens added none
    scorer.finish()
    counts = {"patch": probe.patch_images, "pixel": probe.pixel_images}
    section = lens_section(scorer, counts, bootstrap=50)
    assert section["stages"] == stages
    assert section["images"] == 12
    for key, block in section["readouts"].items():
        for level in ("patch", "pixel"):
            for stage in stages:
                d = block["minus_probe"][level][stage]
                lens_miou = block["metrics"][stage][level]["miou"]
                probe_miou = probe.metrics()[stage][level]["miou"]
                assert d["estimate"] == pytest.approx(lens_miou - probe_miou), (key, stage)
                assert d["low"] <= d["estimate"] <= d["high"]
                assert d["n_images"] == 12


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"lens modes \['oracle'\]: each must be one of"):
        LensOptions(modes=("oracle",))
    with pytest.raises(ValueError, match="lens subtokens 'last' is not one of"):
        LensOptions(subtokens="last")


def test_lens_needs_an_llm_stage(organism):
    with pytest.raises(ValueError, match=r"reads 'adapter' and 'llm\.<l>' stages"):
        LensScorer(organism, ["a", "b"], ["encoder"])


def test_only_chosen_readouts_and_patch_level(organism, scenes):
    opts = LensOptions(readouts=("embedding",), modes=("present",), pixel_level=False)
    scorer = LensScorer(organism, scenes.class_names, ["adapter"], opts, dataset="organism")
    batch = _batch(organism, scenes, 4)
    scorer(batch, organism.capture(batch, ["adapter"]))
    assert list(scorer.results) == ["embedding/present"]
    assert scorer.results["embedding/present"].pixel is None
    section = lens_section(scorer.finish(), None, bootstrap=0)
    assert section["readouts"]["embedding/present"]["minus_probe"] == {}
    assert section["readouts"]["embedding/present"]["summary"]["level"] == "patch"


def test_present_mode_upsamples_only_the_present_classes_with_the_same_result(organism, scenes):
    from seglens.metrics import pixel_target, score_target
    from seglens.readouts.lens import present_classes, restrict
    from seglens.readouts.scoring import _stage_results, score_batch

    batch = _batch(organism, scenes, 4)
    states = organism.capture(batch, ["adapter", "llm.4"])
    scorer = LensScorer(organism, scenes.class_names, ["adapter", "llm.4"], dataset="organism")
    C, N = scenes.num_classes, organism.num_image_tokens
    present = present_classes(batch.masks, C)
    z = torch.stack([scorer.lens.logit_lens(states[s]) for s in ("adapter", "llm.4")])
    z = restrict(z.flatten(0, 1), present.repeat(2, 1)).reshape(z.shape)
    pairs = zip(batch.masks, batch.transforms, strict=True)
    targets = [score_target(torch.from_numpy(pixel_target(m, t)), C) for m, t in pairs]
    fast, slow = (_stage_results(["a", "b"], C, N, 1, True, 0, 0, "cpu") for _ in range(2))
    score_batch(fast, z, batch, organism.grid, targets, torch.tensor([True, True]), present)
    score_batch(slow, z, batch, organism.grid, targets)
    for s in ("a", "b"):
        assert torch.equal(fast.pixel[s].matrix, slow.pixel[s].matrix)
        assert fast.pixel[s].matrix.sum() > 0
