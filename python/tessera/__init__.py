"""tessera: single-cell integration with scvi-tools' API on a Rust engine.

``tessera.model.SCVI`` is used like ``scvi.model.SCVI``::

    import tessera
    tessera.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = tessera.model.SCVI(adata)
    model.train()
    adata.obsm["X_tessera"] = model.get_latent_representation()

The model trains in the same engine as the ``tessera`` command line (``tessera train``), on
the AnnData in memory or, for data larger than memory, streamed from a Zarr store::

    adata = tessera.read_zarr("atlas.zarr")   # obs and var in memory, the counts stay on disk

``tessera.tl.umap(adata, use_rep="X_tessera")`` lays the embedding out for ``sc.pl.umap``.
"""

from . import metrics, model, snf, tl
from ._anndata import read_zarr
from ._tessera import __version__

__all__ = ["metrics", "model", "snf", "tl", "read_zarr", "__version__"]
