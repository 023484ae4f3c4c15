"""Times Python anndata streaming all rows of X from a store in mini-batches, the way users do
it today. Prints JSON {reader: seconds}. Usage: bench_load.py STORE BATCH_SIZE"""
import json, sys, time

import anndata as ad
import zarr

path, batch = sys.argv[1], int(sys.argv[2])
results = {}

# 1. Load the whole store, then slice batches (the common notebook pattern).
t = time.perf_counter()
adata = ad.read_zarr(path)
n = adata.n_obs
for s in range(0, n, batch):
    x = adata.X[s:s + batch]
    _ = x.indptr, x.indices, x.data
results[f"anndata {ad.__version__} read_zarr + slicing"] = time.perf_counter() - t
del adata

# 2. Backed sparse dataset: row ranges read lazily from the Zarr group.
t = time.perf_counter()
group = zarr.open_group(path, mode="r")
X = ad.io.sparse_dataset(group["X"]) if hasattr(ad, "io") and hasattr(ad.io, "sparse_dataset") else ad.experimental.sparse_dataset(group["X"])
for s in range(0, n, batch):
    x = X[s:s + batch]
    _ = x.indptr, x.indices, x.data
results[f"anndata {ad.__version__} sparse_dataset (lazy)"] = time.perf_counter() - t

print(json.dumps(results))
