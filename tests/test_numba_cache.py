"""UMAP's numba compilation is kept on disk: seglens turns on numba's cache for umap's jitted
functions that do not ask for it, once per process."""

from __future__ import annotations


def test_umap_functions_get_numba_disk_cache():
    from numba.core.dispatcher import Dispatcher
    from umap import layouts, umap_

    from seglens.experiments.numba_cache import cache_umap_compilation

    enabled = cache_umap_compilation()
    assert enabled > 10
    assert cache_umap_compilation() == enabled  # once per process
    jitted = [f for m in (umap_, layouts) for f in vars(m).values() if isinstance(f, Dispatcher)]
    assert jitted and all(type(f._cache).__name__ != "NullCache" for f in jitted)
