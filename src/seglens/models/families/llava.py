"""LLaVA-1.5 family (HF ``LlavaForConditionalGeneration``) with CLIP, SigLIP or DINOv2 towers.

The adapter reads the vision feature the projector consumes (``vision_feature_layer`` with the
CLS token dropped per ``vision_feature_select_strategy``) from the projector's own input, so it is
exactly what the model uses whatever the layer setting; image tokens are the positions where
``input_ids == image_token_id``, one per patch in raster order.
"""

from __future__ import annotations

from torch import nn

from seglens.models.base import ModelFamily, Tap, vision_blocks


class LlavaFamily(ModelFamily):
    name = "llava"
    model_types = ("llava",)
    description = "LLaVA-1.5 (LlavaForConditionalGeneration; CLIP, SigLIP or DINOv2 vision tower)"

    def __init__(self, model: nn.Module):
        super().__init__(model)  # _inner: LlavaModel (vision_tower, projector, language_model)
        side = self._vision_cfg.image_size // self._vision_cfg.patch_size
        self._grid = (side, side)

    @property
    def encoder_width(self) -> int:
        # The projector reads the concatenation of the vision_feature_layer(s).
        layer = self.model.config.vision_feature_layer
        return self.vision_stage_width * (1 if isinstance(layer, int) else len(layer))

    def stage_taps(self) -> dict[str, Tap]:
        blocks = vision_blocks(self._inner.vision_tower, self.num_vision_layers)
        projector = self._inner.multi_modal_projector
        taps = {
            f"vision.{i + 1}": Tap(block, "output", "patches") for i, block in enumerate(blocks)
        }
        taps["encoder"] = Tap(projector, "input", "all")
        taps["adapter"] = Tap(projector, "output", "all")
        return {**taps, **self.llm_taps()}

    def forward(self, input_ids, pixel_values, attention_mask, **kwargs):
        return self._inner(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            use_cache=False,
            **kwargs,
        )
