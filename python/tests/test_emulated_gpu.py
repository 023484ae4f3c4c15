"""`SCVI.train(accelerator="gpu")` on the emulated CUDA driver of kernels/emu (CI builds it and
names its folder in TESSERA_CUDA_EMULATOR; NVRTC on LD_LIBRARY_PATH): the Python package's GPU
path trains the CPU's ELBO. The kernels run on the CPU there: this checks the path, not a GPU.
Skipped without the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EMULATOR = os.environ.get("TESSERA_CUDA_EMULATOR")

SCRIPT = """
import json, sys
import anndata as ad, numpy as np, scipy.sparse as sp, tessera
rng = np.random.default_rng(0)
counts = sp.csr_matrix(rng.poisson(0.5, size=(600, 200)).astype(np.float32))
adata = ad.AnnData(X=counts)
adata.obs["batch"] = np.where(np.arange(600) % 2 == 0, "a", "b")
tessera.model.SCVI.setup_anndata(adata, batch_key="batch")
model = tessera.model.SCVI(adata)
model.train(max_epochs=2, accelerator=sys.argv[1])
print(json.dumps(model.history["elbo_train"].values.ravel().tolist()))
"""


def _elbo(accelerator: str, library_path: str) -> list[float]:
    env = dict(os.environ, LD_LIBRARY_PATH=library_path, TESSERA_LOG="warn")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, accelerator], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not EMULATOR, reason="TESSERA_CUDA_EMULATOR (kernels/emu/build.sh's folder) is not set")
def test_training_on_the_emulated_gpu_gives_the_cpus_elbo() -> None:
    assert EMULATOR is not None and (Path(EMULATOR) / "libcuda.so").is_file(), EMULATOR
    path = f"{EMULATOR}:{os.environ.get('LD_LIBRARY_PATH', '')}"
    cpu, gpu = _elbo("cpu", path), _elbo("gpu", path)
    assert len(cpu) == len(gpu) == 2
    for c, g in zip(cpu, gpu):
        assert abs(g - c) <= 1e-5 * abs(c), (gpu, cpu)
    # A different device, not the same code path twice: the sums differ in their last bits.
    assert gpu != cpu
