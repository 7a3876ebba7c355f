"""What the readouts read and how, as plain data: the lens and sink options and the ``lens`` config
section. Torch-free, so that building the CLI parser (which reads every analysis's config section)
imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["MODES", "READOUTS", "SINK_RULES", "SUBTOKEN_MODES", "LensConfig", "LensOptions"]
__all__ += ["SinkOptions"]

READOUTS = ("logit", "embedding")
MODES = ("all", "present")
#: How a name of several sub-tokens is read: its first sub-token, the best of its sub-tokens, or
#: their mean (of the unembedding rows: the mean of the logits before soft-capping).
SUBTOKEN_MODES = ("first", "max", "mean")
SINK_RULES = ("norm", "massive", "either")


@dataclass(frozen=True)
class LensOptions:
    """What the lens reads and how.

    Attributes:
        readouts: ``logit`` (final norm + unembedding rows) and/or ``embedding`` (cosine to the
            input embeddings).
        modes: ``all`` (every class: zero-shot) and/or ``present`` (the image's classes: oracle).
        subtokens: ``first``, ``max`` or ``mean`` over a name's sub-tokens.
        pixel_level: also score at pixel level (the probe's upsampling through the geometry).
    """

    readouts: tuple[str, ...] = READOUTS
    modes: tuple[str, ...] = MODES
    subtokens: str = "first"
    pixel_level: bool = True

    def __post_init__(self):
        for name, values, allowed in (
            ("readouts", self.readouts, READOUTS),
            ("modes", self.modes, MODES),
        ):
            bad = [v for v in values if v not in allowed]
            if bad or not values:
                raise ValueError(f"lens {name} {list(values)}: each must be one of {allowed}")
        if self.subtokens not in SUBTOKEN_MODES:
            raise ValueError(f"lens subtokens {self.subtokens!r} is not one of {SUBTOKEN_MODES}")


@dataclass(frozen=True)
class SinkOptions:
    """How sink tokens are flagged.

    Attributes:
        rule: ``norm``, ``massive`` or ``either`` (``SINK_RULES``).
        norm_factor: a sink's state norm exceeds this times the image's median token norm.
        massive_factor: a sink's largest |value| exceeds this times the image's median |value|.
    """

    rule: str = "norm"
    norm_factor: float = 5.0
    massive_factor: float = 50.0

    def __post_init__(self):
        if self.rule not in SINK_RULES:
            raise ValueError(f"sinks rule {self.rule!r} is not one of {SINK_RULES}")
        for name in ("norm_factor", "massive_factor"):
            if not getattr(self, name) > 1:
                raise ValueError(
                    f"sinks {name}={getattr(self, name)} must be > 1 (a multiple of the median)"
                )


def _help(text: str, default: Any):
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class LensConfig:
    """The ``lens`` config section (the logit lens, the embedding lens and sink tokens)."""

    enabled: bool = _help("read each stage with the logit and embedding lens, flag sinks", True)
    readouts: tuple[str, ...] = _help("logit and/or embedding", READOUTS)
    modes: tuple[str, ...] = _help("all (every class) and/or present (the image's: oracle)", MODES)
    subtokens: str = _help(
        "a multi-token class name reads its first, max or mean sub-token", "first"
    )
    pixel_level: bool | None = _help(
        "also score at pixel level; default: as probe.pixel_level", None
    )
    sink_rule: str = _help("sink tokens by state norm, massive dimension, or either", "norm")
    sink_norm_factor: float = _help("a sink's norm exceeds this times the image's median", 5.0)
    sink_massive_factor: float = _help("a sink's max |value| exceeds this times the median", 50.0)
    sink_keys: bool = _help(
        "knock out the sink keys and a size-matched random control (3 forwards per image with "
        "a sink) and score the clean probes at every LLM layer",
        True,
    )
    sink_keys_images: int | None = _help(
        "knock out on at most this many evaluation images with sinks (None: all)", 100
    )

    def __post_init__(self):
        self.lens_options()
        self.sink_options()
        if self.sink_keys_images is not None and self.sink_keys_images < 1:
            raise ValueError(
                f"lens.sink_keys_images={self.sink_keys_images} must be >= 1, or null for every "
                "image with a sink"
            )

    def lens_options(self, pixel_level: bool = True) -> LensOptions:
        """The scorer options; ``pixel_level`` (the probe's) applies when this one is None."""
        pixel = pixel_level if self.pixel_level is None else self.pixel_level
        return LensOptions(tuple(self.readouts), tuple(self.modes), self.subtokens, pixel)

    def sink_options(self) -> SinkOptions:
        """The sink-flagging options."""
        return SinkOptions(self.sink_rule, self.sink_norm_factor, self.sink_massive_factor)
