"""The organism's architecture: a LLaVA-1.5-shaped model small enough to train on a CPU.

A per-patch CLIP tower (every attention output projection is zero and frozen, so no patch sees
another: any context must come from the LLM), LLaVA's GELU MLP adapter with a bottleneck into a
narrower LLM, and a small Llama with a word-level vocabulary. The result is a plain
``LlavaForConditionalGeneration`` with a ``LlavaProcessor``: nothing about it is special to seglens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from seglens.data.organism import PATCH, SIZE, vocabulary
from seglens.models.tiny import (
    CHAT_TEMPLATE,
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_TOKEN,
    build_seeded,
    llava_processor,
    text_kwargs,
    wrap_tokenizer,
)

#: Words of the default prompt and the LLaVA-1.5 conversation format.
TEMPLATE_WORDS = ("USER:", "ASSISTANT:", "Describe", "the", "image.")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)


@dataclass(frozen=True)
class Architecture:
    """Sizes of the organism (defaults: the recipe of ``shared/ORGANISM.md``)."""

    vision_width: int = 256  # CLIP tower width
    vision_layers: int = 3  # tower blocks; the adapter reads the penultimate one
    vision_heads: int = 4
    text_width: int = 64  # Llama width: the adapter maps 256 -> 64 (the bottleneck)
    text_layers: int = 4
    text_heads: int = 4  # 2 KV heads


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4, template and caption words.

    Words are split on whitespace; any other word is ``<unk>``. ``<s>`` is prepended on encoding.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = [*SPECIALS, *TEMPLATE_WORDS, *vocabulary()]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return wrap_tokenizer(core, {"image_token": IMAGE_TOKEN}, CHAT_TEMPLATE)


def per_patch(tower: torch.nn.Module) -> None:
    """Zero and freeze every attention output projection of a CLIP tower (no patch mixing)."""
    for layer in tower.encoder.layers:
        out = layer.self_attn.out_proj
        with torch.no_grad():
            out.weight.zero_()
            out.bias.zero_()
        out.weight.requires_grad_(False)
        out.bias.requires_grad_(False)


def patch_states(tower: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """The hidden states of a per-patch tower's patch tokens, without its (zero) attention.

    Equals ``tower(pixels, output_hidden_states=True).hidden_states`` with CLS dropped (a test
    pins it): with a zero output projection each block adds only its MLP, so skipping attention
    halves the cost of training the tower.

    Returns:
        Lv + 1 tensors of shape (B, N, Dv): the block inputs, then each block's output.
    """
    hidden = tower.pre_layrnorm(tower.embeddings(pixels)[:, 1:])
    states = [hidden]
    for layer in tower.encoder.layers:
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        states.append(hidden)
    return states


def build_organism(arch: Architecture = Architecture(), seed: int = 0):
    """A freshly initialised organism (fp32, eval mode) and its processor.

    Returns:
        (model, processor): ``LlavaForConditionalGeneration`` and ``LlavaProcessor``.
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = word_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_width,
        intermediate_size=2 * arch.vision_width,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        **text_kwargs(len(tokenizer), arch.text_width, arch.text_layers, arch.text_heads)
    )
    grid = SIZE // PATCH
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    model = build_seeded(
        LlavaForConditionalGeneration,
        config,
        seed,
        torch.float32,
        init=lambda m: per_patch(m.model.vision_tower),
    )
    per_patch(model.model.vision_tower)  # freeze (build_seeded zeroed them under no_grad)
    image_processor = CLIPImageProcessorPil(
        size={"height": SIZE, "width": SIZE},
        do_center_crop=False,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = llava_processor(LlavaProcessor, image_processor, tokenizer, PATCH, "default", 1)
    return model, processor


def pixel_values(images, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(B, 64, 64, 3) uint8 numpy -> (B, 3, 64, 64) float32, normalised like the processor."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
