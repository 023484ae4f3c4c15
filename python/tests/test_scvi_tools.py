"""Models trained and saved by scvi-tools' SCVI, loaded by ``tessera.model.SCVI.load``
(``tests/data``: tiny models written by ``data/make_scvi_tools_models.py`` with scvi-tools 1.4.2):
tessera computes what scvi-tools computed with them, maps queries onto them and saves them as
its own; what it cannot read is refused by name, and the file's pickle runs nothing."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import tessera
from tessera.model import _scvi_tools

DATA = Path(__file__).parent / "data"
MODELS = ["scvi_default", "scvi_nb_2layers", "scvi_no_batch", "scvi_layer_norm"]


@pytest.mark.parametrize("name", MODELS)
def test_scvi_tools_models_give_scvi_tools_latents_and_expression(name):
    folder = DATA / name
    model = tessera.model.SCVI.load(folder)  # on the adata.h5ad saved with it
    expected = np.load(folder / "expected.npz")
    np.testing.assert_allclose(model.get_latent_representation(), expected["latent"], atol=2e-5)
    scale = model.get_normalized_expression(library_size=1.0, return_numpy=True)
    np.testing.assert_allclose(scale, expected["scale"], rtol=2e-4, atol=1e-7)
    # scvi-tools' training history comes along.
    assert len(model.history["elbo_train"]) == 5


def test_an_imported_model_saves_loads_and_maps_a_query_as_tessera_models_do(tmp_path):
    adata = ad.read_h5ad(DATA / "scvi_default" / "adata.h5ad")
    model = tessera.model.SCVI.load(DATA / "scvi_default", adata)
    z = model.get_latent_representation()
    assert model.init_params_["gene_likelihood"] == "zinb"
    model.save(tmp_path / "saved")
    again = tessera.model.SCVI.load(tmp_path / "saved", adata)
    np.testing.assert_allclose(again.get_latent_representation(), z, atol=1e-6)

    query = adata[:30].copy()
    query.obs["batch"] = pd.Categorical(["new"] * query.n_obs)
    mapped = tessera.model.SCVI.load_query_data(query, model)
    mapped.train(max_epochs=2, progress_bar=False)
    assert mapped.get_latent_representation().shape == (30, 4)


def test_what_cannot_be_imported_is_refused_by_name(tmp_path):
    adata = ad.read_h5ad(DATA / "scvi_default" / "adata.h5ad")
    with pytest.raises(ValueError, match="genes of .*model.pt"):
        tessera.model.SCVI.load(DATA / "scvi_default", adata[:, :20].copy())
    other = adata.copy()
    tessera.model.SCVI.setup_anndata(other, batch_key="cell_type")
    with pytest.raises(ValueError, match="set up with batch_key='cell_type', the model in .* with batch_key='batch'"):
        tessera.model.SCVI.load(DATA / "scvi_default", other)
    with pytest.raises(ValueError, match="scvi-tools SCVI model: tessera.model.SCANVI.load"):
        tessera.model.SCANVI.load(DATA / "scvi_default", adata)
    attr = {"init_params_": {"non_kwargs": {"n_latent": 4, "latent_distribution": "ln"}}}
    with pytest.raises(ValueError, match="latent_distribution='ln' is not supported"):
        _scvi_tools.init_params(attr, Path("m/model.pt"))
    attr = {"init_params_": {"non_kwargs": {}, "kwargs": {"model_kwargs": {"n_continuous_cov": 2}}}}
    with pytest.raises(ValueError, match="n_continuous_cov=2, which tessera does not support"):
        _scvi_tools.init_params(attr, Path("m/model.pt"))
    with pytest.raises(ValueError, match="categorical_covariate_keys"):
        _scvi_tools.check_setup({"categorical_covariate_keys": ["donor"]}, Path("m/model.pt"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a torch archive"):
        tessera.model.SCVI.load(tmp_path / "broken", adata)


class _Payload:
    """Unpickled, calls `function` (a module-level name) on `argument`."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (_scvi_tools._Global(*self.function), self.argument)


@pytest.mark.parametrize(
    "function, argument",
    [
        (("posix", "system"), ("touch pwned",)),
        # numpy and pandas are allowed by name, not as modules: this one runs a string.
        (("numpy.testing._private.utils", "runstring"), ("open('pwned', 'w')", {})),
        (("pandas", "read_pickle"), ("pwned.pkl",)),
    ],
)
def test_a_model_file_cannot_run_code(tmp_path, function, argument):
    folder = tmp_path / "evil"
    folder.mkdir()
    buffer = __import__("io").BytesIO()
    _scvi_tools._TorchPickler(buffer, protocol=2).dump({"model_state_dict": _Payload(function, argument)})
    with zipfile.ZipFile(folder / "model.pt", "w") as z:
        z.writestr("model/data.pkl", buffer.getvalue())
    with pytest.raises(pickle.UnpicklingError, match=f"refers to {function[0]}.{function[1]}, which tessera"):
        tessera.model.SCVI.load(folder, ad.read_h5ad(DATA / "scvi_default" / "adata.h5ad"))
    assert not Path("pwned").exists() and not (tmp_path / "pwned").exists()


def _shapes(saved):
    return {k: getattr(v, "shape", type(v)) for k, v in saved["model_state_dict"].items()}


def test_a_tessera_model_saved_for_scvi_tools_has_its_layout_and_reads_back(tmp_path):
    adata = ad.read_h5ad(DATA / "scvi_default" / "adata.h5ad")
    del adata.uns["_scvi_uuid"], adata.uns["_scvi_manager_uuid"]
    tessera.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = tessera.model.SCVI(adata, n_hidden=16, n_latent=4, gene_likelihood="zinb")
    model.train(max_epochs=3, progress_bar=False)
    model.save_scvi_tools(tmp_path / "out", save_anndata=True)
    # What scvi-tools' own save of the same setup holds, entry for entry and shape for shape.
    ours = _scvi_tools.read_model_pt(tmp_path / "out" / "model.pt")
    theirs = _scvi_tools.read_model_pt(DATA / "scvi_default" / "model.pt")
    assert _shapes(ours) == _shapes(theirs)
    assert list(ours["var_names"]) == list(theirs["var_names"])
    for attr in (ours["attr_dict"], theirs["attr_dict"]):
        registry = attr["registry_"]
        assert registry["setup_args"]["batch_key"] == "batch" and registry["model_name"] == "SCVI"
    mine, reference = (a["attr_dict"]["registry_"]["field_registries"] for a in (ours, theirs))
    for field in ("batch", "labels"):
        assert list(mine[field]["state_registry"]["categorical_mapping"]) == list(
            reference[field]["state_registry"]["categorical_mapping"]
        )
    assert ours["attr_dict"]["init_params_"]["non_kwargs"]["gene_likelihood"] == "zinb"
    assert list(ours["attr_dict"]["history_"]["elbo_train"].iloc[:, 0]) == list(
        model.history["elbo_train"].iloc[:, 0]
    )
    # Read back as scvi-tools' folder: the same model.
    again = tessera.model.SCVI.load(tmp_path / "out")
    np.testing.assert_allclose(again.get_latent_representation(), model.get_latent_representation(), atol=1e-6)

    with pytest.raises(ValueError, match="model.pt already exists"):
        model.save_scvi_tools(tmp_path / "out")
    model.save_scvi_tools(tmp_path / "out", overwrite=True)
    other = tessera.model.SCVI(adata, n_hidden=16, n_latent=4, dispersion="gene-cell")
    other.train(max_epochs=1, progress_bar=False)
    with pytest.raises(ValueError, match="no counterpart of dispersion='gene-cell'"):
        other.save_scvi_tools(tmp_path / "other")
def test_scarches_layers_save_as_scvi_tools_lays_them_out_and_read_back(tmp_path):
    """scArches' setting (LayerNorm, no BatchNorm): the saved model has the entries of
    scvi-tools' own save of that setting, its keywords, and loads back as the same model."""
    adata = ad.read_h5ad(DATA / "scvi_layer_norm" / "adata.h5ad")
    del adata.uns["_scvi_uuid"], adata.uns["_scvi_manager_uuid"]
    tessera.model.SCVI.setup_anndata(adata, batch_key="batch")
    keywords = dict(use_layer_norm="both", use_batch_norm="none", encode_covariates=True)
    model = tessera.model.SCVI(adata, n_hidden=16, n_latent=4, n_layers=2, gene_likelihood="nb", **keywords)
    assert model.init_params_["use_layer_norm"] == "both"
    model.train(max_epochs=2, progress_bar=False)
    model.save_scvi_tools(tmp_path / "out")
    ours = _scvi_tools.read_model_pt(tmp_path / "out" / "model.pt")
    theirs = _scvi_tools.read_model_pt(DATA / "scvi_layer_norm" / "model.pt")
    assert _shapes(ours) == _shapes(theirs)
    saved = ours["attr_dict"]["init_params_"]["kwargs"]["kwargs"]
    assert {k: saved[k] for k in keywords} == keywords
    again = tessera.model.SCVI.load(tmp_path / "out", adata)
    np.testing.assert_allclose(again.get_latent_representation(), model.get_latent_representation(), atol=1e-6)
    with pytest.raises(ValueError, match="use_layer_norm='encoder' is not supported: 'both' or 'none'"):
        tessera.model.SCVI(adata, use_layer_norm="encoder")


def test_fclayers_covariate_columns_become_wc_or_are_refused():
    rng = np.random.default_rng(0)
    layer = "z.Layer 0"
    state = {f"{layer}.0.bias": np.zeros(3, np.float32)}
    state.update({f"{layer}.1.{k}": np.ones(3, np.float32) for k in ("weight", "bias", "running_mean", "running_var")})
    # Two batches: the one-hot columns after the input are wc.
    state[f"{layer}.0.weight"] = rng.normal(size=(3, 5 + 2)).astype(np.float32)
    out = _scvi_tools._layers(state, "decoder", "z", (1, 5, 3), (2, True, True), True)
    np.testing.assert_array_equal(out["decoder.0.wc"], state[f"{layer}.0.weight"][:, 5:].T)
    assert out["decoder.0.w"].shape == (5, 3)
    # One batch: scvi-tools keeps no column for it, tessera a column of zeros.
    state[f"{layer}.0.weight"] = rng.normal(size=(3, 5)).astype(np.float32)
    out = _scvi_tools._layers(state, "decoder", "z", (1, 5, 3), (1, True, True), True)
    np.testing.assert_array_equal(out["decoder.0.wc"], np.zeros((1, 3)))
    with pytest.raises(ValueError, match="z.Layer 0.0.weight has 0 covariate columns, expected the model's 3"):
        _scvi_tools._layers(state, "decoder", "z", (1, 5, 3), (3, True, True), True)
    state[f"{layer}.0.weight"] = rng.normal(size=(3, 6)).astype(np.float32)
    with pytest.raises(ValueError, match="has 1 covariate columns, expected none"):
        _scvi_tools._layers(state, "encoder", "z", (1, 5, 3), (2, False, True), True)


