"""The lens as a registered analysis: part of `seglens run` (riding on the probing pass), its
own `seglens lens` subcommand, its config section, results sections, figures and report blocks."""

from __future__ import annotations

import yaml

from seglens.analyses import analyses, get
from seglens.cli import main
from seglens.readouts.analysis import ANALYSIS
from seglens.rundir import load_results


def test_lens_is_built_in_after_probing():
    every = analyses()
    assert every["lens"] is ANALYSIS
    names = list(every)
    assert names.index("probing") < names.index("lens")
    assert get("lens").needs == ("probing",)


CONFIG = {
    "seed": 0,
    "model": {"name": "tiny-clip", "device": "cpu"},
    "data": {"dataset": "synthetic", "limit_train": 8, "limit_eval": 4, "batch_size": 4},
    "probe": {"solver": "lda", "bootstrap": 20, "qualitative": 0, "pixel_level": False},
    "knockout": {"enabled": False},
    "bidir": {"enabled": False},
    "umap": {"enabled": False},
    "lens": {"subtokens": "first"},
}


def test_lens_runs_in_seglens_run_and_has_its_subcommand(tmp_path, capsys, caplog):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "out": str(tmp_path / "run")}))
    with caplog.at_level("INFO", logger="seglens.experiments.plan"):
        assert main(["run", "--config", str(config)]) == 0
    run = tmp_path / "run"
    results = load_results(run / "results.json")
    # the plan is logged; lda probing runs exactly its planned forwards (8 train + 4 eval)
    assert "planned forward passes" in caplog.text
    plan = results["plan"]
    assert plan["planned"]["probing"]["forwards"] == 12 == plan["measured"]["probing"]["forwards"]
    assert plan["measured"]["lens"]["forwards"] == 0  # on the probing pass; no sinks to knock out
    assert "should take" in caplog.text
    lens = results["lens"]
    assert lens["stages"] == ["adapter", "llm.1", "llm.2", "llm.3", "llm.4"]
    assert set(lens["readouts"]) == {
        "logit/all",
        "logit/present",
        "embedding/all",
        "embedding/present",
    }
    for block in lens["readouts"].values():
        assert set(block["minus_probe"]) == {"patch"}  # pixel level off, as the probe's
        for stage in lens["stages"]:
            d = block["minus_probe"]["patch"][stage]
            assert d["low"] <= d["estimate"] <= d["high"]
    assert results["sinks"]["rule"] == "norm"
    assert all(b["count"] == 0 for b in results["sinks"]["stages"].values())  # random model
    assert results["config"]["lens"]["subtokens"] == "first"
    assert results["figures"]["lens"] == "figures/lens.png"
    assert (run / "figures" / "sinks.png").is_file()
    page = (run / "report.html").read_text()
    assert '<section id="lens">' in page and '<section id="sinks">' in page
    assert 'id="fig-lens"' in page
    _check_layerwise_figure(results)
    # its own subcommand: one pass over the evaluation split with the saved probes
    assert main(["lens", "--run", str(run), "--readouts", "logit", "--modes", "all"]) == 0
    assert "wrote the lens and sinks sections" in capsys.readouterr().out
    again = load_results(run / "results.json")["lens"]
    assert list(again["readouts"]) == ["logit/all"]
    assert again["readouts"]["logit/all"]["metrics"] == lens["readouts"]["logit/all"]["metrics"]


def _check_layerwise_figure(results):
    """The layerwise probing figure carries every lens readout (both modes) as its own line, equal
    to the section's values at its stages and absent at the encoder, with its interval band, and
    inside the axis; the caption names each readout's best stage."""
    import numpy as np

    from seglens.analyses.probing.report import layerwise_caption, layerwise_figure
    from seglens.report.figures import stage_series

    fig = layerwise_figure(results)
    ax = fig.axes[0]  # patch level (pixel level is off)
    lines = {line.get_label(): np.asarray(line.get_ydata(), float) for line in ax.get_lines()}
    stages = results["probing"]["causal"]["stages"]
    bands = 0
    for key, block in results["lens"]["readouts"].items():
        y = lines[f"{key} lens"]
        assert np.isnan(y[stages.index("encoder")])
        for stage, miou in block["summary"]["miou"].items():
            assert y[stages.index(stage)] == miou
        low, high = ax.get_ylim()
        assert low <= np.nanmin(y) and np.nanmax(y) <= high
        bands += bool(np.isfinite(stage_series(block, stages, "patch")[:, 1:]).any())
        assert f"{key} best at {block['summary']['best_stage']}" in layerwise_caption(results)
    probe = stage_series(results["probing"]["causal"], stages, "patch")
    assert bands > 0 and len(ax.collections) == bands + bool(np.isfinite(probe[:, 1:]).any())
    assert ax.get_legend() is not None


def test_no_lens_switches_it_off():
    from seglens.cli import build_parser, resolve_config

    config = resolve_config(build_parser().parse_args(["run", "--no-lens"]))
    assert config.lens.enabled is False and not get("lens").is_enabled(config)
