"""Helpers the family tests share: HF reference pieces and hooks on the LLM input embeddings.

Each ``test_families_<family>.py`` module exports ``REFERENCES`` (family name -> a function
``(vlm, batch) -> {stage: tensor}`` computed from HF's own outputs) and ``PLANTS`` (family name ->
``(vlm, r, c, batch_size) -> hook handle`` adding a signal to every vision patch of grid cell
(r, c), located independently of the family code); ``test_families.py`` collects them and checks
that every registered family has both.
"""

from __future__ import annotations

import torch


def language_model(vlm):
    """The HF LLM module (``language_model``; Idefics3: ``text_model``)."""
    inner = vlm.model.model
    return getattr(inner, "language_model", None) or inner.text_model


def hf_forward_last(vlm, **inputs):
    """HF's own forward with every hidden state, plus the last decoder block's output (hook)."""
    last = {}
    block = language_model(vlm).layers[-1]
    handle = block.register_forward_hook(lambda _m, _a, out: last.setdefault("h", out))
    try:
        with torch.no_grad():
            out = vlm.model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return out, last["h"]


def gather(h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T, D) states, (B, N) positions -> (B, N, D)."""
    return h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))


def llm_reference(vlm, batch, **inputs) -> dict[str, torch.Tensor]:
    """``llm.0`` (the LLM input embeddings), ``llm.1..L`` and ``llm.final_norm`` from HF's own
    forward with ``inputs`` (``hidden_states``; the last block's output read with a hook)."""
    out, last_block = hf_forward_last(vlm, **inputs)
    pos, L = batch.image_positions, vlm.num_llm_layers
    ref = {f"llm.{i}": gather(out.hidden_states[i], pos) for i in range(L)}
    ref[f"llm.{L}"] = gather(last_block, pos)
    ref["llm.final_norm"] = gather(out.hidden_states[L], pos)
    return ref


def edit_llm_input(vlm, batch, edit):
    """Hook ``edit((B, N, D) -> (B, N, D))`` onto the LLM input embeddings at the grid positions.

    A forward pre-hook on the language model, family independent: every HF VLM here calls its
    language model with ``inputs_embeds``. Returns the hook handle.
    """
    positions = batch.image_positions

    def hook(_m, args, kwargs):
        x = kwargs["inputs_embeds"].clone()
        index = positions.to(x.device)[..., None].expand(-1, -1, x.shape[-1])
        x.scatter_(1, index, edit(x.gather(1, index)))
        return args, {**kwargs, "inputs_embeds": x}

    return language_model(vlm).register_forward_pre_hook(hook, with_kwargs=True)


def plant_rows(module, rows_of_cell, signal: float = 10.0, *, pre: bool = False):
    """Hook adding ``signal`` to the rows ``rows_of_cell(h) -> index`` of ``module``'s output
    (``pre=True``: its first input). ``index`` selects along the flattened leading dimensions."""

    def add(h):
        h = h.clone()
        flat = h.view(-1, h.shape[-1])
        flat[rows_of_cell(h)] += signal
        return h

    if pre:
        return module.register_forward_pre_hook(lambda _m, args: (add(args[0]), *args[1:]))

    def post(_m, _a, out):
        if isinstance(out, tuple):
            return (add(out[0]), *out[1:])
        return add(out)

    return module.register_forward_hook(post)


def llm_stages(vlm, batch, specs=None) -> dict[str, torch.Tensor]:
    """``llm.1..L`` at the grid positions, under ``specs`` (``intervene``) when given."""
    from seglens.interventions import intervene

    stages = [f"llm.{i}" for i in range(1, vlm.num_llm_layers + 1)]
    if specs is None:
        return vlm.capture(batch, stages)
    with intervene(vlm, specs):
        return vlm.capture(batch, stages)


def earlier_slots_move(vlm, batch, specs=None) -> bool:
    """Bump image slot j's LLM input embedding; later slots must move. Return whether slots < j
    moved too (they may only under a bidirectional image block)."""
    j = vlm.num_image_tokens // 2
    base = llm_stages(vlm, batch, specs)

    def bump(x):
        x = x.clone()
        x[:, j] += 1.0
        return x

    handle = edit_llm_input(vlm, batch, bump)
    try:
        bumped = llm_stages(vlm, batch, specs)
    finally:
        handle.remove()
    assert all(not torch.equal(base[s][:, j:], bumped[s][:, j:]) for s in base)
    return any(not torch.equal(base[s][:, :j], bumped[s][:, :j]) for s in base)


def record_llm_input(vlm, batch, store: dict):
    """Hook keeping the LLM input embeddings at the grid positions in ``store["x"]``."""

    def keep(x):
        store.setdefault("x", x.clone())
        return x

    return edit_llm_input(vlm, batch, keep)


_MODELS: dict = {}


def cached_model(name: str):
    """``load_model(name)`` once per session (tiny models; the tests remove their hooks)."""
    from seglens.models import load_model

    if name not in _MODELS:
        _MODELS[name] = load_model(name, dtype="float32")
    return _MODELS[name]


def tiny_names(family_cls) -> list[str]:
    """The registered tiny models whose family is ``family_cls`` or a subclass of it."""
    from seglens.models import registry

    return [n for n, spec in registry().tiny.items() if issubclass(spec.family, family_cls)]
