"""The logit lens and the embedding lens: what the language model itself reads in an image token.

The logit lens applies the LLM's final norm to a stage's state and scores only the C classes'
unembedding rows (not the vocabulary); seglens's ``llm.L`` is taken before the final norm, so every
stage gets it once and the lens at ``llm.L`` equals the model's own logits on those rows. The
embedding lens is the cosine to the classes' input embeddings. Neither is trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from seglens.readouts.classtokens import ClassTokens
from seglens.readouts.options import READOUTS

#: Stands in for -inf (a class with no token, or absent in ``present`` mode): bilinear
#: upsampling of -inf gives nan; evaluation uses the same value.
NEG = -1e30


def lens_stages(stages: Sequence[str]) -> list[str]:
    """The stages a lens reads: ``adapter`` and ``llm.{l}`` (not the vision encoder, whose space
    is not the LLM's, nor ``llm.final_norm``, which is already normalised)."""
    return [s for s in stages if s == "adapter" or (s.startswith("llm.") and s[4:].isdigit())]


def softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(z / cap)`` (Gemma 2's final logit soft-capping), or ``z`` when ``cap`` is None.

    Strictly increasing, so it never changes an argmax; applied so that the lens equals the
    model's logits and not only its ranking.
    """
    return z if cap is None else torch.tanh(z / cap) * cap


class Lens:
    """The logit and embedding lens of a model over C classes' tokens.

    Args:
        vlm: the model (its family gives the final norm, the LM head and the input embeddings).
        tokens: the classes' vocabulary entries (``class_tokens``).

    Attributes:
        tokens: the ``ClassTokens``.
        unembed_: (E, D) float32, one unembedding row per entry (mean over rows in ``mean`` mode).
        bias_: (E,) float32 LM-head bias per entry, or None.
        embed_: (E, D) float32 unit-norm input embedding per entry.
        classes_: (E,) int64 class of each entry.
        softcap_: Gemma 2's logit cap, or None.

    Raises:
        ValueError: the model has no LM head.
    """

    def __init__(self, vlm, tokens: ClassTokens):
        family = vlm.family
        head = family.unembedding()
        if head is None:
            raise ValueError(
                f"{vlm.name}: the model has no LM head (get_output_embeddings() is None); the "
                "logit lens needs one. Turn the lens off for this model"
            )
        self.tokens = tokens
        self.norm = family.final_norm()
        rows = torch.tensor(tokens.rows(), dtype=torch.long)
        weights, self.classes_ = tokens.entry_matrix()  # (K, E), (E,)
        with torch.no_grad():
            w = head.weight.detach()[rows.to(head.weight.device)].float().cpu()  # (K, D)
            self.unembed_ = weights.T @ w  # a selection for first/max: the rows bit for bit
            bias = getattr(head, "bias", None)
            self.bias_ = None if bias is None else weights.T @ bias.detach()[rows].float().cpu()
            table = family.input_embeddings().weight.detach()
            e = weights.T @ table[rows.to(table.device)].float().cpu()
            self.embed_ = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.softcap_ = family.logit_softcap
        self._device_cache: dict = {}

    @property
    def num_classes(self) -> int:
        return self.tokens.num_classes

    def _on(self, device) -> tuple[torch.Tensor, ...]:
        key = str(device)
        if key not in self._device_cache:
            bias = self.bias_.to(device) if self.bias_ is not None else None
            put = (self.unembed_.to(device), self.embed_.to(device), self.classes_.to(device))
            self._device_cache[key] = (*put, bias)
        return self._device_cache[key]

    def _to_classes(self, z: torch.Tensor) -> torch.Tensor:
        """(..., E) entry scores -> (..., C) class scores: the best entry of each class."""
        classes = self._on(z.device)[2]
        out = z.new_full((*z.shape[:-1], self.num_classes), NEG)
        index = classes.expand(*z.shape[:-1], -1)
        return out.scatter_reduce(-1, index, z, "amax", include_self=True)

    def entry_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) states -> (..., E) logits of the entries: final norm (in the model's dtype,
        as the model applies it), then the entries' unembedding rows in float32, bias and
        soft-capping."""
        weight = next(self.norm.parameters(), None)
        if weight is not None:
            h = h.to(weight.device, weight.dtype)
        with torch.no_grad():
            x = self.norm(h).float()
            unembed, _, _, bias = self._on(x.device)
            z = x @ unembed.T
            if bias is not None:
                z = z + bias
        return softcap(z, self.softcap_)

    def logit_lens(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, D) states -> (B, N, C) class logits of the logit lens."""
        return self._to_classes(self.entry_logits(h))

    def embedding_lens(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, D) states -> (B, N, C): the cosine of each state to each class's input
        embedding (the best entry of the class)."""
        with torch.no_grad():
            x = h.float()
            embed = self._on(x.device)[1]
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return self._to_classes(x @ embed.T)

    def read(self, readout: str, h: torch.Tensor) -> torch.Tensor:
        """``logit`` or ``embedding`` lens of (B, N, D) states -> (B, N, C)."""
        if readout == "logit":
            return self.logit_lens(h)
        if readout == "embedding":
            return self.embedding_lens(h)
        raise ValueError(f"lens readout {readout!r} is not one of {READOUTS}")


def present_classes(masks: Sequence[np.ndarray], num_classes: int, device=None) -> torch.Tensor:
    """(B, C) bool: the classes each image's label map holds (ignore excluded): the oracle
    ``present`` mode restricts the lens to them."""
    out = torch.zeros(len(masks), num_classes, dtype=torch.bool)
    for b, mask in enumerate(masks):
        values = np.unique(np.asarray(mask))
        values = values[(values >= 0) & (values < num_classes)]
        out[b, torch.from_numpy(values.astype(np.int64))] = True
    return out if device is None else out.to(device)


def restrict(z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """(B, N, C) scores, (B, C) present classes -> scores with absent classes at ``NEG``."""
    return z.masked_fill(~present[:, None, :].to(z.device), NEG)
