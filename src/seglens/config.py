"""Run configuration: frozen dataclasses nested by concern, each field documented.

Precedence is CLI > YAML > defaults. The core sections (model, data, and probe, which the probe
trainers and the feature cache share) are here; every other analysis brings its own section
through the registry (``seglens.analyses``). ``from_dict`` refuses unknown keys (with a
suggestion) and wrong types. The resolved config is saved next to the results, so every default
that shaped a run is on record.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

SOLVERS = ("sgd", "lda")
BAD_SAMPLE_POLICIES = ("error", "skip")
GEOMETRIES = ("pad", "crop", "resize")


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _help("tiny registry name, hub id or local checkpoint folder", "tiny-clip")
    dtype: str = _help("auto, float32, bfloat16 or float16 (probes always run in fp32)", "auto")
    device: str | None = _help("cuda, cuda:1, cpu...; default: cuda when available", None)
    device_map: str | None = _help("accelerate placement such as 'auto' for big models", None)
    attn_implementation: str = _help("sdpa or eager (both honour custom masks)", "sdpa")
    trust_remote_code: bool = _help("allow code shipped with the checkpoint", False)
    geometry: str | None = _help("override the processor geometry: pad, crop, resize", None)
    prompt: str = _help("text after the image in the chat template", "Describe the image.")
    family_options: dict | None = _help(
        "options of the model family's adapter, e.g. {grid: tiles} for LLaVA-NeXT", None
    )

    def __post_init__(self):
        _check_choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        if self.geometry is not None:
            _check_choice("model.geometry", self.geometry, GEOMETRIES)
        _check_choice(
            "model.dtype",
            self.dtype,
            ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
        )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _help(
        "ade20k, voc, cityscapes, coco-stuff, folder, hf, synthetic or organism", "synthetic"
    )
    root: str | None = _help("dataset root folder (not needed for synthetic)", None)
    train_split: str = _help("split the probes are trained on", "train")
    eval_split: str = _help("split the metrics are computed on", "val")
    limit_train: int | None = _help("use only the first N training images", None)
    limit_eval: int | None = _help("use only the first N evaluation images", None)
    batch_size: int = _help("images per forward pass", 8)
    num_workers: int = _help("loader worker processes (decode + geometry)", 0)
    on_bad_sample: str = _help("error: stop at a bad file; skip: skip and count it", "error")
    min_valid: float = _help("labelled fraction below which a token is ignore", 0.5)
    synthetic_images: int | None = _help(
        "images per split of a generated dataset; default 96 (synthetic), 800 (organism)", None
    )
    synthetic_classes: int = _help("synthetic dataset: number of classes", 6)
    folder_val_fraction: float = _help(
        "flat folder dataset (no train/ and val/): share of its images in the seeded val part",
        0.2,
    )
    folder_split_seed: int = _help("flat folder dataset: seed of its train/val division", 0)
    hf_image_column: str = _help("hf dataset: column of the images", "image")
    hf_label_column: str | None = _help(
        "hf dataset: column of the label maps; default the first of annotation, mask, label", None
    )
    hf_reduce_zero_label: bool = _help(
        "hf dataset: ADE20K-style labels, raw 0 = other -> ignore and raw k -> class k-1", False
    )
    hf_classes: str | None = _help(
        "hf dataset: class names, a classes.txt file or a dataset name (ade20k, voc, cityscapes, "
        "coco-stuff); default the label column's ClassLabel, or classes.txt / id2label.json "
        "beside the data",
        None,
    )

    def __post_init__(self):
        _check_choice("data.on_bad_sample", self.on_bad_sample, BAD_SAMPLE_POLICIES)
        if not 0.0 < self.folder_val_fraction < 1.0:
            raise ValueError(
                f"data.folder_val_fraction={self.folder_val_fraction} must be in (0, 1): a flat "
                "folder is divided into disjoint train and val parts (or lay out train/ and val/)"
            )
        dataset = self.dataset.strip().lower()
        for f in fields(self):
            prefix, value = f.name.split("_")[0], getattr(self, f.name)
            if prefix in ("folder", "hf") and dataset != prefix and value != f.default:
                raise ValueError(
                    f"data.{f.name}={value!r} applies to --dataset {prefix} only, but "
                    f"data.dataset={self.dataset!r}; remove it or use {prefix}"
                )
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size} must be >= 1")
        if not 0.0 < self.min_valid <= 1.0:
            raise ValueError(f"data.min_valid={self.min_valid} must be in (0, 1]")
        for name in ("limit_train", "limit_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name}={value} must be >= 1 (or null for all)")


@dataclass(frozen=True)
class ProbeConfig:
    stages: tuple[str, ...] | None = _help(
        "stages to probe; default encoder, adapter and llm.1..L", None
    )
    vision_blocks: bool = _help("also probe every vision block (vision.1..Lv)", False)
    final_norm: bool = _help("also probe llm.final_norm", False)
    solver: str = _help("sgd (AdamW, cross-entropy) or lda (closed form)", "sgd")
    lrs: tuple[float, ...] = _help("sgd learning rates trained side by side", (1e-3, 1e-2, 1e-1))
    weight_decay: float = _help("sgd AdamW weight decay", 0.0)
    epochs: int = _help("sgd passes over the training split (the limit under early stopping)", 10)
    early_stopping: bool = _help(
        "sgd: score the held-out loss after every epoch and stop once it stops improving", True
    )
    patience: int = _help("sgd early stopping: epochs without improvement before stopping", 2)
    min_delta: float = _help(
        "sgd early stopping: relative held-out loss improvement that counts", 0.005
    )
    holdout_fraction: float = _help(
        "share of training images held out to pick the learning rate", 0.1
    )
    eval_every: int | None = _help(
        "sgd early stopping: score the held-out loss every this many training batches (the "
        "convergence check's granularity, so one epoch can converge); null: after every epoch",
        None,
    )
    exact: bool = _help(
        "float64 probe arithmetic (sgd gradient, lda scatter): bitwise equal across process "
        "counts, but 1/32-1/64 speed on most GPUs; false: float32 GEMMs, float64 accumulation",
        False,
    )
    gemm: str = _help(
        "probe GEMM precision on the default path: float32, tf32 (CUDA tensor cores) or "
        "bfloat16 (inputs rounded to bf16, float32 accumulation); float32 with exact",
        "float32",
    )
    warmup_batches: int = _help("batches used to estimate the frozen standardisation", 4)
    soft_labels: bool = _help("train on per-token class histograms instead of majority", False)
    shrinkage: float = _help("lda covariance shrinkage toward the scaled identity", 0.1)
    pixel_level: bool = _help("also score at pixel level (upsampled to the original image)", True)
    bootstrap: int = _help("bootstrap resamples over images for 95% intervals (0: off)", 1000)
    position_band: float = _help(
        "share of token positions in the early and in the late band of the per-position "
        "bidirectional-minus-causal interval",
        0.25,
    )
    qualitative: int = _help("evaluation images drawn as qualitative panels", 4)
    qualitative_stages: tuple[str, ...] | None = _help(
        "stages drawn in the panels; default encoder, adapter and 3 LLM layers", None
    )
    cache_dir: str | None = _help(
        "train from an fp16 feature cache here (written on first use; null: stream)", None
    )
    cache_stages: tuple[str, ...] | None = _help(
        "stages stored in the feature cache; default the probed stages", None
    )
    cache_tokens_per_image: int | None = _help(
        "cache a seeded random subset of this many tokens per image; null: all", None
    )

    def __post_init__(self):
        _check_choice("probe.solver", self.solver, SOLVERS)
        if self.cache_tokens_per_image is not None and self.cache_tokens_per_image < 1:
            raise ValueError(
                f"probe.cache_tokens_per_image={self.cache_tokens_per_image} must be >= 1 "
                "(or null for all tokens)"
            )
        if self.epochs < 1:
            raise ValueError(f"probe.epochs={self.epochs} must be >= 1")
        if self.patience < 1:
            raise ValueError(f"probe.patience={self.patience} must be >= 1 epochs")
        if not 0.0 <= self.min_delta < 1.0:
            raise ValueError(f"probe.min_delta={self.min_delta} must be in [0, 1)")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"probe.lrs={self.lrs} must be positive learning rates")
        _check_choice("probe.gemm", self.gemm, ("float32", "tf32", "bfloat16"))
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(
                f"probe.eval_every={self.eval_every} must be >= 1 training batches (or null: "
                "after every epoch)"
            )
        if self.exact and self.gemm != "float32":
            raise ValueError(
                f"probe.gemm={self.gemm!r} conflicts with probe.exact=true (float64 arithmetic); "
                "set one of them"
            )
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"probe.holdout_fraction={self.holdout_fraction} must be in [0, 1)")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"probe.shrinkage={self.shrinkage} must be in [0, 1]")
        if not 0.0 < self.position_band <= 0.5:
            raise ValueError(f"probe.position_band={self.position_band} must be in (0, 0.5]")
        if self.bootstrap < 0:
            raise ValueError(f"probe.bootstrap={self.bootstrap} must be >= 0 (0: off)")


def _default_sections() -> dict[str, Any]:
    from seglens.analyses import by_config_key

    return {key: a.config() for key, a in by_config_key().items()}


@dataclass(frozen=True)
class RunConfig:
    """The whole run: core settings, then one section per registered analysis.

    The analyses' sections (``probe``, ``knockout``, ...) come from the registry
    (``seglens.analyses``): each is read as an attribute (``config.knockout.top_k``) and is a
    top-level key of the YAML file and of ``to_dict``.
    """

    out: str = _help("run directory", "runs/run")
    seed: int = _help("seed for data order, holdout split, sgd init and controls", 0)
    overwrite: bool = _help("replace an existing run directory", False)
    resume: bool = _help("continue a killed run from its checkpoint (same results)", False)
    checkpoint_every: int = _help("checkpoint every N batches (0: at phase ends only)", 50)
    model: ModelConfig = _help("the model", factory=ModelConfig)
    data: DataConfig = _help("the dataset", factory=DataConfig)
    sections: dict[str, Any] = field(
        default_factory=_default_sections,
        repr=False,
        metadata={"help": "the analyses' sections, by config key (seglens.analyses)"},
    )

    def __post_init__(self):
        if self.resume and self.overwrite:
            raise ValueError("resume=True and overwrite=True contradict each other; choose one")
        if self.checkpoint_every < 0:
            raise ValueError(
                f"checkpoint_every={self.checkpoint_every} must be >= 0 (0: at phase ends only)"
            )
        # A section left out (an analysis registered after this config was built) gets defaults.
        missing = {k: a.config() for k, a in _analyses().items() if k not in self.sections}
        if missing:
            object.__setattr__(self, "sections", {**self.sections, **missing})

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the analyses' sections.
        if name.startswith("__") or name == "sections":
            raise AttributeError(name)
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(
            f"RunConfig has no section {name!r}; sections: {', '.join(sections) or 'none'}"
        )

    def __repr__(self) -> str:
        core = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in _core_fields())
        extra = ", ".join(f"{k}={v!r}" for k, v in self.sections.items())
        return f"RunConfig({core}, {extra})"

    def to_dict(self) -> dict:
        out = {f.name: _plain_dataclass(getattr(self, f.name)) for f in _core_fields()}
        return out | {k: dataclasses.asdict(v) for k, v in self.sections.items()}

    def replace(self, **overrides: Any) -> RunConfig:
        """Apply dotted overrides (``{"probe.solver": "lda"}``); ``None`` values are skipped."""
        data = self.to_dict()
        for key, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if part not in node:
                    raise ValueError(_unknown_key(part, node))
                node = node[part]
            node[leaf] = value
        return from_dict(RunConfig, data)


def _analyses() -> dict[str, Any]:
    from seglens.analyses import by_config_key

    return by_config_key()


def _core_fields() -> list:
    return [f for f in fields(RunConfig) if f.name != "sections"]


def _plain_dataclass(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _unknown_key(key: str, known: Any, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return f"unknown config key '{prefix}{key}'{hint}; known keys: {', '.join(sorted(known))}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if annotation is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {where!r} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"config key {where!r} must be a mapping, got {value!r}")
        return from_dict(annotation, value, prefix=f"{where}.")
    if origin is tuple:
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # one name for a list of names: `knockout.control_pool: pair`
        if not isinstance(value, list | tuple):
            raise ValueError(f"config key {where!r} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, where) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {where!r} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {where!r} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"config key {where!r} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {where!r} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from plain data, refusing unknown keys and bad types.

    For ``RunConfig`` the keys of the registered analyses' sections are known too."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    analyses = _analyses() if cls is RunConfig else {}
    if cls is RunConfig:
        known = (known - {"sections"}) | set(analyses)
    for key in data:
        if key not in known:
            raise ValueError(_unknown_key(key, known, prefix))
    if cls is not RunConfig:
        kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
        return cls(**kwargs)
    kwargs = {k: _coerce(v, hints[k], k) for k, v in data.items() if k not in analyses}
    sections = {
        key: _coerce(data[key], analysis.config, key) if key in data else analysis.config()
        for key, analysis in analyses.items()
    }
    return RunConfig(**kwargs, sections=sections)


def load_config(path: str | Path | None = None, **overrides: Any) -> RunConfig:
    """Defaults < YAML file < dotted overrides (CLI). YAML is read with the safe loader."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        try:
            config = from_dict(RunConfig, data)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e
    return config.replace(**overrides)


def config_help(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every option, for docs and ``--help``; for ``RunConfig``
    the registered analyses' sections follow the core options."""
    rows = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if cls is RunConfig and f.name == "sections":
            for section, analysis in _analyses().items():
                rows += config_help(analysis.config, f"{prefix}{section}.")
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(
            f.default_factory
        ):
            rows += config_help(f.default_factory, f"{key}.")
        else:
            rows.append((key, f.metadata.get("help", ""), f.default))
    return rows


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # import machinery probes (__path__, ...)
        raise AttributeError(name)
    # The analyses' config sections, where they were before they moved into their modules.
    from seglens.analyses import analyses

    for analysis in analyses().values():
        if analysis.config is not None and analysis.config.__name__ == name:
            return analysis.config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
