"""The lens analysis as a plug-in: config section ``lens``, ``seglens lens``, the ``lens`` and
``sinks`` results sections, their figures and report blocks.

The measurement lives in ``seglens.readouts`` (``run.run_lens``); under ``seglens run`` the lens
rides on the probing evaluation pass (a ``Feed``: no extra forward) and the probe of the same
images gives the paired intervals of lens minus probe per stage.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from seglens.analyses.registry import Analysis, Block, Command, Feed
from seglens.readouts.options import LensConfig
from seglens.report.canvas import label_stage_axis, new_figure, order_stages, series_colour
from seglens.report.evidence import bars, significance
from seglens.report.figures import plot_series, stage_series
from seglens.report.page import Page, escape, not_run, num, paragraph, table
from seglens.rundir.schema import Section, main_condition

__all__ = ["ANALYSIS", "LensResults", "SinkResults", "lens_figure", "run", "sinks_figure"]

PROBE_COLOUR = (0.15, 0.15, 0.15)


# --- results sections -------------------------------------------------------------------------
@dataclass(eq=False)
class LensResults(Section):
    title: ClassVar[str] = "lens"
    stages: list[str]
    images: int
    options: dict[str, Any]
    class_tokens: dict[str, Any]
    readouts: dict[str, Any]


@dataclass(eq=False)
class SinkResults(Section):
    title: ClassVar[str] = "sinks"
    rule: str
    norm_factor: float
    massive_factor: float
    images: int
    stages: dict[str, Any]
    keys: dict[str, Any] | None = None


# --- run --------------------------------------------------------------------------------------
def run(
    run: Any, *, vlm: Any = None, progress: bool = True, feed: Feed | None = None, **overrides: Any
) -> dict[str, Any]:
    """``run_lens``: with ``feed``, the scorers the probing evaluation pass fed; otherwise a pass
    of its own over the evaluation split (the run's probes must exist)."""
    from seglens.readouts.run import run_lens
    from seglens.rundir import RunDir

    run = RunDir.of(run, **{f"lens.{k}": v for k, v in overrides.items() if v is not None})
    state = feed.state if feed is not None else None
    return run_lens(run, vlm=vlm, progress=progress, feed=state, config=run.config.lens)


def feed(config: Any, vlm: Any) -> Feed | None:
    """Ride on the probing evaluation pass (one process, not resumed: a resumed pass does not
    see every image); None: ``run`` makes a pass of its own."""
    from seglens.distributed import world
    from seglens.experiments.common import build_dataset
    from seglens.experiments.streaming import resolve_stages
    from seglens.readouts.run import lens_feed

    if world() != 1 or config.resume:
        return None
    data = config.data
    names = build_dataset(data, data.eval_split, data.limit_eval, config.seed).class_names
    state = lens_feed(
        vlm,
        names,
        resolve_stages(vlm, config.probe),
        config.lens,
        dataset=data.dataset,
        bootstrap=config.probe.bootstrap,
        seed=config.seed,
        position_band=config.probe.position_band,
        pixel_level=config.probe.pixel_level,
    )
    return Feed("probing", state.offer, state)


# --- CLI --------------------------------------------------------------------------------------
def _lens_args(p: argparse.ArgumentParser) -> None:
    from seglens.cli import FLAG

    p.add_argument("--run", required=True, help="a probing run directory (seglens probe/run)")
    p.add_argument("--readouts", nargs="+", choices=["logit", "embedding"])
    p.add_argument("--modes", nargs="+", choices=["all", "present"])
    p.add_argument("--subtokens", choices=["first", "max", "mean"])
    p.add_argument("--pixel-level", dest="pixel_level", **FLAG)
    p.add_argument("--sink-rule", dest="sink_rule", choices=["norm", "massive", "either"])
    p.add_argument("--sink-norm-factor", dest="sink_norm_factor", type=float)
    p.add_argument("--sink-massive-factor", dest="sink_massive_factor", type=float)


def _lens(args: argparse.Namespace) -> int:
    from seglens.commands import draw

    keys = ("readouts", "modes", "subtokens", "pixel_level", "sink_rule")
    keys += ("sink_norm_factor", "sink_massive_factor")
    overrides = {k: getattr(args, k) for k in keys}
    for k in ("readouts", "modes"):
        if overrides[k] is not None:
            overrides[k] = tuple(overrides[k])
    section = run(args.run, progress=True, **overrides)
    draw(args.run)
    best = {k: v["summary"]["best_stage"] for k, v in section["readouts"].items()}
    print(f"wrote the lens and sinks sections of {Path(args.run) / 'results.json'}; best: {best}")
    return 0


# --- figures ----------------------------------------------------------------------------------
def _level(section: Mapping[str, Any]) -> str:
    first = next(iter(section["readouts"].values()), {})
    return (first.get("summary") or {}).get("level", "patch")


def lens_figure(results: dict[str, Any], run_dir: Any = None) -> Any:
    """The layerwise curve with the lens: probe mIoU per stage and each lens readout and mode
    (95% CI bands) on one axis, and lens minus probe (paired 95% intervals) below."""
    section = results.get("lens")
    if not section or not section.get("readouts"):
        return None
    level = _level(section)
    probing = results.get("probing") or {}
    probe = probing.get(main_condition(results)) if probing else None
    stages = order_stages(list((probe or {}).get("stages") or []) + list(section["stages"]))
    x = np.arange(len(stages), dtype=np.float64)
    fig = new_figure(max(7.0, 0.26 * len(stages) + 2.0), 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True)
    if probe:
        plot_series(top, x, stage_series(probe, stages, level), PROBE_COLOUR, "linear probe")
    for i, (key, block) in enumerate(section["readouts"].items()):
        colour = series_colour(i + 1)
        plot_series(top, x, stage_series(block, stages, level), colour, f"{key} lens")
        diffs = (block.get("minus_probe") or {}).get(level) or {}
        cells = [diffs.get(s) for s in stages]
        shown = [j for j, c in enumerate(cells) if c and c.get("estimate") is not None]
        if shown:
            offset = 0.08 * (i - (len(section["readouts"]) - 1) / 2)
            bars(bottom, x[shown] + offset, [cells[j] for j in shown], colour, key)
    top.set_ylabel(f"{level} mIoU")
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="best")
    bottom.axhline(0.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("lens - probe mIoU")
    bottom.grid(alpha=0.3)
    label_stage_axis(bottom, stages)
    model = (results.get("model") or {}).get("name", "model")
    fig.suptitle(f"Logit / embedding lens beside the probe: {model}", fontsize=10)
    return fig


def sinks_figure(results: dict[str, Any], run_dir: Any = None) -> Any:
    """Share of sink tokens per stage, and the (g, g) map of where they sit at the stage with
    the most."""
    section = results.get("sinks")
    if not section or not section.get("stages"):
        return None
    stages = order_stages(section["stages"])
    shares = [section["stages"][s]["share"] or 0.0 for s in stages]
    fig = new_figure(max(7.0, 0.26 * len(stages) + 4.0), 3.2)
    left, right = fig.subplots(1, 2, width_ratios=[3, 1])
    left.bar(np.arange(len(stages)), shares, color=series_colour(0))
    left.set_ylabel("share of image tokens flagged")
    label_stage_axis(left, stages)
    top = max(stages, key=lambda s: section["stages"][s]["count"])
    grid = (results.get("model") or {}).get("grid") or [0, 0]
    positions = np.asarray(section["stages"][top]["positions"], dtype=np.float64)
    if grid[0] * grid[1] == positions.size:
        image = right.imshow(positions.reshape(grid), cmap="magma")
        fig.colorbar(image, ax=right, shrink=0.8)
    right.set_title(f"sinks per position, {top}", fontsize=8)
    right.set_xticks([])
    right.set_yticks([])
    rule = section["rule"]
    factor = section["norm_factor"] if rule == "norm" else section["massive_factor"]
    fig.suptitle(f"Sink tokens (rule {rule}, factor {factor:g} x the image's median)", fontsize=10)
    return fig


# --- report -----------------------------------------------------------------------------------
def lens_caption(section: Mapping[str, Any]) -> str:
    parts = []
    for key, block in section["readouts"].items():
        summary = block["summary"]
        best = summary.get("best_stage")
        if best is not None:
            parts.append(f"{key}: best at {best} ({summary['miou'][best]:.3f} {summary['level']})")
    collisions = section["class_tokens"]["collisions"]
    text = "; ".join(parts) + ". " if parts else ""
    if collisions:
        pairs = ", ".join("/".join(c["classes"]) for c in collisions[:6])
        text += (
            f"{len(collisions)} class pairs share a token ({pairs}): the lens cannot tell them "
            "apart."
        )
    return text


def _difference(diff: Mapping[str, Any] | None) -> str:
    """' (+0.012 [-0.003, +0.027])', a star when the interval excludes 0; '' without one."""
    if not diff or diff.get("estimate") is None:
        return ""
    low, high = diff.get("low"), diff.get("high")
    band = f" [{low:+.3f}, {high:+.3f}]" if low is not None and high is not None else ""
    star = "*" if significance(diff) == "significant at 95%" else ""
    return f" ({diff['estimate']:+.3f}{band}{star})"


def _all_without(scores: Mapping[str, Any]) -> str:
    if not scores:
        return "-"
    miou = {k: (scores.get(k) or {}).get("miou") for k in ("all", "without")}
    return f"{num(miou['all'])} / {num(miou['without'])}"


def lens_block(results: Mapping[str, Any], page: Page) -> str:
    section = results.get("lens")
    if not section:
        return not_run("lens")
    level = _level(section)
    rows = []
    for stage in section["stages"]:
        row = [escape(stage)]
        for block in section["readouts"].values():
            miou = block["summary"]["miou"].get(stage)
            diff = ((block.get("minus_probe") or {}).get(level) or {}).get(stage)
            row.append(escape(num(miou) + _difference(diff)))
        rows.append(row)
    header = ["stage"] + [escape(f"{k} lens (minus probe)") for k in section["readouts"]]
    opts = section["options"]
    intro = (
        f"What the language model itself reads in each image token, with no training: the final "
        f"norm, then the {len(section['class_tokens']['classes'])} classes' unembedding rows "
        f"(logit lens; '{opts['subtokens']}' sub-token) or the cosine to their input embeddings "
        f"(embedding lens); 'all' scores every class, 'present' only the image's (an oracle). "
        f"{level} mIoU; in brackets lens minus probe with its paired 95% interval (* excludes 0)."
    )
    return "\n".join(
        [
            paragraph(intro),
            page.figure("lens", lens_caption(section)),
            table(header, rows),
        ]
    )


def sinks_block(results: Mapping[str, Any], page: Page) -> str:
    section = results.get("sinks")
    if not section:
        return not_run("sinks")
    rows = []
    for stage in order_stages(section["stages"]):
        block = section["stages"][stage]
        most = sorted(block["classes"].items(), key=lambda kv: -kv[1])[:4]
        on = ", ".join(f"{k} {v}" for k, v in most)
        cells = [escape(stage), str(block["count"]), num(block["share"]), escape(on or "-")]
        cells += [escape(_all_without(block["scores"].get(r) or {})) for r in ("probe", "lens")]
        rows.append(cells)
    header = ["stage", "sinks", "share", "on classes", "probe mIoU all / without"]
    header.append("lens mIoU all / without")
    rule = section["rule"]
    massive = f", or a value above {section['massive_factor']:g} x its median |value|"
    intro = (
        f"Image tokens whose state stands out (rule '{rule}': norm above "
        f"{section['norm_factor']:g} x the image's median token norm"
        + (massive if rule != "norm" else "")
        + "), per stage, and the patch scores with and without them."
    )
    parts = [paragraph(intro), page.figure("sinks"), table(header, rows)]
    return "\n".join(parts + sink_keys_html(section.get("keys")))


def sink_keys_html(keys: Mapping[str, Any] | None) -> list[str]:
    """The sink-keys knockout: the clean probes' mIoU per LLM stage with no knockout, the sink
    keys blocked and their size-matched random control blocked, and block minus control (paired
    95% interval); a sentence when nothing was knocked out."""
    if not keys:
        return []
    if keys.get("status") != "tested":
        why = keys.get("reason") or "no evaluation image has a sink token"
        return [paragraph(f"Sink keys: not knocked out ({why}).")]
    diffs = keys["differences"]
    rows = []
    for stage in keys["stages"]:
        cells = [escape(stage)]
        cells += [num(keys["curves"][c][stage]["miou"]) for c in keys["conditions"]]
        for name in ("block_sinks_minus_random_sinks", "block_sinks_minus_none"):
            cells.append(escape(_difference(diffs.get(name, {}).get(stage)).strip() or "-"))
        rows.append(cells)
    header = ["stage", "no knockout", "sinks blocked", "random blocked"]
    header += ["sinks - random", "sinks - none"]
    intro = (
        f"Sink keys knocked out: on {keys['images']} of the {keys['images_with_sinks']} "
        f"evaluation images with a sink, the tokens flagged at any stage "
        f"({keys['keys_per_image']:.1f} per image) are made unreadable to every query at every "
        "LLM layer, against as many random other tokens of the same image; the clean probes' "
        f"patch mIoU on the tokens in neither set, with paired 95% intervals (* excludes 0)."
    )
    return [paragraph(intro), table(header, rows)]


def _forwards(config: Any, train: int, evaluation: int, layers: int) -> dict[str, Any]:
    """No forward of its own (it reads the probing evaluation pass); with sinks, one pass for the
    probe on and off them and 3 forwards per knocked-out image with sinks."""
    lens = config.lens
    keys = 0
    if lens.sink_keys:
        cap = evaluation if lens.sink_keys_images is None else lens.sink_keys_images
        keys = 3 * min(cap, evaluation)
    return {
        "forwards": evaluation + keys,
        "bound": True,
        "detail": f"0 without sinks; with sinks <= {evaluation} + sink keys <= {keys}",
    }


ANALYSIS = Analysis(
    name="lens",
    title="read each stage with the logit and embedding lens beside the probe; flag sink tokens",
    run=run,
    config_key="lens",
    config=LensConfig,
    needs=("probing",),
    sections={"lens": LensResults, "sinks": SinkResults},
    figures={"lens": lens_figure, "sinks": sinks_figure},
    report=(
        Block("lens", "What the vocabulary reads: logit and embedding lens", lens_block),
        Block("sinks", "Sink tokens", sinks_block),
    ),
    question="What does the language model itself read in the image tokens, with no training?",
    command=Command(
        "lens",
        "read each stage with the logit and embedding lens beside a run's probe; flag sinks",
        _lens_args,
        _lens,
    ),
    feed=feed,
    forwards=_forwards,
)
