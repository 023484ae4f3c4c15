"""tessera.metrics.scib against `tessera eval` on the same embedding, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import tessera

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TESSERA_SHARED_DATA", ROOT.parent / "shared" / "data"))
PBMC = SHARED / "pbmc68k_counts.zarr"
NAMES = ["Silhouette label", "KMeans NMI", "KMeans ARI", "cLISI", "Silhouette batch", "iLISI",
         "Graph connectivity", "Bio conservation", "Batch correction", "Total"]


@pytest.fixture()
def embedded() -> ad.AnnData:
    adata = ad.read_zarr(PBMC)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "a", "b")
    rng = np.random.default_rng(0)
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    # Types as clusters, plus noise: a clear but imperfect embedding.
    adata.obsm["X_test"] = (np.eye(10)[codes] * 3 + rng.normal(size=(adata.n_obs, 10))).astype(
        np.float32
    )
    return adata


def test_scores_are_tessera_evals(embedded, tmp_path):
    scores = tessera.metrics.scib(embedded, "X_test", "cell_type", "batch")
    assert list(scores.index) == NAMES and list(scores.columns) == ["kind", "value"]
    assert scores.loc["KMeans NMI", "kind"] == "Bio conservation"
    values = scores["value"]
    assert values.between(0, 1).all() and values["KMeans NMI"] > 0.5
    binary = os.environ.get("TESSERA_BIN")
    if not binary:
        pytest.skip("TESSERA_BIN (the tessera binary) is not set")
    with ad.settings.override(allow_write_nullable_strings=True):
        embedded.write_zarr(tmp_path / "e.zarr")
    subprocess.run(
        [binary, "eval", "--data", str(tmp_path / "e.zarr"), "--embedding-key", "X_test",
         "--label-key", "cell_type", "--batch-key", "batch", "--out", str(tmp_path / "out")],
        check=True, capture_output=True,
    )
    cli = json.loads((tmp_path / "out" / "eval.json").read_text())["scores"]
    for name, key in (("KMeans NMI", "nmi"), ("iLISI", "ilisi"), ("Total", "total"),
                      ("Silhouette label", "silhouette_label")):
        assert values[name] == cli[key], name


def test_without_batches_the_batch_metrics_are_nan_and_missing_labels_are_left_out(embedded):
    scores = tessera.metrics.scib(embedded, "X_test", "cell_type")["value"]
    assert np.isnan(scores["iLISI"]) and np.isnan(scores["Total"])
    assert scores["Bio conservation"] > 0.3
    embedded.obs["partial"] = embedded.obs["cell_type"].astype(object)
    embedded.obs.loc[embedded.obs_names[:100], "partial"] = np.nan
    fewer = tessera.metrics.scib(embedded, "X_test", "partial", "batch")["value"]
    assert fewer["KMeans NMI"] != tessera.metrics.scib(
        embedded, "X_test", "cell_type", "batch"
    )["value"]["KMeans NMI"]


def test_bad_keys_and_embeddings_are_refused(embedded):
    with pytest.raises(KeyError, match="X_nope"):
        tessera.metrics.scib(embedded, "X_nope", "cell_type")
    with pytest.raises(KeyError, match="kind"):
        tessera.metrics.scib(embedded, "X_test", "kind")
    embedded.obsm["X_nan"] = embedded.obsm["X_test"].copy()
    embedded.obsm["X_nan"][5, 2] = np.nan
    with pytest.raises(ValueError, match="cell 5"):
        tessera.metrics.scib(embedded, "X_nan", "cell_type")
