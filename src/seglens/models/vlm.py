"""The model wrapper all analyses use: ``vlm.prepare`` builds inputs, ``vlm.capture`` reads stages.

A ``VLM`` holds the HF model, its family adapter, its geometry and normalisation, and the prompt
encoder. ``load_model`` and ``tiny_llava`` both return one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from seglens.capture import capture_stages
from seglens.data.base import Sample
from seglens.data.geometry import Geometry, Transform
from seglens.data.preprocess import Prepared, Preprocessor
from seglens.models.base import ModelFamily

DEFAULT_PROMPT = "Describe the image."


@dataclass
class Batch:
    """Model inputs for B images plus what scoring needs.

    Attributes:
        input_ids: (B, T) right-padded token ids, N image placeholders per row.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        pixel_values: (B, 3, S, S) normalised pixels.
        image_positions: (B, N) sequence positions of the image tokens, raster order.
        labels: (B, N) int64 token labels (255 = ignore), or None.
        hist: (B, N, C) int32 token class histograms, or None.
        transforms: per-image geometry, for mapping predictions back to the original pixels.
        masks: per-image original (H, W) label maps, or None.
        images: per-image original (H, W, 3) uint8 images.
        names: per-image identifiers.
        prefix_mask: (B, T) bool, the prefix a prefix-LM reads bidirectionally (PaliGemma: image,
            BOS, prompt, separator; ``ModelFamily.prefix_mask``); None means every real token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_positions: torch.Tensor
    labels: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    transforms: list[Transform] = field(default_factory=list)
    masks: list[np.ndarray] | None = None
    images: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    prefix_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def text_positions(self) -> torch.Tensor:
        """(B, T) bool: real (unpadded) tokens that are not image tokens."""
        is_image = torch.zeros_like(self.attention_mask, dtype=torch.bool)
        is_image.scatter_(1, self.image_positions, True)
        return self.attention_mask.bool() & ~is_image


class VLM:
    """A vision-language model ready for stage capture.

    Attributes:
        model: the HF model (``LlavaForConditionalGeneration`` ...).
        family: the adapter hiding module paths and token layout.
        geometry: image/mask geometry (mode and input size S).
        mean, std: normalisation from the processor config.
        prompt: the text after the image in the chat template.
        name: how the model was asked for (hub id, path or tiny name).
    """

    def __init__(
        self,
        model: nn.Module,
        family: ModelFamily,
        *,
        geometry: Geometry,
        mean: Sequence[float],
        std: Sequence[float],
        encode_prompt: Callable[[str], list[int]],
        pad_token_id: int,
        prompt: str = DEFAULT_PROMPT,
        name: str = "",
        patch_size: int,
    ):
        self.model = model
        self.family = family
        self.geometry = geometry
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.prompt = prompt
        self.name = name
        self.patch_size = patch_size
        self.pad_token_id = pad_token_id
        self._encode_prompt = encode_prompt
        self._prompt_cache: dict[str, list[int]] = {}
        # Set by seglens.intervene(): maps a batch to the 4D mask every layer should see.
        self.attention_mask_override: Callable[[Batch], torch.Tensor] | None = None
        # Set by seglens.analyses.order.measure.reorder(): maps a batch to the (B, N) sequence
        # positions of its grid tokens in raster order once the image tokens are reordered.
        self.token_positions: Callable[[Batch], torch.Tensor] | None = None

    # --- facts ----------------------------------------------------------------------------------
    @property
    def stages(self) -> list[str]:
        """Every stage name this model offers, in forward order."""
        return list(self.family.stage_taps())

    @property
    def default_stages(self) -> list[str]:
        """``encoder``, ``adapter`` and ``llm.1..L`` (vision blocks are opt-in)."""
        return ["encoder", "adapter"] + [f"llm.{i + 1}" for i in range(self.num_llm_layers)]

    @property
    def grid(self) -> tuple[int, int]:
        return self.family.grid

    @property
    def num_image_tokens(self) -> int:
        return self.family.num_image_tokens

    @property
    def num_llm_layers(self) -> int:
        return self.family.num_llm_layers

    @property
    def image_token_id(self) -> int:
        return self.family.image_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def attn_implementation(self) -> str:
        return self.model.config.text_config._attn_implementation

    def info(self) -> dict:
        """A JSON-friendly description: stages, widths, grid, geometry, normalisation."""
        widths = self.family.stage_widths()
        return {
            "name": self.name,
            "family": self.family.name,
            "grid": list(self.grid),
            "num_image_tokens": self.num_image_tokens,
            "image_size": self.geometry.size,
            "patch_size": self.patch_size,
            "geometry": self.geometry.mode,
            "mean": list(self.mean),
            "std": list(self.std),
            "prompt": self.prompt,
            "image_token_id": self.image_token_id,
            "num_llm_layers": self.num_llm_layers,
            "num_vision_layers": self.family.num_vision_layers,
            "attn_implementation": self.attn_implementation,
            "native_image_attention": getattr(self.family, "native_image_attention", "causal"),
            "dtype": str(self.dtype).removeprefix("torch."),
            "stages": {s: widths[s] for s in self.stages},
        }

    # --- inputs ---------------------------------------------------------------------------------
    def preprocessor(self, num_classes: int = 0, min_valid: float = 0.5) -> Preprocessor:
        """The picklable per-sample transform (run it in loader workers)."""
        return Preprocessor(
            geometry=self.geometry,
            mean=self.mean,
            std=self.std,
            grid=self.grid[0],
            num_classes=num_classes,
            min_valid=min_valid,
        )

    def token_ids(self, prompt: str | None = None) -> list[int]:
        """The full chat-template token ids for one prompt, with N image placeholders."""
        prompt = self.prompt if prompt is None else prompt
        if prompt not in self._prompt_cache:
            ids = list(self._encode_prompt(prompt))
            n = sum(i == self.image_token_id for i in ids)
            if n != self.family.num_placeholder_tokens:
                raise ValueError(
                    f"the prompt encodes {n} image tokens, the model needs "
                    f"{self.family.num_placeholder_tokens}"
                )
            self._prompt_cache[prompt] = ids
        return self._prompt_cache[prompt]

    def collate(self, prepared: Sequence[Prepared], prompts: Sequence[str] | None = None) -> Batch:
        """Stack preprocessed samples and add right-padded token ids (prompts may differ)."""
        if not prepared:
            raise ValueError("collate() got no samples")
        prompts = [None] * len(prepared) if prompts is None else list(prompts)
        if len(prompts) != len(prepared):
            raise ValueError(f"{len(prompts)} prompts for {len(prepared)} images")
        ids = [self.token_ids(p) for p in prompts]
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), T), dtype=torch.long)
        for b, row in enumerate(ids):
            input_ids[b, : len(row)] = torch.tensor(row)
            attention_mask[b, : len(row)] = 1
        has_masks = all(p.labels is not None for p in prepared)
        return Batch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.stack([p.pixel_values for p in prepared]),
            image_positions=self.family.image_positions(input_ids),
            labels=torch.stack([p.labels for p in prepared]) if has_masks else None,
            hist=torch.stack([p.hist for p in prepared]) if has_masks else None,
            transforms=[p.transform for p in prepared],
            masks=[p.mask for p in prepared] if has_masks else None,
            images=[p.image for p in prepared],
            names=[p.name for p in prepared],
            prefix_mask=self.family.prefix_mask(input_ids, attention_mask),
        )

    def prepare(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        num_classes: int | None = None,
    ) -> Batch:
        """Images (H, W, 3) uint8 and optional masks (H, W) -> a ``Batch`` in the model's frame.

        ``num_classes`` defaults to one more than the largest label seen.
        """
        if masks is not None and len(masks) != len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images")
        if masks is not None and num_classes is None:
            num_classes = 1 + max(int(m[m != 255].max(initial=0)) for m in masks)
        pre = self.preprocessor(num_classes or 0)
        samples = [
            Sample(np.asarray(img), None if masks is None else np.asarray(masks[i]), str(i))
            for i, img in enumerate(images)
        ]
        return self.collate([pre(s) for s in samples], prompts)

    # --- capture --------------------------------------------------------------------------------
    def capture(
        self, batch: Batch, stages: Sequence[str] | None = None, *, full_pass: bool = False
    ) -> dict[str, torch.Tensor]:
        """One forward pass -> ``{stage: (B, N, D)}`` for the requested stages (default all LLM).

        Inside ``seglens.intervene(...)`` the active attention interventions apply.
        """
        stages = self.default_stages if stages is None else stages
        device = self.device

        def to_device(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            # To a GPU: pinned and non-blocking, so the host never waits for the copy.
            if device.type == "cuda" and t.device.type == "cpu":
                t = (t if dtype is None else t.to(dtype)).pin_memory()
            return t.to(device, dtype, non_blocking=True)

        mask = to_device(batch.attention_mask)
        if self.attention_mask_override is not None:
            mask = self.attention_mask_override(batch)
        positions = batch.image_positions
        if self.token_positions is not None:  # LLM stages come back in raster token order
            positions = self.token_positions(batch)
        return capture_stages(
            self.family,
            input_ids=to_device(batch.input_ids),
            pixel_values=to_device(batch.pixel_values, self.dtype),
            attention_mask=mask,
            image_positions=to_device(positions),
            stages=stages,
            full_pass=full_pass,
        )
