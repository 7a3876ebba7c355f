"""What the forwards of one batch under several interventions share, computed once.

The knockout runs one batch many times: clean, then once per knocked-out key set and per layer
window. Each forward repeats work its intervention cannot change: the vision tower and the
adapter (an attention intervention acts only inside the LLM), and, for an intervention confined
to decoder layers ``s..e``, layers ``1..s-1``, whose inputs and masks are those of the clean
pass. ``SharedPrefix`` keeps that work from the first (clean) forward and hands it to the
later ones:

- the image features: the inner model's ``get_image_features`` (every supported family's forward
  calls it) returns the first call's output again, so the tower and adapter run once per batch;
- the decoder layers before a window: during the recorded pass each layer's output is kept; inside
  ``resume(start)`` layers ``1..start-1`` return them instead of running.

Both are exact by construction: the reused values are the very tensors the clean pass produced,
and everything after them runs as before (``tests/test_prefix.py`` checks the knockout's every
count bitwise equal with and without sharing). Hooks on the skipped modules (the ``encoder`` and
``adapter`` stages, or the decoder layers' own taps) see the reused values or, for modules that no
longer run, nothing: a capture that asks for a stage no module produced is refused.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["SharedPrefix", "shared_prefix"]

log = logging.getLogger(__name__)


class SharedPrefix:
    """The shared part of one batch's forwards (see the module docstring).

    Args:
        vlm: the model.
        layers: record the outputs of decoder layers ``1..layers`` in the first forward, so that
            later ones can resume after them (0: share only the image features).

    Attributes:
        image_calls: forwards that computed the image features (1 once shared).
        image_reused: forwards that reused them.
        layers_skipped: decoder-layer forwards replaced by a recorded output.
    """

    def __init__(self, vlm: Any, layers: int = 0):
        self._inner = vlm.family._inner
        self._decoder = vlm.family.decoder_layers()
        self._features: Any = None
        self._recorded: dict[int, Any] = {}
        self._handles: list[Any] = []
        self.image_calls = self.image_reused = self.layers_skipped = 0
        original = getattr(self._inner, "get_image_features", None)
        self._own = self._inner.__dict__.get("get_image_features")  # restored on close
        self._patched = callable(original)
        if self._patched:

            def features(*args: Any, **kwargs: Any) -> Any:
                if self._features is None:
                    self._features = original(*args, **kwargs)
                    self.image_calls += 1
                else:
                    self.image_reused += 1
                return self._features

            self._inner.get_image_features = features
        else:
            log.debug("%s has no get_image_features: image features are not shared", self._inner)
        for index in range(min(layers, len(self._decoder))):
            self._handles.append(self._decoder[index].register_forward_hook(self._record(index)))

    def _record(self, index: int) -> Any:
        def keep(_module: Any, _args: Any, output: Any) -> None:
            self._recorded.setdefault(index, output)

        return keep

    @contextmanager
    def resume(self, start: int | None) -> Iterator[None]:
        """Inside: decoder layers ``1..start-1`` return their recorded outputs without running
        (``start`` None or 1: every layer runs). Layers not recorded run as usual."""
        skipped = [i for i in range(max(0, (start or 1) - 1)) if i in self._recorded]
        # An instance-level forward (accelerate's device_map wrapper) is put back on exit.
        own = {i: self._decoder[i].__dict__.get("forward") for i in skipped}
        for index in skipped:
            self._decoder[index].forward = self._replay(index)
        try:
            yield
        finally:
            for index in skipped:
                del self._decoder[index].forward
                if own[index] is not None:
                    self._decoder[index].forward = own[index]

    def _replay(self, index: int) -> Any:
        def forward(*_args: Any, **_kwargs: Any) -> Any:
            self.layers_skipped += 1
            return self._recorded[index]

        return forward

    def close(self) -> None:
        """Undo the patches and hooks and drop what was kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._patched:
            del self._inner.get_image_features
            if self._own is not None:
                self._inner.get_image_features = self._own
        self._features, self._recorded = None, {}


@contextmanager
def shared_prefix(vlm: Any, layers: int = 0, enabled: bool = True) -> Iterator[Any]:
    """``SharedPrefix(vlm, layers)`` for the block (None when not ``enabled``), closed on exit."""
    if not enabled:
        yield None
        return
    prefix = SharedPrefix(vlm, layers)
    try:
        yield prefix
    finally:
        prefix.close()
