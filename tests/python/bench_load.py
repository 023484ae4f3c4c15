"""Times Python anndata streaming all rows of X from a store in mini-batches, the way users do
it today. Prints JSON {reader: median seconds}. Usage: bench_load.py STORE BATCH_SIZE REPEAT"""
import json, sys, time

import anndata as ad
import zarr

path, batch, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def median(f):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def load_then_slice():
    adata = ad.read_zarr(path)
    for s in range(0, adata.n_obs, batch):
        x = adata.X[s:s + batch]
        _ = x.indptr, x.indices, x.data


def lazy():
    group = zarr.open_group(path, mode="r")
    X = ad.io.sparse_dataset(group["X"]) if hasattr(ad, "io") and hasattr(ad.io, "sparse_dataset") else ad.experimental.sparse_dataset(group["X"])
    for s in range(0, X.shape[0], batch):
        x = X[s:s + batch]
        _ = x.indptr, x.indices, x.data


results = {
    f"anndata {ad.__version__} read_zarr + slicing": median(load_then_slice),
    f"anndata {ad.__version__} sparse_dataset (lazy)": median(lazy),
}
print(json.dumps(results))

