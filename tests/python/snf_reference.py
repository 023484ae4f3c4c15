"""snfpy 0.2.2 on its own simulated example (2 views, 200 samples): writes the raw views, each
view's affinity (make_affinity, K=20, mu=0.5) and the fused network (snf, K=20, t=20) as CSV
into the folder given, for tests/snfpy.rs to compare against."""
import sys
from pathlib import Path

import numpy as np
import snf
import snf.compute
from snf import datasets
from sklearn.utils import validation

# snfpy 0.2.2 passes `force_all_finite`, which scikit-learn 1.8 renamed `ensure_all_finite`;
# translate the keyword (the arithmetic is snfpy's own).
def _check_array(array, *args, force_all_finite=True, **kwargs):
    return validation.check_array(array, *args, ensure_all_finite=force_all_finite, **kwargs)

snf.compute.check_array = _check_array

out = Path(sys.argv[1])
sim = datasets.load_simdata()
affinities = snf.make_affinity(sim.data, metric="sqeuclidean", K=20, mu=0.5)
fused = snf.snf(affinities, K=20, t=20)
for i, (view, aff) in enumerate(zip(sim.data, affinities)):
    np.savetxt(out / f"view{i}.csv", view, delimiter=",", fmt="%.17g")
    np.savetxt(out / f"affinity{i}.csv", aff, delimiter=",", fmt="%.17g")
np.savetxt(out / "fused.csv", fused, delimiter=",", fmt="%.17g")
np.savetxt(out / "labels.csv", sim.labels, delimiter=",", fmt="%d")
print(len(sim.data), fused.shape[0])
