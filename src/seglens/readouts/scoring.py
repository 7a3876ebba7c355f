"""Scoring the lens with the probe's confusion counts, inside the probing evaluation pass.

``LensScorer`` is an ``on_batch`` consumer of ``evaluate_probes``: it reads the states that pass
already captured (no extra forward), applies each readout (logit, embedding) in each mode (all
classes; the classes present in the image, an oracle) and accumulates patch and pixel confusion
counts exactly as the probe's (``StageResults``). ``lens_section`` turns them into a results
section with paired 95% intervals of lens minus probe per stage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from seglens.experiments.evaluation import StageResults
from seglens.experiments.stats import paired_bootstrap, significant
from seglens.metrics import (
    ConfusionMatrix,
    PerImageCounts,
    PositionAccuracy,
    confusion_of,
    pixel_predictions,
    pixel_target,
    score_target,
)
from seglens.readouts.classtokens import class_synonyms, class_tokens
from seglens.readouts.lens import NEG, Lens, lens_stages, present_classes, restrict
from seglens.readouts.options import LensOptions

log = logging.getLogger(__name__)


def _stage_results(stages, C, N, band, pixel, bootstrap, seed, device) -> StageResults:
    return StageResults(
        stages=list(stages),
        num_classes=C,
        patch={s: ConfusionMatrix(C, device=device) for s in stages},
        pixel={s: ConfusionMatrix(C, device=device) for s in stages} if pixel else None,
        patch_images={s: PerImageCounts(C) for s in stages},
        pixel_images={s: PerImageCounts(C) for s in stages} if pixel else None,
        positions={s: PositionAccuracy(N, device=device) for s in stages},
        early_images={s: PerImageCounts(C) for s in stages},
        late_images={s: PerImageCounts(C) for s in stages},
        band=band,
        bootstrap=bootstrap,
        seed=seed,
    )


def score_batch(
    res: StageResults,
    z: torch.Tensor,
    batch,
    grid: tuple[int, int],
    targets: list | None,
    restricted: torch.Tensor | None = None,
    present: torch.Tensor | None = None,
) -> None:
    """Add one batch of (S, B, N, C) stage scores to ``res`` as the probe's evaluation does:
    patch argmax vs token labels; pixel argmax of the upsampled grid scores vs the original mask
    (``targets``: per image ``score_target(pixel_target(...))``; None when pixel level is off).

    ``restricted`` (S,) bool marks maps whose absent classes (``present``: (B, C) bool) are at
    ``NEG``: their pixel argmax is taken over the image's present classes only, which gives the
    same map (an absent class never wins) for a fraction of the upsampling work.
    """
    dev = z.device
    labels = batch.labels.to(dev)
    pred = z.argmax(-1)  # (S, B, N)
    for k, s in enumerate(res.stages):
        res.patch[s].update(pred[k], labels)
        res.patch_images[s].add_batch(pred[k], labels)
        res.positions[s].update(pred[k], labels)
        res.early_images[s].add_batch(pred[k, :, : res.band], labels[:, : res.band])
        res.late_images[s].add_batch(pred[k, :, -res.band :], labels[:, -res.band :])
    if targets is None:
        return
    C, S = res.num_classes, len(res.stages)
    if restricted is None:
        restricted = torch.zeros(S, dtype=torch.bool)
    full = torch.nonzero(~restricted.cpu()).flatten().tolist()
    some = torch.nonzero(restricted.cpu()).flatten().tolist()
    for b in range(len(batch)):
        grids = z[:, b].transpose(1, 2).reshape(S, C, *grid)  # tokens in raster order
        tf = batch.transforms[b]
        pix = None
        if full:
            pix_full = pixel_predictions(grids[full], tf)  # (S', H, W)
            pix = pix_full.new_empty((S, *pix_full.shape[1:]))
            pix[full] = pix_full
        if some:
            keep = torch.nonzero(present[b]).flatten().to(grids.device)  # ascending: same ties
            sub = keep[pixel_predictions(grids[some][:, keep], tf)]
            if pix is None:
                pix = sub.new_empty((S, *sub.shape[1:]))
            pix[some] = sub
        confusion = confusion_of(pix, *targets[b], C)  # (S, C, C)
        tables = PerImageCounts.tables(confusion)
        for k, s in enumerate(res.stages):
            res.pixel[s].matrix += confusion[k].to(res.pixel[s].matrix.device)
            res.pixel_images[s].add_tables(tables[k : k + 1])


class LensScorer:
    """Accumulates lens scores from the states of a pass (``evaluate_probes(on_batch=...)``).

    Args:
        vlm: the model.
        class_names: the dataset's C class names.
        stages: the stages the pass captures (the lens reads ``lens_stages(stages)``).
        options: ``LensOptions``.
        dataset: dataset name (picks a shipped synonym file), or None.
        bootstrap, seed: resamples and seed of the intervals (as the probe's).
        position_band: the probe's ``position_band`` (early/late per-image counts).

    Attributes:
        tokens: the ``ClassTokens``; lens: the ``Lens``.
        results: ``"<readout>/<mode>"`` -> ``StageResults``.
    """

    def __init__(
        self,
        vlm,
        class_names: Sequence[str],
        stages: Sequence[str],
        options: LensOptions | None = None,
        *,
        dataset: str | None = None,
        bootstrap: int = 1000,
        seed: int = 0,
        position_band: float = 0.125,
    ):
        self.options = options or LensOptions()
        self.stages = lens_stages(stages)
        if not self.stages:
            raise ValueError(
                f"the lens reads 'adapter' and 'llm.<l>' stages; the pass captures only "
                f"{list(stages)}. Probe at least one of them"
            )
        names = list(class_names)
        synonyms = class_synonyms(names, dataset)
        tokenizer = vlm.processor.tokenizer
        self.tokenizer = tokenizer
        self.tokens = class_tokens(tokenizer, synonyms, names, self.options.subtokens)
        self.lens = Lens(vlm, self.tokens)
        self.grid = vlm.grid
        C, N = len(names), vlm.num_image_tokens
        band = max(1, round(position_band * N))
        # One accumulator over every (readout, mode, stage): all of an image's maps go through one
        # pixel_predictions call. Its stage names are "<readout>/<mode>|<stage>".
        self.keys = [f"{r}/{m}" for r in self.options.readouts for m in self.options.modes]
        combined = [f"{k}|{s}" for k in self.keys for s in self.stages]
        self.combined = _stage_results(
            combined, C, N, band, self.options.pixel_level, bootstrap, seed, vlm.device
        )
        self.images = 0

    @property
    def results(self) -> dict[str, StageResults]:
        """``"<readout>/<mode>"`` -> its ``StageResults`` over the lens stages (views of the
        shared accumulators)."""
        out = {}
        res = self.combined
        for key in self.keys:

            def pick(table, key=key):
                return None if table is None else {s: table[f"{key}|{s}"] for s in self.stages}

            out[key] = StageResults(
                stages=list(self.stages),
                num_classes=res.num_classes,
                patch=pick(res.patch),
                pixel=pick(res.pixel),
                patch_images=pick(res.patch_images),
                pixel_images=pick(res.pixel_images),
                positions=pick(res.positions),
                early_images=pick(res.early_images),
                late_images=pick(res.late_images),
                band=res.band,
                images=self.images,
                bootstrap=res.bootstrap,
                seed=res.seed,
            )
        return out

    def __call__(self, batch, states: Mapping[str, torch.Tensor]) -> None:
        """Score one batch from its captured ``{stage: (B, N, D)}`` states."""
        if batch.labels is None:
            raise ValueError("the lens is scored on labelled images; this batch has no labels")
        C = self.tokens.num_classes
        dev = states[self.stages[0]].device
        targets = None
        if self.options.pixel_level:
            pairs = zip(batch.masks, batch.transforms, strict=True)
            targets = [
                score_target(torch.from_numpy(pixel_target(m, t)).to(dev), C) for m, t in pairs
            ]
        present = present_classes(batch.masks, C, dev) if "present" in self.options.modes else None
        blocks = []
        for readout in self.options.readouts:
            z = torch.stack([self.lens.read(readout, states[s]).to(dev) for s in self.stages])
            for mode in self.options.modes:  # (S, B, N, C) per mode, in self.keys order
                zm = z if mode == "all" else restrict(z.flatten(0, 1), present.repeat(len(z), 1))
                blocks.append(zm.reshape(z.shape))
        z = torch.cat(blocks).clamp_min(NEG)  # (K S, B, N, C)
        restricted = torch.tensor(
            [key.endswith("/present") for key in self.keys for _ in self.stages]
        )
        score_batch(self.combined, z, batch, self.grid, targets, restricted, present)
        self.images += len(batch)

    def finish(self) -> LensScorer:
        """Sum the counts over processes (torch.distributed); call once after the pass."""
        self.combined.images = self.images
        self.combined.all_reduce()
        self.images = self.combined.images
        return self

    def arrays(self) -> dict[str, np.ndarray]:
        """Per-image counts per readout, stage and level (``lens_counts__<r>__<m>__<stage>__<l>``):
        the lens side of any later paired interval."""
        out = {}
        for key, res in self.results.items():
            r, m = key.split("/")
            for level, table in (("patch", res.patch_images), ("pixel", res.pixel_images)):
                for s in self.stages if table is not None else []:
                    out[f"lens_counts__{r}__{m}__{s}__{level}"] = table[s].state_dict()["counts"]
        return out


def lens_section(
    scorer: LensScorer,
    probe_counts: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The lens results: per readout and mode, the probe-format metrics of every stage, and the
    paired interval of lens minus probe mIoU per stage and level.

    Args:
        scorer: a finished ``LensScorer``.
        probe_counts: ``{level: {stage: PerImageCounts or (intersection, union)}}`` of the probe on
            the same images in the same order (``StageResults.patch_images`` / ``pixel_images``,
            or ``counts_from_arrays`` of a saved run); None: no differences.
        bootstrap, seed: resamples and seed (the probe's, so both sides resample alike).

    Returns:
        ``{"stages", "options", "class_tokens", "readouts": {"<r>/<m>": {"metrics", "summary",
        "minus_probe"}}}``.
    """
    opts = scorer.options
    readouts = {}
    for key, res in scorer.results.items():
        metrics = res.metrics()
        level = "pixel" if res.pixel is not None else "patch"
        summary = {s: metrics[s][level]["miou"] for s in scorer.stages}
        best = max((s for s in summary if summary[s] is not None), key=summary.get, default=None)
        diffs: dict[str, dict] = {}
        for lvl, table in (("patch", res.patch_images), ("pixel", res.pixel_images)):
            probe = (probe_counts or {}).get(lvl) or {}
            for s in scorer.stages if table is not None else []:
                if probe.get(s) is None:
                    continue
                interval = paired_bootstrap(
                    table[s], probe[s], "miou", n_resamples=bootstrap, seed=seed
                )
                interval["significant"] = significant(interval) if bootstrap else None
                diffs.setdefault(lvl, {})[s] = interval
        readouts[key] = {
            "metrics": metrics,
            "summary": {"level": level, "miou": summary, "best_stage": best},
            "minus_probe": diffs,
        }
    return {
        "stages": list(scorer.stages),
        "images": scorer.images,
        "options": {
            "readouts": list(opts.readouts),
            "modes": list(opts.modes),
            "subtokens": opts.subtokens,
            "pixel_level": opts.pixel_level,
            "softcap": scorer.lens.softcap_,
        },
        "class_tokens": scorer.tokens.to_dict(scorer.tokenizer),
        "readouts": readouts,
    }
