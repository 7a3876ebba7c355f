"""Gemma3 family (HF ``Gemma3ForConditionalGeneration``): SigLIP, pooled tokens, bidirectional.

The projector average-pools the SigLIP patch grid (64x64 at 896 px) to ``mm_tokens_per_image``
tokens (16x16) in raster order, RMS-normalises and projects them. ``encoder`` is the pooled
vision feature the projector's norm consumes, and ``vision.{i}`` are block outputs pooled with the
projector's own kernel, so every stage lives on the (g, g) token grid. Image tokens attend to each
other bidirectionally in the unmodified model (HF builds that block from ``token_type_ids``, which
``forward`` derives from the image token id); ``native_image_attention`` says so.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from seglens.models.base import ModelFamily, Tap, vision_blocks
from seglens.models.tiny import build_seeded, special_byte_tokenizer, text_kwargs, vision_kwargs


class Gemma3Family(ModelFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    description = (
        "Gemma3 (Gemma3ForConditionalGeneration; SigLIP, pooled tokens, bidirectional image block)"
    )
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-gemma3": {}}

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_gemma3_hf(**kwargs)

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


GEMMA3_TEMPLATE = (
    "{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}


def _init_gemma3_projector(model) -> None:
    # HF initialises the projection to zeros (checkpoints overwrite it): images would vanish.
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    weight.normal_(0.0, weight.shape[0] ** -0.5)


def tiny_gemma3_hf(
    *,
    image_size: int = 224,
    patch_size: int = 14,
    tokens_per_side: int = 8,
    vision_width: int = 48,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    sliding_window: int = 512,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``Gemma3ForConditionalGeneration`` and its ``Gemma3Processor``.

    The SigLIP tower sees (S/p)^2 patches; the projector average-pools them to
    ``tokens_per_side``^2 image tokens, as Gemma3 pools 64x64 patches to 16x16 tokens. Layers
    alternate sliding-window and full attention (the window exceeds any tiny sequence).

    Returns:
        (model, processor): the HF model in eval mode and its processor.
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    patches = image_size // patch_size
    if image_size % patch_size or patches % tokens_per_side:
        raise ValueError(
            f"image_size {image_size} must be a multiple of patch_size {patch_size}, and the "
            f"{patches} patches per side a multiple of tokens_per_side {tokens_per_side}"
        )
    tokenizer = special_byte_tokenizer(
        GEMMA3_TOKENS, GEMMA3_TEMPLATE, others=("<start_of_turn>", "<end_of_turn>")
    )
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in GEMMA3_TOKENS.items()}
    head_dim = text_width // heads
    text_config = Gemma3TextConfig(
        **text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads),
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        sliding_window_pattern=2,
    )
    vision_config = SiglipVisionConfig(
        **vision_kwargs(vision_width, vision_layers, heads, image_size, patch_size)
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=tokens_per_side**2,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(
        Gemma3ForConditionalGeneration, config, seed, dtype, init=_init_gemma3_projector
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_TEMPLATE,
        image_seq_length=tokens_per_side**2,
    )
    return model, processor
