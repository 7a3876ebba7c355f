"""The model-family interface: everything that differs between VLM architectures lives behind it.

A family knows its HF model class, where the vision blocks, the adapter (projector), the decoder
blocks and the final norm are, which vision layer feeds the adapter, where the image tokens sit
in the sequence and how they map onto the (g, g) grid. Code outside ``seglens.models`` only talks
to this interface; each family is one module of ``seglens.models.families`` (adapter, tiny
builder, registration), collected by ``seglens.models.registry``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class Tap:
    """Where a stage is read in the forward pass.

    Attributes:
        module: the module to hook.
        read: ``"input"`` (first positional argument, forward pre-hook) or ``"output"``.
        select: how (B, T_module, D) becomes (B, N, D): ``"all"`` (already the N patch tokens),
            ``"patches"`` (drop the leading non-patch tokens of the vision sequence, e.g. CLS),
            ``"image_positions"`` (gather the batch's image-token positions in the LLM sequence)
            or ``"fn"`` (``fn`` maps the module's tensor to (B, N, D) in raster order: token
            layouts that are not raster, e.g. 2x2-merged or tiled patches).
        fn: the reduction for ``select="fn"``; None otherwise.
    """

    module: nn.Module
    read: str
    select: str
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None


def contiguous_image_positions(input_ids: torch.Tensor, token_id: int, count: int) -> torch.Tensor:
    """(B, T) ids -> (B, count) positions of ``token_id``, in sequence order.

    Raises:
        ValueError: a row does not hold exactly ``count`` such tokens.
    """
    is_image = input_ids == token_id
    counts = is_image.sum(dim=1)
    if (counts != count).any():
        raise ValueError(
            f"every sequence needs exactly {count} image tokens (id {token_id}); found "
            f"{counts.tolist()}. Build inputs with vlm.prepare()."
        )
    # Stable sort puts image positions first, in sequence order.
    order = torch.sort((~is_image).to(torch.int8), dim=1, stable=True).indices
    return order[:, :count]


def vision_blocks(tower: nn.Module, num_layers: int) -> nn.ModuleList:
    """The vision tower's list of transformer blocks (``encoder.layers`` or ``encoder.layer``)."""
    for module in tower.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise ValueError(f"could not find {num_layers} vision blocks in {type(tower).__name__}")


def fixed_image_size(config, default: int, unit: int) -> int:
    """S, the one square side a native-resolution family runs at: ``config.seglens_image_size``
    or ``default``; it must be a multiple of ``unit`` (patch x spatial merge).

    Raises:
        ValueError: S is not a multiple of ``unit`` (the message names a size that is).
    """
    size = int(getattr(config, "seglens_image_size", None) or default)
    if size % unit:
        raise ValueError(
            f"image size {size} must be a multiple of patch*merge = {unit} "
            f"(set config.seglens_image_size to e.g. {unit * max(1, size // unit)})"
        )
    return size


class ModelFamily:
    """Adapter for one VLM family.

    Subclasses fill in the class attributes, set ``_grid`` in ``__init__`` and provide
    ``stage_taps`` and ``forward``; the other facts default to the layout the supported HF
    families share (``model.model`` with a ``language_model``, ``vision_config.hidden_size``
    wide vision stages, image tokens in raster order) and are overridden where a family differs.
    """

    name: ClassVar[str]
    # The HF ``config.model_type`` values this adapter serves: the registry is built from them.
    model_types: ClassVar[tuple[str, ...]]
    description: ClassVar[str]
    # Registry name -> keyword arguments of ``build_tiny`` (and ``family_options``): the seeded
    # tiny models of this family (``load_model("tiny-...")``). Read from the class's own body.
    tiny_models: ClassVar[dict[str, dict]] = {}
    # False where the HF processor cannot be built here (Qwen2-VL's needs torchvision):
    # load_model then uses tokenizer + image-processor config (models/processing.py).
    hf_processor: ClassVar[bool] = True

    # The vision config's block count (Qwen2-VL calls it ``depth``).
    vision_layers_key: ClassVar[str] = "num_hidden_layers"

    @staticmethod
    def build_tiny(**kwargs) -> tuple[nn.Module, object]:
        """A seeded random tiny HF model of this family and its processor (no download).

        Keyword arguments: ``seed``, ``attn_implementation``, ``dtype`` and builder sizes.
        """
        raise NotImplementedError

    def __init__(self, model: nn.Module):
        self.model = model
        # Every HF VLM here nests a vision and a text config and keeps its vision tower, projector
        # and language model in ``model.model``; subclasses set ``_grid`` in their ``__init__``.
        self._vision_cfg = model.config.vision_config
        self._text_cfg = model.config.text_config
        self._inner = model.model
        self._grid: tuple[int, int] | None = None

    # --- architecture facts -------------------------------------------------------------------
    @property
    def num_vision_layers(self) -> int:
        return int(getattr(self._vision_cfg, self.vision_layers_key))

    @property
    def num_llm_layers(self) -> int:
        return int(self._text_cfg.num_hidden_layers)

    @property
    def grid(self) -> tuple[int, int]:
        """(g_rows, g_cols) of the image-token grid used for probing."""
        if self._grid is None:
            raise NotImplementedError(f"{type(self).__name__}.__init__ must set self._grid")
        return self._grid

    @property
    def num_image_tokens(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def num_placeholder_tokens(self) -> int:
        """Image placeholder tokens per sequence (more than N when some are never probed)."""
        return self.num_image_tokens

    @property
    def native_image_attention(self) -> str:
        """How image tokens attend to each other in the unmodified model.

        ``"causal"`` (LLaVA, Qwen2-VL: image slot i reads slots <= i), ``"bidirectional"``
        (Gemma3: the image block is fully connected) or ``"prefix"`` (PaliGemma: the whole prefix,
        image tokens and prompt text, is fully connected; see ``prefix_mask``). For a
        bidirectional or prefix family the bidirectional experiment's ``causal`` condition is the
        intervention (``CausalImage``) and ``bidirectional_image`` is the plain model;
        ``intervene`` starts from the native block (``BidirectionalImage`` /
        ``BidirectionalPrefix``), so an empty spec is the plain model.
        """
        return "causal"

    def prefix_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and 2D padding mask -> (B, T) bool: the tokens of the prefix.

        The prefix is what a prefix-LM (PaliGemma) attends to bidirectionally: every real token
        before the generation suffix. seglens sequences end at the generation prompt (no
        suffix), so by default it is every real (unpadded) token. ``BidirectionalPrefix`` and
        ``CausalPrefix`` act on it (``Batch.prefix_mask``).
        """
        return attention_mask.bool()

    def prompt_ids(self, text: str, processor) -> list[int] | None:
        """Token ids for one image + ``text`` when the family has its own layout; None: render
        the processor's chat template and expand the placeholder (``loading._wrap``)."""
        return None

    @property
    def image_size(self) -> int:
        """S, the side of the square model input the geometry produces."""
        return int(self.model.config.vision_config.image_size)

    @property
    def patch_size(self) -> int:
        """Side in pixels of one vision-encoder patch."""
        return int(self.model.config.vision_config.patch_size)

    def image_placeholder(self, processor) -> str:
        """The string the chat template renders where the image goes."""
        return getattr(processor, "image_token", "<image>")

    def expand_image_placeholder(self, text: str, processor) -> str:
        """Rendered chat text -> the same text with the placeholder expanded as the processor does.

        Default: one image token per placeholder token (LLaVA-1.5, Qwen2-VL, LLaVA-NeXT).
        """
        token = self.image_placeholder(processor)
        return text.replace(token, token * self.num_placeholder_tokens)

    def geometry_mode(self, image_config: dict) -> str | None:
        """The geometry (``pad``/``crop``/``resize``) the processor applies; None: infer it from
        ``do_pad``/``do_center_crop`` in ``image_config`` (``loading.geometry_from_processor``)."""
        return None

    def decoder_layers(self) -> nn.ModuleList:
        return self._inner.language_model.layers

    def stage_taps(self) -> dict[str, Tap]:
        """Every stage this family offers, in forward order, with where to read it."""
        raise NotImplementedError

    def llm_taps(self) -> dict[str, Tap]:
        """``llm.{l}`` (decoder layer outputs) and ``llm.final_norm``, at the image positions."""
        taps = {
            f"llm.{i + 1}": Tap(layer, "output", "image_positions")
            for i, layer in enumerate(self.decoder_layers())
        }
        taps["llm.final_norm"] = Tap(self._inner.language_model.norm, "output", "image_positions")
        return taps

    @property
    def vision_stage_width(self) -> int:
        """Width of the ``vision.{i}`` stages as read (after the tap's reduction)."""
        return int(self._vision_cfg.hidden_size)

    @property
    def encoder_width(self) -> int:
        """Width of the ``encoder`` stage (the projector's input)."""
        return self.vision_stage_width

    def stage_widths(self) -> dict[str, int]:
        """Stage name -> D, in forward order: ``adapter`` and ``llm.*`` have the LLM's width."""
        dv, dt = self.vision_stage_width, int(self._text_cfg.hidden_size)
        widths = {f"vision.{i + 1}": dv for i in range(self.num_vision_layers)}
        widths["encoder"] = self.encoder_width
        widths["adapter"] = dt
        widths.update({f"llm.{i + 1}": dt for i in range(self.num_llm_layers)})
        widths["llm.final_norm"] = dt
        return widths

    # --- readouts (the logit and embedding lens) ---------------------------------------------
    def final_norm(self) -> nn.Module:
        """The LLM's final norm, between the last decoder block and the LM head."""
        return self.llm_taps()["llm.final_norm"].module

    def unembedding(self) -> nn.Module | None:
        """The LM head (a Linear from the LLM width to the vocabulary), None when there is none.

        Tied or not, HF exposes it as ``get_output_embeddings()``.
        """
        return self.model.get_output_embeddings()

    def input_embeddings(self) -> nn.Module:
        """The token embedding table (its ``weight`` is (V, D); Gemma scales its output by
        sqrt(D), which a cosine readout does not see)."""
        return self.model.get_input_embeddings()

    @property
    def logit_softcap(self) -> float | None:
        """c of the final logit soft-capping ``c * tanh(z / c)`` (Gemma 2), None when off."""
        cap = getattr(self._text_cfg, "final_logit_softcapping", None)
        return float(cap) if cap else None

    # --- sequence layout ----------------------------------------------------------------------
    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, N) sequence positions of the grid tokens in raster order.

        Default: the N image-token positions in sequence order, one token per grid slot in
        raster order (LLaVA-1.5, Gemma3, PaliGemma, Qwen2-VL).
        """
        return contiguous_image_positions(input_ids, self.image_token_id, self.num_image_tokens)

    def pixel_inputs(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) pixels -> the HF model's image inputs. Default: ``pixel_values`` as is
        (families that tile or pack images override it)."""
        return {"pixel_values": pixel_values}

    def forward(self, input_ids, pixel_values, attention_mask, **kwargs):
        """One forward pass that stops before the LM head (no vocabulary logits).

        Default: the inner model's own forward on ``pixel_inputs(pixel_values)``, without a
        KV cache. Families whose masks or inputs need more override it.
        """
        return self._inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            **self.pixel_inputs(pixel_values),
            **kwargs,
        )
