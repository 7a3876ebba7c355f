"""Seeded tiny LLaVA models built from configs: random weights, no download, a real HF processor.

They exercise exactly the code paths of real checkpoints (a byte-level fast tokenizer with a
LLaVA-1.5 chat template, a CLIP-style image processor config, ``save_pretrained`` and
``load_model`` on the saved folder), only small enough for a 2-core CPU. The pieces every tiny
builder shares (tokenizer, config sizes, seeded construction) live here too.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

VISIONS = ("clip", "siglip", "dinov2")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"

# LLaVA-1.5's conversation format: "USER: <image>\n{prompt} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def special_byte_tokenizer(
    named: dict[str, str],
    chat_template: str,
    *,
    others: tuple[str, ...] = (),
    add_bos: bool = True,
) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (no merges): <pad>=0, <s>=1, </s>=2, <unk>=3, bytes, then specials.

    Args:
        named: attribute -> token (e.g. ``{"image_token": "<image>"}``); each becomes an atomic
            special token and a tokenizer attribute (``tok.image_token``, ``tok.image_token_id``).
        chat_template: the Jinja chat template.
        others: more atomic special tokens without an attribute (turn markers).
        add_bos: prepend <s> when encoding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=dict(named),
    )
    tok.add_special_tokens({"additional_special_tokens": [*named.values(), *others]})
    tok.chat_template = chat_template
    return tok


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The LLaVA-1.5 byte-level tokenizer: <pad>=0, <s>=1, </s>=2, <unk>=3, bytes, <image>."""
    return special_byte_tokenizer({"image_token": IMAGE_TOKEN}, CHAT_TEMPLATE)


def text_kwargs(vocab_size: int, width: int, layers: int, heads: int) -> dict:
    """The sizes and special ids every tiny LLM config shares (MLP 2x wide, heads/2 KV heads)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def vision_kwargs(width: int, layers: int, heads: int, image_size: int, patch_size: int) -> dict:
    """The sizes every tiny ViT config (CLIP, SigLIP, DINOv2) shares (MLP 2x wide)."""
    return dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
    )


def build_seeded(model_cls, config, seed: int, dtype: torch.dtype, init=None):
    """``model_cls(config)`` in eval mode and ``dtype``, its weights drawn from ``seed``.

    The construction (and ``init(model)``, under ``no_grad``) runs under a private RNG, so the
    global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if init is not None:
            with torch.no_grad():
                init(model)
    return model.to(dtype).eval()


def llava_processor(
    processor_cls, image_processor, tokenizer, patch_size: int, strategy: str, extra: int
):
    """A LLaVA-style processor (``LlavaProcessor``, ``LlavaNextProcessor``), LLaVA chat template.

    Args:
        strategy: ``vision_feature_select_strategy`` (``default`` drops the CLS token).
        extra: tokens the tower adds before the patches (1 for a CLS token).
    """
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=extra,
    )


def tiny_llava_hf(
    vision: str = "clip",
    *,
    image_size: int = 224,
    patch_size: int = 14,
    vision_width: int = 48,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random LlavaForConditionalGeneration and its processor (no download).

    Returns:
        (model, processor): the HF model in eval mode and a ``LlavaProcessor``.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    if vision not in VISIONS:
        raise ValueError(f"tiny vision tower {vision!r} is not one of {VISIONS}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    tokenizer = byte_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    common = vision_kwargs(vision_width, vision_layers, heads, image_size, patch_size)
    if vision == "clip":
        vision_config, strategy, extra = CLIPVisionConfig(**common), "default", 1
    elif vision == "siglip":
        vision_config, strategy, extra = SiglipVisionConfig(**common), "full", 0
    else:
        common.pop("intermediate_size")
        vision_config, strategy, extra = Dinov2Config(mlp_ratio=2, **common), "default", 1
    text_config = LlamaConfig(**text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads))
    grid = image_size // patch_size
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=grid * grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(LlavaForConditionalGeneration, config, seed, dtype)
    if vision == "siglip":
        image_processor = CLIPImageProcessorPil(
            size={"height": image_size, "width": image_size},
            do_center_crop=False,
            image_mean=(0.5, 0.5, 0.5),
            image_std=(0.5, 0.5, 0.5),
        )
    else:
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
        )
    processor = llava_processor(
        LlavaProcessor, image_processor, tokenizer, patch_size, strategy, extra
    )
    return model, processor
