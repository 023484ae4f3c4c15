"""tessera.snf against snfpy (pinned in the test venv) on snfpy's own example data."""

from __future__ import annotations

import numpy as np
import pytest

import tessera

snfpy = pytest.importorskip("snf")
import snf.compute  # noqa: E402
import snf.datasets  # noqa: E402 - a submodule snf does not import itself
from sklearn.utils import validation  # noqa: E402


# snfpy 0.2.2 passes `force_all_finite`, which scikit-learn 1.8 renamed `ensure_all_finite`.
def _check_array(array, *args, force_all_finite=True, **kwargs):
    return validation.check_array(array, *args, ensure_all_finite=force_all_finite, **kwargs)


snf.compute.check_array = _check_array


@pytest.fixture(scope="module")
def views() -> tuple[list[np.ndarray], np.ndarray]:
    simdata = snfpy.datasets.load_simdata()
    return [np.asarray(v, dtype=np.float64) for v in simdata.data], np.asarray(simdata.labels)


def test_affinities_and_fusion_equal_snfpys(views):
    data, _ = views
    for metric in ("sqeuclidean", "cosine"):
        ours = tessera.snf.make_affinity(*data, metric=metric, K=20, mu=0.5)
        theirs = snfpy.make_affinity(*data, metric=metric, K=20, mu=0.5)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    affinities = tessera.snf.make_affinity(*data, K=20, mu=0.5)
    fused = tessera.snf.snf(*affinities, K=20, t=20)
    reference = snfpy.snf(snfpy.make_affinity(*data, K=20, mu=0.5), K=20, t=20)
    np.testing.assert_allclose(fused, reference, rtol=1e-7, atol=1e-12)
    np.testing.assert_array_equal(tessera.snf.snf(affinities, K=20, t=20), fused)


def test_clusters_and_their_number_match_the_truth(views):
    data, labels = views
    fused = tessera.snf.snf(*tessera.snf.make_affinity(*data))
    best, second = tessera.snf.get_n_clusters(fused)
    assert [best, second] == [int(c) for c in snfpy.get_n_clusters(fused)]
    found = tessera.snf.spectral_clustering(fused, best)
    assert sorted(set(found)) == list(range(best))
    from sklearn.metrics import normalized_mutual_info_score

    assert normalized_mutual_info_score(labels, found) > 0.9


def test_bad_views_are_refused(views):
    data, _ = views
    with pytest.raises(ValueError, match="metric"):
        tessera.snf.make_affinity(data[0], metric="manhattan")
    with pytest.raises(ValueError, match="K=500"):
        tessera.snf.make_affinity(data[0], K=500)
    broken = data[0].copy()
    broken[3, 1] = np.nan
    with pytest.raises(ValueError, match="sample 3, feature 1"):
        tessera.snf.make_affinity(broken)
    a = tessera.snf.make_affinity(data[0])[0]
    with pytest.raises(ValueError, match="at least 2"):
        tessera.snf.snf(a)
    with pytest.raises(ValueError, match="same samples"):
        tessera.snf.snf(a, a[:10, :10])
    with pytest.raises(ValueError, match="square"):
        tessera.snf.spectral_clustering(a[:, :5], 2)
