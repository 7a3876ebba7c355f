"""Attention interventions: specs (plain data) -> a 4D mask per layer -> ``intervene(vlm, specs)``.

Edge convention, stated once for the whole package: an edge is **query -> key**, read as "query i
may read key j". A mask entry ``[b, 0, i, j]`` is that edge for sequence ``b``; knockouts remove
edges, ``BidirectionalImage`` adds image -> later-image edges, ``BidirectionalPrefix`` prefix ->
later-prefix edges (a prefix-LM such as PaliGemma). Everything starts from the causal,
padding-aware mask a causal LLM would build, and a real query always keeps itself and the first
real token (BOS), so no row is ever empty.

Token sets are data too: ``"image"``, ``"text"`` (real non-image tokens) and ``"all"`` (real
tokens), explicit per-image image-slot indices (``TokenSet.from_slots``), or any other name,
resolved at build time from ``sets={name: (B, N) bool tensor}`` (e.g. "tokens the probe gets
right at the adapter"). Image slots are 0..N-1 in raster order, as in ``Batch.image_positions``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from seglens.models.vlm import VLM, Batch

NAMED_SETS = ("image", "text", "all")
BACKENDS = ("sdpa", "eager")


# --- specs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenSet:
    """A set of tokens, per sequence of the batch. Give exactly one of ``name`` and ``slots``.

    Attributes:
        name: ``"image"``, ``"text"``, ``"all"``, or a name looked up in the ``sets`` mapping
            passed to ``build_attention_mask`` / ``intervene`` (a (B, N) bool tensor there).
        slots: per image of the batch, the image-slot indices (0..N-1) in the set; a single
            entry applies to every image.
    """

    name: str | None = None
    slots: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.slots is None):
            raise ValueError(
                f"TokenSet needs exactly one of name= and slots= (got name={self.name!r}, "
                f"slots={self.slots!r}); e.g. TokenSet('image') or TokenSet.from_slots([3, 4])"
            )
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"TokenSet name must be a non-empty string, got {self.name!r}")
        if self.slots is not None:
            ok = isinstance(self.slots, tuple) and all(
                isinstance(s, tuple) and all(isinstance(i, int) and i >= 0 for i in s)
                for s in self.slots
            )
            if not ok or not self.slots:
                raise ValueError(
                    "TokenSet slots must be a non-empty tuple (one per image) of tuples of "
                    f"non-negative ints, got {self.slots!r}; use TokenSet.from_slots(...)"
                )

    @classmethod
    def from_slots(cls, *per_image: Iterable[int]) -> TokenSet:
        """One iterable of image-slot indices per image (one alone applies to every image)."""
        return cls(slots=tuple(tuple(sorted({int(i) for i in s})) for s in per_image))

    @classmethod
    def from_mask(cls, mask: torch.Tensor | np.ndarray) -> TokenSet:
        """A (B, N) bool array over image slots -> the equivalent explicit ``TokenSet``."""
        rows = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask)
        if rows.ndim != 2 or rows.dtype != bool:
            raise ValueError(f"from_mask needs a (B, N) bool array, got {rows.dtype} {rows.shape}")
        return cls(slots=tuple(tuple(int(i) for i in np.flatnonzero(r)) for r in rows))


TokenSetLike = TokenSet | str


def _check_layers(layers: tuple[int, ...] | None, spec: str) -> None:
    if layers is None:
        return
    if not isinstance(layers, tuple) or not layers or not all(isinstance(x, int) for x in layers):
        raise ValueError(
            f"{spec}: layers must be None (all layers) or a non-empty tuple of 1-based LLM layer "
            f"numbers, got {layers!r}; e.g. layers=(3, 4) or layers=tuple(range(5, 9))"
        )


@dataclass(frozen=True, kw_only=True)
class Knockout:
    """Queries in ``queries`` may not read keys in ``keys`` (except themselves and BOS).

    Attributes:
        keys: the tokens no longer readable (e.g. ``TokenSet.from_slots(...)`` or ``"image"``).
        queries: the tokens that lose them (default ``"all"``; causality already limits a key's
            readers to later tokens).
        later_only: block only edges whose query comes after its key in the sequence. Under
            causal attention this changes nothing; in a natively bidirectional image block
            (Gemma3, PaliGemma) it keeps earlier queries reading the key.
        layers: 1-based LLM layer numbers it applies to; None = every layer.
    """

    keys: TokenSetLike
    queries: TokenSetLike = "all"
    later_only: bool = False
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_layers(self.layers, "Knockout")


@dataclass(frozen=True, kw_only=True)
class BidirectionalImage:
    """Image tokens may read every image token (all other edges stay causal).

    Attributes:
        layers: 1-based LLM layer numbers it applies to; None = every layer.
    """

    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_layers(self.layers, "BidirectionalImage")


@dataclass(frozen=True, kw_only=True)
class CausalImage:
    """Image tokens may read no later token: image slot i reads only what precedes it.

    Undoes ``BidirectionalImage`` (image -> later image) and, on a prefix-LM, the image ->
    later-prompt edges of ``BidirectionalPrefix`` too, so the image tokens' states are those of a
    causal LLM (prompt tokens stay as they are). A no-op on a causal model by itself; it wins over
    both widenings on the same layer.

    Attributes:
        layers: 1-based LLM layer numbers it applies to; None = every layer.
    """

    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_layers(self.layers, "CausalImage")


@dataclass(frozen=True, kw_only=True)
class BidirectionalPrefix:
    """Prefix tokens may read every prefix token (all other edges stay causal).

    The prefix is ``Batch.prefix_mask`` (image tokens and the prompt: every real token of a
    seglens sequence; see ``ModelFamily.prefix_mask``). This is PaliGemma's native attention;
    ``intervene`` adds it for families whose ``native_image_attention`` is ``"prefix"``.

    Attributes:
        layers: 1-based LLM layer numbers it applies to; None = every layer.
    """

    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_layers(self.layers, "BidirectionalPrefix")


@dataclass(frozen=True, kw_only=True)
class CausalPrefix:
    """Prefix tokens may read only earlier prefix tokens (undoes ``BidirectionalPrefix``).

    With it a prefix-LM (PaliGemma) runs as the plain causal LLM; as the image tokens lie in the
    prefix it also undoes ``BidirectionalImage``. Wins over both widenings on the same layer.

    Attributes:
        layers: 1-based LLM layer numbers it applies to; None = every layer.
    """

    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_layers(self.layers, "CausalPrefix")


Spec = Knockout | BidirectionalImage | CausalImage | BidirectionalPrefix | CausalPrefix
SPEC_TYPES = (Knockout, BidirectionalImage, CausalImage, BidirectionalPrefix, CausalPrefix)


# --- checks -------------------------------------------------------------------------------------
def check_backend(attn_implementation: str) -> None:
    """Raise unless the attention backend honours a dense custom 4D mask (sdpa, eager)."""
    if attn_implementation not in BACKENDS:
        raise ValueError(
            f"attention backend {attn_implementation!r} does not honour seglens' custom 4D masks; "
            "load the model with attn_implementation='sdpa' (or 'eager')"
        )


def _token_sets(spec: Spec) -> list[TokenSetLike]:
    return [spec.queries, spec.keys] if isinstance(spec, Knockout) else []


def _as_token_set(value: TokenSetLike) -> TokenSet:
    if isinstance(value, TokenSet):
        return value
    if isinstance(value, str):
        return TokenSet(name=value)
    raise TypeError(f"a token set is a TokenSet or a name, got {type(value).__name__}: {value!r}")


def check_specs(
    specs: Sequence[Spec],
    *,
    num_layers: int | None = None,
    sets: Mapping[str, torch.Tensor] | None = None,
    num_tokens: int | None = None,
) -> None:
    """Validate specs before any forward: types, layer range, token-set names, ``sets`` shapes.

    Args:
        specs: the interventions.
        num_layers: L, the number of LLM layers (layers must lie in 1..L); None skips the check.
        sets: named (B, N) bool image-slot sets the specs may refer to.
        num_tokens: N, image tokens per image; None skips the width check of ``sets``.
    """
    sets = {} if sets is None else sets
    for name, value in sets.items():
        if name in NAMED_SETS:
            raise ValueError(f"sets may not redefine the built-in set {name!r}; rename it")
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.ndim != 2:
            raise ValueError(f"sets[{name!r}] must be a (B, N) bool tensor, got {_describe(value)}")
        if num_tokens is not None and value.shape[1] != num_tokens:
            raise ValueError(
                f"sets[{name!r}] has {value.shape[1]} image slots; this model has {num_tokens}"
            )
    known = [*NAMED_SETS, *sets]
    for spec in specs:
        if not isinstance(spec, SPEC_TYPES):
            raise TypeError(
                f"not an intervention spec: {spec!r}; use Knockout, BidirectionalImage, "
                "CausalImage, BidirectionalPrefix or CausalPrefix"
            )
        for layer in spec.layers or ():
            if num_layers is not None and not 1 <= layer <= num_layers:
                raise ValueError(
                    f"{type(spec).__name__} asks for layer {layer}, but this model has "
                    f"{num_layers} LLM layers; layers are 1-based: 1..{num_layers}"
                )
        for value in _token_sets(spec):
            token_set = _as_token_set(value)
            if token_set.name is not None and token_set.name not in known:
                raise _unknown_set(token_set.name, known)


def _unknown_set(name: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(
        f"unknown token set {name!r}{hint}; known: {', '.join(known)}. "
        "Pass custom (B, N) bool sets with sets={name: tensor}"
    )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__


# --- masks --------------------------------------------------------------------------------------
def slots_to_mask(
    per_image: Sequence[Iterable[int]], num_tokens: int, batch_size: int | None = None
) -> torch.Tensor:
    """Per-image image-slot indices -> (B, N) bool mask over image slots.

    Args:
        per_image: one iterable of slot indices (0..N-1) per image; one alone is broadcast.
        num_tokens: N, image tokens per image.
        batch_size: B; default ``len(per_image)``.

    Returns:
        (B, N) bool tensor, True at the given slots.
    """
    batch_size = len(per_image) if batch_size is None else batch_size
    if len(per_image) not in (1, batch_size):
        raise ValueError(f"{len(per_image)} per-image slot sets for a batch of {batch_size}")
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool)
    for b in range(batch_size):
        idx = list(per_image[b if len(per_image) > 1 else 0])
        bad = [i for i in idx if not 0 <= i < num_tokens]
        if bad:
            raise ValueError(f"image slots {bad} out of range 0..{num_tokens - 1} (image {b})")
        mask[b, idx] = True
    return mask


def _positions(
    value: TokenSetLike, batch: Batch, sets: Mapping[str, torch.Tensor], device: torch.device
) -> torch.Tensor:
    """A token set -> (B, T) bool over sequence positions (padding never included)."""
    token_set = _as_token_set(value)
    real = batch.attention_mask.to(device).bool()
    B, T = real.shape
    image_positions = batch.image_positions.to(device)
    N = image_positions.shape[1]
    if token_set.name == "all":
        return real
    if token_set.name == "text":
        return batch.text_positions.to(device)
    if token_set.name == "image":
        slot_mask = torch.ones(B, N, dtype=torch.bool, device=device)
    elif token_set.name is not None:
        if token_set.name not in sets:
            raise _unknown_set(token_set.name, [*NAMED_SETS, *sets])
        slot_mask = sets[token_set.name].to(device)
        if slot_mask.shape != (B, N):
            raise ValueError(
                f"sets[{token_set.name!r}] has shape {tuple(slot_mask.shape)}, the batch needs "
                f"({B}, {N}): one row per image of this batch"
            )
    else:
        slot_mask = slots_to_mask(token_set.slots, N, B).to(device)
    out = torch.zeros(B, T, dtype=torch.bool, device=device)
    return out.scatter_(1, image_positions, slot_mask) & real


def _prefix_positions(batch: Batch, device: torch.device) -> torch.Tensor:
    """(B, T) bool: the batch's prefix (``Batch.prefix_mask``; every real token when None)."""
    real = batch.attention_mask.to(device).bool()
    prefix = getattr(batch, "prefix_mask", None)
    return real if prefix is None else prefix.to(device).bool() & real


def _covers(spec: Spec, layer: int | None) -> bool:
    return spec.layers is None or (layer is not None and layer in spec.layers)


def allowed_edges(
    specs: Sequence[Spec],
    batch: Batch,
    *,
    layer: int | None = None,
    sets: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The edges query -> key that stay open, as a (B, T, T) bool tensor ``[b, query, key]``.

    Starts from causal attention over real keys, widens (``BidirectionalImage``,
    ``BidirectionalPrefix``), then restricts (``Knockout``, ``CausalImage``, ``CausalPrefix``), so
    a restriction always wins. Finally every real query gets
    back itself and the first real token, and a padded query whose row came out empty (left
    padding) gets itself, so no row is empty.

    Args:
        specs: the interventions; only those covering ``layer`` apply (all-layer specs only
            when ``layer`` is None).
        batch: gives the padding mask (B, T) and image positions (B, N).
        layer: 1-based LLM layer number, or None.
        sets: named (B, N) bool image-slot sets the specs refer to.
        device: where to build; default the batch's device.
    """
    sets = {} if sets is None else sets
    check_specs(specs, sets=sets)
    device = torch.device(device) if device is not None else batch.attention_mask.device
    real = batch.attention_mask.to(device).bool()
    T = real.shape[1]
    idx = torch.arange(T, device=device)
    causal = idx[None, :] <= idx[:, None]  # (T, T) [query, key]
    allowed = causal[None] & real[:, None, :]  # padded keys are never read
    active = [s for s in specs if _covers(s, layer)]
    for spec in active:
        if isinstance(spec, BidirectionalImage):
            image = _positions("image", batch, sets, device)
            allowed |= image[:, :, None] & image[:, None, :]
        elif isinstance(spec, BidirectionalPrefix):
            prefix = _prefix_positions(batch, device)
            allowed |= prefix[:, :, None] & prefix[:, None, :]
    for spec in active:
        if isinstance(spec, Knockout):
            queries = _positions(spec.queries, batch, sets, device)
            keys = _positions(spec.keys, batch, sets, device)
            blocked = queries[:, :, None] & keys[:, None, :]
            if spec.later_only:
                blocked &= (idx[:, None] > idx[None, :])[None]
            allowed &= ~blocked
        elif isinstance(spec, CausalImage):
            # Only widenings open later keys to an image query: image -> later image
            # (BidirectionalImage) or -> later prompt (BidirectionalPrefix). Close them all.
            image = _positions("image", batch, sets, device)
            allowed &= ~(image[:, :, None] & ~causal)
        elif isinstance(spec, CausalPrefix):
            prefix = _prefix_positions(batch, device)
            allowed &= ~(prefix[:, :, None] & prefix[:, None, :] & ~causal)
    first = real.int().argmax(dim=1)  # (B,) first real token: BOS
    is_first = idx[None, None, :] == first[:, None, None]  # (B, 1, T)
    keep = is_first | torch.eye(T, dtype=torch.bool, device=device)
    allowed |= keep & real[:, :, None]
    empty = ~allowed.any(dim=2)  # only padded rows under left padding can be empty here
    allowed |= torch.diag_embed(empty)
    return allowed


def build_attention_mask(
    specs: Sequence[Spec],
    batch: Batch,
    *,
    backend: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    layer: int | None = None,
    sets: Mapping[str, torch.Tensor] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Specs -> the 4D attention mask the backend expects for one layer (pure; no model needed).

    With no specs it equals ``transformers.masking_utils.create_causal_mask`` for the same
    (right-)padding, materialised.

    Args:
        specs: the interventions (see ``allowed_edges`` for how they combine).
        batch: gives the (B, T) padding mask and (B, N) image positions.
        backend: ``"sdpa"`` (bool, True = may attend) or ``"eager"`` (additive float).
        dtype: float dtype of an eager mask (the model's dtype).
        layer: 1-based LLM layer number; None applies the all-layer specs only.
        sets: named (B, N) bool image-slot sets the specs refer to.
        device: where to build; default the batch's device.

    Returns:
        (B, 1, T, T): bool for sdpa; 0 / ``finfo(dtype).min`` for eager.
    """
    check_backend(backend)
    allowed = allowed_edges(specs, batch, layer=layer, sets=sets, device=device)[:, None]
    if backend == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# --- the context manager ------------------------------------------------------------------------
@contextmanager
def intervene(
    vlm: VLM, specs: Sequence[Spec], sets: Mapping[str, torch.Tensor] | None = None
) -> Iterator[None]:
    """Apply attention interventions to every ``vlm.capture`` forward inside the block.

    All-layer specs (``layers=None``) go into the mask given to the forward
    (``vlm.attention_mask_override``), which transformers hands unchanged to every decoder layer.
    Layer-window specs add a forward pre-hook on each listed decoder layer that swaps in that
    layer's mask. A pre-hook on layer 1 refuses forwards that bypass ``vlm.capture`` (they would
    silently run without the intervention). All is undone on exit, also on exceptions. Checks run
    at once, before any forward. For a natively bidirectional (Gemma3) or prefix (PaliGemma)
    family the model's own block is prepended (``BidirectionalImage`` / ``BidirectionalPrefix``),
    so an empty spec is the plain model and restrictions act on top of it.

    Args:
        vlm: the model; its attention backend must be sdpa or eager.
        specs: the interventions; an empty sequence still routes a materialised causal mask.
        sets: named (B, N) bool image-slot sets, for the batches the block will capture.

    Raises:
        ValueError: unsupported backend, a layer outside 1..L, an unknown token set.
        RuntimeError: nested ``intervene``, or a forward that did not come from ``vlm.capture``.

    Example:
        >>> with intervene(vlm, [Knockout(keys=TokenSet.from_slots(range(100, 256)))]):
        ...     states = vlm.capture(batch, ["llm.4"])
    """
    specs = tuple(specs)
    sets = dict(sets or {})
    check_backend(vlm.attn_implementation)
    check_specs(specs, num_layers=vlm.num_llm_layers, sets=sets, num_tokens=vlm.num_image_tokens)
    if vlm.attention_mask_override is not None:
        raise RuntimeError(
            "intervene() is already active on this model; pass all specs to one intervene() call"
        )
    native = getattr(vlm.family, "native_image_attention", "causal")
    if native == "bidirectional":
        # Start from the model's own mask: restrictions (Knockout, CausalImage) still win.
        specs = (BidirectionalImage(), *specs)
    elif native == "prefix":  # PaliGemma: image + prompt read each other
        specs = (BidirectionalPrefix(), *specs)
    window = sorted({layer for s in specs if s.layers is not None for layer in s.layers})
    hooked = sorted({1, *window})
    # Masks of the forward in flight: set by the override, read once per layer by the hooks.
    state: dict = {"layers": {}, "used": set()}

    def override(batch: Batch) -> torch.Tensor:
        build = partial(
            build_attention_mask,
            specs,
            batch,
            backend=vlm.attn_implementation,
            dtype=vlm.dtype,
            sets=sets,
            device=vlm.device,
        )
        base = build()
        by_active: dict[tuple[int, ...], torch.Tensor] = {}
        layers = {}
        for layer in window:  # layers with the same active specs share one mask
            key = tuple(i for i, s in enumerate(specs) if _covers(s, layer))
            if key not in by_active:
                by_active[key] = build(layer=layer)
            layers[layer] = by_active[key]
        state.update(base=base, layers=layers, used=set())
        return base

    def make_hook(layer: int):
        def swap_mask(_module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if "base" not in state or layer in state["used"] or mask is None:
                raise RuntimeError(
                    f"llm.{layer}: a forward inside intervene() that did not come from "
                    "vlm.capture(...) would run without the intervention; use vlm.capture"
                )
            state["used"].add(layer)
            if layer not in state["layers"]:
                return None
            new = state["layers"][layer]
            if mask.shape != new.shape:
                raise RuntimeError(
                    f"llm.{layer} got an attention mask of shape {tuple(mask.shape)}, the "
                    f"intervention built {tuple(new.shape)}; run the forward through vlm.capture"
                )
            return args, {**kwargs, "attention_mask": new.to(mask.device)}

        return swap_mask

    previous = vlm.attention_mask_override
    decoder_layers = vlm.family.decoder_layers()
    with ExitStack() as stack:
        vlm.attention_mask_override = override
        stack.callback(setattr, vlm, "attention_mask_override", previous)
        for layer in hooked:
            handle = decoder_layers[layer - 1].register_forward_pre_hook(
                make_hook(layer), with_kwargs=True
            )
            stack.callback(handle.remove)
        yield
