"""The random twin: the same architecture and config, re-initialised, run through the same
analyses on the same images, so that every finding gets a "what the architecture alone does"
baseline.

``seglens run --twin`` runs the chosen analyses (``twin.analyses``) a second time on a copy of the
model whose weights are redrawn with HF's own ``_init_weights`` from ``twin.seed``, into
``RUN/twin`` (its own probes, results and findings). Every registered analysis that gives its
findings' statistics on given image resamples (``Analysis.paired``) is then compared: model, twin
and model minus twin, each with a paired interval over the evaluation images (the same resample
for both runs). A finding holds *beyond the architecture* when model minus twin excludes zero in
the finding's stated direction.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from seglens.analyses.registry import Analysis, Block
from seglens.experiments.findings import above, all_of, below, fmt_interval
from seglens.rundir.schema import Section

__all__ = ["ANALYSIS", "TWIN_DIR", "TwinConfig", "TwinSection", "build_twin", "compare"]
__all__ += ["covered_analyses", "reinitialise", "run"]

log = logging.getLogger(__name__)

#: The twin's run directory, inside the model's.
TWIN_DIR = "twin"
#: Bootstrap resamples of the model-minus-twin intervals (as the findings' own).
N_RESAMPLES = 1000


# --- config -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TwinConfig:
    """The ``twin`` section: a random-weight copy of the model as every finding's baseline."""

    enabled: bool = field(
        default=False,
        metadata={
            "help": "also run a random-weight twin (same architecture, re-initialised) through "
            "the analyses and compare every finding with it (doubles their passes)"
        },
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the twin's weights (HF _init_weights), recorded"}
    )
    analyses: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "analyses the twin reruns (plus what they need); empty: every enabled "
            "analysis whose findings can be compared"
        },
    )

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"twin.seed={self.seed!r} must be an integer >= 0")
        if isinstance(self.analyses, str):
            raise ValueError(
                f"twin.analyses={self.analyses!r} must be a list of analysis names, "
                f"e.g. [{self.analyses!r}]"
            )
        if any(name == "twin" for name in self.analyses):
            raise ValueError("twin.analyses cannot name the twin itself; name the analyses only")


# --- results section --------------------------------------------------------------------------
@dataclass(eq=False)
class TwinSection(Section):
    """``twin``: how the twin was made and, per finding, model / twin / model minus twin."""

    title: ClassVar[str] = "twin"
    seed: int
    analyses: list[str]
    run: str
    init: str
    findings: dict[str, Any]


# --- the twin's weights -----------------------------------------------------------------------
INIT = (
    "HF _init_weights of each (sub)model, weights drawn from twin.seed: Linear / Conv / Embedding "
    "~ N(0, initializer_range) (CLIP: its own per-module scales; class and position embeddings "
    "included), biases 0, LayerNorm / RMSNorm weight 1 and bias 0, rotary frequencies recomputed, "
    "tied weights tied again"
)


def reinitialise(model: Any, seed: int) -> Any:
    """Redraw every weight of an HF model in place with its own ``_init_weights``, from ``seed``.

    Embeddings and linear layers are drawn from N(0, ``initializer_range``) (the vision tower's
    own scheme where it has one, e.g. CLIP's per-module scales), biases are zero, norms get
    weight 1 and bias 0, rotary frequencies are recomputed, tied weights are tied again. The
    draws use a private RNG (the global one is left untouched), so the same seed gives the same
    twin.

    Args:
        model: a ``transformers.PreTrainedModel`` (e.g. ``LlavaForConditionalGeneration``).
        seed: the weight seed.

    Returns:
        ``model``, re-initialised.
    """
    import torch

    if not hasattr(model, "initialize_weights"):
        raise ValueError(
            f"cannot re-initialise a {type(model).__name__}: the twin needs a transformers "
            "PreTrainedModel (initialize_weights / _init_weights)"
        )
    # Loading marks every loaded tensor initialised, and HF's init functions skip those.
    for module in model.modules():
        if getattr(module, "_is_hf_initialized", False):
            module._is_hf_initialized = False
        tensors = chain(module.parameters(recurse=False), module.buffers(recurse=False))
        for tensor in tensors:
            if getattr(tensor, "_is_hf_initialized", False):
                tensor._is_hf_initialized = False
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model.initialize_weights()
        model.tie_weights()
    return model.eval()


def build_twin(model_config: Any, seed: int) -> Any:
    """The model ``model_config`` names, loaded as usual (same family adapter, processor,
    dtype and placement), then re-initialised (``reinitialise``)."""
    from seglens.experiments.common import build_model

    vlm = build_model(model_config)
    reinitialise(vlm.model, seed)
    return vlm


# --- which analyses ---------------------------------------------------------------------------
def covered_analyses(config: Any) -> list[str]:
    """The analyses the twin reruns: ``twin.analyses`` (and what they need), or every enabled
    analysis that gives comparable statistics (and what it needs); the twin never reruns itself
    nor another ``last`` analysis."""
    from seglens.analyses.registry import get, ordered

    chosen = list(config.twin.analyses)
    for name in chosen:
        get(name)  # an unknown name is refused with a suggestion
    if not chosen:
        chosen = [
            a.name
            for a in ordered()
            if not a.last and a.paired is not None and a.is_enabled(config)
        ]
    covered = [a for a in ordered(chosen) if not a.last]
    return [a.name for a in covered]


def twin_config(config: Any, run_path: Path, covered: list[str]) -> Any:
    """The twin's run config: the same data, seed and settings into ``RUN/twin``, the analyses
    it does not cover switched off, and a feature cache apart from the model's."""
    from dataclasses import fields

    from seglens.analyses.registry import by_config_key

    changes: dict[str, Any] = {
        "out": str(run_path / TWIN_DIR),
        "overwrite": True,
        "resume": False,
        "twin.enabled": False,
    }
    for key, analysis in by_config_key().items():
        if key == "twin" or "enabled" not in {f.name for f in fields(analysis.config)}:
            continue
        if analysis.name not in covered:
            changes[f"{key}.enabled"] = False
    cache = config.probe.cache_dir
    if cache is not None:  # a cache is keyed by the model's identity, which the twin shares
        changes["probe.cache_dir"] = str(Path(cache) / f"twin-seed{config.twin.seed}")
    return config.replace(**changes)


def plan(config: Any) -> str:
    """The twin's line of the run plan."""
    covered = covered_analyses(config)
    return (
        f"twin: a random-weight twin (seed {config.twin.seed}) reruns {', '.join(covered)} on "
        "the same images with its own probes: this doubles the forward passes and probe "
        "training of those analyses (load, run, free: the model is freed first)"
    )


# --- run --------------------------------------------------------------------------------------
def run(run: Any, *, vlm: Any = None, progress: bool = True, **overrides: Any) -> TwinSection:
    """Run the twin through the covered analyses into ``RUN/twin`` and compare every finding.

    Args:
        run: the model's run (``RunDir`` or its directory), whose analyses have run.
        vlm: unused; the twin loads its own model (and frees it) so that the model's and the
            twin's weights never coexist; the pipeline frees the model before this step.
        progress: show progress bars.
        **overrides: ``TwinConfig`` fields.

    Returns:
        The ``twin`` section (see ``compare``).
    """
    from seglens.distributed import is_main
    from seglens.experiments.pipeline import run as run_pipeline
    from seglens.rundir import RunDir

    run = RunDir.of(run, **{f"twin.{k}": v for k, v in overrides.items()})
    config = run.config
    covered = covered_analyses(config)
    if not covered:
        raise ValueError(
            "twin: no enabled analysis to rerun; set twin.analyses (e.g. [probing]) or enable "
            "an analysis with findings"
        )
    log.info("twin: seed %d, rerunning %s", config.twin.seed, ", ".join(covered))
    if vlm is not None:
        log.debug("twin: the shared model is not used (the twin loads its own)")
    twin = build_twin(config.model, config.twin.seed)
    try:
        settings = twin_config(config, run.path, covered)
        run_pipeline(settings, vlm=twin, progress=progress, report=False, only=covered)
    finally:
        del twin
        _free_memory()
    main = is_main()  # under torchrun rank 0 compares and writes (the twin's run has ended)
    found = compare(run.path, run.path / TWIN_DIR) if main else {}
    section = TwinSection(
        seed=config.twin.seed, analyses=covered, run=TWIN_DIR, init=INIT, findings=found
    )
    return run.put_section("twin", section) if main else section


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the comparison ---------------------------------------------------------------------------
def _loader(run_dir: Path) -> Callable[[str], Any]:
    from seglens.rundir.files import load_arrays

    def arrays(relative: str):
        path = run_dir / relative
        return load_arrays(path) if path.is_file() else None

    return arrays


def _interval(values: np.ndarray, n_images: int) -> dict[str, Any]:
    """Row 0 is the full sample, rows 1.. the resamples -> ``{estimate, low, high, n_images}``."""
    from seglens.experiments.stats import centred_interval

    estimate = float(values[0]) if np.isfinite(values[0]) else None
    low, high = centred_interval(estimate, values[1:])
    return {"estimate": estimate, "low": low, "high": high, "n_images": n_images}


def _verdict(interval: Mapping[str, Any] | None, direction: str | None) -> bool | None:
    if direction == "below":
        return below(interval)
    if direction == "above":
        return above(interval)
    return None


def compare(
    model_dir: str | Path,
    twin_dir: str | Path,
    *,
    n_resamples: int = N_RESAMPLES,
    seed: int | None = None,
) -> dict[str, dict]:
    """Every comparable finding of two runs on the same evaluation images: model, twin and model
    minus twin, each with a paired bootstrap interval over images.

    One set of image resamples (``stats.resample_weights`` from the run's seed) serves every
    statistic of both runs, so each difference is paired; the model's intervals are those of its
    findings. A finding's statistics come from its analysis's ``paired`` hook.

    Args:
        model_dir, twin_dir: two finished run directories (the same images and seed).
        n_resamples: bootstrap resamples.
        seed: resample seed (default: the model run's seed).

    Returns:
        ``{finding: {"model_holds", "twin_holds", "beyond_twin", "text", "statistics": {key:
        {"direction", "model", "twin", "model_minus_twin"}}}}`` with intervals ``{estimate, low,
        high, n_images}``; ``beyond_twin`` is True when every directed model-minus-twin interval
        excludes zero in its direction (None when one is undecided).
    """
    from seglens.analyses.registry import ordered
    from seglens.experiments.findings import read_findings
    from seglens.experiments.stats import resample_weights
    from seglens.rundir import RESULTS, load_results
    from seglens.rundir.schema import probing_arrays

    model_dir, twin_dir = Path(model_dir), Path(twin_dir)
    results = {k: load_results(d / RESULTS) for k, d in (("model", model_dir), ("twin", twin_dir))}
    loaders = {"model": _loader(model_dir), "twin": _loader(twin_dir)}
    counts = {k: r["dataset"]["eval_images"] for k, r in results.items()}
    if counts["model"] != counts["twin"]:
        raise ValueError(
            f"cannot pair {model_dir} and {twin_dir}: they hold {counts['model']} and "
            f"{counts['twin']} evaluation images; run both on the same data (data.* settings)"
        )
    n = counts["model"]
    seed = int(results["model"].get("seed", 0)) if seed is None else seed
    weights = np.vstack([np.ones((1, n)), resample_weights(n, n_resamples, seed)])
    verdicts = {}
    for k, r in results.items():

        def arrays(condition: str, load=loaders[k]):
            return load(probing_arrays(condition))

        verdicts[k] = r.get("findings") or read_findings(r, arrays)
    out: dict[str, dict] = {}
    for analysis in ordered():
        if analysis.paired is None:
            continue
        stats = {k: analysis.paired(results[k], loaders[k], weights) for k in results}
        for finding, per_key in stats["model"].items():
            entry: dict[str, Any] = {
                "model_holds": (verdicts["model"].get(finding) or {}).get("holds"),
                "twin_holds": (verdicts["twin"].get(finding) or {}).get("holds"),
                "statistics": {},
            }
            directed, parts = [], []
            for key, mine in per_key.items():
                theirs = (stats["twin"].get(finding) or {}).get(key)
                model = _interval(mine["values"], n)
                twin = None if theirs is None else _interval(theirs["values"], n)
                diff = None
                if theirs is not None:
                    diff = _interval(mine["values"] - theirs["values"], n)
                direction = mine.get("direction")
                if direction is not None:
                    directed.append(_verdict(diff, direction))
                entry["statistics"][key] = {
                    "direction": direction,
                    "model": model,
                    "twin": twin,
                    "model_minus_twin": diff,
                }
                parts.append(
                    f"{key}: model {fmt_interval(model)}, twin {fmt_interval(twin)}, "
                    f"model - twin {fmt_interval(diff)}"
                )
            entry["beyond_twin"] = all_of(*directed) if directed else None
            entry["text"] = "; ".join(parts)
            out[finding] = entry
    return out


# --- figure and report block ------------------------------------------------------------------
def twin_figure(results: Mapping[str, Any], run_dir: Any = None) -> Any:
    """Per finding statistic: the model, the twin and model minus twin, with their intervals."""
    from seglens.report.canvas import new_figure, series_colour

    section = results.get("twin")
    rows = _rows(section)
    if not rows:
        return None
    fig = new_figure(7.5, 1.0 + 0.42 * len(rows))
    ax = fig.subplots()
    sides = (("model", "model"), ("twin", "twin"), ("model_minus_twin", "model - twin"))
    for i, (side, label) in enumerate(sides):
        y = [len(rows) - 1 - r + (1 - i) * 0.22 for r in range(len(rows))]
        cells = [row[2].get(side) or {} for row in rows]
        est = [c.get("estimate") for c in cells]
        low, high = [c.get("low") for c in cells], [c.get("high") for c in cells]
        _horizontal_bars(ax, y, est, low, high, series_colour(i), label)
    ax.axvline(0.0, color="0.4", linewidth=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{f}: {k}" for f, k, _ in reversed(rows)], fontsize=7)
    ax.set_xlabel("statistic (mIoU or accuracy difference), paired 95% interval over images")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"model vs random twin (seed {section.get('seed')})", fontsize=9)
    return fig


def _horizontal_bars(ax, y, est, low, high, colour, label) -> None:
    """Estimates as markers and intervals as horizontal segments (``canvas.interval_bars``
    turned sideways); a missing end draws no segment, a missing estimate no marker."""
    from seglens.report.canvas import interval_arrays

    e, lo, hi = interval_arrays(est, low, high)
    y = np.asarray(y, dtype=np.float64)
    both = np.isfinite(lo) & np.isfinite(hi)
    if both.any():
        ax.hlines(y[both], lo[both], hi[both], color=colour, linewidth=1.4)
    shown = np.isfinite(e)
    ax.plot(e[shown], y[shown], "o", ms=3.5, linestyle="none", color=colour, label=label)


def _rows(section: Mapping[str, Any] | None) -> list[tuple[str, str, Mapping[str, Any]]]:
    if not section:
        return []
    return [
        (finding, key, stat)
        for finding, entry in (section.get("findings") or {}).items()
        for key, stat in (entry.get("statistics") or {}).items()
    ]


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("yes" if value else "no")


def block(results: Mapping[str, Any], page: Any) -> str:
    """The twin's block: the figure, then a table per finding with both verdicts."""
    from seglens.report.page import escape, paragraph, table

    section = results.get("twin")
    if not section:  # off by default: say how to switch it on, not "not run"
        return (
            '<p class="muted">The random twin is off. <code>seglens run --twin</code> '
            "(<code>twin.enabled</code>) reruns the analyses on the same architecture "
            "re-initialised and reports every finding as model, twin and model minus twin "
            "(it doubles the passes of what it covers).</p>"
        )
    rows, classes = [], []
    for finding, entry in (section.get("findings") or {}).items():
        for key, stat in (entry.get("statistics") or {}).items():
            rows.append(
                [
                    escape(f"{finding}: {key}"),
                    escape(fmt_interval(stat.get("model"))),
                    escape(fmt_interval(stat.get("twin"))),
                    escape(fmt_interval(stat.get("model_minus_twin"))),
                    escape(stat.get("direction") or "(shown)"),
                    escape(_yes(entry.get("model_holds"))),
                    escape(_yes(entry.get("beyond_twin"))),
                ]
            )
            classes.append("" if entry.get("beyond_twin") else "muted")
    header = ["finding: statistic", "model", "twin", "model - twin", "direction"]
    header += ["holds (model)", "holds beyond the architecture"]
    intro = (
        f"The same architecture re-initialised (seed {section.get('seed')}; {section.get('init')}) "
        f"ran {', '.join(section.get('analyses') or [])} on the same images with its own probes "
        f"(its run: {section.get('run')}/). A finding holds beyond the architecture when model "
        "minus twin excludes zero in the finding's direction; every interval is a paired 95% "
        "bootstrap over the evaluation images, the same resample for model and twin."
    )
    figure = page.figure("twin_findings", "Model, twin and model minus twin per finding.")
    return paragraph(intro) + figure + table(header, rows, classes)


ANALYSIS = Analysis(
    name="twin",
    title="rerun the analyses on a random-weight twin and compare every finding with it",
    run=run,
    config_key="twin",
    config=TwinConfig,
    sections={"twin": TwinSection},
    figures={"twin_findings": twin_figure},
    report=(Block("twin", "Random twin: what the architecture alone does", block),),
    last=True,
    plan=plan,
)
