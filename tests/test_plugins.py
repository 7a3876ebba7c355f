"""Analyses as plug-ins: a toy analysis defined here, registered from outside seglens, runs in
`seglens run`, is validated in results.json, drawn in report.html, configured from YAML and has
its own subcommand; and the same analysis arrives through the `seglens.analyses` entry point."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from seglens.analyses import Analysis, Block, Command, Panel, Table, get, ordered, register_analysis
from seglens.analyses import registry as analysis_registry
from seglens.cli import main
from seglens.config import config_help, load_config
from seglens.rundir import RunDir, load_results
from seglens.rundir.schema import Section


# --- the toy analysis: what a researcher writes in their own package -----------------------------
@dataclass(frozen=True)
class ToyConfig:
    enabled: bool = field(default=True, metadata={"help": "run the toy analysis"})
    scale: float = field(default=2.0, metadata={"help": "factor applied to each stage's mIoU"})

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"toy.scale={self.scale} must be > 0")


@dataclass(eq=False)
class ToySection(Section):
    title: ClassVar[str] = "toy"
    scale: float
    scaled: dict[str, float]


def toy_run(run: Any, *, vlm: Any = None, progress: bool = True, **overrides: Any) -> ToySection:
    """Scale the clean condition's patch mIoU of every stage by ``toy.scale``."""
    run = RunDir.of(run, **{f"toy.{k}": v for k, v in overrides.items()})
    probing = run.clean_probing()
    scale = run.config.toy.scale
    scaled = {s: scale * probing.metrics[s]["patch"]["miou"] for s in probing.stages}
    return run.put_section("toy", ToySection(scale=scale, scaled=scaled))


def toy_figure(results: dict, run_dir: Path) -> Any:
    from seglens.report.canvas import new_figure

    section = results.get("toy")
    if not section:
        return None
    fig = new_figure(4.0, 2.5)
    ax = fig.subplots()
    ax.bar(range(len(section["scaled"])), list(section["scaled"].values()))
    return fig


def toy_block(results: dict, page: Any) -> str:
    section = results.get("toy")
    if not section:
        return ""
    best = max(section["scaled"], key=section["scaled"].get)
    return page.figure("toy_bars", f"Scaled mIoU is highest at {best}.")


def toy_findings(results: dict, arrays: Any) -> dict:
    section = results.get("toy")
    if not section:
        return {"toy_positive": {"holds": None, "text": "the toy analysis did not run"}}
    holds = all(v > 0 for v in section["scaled"].values())
    return {"toy_positive": {"holds": holds, "text": f"{len(section['scaled'])} stages scaled"}}


def toy_rows(results: dict, run_dir: Path) -> Any:
    for stage, value in ((results.get("toy") or {}).get("scaled") or {}).items():
        yield {"stage": stage, "scaled_miou": value}


def toy_panel(ax: Any, results: dict, run_dir: Any, label: str) -> str | None:
    section = results.get("toy")
    if not section:
        return "Toy analysis not run."
    ax.plot(list(section["scaled"].values()), "o-")
    ax.set_title(f"{label} scaled mIoU", loc="left")
    return None


def toy_forwards(config: Any, train: int, evaluation: int, layers: int) -> dict:
    return {"forwards": 0, "bound": False, "detail": f"reads probing ({evaluation} eval images)"}


def toy_args(parser: Any) -> None:
    parser.add_argument("--run", required=True)
    parser.add_argument("--scale", type=float)


def toy_main(args: Any) -> int:
    section = toy_run(args.run, scale=args.scale)
    print(f"toy: scale {section.scale}")
    return 0


def make_toy(name: str = "toy", config_key: str = "toy") -> Analysis:
    return Analysis(
        name=name,
        title="scale the probe curve (a worked example)",
        run=toy_run,
        config_key=config_key,
        config=ToyConfig,
        needs=("probing",),
        sections={config_key: ToySection},
        figures={f"{name}_bars": toy_figure},
        report=(Block(name, "Toy analysis", toy_block),),
        findings=toy_findings,
        finding_names={"toy_positive": "(toy) Every scaled mIoU is positive"},
        command=Command(name, "the toy analysis on a probed run", toy_args, toy_main),
        forwards=toy_forwards,
        tables=(Table(f"{name}_scaled", ("stage", "scaled_miou"), toy_rows),),
        overview=Panel("scaled mIoU", toy_panel, "Scaled mIoU of the toy analysis per stage."),
    )


@pytest.fixture
def toy():
    """The toy analysis registered for one test, and removed afterwards."""
    analysis = register_analysis(make_toy())
    try:
        yield analysis
    finally:
        analysis_registry.unregister_analysis("toy")


CONFIG = {
    "seed": 0,
    "model": {"name": "tiny-clip", "device": "cpu"},
    "data": {"dataset": "synthetic", "limit_train": 12, "limit_eval": 6, "batch_size": 6},
    "probe": {"solver": "lda", "bootstrap": 0, "qualitative": 0, "pixel_level": False},
    "knockout": {"enabled": False},
    "bidir": {"enabled": False},
    "umap": {"enabled": False},
    "toy": {"scale": 3.0},
}


def test_toy_analysis_runs_validates_and_is_drawn(toy, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "out": str(tmp_path / "run")}))
    assert main(["run", "--config", str(config)]) == 0
    run = tmp_path / "run"
    results = load_results(run / "results.json")
    # it ran after probing, with its YAML section, and its numbers come from the probing section
    probing = results["probing"]["causal"]
    expected = {s: 3.0 * probing["metrics"][s]["patch"]["miou"] for s in probing["stages"]}
    assert results["toy"] == {"scale": 3.0, "scaled": pytest.approx(expected)}
    assert results["config"]["toy"] == {"enabled": True, "scale": 3.0}
    assert results["findings"]["toy_positive"]["holds"] is True
    assert "knockout" not in results and "umap" not in results
    # drawn in the report, with its heading, caption and finding
    assert results["figures"]["toy_bars"] == "figures/toy_bars.png"
    page = (run / "report.html").read_text()
    assert '<section id="toy">' in page and "<h2>Toy analysis</h2>" in page
    assert 'id="fig-toy_bars"' in page and "Scaled mIoU is highest at" in page
    assert "(toy) Every scaled mIoU is positive: holds." in page
    # its tidy table, its panel of the first figure (lettered after the built-in three), its plan
    with open(run / "tables" / "toy_scaled.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["stage"]: float(r["scaled_miou"]) for r in rows} == pytest.approx(expected)
    assert "(d) Scaled mIoU of the toy analysis per stage." in page
    from seglens.report.overview import overview_figure

    fig = overview_figure(results, run)
    assert [ax.get_title(loc="left") for ax in fig.axes][-1] == "(d) scaled mIoU"
    assert results["plan"]["planned"]["toy"] == toy_forwards(None, 12, 6, 0)
    # its own subcommand, with an override of its config section
    assert main(["toy", "--run", str(run), "--scale", "0.5"]) == 0
    assert "toy: scale 0.5" in capsys.readouterr().out
    assert load_results(run / "results.json")["toy"]["scale"] == 0.5
    # validated: a toy section that lacks a key is refused, naming it
    broken = json.loads((run / "results.json").read_text())
    del broken["toy"]["scaled"]
    (run / "results.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="toy lacks 'scaled'"):
        load_results(run / "results.json")


def test_toy_config_section_is_checked_and_documented(toy, tmp_path):
    assert load_config(**{"toy.scale": 4.0}).toy == ToyConfig(scale=4.0)
    assert ("toy.scale", "factor applied to each stage's mIoU", 2.0) in config_help()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"toy": {"scael": 3.0}}))
    with pytest.raises(ValueError, match=r"key 'toy.scael' \(did you mean 'toy.scale'"):
        load_config(bad)
    with pytest.raises(ValueError, match=r"toy.scale=-1.0 must be > 0"):
        load_config(**{"toy.scale": -1.0})
    # `seglens run --no-toy` switches it off like the built-in analyses
    from seglens.cli import build_parser, resolve_config

    config = resolve_config(build_parser().parse_args(["run", "--no-toy"]))
    assert config.toy.enabled is False and not get("toy").is_enabled(config)
    assert get("umap").is_enabled(config)


def test_run_order_follows_needs_and_refuses_a_switched_off_need(toy, tmp_path):
    names = [a.name for a in ordered()]
    assert names.index("probing") < names.index("knockout") < names.index("attention")
    assert names[-1] == "toy"
    late = register_analysis(
        Analysis(name="early", title="needs the toy", run=toy_run, needs=("toy",))
    )
    try:
        assert [a.name for a in ordered(["early"])] == ["probing", "toy", "early"]  # needs first
    finally:
        analysis_registry.unregister_analysis(late.name)
    from seglens.experiments.pipeline import run

    config = load_config(out=str(tmp_path / "r"), **{"knockout.enabled": False})
    register_analysis(Analysis(name="needs_knockout", title="t", run=toy_run, needs=("knockout",)))
    try:
        with pytest.raises(ValueError, match=r"'needs_knockout' needs \['knockout'\], which this"):
            run(config)
    finally:
        analysis_registry.unregister_analysis("needs_knockout")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_registration_errors_say_what_to_change(toy):
    with pytest.raises(ValueError, match="an analysis named 'toy' is already registered"):
        register_analysis(make_toy())
    with pytest.raises(ValueError, match="config key 'toy' is already used by analysis 'toy'"):
        register_analysis(make_toy(name="toy2"))
    with pytest.raises(ValueError, match=r"needs \['probng'\].*did you mean 'probing'"):
        register_analysis(Analysis(name="x", title="t", run=toy_run, needs=("probng",)))
    with pytest.raises(ValueError, match="config key 'data' is reserved"):
        register_analysis(
            Analysis(name="y", title="t", run=toy_run, config_key="data", config=ToyConfig)
        )
    with pytest.raises(ValueError, match="must start with a letter"):
        Analysis(name="2x", title="t", run=toy_run)
    with pytest.raises(ValueError, match="config must be a frozen dataclass"):
        Analysis(name="z", title="t", run=toy_run, config_key="z", config=ToySection)
    with pytest.raises(ValueError, match=r"no analysis named 'tyo' \(did you mean 'toy'"):
        get("tyo")
    # a table another analysis writes may be joined only with the same columns
    shared = Table("differences", ("estimate",), toy_rows)
    with pytest.raises(ValueError, match="table \\(with other columns\\) 'differences' is already"):
        register_analysis(Analysis(name="w", title="t", run=toy_run, tables=(shared,)))


ENTRY_MODULE = """
from test_plugins import make_toy

ANALYSIS = make_toy(name="toy_ep", config_key="toy_ep")
"""


def test_entry_point_registers_an_installed_analysis(tmp_path, monkeypatch):
    """A package that declares the entry point is found without any call into seglens."""
    (tmp_path / "toy_plugin.py").write_text(ENTRY_MODULE)
    info = tmp_path / "toy_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[seglens.analyses]\ntoy_ep = toy_plugin:ANALYSIS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    analysis_registry.rediscover()
    try:
        assert get("toy_ep").config is ToyConfig
        assert load_config().toy_ep == ToyConfig()
        assert "toy_ep" in [a.name for a in ordered()]
    finally:
        analysis_registry.unregister_analysis("toy_ep")
        sys.modules.pop("toy_plugin", None)
        analysis_registry.rediscover()


def test_a_broken_entry_point_names_itself(tmp_path, monkeypatch):
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[seglens.analyses]\nbroken = no_such_module:X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    analysis_registry.rediscover()
    try:
        with pytest.raises(ValueError, match=r"entry point 'broken' \(no_such_module:X\).*failed"):
            ordered()
    finally:
        monkeypatch.undo()
        analysis_registry.rediscover()
