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

from seglens.models.base import ModelFamily, Tap
from seglens.models.llava import _block_list


def contiguous_image_positions(input_ids: torch.Tensor, token_id: int, count: int) -> torch.Tensor:
    """(B, T) ids -> (B, count) positions of ``token_id``, in sequence order.

    Raises:
        ValueError: a row does not hold exactly ``count`` such tokens.
    """
    is_image = input_ids == token_id
    counts = is_image.sum(dim=1)
    if (counts != count).any():
        raise ValueError(
            f"every sequence needs exactly {count} image tokens (id {token_id}); found "
            f"{counts.tolist()}. Build inputs with vlm.prepare()."
        )
    # Stable sort puts image positions first, in sequence order.
    order = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices
    return order[:, :count]


class Gemma3Family(ModelFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    description = (
        "Gemma3 (Gemma3ForConditionalGeneration; SigLIP, pooled tokens, bidirectional image block)"
    )

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        self._vision_cfg = cfg.vision_config
        self._text_cfg = cfg.text_config
        side = round(cfg.mm_tokens_per_image**0.5)
        if side * side != cfg.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image {cfg.mm_tokens_per_image} is not a square")
        self._grid = (side, side)
        self._patches = self._vision_cfg.image_size // self._vision_cfg.patch_size
        self._inner = model.model  # Gemma3Model: vision_tower, projector, language_model

    @property
    def num_vision_layers(self) -> int:
        return self._vision_cfg.num_hidden_layers

    @property
    def num_llm_layers(self) -> int:
        return self._text_cfg.num_hidden_layers

    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def native_image_attention(self) -> str:
        return "bidirectional"

    def expand_image_placeholder(self, text: str, processor) -> str:
        # boi -> "\n\n" + boi + N image tokens + eoi + "\n\n", as Gemma3Processor expands it.
        return text.replace(processor.boi_token, processor.full_image_sequence)

    def decoder_layers(self) -> nn.ModuleList:
        return self._inner.language_model.layers

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        """(B, P, D) SigLIP patches in raster order -> (B, N, D) pooled like the projector."""
        B, _, D = h.shape
        side = self._patches
        grid = h.transpose(1, 2).reshape(B, D, side, side)
        kernel = side // self._grid[0]
        return F.avg_pool2d(grid, kernel, kernel).flatten(2).transpose(1, 2)

    def stage_taps(self) -> dict[str, Tap]:
        blocks = _block_list(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "fn", self._pool)
            for i, block in enumerate(blocks)
        }
        taps["encoder"] = Tap(projector.mm_soft_emb_norm, "input", "all")
        taps["adapter"] = Tap(projector, "output", "all")
        for i, layer in enumerate(self.decoder_layers()):
            taps[f"llm.{i + 1}"] = Tap(layer, "output", "image_positions")
        taps["llm.final_norm"] = Tap(self._inner.language_model.norm, "output", "image_positions")
        return taps

    def stage_widths(self) -> dict[str, int]:
        dv, dt = self._vision_cfg.hidden_size, self._text_cfg.hidden_size
        widths = {f"vision.{i + 1}": dv for i in range(self.num_vision_layers)}
        widths["encoder"] = dv
        widths["adapter"] = dt
        widths.update({f"llm.{i + 1}": dt for i in range(self.num_llm_layers)})
        widths["llm.final_norm"] = dt
        return widths

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return contiguous_image_positions(input_ids, self.image_token_id, self.num_image_tokens)

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
