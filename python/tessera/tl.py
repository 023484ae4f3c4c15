"""Tools on an AnnData's embeddings, named as scanpy's (``sc.tl``), computed by tessera's engine."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _tessera


def umap(
    adata: Any,
    use_rep: str = "X_tessera",
    n_neighbors: int = 15,
    min_dist: float = 0.5,
    spread: float = 1.0,
    n_epochs: int | None = None,
    negative_sample_rate: int = 5,
    random_state: int = 0,
    key_added: str = "X_umap",
) -> None:
    """A 2-D UMAP of ``adata.obsm[use_rep]`` into ``adata.obsm[key_added]``, for ``sc.pl.umap``.

    The layout ``tessera plot`` draws: umap-learn's algorithm with scanpy's defaults (15
    neighbours, ``min_dist`` 0.5, ``spread`` 1; 500 epochs up to 10,000 cells, else 200) on
    exact neighbours, started from the first two principal components (umap-learn's
    ``init="pca"``) and seeded by ``random_state`` (one thread: the same seed gives the same
    layout). Exact neighbours cost O(n² d): subsample atlases. The settings are recorded in
    ``adata.uns["umap"]["params"]``.
    """
    if use_rep not in adata.obsm:
        raise KeyError(f"use_rep {use_rep!r} is not in adata.obsm (it has {list(adata.obsm)})")
    x = np.asarray(adata.obsm[use_rep])
    if x.ndim != 2:
        raise ValueError(f"adata.obsm[{use_rep!r}] has {x.ndim} dimensions (expected 2)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        layout = _tessera.umap(
            x, n_neighbors, min_dist, spread, n_epochs, negative_sample_rate, random_state
        )
    except ValueError as e:
        raise ValueError(f"adata.obsm[{use_rep!r}]: {e}") from None
    adata.obsm[key_added] = layout
    adata.uns["umap"] = {
        "params": {
            "use_rep": use_rep,
            "n_neighbors": n_neighbors,
            "min_dist": min_dist,
            "spread": spread,
            "random_state": random_state,
        }
    }
