"""scib-metrics (pinned in requirements.txt) on an embedding written by tests/scib_metrics.rs.

Usage: scib_reference.py DIR, where DIR holds x.f32 (row-major n x d, little-endian), labels.u32,
batches.u32 and shape.json ({"n": .., "d": ..}). Prints the metrics as JSON. Neighbours are
exact (scikit-learn brute force), as tessera computes them, so the kNN metrics compare the
metric definitions rather than two approximate neighbour searches.
"""

import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.neighbors import NearestNeighbors

import scib_metrics
from scib_metrics.nearest_neighbors import NeighborsResults
from scib_metrics.utils import KMeans

d = Path(sys.argv[1])
shape = json.loads((d / "shape.json").read_text())
x = np.fromfile(d / "x.f32", dtype="<f4").reshape(shape["n"], shape["d"])
labels = np.fromfile(d / "labels.u32", dtype="<u4")
batches = np.fromfile(d / "batches.u32", dtype="<u4")

dist, idx = NearestNeighbors(n_neighbors=min(90, len(x)), algorithm="brute").fit(x).kneighbors(x)
nn90 = NeighborsResults(indices=idx, distances=dist)
nn15 = nn90.subset_neighbors(15)

kmeans = KMeans(len(np.unique(labels))).fit(x)
kmeans_labels = kmeans.labels_
nmi_ari = scib_metrics.nmi_ari_cluster_labels_kmeans(x, labels)
out = {
    "silhouette_label": float(scib_metrics.silhouette_label(x, labels)),
    "silhouette_batch": float(scib_metrics.silhouette_batch(x, labels, batches)),
    "clisi": float(scib_metrics.clisi_knn(nn90, labels)),
    "ilisi": float(scib_metrics.ilisi_knn(nn90, batches)),
    "graph_connectivity": float(scib_metrics.graph_connectivity(nn15, labels)),
    "nmi": float(nmi_ari["nmi"]),
    "ari": float(nmi_ari["ari"]),
    "kmeans_labels": [int(v) for v in kmeans_labels],
    "kmeans_inertia": float(kmeans.inertia_),
    "sklearn_nmi_of_kmeans": float(normalized_mutual_info_score(labels, kmeans_labels)),
    "sklearn_ari_of_kmeans": float(adjusted_rand_score(labels, kmeans_labels)),
    "scib_metrics_version": scib_metrics.__version__,
}
bio = np.mean([out["silhouette_label"], out["nmi"], out["ari"], out["clisi"]])
batch = np.mean([out["silhouette_batch"], out["ilisi"], out["graph_connectivity"]])
out.update(bio_conservation=float(bio), batch_correction=float(batch), total=float(0.6 * bio + 0.4 * batch))
print(json.dumps(out))
