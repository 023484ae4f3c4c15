"""Similarity network fusion with snfpy's interface, computed by tessera's engine (the
``tessera snf`` code, tested against snfpy): affinities, fusion, the number of clusters by
eigengap and spectral clustering, on numpy arrays; and ``fuse``, the whole ``tessera snf`` job
on an AnnData or MuData (cells missing a modality included, optionally out of core)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.sparse as sp

from . import _anndata, _tessera


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


def fuse(
    data: Any,
    views: Sequence[str] | None = None,
    *,
    method: str = "snf",
    K: int = 20,  # noqa: N803 - snfpy's name
    t: int = 20,
    alpha: float = 1.0,
    mu: float = 0.5,
    metric: str = "sqeuclidean",
    log_normalize: bool = True,
    n_clusters: int | None = None,
    candidates: Iterable[int] = range(2, 16),
    label_key: str | None = None,
    top_k: int | None = None,
    out_of_core: str | os.PathLike[str] | None = None,
    block: int = 1024,
    seed: int = 0,
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray, dict[str, Any]]:
    """The ``tessera snf`` job on an in-memory (or backed) AnnData or MuData, with no file
    written: one view per modality of a MuData (``views``: which; default every one) or X of
    an AnnData, counts scaled to 10^4 per cell and log1p'd (``log_normalize``), z-scored,
    ``metric`` distances, the scaled exponential affinity (``K``, ``mu``); a cell that lacks a
    modality is left out of that view's affinity (``mdata.obsmap``) and joins the network
    through the others. The views are fused by ``method`` (``"snf"`` with ``K``, ``t``,
    ``alpha``; ``"nemo"``; ``"average"``) and clustered spectrally (``n_clusters``, or the best
    by eigengap among ``candidates``).

    ``top_k`` keeps each row's strongest entries (a sparse network; required out of core);
    ``out_of_core``: a path or URL for a new scratch Zarr store holding the n x n matrices in
    tiles of ``block`` (removed afterwards), so memory holds a few row blocks instead.

    Returns the network (cells x cells: a scipy CSR matrix with ``top_k``, else a dense
    array), each cell's cluster, and the report (views and their cells, eigengap scores, NMI
    and ARI against ``label_key`` (default ``cell_type`` when present), timings)."""
    if _anndata.store_of(data) is not None:
        raise ValueError(
            "fuse works on data in memory or a backed .h5ad; for a Zarr store run "
            "`tessera snf --data STORE` (it writes obsp/ and obs/ into the store), or read "
            "the store into memory"
        )
    is_mudata = hasattr(data, "mod")
    names = list(views) if views else (list(data.mod) if is_mudata else ["X"])
    if not is_mudata and names != ["X"]:
        raise ValueError(f"an AnnData has one view, X (got views={names})")
    if label_key is None and "cell_type" in data.obs:
        label_key = "cell_type"
    categoricals = [] if label_key is None else [(label_key, *_anndata.categorical(data, label_key))]
    obs_names = [str(n) for n in data.obs_names]

    def write(location: str, attached: Any) -> None:
        if is_mudata:
            modalities = _anndata.attachable_modalities(data, names, attached)
            _tessera.attach_mudata(location, obs_names, categoricals, [], modalities)
        else:
            counts = _anndata.attachable_counts(data, None, attached)
            _tessera.attach_anndata(
                location, counts, data.n_vars, obs_names,
                [str(v) for v in data.var_names], categoricals, [],
            )

    request = {
        "views": [
            {"modality": name if is_mudata else None, "obsm": None} for name in names
        ],
        "method": method,
        "snf": {"k": int(K), "t": int(t), "alpha": float(alpha)},
        "nemo_k": None,
        "mu": float(mu),
        "metric": metric,
        "log_normalise": bool(log_normalize),
        "clusters": None if n_clusters is None else int(n_clusters),
        "candidates": [int(c) for c in candidates],
        "label_key": label_key,
        "key": "snf",
        "top_k": None if top_k is None else int(top_k),
        "overwrite": False,
        "seed": int(seed),
        "out_of_core": None if out_of_core is None else {
            "scratch": str(out_of_core), "block": int(block),
        },
    }
    with _anndata.memory_store(write) as location:
        request["data"] = location
        indptr, indices, values, labels, report = _tessera.network(json.dumps(request))
    n = data.n_obs
    network = sp.csr_matrix((values, indices.astype(np.int64), indptr.astype(np.int64)),
                            shape=(n, n))
    return (
        network if top_k is not None else network.toarray(),
        np.asarray(labels, dtype=np.int64),
        json.loads(report),
    )
