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

Measured on the shipped checkpoint and its twin (this CPU, torch 2.13, seed 0), with margins
(the distance from the bound to the threshold; bench/README.md has seeds 1 and 2):
(a) adapter - encoder -0.021 [-0.028, -0.016]: margin 0.016 below 0; encoder 0.690, its interval
    above the twin's encoder (0.332) by about 0.34.
(b) best LLM layer llm.3 - adapter +0.124 [+0.116, +0.131]: margin 0.116; twin +0.003.
(c) at llm.4, block correct - control, pools outside_pair / pair / image: -0.235 / -0.167 /
    -0.204 (interval highs -0.219 / -0.154 / -0.190) against the twin's -0.115 / -0.070 / -0.077
    (lows -0.130 / -0.083 / -0.091): margins 0.089 / 0.071 / 0.099; block incorrect - control
    +0.035 / +0.023 / +0.016 (lows +0.027 / +0.019 / +0.013, all >= 0).
(d) at llm.2, causal first-rows gain - last-rows gain -0.038 [-0.050, -0.028]: margin 0.028;
    bidirectional - causal on the first rows +0.042 [+0.035, +0.050]: margin 0.035; the twin
    fails both (-0.007 [-0.023, +0.009], -0.024 [-0.048, +0.003]).
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
    """(d) causal: first rows gain less than the last rows; bidirectional raises the first rows;
    both beyond the twin: each interval excludes the twin's estimate in the stated direction.

    Since the float32 probes (issue 25) the twin's own (d) holds marginally (bidirectional minus
    causal on the first rows +0.017 [+0.000, +0.033]), so, as for (c), only an effect beyond what
    the architecture alone produces counts."""
    found, null = model["findings"]["early_positions"], twin["findings"]["early_positions"]
    if not found["holds"]:
        return False
    gap, null_gap = found["causal_early_minus_late_gain"], null["causal_early_minus_late_gain"]
    raised, null_raised = (
        found["bidirectional_minus_causal_early"],
        null["bidirectional_minus_causal_early"],
    )
    return bool(gap["high"] < null_gap["estimate"] and raised["low"] > null_raised["estimate"])


@pytest.mark.parametrize("criterion", [drop, recovery, anchors, early_positions])
def test_finding_holds_on_the_organism_and_fails_on_its_twin(criterion, shipped, twin):
    name = criterion.__name__  # the finding's key in results.json
    texts = f"organism: {shipped['findings'][name]['text']}\ntwin: {twin['findings'][name]['text']}"
    assert criterion(shipped, twin), texts
    assert not criterion(twin, twin), texts
