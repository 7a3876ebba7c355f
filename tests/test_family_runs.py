"""`seglens run` end to end on every tiny model family: all sections written, both attention
conditions present, and for natively bidirectional models the causal condition is the intervention.
"""

from __future__ import annotations

import json

import pytest
import yaml

from seglens.cli import main


@pytest.mark.parametrize(
    ("model", "native"),
    [
        ("tiny-gemma3", "bidirectional"),
        ("tiny-qwen2-vl", "causal"),
        ("tiny-qwen2.5-vl", "causal"),
        ("tiny-llava-next", "causal"),
        ("tiny-paligemma", "prefix"),
    ],
)
def test_run_end_to_end(model, native, tmp_path):
    config = {
        "out": str(tmp_path / "run"),
        "model": {"name": model, "device": "cpu"},
        "data": {"dataset": "synthetic", "limit_train": 8, "limit_eval": 6, "batch_size": 4},
        "probe": {"solver": "lda", "bootstrap": 20, "qualitative": 1},
        "knockout": {"top_k": 3, "min_support": 1},
        "umap": {"tokens": 100, "neighbors": 5},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["native_image_attention"] == native
    clean = "causal" if native == "causal" else "bidirectional_image"
    assert set(results["probing"]) == {"causal", "bidirectional_image"}
    assert results["probing"][clean]["metrics"]["adapter"]["probe"]["file"].startswith(
        f"probes/{clean}/"
    )
    for section in ("knockout", "bidirectional", "umap", "figures"):
        assert results[section], section
    assert (tmp_path / "run" / "report.html").is_file()
