"""LLaVA-1.5 family (HF ``LlavaForConditionalGeneration``) with CLIP, SigLIP or DINOv2 towers.

The adapter reads the vision feature the projector consumes (``vision_feature_layer`` with the
CLS token dropped per ``vision_feature_select_strategy``) from the projector's own input, so it is
exactly what the model uses whatever the layer setting; image tokens are the positions where
``input_ids == image_token_id``, one per patch in raster order.
"""

from __future__ import annotations

import torch
from torch import nn

from seglens.models.base import ModelFamily, Tap


def _block_list(tower: nn.Module, num_layers: int) -> nn.ModuleList:
    """The vision tower's list of transformer blocks (``encoder.layers`` or ``encoder.layer``)."""
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"could not find {num_layers} vision blocks in {type(tower).__name__}")


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    description = "LLaVA-1.5 (LlavaForConditionalGeneration; CLIP, SigLIP or DINOv2 vision tower)"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cfg = model.config
        self._vision_cfg = cfg.vision_config
        self._text_cfg = cfg.text_config
        side = self._vision_cfg.image_size // self._vision_cfg.patch_size
        self._grid = (side, side)
        self._inner = model.model  # LlavaModel: vision_tower, multi_modal_projector, language_model

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

    def decoder_layers(self) -> nn.ModuleList:
        return self._inner.language_model.layers

    def stage_taps(self) -> dict[str, Tap]:
        blocks = _block_list(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "patches") for i, block in enumerate(blocks)
        }
        taps["encoder"] = Tap(projector, "input", "all")
        taps["adapter"] = Tap(projector, "output", "all")
        for i, layer in enumerate(self.decoder_layers()):
            taps[f"llm.{i + 1}"] = Tap(layer, "output", "image_positions")
        taps["llm.final_norm"] = Tap(self._inner.language_model.norm, "output", "image_positions")
        return taps

    def stage_widths(self) -> dict[str, int]:
        dv, dt = self._vision_cfg.hidden_size, self._text_cfg.hidden_size
        layer = self.model.config.vision_feature_layer
        n_feature_layers = 1 if isinstance(layer, int) else len(layer)
        widths = {f"vision.{i + 1}": dv for i in range(self.num_vision_layers)}
        widths["encoder"] = dv * n_feature_layers
        widths["adapter"] = dt
        widths.update({f"llm.{i + 1}": dt for i in range(self.num_llm_layers)})
        widths["llm.final_norm"] = dt
        return widths

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        counts = is_image.sum(dim=1)
        if (counts != self.num_image_tokens).any():
            raise ValueError(
                f"every sequence needs exactly {self.num_image_tokens} image tokens "
                f"(id {self.image_token_id}); found {counts.tolist()}. "
                "Build inputs with vlm.prepare()."
            )
        # Stable sort puts image positions first, in sequence (= raster) order.
        order = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices
        return order[:, : self.num_image_tokens]

    def forward(self, input_ids, pixel_values, attention_mask, **kwargs):
        return self._inner(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            use_cache=False,
            **kwargs,
        )
