"""Client of `tessera serve`: map a query (an AnnData, or a store the server can read) onto a
registered reference atlas and get the embedding and transferred labels back.

    >>> import tessera_client as tc
    >>> mapped = tc.map_query(adata, model="pbmc", server="atlas.example.org:50061", token="...")
    >>> mapped.obsm["X_tessera"], mapped.obs["tessera_label"]
"""

from .client import Atlas, TesseraError, map_query

__all__ = ["Atlas", "TesseraError", "map_query"]
