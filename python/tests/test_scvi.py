"""tessera.model.SCVI end to end on the shipped PBMC data (../shared/data beside the checkout,
or TESSERA_SHARED_DATA): training, the embedding, history, save/load, agreement with
`tessera train`, and the errors a user meets."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import tessera
from tessera import _tessera
from tessera._progress import EpochProgress

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("TESSERA_SHARED_DATA", ROOT.parent / "shared" / "data"))
PBMC = SHARED / "pbmc68k_counts.zarr"
SCVI = tessera.model.SCVI


@pytest.fixture()
def pbmc() -> ad.AnnData:
    assert PBMC.exists(), f"the shared PBMC store is missing at {PBMC}"
    adata = ad.read_zarr(PBMC)
    # Two batches by a fixed rule, as integers (tessera makes them categories in numeric order).
    adata.obs["batch"] = (np.arange(adata.n_obs) % 3 == 0).astype(np.int64)
    return adata


@pytest.fixture(scope="module")
def trained() -> tuple[ad.AnnData, SCVI]:
    adata = ad.read_zarr(PBMC)
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 3 == 0, "b", "a")
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=8)
    model.train(max_epochs=30, seed=1, progress_bar=False)
    return adata, model


def test_training_gives_an_embedding_and_scvi_tools_history(trained):
    adata, model = trained
    z = model.get_latent_representation()
    assert z.shape == (adata.n_obs, 8) and z.dtype == np.float32
    assert np.all(np.isfinite(z)) and z.std(axis=0).min() > 0.05
    history = model.history
    for key in ("elbo_train", "elbo_validation", "reconstruction_loss_train",
                "kl_local_validation", "train_loss_epoch", "validation_loss", "kl_weight"):
        assert list(history[key].columns) == [key]
        assert len(history[key]) == 30 and history[key].index.name == "epoch"
    elbo = history["elbo_validation"]["elbo_validation"].to_numpy()
    assert elbo[-1] < elbo[0] - 50, elbo
    np.testing.assert_allclose(
        history["elbo_train"]["elbo_train"],
        history["reconstruction_loss_train"]["reconstruction_loss_train"]
        + history["kl_local_train"]["kl_local_train"],
    )
    # KL warm-up over 400 epochs: epoch e trains at weight e / 400.
    np.testing.assert_allclose(history["kl_weight"]["kl_weight"].to_numpy(), np.arange(30) / 400)
    assert "trained" in repr(model) and "n_latent: 8" in repr(model)


def test_the_embedding_of_the_same_cells_encoded_again_is_the_same(trained):
    adata, model = trained
    np.testing.assert_array_equal(
        model.get_latent_representation(adata.copy()), model.get_latent_representation()
    )
    subset = model.get_latent_representation(indices=[5, 1])
    np.testing.assert_array_equal(subset, model.get_latent_representation()[[5, 1]])


@pytest.mark.parametrize("covariates", [False, True], ids=["batch", "covariates"])
def test_the_same_seed_gives_the_command_lines_embedding_bit_for_bit(pbmc, tmp_path, covariates):
    binary = os.environ.get("TESSERA_BIN")
    if not binary:
        pytest.skip("TESSERA_BIN (the tessera binary) is not set")
    cli, setup, init = [], {}, {}
    if covariates:
        # A donor and a continuous covariate, which the encoder sees too: the Python and command
        # line paths must build the same covariate rows, and decoding new cells the same too.
        pbmc.obs["donor"] = pd.Categorical(np.array(["d0", "d1", "d2"])[np.arange(pbmc.n_obs) % 3])
        pbmc.obs["depth"] = np.log1p(np.asarray(pbmc.X.sum(axis=1)).ravel()) - 7.0
        config = tmp_path / "model.toml"
        config.write_text("[model]\nencode_covariates = true\n")
        cli = ["--categorical-covariate-keys", "donor", "--continuous-covariate-keys", "depth",
               "--config", str(config)]
        setup = {"categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["depth"]}
        init = {"encode_covariates": True}
    store = tmp_path / "pbmc.zarr"
    with ad.settings.override(allow_write_nullable_strings=True):
        pbmc.write_zarr(store)
    subprocess.run(
        [binary, "train", "--data", str(store), "--epochs", "6", "--seed", "4",
         "--batch-key", "batch", "--out", str(tmp_path / "out"), "--embedding-key", "X_cli",
         "--denoised", "--denoised-library-size", "1000", *cli],
        check=True, capture_output=True,
    )
    written = ad.read_zarr(store)
    SCVI.setup_anndata(pbmc, batch_key="batch", **setup)
    model = SCVI(pbmc, **init)
    model.train(max_epochs=6, seed=4, progress_bar=False)
    np.testing.assert_array_equal(model.get_latent_representation(), written.obsm["X_cli"])
    # Encoded again through the saved model: the same covariate rows as in training.
    np.testing.assert_array_equal(
        model.get_latent_representation(pbmc.copy()), written.obsm["X_cli"]
    )
    np.testing.assert_array_equal(
        model.get_normalized_expression(library_size=1000, return_numpy=True),
        written.layers["tessera_denoised"],
    )


def test_normalized_expression_is_a_gene_table_per_cell_and_batch(trained):
    adata, model = trained
    proportions = model.get_normalized_expression()
    assert list(proportions.columns) == list(adata.var_names)
    assert list(proportions.index) == list(adata.obs_names)
    np.testing.assert_allclose(proportions.sum(axis=1), 1.0, rtol=1e-4)
    scaled = model.get_normalized_expression(library_size=1e4, return_numpy=True)
    np.testing.assert_allclose(scaled, proportions.to_numpy() * 1e4, rtol=1e-4)
    as_a = model.get_normalized_expression(transform_batch="a", return_numpy=True)
    as_b = model.get_normalized_expression(transform_batch="b", return_numpy=True)
    assert np.abs(as_a - as_b).max() > 1e-4  # the batch is a covariate of the decoder
    a_cells = (adata.obs["batch"] == "a").to_numpy()
    np.testing.assert_array_equal(as_a[a_cells], proportions.to_numpy()[a_cells])
    np.testing.assert_allclose(
        model.get_normalized_expression(transform_batch=["a", "b"], return_numpy=True),
        (as_a + as_b) / 2, rtol=1e-6,
    )
    genes = list(adata.var_names[[7, 3]])
    subset = model.get_normalized_expression(indices=[0, 2], gene_list=genes)
    assert list(subset.columns) == genes and subset.shape == (2, 2)
    np.testing.assert_array_equal(subset.to_numpy(), proportions.iloc[[0, 2]][genes].to_numpy())
    with pytest.raises(KeyError, match="not_a_gene"):
        model.get_normalized_expression(gene_list=["not_a_gene"])
    with pytest.raises(ValueError, match="zz"):
        model.get_normalized_expression(transform_batch="zz")


def test_posterior_draws_scatter_around_the_mean_and_average_back(trained):
    adata, model = trained
    mean = model.get_latent_representation()
    np.random.seed(0)
    draws = np.stack([model.get_latent_representation(give_mean=False) for _ in range(50)])
    np.random.seed(0)
    np.testing.assert_array_equal(model.get_latent_representation(give_mean=False), draws[0])
    assert not np.array_equal(draws[0], draws[1])
    spread = draws.std(axis=0)
    assert spread.min() > 0 and spread.mean() < mean.std()
    # The draws' average is the posterior mean to within its standard error.
    assert np.all(np.abs(draws.mean(axis=0) - mean) < 5 * spread / np.sqrt(50) + 1e-6)
    sample = model.get_latent_representation(give_mean=False, indices=[3, 1])
    assert sample.shape == (2, 8)
    at_mean = model.get_normalized_expression(return_numpy=True)
    np.random.seed(1)
    averaged = model.get_normalized_expression(n_samples=20, return_numpy=True)
    np.testing.assert_allclose(averaged.sum(axis=1), 1.0, rtol=1e-4)
    assert np.corrcoef(np.log(averaged).ravel(), np.log(at_mean).ravel())[0, 1] > 0.99
    assert not np.allclose(averaged, at_mean)
    np.random.seed(1)
    np.testing.assert_array_equal(model.get_normalized_expression(n_samples=20, return_numpy=True), averaged)
    with pytest.raises(ValueError, match="n_samples=0"):
        model.get_normalized_expression(n_samples=0)
    np.random.seed(1)
    each = model.get_normalized_expression(n_samples=20, return_mean=False, gene_list=["CD3D"])
    assert each.shape == (20, adata.n_obs, 1)
    # The same draws as the average above, one by one.
    np.testing.assert_allclose(
        each.mean(axis=0)[:, 0],
        averaged[:, list(adata.var_names).index("CD3D")],
        rtol=1e-5,
    )


def test_dense_csc_and_csr_inputs_train_the_same_model(pbmc):
    embeddings = []
    for convert in (sp.csr_matrix, sp.csc_matrix, lambda x: np.asarray(x.todense())):
        adata = pbmc.copy()
        adata.X = convert(pbmc.X)
        SCVI.setup_anndata(adata)
        model = SCVI(adata)
        model.train(max_epochs=2, seed=0, progress_bar=False)
        embeddings.append(model.get_latent_representation())
    np.testing.assert_array_equal(embeddings[0], embeddings[1])
    np.testing.assert_array_equal(embeddings[0], embeddings[2])


def test_a_counts_layer_is_read_instead_of_x(pbmc):
    adata = pbmc.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X)
    SCVI.setup_anndata(adata, layer="counts")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the log-normalised X is not read: no count warning
        model = SCVI(adata)
        model.train(max_epochs=2, seed=0, progress_bar=False)
    reference = pbmc.copy()
    SCVI.setup_anndata(reference)
    other = SCVI(reference)
    other.train(max_epochs=2, seed=0, progress_bar=False)
    np.testing.assert_array_equal(
        model.get_latent_representation(), other.get_latent_representation()
    )


def test_save_and_load_give_back_the_model(trained, tmp_path):
    adata, model = trained
    folder = tmp_path / "model"
    model.save(folder)
    for name in ("model.safetensors", "config.json", "history.csv", "tessera_setup.json"):
        assert (folder / name).is_file(), name
    with pytest.raises(ValueError, match="already exists"):
        model.save(folder)
    model.save(folder, overwrite=True, save_anndata=True)
    fresh = ad.read_zarr(PBMC)
    fresh.obs["batch"] = adata.obs["batch"].to_numpy()
    loaded = SCVI.load(folder, fresh)
    assert loaded.is_trained_ and loaded.init_params_["n_latent"] == 8
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), model.get_latent_representation()
    )
    pd.testing.assert_frame_equal(loaded.history["elbo_train"], model.history["elbo_train"])
    from_h5ad = SCVI.load(folder)
    assert from_h5ad.adata.n_obs == adata.n_obs


def test_load_refuses_a_folder_that_is_not_a_model_and_other_genes(trained, tmp_path):
    adata, model = trained
    with pytest.raises(ValueError, match="not a saved tessera model"):
        SCVI.load(tmp_path, adata)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match="genes"):
        SCVI.load(tmp_path / "m", adata[:, :100].copy())
    shutil.rmtree(tmp_path / "m")


def test_cells_of_a_batch_the_model_never_saw_are_refused(trained):
    adata, model = trained
    other = adata.copy()
    other.obs["batch"] = "c"
    with pytest.raises(ValueError, match="c"):
        model.get_latent_representation(other)


def test_bad_inputs_raise_errors_that_name_the_field(pbmc):
    with pytest.raises(ValueError, match="setup_anndata"):
        SCVI(pbmc)
    with pytest.raises(KeyError, match="nope"):
        SCVI.setup_anndata(pbmc, batch_key="nope")
    with pytest.raises(KeyError, match="counts"):
        SCVI.setup_anndata(pbmc, layer="counts")
    nan = pbmc.copy()
    nan.X = nan.X.toarray()
    nan.X[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"adata\.X holds NaN"):
        SCVI.setup_anndata(nan)
    normalised = pbmc.copy()
    normalised.X = np.log1p(normalised.X)
    with pytest.warns(UserWarning, match="does not look like counts"):
        SCVI.setup_anndata(normalised)
    SCVI.setup_anndata(pbmc)
    with pytest.raises(TypeError, match="no_such_key"):
        SCVI(pbmc, no_such_key=1)
    with pytest.raises(ValueError, match="dispersion"):
        SCVI(pbmc, dispersion="gene-label")
    with pytest.raises(ValueError, match="mmd_batch_weight"):
        SCVI(pbmc, mmd_batch_weight=-1.0)
    model = SCVI(pbmc)
    with pytest.raises(RuntimeError, match="not trained"):
        model.get_latent_representation()
    with pytest.raises(TypeError, match="n_steps_kl_warmup"):
        model.train(max_epochs=1, plan_kwargs={"n_steps_kl_warmup": 10})
    # What scvi-tools scripts pass to Lightning is accepted (bench/scvi_train.py's keywords),
    # and its callbacks refused by name.
    model.train(max_epochs=1, batch_size=128, train_size=0.9, early_stopping=False,
                check_val_every_n_epoch=1, accelerator="cpu", devices=1,
                enable_progress_bar=False)
    with pytest.raises(TypeError, match="callbacks is not supported: Lightning callbacks"):
        model.train(max_epochs=1, callbacks=[object()])
    with pytest.raises(TypeError, match="bogus"):
        model.train(max_epochs=1, bogus=True)
    with pytest.raises(ValueError, match="train_size"):
        model.train(max_epochs=1, train_size=1.5)
    with pytest.raises(ValueError, match="accelerator"):
        model.train(max_epochs=1, accelerator="tpu")


def test_malformed_matrices_are_refused_before_anything_is_attached():
    indices = np.array([0, 1], dtype=np.int32)
    data = np.array([1.0, 2.0], dtype=np.float32)
    indices.flags.writeable = data.flags.writeable = False
    name = "tessera-test-malformed"
    location = f"memory://{name}/bad.zarr"
    for indptr, n_vars, match in (
        (np.array([0, 2, 1], dtype=np.int64), 3, "X: indptr is not monotone"),
        (np.array([0, 1, 2], dtype=np.int64), 1, "X: column index 1 outside 0..1"),
        (np.array([0, 1], dtype=np.int64), 3, "X: indptr ends at 1, expected nnz = 2"),
    ):
        with pytest.raises(ValueError, match=match):
            _tessera.attach_anndata(location, (indptr, indices, data), n_vars,
                                    ["c0", "c1"], [f"g{j}" for j in range(n_vars)], [], [])
    with pytest.raises(ValueError, match="obs_names"):
        _tessera.attach_anndata(location, (np.array([0, 1, 2], dtype=np.int64), indices, data),
                                3, ["c0"], ["g0", "g1", "g2"], [], [])
    # The engine reads attached arrays from its threads: writeable ones are refused.
    with pytest.raises(ValueError, match="read-only while attached"):
        writeable = np.array([1.0, 2.0], dtype=np.float32)
        _tessera.attach_anndata(location, (np.array([0, 1, 2], dtype=np.int64), indices,
                                           writeable), 3,
                                ["c0", "c1"], ["g0", "g1", "g2"], [], [])
    with pytest.raises(Exception, match="only to memory://"):
        _tessera.attach_anndata("/tmp/tessera-test-not-memory.zarr",
                                (np.array([0, 1, 2], dtype=np.int64), indices, data), 3,
                                ["c0", "c1"], ["g0", "g1", "g2"], [], [])
    assert not _tessera.forget_memory_store(name), "nothing was created"
    assert not os.path.exists("/tmp/tessera-test-not-memory.zarr")


def test_an_in_memory_matrix_is_read_in_place_and_left_as_it_was(pbmc, monkeypatch):
    """Training reads the user's own scipy arrays (no copy of X): they are read-only while
    training runs and writeable again after, with the same values."""
    pbmc = pbmc.copy()
    pbmc.X = sp.csr_matrix(pbmc.X, dtype=np.float32)
    before = pbmc.X.copy()
    SCVI.setup_anndata(pbmc)
    model = SCVI(pbmc)
    during = []

    def watch(self, record):
        during.append((pbmc.X.data.flags.writeable, pbmc.X.indices.flags.writeable))

    with monkeypatch.context() as patch:
        patch.setattr(EpochProgress, "epoch", watch)
        model.train(max_epochs=2)
    assert during == [(False, False)] * 2
    assert pbmc.X.data.flags.writeable and pbmc.X.indices.flags.writeable
    assert (pbmc.X != before).nnz == 0
    pbmc.X.data[0] += 1  # the user's matrix is theirs again


def test_an_interrupt_stops_training_and_leaves_the_model_usable(pbmc, monkeypatch):
    SCVI.setup_anndata(pbmc)
    model = SCVI(pbmc)
    seen = []

    def interrupt(self, record):
        seen.append(record["epoch"])
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(EpochProgress, "epoch", interrupt)
        with pytest.raises(KeyboardInterrupt):
            model.train(max_epochs=50, seed=0, progress_bar=False)
    # Stopped after the step that followed: at most one more epoch reported.
    assert seen[:2] == [0, 1] and len(seen) <= 3
    assert not model.is_trained_
    model.train(max_epochs=2, seed=0, progress_bar=False)
    assert model.get_latent_representation().shape == (pbmc.n_obs, 10)


def test_the_package_documents_itself():
    assert "scvi-tools" in tessera.model.SCVI.__doc__
    for method in ("setup_anndata", "train", "get_latent_representation", "save", "load"):
        assert getattr(tessera.model.SCVI, method).__doc__, method
    assert tessera.__version__ == "0.1.0"
