"""scvi-tools' saved models (``model.save(dir)``: ``dir/model.pt``) read without torch, and their
weights renamed to tessera's tensors, so ``tessera.model.SCVI.load(dir, adata)`` takes a model
trained by ``scvi.model.SCVI``.

``model.pt`` is a torch archive: a zip holding a pickle whose tensors point at raw storages
beside it. It is read with a restricted unpickler that rebuilds tensors as numpy arrays and
allows only numpy, pandas and plain containers otherwise, so loading a model runs no code of
the file's choosing and needs no torch.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

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
# Plain classes a saved model's attributes may hold besides numpy's and pandas'.
_PLAIN = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "object"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("builtins", "complex"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "bool"),
    ("builtins", "range"),
    ("copyreg", "_reconstructor"),
    # How protocol 2 writes bytes (numpy arrays' data).
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("datetime", "datetime"),
    ("datetime", "date"),
    ("datetime", "timedelta"),
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
        if module.split(".")[0] in ("numpy", "pandas") or (module, name) in _PLAIN:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"{self._path} holds a {module}.{name} object, which tessera does not read "
            "(a scvi-tools model holds tensors, numpy and pandas objects)"
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
    "use_batch_norm": ("both",),
    "use_layer_norm": ("none",),
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


def check_setup(setup: dict[str, Any], path: Path) -> None:
    for key in _SETUP_UNSUPPORTED:
        if setup.get(key):
            raise ValueError(f"{path}: registered with {key}={setup[key]!r}, which tessera does not import yet")


def categories(registry: dict[str, Any], field: str) -> list[str]:
    """A categorical field's categories in the model's code order (its one-hot columns)."""
    mapping = registry["field_registries"].get(field, {}).get("state_registry", {}).get("categorical_mapping")
    return [] if mapping is None else [str(c) for c in mapping]


def _layers(
    state: dict[str, np.ndarray], ours: str, theirs: str, dims: tuple[int, int, int], covariates: tuple[int, bool, bool]
) -> dict[str, np.ndarray]:
    """FCLayers' Linear + BatchNorm1d layers as tessera's (w: in x out; the covariate one-hots,
    which FCLayers concatenates after the input, as wc). ``covariates``: the one-hot columns
    tessera gives a layer that sees them (its batches), whether the first layer sees them, and
    whether every layer does."""
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
        for mine, torch_name in (("bn_gamma", "weight"), ("bn_beta", "bias"), ("bn_running_mean", "running_mean"),
                                 ("bn_running_var", "running_var")):
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
    out = _layers(state, "encoder", "z_encoder.encoder.fc_layers", encoder, seen)
    decoder = (n_layers, n_latent, n_hidden)
    out.update(_layers(state, "decoder", "decoder.px_decoder.fc_layers", decoder, (n_batches, True, every)))
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
