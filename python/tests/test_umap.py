"""tessera.tl.umap: scanpy's place (obsm["X_umap"]), types kept apart, seeded, bad input named."""

import anndata as ad
import numpy as np
import pytest

import tessera


def blobs(per=80, types=3, dims=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(types, dims) * 10
    x = np.concatenate([c + rng.normal(size=(per, dims)) for c in centres]).astype(np.float32)
    labels = np.repeat(np.arange(types), per)
    adata = ad.AnnData(np.zeros((len(x), 1), dtype=np.float32))
    adata.obsm["X_tessera"] = x
    return adata, labels


def test_layout_lands_in_obsm_keeps_types_apart_and_is_seeded():
    adata, labels = blobs()
    tessera.tl.umap(adata)
    layout = adata.obsm["X_umap"]
    assert layout.shape == (240, 2) and np.isfinite(layout).all()
    assert adata.uns["umap"]["params"]["n_neighbors"] == 15
    # Each cell's 5 nearest in the picture share its type.
    d = ((layout[:, None, :] - layout[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1)[:, 1:6]
    assert (labels[nearest] == labels[:, None]).mean() > 0.98
    again, _ = blobs()
    tessera.tl.umap(again)
    np.testing.assert_array_equal(again.obsm["X_umap"], layout)
    tessera.tl.umap(again, random_state=1, key_added="X_umap_1")
    assert not np.array_equal(again.obsm["X_umap_1"], layout)


def test_bad_input_is_named():
    adata, _ = blobs(per=10)
    with pytest.raises(KeyError, match="X_scvi"):
        tessera.tl.umap(adata, use_rep="X_scvi")
    adata.obsm["X_tessera"][4, 2] = np.nan
    with pytest.raises(ValueError, match=r"X_tessera.*cell 4, dimension 2"):
        tessera.tl.umap(adata)
