"""Writes anndata 0.12 / mudata 0.3 stores (Zarr v2, anndata's default here, and v3) into
OUT_DIR, with truth.json holding the values they contain. Usage: make_fixtures_012.py OUT_DIR"""
import json, os, sys, warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import scipy.sparse as sp

warnings.simplefilter("ignore")
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(12)
n, g = 300, 40
X = sp.random(n, g, density=0.3, format="csr", random_state=3, data_rvs=lambda k: rng.integers(1, 50, k)).astype(np.float32)
cell_type = pd.Categorical(rng.choice(["B", "T", "NK"], n))
cell_type[:5] = np.nan
obs = pd.DataFrame(
    {
        "batch": pd.Categorical(rng.choice(["b1", "b2", "b3"], n)),
        "cell_type": cell_type,
        "donor": rng.choice(["x", "y"], n),  # plain strings (object dtype)
        "score": rng.normal(size=n),
        "count": rng.integers(0, 9, n),
        "flag": rng.random(n) < 0.5,
    },
    index=[f"cell{i}" for i in range(n)],
)
var = pd.DataFrame({"mean": np.asarray(X.mean(0)).ravel()}, index=[f"gene{j}" for j in range(g)])
a = ad.AnnData(X=X, obs=obs, var=var)
a.obsm["X_pca"] = rng.normal(size=(n, 5)).astype(np.float32)
a.layers["counts"] = X.copy()
a.raw = a.copy()

for fmt in (2, 3):
    ad.settings.zarr_write_format = fmt
    a.write_zarr(os.path.join(out, f"ad012_v{fmt}_csr.zarr"))
    d = a.copy(); d.X = X.toarray(); d.write_zarr(os.path.join(out, f"ad012_v{fmt}_dense.zarr"))
    c = a.copy(); c.X = sp.csc_matrix(X); c.write_zarr(os.path.join(out, f"ad012_v{fmt}_csc.zarr"))
ad.settings.zarr_write_format = 2
keep = np.sort(rng.choice(n, 200, replace=False))
prot = ad.AnnData(X=sp.csr_matrix(rng.poisson(20, (200, 7)).astype(np.float32)),
                  obs=pd.DataFrame(index=obs.index[keep]), var=pd.DataFrame(index=[f"p{j}" for j in range(7)]))
md.MuData({"rna": a, "prot": prot}).write_zarr(os.path.join(out, "mu012_v2.zarr"))
a.write_h5ad(os.path.join(out, "ad012.h5ad"))
md.MuData({"rna": a, "prot": prot}).write_h5mu(os.path.join(out, "mu012.h5mu"))

truth = {
    "versions": {"anndata": ad.__version__, "mudata": md.__version__},
    "n_obs": n, "n_vars": g, "nnz": int(X.nnz), "x_sum": float(X.sum()),
    "row_sums": np.asarray(X.sum(1)).ravel().tolist(),
    "batch_counts": {k: int(v) for k, v in obs["batch"].value_counts().items()},
    "cell_type_missing": 5,
    "donor_counts": {k: int(v) for k, v in obs["donor"].value_counts().items()},
    "score_first": float(obs["score"].iloc[0]),
    "count_sum": int(obs["count"].sum()),
    "flag_true": int(obs["flag"].sum()),
    "pca_first_row": a.obsm["X_pca"][0].tolist(),
    "prot_present": keep.tolist(),
}
json.dump(truth, open(os.path.join(out, "truth.json"), "w"))
