"""Reads stores that tessera wrote, with Python anndata/mudata, and prints what it found as
JSON, so the Rust test can compare it with what it wrote. Usage: check_written.py STORE..."""
import json, sys, warnings

import anndata as ad
import mudata as md
import numpy as np
import zarr

warnings.simplefilter("ignore")
report = {}
for path in sys.argv[1:]:
    kind = zarr.open_group(path, mode="r").attrs.get("encoding-type")
    if kind == "MuData":
        # Warnings about how the store was written (not mudata's own FutureWarnings).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = md.read_zarr(path)
        report[path] = {
            "format_warnings": [str(w.message) for w in caught if w.category.__name__ == "OldFormatWarning"],
            "kind": "MuData", "n_obs": int(m.n_obs),
            "mods": {k: [int(v.n_obs), int(v.n_vars)] for k, v in m.mod.items()},
            "obsmap": {k: np.asarray(m.obsmap[k]).astype(int).tolist() for k in m.mod},
            "obs_columns": list(m.obs.columns),
        }
        continue
    a = ad.read_zarr(path)
    X = a.X
    report[path] = {
        "kind": "AnnData", "n_obs": int(a.n_obs), "n_vars": int(a.n_vars),
        "x_sum": float(X.sum()), "nnz": int(X.nnz) if hasattr(X, "nnz") else int((X != 0).sum()),
        "obsm": {k: np.asarray(v, dtype=np.float64).ravel().tolist() for k, v in a.obsm.items()},
        "obsm_shapes": {k: list(np.asarray(v).shape) for k, v in a.obsm.items()},
        "layers": {k: float(v.sum()) for k, v in a.layers.items()},
        "obs": {c: str(a.obs[c].dtype) for c in a.obs.columns},
        "batch_counts": {str(k): int(v) for k, v in a.obs["batch"].value_counts().items()} if "batch" in a.obs else {},
    }
print(json.dumps(report))
