"""`seglens run` end to end on every tiny model family: all sections written, both attention
conditions present, and for natively bidirectional models the causal condition is the intervention.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from seglens.cli import main

# Expected native image attention per family; every other family is causal.
NATIVE = {"gemma3": "bidirectional", "paligemma": "prefix"}


def run_models() -> list[tuple[str, str]]:
    """(tiny model, expected native attention) for the registered tiny models: the first of each
    family and every other one that differs from it in more than its vision tower (``vision``:
    the same pipeline, their stages checked in test_capture.py), e.g. a tile grid or a kept CLS."""
    from seglens.models import registry

    first, out = {}, []
    for name, spec in registry().tiny.items():
        base = first.setdefault(spec.family.name, spec)
        strip = {k: v for k, v in spec.kwargs.items() if k != "vision"}
        same = {k: v for k, v in base.kwargs.items() if k != "vision"} == strip
        if spec is base or not same or spec.family_options != base.family_options:
            out.append((name, NATIVE.get(spec.family.name, "causal")))
    return out


#: The models whose run also draws the report: one per native image attention (the figures
#: read only results.json, which has one layout for every family; tests/test_report.py draws
#: every figure); the others run with ``--no-report``, which the suite's time asks for.
REPORTED = {"tiny-clip", "tiny-gemma3", "tiny-paligemma"}


@pytest.mark.parametrize(("model", "native"), run_models())
def test_run_end_to_end(model, native, tmp_path):
    config = {
        "out": str(tmp_path / "run"),
        "model": {"name": model, "device": "cpu"},
        "data": {"dataset": "synthetic", "limit_train": 8, "limit_eval": 6, "batch_size": 4},
        "probe": {"solver": "lda", "bootstrap": 20, "qualitative": 1},
        "knockout": {"top_k": 3, "min_support": 1},
        "umap": {"tokens": 100, "neighbors": 5},
        "lens": {"enabled": False},  # per family in test_lens.py (the lens at llm.L = logits)
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    report = model in REPORTED
    assert main(["run", "--config", str(path), "--report" if report else "--no-report"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["native_image_attention"] == native
    clean = "causal" if native == "causal" else "bidirectional_image"
    assert set(results["probing"]) == {"causal", "bidirectional_image"}
    assert results["probing"][clean]["metrics"]["adapter"]["probe"]["file"].startswith(
        f"probes/{clean}/"
    )
    for section in ("knockout", "bidirectional", "umap", "findings"):
        assert results[section], section
    assert bool(results.get("figures")) == report
    assert (tmp_path / "run" / "report.html").is_file() == report


@pytest.mark.parametrize(("model", "differs"), [("tiny-clip", False), ("tiny-gemma3", True)])
def test_knockout_queries_after_vs_all(model, differs, tiny_models, random_images):
    """`knockout.queries`: "after" (later_only) and "all" are the same edge set under causal
    attention, and differ in a natively bidirectional image block for queries before the key."""
    from seglens.interventions import Knockout, TokenSet, intervene
    from seglens.models import load_model

    vlm = tiny_models("clip") if model == "tiny-clip" else load_model(model)
    batch = vlm.prepare(random_images(1))
    j = vlm.num_image_tokens // 2
    keys = TokenSet.from_slots([j])
    states = {}
    for later_only in (True, False):
        with intervene(vlm, [Knockout(keys=keys, later_only=later_only)]):
            states[later_only] = vlm.capture(batch, ["llm.1", "llm.2"])
    after, every = states[True], states[False]
    # Block 1: slots j.. read the same keys under both (j keeps itself); only earlier ones differ.
    assert torch.equal(after["llm.1"][:, j:], every["llm.1"][:, j:])
    assert (not torch.equal(after["llm.1"][:, :j], every["llm.1"][:, :j])) == differs
    # Block 2: under causal attention nothing differs; in a bidirectional image block the
    # changed early slots are read by the later ones.
    assert torch.equal(after["llm.2"], every["llm.2"]) == (not differs)
    assert (not torch.equal(after["llm.2"][:, j + 1 :], every["llm.2"][:, j + 1 :])) == differs
