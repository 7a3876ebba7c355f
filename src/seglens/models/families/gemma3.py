"""Gemma3 family (HF ``Gemma3ForConditionalGeneration``): SigLIP, pooled tokens, bidirectional.

The projector average-pools the SigLIP patch grid (64x64 at 896 px) to ``mm_tokens_per_image``
tokens (16x16) in raster order, RMS-normalises and projects them. ``encoder`` is the pooled
vision feature the projector's norm consumes, and ``vision.{i}`` are block outputs pooled with the
projector's own kernel, so every stage lives on the (g, g) token grid. Image tokens attend to each
other bidirectionally in the unmodified model (HF builds that block from ``token_type_ids``, which
``forward`` derives from the image token id); ``native_image_attention`` says so.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from seglens.models.base import ModelFamily, Tap, vision_blocks


class Gemma3Family(ModelFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    description = (
        "Gemma3 (Gemma3ForConditionalGeneration; SigLIP, pooled tokens, bidirectional image block)"
    )

    def __init__(self, model: nn.Module):
        super().__init__(model)  # _inner: Gemma3Model (vision_tower, projector, language_model)
        cfg = model.config
        side = round(cfg.mm_tokens_per_image**0.5)
        if side * side != cfg.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image {cfg.mm_tokens_per_image} is not a square")
        self._grid = (side, side)
        self._patches = self._vision_cfg.image_size // self._vision_cfg.patch_size

    @property
    def native_image_attention(self) -> str:
        return "bidirectional"

    def expand_image_placeholder(self, text: str, processor) -> str:
        # boi -> "\n\n" + boi + N image tokens + eoi + "\n\n", as Gemma3Processor expands it.
        return text.replace(processor.boi_token, processor.full_image_sequence)

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        """(B, P, D) SigLIP patches in raster order -> (B, N, D) pooled like the projector."""
        B, _, D = h.shape
        side = self._patches
        grid = h.transpose(1, 2).reshape(B, D, side, side)
        kernel = side // self._grid[0]
        return F.avg_pool2d(grid, kernel, kernel).flatten(2).transpose(1, 2)

    def stage_taps(self) -> dict[str, Tap]:
        blocks = vision_blocks(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "fn", self._pool)
            for i, block in enumerate(blocks)
        }
        taps["encoder"] = Tap(projector.mm_soft_emb_norm, "input", "all")
        taps["adapter"] = Tap(projector, "output", "all")
        return {**taps, **self.llm_taps()}

    def forward(self, input_ids, pixel_values, attention_mask, **kwargs):
        """The native forward; a 4D ``attention_mask`` replaces every layer's mask as given.

        Raises:
            ValueError: a 4D mask on a sequence longer than the sliding window (the sliding layers
                would silently see more than the model was trained with).
        """
        window = getattr(self._text_cfg, "sliding_window", None)
        sliding = "sliding_attention" in (self._text_cfg.layer_types or ())
        if attention_mask.ndim == 4 and sliding and window and input_ids.shape[1] > window:
            raise ValueError(
                f"a custom 4D attention mask on Gemma3 needs sequences of at most sliding_window="
                f"{window} tokens (got {input_ids.shape[1]}); shorten the prompt"
            )
        # token_type_ids = 1 on image tokens: HF makes the image block bidirectional from it.
        token_type_ids = (input_ids == self.image_token_id).long()
        return self._inner(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            use_cache=False,
            **kwargs,
        )
