"""What every seeded tiny model shares: a byte-level tokenizer, config sizes, seeded construction.

The tiny builders (one per family, next to the family's adapter in ``models/families/``) build a
random HF model from configs and a real HF processor (no download), so that ``save_pretrained``
and ``load_model`` on the saved folder exercise the code paths of real checkpoints, only small
enough for a 2-core CPU.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

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
    return wrap_tokenizer(core, named, chat_template, others=others)


def wrap_tokenizer(
    core, named: dict[str, str], chat_template: str, *, others: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """A ``tokenizers.Tokenizer`` whose vocabulary starts <pad>, <s>, </s>, <unk> as a
    ``PreTrainedTokenizerFast``: those four as its pad/bos/eos/unk, each ``named`` token an
    atomic special token and an attribute (``tok.image_token``), ``others`` atomic too, and the
    chat template."""
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
