"""Sink tokens: image tokens with an outsized state, flagged per stage, reported with and without.

Rule (default ``norm``): a token is a sink at a stage when its state norm exceeds ``norm_factor``
times the median image-token norm of that image at that stage. The norm rule is scale-free per
stage and catches both kinds reported in the literature: a token with a few massive dimensions
(Sun et al. 2024; Kang et al. ICLR 2025), whose norm they dominate, and a diffusely high-norm token
(Darcet et al., registers). ``massive`` flags a token whose largest |value| exceeds
``massive_factor`` times the image's median |value| at that stage (single massive dimensions only);
``either`` takes both. A random-weight model has neither (its norm ratios stay below ~1.6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from seglens.metrics import ConfusionMatrix
from seglens.readouts.options import SINK_RULES, SinkOptions

__all__ = ["SINK_RULES", "SinkOptions", "SinkScorer", "flag_sinks"]


def flag_sinks(h: torch.Tensor, options: SinkOptions | None = None) -> torch.Tensor:
    """(B, N, D) image-token states of one stage -> (B, N) bool, the sink tokens.

    The median is taken per image over its N tokens (norm rule) or its N * D values (massive
    rule), so a batch's other images never change an image's flags.
    """
    opts = options or SinkOptions()
    x = h.float()
    flags = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    if opts.rule in ("norm", "either"):
        norm = x.norm(dim=-1)  # (B, N)
        flags |= norm > opts.norm_factor * norm.median(dim=1, keepdim=True).values
    if opts.rule in ("massive", "either"):
        a = x.abs()
        median = a.flatten(1).median(dim=1).values[:, None]  # (B, 1)
        flags |= a.amax(dim=-1) > opts.massive_factor * median
    return flags


class SinkScorer:
    """Per stage: how many tokens are sinks, where, on which classes, and the readouts' patch
    scores on all tokens, without the sinks and on the sinks alone. An ``on_batch`` consumer of
    the probing evaluation pass (no extra forward).

    Args:
        stages: the stages of the pass to flag.
        num_classes: C.
        num_tokens: N (the grid's tokens, raster order).
        options: ``SinkOptions``.
        readers: name -> ``f(stage, (B, N, D) states) -> (B, N, C)`` scores or None when the
            reader does not read that stage (e.g. ``{"probe": ..., "lens": ...}``).

    Attributes:
        positions_: stage -> (N,) int64 sink count per token position.
        classes_: stage -> (C + 1,) int64 sink count per token label (last: ignore).
        tokens_: tokens seen (at each stage); images: images seen.
        scores_: (reader, stage, subset) -> ``ConfusionMatrix``; subsets: ``all``, ``without``
            (the sinks ignored) and ``sinks`` (only they are scored).
        keys_: image name -> (N,) bool, its tokens flagged at any stage (the sink keys that
            ``seglens.readouts.sinkkeys`` knocks out), for the images with at least one.
    """

    def __init__(
        self,
        stages: Sequence[str],
        num_classes: int,
        num_tokens: int,
        options: SinkOptions | None = None,
        readers: Mapping[str, Any] | None = None,
    ):
        self.stages = list(stages)
        self.options = options or SinkOptions()
        self.num_classes, self.num_tokens = num_classes, num_tokens
        self.readers = dict(readers or {})
        self.positions_ = {s: np.zeros(num_tokens, np.int64) for s in self.stages}
        self.classes_ = {s: np.zeros(num_classes + 1, np.int64) for s in self.stages}
        self.tokens_ = 0
        self.images = 0
        self.scores_: dict[tuple[str, str, str], ConfusionMatrix] = {}
        self.keys_: dict[str, np.ndarray] = {}

    def __call__(self, batch, states: Mapping[str, torch.Tensor]) -> None:
        """Flag and count one batch's sinks from its ``{stage: (B, N, D)}`` states."""
        labels = batch.labels
        C = self.num_classes
        union = None
        for s in self.stages:
            flags = flag_sinks(states[s], self.options)
            f = flags.cpu().numpy()
            union = f if union is None else union | f
            self.positions_[s] += f.sum(axis=0)
            if labels is not None:
                lab = labels.numpy()
                lab = np.where((lab >= 0) & (lab < C), lab, C)
                self.classes_[s] += np.bincount(lab[f], minlength=C + 1)
                for name, read in self.readers.items():
                    z = read(s, states[s])
                    if z is None:
                        continue
                    self._score(name, s, z.argmax(-1), labels.to(z.device), flags.to(z.device))
        self.tokens_ += int(flags.numel())
        self.images += len(batch)
        names = batch.names or [str(self.images - len(batch) + i) for i in range(len(batch))]
        for name, row in zip(names, union if union is not None else [], strict=False):
            if row.any():
                self.keys_[name] = row

    def _score(self, reader, stage, pred, labels, flags) -> None:
        ignore = torch.full_like(labels, 255)
        for subset, target in (
            ("all", labels),
            ("without", torch.where(flags, ignore, labels)),
            ("sinks", torch.where(flags, labels, ignore)),
        ):
            key = (reader, stage, subset)
            if key not in self.scores_:
                self.scores_[key] = ConfusionMatrix(self.num_classes, device=labels.device)
            self.scores_[key].update(pred, target)

    def section(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The ``sinks`` results: rule, and per stage the sinks' share, count, position map
        (g, g as a flat raster list), classes, and each reader's patch mIoU and accuracy on all
        tokens, without the sinks and on the sinks alone."""
        names = list(class_names or range(self.num_classes))
        per_stage = {}
        tokens_per_stage = self.tokens_  # B * N per batch, the same at every stage
        for s in self.stages:
            count = int(self.positions_[s].sum())
            on = self.classes_[s]
            classes = {str(names[c]): int(on[c]) for c in np.flatnonzero(on[:-1])}
            if on[-1]:
                classes["ignore"] = int(on[-1])
            scores = {}
            for (reader, stage, subset), cm in self.scores_.items():
                if stage == s:
                    d = cm.to_dict()
                    scores.setdefault(reader, {})[subset] = {
                        "miou": d["miou"],
                        "accuracy": d["pixel_accuracy"],
                        "tokens": int(cm.matrix.sum()),
                    }
            per_stage[s] = {
                "count": count,
                "share": count / tokens_per_stage if tokens_per_stage else None,
                "positions": self.positions_[s].tolist(),
                "classes": classes,
                "scores": scores,
            }
        o = self.options
        return {
            "rule": o.rule,
            "norm_factor": o.norm_factor,
            "massive_factor": o.massive_factor,
            "images": self.images,
            "stages": per_stage,
        }
