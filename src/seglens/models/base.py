"""The model-family interface: everything that differs between VLM architectures lives behind it.

A family knows its HF model class, where the vision blocks, the adapter (projector), the decoder
blocks and the final norm are, which vision layer feeds the adapter, where the image tokens sit
in the sequence and how they map onto the (g, g) grid. Code outside ``seglens.models`` only talks
to this interface, so LLaVA-NeXT or Qwen2-VL style families slot in without touching it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Tap:
    """Where a stage is read in the forward pass.

    Attributes:
        module: the module to hook.
        read: ``"input"`` (first positional argument, forward pre-hook) or ``"output"``.
        select: how (B, T_module, D) becomes (B, N, D): ``"all"`` (already the N patch tokens),
            ``"patches"`` (drop the leading non-patch tokens of the vision sequence, e.g. CLS) or
            ``"image_positions"`` (gather the batch's image-token positions in the LLM sequence).
    """

    module: nn.Module
    read: str
    select: str


class ModelFamily:
    """Adapter for one VLM family. Subclasses fill in the class attributes and the methods."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    description: ClassVar[str]

    def __init__(self, model: nn.Module):
        self.model = model

    # --- architecture facts -------------------------------------------------------------------
    @property
    def num_vision_layers(self) -> int:
        raise NotImplementedError

    @property
    def num_llm_layers(self) -> int:
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        """(g_rows, g_cols) of the image-token grid used for probing."""
        raise NotImplementedError

    @property
    def num_image_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def stage_taps(self) -> dict[str, Tap]:
        """Every stage this family offers, in forward order, with where to read it."""
        raise NotImplementedError

    def stage_widths(self) -> dict[str, int]:
        raise NotImplementedError

    # --- sequence layout ----------------------------------------------------------------------
    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, N) sequence positions of the grid tokens in raster order."""
        raise NotImplementedError

    def forward(self, input_ids, pixel_values, attention_mask, **kwargs):
        """One forward pass that stops before the LM head (no vocabulary logits)."""
        raise NotImplementedError
