"""One forward pass -> the requested stages' image-token states, and nothing else.

Forward hooks read each requested stage at its module (see ``ModelFamily.stage_taps``), reduce it
to the N image tokens at once, and the pass stops right after the last requested stage, so
unrequested layers are neither computed nor held and no vocabulary logits are ever formed.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING

import torch

from seglens.stages import summarise

if TYPE_CHECKING:  # models import capture; keep the import one-way at run time
    from seglens.models.base import ModelFamily, Tap


class _StopForward(Exception):
    """Raised by the hook of the last requested stage to end the forward pass early."""


def check_stages(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Validate stage names; return them in forward order without duplicates."""
    unknown = [s for s in requested if s not in available]
    if unknown:
        hints = []
        for s in unknown:
            close = difflib.get_close_matches(s, available, n=1)
            hints.append(f"{s!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown stage {', '.join(hints)}. This model has: {summarise(available)}."
        )
    if not requested:
        raise ValueError("no stages requested; ask for e.g. ['encoder', 'adapter', 'llm.1']")
    return [s for s in available if s in set(requested)]


def _selector(tap: Tap, num_tokens: int, positions: torch.Tensor) -> Callable:
    if tap.select == "all":
        return lambda h: h
    if tap.select == "patches":
        return lambda h: h[:, h.shape[1] - num_tokens :]
    if tap.select == "image_positions":

        def gather(h: torch.Tensor) -> torch.Tensor:
            index = positions.to(h.device)[..., None].expand(-1, -1, h.shape[-1])
            return h.gather(1, index)

        return gather
    if tap.select == "fn":
        return tap.fn
    raise ValueError(f"unknown tap selection {tap.select!r}")


def capture_stages(
    family: ModelFamily,
    *,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor,
    image_positions: torch.Tensor,
    stages: Sequence[str],
    full_pass: bool = False,
) -> dict[str, torch.Tensor]:
    """Run one forward pass and return ``{stage: (B, N, D)}`` for the requested stages.

    Args:
        family: the model adapter.
        input_ids: (B, T) token ids with N image placeholders per row.
        pixel_values: (B, 3, S, S).
        attention_mask: (B, T) padding mask, or a 4D mask for the LLM's attention backend.
        image_positions: (B, N) sequence positions of the image tokens in raster order.
        stages: stage names (see ``vlm.stages``).
        full_pass: run to the end even after the last requested stage.

    Returns:
        Detached tensors in the model's dtype, on the device of the module that produced them.
    """
    taps = family.stage_taps()
    ordered = check_stages(stages, list(taps))
    last = ordered[-1]
    num_tokens = family.num_image_tokens
    out: dict[str, torch.Tensor] = {}

    def make_hook(stage: str, tap: Tap):
        select = _selector(tap, num_tokens, image_positions)

        def store(value: torch.Tensor) -> None:
            out[stage] = select(value).detach()
            if stage == last and not full_pass:
                raise _StopForward

        if tap.read == "input":
            return tap.module.register_forward_pre_hook(lambda _m, args: store(args[0]))
        return tap.module.register_forward_hook(
            lambda _m, _args, output: store(output[0] if isinstance(output, tuple) else output)
        )

    with ExitStack() as stack:
        for stage in ordered:
            stack.callback(make_hook(stage, taps[stage]).remove)
        try:
            with torch.inference_mode():
                family.forward(input_ids, pixel_values, attention_mask)
        except _StopForward:
            pass
    missing = [stage for stage in ordered if stage not in out]
    if missing:
        raise RuntimeError(
            f"stage(s) {', '.join(missing)} were not computed in this forward: their modules did "
            "not run (inside seglens.prefix.SharedPrefix the image features and the layers "
            "before a window are reused, not recomputed); capture them outside it"
        )
    return {stage: out[stage] for stage in ordered}
