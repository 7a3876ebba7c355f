"""The schema of ``results.json``: typed sections, array keys, the clean condition, the probing
summary and the schema version.

The analyses declare their own sections (``seglens.analyses``); this module holds the base
``Section``, the core ones (dataset, and the probing condition every analysis reads) and the
validation loop. A section is a dataclass read with ``from_dict`` (missing keys are refused,
naming the section and the key) and written with ``to_dict``; keys a section does not type are
kept in ``extra``, and sections nobody declares are kept as they are. ``load_results``
validates a whole file and upgrades the previous version's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from seglens import stages as stage_names

__all__ = ["SCHEMA_VERSION", "Condition", "Dataset", "Section", "Summary", "clean_condition"]
__all__ += ["confusion_key", "load_results", "main_condition", "position_key", "probing_summary"]
__all__ += ["section_type", "sections", "validate"]

#: 2: the probing summary holds ``adapter_change`` (adapter - encoder, negative = a drop) and the
#: LLM peak; version 1 held ``adapter_drop`` (encoder - adapter). Version 1 files are upgraded.
SCHEMA_VERSION = 2
CONDITIONS = ("causal", "bidirectional_image")


# --- array keys ------------------------------------------------------------------------------
def position_key(stage: str) -> str:
    """Key of a stage's (N,) per-position accuracy in ``arrays/probing_<condition>.npz``."""
    return f"position_accuracy__{stage}"


def confusion_key(stage: str, level: str) -> str:
    """Key of a stage's (C, C) confusion at ``level`` (patch, pixel) in the probing arrays."""
    return f"confusion__{stage}__{level}"


def embedding_key(stage: str) -> str:
    """Key of a stage's (M, 2) UMAP embedding in ``arrays/umap.npz``."""
    return f"embedding__{stage}"


def labels_key(stage: str) -> str:
    """Key of a stage's (M,) UMAP token labels in ``arrays/umap.npz``."""
    return f"labels__{stage}"


def probing_arrays(condition: str) -> str:
    """The arrays file of one probing condition, relative to the run directory."""
    return f"arrays/probing_{condition}.npz"


# --- sections --------------------------------------------------------------------------------
@dataclass
class Section(Mapping):
    """Base of the typed sections: ``from_dict`` / ``to_dict``, untyped keys kept in ``extra``."""

    title: ClassVar[str] = "section"
    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Section:
        """Read a section, refusing a missing key with the section's name and the key."""
        where = where or cls.title
        if isinstance(data, Section):
            data = data.to_dict()
        if not isinstance(data, Mapping):
            raise ValueError(f"results.json: {where} must be a mapping, got {type(data).__name__}")
        typed = {f.name: f for f in fields(cls) if f.name != "extra"}
        missing = [
            name
            for name, f in typed.items()
            if name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(
                f"results.json: {where} lacks {', '.join(map(repr, missing))}; the file is "
                "incomplete or was not written by seglens: rerun the analysis that writes it"
            )
        values = {k: cls._read(k, v, f"{where}.{k}") for k, v in data.items() if k in typed}
        return cls(**values, extra={k: v for k, v in data.items() if k not in typed})

    @classmethod
    def _read(cls, key: str, value: Any, where: str) -> Any:
        """Hook for nested typed values."""
        return value

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: typed fields in order, then the extra keys."""
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value = value.to_dict()
            elif isinstance(value, dict) and any(isinstance(v, Section) for v in value.values()):
                value = {k: v.to_dict() for k, v in value.items()}
            out[f.name] = value
        return out | dict(self.extra)

    # read-only mapping of the JSON form
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    __hash__ = None  # mutable


@dataclass(eq=False)
class Summary(Section):
    """Landmarks of one probing condition's curve at ``level``; ``adapter_change`` is the adapter
    minus the encoder mIoU (negative = the adapter drop), ``llm_gain`` the best LLM stage minus
    the adapter."""

    title: ClassVar[str] = "probing summary"
    level: str
    best_stage: str | None
    best_miou: float | None
    encoder_miou: float | None
    adapter_miou: float | None
    adapter_change: float | None
    llm_peak_stage: str | None = None
    llm_peak_miou: float | None = None
    llm_gain: float | None = None


@dataclass(eq=False)
class Condition(Section):
    """``probing.<condition>``: stages, solver, per-stage metrics, summary and arrays file."""

    title: ClassVar[str] = "probing condition"
    stages: list[str]
    solver: str
    metrics: dict[str, Any]
    summary: Summary
    arrays: str

    @classmethod
    def _read(cls, key: str, value: Any, where: str) -> Any:
        return Summary.from_dict(value, where) if key == "summary" else value


@dataclass(eq=False)
class Dataset(Section):
    title: ClassVar[str] = "dataset"
    name: str
    train_split: str
    eval_split: str
    num_classes: int
    class_names: list[str]
    palette: list
    train_images: int
    holdout_images: int
    eval_images: int
    skipped: dict[str, Any]


#: The core typed section; the analyses' sections come from the registry (``seglens.analyses``).
CORE_SECTIONS: dict[str, type[Section]] = {"dataset": Dataset}


def sections() -> dict[str, type[Section] | None]:
    """Every typed results section by name: the core ones and those the registered analyses
    declare (``"probing.*"`` types each entry of ``probing``; None: untyped)."""
    from seglens.analyses import ordered

    found: dict[str, type[Section] | None] = dict(CORE_SECTIONS)
    for analysis in ordered():
        found |= analysis.sections
    return found


def section_type(name: str) -> type[Section] | None:
    """The typed section of a dotted name (``probing.<condition>`` is a ``Condition``)."""
    head, _, tail = name.partition(".")
    known = sections()
    return known.get(f"{head}.*") if tail else known.get(head)


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # import machinery probes (__path__, ...)
        raise AttributeError(name)
    if name == "SECTIONS":  # the registry can grow after import: computed on access
        return {k: v for k, v in sections().items() if v is not None and "*" not in k}
    from seglens.analyses import analyses  # section types that moved into their analyses

    for analysis in analyses().values():
        for kind in analysis.sections.values():
            if kind is not None and kind.__name__ == name:
                return kind
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the clean condition and the probing summary -------------------------------------------------
def clean_condition(results: Mapping[str, Any]) -> str:
    """The probing condition of the unmodified model, named after its native image attention:
    ``"causal"`` for LLaVA-style models, ``"bidirectional_image"`` for models whose image tokens
    already attend to each other (Gemma3, PaliGemma's prefix); the other one is the intervention.
    """
    native = (results.get("model") or {}).get("native_image_attention", "causal")
    return "causal" if native == "causal" else "bidirectional_image"


def main_condition(results: Mapping[str, Any]) -> str:
    """The probing condition the report annotates: the clean one when present, else the first."""
    probing = results.get("probing") or {}
    clean = clean_condition(results)
    return clean if clean in probing else next(iter(probing))


def level_values(block: Mapping[str, Any], level: str) -> dict[str, dict[str, Any]]:
    """``{stage: metrics}`` of one probing condition at ``level``, stages without them left out."""
    metrics = block.get("metrics") or {}
    ordered = stage_names.order(block.get("stages") or list(metrics))
    return {s: metrics[s][level] for s in ordered if (metrics.get(s) or {}).get(level)}


def probing_summary(block: Mapping[str, Any], level: str) -> dict[str, Any] | None:
    """The curve's landmarks at ``level`` (``Summary``'s keys) plus ``values`` {stage: mIoU};
    None when no stage has a score at ``level``. The one place the adapter change is computed:
    ``adapter_change`` = adapter - encoder mIoU (negative = a drop)."""
    values = {s: m["miou"] for s, m in level_values(block, level).items() if m["miou"] is not None}
    if not values:
        return None
    best = max(values, key=values.__getitem__)
    llm = {s: values[s] for s in stage_names.by_depth(values)}
    peak = max(llm, key=llm.__getitem__) if llm else None
    encoder, adapter = values.get("encoder"), values.get("adapter")
    return {
        "level": level,
        "best_stage": best,
        "best_miou": values[best],
        "encoder_miou": encoder,
        "adapter_miou": adapter,
        "adapter_change": None if encoder is None or adapter is None else adapter - encoder,
        "llm_peak_stage": peak,
        "llm_peak_miou": llm.get(peak),
        "llm_gain": None if peak is None or adapter is None else llm[peak] - adapter,
        "values": values,
    }


def summary_of(metrics: Mapping[str, Any], stages: list[str], level: str) -> Summary:
    """The stored ``Summary`` of a condition's metrics at ``level``."""
    found = probing_summary({"stages": stages, "metrics": metrics}, level)
    if found is None:
        empty = dict.fromkeys(("best_stage", "best_miou", "encoder_miou", "adapter_miou"))
        return Summary(level=level, adapter_change=None, **empty)
    found.pop("values")
    return Summary(**found)


# --- whole files -----------------------------------------------------------------------------
def _upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2: the probing summaries are recomputed from the stored metrics."""
    for block in (data.get("probing") or {}).values():
        if isinstance(block, dict) and isinstance(block.get("summary"), dict):
            level = block["summary"].get("level") or "patch"
            block["summary"] = summary_of(block.get("metrics") or {}, block.get("stages"), level)
            block["summary"] = block["summary"].to_dict()
    return data | {"schema_version": SCHEMA_VERSION, "upgraded_from": 1}


def validate(data: Any, where: str = "results.json") -> dict[str, Any]:
    """Check a whole ``results.json`` against the schema (upgrading version 1) and return it.

    Raises:
        ValueError: no or an unknown schema version (with what to do), or a typed section that
            lacks a key (naming it).
    """
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ValueError(f"{where} has no schema_version: it was not written by seglens")
    version = data["schema_version"]
    if version == 1:
        data = _upgrade_v1(dict(data))
    elif version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise ValueError(
            f"{where} has schema version {version!r}; this seglens reads versions 1 and "
            f"{SCHEMA_VERSION}. "
            + (
                "It was written by a newer seglens: upgrade seglens to read it."
                if newer
                else "Rerun the analyses with this version of seglens."
            )
        )
    for name, kind in sections().items():
        if kind is None:
            continue
        if name.endswith(".*"):
            head = name[:-2]
            for key, block in (data.get(head) or {}).items():
                kind.from_dict(block, f"{where}: {head}.{key}")
        elif data.get(name):
            kind.from_dict(data[name], f"{where}: {name}")
    return data


def load_results(path) -> dict[str, Any]:
    """Read and validate ``results.json`` (see ``validate``)."""
    from seglens.rundir.files import read_json

    return validate(read_json(path), str(path))
