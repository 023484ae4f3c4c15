"""The Python client against a running `tessera serve` (driven by tests/python_client.rs).

usage: client_map.py ADDRESS TOKEN QUERY_STORE REFERENCE_STORE ALLOWED_QUERY_URL
Prints one JSON line with what the Rust side asserts.
"""

import io
import json
import sys
import warnings

import anndata as ad
import numpy as np

import tessera_client as tc

address, token, query_store, reference_store, allowed_url = sys.argv[1:6]
out = {}

# Progress into a log (not a terminal): a line per state or stage, no carriage returns.
log = io.StringIO()
printer = tc.client._ProgressPrinter(log)
for i in range(100):
    printer({"job_id": "j", "state": "running", "progress": i / 100, "stage": "fine-tuning" if i < 60 else "labels"})
printer({"job_id": "j", "state": "succeeded", "progress": 1.0, "stage": "done"})
out["progress_lines"] = log.getvalue().count("\n")
out["progress_carriage_returns"] = log.getvalue().count("\r")

query = ad.read_zarr(query_store)
before = set(query.obsm)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mapped = tc.map_query(query, model="sim", server=address, token=token, epochs=20, neighbours=30, progress=False)
out["future_warnings"] = sorted({str(w.message) for w in caught if issubclass(w.category, FutureWarning)})
out["n_obs"], out["n_latent"] = mapped.obsm["X_tessera"].shape
out["accuracy"] = float(np.mean(mapped.obs["tessera_label"].astype(str).values == query.obs["cell_type"].astype(str).values))
out["classifier_accuracy"] = float(np.mean(mapped.obs["tessera_label_classifier"].astype(str).values == query.obs["cell_type"].astype(str).values))
out["uncertainty_in_range"] = bool(((mapped.obs["tessera_label_uncertainty"] >= 0) & (mapped.obs["tessera_label_uncertainty"] <= 1)).all())
out["input_untouched"] = set(query.obsm) == before and "tessera_label" not in query.obs
out["same_cells"] = list(mapped.obs_names) == list(query.obs_names)

try:
    tc.map_query(mapped, model="sim", server=address, token=token, progress=False)
    out["overwrite_refused"] = False
except ValueError as e:
    out["overwrite_refused"] = "X_tessera" in str(e)

# A store the server reads itself: the result carries the cells' names and the mapping.
by_url = tc.map_query(allowed_url, model="sim", server=address, token=token, epochs=20, neighbours=30, progress=False)
truth = ad.read_zarr(allowed_url).obs["cell_type"].astype(str).values
out["url_accuracy"] = float(np.mean(by_url.obs["tessera_label"].astype(str).values == truth))
out["url_cells"] = by_url.n_obs

with tc.Atlas(address, token) as atlas:
    models = atlas.list_models()
    out["models"] = [m["name"] for m in models]
    reference = ad.read_zarr(reference_store)[:300]
    encoded = atlas.encode(reference, model="sim", batch_key="batch", transfer_labels=True)
    out["encoded_shape"] = list(encoded["latent"].shape)
    out["encode_agreement"] = float(np.mean(encoded["labels"] == reference.obs["cell_type"].astype(str).values))
    try:
        atlas.submit("sim", "/etc")
        out["forbidden"] = None
    except tc.TesseraError as e:
        out["forbidden"] = e.code

try:
    tc.Atlas(address, "wrong-token").list_models()
    out["wrong_token"] = None
except tc.TesseraError as e:
    out["wrong_token"] = e.code

print(json.dumps(out))
