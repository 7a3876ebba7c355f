"""Idefics3 / SmolVLM families (HF ``Idefics3ForConditionalGeneration``; SmolVLM 2:
``SmolVLMForConditionalGeneration``, the same modules and layout): SigLIP, pixel shuffle.

The connector pixel-shuffles the (S/p, S/p) SigLIP patch grid by ``scale_factor`` s: each s x s
unit of patches becomes one token (its s^2 patch features concatenated in (row, col, channel)
order), the tokens in raster order of the (S/sp, S/sp) grid, then a linear projection. seglens
feeds the whole image as one S x S crop (S = the tower's ``image_size``), the layout of the
processor with ``do_image_splitting=False``: ``<fake_token_around_image><global-img>`` + N
``<image>`` + ``<fake_token_around_image>``. The wrapper tokens stay in the sequence and are never
probed. (With splitting, HF adds high-resolution tiles before the global image; seglens probes the
global image and always builds the unsplit layout.) Idefics3 drops input images whose normalised
pixels are all exactly 0 (its batch padding), so such an image is refused.

Stages: ``vision.{i}`` (SigLIP block i) and ``encoder`` (the connector input: post-layernorm)
pixel-shuffled as the connector does; ``adapter`` = connector output = LLM input embeddings at
the image positions. The LLM (Llama) attends causally.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from seglens.models.base import ModelFamily, Tap
from seglens.models.processing import TextImageProcessor
from seglens.models.tiny import build_seeded, special_byte_tokenizer, text_kwargs, vision_kwargs

IDEFICS3_TOKENS = {
    "image_token": "<image>",
    "fake_image_token": "<fake_token_around_image>",
    "global_image_token": "<global-img>",
}
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def shuffle_units(h: torch.Tensor, side: int, scale: int) -> torch.Tensor:
    """(B, side^2, D) patches in raster order -> (B, (side/s)^2, s^2 D) as ``pixel_shuffle``.

    Merged cells in raster order; index ``i * s * D + j * D + d`` holds channel d of the patch at
    row i, column j of the cell's s x s unit.
    """
    D, g = h.shape[-1], side // scale
    x = h.reshape(-1, g, scale, g, scale, D)  # (B, gr, i, gc, j, D)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, g * g, scale * scale * D)


class Idefics3Family(ModelFamily):
    name = "idefics3"
    model_types = ("idefics3",)  # SmolVLM checkpoints use this model type too
    description = (
        "Idefics3 / SmolVLM (Idefics3ForConditionalGeneration; SigLIP, pixel shuffle; the global "
        "image probed, unsplit layout)"
    )
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-idefics3": {}}

    @staticmethod
    def build_tiny(**kwargs):
        return tiny_idefics3_hf(**kwargs)

    def __init__(self, model: nn.Module):
        super().__init__(model)  # _inner: Idefics3Model (vision_model, connector, text_model)
        self._scale = int(model.config.scale_factor)
        self._patches = self.image_size // self.patch_size
        side, rest = divmod(self._patches, self._scale)
        if rest or self.image_size % self.patch_size:
            raise ValueError(
                f"Idefics3: image_size {self.image_size} / patch_size {self.patch_size} must be a "
                f"multiple of scale_factor {self._scale}"
            )
        self._grid = (side, side)

    @property
    def vision_stage_width(self) -> int:
        return int(self._vision_cfg.hidden_size) * self._scale**2

    def decoder_layers(self) -> nn.ModuleList:
        return self._inner.text_model.layers

    def llm_taps(self) -> dict[str, Tap]:
        taps = {
            f"llm.{i + 1}": Tap(layer, "output", "image_positions")
            for i, layer in enumerate(self.decoder_layers())
        }
        taps["llm.final_norm"] = Tap(self._inner.text_model.norm, "output", "image_positions")
        return taps

    def expand_image_placeholder(self, text: str, processor) -> str:
        # Idefics3Processor.replace_image_token for an unsplit image (rows = cols = 0).
        token = self.image_placeholder(processor)
        fake, glob = IDEFICS3_TOKENS["fake_image_token"], IDEFICS3_TOKENS["global_image_token"]
        return text.replace(token, f"{fake}{glob}{token * self.num_image_tokens}{fake}")

    def geometry_mode(self, image_config: dict) -> str | None:
        return "resize"  # one S x S crop (the processor resizes to its longest edge)

    def _shuffle(self, h: torch.Tensor) -> torch.Tensor:
        return shuffle_units(h, self._patches, self._scale)

    def stage_taps(self) -> dict[str, Tap]:
        vision = self._inner.vision_model
        connector = self._inner.connector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "fn", self._shuffle)
            for i, block in enumerate(vision.encoder.layers)
        }
        taps["encoder"] = Tap(connector, "input", "fn", self._shuffle)
        taps["adapter"] = Tap(connector, "output", "all")
        return {**taps, **self.llm_taps()}

    def pixel_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) pixels -> HF's ``pixel_values`` (B, 1, 3, S, S) (one image per row).

        Raises:
            ValueError: an image whose pixels are all 0 (Idefics3 would drop it as padding).
        """
        empty = (pixel_values == 0).flatten(1).all(1)
        if empty.any():
            raise ValueError(
                f"images {empty.nonzero().flatten().tolist()} of the batch are all 0 after "
                "normalisation; Idefics3 drops such images as batch padding. Use another image"
            )
        return {"pixel_values": pixel_values[:, None]}


class SmolVLMFamily(Idefics3Family):
    """SmolVLM 2 (``SmolVLMForConditionalGeneration``): Idefics3's modules and token layout."""

    name = "smolvlm"
    model_types = ("smolvlm",)
    description = (
        "SmolVLM 2 (SmolVLMForConditionalGeneration; Idefics3's layout: SigLIP, pixel shuffle, "
        "the global image probed, unsplit layout)"
    )
    hf_processor = False  # SmolVLMProcessor needs torchvision (its video processor)
    tiny_models: ClassVar[dict[str, dict]] = {"tiny-smolvlm": {"kind": "smolvlm"}}


def tiny_idefics3_hf(
    *,
    image_size: int = 168,
    patch_size: int = 14,
    scale_factor: int = 2,
    kind: str = "idefics3",
    vision_width: int = 48,
    vision_layers: int = 4,
    text_width: int = 64,
    text_layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Build a random ``Idefics3ForConditionalGeneration`` and its ``Idefics3Processor``.

    SigLIP sees (S/p)^2 patches; pixel shuffle by ``scale_factor`` gives (S/(s p))^2 image tokens.
    The image processor does not split images (``do_image_splitting=False``). ``kind="smolvlm"``
    builds ``SmolVLMForConditionalGeneration`` instead, with a ``TextImageProcessor`` around the
    SmolVLM image processor (``SmolVLMProcessor`` needs torchvision).

    Returns:
        (model, processor): the HF model in eval mode and its processor.
    """
    import transformers

    if kind not in ("idefics3", "smolvlm"):
        raise ValueError(f"kind {kind!r} is not one of 'idefics3', 'smolvlm'")
    prefix = "Idefics3" if kind == "idefics3" else "SmolVLM"
    config_cls = getattr(transformers, f"{prefix}Config")
    model_cls = getattr(transformers, f"{prefix}ForConditionalGeneration")
    vision_cls = getattr(transformers, f"{prefix}VisionConfig")
    if kind == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as ImageProcessor,
        )
    else:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as ImageProcessor,
        )
    from transformers import LlamaConfig

    if image_size % (patch_size * scale_factor):
        raise ValueError(f"image_size {image_size} must be a multiple of patch * scale_factor")
    tokenizer = special_byte_tokenizer(
        IDEFICS3_TOKENS, IDEFICS3_TEMPLATE, others=("<end_of_utterance>", "<|im_start|>")
    )
    vision_config = vision_cls(
        **vision_kwargs(vision_width, vision_layers, heads, image_size, patch_size)
    )
    text_config = LlamaConfig(**text_kwargs(len(tokenizer) + 8, text_width, text_layers, heads))
    config = config_cls(
        vision_config=vision_config,
        text_config=text_config,
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(IDEFICS3_TOKENS["image_token"]),
    )
    config._attn_implementation = attn_implementation
    model = build_seeded(model_cls, config, seed, dtype)
    image_processor = ImageProcessor(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    if kind == "smolvlm":
        token = IDEFICS3_TOKENS["image_token"]
        return model, TextImageProcessor(tokenizer, image_processor, token, IDEFICS3_TEMPLATE)
    from transformers import Idefics3Processor

    seq_len = (image_size // (patch_size * scale_factor)) ** 2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=seq_len,
        chat_template=IDEFICS3_TEMPLATE,
    )
    return model, processor
