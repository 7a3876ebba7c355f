"""Precision: the model may run in bf16 while probes, statistics and metrics stay fp32, and a
non-finite feature (fp16 overflow) stops the experiment with the stage's name."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from seglens.analyses.probing.measure import run_probing
from seglens.config import load_config
from seglens.models import tiny_llava

SMALL = {"data.limit_train": 12, "data.limit_eval": 6, "data.batch_size": 6}
SMALL |= {"probe.warmup_batches": 1, "probe.bootstrap": 50, "probe.qualitative": 0}
SMALL |= {"probe.epochs": 2}  # finite and fp32 is what is checked, not convergence


def _finite_numbers(node) -> list[float]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _finite_numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _finite_numbers(v)]
    return [node] if isinstance(node, float) else []


@pytest.mark.parametrize("solver", ["sgd", "lda"])
def test_bf16_model_gives_finite_fp32_probes_and_metrics(tmp_path, solver):
    config = load_config(
        out=str(tmp_path / "run"), **SMALL, **{"model.dtype": "bfloat16", "probe.solver": solver}
    )
    section = run_probing(config, progress=False)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["dtype"] in ("bfloat16", "torch.bfloat16")
    assert results["probing"]["causal"] == section
    values = _finite_numbers(section["metrics"])
    assert values and all(math.isfinite(v) for v in values)
    for stage in section["stages"]:
        assert section["metrics"][stage]["pixel"]["miou"] > 0
        for name, tensor in load_file(tmp_path / f"run/probes/causal/{stage}.safetensors").items():
            assert tensor.dtype == torch.float32, (stage, name)
            if name != "intercept":  # lda: -inf bias for classes never seen
                assert torch.isfinite(tensor).all(), (stage, name)


def test_planted_inf_raises_with_the_stage_name(tmp_path):
    vlm = tiny_llava("clip")
    module = vlm.family.stage_taps()["llm.2"].module

    def overflow(_module, _args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[:, :, 3] = float("inf")  # as an fp16 overflow on one massive dimension
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(overflow)
    try:
        config = load_config(out=str(tmp_path / "run"), **SMALL, **{"probe.solver": "lda"})
        with pytest.raises(ValueError, match=r"non-finite .* stage 'llm\.2'"):
            run_probing(config, vlm=vlm, progress=False)
    finally:
        handle.remove()
    assert not (tmp_path / "run" / "results.json").exists() or "probing" not in json.loads(
        (tmp_path / "run" / "results.json").read_text()
    )
