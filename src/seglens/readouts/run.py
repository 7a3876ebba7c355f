"""The lens analysis of a run: the logit and embedding lens per stage beside the probe, and sinks.

``lens_feed`` builds the scorers that ride on the probing evaluation pass (no extra forward);
``run_lens`` finishes them, or runs a pass of its own over the evaluation split when there was
none (``seglens lens --run DIR`` on a finished probing run), pairs the lens with the probe's
saved per-image counts, and writes the ``lens`` and ``sinks`` sections and ``arrays/lens.npz``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from seglens.readouts.options import LensConfig
from seglens.readouts.scoring import LensScorer, lens_section
from seglens.readouts.sinks import SinkScorer

log = logging.getLogger(__name__)

LENS_ARRAYS = "arrays/lens.npz"


@dataclass
class LensFeed:
    """The scorers one evaluation pass feeds: ``offer(batch, states)`` per batch."""

    lens: LensScorer
    sinks: SinkScorer
    stages: list[str]

    def offer(self, batch, states) -> None:
        self.lens(batch, states)
        self.sinks(batch, states)


def lens_feed(
    vlm,
    class_names,
    stages,
    config: LensConfig,
    *,
    dataset: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    position_band: float = 0.125,
    bank=None,
    pixel_level: bool = True,
) -> LensFeed:
    """The scorers for a pass capturing ``stages``: the lens reads ``adapter`` and ``llm.*``,
    sinks are flagged at every stage; the sinks' readers are the logit lens (all classes) and,
    given a ``bank``, the probes."""
    scorer = LensScorer(
        vlm,
        class_names,
        stages,
        config.lens_options(pixel_level),
        dataset=dataset,
        bootstrap=bootstrap,
        seed=seed,
        position_band=position_band,
    )
    readers: dict[str, Any] = {}
    if bank is not None:
        probes = bank.probes

        def probe(stage, h):
            return probes[stage].decision_function(h) if stage in probes else None

        readers["probe"] = probe

    def lens(stage, h):
        return scorer.lens.logit_lens(h) if stage in scorer.stages else None

    readers["lens"] = lens
    sinks = SinkScorer(
        list(stages), len(class_names), vlm.num_image_tokens, config.sink_options(), readers
    )
    return LensFeed(scorer, sinks, list(stages))


def run_pass(vlm, feed, stages, dataset, data_config, *, progress: bool = True) -> None:
    """``feed(batch, states)`` every batch of a pass of its own over ``dataset``: one forward
    per batch, capturing ``stages``."""
    from seglens.experiments.streaming import shard_dataset, stream_batches

    skipped: dict[str, str] = {}
    data = shard_dataset(dataset, equal=False)
    args = (data_config, dataset.num_classes, skipped, progress, "lens")
    for batch in stream_batches(vlm, data, *args):
        if batch.labels is None:
            raise ValueError(f"{dataset.name}: the lens is scored on labelled images")
        with torch.inference_mode():
            feed(batch, vlm.capture(batch, stages))


def probe_counts(arrays: dict[str, np.ndarray], stages) -> dict[str, dict[str, Any]]:
    """``{level: {stage: (intersection, union)}}`` of the probe from a run's saved arrays."""
    from seglens.experiments.differences import counts_from_arrays

    out: dict[str, dict[str, Any]] = {}
    for level in ("patch", "pixel"):
        for s in stages:
            counts = counts_from_arrays(arrays, s, level, "miou")
            if counts is not None:
                out.setdefault(level, {})[s] = counts
    return out


def lens_results(
    feed: LensFeed, probe: dict | None, *, bootstrap: int, seed: int, class_names
) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """The ``lens`` section, the ``sinks`` section and the arrays of a fed (finished) feed."""
    feed.lens.finish()
    lens = lens_section(feed.lens, probe, bootstrap=bootstrap, seed=seed)
    collisions = lens["class_tokens"]["collisions"]
    if collisions:
        log.warning(
            "lens: %d class pairs share their tokens: %s",
            len(collisions),
            ", ".join("/".join(c["classes"]) for c in collisions[:10]),
        )
    sinks = feed.sinks.section(class_names)
    arrays = feed.lens.arrays()
    for s in feed.sinks.stages:
        arrays[f"sink_positions__{s}"] = feed.sinks.positions_[s]
    return lens, sinks, arrays


def run_lens(
    run: Any,
    *,
    vlm: Any = None,
    progress: bool = True,
    feed: LensFeed | None = None,
    config: LensConfig | None = None,
) -> dict[str, Any]:
    """The lens analysis of a probing run; writes ``lens``, ``sinks`` and ``arrays/lens.npz``.

    Args:
        run: a ``RunDir`` or its path, with finished probing results (the lens is paired with the
            probe of the unmodified model, ``schema.clean_condition``).
        vlm: the loaded model (default: built from the run's config).
        progress: show progress bars.
        feed: the scorers the probing evaluation pass already fed (``lens_feed``); None: a pass of
            its own over the evaluation split, with the run's saved probes as a sink reader.
        config: the lens settings (default: the run config's ``lens`` section, else defaults).

    Returns:
        The ``lens`` section.
    """
    from seglens.distributed import rank_world
    from seglens.rundir import RunDir
    from seglens.rundir.schema import clean_condition, probing_arrays

    run = RunDir.of(run)
    rc = run.config
    config = config or getattr(rc, "lens", None) or LensConfig()
    results = run.results()
    condition = clean_condition(results)
    block = (results.get("probing") or {}).get(condition)
    if not block:
        raise ValueError(f"{run.path} has no probing results; run `seglens probe` first")
    dataset_info = results.get("dataset") or {}
    class_names = list(dataset_info.get("class_names") or [])
    if feed is None:
        from seglens.experiments.common import build_dataset, build_model
        from seglens.probes import ProbeBank

        vlm = build_model(rc.model) if vlm is None else vlm
        data = rc.data
        evaluation = build_dataset(data, data.eval_split, data.limit_eval, rc.seed)
        bank_dir = run.file(f"probes/{condition}")
        bank = ProbeBank.load(bank_dir) if (bank_dir / "bank.json").is_file() else None
        feed = lens_feed(
            vlm,
            evaluation.class_names,
            block["stages"],
            config,
            dataset=data.dataset,
            bootstrap=rc.probe.bootstrap,
            seed=rc.seed,
            position_band=rc.probe.position_band,
            bank=bank,
            pixel_level=rc.probe.pixel_level,
        )
        class_names = list(evaluation.class_names)
        run_pass(vlm, feed.offer, feed.stages, evaluation, data, progress=progress)
    elif "probe" not in feed.sinks.readers and any(
        feed.sinks.positions_[s].any() for s in feed.stages
    ):
        # The feed was built before the probes existed: score the probe on and off the sinks with
        # one more pass (only when there are sinks to leave out).
        _probe_sink_pass(run, vlm, feed, condition, config, progress)
    keys = _sink_keys(run, vlm, feed, condition, config, progress) if config.sink_keys else None
    try:
        saved = run.load_arrays(probing_arrays(condition))
    except FileNotFoundError:
        saved = {}
    probe = probe_counts(saved, feed.lens.stages)
    lens, sinks, arrays = lens_results(
        feed, probe, bootstrap=rc.probe.bootstrap, seed=rc.seed, class_names=class_names
    )
    lens["condition"] = condition
    lens["arrays"] = LENS_ARRAYS
    sinks["keys"] = keys
    if rank_world()[0] == 0:
        run.save_arrays(LENS_ARRAYS, **arrays)
        run.put_section("sinks", sinks)
        run.put_section("lens", lens)
    log.info("lens results in %s", run.file("results.json"))
    return lens


def _probe_sink_pass(
    run, vlm, feed: LensFeed, condition: str, config: LensConfig, progress
) -> None:
    """Add the saved probes' scores with and without the sinks to ``feed.sinks`` (one pass)."""
    from seglens.experiments.common import build_dataset, build_model
    from seglens.probes import ProbeBank

    rc = run.config
    bank_dir = run.file(f"probes/{condition}")
    if not (bank_dir / "bank.json").is_file():
        return
    probes = ProbeBank.load(bank_dir).probes
    vlm = build_model(rc.model) if vlm is None else vlm
    evaluation = build_dataset(rc.data, rc.data.eval_split, rc.data.limit_eval, rc.seed)

    def probe(stage, h):
        return probes[stage].decision_function(h) if stage in probes else None

    extra = SinkScorer(
        feed.stages,
        feed.sinks.num_classes,
        feed.sinks.num_tokens,
        config.sink_options(),
        {"probe": probe},
    )
    # Only the sinks: the lens was scored in the probing pass.
    run_pass(vlm, extra, feed.stages, evaluation, rc.data, progress=progress)
    feed.sinks.scores_.update(extra.scores_)
    feed.sinks.readers["probe"] = probe


def _sink_keys(
    run, vlm, feed: LensFeed, condition: str, config: LensConfig, progress
) -> dict[str, Any] | None:
    """The sink-keys knockout (``sinkkeys.run_sink_keys``) with the run's clean probes; None
    when there are no probes. A run without sinks runs no forward."""
    from seglens.distributed import rank_world
    from seglens.experiments.common import build_dataset, build_model
    from seglens.probes import ProbeBank
    from seglens.readouts.sinkkeys import llm_probes, run_sink_keys

    rc = run.config
    bank_dir = run.file(f"probes/{condition}")
    if not (bank_dir / "bank.json").is_file():
        log.warning("lens: no saved probes in %s; the sink keys are not knocked out", bank_dir)
        return None
    if rank_world()[1] > 1:
        # Each rank flagged only its own images; the knockout would see a part of them.
        log.warning("lens: the sink-keys knockout runs in one process; run `seglens lens` alone")
        return {"status": "skipped", "reason": "runs in one process (not under torchrun)"}
    probes = llm_probes(ProbeBank.load(bank_dir).probes, feed.stages)
    if not probes:
        return None
    vlm = build_model(rc.model) if vlm is None and feed.sinks.keys_ else vlm
    evaluation = build_dataset(rc.data, rc.data.eval_split, rc.data.limit_eval, rc.seed)
    out = run_sink_keys(
        vlm,
        evaluation,
        feed.sinks.keys_,
        probes,
        rc,
        max_images=config.sink_keys_images,
        bootstrap=rc.probe.bootstrap,
        progress=progress,
    )
    return {"status": "tested" if out["images"] else "no_sinks", **out}
