"""``RUN/report.html``: one self-contained page showing a run's results, figures and provenance.

The page embeds every figure as a ``data:image/png`` URI and carries its own CSS: it makes no
external request and needs no JavaScript. Every piece of text taken from ``results.json`` is
escaped. The page's frame (findings, question, facts, provenance, config, skipped samples) is
here; every analysis contributes its own blocks, figures and captions through the registry
(``seglens.analyses``), in registry order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from seglens.analyses import ordered
from seglens.report.figures import draw_all
from seglens.report.overview import overview_caption
from seglens.report.page import Page as _Page
from seglens.report.page import escape as _e
from seglens.report.page import not_run as _not_run
from seglens.report.page import pairs_table as _pairs_table
from seglens.rundir import CONFIG, RESULTS, load_results
from seglens.rundir.files import atomic_write
from seglens.tables import write_tables

log = logging.getLogger(__name__)

REPORT = "report.html"
MAX_SKIPPED_LISTED = 100

QUESTION = "Where does per-pixel semantic information live inside this multimodal LLM?"

FRAME = {
    "findings": "Findings",
    "question": "Question",
    "facts": "Model and dataset",
    "provenance": "Provenance",
    "config": "Configuration",
}
"""The page's opening sections, id -> heading; the analyses' blocks and "skipped" follow."""


def sections() -> dict[str, str]:
    """Section id -> heading, in page order (every heading appears, with "not run" when empty):
    the frame, each registered analysis's blocks, then the skipped samples."""
    blocks = {b.id: b.title for a in ordered() for b in a.report}
    return FRAME | blocks | {"skipped": "Skipped samples"}


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # import machinery probes (__path__, ...)
        raise AttributeError(name)
    if name == "SECTIONS":  # the registry can grow after import: computed on access
        return sections()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem;
     margin-top: 2.2rem; } h3 { font-size: 1.05rem; margin-top: 1.4rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .88rem; }
th, td { border: 1px solid #ddd; padding: .25rem .55rem; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { font-weight: 600; background: #fff8e1; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .92rem; color: #333; margin-top: .3rem; }
pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .8rem; }
details summary { cursor: pointer; } .muted { color: #777; } code { font-size: .9em; }
table { display: block; max-width: 100%; overflow-x: auto; }
td, th, li, p, code { overflow-wrap: anywhere; }
"""
"""No sideways scroll at 1200 px: long values (paths, hashes) wrap, a wide table scrolls inside
itself, figures shrink to the page (tests/test_first_screen.py)."""


def write_report(run_dir: str | Path, *, redraw: bool = False) -> Path:
    """Write ``RUN/report.html`` from the run's results and figures.

    Args:
        run_dir: a run directory holding ``results.json``.
        redraw: redraw every figure first; otherwise figures are drawn only when
            ``results["figures"]`` is missing or names a file that does not exist.

    Returns:
        The path of the report.
    """
    run_dir = Path(run_dir)
    results = load_results(run_dir / RESULTS)  # refuses an unknown schema version, saying why
    figures = results.get("figures")
    if redraw or not figures or any(not (run_dir / p).is_file() for p in figures.values()):
        draw_all(run_dir)
        results = load_results(run_dir / RESULTS)
    write_tables(run_dir, results)  # RUN/tables/*.csv: every run with a report has its tables
    page = render(results, run_dir)
    path = run_dir / REPORT
    with atomic_write(path, "wb") as handle:
        handle.write(page.encode("utf-8"))
    log.info("wrote %s", path)
    return path


def render(results: dict[str, Any], run_dir: str | Path) -> str:
    """The report page for ``results`` (figures read from ``run_dir``) as an HTML string."""
    run_dir = Path(run_dir)
    page = _Page(results, run_dir)
    model = (results.get("model") or {}).get("name", "model")
    dataset = (results.get("dataset") or {}).get("name", "dataset")
    title = f"seglens report: {model} on {dataset}"
    analyses = ordered()
    question = " ".join([QUESTION, *(a.question for a in analyses if a.question)])
    body = [
        f"<h1>{_e(title)}</h1>",
        page.figure("overview", overview_caption()),  # the first screen: the run at a glance
        _section("findings", _findings(results, analyses)),
        _section("question", f"<p>{_e(question)}</p>"),
        _section("facts", _facts(results)),
        _section("provenance", _provenance(results)),
        _section("config", _config(results, run_dir)),
    ]
    for analysis in analyses:
        for block in analysis.report:
            content = block.render(results, page) or _not_run(block.id)
            body.append(_section(block.id, content, block.title))
    body.append(_section("skipped", _skipped(results)))
    leftover = page.leftover()
    if leftover:
        body.append(f'<section id="other"><h2>Other figures</h2>{leftover}</section>')
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# --- building blocks --------------------------------------------------------------------------
def _section(key: str, content: str, title: str | None = None) -> str:
    title = title or FRAME.get(key) or sections()[key]
    return f'<section id="{_e(key)}">\n<h2>{_e(title)}</h2>\n{content}\n</section>'


# --- sections ---------------------------------------------------------------------------------
def _findings(results: dict[str, Any], analyses: list) -> str:
    findings = results.get("findings")
    if not findings:
        return _not_run("findings")
    names = {key: name for a in analyses for key, name in a.finding_names.items()}
    verdict = {True: "holds", False: "does not hold", None: "not measured"}
    items = "".join(
        f"<li><b>{_e(names[key])}: {verdict[found.get('holds')]}.</b> "
        f"{_e(found.get('text', ''))}</li>"
        for key, found in findings.items()
        if key in names
    )
    return (
        f"<ul>{items}</ul><p class='muted'>Each verdict is a paired 95% bootstrap interval over "
        "evaluation images (both sides of a difference resampled together): a finding holds "
        "when its interval excludes zero in the stated direction.</p>"
    )


def _facts(results: dict[str, Any]) -> str:
    model = results.get("model") or {}
    dataset = results.get("dataset") or {}
    model_rows = [(k, v) for k, v in model.items() if not isinstance(v, dict)]
    skipped = (dataset.get("skipped") or {}).get("count", 0)
    dataset_rows = [
        ("name", dataset.get("name", "n/a")),
        ("classes", dataset.get("num_classes", len(dataset.get("class_names") or []))),
        ("training images", dataset.get("train_images", "n/a")),
        ("evaluation images", dataset.get("eval_images", "n/a")),
        ("skipped samples", skipped),
    ]
    return f"<h3>Model</h3>{_pairs_table(model_rows)}<h3>Dataset</h3>{_pairs_table(dataset_rows)}"


def _provenance(results: dict[str, Any]) -> str:
    rows = [
        ("git hash", results.get("git_hash") or "unknown (not a git checkout)"),
        ("seed", results.get("seed", "n/a")),
        ("created", results.get("created", "n/a")),
        ("schema version", results.get("schema_version", "n/a")),
    ]
    versions = (results.get("versions") or {}).items()
    return f"{_pairs_table(rows)}<h3>Versions</h3>{_pairs_table(versions)}"


def _config(results: dict[str, Any], run_dir: Path) -> str:
    path = run_dir / CONFIG
    if path.is_file():
        text, source = path.read_text(), CONFIG
    else:
        import yaml

        text = yaml.safe_dump(results.get("config") or {}, sort_keys=False)
        source = "results.json"
    return (
        f"<details><summary>Resolved configuration (from {_e(source)})</summary>"
        f"<pre>{_e(text)}</pre></details>"
    )


def _skipped(results: dict[str, Any]) -> str:
    skipped = (results.get("dataset") or {}).get("skipped") or {}
    count = int(skipped.get("count") or 0)
    samples = list(skipped.get("samples") or [])
    if count == 0:
        return "<p>No sample was skipped.</p>"
    text = f"<p>{count} sample{'s' if count != 1 else ''} skipped as unreadable or invalid.</p>"
    if samples:
        listed = "".join(f"<li><code>{_e(s)}</code></li>" for s in samples[:MAX_SKIPPED_LISTED])
        more = len(samples) - MAX_SKIPPED_LISTED
        extra = f"<li>... and {more} more</li>" if more > 0 else ""
        text += f"<ul>{listed}{extra}</ul>"
    return text
