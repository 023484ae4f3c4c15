"""scvi-tools' reference mapping on the stores `tessera map` maps: SCVI trained on the reference
(encode_covariates, scArches' setting), then `load_query_data` + `train` on the query (weight
decay 0), the query's latent, and scArches' weighted kNN label transfer (the formula
tessera-metrics implements). Prints one JSON line with the query-mapping seconds (surgery +
fine-tuning + latent; label transfer timed apart) and the label agreement with the query's own
labels."""

import argparse
import json
import time

import anndata as ad
import numpy as np
import scvi
import torch
from sklearn.neighbors import NearestNeighbors

p = argparse.ArgumentParser()
p.add_argument("--reference", required=True)
p.add_argument("--query", required=True)
p.add_argument("--reference-epochs", type=int, required=True)
p.add_argument("--query-epochs", type=int, required=True)
p.add_argument("--neighbours", type=int, default=50)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

torch.set_num_threads(args.threads)
scvi.settings.seed = args.seed
scvi.settings.dl_num_workers = 0
train_kwargs = dict(batch_size=128, early_stopping=False, accelerator="cpu", enable_progress_bar=False)

reference = ad.read_zarr(args.reference)
query = ad.read_zarr(args.query)
scvi.model.SCVI.setup_anndata(reference, batch_key="batch")
model = scvi.model.SCVI(reference, n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="nb", encode_covariates=True)
started = time.perf_counter()
model.train(max_epochs=args.reference_epochs, **train_kwargs)
reference_seconds = time.perf_counter() - started
reference_latent = model.get_latent_representation()

started = time.perf_counter()
scvi.model.SCVI.prepare_query_anndata(query, model)
mapped = scvi.model.SCVI.load_query_data(query, model)
mapped.train(max_epochs=args.query_epochs, plan_kwargs={"weight_decay": 0.0}, **train_kwargs)
query_latent = mapped.get_latent_representation()
query_seconds = time.perf_counter() - started

# scArches' weighted_knn_transfer.
started = time.perf_counter()
distances, indices = NearestNeighbors(n_neighbors=args.neighbours).fit(reference_latent).kneighbors(query_latent)
scale = (2.0 / np.std(distances, axis=1, keepdims=True)) ** 2
weights = np.exp(-distances / scale)
weights /= weights.sum(axis=1, keepdims=True)
labels = reference.obs["cell_type"].to_numpy()[indices]
predicted = []
for row_labels, row_weights in zip(labels, weights):
    candidates = np.unique(row_labels)
    mass = [row_weights[row_labels == c].sum() for c in candidates]
    predicted.append(candidates[int(np.argmax(mass))])
transfer_seconds = time.perf_counter() - started
accuracy = float(np.mean(np.asarray(predicted) == query.obs["cell_type"].to_numpy()))
print(json.dumps({
    "tool": f"scvi-tools {scvi.__version__} (torch {torch.__version__}, {args.threads} threads)",
    "reference_seconds": reference_seconds,
    "query_seconds": query_seconds,
    "transfer_seconds": transfer_seconds,
    "label_accuracy": accuracy,
}))
