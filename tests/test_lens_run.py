"""The lens analysis of a run: fed by the probing evaluation pass it equals a pass of its own, and
it writes the ``lens`` and ``sinks`` sections and its arrays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from family_checks import cached_model
from seglens.analyses.probing.measure import run_probing
from seglens.config import load_config
from seglens.experiments.streaming import resolve_stages
from seglens.readouts.run import LENS_ARRAYS, LensConfig, lens_feed, run_lens


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A small lda probing run on the organism whose evaluation pass fed a lens feed."""
    vlm = cached_model("organism")
    config = load_config(
        **{
            "model.name": "organism",
            "data.dataset": "organism",
            "data.synthetic_images": 8,
            "data.limit_train": 8,
            "data.limit_eval": 4,
            "data.batch_size": 4,
            "probe.solver": "lda",
            "probe.bootstrap": 20,
            "probe.qualitative": 0,
            "out": str(tmp_path_factory.mktemp("lens") / "run"),
        }
    )
    stages = resolve_stages(vlm, config.probe)
    names = ["hstripes", "vstripes", "dots", "checker", "diagonal", "antidiagonal", "grid", "blobs"]
    feed = lens_feed(vlm, names, stages, LensConfig(), dataset="organism", bootstrap=20)
    run_probing(config, vlm=vlm, progress=False, on_eval_batch=feed.offer)
    return Path(config.out), vlm, feed


def test_the_feed_equals_a_pass_of_its_own(probed):
    out, vlm, feed = probed
    shared = run_lens(out, vlm=vlm, progress=False, feed=feed)
    own = run_lens(out, vlm=vlm, progress=False)  # the saved probes, one more pass
    assert shared["readouts"] == own["readouts"]
    assert shared["stages"] == ["adapter", "llm.1", "llm.2", "llm.3", "llm.4"]
    for block in own["readouts"].values():
        assert set(block["minus_probe"]) == {"patch", "pixel"}
    results = json.loads((out / "results.json").read_text())
    assert results["lens"]["readouts"] == json.loads(json.dumps(own["readouts"]))
    sinks = results["sinks"]
    assert sinks["rule"] == "norm" and sinks["images"] == 4
    assert set(sinks["stages"]) == {"encoder", "adapter", "llm.1", "llm.2", "llm.3", "llm.4"}
    for stage, block in sinks["stages"].items():
        assert len(block["positions"]) == vlm.num_image_tokens
        reads = block["scores"]
        assert "probe" in reads, stage  # the saved probes read every stage
        assert ("lens" in reads) == (stage != "encoder")
    assert (out / LENS_ARRAYS).is_file()
    keys = sinks["keys"]  # the organism's 4 images have no sink: nothing knocked out
    assert keys["status"] == "no_sinks" and keys["images"] == keys["images_with_sinks"] == 0


def test_a_run_without_probing_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises((ValueError, FileNotFoundError)):
        run_lens(tmp_path / "run")


def test_bad_config_is_an_error():
    with pytest.raises(ValueError, match="sinks rule 'top' is not one of"):
        LensConfig(sink_rule="top")
    with pytest.raises(ValueError, match="lens readouts"):
        LensConfig(readouts=("probe",))
    with pytest.raises(ValueError, match=r"lens.sink_keys_images=0 must be >= 1"):
        LensConfig(sink_keys_images=0)
