"""The family registry, built from the family modules: HF ``model_type`` -> adapter, tiny models.

Every module of ``seglens.models.families`` is imported once, on first use; each ``ModelFamily``
subclass it defines is registered under the ``model_types`` and ``tiny_models`` of its own class
body (a subclass does not inherit its parent's entries). Two families claiming one model type or
one tiny name is an error, so a new family cannot shadow another silently.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from functools import cache

from seglens.models.base import ModelFamily


@dataclass(frozen=True)
class TinySpec:
    """A registered tiny model.

    Attributes:
        family: the adapter class whose ``build_tiny`` builds it.
        kwargs: keyword arguments of ``build_tiny`` (sizes, towers).
        family_options: keyword arguments of the adapter (e.g. ``{"grid": "tiles"}``).
    """

    family: type[ModelFamily]
    kwargs: dict = field(default_factory=dict)
    family_options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Registry:
    """What the family modules declare.

    Attributes:
        families: adapter name (``llava``, ``qwen2_vl`` ...) -> class, in module order.
        model_types: HF ``config.model_type`` -> class.
        tiny: tiny registry name (``tiny-clip`` ...) -> ``TinySpec``.
    """

    families: dict[str, type[ModelFamily]]
    model_types: dict[str, type[ModelFamily]]
    tiny: dict[str, TinySpec]


def _own(cls: type, attr: str, default):
    return vars(cls).get(attr, default)


@cache
def registry() -> Registry:
    """The registry of every family module (imported on the first call).

    Raises:
        ValueError: two families claim the same name, model type or tiny model name.
    """
    from seglens.models import families as package

    found: list[type[ModelFamily]] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found += [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, ModelFamily)
            and obj.__module__ == module.__name__
            and "name" in vars(obj)
        ]
    families: dict[str, type[ModelFamily]] = {}
    model_types: dict[str, type[ModelFamily]] = {}
    tiny: dict[str, TinySpec] = {}
    for cls in found:
        _claim(families, cls.name, cls, "family name")
        for model_type in _own(cls, "model_types", ()):
            _claim(model_types, model_type, cls, "model type")
        for name, spec in _own(cls, "tiny_models", {}).items():
            spec = dict(spec)
            options = spec.pop("family_options", {})
            _claim(tiny, name, TinySpec(cls, spec, options), "tiny model")
    return Registry(families, model_types, tiny)


def _claim(table: dict, key: str, value, what: str) -> None:
    if key in table:
        first = table[key].family if isinstance(table[key], TinySpec) else table[key]
        second = value.family if isinstance(value, TinySpec) else value
        raise ValueError(f"{what} {key!r} is registered by {first.__name__} and {second.__name__}")
    table[key] = value
