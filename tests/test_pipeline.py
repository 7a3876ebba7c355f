"""`seglens run` end to end on the tiny model: every section in results.json and in the report,
every figure a valid PNG, and the report renders in a real headless browser without errors."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from PIL import Image

from seglens.cli import main
from seglens.rundir import schema
from seglens.rundir.schema import SCHEMA_VERSION

SECTIONS = ("probing", "qualitative", "knockout", "bidirectional", "umap")
CONFIG = {
    "seed": 0,
    "model": {"name": "tiny-clip", "device": "cpu"},
    "data": {"dataset": "synthetic", "limit_train": 24, "limit_eval": 12, "batch_size": 6},
    "probe": {"solver": "lda", "bootstrap": 100, "qualitative": 2},
    "knockout": {"top_k": 2, "min_support": 2, "window_sweep": 2},
    "umap": {"tokens": 300},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "out": str(root / "run")}))

    def no_second_pass(*_args, **_kwargs):
        raise AssertionError("seglens run must take UMAP tokens from the probing pass")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("seglens.analyses.umap.measure.sample_tokens", no_second_pass)
        assert main(["run", "--config", str(config)]) == 0
    return root / "run"


def test_results_hold_every_section(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    for section in (*SECTIONS, "config", "model", "dataset", "versions", "git_hash", "seed"):
        assert section in results, section
    assert results["schema_version"] == SCHEMA_VERSION
    assert set(results["probing"]) == {"causal", "bidirectional_image"}
    stages = results["probing"]["causal"]["stages"]
    assert stages == ["encoder", "adapter", "llm.1", "llm.2", "llm.3", "llm.4"]
    assert set(results["bidirectional"]["miou"]["causal"]) == set(stages)
    assert results["umap"]["scores"].keys() <= set(stages)
    assert results["config"]["probe"]["solver"] == "lda"
    for name, path in results["figures"].items():
        with Image.open(run_dir / path) as image:
            assert image.format == "PNG", name
            assert image.size[0] > 0


def test_results_of_a_real_run_validate_against_the_schema(run_dir):
    """Every typed section of a real tiny run reads back into the schema and writes out equal;
    the summary is the schema's own; a key dropped from a real section is named."""
    raw = json.loads((run_dir / "results.json").read_text())
    assert schema.validate(json.loads((run_dir / "results.json").read_text())) == raw
    for condition, block in raw["probing"].items():
        section = schema.Condition.from_dict(block)
        assert section.to_dict() == block, condition
        level = section.summary.level
        assert section.summary == schema.summary_of(block["metrics"], block["stages"], level)
    typed = [name for name in schema.SECTIONS if name in raw]
    assert typed == ["dataset", "qualitative", "knockout", "bidirectional", "umap", "lens", "sinks"]
    for name in typed:
        assert schema.SECTIONS[name].from_dict(raw[name]).to_dict() == raw[name], name
    assert schema.main_condition(raw) == schema.clean_condition(raw) == "causal"
    del raw["knockout"]["curves"]
    with pytest.raises(ValueError, match=r"results.json: knockout lacks 'curves'"):
        schema.validate(raw)


def test_report_embeds_every_figure_and_section(run_dir):
    html = (run_dir / "report.html").read_text()
    results = json.loads((run_dir / "results.json").read_text())
    for section in SECTIONS:
        assert f'<section id="{section}">' in html, section
    assert "Not run" not in html
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(uris) == len(results["figures"]) >= 9
    for data in uris:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            image.verify()
    assert not re.search(r'src="(?!data:)', html)  # self-contained: nothing fetched
    for stage in results["probing"]["causal"]["stages"]:
        assert f"<td>{stage}</td>" in html


def test_report_redraws(run_dir):
    figure = run_dir / "figures" / "layerwise_miou.png"
    figure.unlink()
    assert main(["report", "--run", str(run_dir)]) == 0
    assert figure.is_file()


CHECK = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter((img) => !(img.complete && img.naturalWidth > 0));
  const out = document.createElement("pre");
  out.id = "seglens-check";
  out.textContent = `images=${images.length} broken=${broken.length}`;
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("SEGLENS_REQUIRE_BROWSER"),
    reason="no chromium here (.ci/run installs it and sets SEGLENS_REQUIRE_BROWSER=1)",
)
def test_report_renders_in_a_real_browser(run_dir, tmp_path):
    browser = chromium()
    assert browser, "SEGLENS_REQUIRE_BROWSER is set but chromium is not installed"
    page = tmp_path / "report.html"
    page.write_text((run_dir / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    profile = tmp_path / "profile"
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r"images=(\d+) broken=(\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    assert int(match.group(1)) >= 9
    assert int(match.group(2)) == 0
    console_errors = [
        line
        for line in result.stderr.splitlines()
        if "CONSOLE" in line and ("ERROR" in line or "Uncaught" in line)
    ]
    assert not console_errors, console_errors


def test_umap_shares_the_probing_pass_and_matches_its_own_pass(run_dir, monkeypatch):
    """`seglens run` samples UMAP tokens from the probing evaluation pass; a standalone
    `seglens umap` makes its own pass and must give exactly the same sample and embedding."""
    from seglens.results import load_arrays

    shared = load_arrays(run_dir / "arrays" / "umap.npz")
    scores = json.loads((run_dir / "results.json").read_text())["umap"]["scores"]
    assert main(["umap", "--run", str(run_dir)]) == 0
    alone = load_arrays(run_dir / "arrays" / "umap.npz")
    assert shared.keys() == alone.keys()
    for key in shared:
        assert (shared[key] == alone[key]).all(), key
    assert json.loads((run_dir / "results.json").read_text())["umap"]["scores"] == scores
