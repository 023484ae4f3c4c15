"""scArches-style query mapping from Python: a reference trained on some PBMC batches, a
query of the others mapped onto it (tessera map's engine)."""

from __future__ import annotations

import json

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

import tessera

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TESSERA_SHARED_DATA", ROOT.parent / "shared" / "data"))
PBMC = SHARED / "pbmc68k_counts.zarr"


def split() -> tuple[ad.AnnData, ad.AnnData]:
    """Reference: batches a and b; query: batch c (a third of the cells), every cell typed."""
    adata = ad.read_zarr(PBMC)
    adata.obs["batch"] = np.array(["a", "b", "c"])[np.arange(adata.n_obs) % 3]
    query = adata[adata.obs["batch"] == "c"].copy()
    reference = adata[adata.obs["batch"] != "c"].copy()
    return reference, query


@pytest.fixture(scope="module")
def reference() -> tuple[ad.AnnData, ad.AnnData, tessera.model.SCANVI]:
    ref, query = split()
    tessera.model.SCANVI.setup_anndata(ref, "cell_type", "Unknown", batch_key="batch")
    model = tessera.model.SCANVI(ref)
    model.train(max_epochs=100, seed=0, progress_bar=False)
    return ref, query, model


def test_a_query_of_a_new_batch_is_mapped_and_labelled(reference, tmp_path):
    ref, query, model = reference
    truth = query.obs["cell_type"].astype(str).to_numpy()
    query.obs = query.obs.drop(columns="cell_type")  # the query's labels are unknown
    mapped = tessera.model.SCANVI.load_query_data(query, model)
    assert query.obs["cell_type"].eq("Unknown").all()  # the setup filled the label column
    mapped.train(max_epochs=20, plan_kwargs={"weight_decay": 0.0})
    z = mapped.get_latent_representation()
    assert z.shape == (query.n_obs, 10) and np.all(np.isfinite(z))
    report = mapped.query_report_
    assert report["new_batches"] == ["c"] and report["epochs"] == 20
    assert report["trained_parameters"] > 0
    # Both label sources find the query's types (measured 0.78-0.82 over seeds 0-2; chance is
    # below 0.35).
    predicted = mapped.predict()
    assert (predicted == truth).mean() > 0.7
    transferred = mapped.transferred_labels_
    assert (transferred["label"].to_numpy() == truth).mean() > 0.7
    assert transferred["uncertainty"].between(0, 1).all()
    # The fine-tuned query model encodes and classifies the query's cells again, and saves
    # and loads like any model (the reference's batches and the query's).
    np.testing.assert_array_equal(mapped.get_latent_representation(query.copy()), z)
    assert (mapped.predict(query.copy()) == predicted).all()
    mapped.save(tmp_path / "q")
    loaded = tessera.model.SCANVI.load(tmp_path / "q", query.copy())
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["batch_categories"] == ["a", "b", "c"] and "query_of" in config


def test_a_saved_reference_maps_the_same_as_the_live_one(reference, tmp_path):
    ref, query, model = reference
    model.save(tmp_path / "ref")
    embeddings = []
    for source in (model, tmp_path / "ref"):
        q = query.copy()
        mapped = tessera.model.SCANVI.load_query_data(q, source)
        mapped.train(max_epochs=5, seed=3)
        embeddings.append(mapped.get_latent_representation())
    np.testing.assert_array_equal(embeddings[0], embeddings[1])


def test_prepare_query_anndata_pads_and_orders_the_genes(reference):
    ref, query, model = reference
    genes = tessera.model.SCVI.prepare_query_anndata(query, model, return_reference_var_names=True)
    assert list(genes) == list(ref.var_names)
    # A query with a tenth of the genes missing and the rest reversed.
    partial = query[:, query.var_names[::-1][: int(query.n_vars * 0.9)]].copy()
    partial.layers["counts"] = partial.X.copy()
    padded = tessera.model.SCVI.prepare_query_anndata(partial, model, inplace=False)
    assert list(padded.var_names) == list(ref.var_names)
    x, original = padded.X.toarray(), query.X.toarray()
    present = np.isin(ref.var_names, partial.var_names)
    np.testing.assert_array_equal(x[:, present], original[:, present])
    assert not x[:, ~present].any()
    np.testing.assert_array_equal(padded.layers["counts"].toarray(), x)
    assert tessera.model.SCVI.prepare_query_anndata(partial, model) is None
    assert list(partial.var_names) == list(ref.var_names)


def test_unsupported_freezing_and_folders_are_refused(reference, tmp_path):
    ref, query, model = reference
    with pytest.raises(ValueError, match="unfrozen"):
        tessera.model.SCANVI.load_query_data(query.copy(), model, unfrozen=True)
    with pytest.raises(ValueError, match="not a saved tessera model"):
        tessera.model.SCVI.load_query_data(query.copy(), tmp_path)
