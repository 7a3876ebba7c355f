"""PaliGemma family (HF ``PaliGemmaForConditionalGeneration``): SigLIP, linear projector, Gemma.

The SigLIP tower's final (post-layernorm) patch grid, (S/p)^2 tokens in raster order, goes through
one linear layer into the Gemma (PaliGemma 2: Gemma2) LLM; there is no CLS token and no pooling, so
every stage lives on the (S/p, S/p) grid. The sequence is the processor's
``<image> * N + <bos> + prompt + "\\n"``: no chat template. PaliGemma is a prefix-LM: the whole
prefix (image tokens *and* prompt text) attends bidirectionally, a generated suffix causally; HF
builds that block from ``token_type_ids`` (0 = prefix) via ``block_sequence_ids``, and ``forward``
derives them from ``prefix_mask`` as the processor does (all zeros without a suffix).
``native_image_attention`` is therefore ``"prefix"``.

Without ``token_type_ids`` HF's attention depends on padding (transformers 5.23, sdpa): an
unpadded batch skips the mask and runs fully bidirectional (``use_bidirectional_attention``), a
padded one gets a causal mask. seglens always passes them, so a row's states do not depend on
its batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seglens.models.base import ModelFamily, Tap, vision_blocks
from seglens.models.tiny import build_seeded, special_byte_tokenizer, text_kwargs, vision_kwargs


class PaliGemmaFamily(ModelFamily):
    name = "paligemma"
    model_types = ("paligemma",)
    description = (
        "PaliGemma 1/2 (PaliGemmaForConditionalGeneration; SigLIP, linear projector, Gemma; "
        "bidirectional prefix: image + prompt)"
    )
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-paligemma": {}}

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_paligemma_hf(**kwargs)

    def __init__(self, model: nn.Module):
        super().__init__(model)  # _inner: PaliGemmaModel (vision_tower, projector, language_model)
        side, rest = divmod(self._vision_cfg.image_size, self._vision_cfg.patch_size)
        if rest:
            raise ValueError(
                f"PaliGemma image_size {self._vision_cfg.image_size} is not a multiple of "
                f"patch_size {self._vision_cfg.patch_size}"
            )
        self._grid = (side, side)

    @property
    def native_image_attention(self) -> str:
        return "prefix"

    def image_placeholder(self, processor) -> str:
        return getattr(processor, "image_token", None) or "<image>"

    def prompt_ids(self, text: str, processor) -> list[int]:
        """``<image> * N + <bos> + text + "\\n"``, tokenised without added specials.

        This is ``PaliGemmaProcessor``'s layout for one image before ``text`` (its tokenizer adds
        neither BOS nor EOS).
        """
        tokenizer = processor.tokenizer
        image = self.image_placeholder(processor) * self.num_placeholder_tokens
        rendered = f"{image}{tokenizer.bos_token}{text}\n"
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def stage_taps(self) -> dict[str, Tap]:
        blocks = vision_blocks(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {f"vision.{i + 1}": Tap(block, "output", "all") for i, block in enumerate(blocks)}
        taps["encoder"] = Tap(projector, "input", "all")  # the tower's post-layernorm patches
        taps["adapter"] = Tap(projector, "output", "all")
        return {**taps, **self.llm_taps()}

    def forward(self, input_ids, pixel_values, attention_mask, **kwargs):
        """The native forward; a 4D ``attention_mask`` replaces every layer's mask as given.

        With a 2D padding mask, ``token_type_ids`` are 0 on the prefix (``prefix_mask``) and 1
        elsewhere, so HF builds the bidirectional prefix block itself. A 4D mask already holds
        the prefix block (``intervene`` adds ``BidirectionalPrefix``) and HF uses it unchanged.

        Raises:
            ValueError: a 4D mask on a sequence longer than PaliGemma 2's sliding window (its
                sliding layers would silently see more than the model was trained with).
        """
        window = getattr(self._text_cfg, "sliding_window", None)
        if attention_mask.ndim == 4 and window and input_ids.shape[1] > window:
            raise ValueError(
                f"a custom 4D attention mask on PaliGemma 2 needs sequences of at most "
                f"sliding_window={window} tokens (got {input_ids.shape[1]}); shorten the prompt"
            )
        token_type_ids = None
        if attention_mask.ndim == 2:
            token_type_ids = (~self.prefix_mask(input_ids, attention_mask)).long()
        return self._inner(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            use_cache=False,
            **kwargs,
        )


def tiny_paligemma_hf(
    *,
    image_size: int = 112,
    patch_size: int = 14,
    vision_width: int = 48,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    text: str = "gemma",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``PaliGemmaForConditionalGeneration`` and its ``PaliGemmaProcessor``.

    SigLIP (no head) sees (S/p)^2 patches, one image token each; a linear projector feeds a Gemma
    LLM (``text="gemma2"``: PaliGemma 2's Gemma2, sliding window beyond any tiny sequence). The
    tokenizer adds no BOS itself: the processor places it after the image tokens. The processor
    adds PaliGemma's 1024 ``<loc>`` and 128 ``<seg>`` tokens, so the vocabulary is sized after it.

    Returns:
        (model, processor): the HF model in eval mode and its processor.
    """
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    if text not in ("gemma", "gemma2"):
        raise ValueError(f"text={text!r}: PaliGemma's LLM is 'gemma' (PaliGemma) or 'gemma2'")
    tokenizer = special_byte_tokenizer({"image_token": "<image>"}, "", add_bos=False)
    image_processor = SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    image_processor.image_seq_length = (image_size // patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    vocab = len(tokenizer) + 8
    sizes = dict(text_kwargs(vocab, text_width, text_layers, heads), head_dim=text_width // heads)
    if text == "gemma2":
        from transformers import Gemma2Config

        text_config = Gemma2Config(
            **sizes, sliding_window=512, query_pre_attn_scalar=text_width // heads
        )
    else:
        text_config = GemmaConfig(**sizes)
    vision_config = SiglipVisionConfig(
        **vision_kwargs(vision_width, vision_layers, heads, image_size, patch_size),
        vision_use_head=False,
    )
    config = PaliGemmaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=processor.image_token_id,
        projection_dim=text_width,
        hidden_size=text_width,
        vocab_size=vocab,
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(PaliGemmaForConditionalGeneration, config, seed, dtype)
    return model, processor
