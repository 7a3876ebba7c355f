"""Gemma3: the independent HF path and the patch-grid plant for the shared family tests.

SigLIP's patch grid is average-pooled by the projector to the token grid; the reference pools
the tower's own hidden states with an independent ``avg_pool2d``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from family_checks import llm_reference


def gemma3_reference(vlm, batch) -> dict[str, torch.Tensor]:
    """Every stage from HF's own outputs: hidden_states, get_image_features, the tower's states."""
    model, inner = vlm.model, vlm.model.model
    token_type_ids = (batch.input_ids == model.config.image_token_id).long()  # as the processor
    ref = llm_reference(
        vlm,
        batch,
        input_ids=batch.input_ids,
        pixel_values=batch.pixel_values,
        attention_mask=batch.attention_mask,
        token_type_ids=token_type_ids,
    )
    with torch.no_grad():
        tower = inner.vision_tower(batch.pixel_values, output_hidden_states=True)
        adapter = inner.get_image_features(batch.pixel_values).pooler_output
    patches = model.config.vision_config.image_size // model.config.vision_config.patch_size
    kernel = patches // vlm.grid[0]

    def pool(h):  # (B, P, D) -> (B, N, D): the projector's pooling, done independently
        B, _, D = h.shape
        grid = h.permute(0, 2, 1).reshape(B, D, patches, patches)
        return F.avg_pool2d(grid, kernel).reshape(B, D, -1).permute(0, 2, 1)

    hidden = tower.hidden_states
    ref.update({f"vision.{i}": pool(hidden[i]) for i in range(1, len(hidden))})
    ref["encoder"] = pool(tower.last_hidden_state)
    ref["adapter"] = adapter
    return ref


def gemma3_plant(vlm, r: int, c: int, batch_size: int):
    """Add 10 to every SigLIP post-layernorm patch of token cell (r, c)."""
    vision = vlm.model.config.vision_config
    side = vision.image_size // vision.patch_size
    g_rows, g_cols = vlm.grid

    def plant(_m, _a, out):
        grid = out.clone().view(out.shape[0], side, side, out.shape[-1])
        pr, pc = side // g_rows, side // g_cols
        grid[:, r * pr : (r + 1) * pr, c * pc : (c + 1) * pc] += 10.0
        return grid.reshape(out.shape)

    return vlm.model.model.vision_tower.post_layernorm.register_forward_hook(plant)


REFERENCES = {"gemma3": gemma3_reference}
PLANTS = {"gemma3": gemma3_plant}
