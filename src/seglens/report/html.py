"""``RUN/report.html``: one self-contained page showing a run's results, figures and provenance.

The page embeds every figure as a ``data:image/png`` URI and carries its own CSS: it makes no
external request and needs no JavaScript. Every piece of text taken from ``results.json`` is
escaped; each figure gets a plain-language reading built from the numbers
(``seglens.report.readings``).
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seglens.report import evidence, readings
from seglens.report.canvas import order_stages
from seglens.report.figures import draw_all, level_values, probing_summary
from seglens.report.mechanisms import knockout_conditions
from seglens.rundir import CONFIG, RESULTS, load_results
from seglens.rundir.files import atomic_write
from seglens.tables import write_tables

log = logging.getLogger(__name__)

REPORT = "report.html"
MAX_SKIPPED_LISTED = 100

QUESTION = (
    "Where does per-pixel semantic information live inside this multimodal LLM? A linear probe "
    "at every stage (the vision encoder, the adapter that maps image features into the language "
    "model, and every LLM layer) predicts the semantic class of each image token; its "
    "segmentation quality (mIoU) traces how much of that information each stage carries. "
    "Attention knockout asks which image tokens the LLM relies on to refine it, and "
    "bidirectional image attention asks whether the causal mask starves early image tokens."
)

SECTIONS = {
    "findings": "Findings",
    "question": "Question",
    "facts": "Model and dataset",
    "provenance": "Provenance",
    "config": "Configuration",
    "probing": "Layerwise probing",
    "qualitative": "Qualitative maps",
    "knockout": "Attention knockout",
    "bidirectional": "Bidirectional image attention",
    "umap": "UMAP of image tokens",
    "skipped": "Skipped samples",
}
"""Section id -> heading, in page order (every heading appears, with "not run" when empty)."""

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

OVERVIEW_CAPTION = (
    "The run at a glance. (a) Probe mIoU per stage with its 95% interval: the change at the "
    "adapter (red) and the gain across the LLM to its best layer (green); the star marks the "
    "best stage. (b) Pair-token accuracy when the tokens the reference probe classifies "
    "correctly (or incorrectly) are blocked, minus a size-matched random control, per LLM "
    "layer, with 95% paired intervals. (c) Per-position pixel accuracy under causal and "
    "bidirectional image attention. The findings below test each of these."
)


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
    body = [
        f"<h1>{_e(title)}</h1>",
        page.figure("overview", OVERVIEW_CAPTION),  # the first screen: the run at a glance
        _section("findings", _findings(results)),
        _section("question", f"<p>{_e(QUESTION)}</p>"),
        _section("facts", _facts(results)),
        _section("provenance", _provenance(results)),
        _section("config", _config(results, run_dir)),
        _section("probing", _probing(results, page)),
        _section("qualitative", _qualitative(results, page)),
        _section("knockout", _knockout(results, page)),
        _section("bidirectional", _bidirectional(results, page)),
        _section("umap", _umap(results, page)),
        _section("skipped", _skipped(results)),
    ]
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
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(value: float | None, ci: Sequence[float | None] | None) -> str:
    if value is None:
        return "n/a"
    if not ci or ci[0] is None or ci[1] is None:
        return _num(value)
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _section(key: str, content: str) -> str:
    return f'<section id="{key}">\n<h2>{_e(SECTIONS[key])}</h2>\n{content}\n</section>'


def _not_run(key: str) -> str:
    return f'<p class="muted">Not run: results.json has no <code>{_e(key)}</code> section.</p>'


def _table(
    header: Iterable[str], rows: Iterable[Sequence[str]], classes: Sequence[str] = ()
) -> str:
    """An HTML table; cells are already escaped. ``classes`` gives a CSS class per row."""
    head = "".join(f"<th>{h}</th>" for h in header)
    lines = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if i < len(classes) and classes[i] else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if j else f"<td>{c}</td>" for j, c in enumerate(row)
        )
        lines.append(f"<tr{cls}>{cells}</tr>")
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(lines) + "\n</table>"


def _pairs_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


class _Page:
    """Embeds the run's figures, remembering which ones a section has shown."""

    def __init__(self, results: dict[str, Any], run_dir: Path) -> None:
        self.figures = dict(results.get("figures") or {})
        self.run_dir = run_dir
        self.shown: set[str] = set()

    def figure(self, name: str, reading: str | None = None) -> str:
        """``<figure>`` with the PNG as a data URI and the reading as caption ('' if absent)."""
        relative = self.figures.get(name)
        path = self.run_dir / relative if relative else None
        if path is None or not path.is_file():
            return ""
        self.shown.add(name)
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = f"<figcaption>{_e(reading)}</figcaption>" if reading else ""
        return (
            f'<figure id="fig-{_e(name)}"><img alt="{_e(name)}" '
            f'src="data:image/png;base64,{data}">{caption}</figure>'
        )

    def leftover(self) -> str:
        names = [n for n in self.figures if n not in self.shown]
        return "\n".join(self.figure(n) for n in names)


# --- sections ---------------------------------------------------------------------------------
FINDING_NAMES = {
    "drop": "(a) Drop at the adapter",
    "recovery": "(b) Recovery in the LLM",
    "anchors": "(c) Semantic anchors",
    "early_positions": "(d) Causal attention starves early image tokens",
}


def _findings(results: dict[str, Any]) -> str:
    findings = results.get("findings")
    if not findings:
        return _not_run("findings")
    verdict = {True: "holds", False: "does not hold", None: "not measured"}
    items = "".join(
        f"<li><b>{_e(FINDING_NAMES[key])}: {verdict[found.get('holds')]}.</b> "
        f"{_e(found.get('text', ''))}</li>"
        for key, found in findings.items()
        if key in FINDING_NAMES
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


def _stage_table(block: dict[str, Any]) -> str:
    patch = level_values(block, "patch")
    pixel = level_values(block, "pixel")
    stages = order_stages(block.get("stages") or list(block.get("metrics") or {}))
    summary = probing_summary(block, "patch") or probing_summary(block, "pixel")
    best = summary["best_stage"] if summary else None
    rows, classes = [], []
    for stage in stages:
        p, q = patch.get(stage) or {}, pixel.get(stage) or {}
        acc = q or p  # accuracies at pixel level when it was scored
        rows.append(
            [
                _e(stage),
                _interval(p.get("miou"), (p.get("ci") or {}).get("miou")),
                _interval(q.get("miou"), (q.get("ci") or {}).get("miou")),
                _interval(acc.get("pixel_accuracy"), (acc.get("ci") or {}).get("pixel_accuracy")),
                _num(acc.get("mean_class_accuracy")),
            ]
        )
        classes.append("best" if stage == best else "")
    header = [
        "Stage",
        "Patch mIoU [95% CI]",
        "Pixel mIoU [95% CI]",
        "Pixel acc [95% CI]",
        "Mean class acc",
    ]
    return _table(header, rows, classes)


def _probing(results: dict[str, Any], page: _Page) -> str:
    probing = results.get("probing")
    if not probing:
        return _not_run("probing")
    parts = [page.figure("layerwise_miou", readings.layerwise(results))]
    parts.append(page.figure("per_class_iou", readings.per_class(probing, results)))
    for condition, block in probing.items():
        solver = block.get("solver")
        note = f" (solver: {solver})" if solver else ""
        parts.append(f"<h3>Per-stage scores: {_e(condition)}{_e(note)}</h3>")
        parts.append(_stage_table(block))
        for text in (evidence.convergence_text(block), evidence.probing_text(block)):
            parts.append(f"<p>{_e(text)}</p>" if text else "")
    parts.append(page.figure("differences"))
    parts.append(
        '<p class="muted">Intervals are 95% bootstrap intervals over images; the best stage is '
        "highlighted. Accuracies are at pixel level when it was scored, else at patch level.</p>"
    )
    return "\n".join(parts)


def _qualitative(results: dict[str, Any], page: _Page) -> str:
    if not results.get("qualitative"):
        return _not_run("qualitative")
    return page.figure("qualitative", readings.qualitative(results["qualitative"]))


def _knockout(results: dict[str, Any], page: _Page) -> str:
    knockout = results.get("knockout")
    if not knockout:
        return _not_run("knockout")
    parts = [
        page.figure("knockout_curves", readings.knockout_curves(knockout)),
        page.figure("knockout_summary", readings.knockout(knockout)),
        page.figure("knockout_window_sweep", readings.window_sweep(knockout)),
        page.figure("knockout_gaps", evidence.knockout_text(knockout)),
        f"<p>{_e(evidence.knockout_text(knockout))}</p>"
        if "knockout_gaps" not in page.figures
        else "",
        page.figure("attention_anchors", evidence.attention_text(results.get("attention") or {})),
        _pair_table(knockout),
    ]
    return "\n".join(p for p in parts if p)


def _pair_table(knockout: dict[str, Any]) -> str:
    layer = knockout.get("summary_layer")
    conditions = knockout_conditions(knockout)
    per_pair = {tuple(p.get("classes") or ()): p for p in knockout.get("per_pair") or []}
    rows = []
    for pair in knockout.get("pairs") or []:
        classes = tuple(pair.get("classes") or ())
        names = pair.get("names") or [str(c) for c in classes]
        scores = per_pair.get(classes) or {}
        row = [
            _e(" / ".join(str(n) for n in names)),
            _e(pair.get("images", "n/a")),
            _e(pair.get("support", "n/a")),
        ]
        for cond in conditions:
            cell = (scores.get(cond) or {}).get(layer) or {}
            row.append(f"{_num(cell.get('accuracy'))} / {_num(cell.get('iou'))}")
        rows.append(row)
    header = ["Pair", "Images", "Support", *(_e(c) for c in conditions)]
    return f"<h3>Per-pair results at {_e(layer)} (accuracy / 2-class IoU)</h3>" + _table(
        header, rows
    )


def _bidirectional(results: dict[str, Any], page: _Page) -> str:
    section = results.get("bidirectional")
    if not section:
        return _not_run("bidirectional")
    parts = [
        page.figure("bidirectional_miou", readings.bidirectional_miou(section)),
        page.figure(
            "bidirectional_positions", readings.bidirectional_positions(results, page.run_dir)
        ),
        page.figure("bidirectional_heatmaps", readings.heatmaps(results)),
        f"<p>{_e(evidence.bidirectional_text(section))}</p>",
    ]
    return "\n".join(p for p in parts if p)


def _umap(results: dict[str, Any], page: _Page) -> str:
    if not results.get("umap"):
        return _not_run("umap")
    return page.figure("umap", readings.umap(results["umap"]))


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
