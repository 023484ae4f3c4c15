"""snfpy 0.2.2 on its own example data: "sim" (2 views, 200 samples, 2 groups) and "digits"
(4 views, 600 samples, 3 digits). For each, into <folder>/<name>/: the raw views, each view's
affinity (make_affinity, K=20, mu=0.5; for digits' first view also with the euclidean, cosine and
correlation metrics), the fused network (snf, K=20, t=20), the true labels,
and spectral.json: the 6 smallest eigenvalues of the fused network's normalised Laplacian as
get_n_clusters forms it, get_n_clusters' two best counts, and the NMI against the true labels of
scikit-learn's spectral_clustering of the fused network (the snfpy README's recipe). CSV, for
tests/snfpy.rs to compare against."""
import json
import sys
from pathlib import Path

import numpy as np
import snf
import snf.compute
from sklearn.cluster import spectral_clustering
from sklearn.metrics import normalized_mutual_info_score
from sklearn.utils import validation
from snf import datasets

# snfpy 0.2.2 passes `force_all_finite`, which scikit-learn 1.8 renamed `ensure_all_finite`;
# translate the keyword (the arithmetic is snfpy's own).
def _check_array(array, *args, force_all_finite=True, **kwargs):
    return validation.check_array(array, *args, ensure_all_finite=force_all_finite, **kwargs)

snf.compute.check_array = _check_array

root = Path(sys.argv[1])
for name, data in [("sim", datasets.load_simdata()), ("digits", datasets.load_digits())]:
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    affinities = snf.make_affinity(data.data, metric="sqeuclidean", K=20, mu=0.5)
    fused = snf.snf(affinities, K=20, t=20)
    for i, (view, aff) in enumerate(zip(data.data, affinities)):
        np.savetxt(out / f"view{i}.csv", view, delimiter=",", fmt="%.17g")
        np.savetxt(out / f"affinity{i}.csv", aff, delimiter=",", fmt="%.17g")
    np.savetxt(out / "fused.csv", fused, delimiter=",", fmt="%.17g")
    # The other distances make_affinity takes (scipy's cdist metrics), on digits' first view
    # (sim's views have 2 features: every correlation is +-1, the affinity degenerate).
    for metric in ["euclidean", "cosine", "correlation"] if name == "digits" else []:
        aff = snf.make_affinity(data.data[0], metric=metric, K=20, mu=0.5)
        np.savetxt(out / f"affinity0-{metric}.csv", aff, delimiter=",", fmt="%.17g")
    np.savetxt(out / "labels.csv", data.labels, delimiter=",", fmt="%d")
    # get_n_clusters' Laplacian, its eigenvalues by a symmetric solver (eig's are the same
    # numbers, complex-typed).
    graph = (fused + fused.T) / 2
    graph[np.diag_indices_from(graph)] = 0
    degree = graph.sum(axis=1)
    di = np.diag(1 / np.sqrt(degree))
    laplacian = di @ (np.diag(degree) - graph) @ di
    eigenvalues = np.linalg.eigvalsh(laplacian)[:6]
    best = [int(c) for c in snf.get_n_clusters(fused)]
    k = len(np.unique(data.labels))
    labels = spectral_clustering(fused, n_clusters=k, random_state=0)
    nmi = normalized_mutual_info_score(data.labels, labels)
    (out / "spectral.json").write_text(json.dumps({"eigenvalues": eigenvalues.tolist(), "best": best, "clusters": k, "nmi": nmi}))
    print(name, len(data.data), fused.shape[0], best, nmi)
