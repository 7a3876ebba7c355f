"""Shared fixtures: tiny seeded models, synthetic images, offline mode."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch

# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the
# cores, so that workers do not oversubscribe them; a plain `pytest` keeps two threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 2) // _WORKERS) if _WORKERS > 1 else 2)


@pytest.fixture(scope="session")
def tiny_models():
    """Cache of tiny models keyed by (vision, attn_implementation)."""
    from seglens.models import tiny_llava

    cache = {}

    def get(vision: str = "clip", attn: str = "sdpa"):
        if (vision, attn) not in cache:
            cache[vision, attn] = tiny_llava(vision, attn_implementation=attn)
        return cache[vision, attn]

    return get


@pytest.fixture
def tiny_vlm(tiny_models):
    return tiny_models("clip", "sdpa")


@pytest.fixture
def random_images():
    rng = np.random.default_rng(0)

    def make(n: int = 2, height: int = 180, width: int = 240):
        return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(n)]

    return make


TWO_PROMPTS = ["Describe the image.", "What is in this picture? Answer in detail."]


def results_of(run) -> dict:
    """The ``results.json`` of a run directory."""
    import json

    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="session")
def make_probe_run(tmp_path_factory, tiny_models):
    """A factory of small lda probing runs on tiny-clip (a fresh directory per call)."""
    from seglens.analyses.probing.measure import run_probing
    from seglens.config import load_config

    def make(name: str):
        run = tmp_path_factory.mktemp(name) / "run"
        config = load_config(
            **{
                "model.name": "tiny-clip",
                "data.dataset": "synthetic",
                "data.limit_train": 16,
                "data.limit_eval": 8,
                "probe.solver": "lda",
                "probe.bootstrap": 0,
                "probe.pixel_level": False,
                "probe.qualitative": 1,
                "out": str(run),
            }
        )
        run_probing(config, vlm=tiny_models("clip"), progress=False)
        return run

    return make


def hf_forward_last(model, **inputs):
    """HF's own forward with every hidden state, plus the last decoder block's output.

    HF's last ``hidden_states`` entry is after the final norm; the block output (``llm.L``) is
    read with a forward hook, removed afterwards.

    Returns:
        (outputs, (B, T, D) output of the last decoder block).
    """
    last = {}
    block = model.model.language_model.layers[-1]
    handle = block.register_forward_hook(lambda _m, _a, out: last.setdefault("h", out))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return out, last["h"]
