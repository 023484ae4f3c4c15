"""Samples missing from views, on snfpy 0.2.2's digits data (4 views, 600 samples): view 1 loses
20% of the samples and view 3 15% (NaN rows, seed 7). Writes into the folder given: the views
(NaN rows kept), the SNF network (snfpy's make_affinity and snf, K=20, t=20, with one change:
the K strongest edges of a row are chosen among the samples the view has; snfpy 0.2.2's
percentile of a row with NaN is NaN and keeps the whole row; and its input check, which refuses
the NaN the rest of snf() is written for, is lifted), and the NEMO network from the
authors' formula (nemo.affinity.graph, Rappoport & Shamir 2019) over the same affinities, with
the default k = round(samples / 6) per view."""
import sys
from pathlib import Path

import numpy as np
import snf
import snf.compute
from sklearn.utils import validation
from snf import datasets


# snfpy 0.2.2's snf() refuses NaN in its input check, though the function is written for it
# (n_aff, nansum, nan_to_num): the check is lifted.
def _check_array(array, *args, force_all_finite=True, **kwargs):
    return validation.check_array(array, *args, ensure_all_finite=False, **kwargs)


def _dominate_set_of_present(W, K=20):
    Wk = np.zeros_like(W)
    for i, row in enumerate(W):
        present = ~np.isnan(row)
        if present.sum() < 2:
            continue
        values = row[present]
        values = np.where(values < np.percentile(values, 100 - 100 * K / len(values)), 0, values)
        Wk[i, present] = values / values.sum()
    return Wk


def nemo(affinities):
    n = affinities[0].shape[0]
    total, shared = np.zeros((n, n)), np.zeros((n, n))
    for W in affinities:
        present = ~np.isnan(W).all(axis=1)
        idx = np.ix_(present, present)
        sub = W[idx]
        k = round(len(sub) / 6)
        kept = np.zeros_like(sub)
        for i, row in enumerate(sub):
            threshold = np.sort(row)[::-1][k - 1]
            keep = row >= threshold
            kept[i, keep] = row[keep] / row[keep].sum()
        total[idx] += kept + kept.T
        shared[idx] += 1
    with np.errstate(invalid="ignore"):
        out = total / shared
    lower = out[np.tril_indices(n, -1)]
    out[shared == 0] = lower[~np.isnan(lower)].mean()
    return out


snf.compute.check_array = _check_array
snf.compute._find_dominate_set = _dominate_set_of_present

out = Path(sys.argv[1])
data = datasets.load_digits()
rng = np.random.default_rng(7)
views = [v.astype(float).copy() for v in data.data]
n = views[0].shape[0]
for v, fraction in [(1, 0.20), (3, 0.15)]:
    views[v][rng.choice(n, int(fraction * n), replace=False)] = np.nan
affinities = snf.make_affinity(views, metric="sqeuclidean", K=20, mu=0.5)
fused = snf.snf([a.copy() for a in affinities], K=20, t=20)
for i, view in enumerate(views):
    np.savetxt(out / f"view{i}.csv", view, delimiter=",", fmt="%.17g")
np.savetxt(out / "fused.csv", fused, delimiter=",", fmt="%.17g")
np.savetxt(out / "nemo.csv", nemo(affinities), delimiter=",", fmt="%.17g")
print(len(views), n)
