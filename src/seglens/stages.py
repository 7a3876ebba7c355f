"""Stage names, a public contract: ``vision.{i}``, ``encoder``, ``adapter``, ``llm.{l}``,
``llm.final_norm``. This module alone parses them, orders them along the forward pass, reads the
LLM layer number of a stage and spreads default stages over depth (see DESIGN.md, "Stages").
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

__all__ = ["Stage", "by_depth", "default_stages", "is_stage", "llm_layer", "llm_stages"]
__all__ += ["middle_layer", "order", "parse", "relative_depth", "sort_key", "spread", "summarise"]
__all__ += ["vision_block"]

ENCODER, ADAPTER, FINAL_NORM = "encoder", "adapter", "llm.final_norm"
_NUMBERED = re.compile(r"^(vision|llm)\.([1-9][0-9]*)$")
# Position of each kind along the forward pass.
_RANK = {"vision": 0, "encoder": 1, "adapter": 2, "llm": 3, "final_norm": 4}


class Stage(NamedTuple):
    """A parsed stage name: ``kind`` in vision, encoder, adapter, llm, final_norm; ``index`` the
    1-based block number of ``vision.{i}`` and ``llm.{l}`` (0 for the others)."""

    kind: str
    index: int = 0

    @property
    def name(self) -> str:
        if self.kind in ("vision", "llm"):
            return f"{self.kind}.{self.index}"
        return FINAL_NORM if self.kind == "final_norm" else self.kind


def parse(stage: str) -> Stage:
    """``"llm.7"`` -> ``Stage("llm", 7)``; a name outside the contract raises ``ValueError``."""
    match = _NUMBERED.match(stage) if isinstance(stage, str) else None
    if match:
        return Stage(match.group(1), int(match.group(2)))
    if stage in (ENCODER, ADAPTER):
        return Stage(stage)
    if stage == FINAL_NORM:
        return Stage("final_norm")
    raise ValueError(
        f"{stage!r} is not a stage name; stages are encoder, adapter, vision.<i>, llm.<l> "
        "(1-based) and llm.final_norm"
    )


def is_stage(stage: str) -> bool:
    """Whether ``stage`` follows the naming contract."""
    try:
        parse(stage)
    except ValueError:
        return False
    return True


def llm_layer(stage: str) -> int | None:
    """``llm.7`` -> 7; any other stage (``llm.final_norm`` included) -> None."""
    parsed = parse(stage) if is_stage(stage) else None
    return parsed.index if parsed is not None and parsed.kind == "llm" else None


def vision_block(stage: str) -> int | None:
    """``vision.3`` -> 3; any other stage -> None."""
    parsed = parse(stage) if is_stage(stage) else None
    return parsed.index if parsed is not None and parsed.kind == "vision" else None


def sort_key(stage: str) -> tuple[int, int]:
    """Forward order: vision.i, encoder, adapter, llm.1..L, llm.final_norm (others last)."""
    if not is_stage(stage):
        return len(_RANK), 0
    parsed = parse(stage)
    return _RANK[parsed.kind], parsed.index


def order(stages: Iterable[str]) -> list[str]:
    """The distinct ``stages`` in forward order (stable for names outside the contract)."""
    return sorted(dict.fromkeys(stages), key=sort_key)


def by_depth(stages: Iterable[str]) -> list[str]:
    """The numbered LLM stages among ``stages``, by layer."""
    return sorted((s for s in set(stages) if llm_layer(s) is not None), key=llm_layer)


def llm_stages(num_layers: int) -> list[str]:
    """``llm.1 .. llm.L``."""
    return [f"llm.{layer}" for layer in range(1, num_layers + 1)]


def default_stages(num_llm_layers: int) -> list[str]:
    """What is probed unless asked otherwise: ``encoder``, ``adapter`` and every LLM block."""
    return [ENCODER, ADAPTER, *llm_stages(num_llm_layers)]


def spread(num_layers: int, count: int) -> list[int]:
    """``count`` LLM layers spread evenly over depth, the last one included, deduplicated:
    ``round(L * k / count)`` for k = 1..count (at least layer 1)."""
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")
    return list(dict.fromkeys(max(1, round(num_layers * k / count)) for k in range(1, count + 1)))


def middle_layer(num_layers: int) -> int:
    """The middle LLM layer, ``ceil(L / 2)`` (1-based)."""
    return math.ceil(num_layers / 2)


def relative_depth(stage: str, num_llm_layers: int, num_vision_layers: int = 1) -> float:
    """x position on a depth axis shared by runs of different depth.

    LLM block ``l`` of ``L`` sits at ``l / L`` (so the last block is at 1 for every model), the
    adapter at 0, the encoder just before it, vision blocks before that and the final norm just
    after 1.
    """
    if (layer := llm_layer(stage)) is not None:
        return layer / max(num_llm_layers, 1)
    if (block := vision_block(stage)) is not None:
        return -0.45 + 0.2 * block / max(num_vision_layers, 1)
    return {ENCODER: -0.15, ADAPTER: 0.0, FINAL_NORM: 1.06}.get(stage, 1.12)


def summarise(stages: Sequence[str]) -> str:
    """``"vision.1..vision.24, encoder, adapter, llm.1..llm.32, llm.final_norm"``."""
    vision = [s for s in stages if vision_block(s) is not None]
    llm = by_depth(stages)
    parts = []
    if vision:
        parts.append(f"vision.1..vision.{len(vision)}")
    parts += [s for s in (ENCODER, ADAPTER) if s in stages]
    if llm:
        parts.append(f"llm.1..llm.{len(llm)}")
    if FINAL_NORM in stages:
        parts.append(FINAL_NORM)
    return ", ".join(parts)
