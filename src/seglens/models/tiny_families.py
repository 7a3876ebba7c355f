"""Seeded tiny models of more families (Gemma3, LLaVA-NeXT, PaliGemma) built from configs.

Like ``tiny.py`` for LLaVA-1.5: real HF processors, random weights, no download, a byte-level
fast tokenizer that carries each family's special tokens and a chat template in the family's
format (PaliGemma has none), and the family's own (PIL) image processor, so ``save_pretrained`` +
``load_model`` exercise the real code paths.
"""

from __future__ import annotations

import torch

from seglens.models.tiny import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    build_seeded,
    byte_tokenizer,
    llava_processor,
    special_byte_tokenizer,
    text_kwargs,
    vision_kwargs,
)
from seglens.models.tiny_qwen import tiny_qwen2_vl_hf

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


def tiny_llava_next_hf(
    *,
    image_size: int = 112,
    patch_size: int = 14,
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None,
    vision_width: int = 48,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``LlavaNextForConditionalGeneration`` (CLIP tower) and its processor.

    ``grid_pinpoints`` defaults to the one resolution (S, S): an S x S input then has one tile, so
    the sequence is the base g x g tokens, then g rows of g tile tokens each closed by a newline.

    Returns:
        (model, processor): the HF model in eval mode and a ``LlavaNextProcessor``.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    pinpoints = [list(p) for p in (grid_pinpoints or ((image_size, image_size),))]
    tokenizer = byte_tokenizer()
    vision_config = CLIPVisionConfig(
        **vision_kwargs(vision_width, vision_layers, heads, image_size, patch_size)
    )
    text_config = LlamaConfig(**text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads))
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(LlavaNextForConditionalGeneration, config, seed, dtype)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = llava_processor(
        LlavaNextProcessor, image_processor, tokenizer, patch_size, "default", 1
    )
    return model, processor


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


def tiny_qwen2_5_vl(**kwargs):
    """``tiny_qwen.tiny_qwen2_vl_hf`` with ``version="2.5"``."""
    return tiny_qwen2_vl_hf(version="2.5", **kwargs)


TINY_BUILDERS = {
    "gemma3": tiny_gemma3_hf,
    "llava_next": tiny_llava_next_hf,
    "qwen2_vl": tiny_qwen2_vl_hf,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "paligemma": tiny_paligemma_hf,
}
