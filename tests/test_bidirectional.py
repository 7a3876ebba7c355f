"""Causal vs bidirectional image attention on a tiny probing run: the CLI adds the probing
condition and the ``bidirectional`` section the report reads; per-position arrays are consistent;
stages before the LLM do not move (the intervention acts only inside it)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import results_of
from seglens.analyses.bidirectional.measure import default_layer, run_bidirectional
from seglens.cli import main
from seglens.probes import ProbeBank
from seglens.results import load_arrays

STAGES = ["encoder", "adapter", "llm.1", "llm.2", "llm.3", "llm.4"]


@pytest.fixture(scope="module")
def probe_run(make_probe_run):
    return make_probe_run("bidir")


@pytest.fixture(scope="module")
def bidir_run(probe_run):
    assert main(["bidir", "--run", str(probe_run)]) == 0
    return probe_run


def test_cli_adds_the_condition_and_the_section(bidir_run):
    res = results_of(bidir_run)
    causal, bidir = res["probing"]["causal"], res["probing"]["bidirectional_image"]
    assert causal["stages"] == bidir["stages"] == STAGES and bidir["solver"] == "lda"
    for stage in STAGES:
        assert bidir["metrics"][stage]["probe"]["file"] == f"probes/bidirectional_image/{stage}"
        assert 0.0 <= bidir["metrics"][stage]["patch"]["miou"] <= 1.0
    assert ProbeBank.load(bidir_run / "probes/bidirectional_image").n_classes == 6
    section = res["bidirectional"]
    assert section["layer"] == "llm.2" and section["level"] == "patch"
    assert section["conditions"] == ["causal", "bidirectional_image"]
    for cond, probing in (("causal", causal), ("bidirectional_image", bidir)):
        assert section["miou"][cond] == {s: probing["metrics"][s]["patch"]["miou"] for s in STAGES}
    for name in ("bidirectional_miou", "bidirectional_positions", "bidirectional_heatmaps"):
        assert (bidir_run / res["figures"][name]).stat().st_size > 0
    assert "layerwise_miou" in res["figures"]  # the probing figures are still drawn


def test_position_arrays(bidir_run):
    res = results_of(bidir_run)
    arrays = load_arrays(bidir_run / res["bidirectional"]["position_accuracy_file"])
    assert set(arrays) == {"causal", "bidirectional_image", "difference"}
    assert all(a.shape == (res["model"]["num_image_tokens"],) for a in arrays.values())
    np.testing.assert_array_equal(
        arrays["difference"], arrays["bidirectional_image"] - arrays["causal"]
    )
    causal = load_arrays(bidir_run / "arrays/probing_causal.npz")
    bidir = load_arrays(bidir_run / "arrays/probing_bidirectional_image.npz")
    np.testing.assert_array_equal(arrays["causal"], causal["position_accuracy__llm.2"])
    np.testing.assert_array_equal(arrays["bidirectional_image"], bidir["position_accuracy__llm.2"])


def test_stages_before_the_llm_do_not_move(bidir_run):
    probing = results_of(bidir_run)["probing"]
    causal, bidir = probing["causal"]["metrics"], probing["bidirectional_image"]["metrics"]
    for stage in ("encoder", "adapter"):
        assert causal[stage]["patch"] == bidir[stage]["patch"], stage
    assert any(causal[s]["patch"] != bidir[s]["patch"] for s in STAGES[2:])


def test_default_layer_is_the_middle_one():
    assert [default_layer(n) for n in (1, 4, 5, 32, 40)] == [1, 2, 3, 16, 20]


def test_bad_layers_and_runs_are_refused(probe_run, tiny_models, tmp_path):
    vlm = tiny_models("clip")
    with pytest.raises(
        ValueError, match=r"bidir.layer=9 is not an LLM layer of this model \(1..4\)"
    ):
        run_bidirectional(probe_run, vlm=vlm, layer=9)
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="run `seglens probe` first"):
        run_bidirectional(tmp_path, vlm=vlm)


def test_cli_layer_option_reaches_the_run(probe_run, capsys):
    assert main(["bidir", "--run", str(probe_run), "--layer", "7"]) == 2
    assert "bidir.layer=7 is not an LLM layer" in capsys.readouterr().err
