"""Golden acceptance tests: the shipped organism shows the paper's four findings, and none of the
tests passes for its random-weight twin (the same architecture with its initial weights).

Each run is one ``seglens run`` with the settings of ``seglens.organism.ANALYSIS`` (UMAP and pixel
scoring off, for time); each finding is a verdict on paired 95% bootstrap intervals over the 800
evaluation scenes (``seglens.experiments.findings``). Two findings also appear on random weights,
as token mixing alone produces them: a random adapter loses some of what a random tower carries
(a), and blocking the tokens a probe gets right biases any average over tokens (c). Those two are
therefore tested against the twin as the null model: the organism's encoder must carry more than
the twin's, and its anchor effect must exceed the twin's under every control pool. Every test is
written as ``criterion(model, twin)`` and must hold for the organism and fail for the twin.

Measured on the shipped checkpoint (this CPU, torch 2.13, seed 0) and its twin, with margins:
(a) drop -0.011 [-0.016, -0.006] (margin 0.006 below 0); encoder 0.691, interval low above the
    twin's encoder (0.332) by about 0.35.
(b) best LLM layer llm.3 +0.115 [+0.108, +0.122] over the adapter (margin 0.108); twin -0.001.
(c) block correct minus control at llm.4: outside_pair -0.239, pair -0.170, image -0.209 (interval
    highs -0.222, -0.156, -0.194); twin -0.086, -0.056, -0.059 (lows -0.103, -0.068, -0.073):
    margins of about 0.09 to 0.12; block incorrect minus control +0.016 to +0.026 (>= 0).
(d) causal first-rows minus last-rows gain -0.036 [-0.046, -0.025] (margin 0.025); bidirectional
    minus causal on the first rows +0.036 [+0.028, +0.044] (margin 0.028); twin fails both.
"""

from __future__ import annotations

import pytest

from seglens.organism import ANALYSIS

pytestmark = pytest.mark.slow


def _run(out, model: str) -> dict:
    from seglens.config import load_config
    from seglens.experiments.pipeline import run
    from seglens.rundir.files import read_json

    overrides = {**ANALYSIS, "model.name": model, "out": str(out), "umap.enabled": False}
    overrides |= {"probe.cache_dir": str(out.parent / f"{out.name}-cache")}
    overrides |= {"probe.pixel_level": False, "probe.qualitative": 0}
    run(load_config(**overrides), progress=False)
    return read_json(out / "results.json")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("golden") / "organism", "organism")


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """The organism's architecture with its initial (untrained) weights, saved as a checkpoint."""
    from seglens.organism.build import build_organism

    folder = tmp_path_factory.mktemp("twin") / "checkpoint"
    model, processor = build_organism(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return _run(folder.parent / "run", str(folder))


def _encoder_interval(results: dict) -> list[float]:
    return results["probing"]["causal"]["metrics"]["encoder"]["patch"]["ci"]["miou"]


def drop(model: dict, twin: dict) -> bool:
    """(a) adapter below encoder, and the encoder carries more than the twin's encoder."""
    return bool(
        model["findings"]["drop"]["holds"]
        and _encoder_interval(model)[0] > _encoder_interval(twin)[1]
    )


def recovery(model: dict, twin: dict) -> bool:
    """(b) the best LLM layer above the adapter."""
    return bool(model["findings"]["recovery"]["holds"])


def anchors(model: dict, twin: dict) -> bool:
    """(c) block correct below its control and block incorrect not below its control, under every
    pool, with an anchor effect beyond the twin's under every pool."""
    found, null = model["findings"]["anchors"], twin["findings"]["anchors"]
    if not found["holds"]:
        return False
    return all(
        gap["block_correct_minus_control"]["high"]
        < null["pools"][pool]["block_correct_minus_control"]["low"]
        for pool, gap in found["pools"].items()
    )


def early_positions(model: dict, twin: dict) -> bool:
    """(d) causal: first rows gain less than the last rows; bidirectional raises the first rows."""
    return bool(model["findings"]["early_positions"]["holds"])


@pytest.mark.parametrize("criterion", [drop, recovery, anchors, early_positions])
def test_finding_holds_on_the_organism_and_fails_on_its_twin(criterion, shipped, twin):
    name = criterion.__name__  # the finding's key in results.json
    texts = f"organism: {shipped['findings'][name]['text']}\ntwin: {twin['findings'][name]['text']}"
    assert criterion(shipped, twin), texts
    assert not criterion(twin, twin), texts
