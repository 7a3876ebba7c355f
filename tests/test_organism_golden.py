"""Golden acceptance tests: the shipped organism shows the paper's four findings beyond what its
random twin shows, and none of the criteria passes for the twin.

One ``seglens run --twin`` (a module fixture) with the settings of ``seglens.organism.ANALYSIS``
(UMAP, pixel scoring and the report off, for time) gives the organism's findings, those of its
random twin (``RUN/twin``: the same architecture re-initialised by HF ``_init_weights`` from seed
0, run on the same 800 evaluation scenes with its own probes) and, per finding statistic, model
minus twin with a paired 95% bootstrap interval over the scenes (``seglens.analyses.twin``). Token
mixing alone produces part of some findings (a random adapter loses information; blocking the
tokens a probe gets right biases any average over tokens), so every criterion is written as
``criterion(model, twin, versus)`` against the twin as the null model: (a) the drop holds and the
organism's encoder carries more than the twin's (its interval above the twin's); (b), (c) and (d)
the finding holds *beyond the architecture* (every directed model-minus-twin interval excludes
zero in the finding's direction). Each must hold for the organism and fail for the twin compared
with itself (every difference is then exactly zero).

Measured on the shipped checkpoint (this CPU, torch 2.13, seed 0, 2026-12-03; the README table):
(a) adapter - encoder -0.021 [-0.028, -0.016] (margin 0.016); encoder [0.684, 0.696] against the
    twin's [0.320, 0.344].
(b) model - twin of best LLM layer - adapter +0.102 [+0.088, +0.114] (margin 0.088).
(c) model - twin of block correct - control, pools outside_pair / pair / image: -0.187 / -0.139 /
    -0.171 (highs -0.168 / -0.123 / -0.155); the organism's block incorrect - control lows
    +0.021 / +0.018 / +0.011 (>= 0).
(d) model - twin of the causal early - late gain -0.036 [-0.058, -0.015] (margin 0.015), of
    bidirectional - causal on the first rows +0.038 [+0.020, +0.055] (margin 0.020).
The fixture took 1,036 s on this box at load ~6 (other jobs running); the suite runs it on one
pytest-xdist worker while the other runs the rest.
"""

from __future__ import annotations

import os

import pytest
import torch

from seglens.organism import ANALYSIS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """One ``seglens run --twin`` of the shipped organism: its results, its twin's (``RUN/twin``,
    the same architecture re-initialised by HF ``_init_weights``, seed 0), the twin section
    (model vs twin) and the twin compared with itself (every difference exactly zero)."""
    from seglens.analyses.twin import compare
    from seglens.config import load_config
    from seglens.experiments.pipeline import run
    from seglens.rundir.files import read_json

    out = tmp_path_factory.mktemp("golden") / "organism"
    overrides = {**ANALYSIS, "out": str(out), "umap.enabled": False, "twin.enabled": True}
    overrides |= {"lens.enabled": False, "knockout.attention": False}  # no criterion reads them
    overrides |= {"probe.cache_dir": str(out.parent / "cache")}
    overrides |= {"probe.pixel_level": False, "probe.qualitative": 0}
    # The suite's longest fixture: every core, since the other xdist workers finish first.
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or threads)
    try:
        run(load_config(**overrides), progress=False, report=False)
    finally:
        torch.set_num_threads(threads)
    model, twin = read_json(out / "results.json"), read_json(out / "twin" / "results.json")
    return {
        "organism": (model, twin, model["twin"]["findings"]),
        "twin": (twin, twin, compare(out / "twin", out / "twin")),
    }


def _encoder_interval(results: dict) -> list[float]:
    return results["probing"]["causal"]["metrics"]["encoder"]["patch"]["ci"]["miou"]


def drop(model: dict, twin: dict, versus: dict) -> bool:
    """(a) adapter below encoder, and the encoder carries more than the twin's encoder."""
    return bool(
        model["findings"]["drop"]["holds"]
        and _encoder_interval(model)[0] > _encoder_interval(twin)[1]
    )


def recovery(model: dict, twin: dict, versus: dict) -> bool:
    """(b) the best LLM layer above the adapter, and above it by more than in the twin (model
    minus twin, paired over images, excludes zero)."""
    return bool(model["findings"]["recovery"]["holds"] and versus["recovery"]["beyond_twin"])


def anchors(model: dict, twin: dict, versus: dict) -> bool:
    """(c) block correct below its control and block incorrect not below its control, under every
    pool, with an anchor effect beyond the twin's under every pool (model minus twin of block
    correct - control below zero, paired over images)."""
    return bool(model["findings"]["anchors"]["holds"] and versus["anchors"]["beyond_twin"])


def early_positions(model: dict, twin: dict, versus: dict) -> bool:
    """(d) causal: first rows gain less than the last rows; bidirectional raises the first rows;
    both beyond the twin (model minus twin excludes zero in each direction, paired over images).

    Since the float32 probes (issue 25) the twin's own (d) can hold marginally, so, as for (c),
    only an effect beyond what the architecture alone produces counts."""
    found = model["findings"]["early_positions"]
    return bool(found["holds"] and versus["early_positions"]["beyond_twin"])


@pytest.mark.parametrize("criterion", [drop, recovery, anchors, early_positions])
def test_finding_holds_on_the_organism_and_fails_on_its_twin(criterion, golden):
    name = criterion.__name__  # the finding's key in results.json
    model, twin, versus = golden["organism"]
    texts = f"organism vs twin: {versus[name]['text']}"
    texts += (
        f"\norganism: {model['findings'][name]['text']}\ntwin: {twin['findings'][name]['text']}"
    )
    assert criterion(*golden["organism"]), texts
    assert not criterion(*golden["twin"]), texts
