"""umap-learn's UMAP of the store's X_true_latent beside tessera's (obsm/X_umap), with
scanpy's defaults (15 neighbours, min_dist 0.5; scanpy's sc.pp.neighbors + sc.tl.umap run the
same umap-learn code, but scanpy 1.11.5 fails on this venv's scipy sparse arrays), the seconds
each took and two layout qualities: the mean fraction of each cell's 15 nearest
neighbours in the embedding that stay among its 15 nearest in 2-D, and the fraction of cells
whose 15 nearest in 2-D mostly share their cell type."""

import sys
import time

import anndata as ad
import numpy as np
import umap
from sklearn.neighbors import NearestNeighbors

K = 15


def neighbours(x):
    return NearestNeighbors(n_neighbors=K + 1).fit(x).kneighbors(x, return_distance=False)[:, 1:]


def qualities(embedding, layout, types):
    high, low = neighbours(embedding), neighbours(layout)
    kept = np.mean([len(set(h) & set(l)) / K for h, l in zip(high, low)])
    majority = np.mean([(types[l] == types[i]).mean() > 0.5 for i, l in enumerate(low)])
    return kept, majority


def main(store, tessera_seconds):
    adata = ad.read_zarr(store)
    x = np.asarray(adata.obsm["X_true_latent"], dtype=np.float32)
    types = adata.obs["cell_type"].to_numpy()
    ours = np.asarray(adata.obsm["X_umap"])
    start = time.perf_counter()
    theirs = umap.UMAP(n_neighbors=K, min_dist=0.5, random_state=0).fit_transform(x)
    theirs_seconds = time.perf_counter() - start
    # Again, with numba's kernels already compiled (a notebook's second call).
    start = time.perf_counter()
    warm = umap.UMAP(n_neighbors=K, min_dist=0.5, random_state=1).fit_transform(x)
    warm_seconds = time.perf_counter() - start
    n = adata.n_obs
    print(f"UMAP of {n} cells x {x.shape[1]} dims (X_true_latent, hard scenario), 2 threads")
    print(f"{'':28}{'seconds':>9}{'cells/s':>10}{'15-NN kept':>12}{'type-pure':>11}")
    for name, seconds, layout in [
        ("tessera plot (incl. PNG)", tessera_seconds, ours),
        ("umap-learn (scanpy's)", theirs_seconds, theirs),
        ("umap-learn, compiled", warm_seconds, warm),
    ]:
        kept, pure = qualities(x, layout, types)
        print(f"{name:28}{seconds:9.1f}{n / seconds:10.0f}{kept:12.3f}{pure:11.3f}")
    print(
        f"speed-up: {theirs_seconds / tessera_seconds:.1f}x first call, "
        f"{warm_seconds / tessera_seconds:.1f}x compiled"
    )


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
