"""tessera.snf.fuse: the `tessera snf` job on a MuData in memory, cells missing a modality
included, in memory and out of core; the same network as the command line on the same data."""

from __future__ import annotations

import os
import subprocess

import anndata as ad
import mudata as md
import numpy as np
import pytest
import scipy.sparse as sp

import tessera
from test_multimodal import cite_like


@pytest.fixture(scope="module")
def cite() -> tuple[md.MuData, np.ndarray]:
    mdata, _, present = cite_like()
    mdata.obs["cell_type"] = mdata.mod["rna"].obs["cell_type"].to_numpy()
    return mdata, present


def test_a_mudata_with_missing_proteins_fuses_into_one_network_of_every_cell(cite):
    mdata, present = cite
    network, labels, report = tessera.snf.fuse(mdata, K=20, t=10, top_k=30)
    n = mdata.n_obs
    assert sp.issparse(network) and network.shape == (n, n)
    assert np.all(np.diff(network.indptr) == 30), "top-k rows"
    assert labels.shape == (n,) and labels.min() == 0
    assert [v["samples"] for v in report["views"]] == [n, int(present.sum())]
    assert report["label_key"] == "cell_type" and report["nmi"] > 0.5, report
    # Cells without proteins are in the network through RNA alone.
    assert np.all(np.asarray(network[np.flatnonzero(~present)].sum(axis=1)).ravel() > 0)
    # The user's matrices are writeable again and unchanged.
    assert mdata.mod["prot"].X.data.flags.writeable

    dense, dense_labels, _ = tessera.snf.fuse(mdata, K=20, t=10)
    assert isinstance(dense, np.ndarray) and dense.shape == (n, n)
    np.testing.assert_array_equal(dense_labels, labels)
    rows = np.arange(n)[:, None]
    np.testing.assert_array_equal(network.toarray()[rows, network.indices.reshape(n, 30)],
                                  dense[rows, network.indices.reshape(n, 30)])


def test_out_of_core_fusion_gives_the_in_memory_network(cite, tmp_path):
    mdata, _ = cite
    in_memory, labels, _ = tessera.snf.fuse(mdata, K=20, t=10, top_k=30)
    scratch = tmp_path / "scratch.zarr"
    stored, stored_labels, report = tessera.snf.fuse(
        mdata, K=20, t=10, top_k=30, out_of_core=scratch, block=128
    )
    np.testing.assert_allclose(stored.toarray(), in_memory.toarray(), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(stored_labels, labels)
    assert not scratch.exists(), "the scratch store is removed"
    with pytest.raises(ValueError, match="top-k"):
        tessera.snf.fuse(mdata, K=20, t=10, out_of_core=tmp_path / "dense.zarr")


def test_fuse_gives_the_command_lines_network(cite, tmp_path):
    binary = os.environ.get("TESSERA_BIN")
    if not binary:
        pytest.skip("TESSERA_BIN (the tessera binary) is not set")
    mdata, _ = cite
    network, labels, _ = tessera.snf.fuse(mdata, K=20, t=10, top_k=30)
    path = tmp_path / "cite.zarr"
    written = mdata.copy()
    del written.mod["prot"].var["_index"]  # a name anndata refuses to write
    written.update()
    with ad.settings.override(allow_write_nullable_strings=True):
        written.write_zarr(path)
    subprocess.run(
        [binary, "snf", "--data", str(path), "--k", "20", "--t", "10", "--top-k", "30",
         "--out", str(tmp_path / "out")],
        check=True, capture_output=True,
    )
    cli = md.read_zarr(path)
    np.testing.assert_array_equal(cli.obsp["snf"].toarray(), network.toarray())
    np.testing.assert_array_equal(cli.obs["snf_clusters"].astype(int).to_numpy(), labels)


def test_bad_fuse_inputs_are_named(cite, tmp_path):
    mdata, _ = cite
    with pytest.raises(KeyError, match="'atac' is not in mdata.mod"):
        tessera.snf.fuse(mdata, views=["rna", "atac"])
    with pytest.raises(ValueError, match="one view, X"):
        tessera.snf.fuse(mdata.mod["rna"], views=["rna"])
    with pytest.raises(ValueError, match="metric"):
        tessera.snf.fuse(mdata, metric="manhattan")
