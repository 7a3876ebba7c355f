"""The planned cost of ``seglens run``: image forwards per analysis, from the config and the split
sizes, logged before anything runs; and the hours they take once a rate is measured.

A forward is one image through the model (a batch of B images is B forwards). Counts that depend
on what the run finds (early stopping, the knockout's pairs and their images) are upper bounds and
say so. After an analysis finishes, the pipeline records its measured seconds per forward in the
``plan`` entry of ``results.json`` and logs the hours the remaining analyses should take at that
rate (the probing pass's rate is the first one known).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["RunPlan", "log_plan", "plan_run", "remaining_hours"]

log = logging.getLogger(__name__)


def plan_run(
    config: Any, names: Sequence[str], *, train: int, evaluation: int, num_layers: int
) -> dict[str, dict[str, Any]]:
    """The planned forwards of the analyses ``names`` (in run order).

    Args:
        config: the ``RunConfig``.
        names: the enabled analyses, in run order.
        train, evaluation: images in the training and evaluation splits (after the limits).
        num_layers: the model's LLM layers (the knockout's windows).

    Returns:
        ``{name: {"forwards": int | None, "bound": bool, "detail": str}}`` (None: not planned).
    """
    from seglens.analyses import get

    out = {}
    for name in names:
        planner = get(name).forwards
        if planner is None:
            out[name] = {"forwards": None, "bound": False, "detail": "not planned"}
        else:
            out[name] = planner(config, train, evaluation, num_layers)
    return out


def _count(entry: Mapping[str, Any]) -> str:
    if entry["forwards"] is None:
        return "?"
    return ("<= " if entry["bound"] else "") + f"{entry['forwards']:,}"


def log_plan(plan: Mapping[str, Mapping[str, Any]], seconds_per_forward: float | None) -> None:
    """Log the plan, one line per analysis, with hours when a rate is known."""
    total = sum(e["forwards"] or 0 for e in plan.values())
    rate = f" at {1 / seconds_per_forward:.1f} images/s" if seconds_per_forward else ""
    log.info("planned forward passes (one image through the model each)%s:", rate)
    for name, entry in plan.items():
        hours = ""
        if seconds_per_forward and entry["forwards"] is not None:
            hours = f", ~{entry['forwards'] * seconds_per_forward / 3600:.2f} h"
        log.info("  %-14s %s%s (%s)", name, _count(entry), hours, entry["detail"])
    bound = any(e["bound"] for e in plan.values())
    log.info("  %-14s %s%s", "total", ("<= " if bound else "") + f"{total:,}", "")


def remaining_hours(
    plan: Mapping[str, Mapping[str, Any]], done: Sequence[str], seconds_per_forward: float
) -> float:
    """Hours the analyses of ``plan`` not in ``done`` take at ``seconds_per_forward`` (their
    planned forwards; an upper bound where they are)."""
    left = sum(e["forwards"] or 0 for n, e in plan.items() if n not in done)
    return left * seconds_per_forward / 3600


class RunPlan:
    """The plan of one ``seglens run``, logged at the start; then each analysis's measured
    forwards (a pre-hook on the input embedding counts the images; ``close`` removes it) and
    seconds, saved with the plan, and the hours left at the first measured rate.

    Args:
        config: the ``RunConfig``.
        names: the enabled analyses, in run order.
        vlm: the model.
        run_dir: the ``RunDir`` (the plan goes to ``results.json`` under ``plan``).
    """

    def __init__(self, config: Any, names: Sequence[str], vlm: Any, run_dir: Any):
        from seglens.experiments.common import build_dataset

        data = config.data
        train = len(build_dataset(data, data.train_split, data.limit_train, config.seed))
        evaluation = len(build_dataset(data, data.eval_split, data.limit_eval, config.seed))
        self.run_dir, self.names = run_dir, list(names)
        self.plan = plan_run(
            config, names, train=train, evaluation=evaluation, num_layers=vlm.num_llm_layers
        )
        self.measured: dict[str, dict[str, Any]] = {}
        self.rate: float | None = None  # seconds per forward, once measured
        self.images = 0
        # Every forward embeds its (B, T) input ids once: B images.
        embed = vlm.model.get_input_embeddings()
        self._handle = embed.register_forward_pre_hook(self._count)
        self.sizes = {"train_images": train, "eval_images": evaluation}
        log_plan(self.plan, self._earlier_rate())

    def _earlier_rate(self) -> float | None:
        """Seconds per forward measured by an earlier start of this run (``resume``), if any."""
        from seglens.rundir.files import read_json

        path = self.run_dir.file("results.json")
        measured = (read_json(path).get("plan") or {}).get("measured") if path.is_file() else None
        rates = [m["images_per_s"] for m in (measured or {}).values() if m.get("images_per_s")]
        return 1 / rates[0] if rates else None

    def _count(self, _module, args) -> None:
        if args and getattr(args[0], "ndim", 0) == 2:
            self.images += int(args[0].shape[0])

    def done(self, name: str, seconds: float) -> None:
        """Record that ``name`` ran ``seconds`` for the forwards counted since the last call;
        the first rate measured prices the analyses still to run."""
        forwards, self.images = self.images, 0
        rate = seconds / forwards if forwards else None
        self.measured[name] = {
            "seconds": seconds,
            "forwards": forwards,
            "images_per_s": None if rate is None else 1 / rate,
        }
        if rate is not None and self.rate is None:
            self.rate = rate
            done = [n for n in self.names if n in self.measured]
            left = [n for n in self.names if n not in done]
            if left:
                hours = remaining_hours(self.plan, done, rate)
                log.info(
                    "%s: %d forwards at %.1f images/s; the rest (%s) should take ~%.2f h%s",
                    name,
                    forwards,
                    1 / rate,
                    ", ".join(left),
                    hours,
                    " at most" if any(self.plan[n]["bound"] for n in left) else "",
                )
        self._save()

    def close(self) -> None:
        """Remove the counting hook."""
        self._handle.remove()

    def _save(self) -> None:
        from seglens.distributed import is_main

        if is_main() and self.run_dir.file("results.json").is_file():  # written by the first
            section = {**self.sizes, "planned": self.plan, "measured": self.measured}
            self.run_dir.put_section("plan", section)
