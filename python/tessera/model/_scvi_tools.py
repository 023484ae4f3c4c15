"""scvi-tools' saved models (``model.save(dir)``: ``dir/model.pt``) read without torch, and their
weights renamed to tessera's tensors, so ``tessera.model.SCVI.load(dir, adata)`` takes a model
trained by ``scvi.model.SCVI``.

``model.pt`` is a torch archive: a zip holding a pickle whose tensors point at raw storages
beside it. It is read with a restricted unpickler that rebuilds tensors as numpy arrays and
allows only the numpy, pandas and container classes such a file holds, named one by one, so
loading a model runs no code of the file's choosing and needs no torch.
"""

from __future__ import annotations

import io
import pickle
import uuid
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .. import _tessera

# torch's storage classes → numpy dtypes (little-endian, as torch writes them here).
_STORAGES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Everything else a scvi-tools model.pt refers to (its model attributes: numpy arrays, pandas
# DataFrames of the history, plain containers). Named one by one: numpy and pandas also hold
# functions that run code or read other pickles, which a module-wide allowance would let in.
_ALLOWED = {
    *(("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "slice", "int", "float",
                               "complex", "str", "bytes", "bytearray", "bool")),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("_codecs", "encode"),  # how protocol 2 writes bytes (numpy arrays' data)
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")),
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.series", "Series"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.internals.managers", "SingleBlockManager"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
}


class _Storage:
    def __init__(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Any, stride: Any, *_: Any) -> np.ndarray:
    """A tensor over its storage (numpy strides are in bytes, torch's in elements)."""
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 names Python 2's modules (mapped back by the base class).
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self._path} refers to {module}.{name}, which tessera does not read "
            "(a scvi-tools model holds tensors, numpy arrays, pandas tables and containers)"
        )

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, storage, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"{self._path}: unexpected storage reference {pid!r}")
        raw = self._archive.read(f"{self._prefix}data/{key}")
        return np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<"), count=numel)


def read_model_pt(path: Path) -> dict[str, Any]:
    """``model.pt`` as scvi-tools writes it: ``model_state_dict`` (name → numpy array),
    ``var_names`` and ``attr_dict`` (the model's attributes: ``init_params_``,
    ``registry_``, ``history_``...)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a torch archive ({e})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the torch archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        with archive.open(pickles[0]) as f:
            saved = _Unpickler(f, archive, prefix, path).load()
    missing = [k for k in ("model_state_dict", "var_names", "attr_dict") if k not in saved]
    if not isinstance(saved, dict) or missing:
        raise ValueError(f"{path}: not a scvi-tools model (no {', '.join(missing) or 'dictionary'})")
    return saved


# scvi-tools' VAE settings tessera computes the same way, with the values it supports.
_SUPPORTED = {
    "latent_distribution": ("normal",),
    "use_observed_lib_size": (True,),
    "log_variational": (True,),
    "use_batch_norm": ("both", "none"),
    "use_layer_norm": ("none", "both"),
    "batch_representation": ("one-hot",),
    "var_activation": (None,),
    "dispersion": ("gene", "gene-batch"),
    "gene_likelihood": ("nb", "zinb", "poisson"),
    "encode_covariates": (False, True),
    "deeply_inject_covariates": (False, True),
    "extra_encoder_kwargs": (None, {}),
    "extra_decoder_kwargs": (None, {}),
}
_SETUP_UNSUPPORTED = ("size_factor_key", "categorical_covariate_keys", "continuous_covariate_keys")


def init_params(attr: dict[str, Any], path: Path) -> dict[str, Any]:
    """The model's keywords (``init_params_``: scvi-tools keeps them as given, split into
    ``non_kwargs`` and ``kwargs``), checked against what tessera computes the same way."""
    raw = attr.get("init_params_", {})
    params = dict(raw.get("non_kwargs", {}))
    for extra in raw.get("kwargs", {}).values():
        params.update(extra if isinstance(extra, dict) else {})
    for key in ("n_hidden", "n_latent", "n_layers", "dropout_rate"):
        params.setdefault(key, {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1}[key])
    for key, value in params.items():
        if key in ("n_hidden", "n_latent", "n_layers", "dropout_rate"):
            continue
        if key not in _SUPPORTED:
            raise ValueError(f"{path}: the model was built with {key}={value!r}, which tessera does not support")
        if value not in _SUPPORTED[key]:
            raise ValueError(
                f"{path}: {key}={value!r} is not supported (tessera computes {key} as "
                f"{' or '.join(repr(v) for v in _SUPPORTED[key])})"
            )
    return params


def norms(params: dict[str, Any]) -> dict[str, bool]:
    """tessera's ``batch_norm`` and ``layer_norm`` from scvi-tools' ``use_batch_norm`` and
    ``use_layer_norm`` (checked by `init_params`: "both" or "none")."""
    return {
        "batch_norm": params.get("use_batch_norm", "both") == "both",
        "layer_norm": params.get("use_layer_norm", "none") == "both",
    }


def check_setup(setup: dict[str, Any], path: Path) -> None:
    for key in _SETUP_UNSUPPORTED:
        if setup.get(key):
            raise ValueError(f"{path}: registered with {key}={setup[key]!r}, which tessera does not import yet")


def categories(registry: dict[str, Any], field: str) -> list[str]:
    """A categorical field's categories in the model's code order (its one-hot columns)."""
    mapping = registry["field_registries"].get(field, {}).get("state_registry", {}).get("categorical_mapping")
    return [] if mapping is None else [str(c) for c in mapping]


# tessera's BatchNorm tensors and torch's BatchNorm1d entries.
_BATCH_NORM = (("bn_gamma", "weight"), ("bn_beta", "bias"), ("bn_running_mean", "running_mean"),
               ("bn_running_var", "running_var"))


def _layers(
    state: dict[str, np.ndarray],
    ours: str,
    theirs: str,
    dims: tuple[int, int, int],
    covariates: tuple[int, bool, bool],
    batch_norm: bool,
) -> dict[str, np.ndarray]:
    """FCLayers' Linear (+ BatchNorm1d) layers as tessera's (w: in x out; the covariate one-hots,
    which FCLayers concatenates after the input, as wc). ``covariates``: the one-hot columns
    tessera gives a layer that sees them (its batches), whether the first layer sees them, and
    whether every layer does. A LayerNorm (no affine map) has no tensors."""
    (n_layers, n_in, n_hidden), (n_cov, first, every) = dims, covariates
    out = {}
    for i in range(n_layers):
        name = f"{theirs}.Layer {i}.0.weight"
        weight = state[name]
        d_in = n_in if i == 0 else n_hidden
        extra = weight.shape[1] - d_in
        out[f"{ours}.{i}.w"] = weight[:, :d_in].T
        if first and (i == 0 or every) and n_cov:
            if extra == n_cov:
                out[f"{ours}.{i}.wc"] = weight[:, d_in:].T
            elif extra == 0 and n_cov == 1:
                # scvi-tools drops the one-hot of a single category: it weighs nothing.
                out[f"{ours}.{i}.wc"] = np.zeros((1, weight.shape[0]), np.float32)
            else:
                raise ValueError(f"{name} has {extra} covariate columns, expected the model's {n_cov} batches")
        elif extra:
            raise ValueError(f"{name} has {extra} covariate columns, expected none")
        out[f"{ours}.{i}.b"] = state[f"{theirs}.Layer {i}.0.bias"]
        for mine, torch_name in _BATCH_NORM if batch_norm else ():
            out[f"{ours}.{i}.{mine}"] = state[f"{theirs}.Layer {i}.1.{torch_name}"]
    return out


def tessera_tensors(
    state: dict[str, np.ndarray], params: dict[str, Any], n_genes: int, n_batches: int
) -> list[tuple[str, list[int], np.ndarray]]:
    """scvi-tools' VAE state as tessera's tensors (name, shape, contiguous float32 values);
    ``n_batches``: the model's batches (0 without a batch key)."""
    n_layers, n_hidden, n_latent = params["n_layers"], params["n_hidden"], params["n_latent"]
    every = params.get("deeply_inject_covariates", True)
    encoder = (n_layers, n_genes, n_hidden)
    seen = (n_batches, params.get("encode_covariates", False), every)
    batch_norm = norms(params)["batch_norm"]
    out = _layers(state, "encoder", "z_encoder.encoder.fc_layers", encoder, seen, batch_norm)
    decoder = (n_layers, n_latent, n_hidden)
    decoded = (n_batches, True, every)
    out.update(_layers(state, "decoder", "decoder.px_decoder.fc_layers", decoder, decoded, batch_norm))
    for ours, theirs in (("mean", "mean_encoder"), ("logvar", "var_encoder")):
        out[f"encoder.{ours}.w"] = state[f"z_encoder.{theirs}.weight"].T
        out[f"encoder.{ours}.b"] = state[f"z_encoder.{theirs}.bias"]
    out["decoder.main.w"] = state["decoder.px_scale_decoder.0.weight"].T
    out["decoder.main.b"] = state["decoder.px_scale_decoder.0.bias"]
    likelihood = params.get("gene_likelihood", "zinb")
    if likelihood == "zinb":
        out["decoder.zero_inflation.w"] = state["decoder.px_dropout_decoder.weight"].T
        out["decoder.zero_inflation.b"] = state["decoder.px_dropout_decoder.bias"]
    if likelihood != "poisson":
        # gene: one log θ per gene; gene-batch: genes x batches there, batches x genes here.
        out["log_theta"] = state["px_r"].T
    return [(name, list(v.shape), np.ascontiguousarray(v, dtype=np.float32).ravel()) for name, v in out.items()]


# -- export: a tessera model as scvi-tools' model.pt ---------------------------------------

# The scvi-tools release whose layout the export writes (bench/requirements-scvi.txt).
SCVI_TOOLS_VERSION = "1.4.2"


class _Global:
    """A reference to a torch function or class, written by name (torch is not needed)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce asks for a callable
        raise TypeError(f"{self.module}.{self.name} is only written, never called here")


class _Tensor:
    def __init__(self, values: np.ndarray, key: int) -> None:
        # np.array keeps a 0-d tensor 0-d (ascontiguousarray would make it 1-d).
        self.values, self.key = np.array(values, order="C"), key


class _StorageRef:
    """A tensor's storage: pickled as a reference to its record in the archive."""

    def __init__(self, tensor: _Tensor) -> None:
        self.tensor = tensor


_STORAGE_NAMES = {np.dtype(v): k for k, v in _STORAGES.items()}


class _TorchPickler(pickle._Pickler):  # the Python pickler: its save_global can be overridden
    """Writes torch's pickle of tensors (``_rebuild_tensor_v2`` over storages kept beside the
    pickle) without torch; everything else is pickled as usual."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _Global):
            return obj.name  # a name: save_global below writes it
        if isinstance(obj, _Tensor):
            shape = obj.values.shape
            stride = tuple(s // obj.values.itemsize for s in obj.values.strides)
            rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
            return rebuild, (_StorageRef(obj), 0, shape, stride, False, OrderedDict())
        return NotImplemented

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageRef):
            t = obj.tensor
            storage = _Global("torch", _STORAGE_NAMES[t.values.dtype])
            return ("storage", storage, str(t.key), "cpu", t.values.size)
        return None

    def save_global(self, obj: Any, name: Any = None) -> None:
        if not isinstance(obj, _Global):
            super().save_global(obj, name)
            return
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)


def write_model_pt(path: Path, state: dict[str, np.ndarray], var_names: list[str], attr: dict[str, Any]) -> None:
    """``model.pt`` as ``scvi.model.SCVI.save`` writes it: torch's zip archive (records stored,
    not compressed) of the pickled state dict, gene names and model attributes."""
    tensors = OrderedDict(
        (name, _Tensor(values, i) if isinstance(values, np.ndarray) else values)
        for i, (name, values) in enumerate(state.items())
    )
    buffer = io.BytesIO()
    saved = {"model_state_dict": tensors, "var_names": np.array(var_names, dtype=object), "attr_dict": attr}
    _TorchPickler(buffer, protocol=2).dump(saved)
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as z:
        z.writestr("model/data.pkl", buffer.getvalue())
        z.writestr("model/byteorder", "little")
        for t in filter(lambda t: isinstance(t, _Tensor), tensors.values()):
            z.writestr(f"model/data/{t.key}", t.values.astype(t.values.dtype.newbyteorder("<")).tobytes())
        z.writestr("model/version", "3\n")
    partial.replace(path)


def _fclayers(
    tensors: dict[str, np.ndarray], ours: str, theirs: str, n_layers: int, keep_cov: bool, batch_norm: bool
) -> dict[str, np.ndarray]:
    """tessera's hidden layers as FCLayers' (the inverse of `_layers`). A one-batch wc, which
    scvi-tools has no column for, is constant over cells: it joins the bias."""
    out = {}
    for i in range(n_layers):
        w, b = tensors[f"{ours}.{i}.w"].T, tensors[f"{ours}.{i}.b"]
        wc = tensors.get(f"{ours}.{i}.wc")
        if wc is not None and keep_cov:
            w = np.concatenate([w, wc.T], axis=1)
        elif wc is not None:
            b = b + wc.sum(axis=0)
        out[f"{theirs}.Layer {i}.0.weight"] = w
        out[f"{theirs}.Layer {i}.0.bias"] = b
        if batch_norm:
            for mine, torch_name in _BATCH_NORM:
                out[f"{theirs}.Layer {i}.1.{torch_name}"] = tensors[f"{ours}.{i}.{mine}"]
            out[f"{theirs}.Layer {i}.1.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def _unused_library_encoder(n_in: int, n_hidden: int, batch_norm: bool) -> dict[str, np.ndarray]:
    """scvi-tools' library encoder, which a model on the observed library size never runs
    (normalised as the other encoder)."""
    prefix = "l_encoder.encoder.fc_layers.Layer 0"
    normed = {
        f"{prefix}.1.weight": np.ones(n_hidden, np.float32),
        f"{prefix}.1.bias": np.zeros(n_hidden, np.float32),
        f"{prefix}.1.running_mean": np.zeros(n_hidden, np.float32),
        f"{prefix}.1.running_var": np.ones(n_hidden, np.float32),
        f"{prefix}.1.num_batches_tracked": np.zeros((), np.int64),
    }
    return {
        f"{prefix}.0.weight": np.zeros((n_hidden, n_in), np.float32),
        f"{prefix}.0.bias": np.zeros(n_hidden, np.float32),
        **(normed if batch_norm else {}),
        "l_encoder.mean_encoder.weight": np.zeros((1, n_hidden), np.float32),
        "l_encoder.mean_encoder.bias": np.zeros(1, np.float32),
        "l_encoder.var_encoder.weight": np.zeros((1, n_hidden), np.float32),
        "l_encoder.var_encoder.bias": np.zeros(1, np.float32),
    }


def scvi_state(tensors: dict[str, np.ndarray], params: dict[str, Any], n_genes: int, n_batches: int) -> dict[str, Any]:
    """tessera's tensors as scvi-tools' VAE state dict (every entry its ``load_state_dict``
    expects; the heads tessera's model does not run, the library encoder and the per-cell
    dispersion, zero; ZINB's zero-inflation head zero for NB)."""
    n_layers, n_hidden = params["n_layers"], params["n_hidden"]
    keep = n_batches > 1  # scvi-tools gives a single batch no one-hot column
    state = {}
    likelihood = params["gene_likelihood"]
    theta = tensors.get("log_theta")
    state["px_r"] = np.zeros(n_genes, np.float32) if theta is None else theta.T
    batch_norm = norms(params)["batch_norm"]
    state.update(_fclayers(tensors, "encoder", "z_encoder.encoder.fc_layers", n_layers, keep, batch_norm))
    for ours, theirs in (("mean", "mean_encoder"), ("logvar", "var_encoder")):
        state[f"z_encoder.{theirs}.weight"] = tensors[f"encoder.{ours}.w"].T
        state[f"z_encoder.{theirs}.bias"] = tensors[f"encoder.{ours}.b"]
    encoded = n_batches if keep and params.get("encode_covariates") else 0
    state.update(_unused_library_encoder(n_genes + encoded, n_hidden, batch_norm))
    state.update(_fclayers(tensors, "decoder", "decoder.px_decoder.fc_layers", n_layers, keep, batch_norm))
    # The module's extra state (scvi-tools' Pyro parameter store: empty for SCVI).
    state["pyro_param_store"] = {}
    state["decoder.px_scale_decoder.0.weight"] = tensors["decoder.main.w"].T
    state["decoder.px_scale_decoder.0.bias"] = tensors["decoder.main.b"]
    state["decoder.px_r_decoder.weight"] = np.zeros((n_genes, n_hidden), np.float32)
    state["decoder.px_r_decoder.bias"] = np.zeros(n_genes, np.float32)
    if likelihood == "zinb":
        state["decoder.px_dropout_decoder.weight"] = tensors["decoder.zero_inflation.w"].T
        state["decoder.px_dropout_decoder.bias"] = tensors["decoder.zero_inflation.b"]
    else:
        state["decoder.px_dropout_decoder.weight"] = np.zeros((n_genes, n_hidden), np.float32)
        state["decoder.px_dropout_decoder.bias"] = np.zeros(n_genes, np.float32)
    return state


def _categorical(key: str | None, categories: list[str], internal: str, count: str) -> dict[str, Any]:
    """A categorical field's registry entry; without a key scvi-tools registers one category."""
    mapping = np.array(categories, dtype=object) if key else np.array([0])
    return {
        "data_registry": {"attr_name": "obs", "attr_key": internal},
        "state_registry": {"categorical_mapping": mapping, "original_key": key or internal},
        "summary_stats": {count: len(mapping)},
    }


def registry(setup: dict[str, Any], shape: tuple[int, int], var_names: list[str], batches: list[str],
             labels: list[str], version: str) -> dict[str, Any]:
    """scvi-tools' ``registry_`` of an SCVI set up with ``setup`` (what ``SCVI.load`` replays
    onto the AnnData it is given)."""
    n_obs, n_vars = shape
    layer = setup.get("layer")
    fields = {
        "X": {
            "data_registry": {"attr_name": "layers" if layer else "X", "attr_key": layer},
            "state_registry": {"n_obs": n_obs, "n_vars": n_vars, "column_names": np.array(var_names, dtype=object)},
            "summary_stats": {"n_vars": n_vars, "n_cells": n_obs},
        },
        "batch": _categorical(setup.get("batch_key"), batches, "_scvi_batch", "n_batch"),
        "labels": _categorical(setup.get("labels_key"), labels, "_scvi_labels", "n_labels"),
        "size_factor": {"data_registry": {}, "state_registry": {}, "summary_stats": {}},
        "extra_categorical_covs": {"data_registry": {}, "state_registry": {},
                                   "summary_stats": {"n_extra_categorical_covs": 0}},
        "extra_continuous_covs": {"data_registry": {}, "state_registry": {},
                                  "summary_stats": {"n_extra_continuous_covs": 0}},
    }
    return {
        "scvi_version": version,
        "model_name": "SCVI",
        "setup_args": {"layer": layer, "batch_key": setup.get("batch_key"), "labels_key": setup.get("labels_key"),
                       "size_factor_key": None, "categorical_covariate_keys": None,
                       "continuous_covariate_keys": None},
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
        "_scvi_uuid": str(uuid.uuid4()),
    }


def export_refusals(model: dict[str, Any]) -> list[str]:
    """The ``[model]`` settings scvi-tools' SCVI has no counterpart of, as ``key=value``."""
    checks = (
        ("likelihood", model.get("likelihood", "nb") in ("nb", "zinb", "poisson")),
        ("dispersion", model.get("dispersion", "gene") in ("gene", "gene-batch")),
        ("var_eps", model.get("var_eps", 1e-4) == 1e-4),
    )
    return [f"{key}={model.get(key)!r}" for key, ok in checks if not ok]


def exported(
    model: dict[str, Any],
    tensors: dict[str, np.ndarray],
    setup: dict[str, Any],
    cells: tuple[int, list[str]],
    categories: tuple[list[str], list[str]],
    history: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """scvi-tools' state dict and model attributes of a tessera SCVI (its ``[model]`` table,
    tensors and setup; ``cells``: the AnnData's cell count and genes; ``categories``: the
    model's batches and the labels' classes)."""
    (n_obs, var_names), (batches, labels) = cells, categories
    params = {
        "n_hidden": model.get("n_hidden", 128),
        "n_latent": model.get("n_latent", 10),
        "n_layers": model.get("n_layers", 1),
        "dropout_rate": model.get("dropout", 0.1),
        "dispersion": model.get("dispersion", "gene"),
        "gene_likelihood": model.get("likelihood", "nb"),
        "latent_distribution": "normal",
        "use_observed_lib_size": True,
    }
    covariates = {
        "encode_covariates": bool(model.get("encode_covariates", False)),
        "deeply_inject_covariates": bool(model.get("deeply_inject_covariates", True)),
        "use_batch_norm": "both" if model.get("batch_norm", True) else "none",
        "use_layer_norm": "both" if model.get("layer_norm", False) else "none",
    }
    state = scvi_state(tensors, {**params, **covariates}, len(var_names), len(batches))
    none = np.array([], dtype=np.int64)
    attr = {
        "init_params_": {"non_kwargs": params, "kwargs": {"kwargs": covariates}},
        "registry_": registry(setup, (n_obs, len(var_names)), var_names, batches, labels, SCVI_TOOLS_VERSION),
        "history_": dict(history),
        "is_trained_": True,
        "train_indices_": none,
        "validation_indices_": none,
        "test_indices_": none,
        "run_id_": "",
        "run_name_": f"tessera {_tessera.__version__}",
        "get_normalized_function_name_": "get_normalized_expression",
    }
    return state, attr
