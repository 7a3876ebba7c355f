"""seglens: where in a multimodal LLM does an image's per-pixel semantic information live?

The public API is imported lazily so that ``import seglens`` stays cheap and does nothing.
"""

from __future__ import annotations

__version__ = "0.1.0"
