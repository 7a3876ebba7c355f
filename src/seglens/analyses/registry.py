"""The registry of analyses: what each one is, in which order they run, and what each needs.

An ``Analysis`` bundles everything about one analysis (config section, CLI subcommand,
``run``, results sections, figures, report blocks, findings). The pipeline, the report, the CLI,
``results.json`` validation and the YAML config iterate over ``ordered()`` and name no analysis.
seglens registers its own analyses first; other packages add theirs with ``register_analysis``
or through the ``seglens.analyses`` entry-point group (see ``docs/extending.md``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "Analysis", "Block", "Command", "Feed", "Panel", "Table"]
__all__ += ["analyses", "by_config_key", "get", "ordered", "register_analysis"]
__all__ += ["unregister_analysis"]

log = logging.getLogger(__name__)

#: Entry-point group through which installed packages contribute analyses.
ENTRY_POINT_GROUP = "seglens.analyses"

#: seglens's own analyses, registered in this order before any third-party one.
BUILTIN = (
    "seglens.analyses.probing",
    "seglens.analyses.knockout",
    "seglens.analyses.attention",
    "seglens.analyses.bidirectional",
    "seglens.analyses.umap",
    "seglens.readouts.analysis",
    "seglens.analyses.order",
    "seglens.analyses.heads",
    "seglens.analyses.twin",
)

#: ``figure(results, run_dir) -> matplotlib Figure | None`` (None: nothing to draw).
FigureFn = Callable[[Mapping[str, Any], Any], Any]
#: ``findings(results, arrays) -> {finding: {"holds": bool | None, "text": str, ...}}`` where
#: ``arrays(condition)`` returns that probing condition's saved arrays or None.
FindingsFn = Callable[[Mapping[str, Any], Callable[[str], Any]], dict[str, dict]]
#: ``paired(results, arrays, weights) -> {finding: {key: {"values": (R,), "direction"}}}``: each
#: finding's statistics on the image weights ``weights`` (R, n_eval) (row r: how often each
#: evaluation image, in dataset order, is drawn), ``direction`` ``below``/``above`` (None: shown,
#: not a verdict); ``arrays(relative_path)`` loads a saved ``.npz`` of the run (None if absent).
PairedFn = Callable[[Mapping[str, Any], Callable[[str], Any], Any], dict[str, dict]]
#: ``forwards(run_config, train, evaluation, layers) -> {"forwards": int, "bound": bool,
#: "detail": str}``: the image forwards it plans for splits of ``train`` and ``evaluation``
#: images on a model of ``layers`` LLM layers (``bound``: an upper bound, decided at run time).
ForwardsFn = Callable[[Any, int, int, int], dict[str, Any]]


@dataclass(frozen=True)
class Block:
    """One section of ``report.html``: ``render(results, page) -> HTML`` (escaped), or ''/None
    when its results are absent (the page then says "not run")."""

    id: str
    title: str
    render: Callable[[Mapping[str, Any], Any], str | None]


@dataclass(frozen=True)
class Panel:
    """One panel of the report's first figure, the run at a glance.

    ``draw(ax, results, run_dir, label)`` draws on the matplotlib axes ``ax``, with a title that
    starts with ``label`` (e.g. "(b)"), and returns None; or it draws nothing and returns the
    text the panel shows instead (e.g. "Attention knockout not run ..."). ``caption`` is its
    sentence of the figure's caption; ``width`` its width relative to the other panels.
    """

    title: str
    draw: Callable[[Any, Mapping[str, Any], Any, str], str | None]
    caption: str
    width: float = 1.0


@dataclass(frozen=True)
class Table:
    """One tidy CSV of ``RUN/tables/`` (one row per observation, one column per variable).

    ``rows(results, run_dir)`` yields dicts whose keys are among ``columns`` (a missing key is an
    empty field). Two analyses may add rows to one table when they give it the same columns.
    """

    name: str
    columns: tuple[str, ...]
    rows: Callable[[Mapping[str, Any], Any], Any]


@dataclass(frozen=True)
class Command:
    """A CLI subcommand: ``add_arguments(parser)`` and ``main(args) -> exit status``."""

    name: str
    help: str
    add_arguments: Callable[[Any], None]
    main: Callable[[Any], int]


@dataclass(frozen=True)
class Feed:
    """A consumer of another analysis's evaluation pass (so the pass is shared, not repeated).

    ``offer(batch, states)`` is called for every evaluation batch of ``source``; the feed is then
    handed to its own analysis's ``run`` as ``feed=``.
    """

    source: str
    offer: Callable[[Any, Mapping[str, Any]], None]
    state: Any = None


@dataclass(frozen=True)
class Analysis:
    """Everything about one analysis.

    Attributes:
        name: registry name (``[a-z][a-z0-9_]*``), also the default results section.
        title: one line on what the analysis measures (``seglens run --help``, docs).
        run: ``run(run, *, vlm, progress, **overrides) -> section``: reads the run directory
            (``RunDir`` or path) and the results of the analyses it needs, and adds its
            section(s) with ``RunDir.put_section``. Figures are drawn by the report.
        config_key: top-level YAML key of its config section (None: no section).
        config: the frozen dataclass of that section (each field with a ``help`` metadata).
        needs: analyses that must have run first (``probing`` for most).
        enabled: ``enabled(run_config) -> bool``; default: the section's ``enabled`` field when
            it has one, else always.
        sections: results sections it writes -> ``schema.Section`` type (validated in
            ``results.json``); a name ending in ``.*`` types every entry of a mapping.
        figures: figure name -> ``figure(results, run_dir)``, drawn into ``figures/<name>.png``.
        report: its blocks of ``report.html``, in page order.
        question: one sentence for the report's opening question.
        findings: ``findings(results, arrays)``, read off a finished run (None: none).
        finding_names: finding key -> the heading the report gives it.
        command: its CLI subcommand (None: only part of ``seglens run``).
        feed: ``feed(run_config, vlm) -> Feed | None``: share another analysis's pass.
        paired: ``paired(results, arrays, weights)``: its findings' statistics on given image
            resamples, so that two runs on the same images (a model and its random twin) can
            be compared on the same resample (None: not comparable).
        last: run after every other analysis, without the shared model (the twin reruns them
            with its own).
        plan: ``plan(run_config) -> str``: its line in the plan ``seglens run`` logs first.
        forwards: ``forwards(run_config, train, evaluation, layers)``: the image forwards it
            plans (None: listed as "not planned").
        tables: its tidy CSV tables (``seglens.tables``, ``open_run``).
        overview: its panel of the report's first figure (None: none).
    """

    name: str
    title: str
    run: Callable[..., Any]
    config_key: str | None = None
    config: type | None = None
    needs: tuple[str, ...] = ()
    enabled: Callable[[Any], bool] | None = None
    sections: Mapping[str, type] = field(default_factory=dict)
    figures: Mapping[str, FigureFn] = field(default_factory=dict)
    report: tuple[Block, ...] = ()
    question: str = ""
    findings: FindingsFn | None = None
    finding_names: Mapping[str, str] = field(default_factory=dict)
    command: Command | None = None
    feed: Callable[[Any, Any], Feed | None] | None = None
    paired: PairedFn | None = None
    last: bool = False
    plan: Callable[[Any], str] | None = None
    forwards: ForwardsFn | None = None
    tables: tuple[Table, ...] = ()
    overview: Panel | None = None

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "a").isalnum() or not self.name[0].isalpha():
            raise ValueError(
                f"analysis name {self.name!r} must start with a letter and hold only letters, "
                "digits and '_'"
            )
        if (self.config is None) != (self.config_key is None):
            raise ValueError(
                f"analysis {self.name!r}: give config_key and config together (or neither)"
            )
        if self.config is not None and not (
            dataclasses.is_dataclass(self.config) and self.config.__dataclass_params__.frozen
        ):
            raise ValueError(
                f"analysis {self.name!r}: config must be a frozen dataclass, got {self.config!r}"
            )
        if not callable(self.run):
            raise ValueError(f"analysis {self.name!r}: run must be callable, got {self.run!r}")

    def is_enabled(self, config: Any) -> bool:
        """Whether ``seglens run`` runs it under the run config ``config``."""
        if self.enabled is not None:
            return bool(self.enabled(config))
        if self.config_key is not None:
            return bool(getattr(getattr(config, self.config_key), "enabled", True))
        return True


_REGISTRY: dict[str, Analysis] = {}
_LOADED = {"builtin": False, "entry_points": False}

#: Names the core config uses; an analysis's config section may not take them.
RESERVED_KEYS = ("out", "seed", "overwrite", "resume", "checkpoint_every", "model", "data")


def register_analysis(analysis: Analysis, *, replace: bool = False) -> Analysis:
    """Add ``analysis`` to the registry (after those already there) and return it.

    Args:
        analysis: the analysis.
        replace: replace an analysis of the same name instead of refusing it.

    Raises:
        ValueError: the name, its config key, a section or a figure name is taken, or a
            needed analysis is unknown.
    """
    _load_builtin()
    if not isinstance(analysis, Analysis):
        raise ValueError(
            f"register_analysis takes a seglens.analyses.Analysis, got {type(analysis).__name__}"
        )
    others = [a for a in _REGISTRY.values() if a.name != analysis.name]
    if analysis.name in _REGISTRY and not replace:
        raise ValueError(
            f"an analysis named {analysis.name!r} is already registered; choose another name "
            "or pass replace=True"
        )
    if analysis.config_key in RESERVED_KEYS:
        raise ValueError(
            f"analysis {analysis.name!r}: config key {analysis.config_key!r} is reserved; "
            f"reserved: {', '.join(RESERVED_KEYS)}"
        )
    for other in others:
        taken = [
            (kind, key)
            for kind, mine, theirs in (
                ("config key", {analysis.config_key} - {None}, {other.config_key}),
                ("results section", set(analysis.sections), set(other.sections)),
                ("figure", set(analysis.figures), set(other.figures)),
                ("report block", {b.id for b in analysis.report}, {b.id for b in other.report}),
                (
                    "command",
                    {analysis.command and analysis.command.name} - {None},
                    {other.command and other.command.name},
                ),
            )
            for key in mine & theirs
        ]
        taken += [
            ("table (with other columns)", table.name)
            for table in analysis.tables
            for theirs in other.tables
            if table.name == theirs.name and table.columns != theirs.columns
        ]
        if taken:
            kind, key = taken[0]
            raise ValueError(
                f"analysis {analysis.name!r}: {kind} {key!r} is already used by analysis "
                f"{other.name!r}; rename it"
            )
    known = {a.name for a in others} | {analysis.name}
    unknown = [n for n in analysis.needs if n not in known]
    if unknown:
        raise ValueError(
            f"analysis {analysis.name!r} needs {unknown}, which no registered analysis provides"
            f"{_suggest(unknown[0], known)}; register those first"
        )
    _REGISTRY[analysis.name] = analysis
    return analysis


def unregister_analysis(name: str) -> Analysis:
    """Remove and return the analysis ``name`` (tests and interactive sessions)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"no analysis named {name!r}{_suggest(name, _REGISTRY)}")
    return _REGISTRY.pop(name)


def analyses() -> dict[str, Analysis]:
    """Every registered analysis by name, in registration order (entry points loaded)."""
    _load_builtin()
    _load_entry_points()
    return dict(_REGISTRY)


def ordered(names: list[str] | None = None) -> list[Analysis]:
    """The analyses (all, or those named and what they need) in run order: registration order,
    each after the analyses it needs."""
    every = analyses()
    chosen = list(every) if names is None else [get(n).name for n in names]
    done: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in path:
            raise ValueError(f"analyses need each other in a cycle: {' -> '.join((*path, name))}")
        for need in every[name].needs:
            visit(need, (*path, name))
        done.append(name)

    for name in chosen:
        visit(name, ())
    return [every[n] for n in done]


def get(name: str) -> Analysis:
    """The analysis ``name``; an unknown name is refused with a suggestion."""
    every = analyses()
    if name not in every:
        raise ValueError(
            f"no analysis named {name!r}{_suggest(name, every)}; registered: {', '.join(every)}"
        )
    return every[name]


def by_config_key() -> dict[str, Analysis]:
    """``{config key: analysis}`` for the analyses that have a config section, in order."""
    return {a.config_key: a for a in analyses().values() if a.config_key is not None}


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _load_builtin() -> None:
    if _LOADED["builtin"]:
        return
    _LOADED["builtin"] = True
    for module in BUILTIN:
        analysis = importlib.import_module(module).ANALYSIS
        _REGISTRY.setdefault(analysis.name, analysis)


def _load_entry_points() -> None:
    """Register what the ``seglens.analyses`` entry points name: an ``Analysis``, a module with
    an ``ANALYSIS`` attribute, or a function returning an ``Analysis``."""
    if _LOADED["entry_points"]:
        return
    _LOADED["entry_points"] = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = point.load()
        except Exception as e:
            raise ValueError(
                f"entry point {point.name!r} ({point.value}) of group {ENTRY_POINT_GROUP!r} "
                f"failed to load: {e}; fix or uninstall the package that declares it"
            ) from e
        analysis = getattr(target, "ANALYSIS", target)
        if not isinstance(analysis, Analysis) and callable(analysis):
            analysis = analysis()
        if not isinstance(analysis, Analysis):
            raise ValueError(
                f"entry point {point.name!r} ({point.value}) of group {ENTRY_POINT_GROUP!r} "
                f"gives {type(analysis).__name__}, not a seglens.analyses.Analysis"
            )
        if analysis.name in _REGISTRY and _REGISTRY[analysis.name] is analysis:
            continue
        register_analysis(analysis)
        log.debug("registered analysis %s from entry point %s", analysis.name, point.value)


def rediscover() -> None:
    """Load the entry points again on next use (after installing a package in-process)."""
    _LOADED["entry_points"] = False
