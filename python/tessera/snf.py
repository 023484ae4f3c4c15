"""Similarity network fusion with snfpy's interface, computed by tessera's engine (the
``tessera snf`` code, tested against snfpy): affinities, fusion, the number of clusters by
eigengap and spectral clustering, on numpy arrays."""

from __future__ import annotations

from typing import Iterable

import numpy as np

from . import _tessera


def make_affinity(
    *data: np.ndarray,
    metric: str = "sqeuclidean",
    K: int = 20,  # noqa: N803 - snfpy's name
    mu: float = 0.5,
    normalize: bool = True,
) -> list[np.ndarray]:
    """One samples x samples affinity per view (samples x features array): z-scored features,
    ``metric`` distances (``sqeuclidean``, ``euclidean``, ``cosine``, ``correlation``), the
    scaled exponential kernel with ``K`` neighbours and ``mu``. As snfpy, a single view comes
    back in a list of one."""
    if not normalize:
        raise ValueError("normalize=False is not supported: features are always z-scored")
    return [
        _tessera.affinity(
            np.ascontiguousarray(np.asarray(view, dtype=np.float64)), metric, int(K), float(mu)
        )
        for view in data
    ]


def snf(*affinities: np.ndarray, K: int = 20, t: int = 20, alpha: float = 1.0) -> np.ndarray:  # noqa: N803
    """The fused network of the views' affinities (each samples x samples, same samples)."""
    if len(affinities) == 1 and isinstance(affinities[0], (list, tuple)):
        affinities = tuple(affinities[0])
    if len(affinities) < 2:
        raise ValueError(f"{len(affinities)} affinity given: fusion needs at least 2 views")
    views = [np.ascontiguousarray(np.asarray(a, dtype=np.float64)) for a in affinities]
    return _tessera.snf(views, int(K), int(t), float(alpha))


def get_n_clusters(
    arr: np.ndarray, n_clusters: Iterable[int] = range(2, 6)
) -> tuple[int, int]:
    """The two best numbers of clusters of the network by eigengap, best first (snfpy's)."""
    ranked = _tessera.eigengap(
        np.ascontiguousarray(np.asarray(arr, dtype=np.float64)), [int(c) for c in n_clusters]
    )
    if len(ranked) < 2:
        raise ValueError("n_clusters must hold at least 2 candidates above 1")
    return ranked[0][0], ranked[1][0]


def spectral_clustering(network: np.ndarray, n_clusters: int, random_state: int = 0) -> np.ndarray:
    """Cluster labels (0..n_clusters) of the network's samples."""
    labels = _tessera.spectral_clustering(
        np.ascontiguousarray(np.asarray(network, dtype=np.float64)), int(n_clusters),
        int(random_state),
    )
    return np.asarray(labels, dtype=np.int64)
