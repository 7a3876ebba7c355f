"""Keep UMAP's numba compilation between runs: most of umap-learn's jitted functions do not ask
numba to cache their machine code, so every new process compiled them again (about 13 s of a
UMAP call on a 2-core CPU, against 3 s of work for 1,500 tokens).

``cache_umap_compilation`` turns on numba's own on-disk cache for them, as ``cache=True`` would
(the functions pynndescent already marks so are cached in the same place): the cache sits in
``__pycache__`` next to umap's sources, or under ``NUMBA_CACHE_DIR`` when it is set. numba keys
it by source file and signature and recompiles when either changes, so results are unchanged.
"""

from __future__ import annotations

import functools


@functools.cache
def cache_umap_compilation() -> int:
    """Enable numba's disk cache on every uncached jitted function of umap-learn (once per
    process); return how many were enabled."""
    from numba.core.dispatcher import Dispatcher
    from umap import distances, layouts, sparse, spectral, umap_, utils

    enabled = 0
    for module in (umap_, layouts, spectral, utils, distances, sparse):
        for function in vars(module).values():
            if isinstance(function, Dispatcher) and type(function._cache).__name__ == "NullCache":
                function.enable_caching()
                enabled += 1
    return enabled
