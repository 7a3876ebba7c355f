"""Per-stage statistics of captured features: shapes, scale and massive dimensions.

A quick look at what each stage carries before training anything (``seglens capture``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seglens.capture import check_stages
from seglens.data import SegDataset, iterate_samples
from seglens.models import VLM


class _Running:
    """Streaming per-feature moments in float64."""

    def __init__(self, width: int):
        self.count = 0
        self.sum = torch.zeros(width, dtype=torch.float64)
        self.sumsq = torch.zeros(width, dtype=torch.float64)
        self.absmax = torch.zeros(width, dtype=torch.float64)
        self.norms = 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.norms += float(x.norm(dim=1).sum())

    def summary(self) -> dict:
        mean = self.sum / self.count
        std = (self.sumsq / self.count - mean**2).clamp_min(0).sqrt()
        top = torch.argsort(self.absmax, descending=True)[:5]
        return {
            "tokens": self.count,
            "width": int(self.sum.numel()),
            "mean": float(mean.mean()),
            "std": float(std.mean()),
            "token_norm": self.norms / self.count,
            "abs_max": float(self.absmax.max()),
            "massive_dims": [[int(d), float(self.absmax[d])] for d in top],
        }


def capture_stats(
    vlm: VLM,
    dataset: SegDataset,
    stages: Sequence[str] | None = None,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, dict]:
    """Run the model over a dataset once and summarise every requested stage.

    Returns:
        ``{stage: {"shape": [images, N, D], "mean", "std", "token_norm", "abs_max",
        "massive_dims": [[dim, |max|], ...]}}``.
    """
    stages = vlm.stages if stages is None else check_stages(stages, vlm.stages)
    running: dict[str, _Running] = {}
    images = 0
    stream = iterate_samples(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        transform=vlm.preprocessor(dataset.num_classes),
        progress=progress,
        desc="capture",
    )
    for prepared in stream:
        states = vlm.capture(vlm.collate(prepared), stages)
        images += len(prepared)
        for stage, x in states.items():
            running.setdefault(stage, _Running(x.shape[-1])).update(x)
    out = {}
    for stage, acc in running.items():
        out[stage] = {"shape": [images, vlm.num_image_tokens, acc.sum.numel()], **acc.summary()}
    return out


def format_stats(stats: dict[str, dict]) -> str:
    """A fixed-width table of ``capture_stats`` output."""
    lines = [f"{'stage':<16}{'shape':>18}{'mean':>10}{'std':>10}{'norm':>10}{'|max|':>10}  top dim"]
    for stage, s in stats.items():
        shape = "x".join(str(v) for v in s["shape"])
        dim, value = s["massive_dims"][0]
        lines.append(
            f"{stage:<16}{shape:>18}{s['mean']:>10.3f}{s['std']:>10.3f}{s['token_norm']:>10.2f}"
            f"{s['abs_max']:>10.2f}  {dim} ({value:.1f})"
        )
    return "\n".join(lines)
