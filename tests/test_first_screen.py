"""The report's first screen in a real browser (headless Chromium at 1200 x 900): the page opens
with the overview figure, before the findings, and never scrolls sideways, even with long
unbreakable values (paths, hashes, class names) and many stages."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from fixtures_results import make_run
from seglens.report import write_report
from seglens.report.canvas import save_figure
from seglens.report.figures import FIGURES
from seglens.results import read_json, write_json

WIDTH, HEIGHT = 1200, 900

MEASURE = """
<script>
window.addEventListener("load", () => {
  const first = document.querySelector("figure");
  const img = first ? first.querySelector("img") : null;
  const findings = document.getElementById("findings");
  const values = [
    "scroll=" + document.documentElement.scrollWidth,
    "client=" + document.documentElement.clientWidth,
    "inner=" + window.innerWidth,
    "first=" + (first ? first.id : "none"),
    "top=" + (first ? Math.round(first.getBoundingClientRect().top) : -1),
    "imgwidth=" + (img && img.complete ? Math.round(img.getBoundingClientRect().width) : -1),
    "findings=" + (findings ? Math.round(findings.getBoundingClientRect().top) : -1),
  ];
  const out = document.createElement("pre");
  out.textContent = "MEASURED " + values.join(" ") + " END";
  document.body.appendChild(out);
});
</script>
"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def browse(browser: str, page, profile, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium at WIDTH x HEIGHT on ``page`` (a local file), no network."""
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--virtual-time-budget=5000",
            *extra,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # a real browser: ~15 s on 2 shared cores
@pytest.mark.skipif(
    chromium() is None and not os.environ.get("SEGLENS_REQUIRE_BROWSER"),
    reason="no chromium here (.ci/run installs it and sets SEGLENS_REQUIRE_BROWSER=1)",
)
def test_first_screen_is_the_overview_and_nothing_scrolls_sideways(tmp_path):
    browser = chromium()
    assert browser, "SEGLENS_REQUIRE_BROWSER is set but chromium is not installed"
    run = make_run(tmp_path, conditions=("causal", "bidirectional_image"), layers=24, umap=False)
    results = read_json(run / "results.json")
    # Values a real run holds that do not break: a deep path, a fingerprint, long class names.
    results["model"]["weights"] = "/scratch/" + "checkpoints_" * 30 + "llava-1.5-7b-hf"
    results["model"]["fingerprint"] = "f" * 200
    results["git_hash"] = "0123456789abcdef" * 10
    results["dataset"]["class_names"] = [f"{'very_long_class_name_' * 6}{i}" for i in range(5)]
    # Two figures suffice for the layout (every figure is an image scaled to the page): the
    # overview and the widest, the layerwise curve of 26 stages.
    results["figures"] = {}
    for name in ("overview", "layerwise_miou"):
        results["figures"][name] = f"figures/{name}.png"
        save_figure(FIGURES[name](results, run), run / results["figures"][name])
    write_json(run / "results.json", results)
    page = write_report(run)
    probe = tmp_path / "measure.html"
    probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    result = browse(browser, probe, tmp_path / "profile", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"MEASURED (scroll=.*?) END", result.stdout)
    assert found, result.stdout[-2000:]
    measured = dict(item.split("=", 1) for item in found.group(1).split())
    assert int(measured["inner"]) == WIDTH
    assert int(measured["scroll"]) <= int(measured["client"]), measured  # no sideways scroll
    assert measured["first"] == "fig-overview", measured
    assert 0 <= int(measured["top"]) < HEIGHT // 3, measured  # at the top of the first screen
    assert 0 < int(measured["imgwidth"]) <= int(measured["client"]), measured
    assert int(measured["findings"]) > int(measured["top"]), measured  # then the findings
