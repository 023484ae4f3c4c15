"""scIB metrics of an embedding in an AnnData, computed by tessera's engine (``tessera eval``):
the ten scores of scib-metrics' Benchmarker (tested against it), without JAX."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import _tessera


def scib(
    adata: Any,
    embedding_key: str,
    label_key: str,
    batch_key: str | None = None,
) -> pd.DataFrame:
    """Bio conservation and batch correction of ``adata.obsm[embedding_key]``.

    Returns a DataFrame indexed by metric name (Silhouette label, KMeans NMI, KMeans ARI, cLISI,
    Silhouette batch, iLISI, Graph connectivity, Bio conservation, Batch correction, Total)
    with columns ``kind`` and ``value``; batch metrics are NaN without ``batch_key``. Cells
    whose label or batch is missing are left out. Exact neighbours: O(n² d) time, so subsample
    atlases (``adata[idx]``) before scoring.
    """
    if embedding_key not in adata.obsm:
        raise KeyError(
            f"embedding_key {embedding_key!r} is not in adata.obsm (it has {list(adata.obsm)})"
        )
    x = np.ascontiguousarray(np.asarray(adata.obsm[embedding_key]), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"adata.obsm[{embedding_key!r}] has {x.ndim} dimensions (expected 2)")
    keep = np.ones(adata.n_obs, dtype=bool)
    codes = {}
    for field, key in (("label_key", label_key), ("batch_key", batch_key)):
        if key is None:
            continue
        if key not in adata.obs:
            raise KeyError(f"{field} {key!r} is not a column of adata.obs")
        values = pd.Categorical(adata.obs[key])
        codes[field] = values.codes
        keep &= values.codes >= 0
    labels = codes["label_key"][keep].astype(np.uint32)
    batches = (
        codes["batch_key"][keep].astype(np.uint32)
        if "batch_key" in codes
        else np.zeros(int(keep.sum()), dtype=np.uint32)
    )
    rows = _tessera.scib(np.ascontiguousarray(x[keep]), labels.tolist(), batches.tolist())
    frame = pd.DataFrame(
        [(kind, np.nan if value is None else value) for _, kind, value in rows],
        index=pd.Index([name for name, _, _ in rows], name="metric"),
        columns=["kind", "value"],
    )
    return frame
