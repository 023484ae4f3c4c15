"""Times snfpy 0.2.2 on views given as CSV files (samples x features): make_affinity
(sqeuclidean, K=20, mu=0.5) then snf (K=20, t=20). Prints: seconds peak_rss_mib."""
import resource
import sys
import time

import numpy as np
import snf
import snf.compute
from sklearn.utils import validation

# snfpy 0.2.2 passes `force_all_finite`, renamed `ensure_all_finite` in scikit-learn 1.8.
def _check_array(array, *args, force_all_finite=True, **kwargs):
    return validation.check_array(array, *args, ensure_all_finite=force_all_finite, **kwargs)

snf.compute.check_array = _check_array
views = [np.loadtxt(p, delimiter=",") for p in sys.argv[1:]]
start = time.perf_counter()
fused = snf.snf(snf.make_affinity(views, metric="sqeuclidean", K=20, mu=0.5), K=20, t=20)
seconds = time.perf_counter() - start
print(f"{seconds:.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
