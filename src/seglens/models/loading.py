"""Turn a model name (tiny registry name, hub id or local path) into a ready ``VLM``.

The family registry maps HF ``model_type`` to an adapter; anything else is refused with the list
of what is supported. ``trust_remote_code`` stays off unless the caller asks, and is logged.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from seglens.data.geometry import Geometry
from seglens.distributed import rank_device
from seglens.models.base import ModelFamily
from seglens.models.processing import load_text_image_processor
from seglens.models.registry import registry
from seglens.models.tiny import CLIP_MEAN, CLIP_STD
from seglens.models.vlm import DEFAULT_PROMPT, VLM

log = logging.getLogger(__name__)

# HF model_type -> adapter, and the seeded tiny models: both declared by the family modules
# (seglens.models.families), collected by the registry.
FAMILIES: dict[str, type[ModelFamily]] = registry().model_types
TINY_MODELS = registry().tiny


# Named checkpoints: name -> a function returning the local folder to load (e.g. a trained model
# shipped inside the package). ``load_model(name)`` loads that folder and keeps ``name`` as the
# model's name in results. Register one with ``NAMED_MODELS["name"] = resolve``.
def _organism() -> Path:
    from seglens.organism import checkpoint_path

    return checkpoint_path()


NAMED_MODELS: dict[str, Callable[[], str | Path]] = {
    "organism": _organism,  # the tiny LLaVA trained on synthetic scenes (seglens.organism)
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"bf16"``/``"float16"``/... -> torch dtype; ``"auto"``/None stays ``"auto"``."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def supported_families() -> str:
    return "; ".join(f"{name}: {cls.description}" for name, cls in registry().families.items())


def family_for(model: nn.Module, name: str, options: dict | None = None) -> ModelFamily:
    """The family adapter of ``model``; ``options`` are keyword arguments of its constructor
    (e.g. ``{"grid": "tiles"}`` for LLaVA-NeXT)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"{name}: model type {model_type!r} is not supported. Supported families: "
            f"{supported_families()}. Named models: {_known_names()}."
        )
    cls = FAMILIES[model_type]
    options = dict(options or {})
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "model"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"{name}: family {cls.name!r} has no option(s) {unknown}; its options are "
            f"{sorted(known) or 'none'}"
        )
    return cls(model, **options)


def geometry_from_processor(config: dict, image_size: int, override: str | None) -> Geometry:
    """The geometry the checkpoint's image processor applies, unless overridden.

    ``do_pad`` (LLaVA's expand-to-square) -> ``pad``; ``do_center_crop`` -> ``crop``;
    otherwise ``resize``. The side S is always the vision tower's ``image_size``.
    """
    mean = config.get("image_mean") or CLIP_MEAN
    if override is not None:
        mode = override
    elif config.get("do_pad"):
        mode = "pad"
    elif config.get("do_center_crop"):
        mode = "crop"
    else:
        mode = "resize"
    fill = tuple(int(m * 255) for m in mean)
    return Geometry(mode=mode, size=image_size, fill=fill)


def _wrap(
    model,
    processor,
    name: str,
    geometry: str | None,
    prompt: str,
    family_options: dict | None = None,
) -> VLM:
    family = family_for(model, name, family_options)
    image_cfg = processor.image_processor.to_dict()
    tokenizer = processor.tokenizer
    image_token = family.image_placeholder(processor)

    def encode_prompt(text: str) -> list[int]:
        own = family.prompt_ids(text, processor)  # PaliGemma: no chat template, its own layout
        if own is not None:
            return own
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}
        ]
        rendered = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        if rendered.count(image_token) != 1:
            raise ValueError(f"{name}: the chat template must place exactly one {image_token!r}")
        # Expand the placeholder to the image token layout, as the HF processor does; a template
        # that renders BOS itself must not get a second one from the tokenizer.
        bos = tokenizer.bos_token
        add_special = not (bos and rendered.startswith(bos))
        text = family.expand_image_placeholder(rendered, processor)
        return tokenizer(text, add_special_tokens=add_special)["input_ids"]

    vlm = VLM(
        model,
        family,
        geometry=geometry_from_processor(
            image_cfg, family.image_size, geometry or family.geometry_mode(image_cfg)
        ),
        mean=image_cfg.get("image_mean") or CLIP_MEAN,
        std=image_cfg.get("image_std") or CLIP_STD,
        encode_prompt=encode_prompt,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        prompt=prompt,
        name=name,
        patch_size=family.patch_size,
    )
    vlm.processor = processor
    return vlm


def _tiny_vlm(
    build,
    name: str,
    dtype,
    device: str | None,
    geometry: str | None,
    prompt: str,
    family_options: dict | None = None,
) -> VLM:
    """``build(dtype=...)`` -> (HF model, processor), moved to ``device`` and wrapped as a VLM."""
    torch_dtype = resolve_dtype(dtype)
    model, processor = build(dtype=torch.float32 if torch_dtype == "auto" else torch_dtype)
    if device is not None:
        model = model.to(device)
    return _wrap(model, processor, name, geometry, prompt, family_options)


def tiny_llava(
    vision: str = "clip",
    *,
    image_size: int = 224,
    patch_size: int = 14,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    geometry: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    family_options: dict | None = None,
    **sizes,
) -> VLM:
    """A seeded random tiny LLaVA (CLIP, SigLIP or DINOv2 tower) built from configs.

    Args:
        vision: ``clip``, ``siglip`` or ``dinov2``.
        image_size, patch_size: input side S and patch p; the grid is S / p per side.
        seed: weight seed (the global RNG is left untouched).
        attn_implementation: ``sdpa`` or ``eager``.
        geometry: ``pad``/``crop``/``resize``; default: the processor's (crop; resize for SigLIP).
        family_options: keyword arguments of the family adapter (LLaVA-1.5 has none).
        sizes: ``vision_width``, ``vision_layers``, ``text_width``, ``text_layers``, ``heads``,
            ``strategy`` (``vision_feature_select_strategy``; ``full`` keeps CLIP's CLS token).
    """
    vlm = tiny_model(
        "llava",
        vision=vision,
        image_size=image_size,
        patch_size=patch_size,
        seed=seed,
        attn_implementation=attn_implementation,
        dtype=dtype,
        device=device,
        geometry=geometry,
        prompt=prompt,
        family_options=family_options,
        **sizes,
    )
    vlm.name = f"tiny-{vision}"
    return vlm


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    geometry: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    family_options: dict | None = None,
    **sizes,
) -> VLM:
    """A seeded random tiny model of a family (``gemma3``, ``llava_next`` ...) built from configs.

    Args:
        family: a family name (``registry().families``); its ``build_tiny`` builds the model.
        seed: weight seed (the global RNG is left untouched).
        attn_implementation: ``sdpa`` or ``eager``.
        geometry: override the processor's geometry.
        family_options: keyword arguments of the family adapter (``{"grid": "tiles"}``).
        sizes: builder-specific sizes (see the family's ``tiny_*_hf`` builder).
    """
    families = registry().families
    if family not in families:
        close = difflib.get_close_matches(family, list(families), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"no tiny builder for family {family!r}{hint}; known: {sorted(families)}")
    build = partial(
        families[family].build_tiny, seed=seed, attn_implementation=attn_implementation, **sizes
    )
    name = f"tiny-{family}"
    return _tiny_vlm(build, name, dtype, device, geometry, prompt, family_options)


def _known_names() -> str:
    return ", ".join([*NAMED_MODELS, *TINY_MODELS])


def _placement(device: str | None, device_map: str | dict | None) -> str | dict | None:
    """``from_pretrained``'s device_map: a ``device_map`` as given, else the whole model straight
    onto an accelerator (no full host copy first: 8 x 14 GB for 7B under an 8-GPU torchrun),
    which transformers does through accelerate; None (load on the CPU) without it."""
    if device_map is not None or device is None or torch.device(device).type == "cpu":
        return device_map
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        log.warning(
            "accelerate is not installed: the model loads on the CPU, then moves to %s (a full "
            "host copy per process); pip install 'seglens[gpu]' loads it straight onto it",
            device,
        )
        return None
    return {"": torch.device(device)}


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    geometry: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    family_options: dict | None = None,
) -> VLM:
    """Load a supported checkpoint (hub id or local folder) or a tiny model by registry name.

    Args:
        name_or_path: a named model (``NAMED_MODELS``), a tiny model name (``TINY_MODELS``:
            ``tiny-clip``, ``tiny-gemma3``, ...), a hub id such as
            ``llava-hf/llava-1.5-7b-hf``, or a local folder saved with ``save_pretrained``.
        dtype: ``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``.
        device: where to put the whole model (ignored with ``device_map``).
        device_map: accelerate placement (e.g. ``"auto"``) to split a model over GPUs.
        attn_implementation: ``sdpa`` (default) or ``eager``; both honour custom masks.
        trust_remote_code: allow code from the checkpoint (off unless asked; logged).
        geometry: override the processor's geometry (``pad``, ``crop``, ``resize``).
        prompt: the text after the image.
        family_options: keyword arguments of the family adapter, e.g. ``{"grid": "tiles"}`` to
            probe LLaVA-NeXT's stitched high-resolution tiles instead of its base image.
    """
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(
            f"attn_implementation {attn_implementation!r}: seglens needs a backend that honours "
            "custom 4D masks; use 'sdpa' (default) or 'eager'"
        )
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "sees no CUDA GPU"
        raise ValueError(
            f"--device {device}: this torch {torch.__version__} is {build}; pass --device cpu, "
            "or install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
        )
    device = rank_device(device, device_map)  # under torchrun: cuda:LOCAL_RANK, or refused
    if device_map is not None:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(
                f"device_map={device_map!r} needs the accelerate package to place the model; "
                "install it with: pip install 'seglens[gpu]' (or pip install accelerate)"
            )
        if name_or_path in TINY_MODELS:
            raise ValueError(
                f"device_map is for checkpoints too big for one device; {name_or_path} is a "
                "tiny test model: use --device instead"
            )
    if name_or_path in TINY_MODELS:
        spec = TINY_MODELS[name_or_path]
        vlm = tiny_model(
            spec.family.name,
            **spec.kwargs,
            dtype=dtype,
            device=device,
            geometry=geometry,
            attn_implementation=attn_implementation,
            prompt=prompt,
            family_options={**spec.family_options, **(family_options or {})} or None,
        )
        vlm.name = name_or_path  # the registry name, as results and figures should show it
        return vlm
    if name_or_path in NAMED_MODELS:
        vlm = load_model(
            str(NAMED_MODELS[name_or_path]()),
            dtype=dtype,
            device=device,
            device_map=device_map,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            geometry=geometry,
            prompt=prompt,
            family_options=family_options,
        )
        vlm.name = name_or_path
        return vlm
    if name_or_path.startswith("tiny") and not Path(name_or_path).exists():
        close = difflib.get_close_matches(name_or_path, [*NAMED_MODELS, *TINY_MODELS], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown model {name_or_path!r}{hint}. Named models: {_known_names()}; "
            "or pass a hub id / local checkpoint folder."
        )
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if trust_remote_code:
        log.warning("trust_remote_code=True: code shipped with %s will run", name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r}: {e}. Pass a local checkpoint folder, or a hub "
            "id that is cached (set HF_HUB_OFFLINE=0 to allow downloads). Named models: "
            f"{_known_names()}."
        ) from e
    if config.model_type not in FAMILIES:
        raise ValueError(
            f"{name_or_path}: model type {config.model_type!r} is not supported. Supported "
            f"families: {supported_families()}."
        )
    placement = _placement(device, device_map)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path,
            dtype=resolve_dtype(dtype),
            device_map=placement,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,  # never unpickle weights
        )
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load the weights of {name_or_path!r}: {e}. seglens reads weights only from "
            "safetensors files; convert a pickled checkpoint (pytorch_model.bin) once, where you "
            "trust it, with model.save_pretrained(folder) and load that folder"
        ) from e
    if device is not None and placement is None:
        model = model.to(device)  # loaded on the CPU first (no accelerate, or the CPU itself)
    model.eval()
    family_cls = FAMILIES[config.model_type]
    if family_cls.hf_processor:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    else:
        processor = load_text_image_processor(
            name_or_path,
            family_cls(model).image_placeholder(None),
            trust_remote_code=trust_remote_code,
        )
    return _wrap(model, processor, name_or_path, geometry, prompt, family_options)
