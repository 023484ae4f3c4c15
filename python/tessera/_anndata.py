"""What the engine needs from an AnnData: counts as CSR in tessera's widths, covariates as
categorical codes. Registration (``setup_anndata``) lives in ``adata.uns``, as scvi-tools keeps
its own there."""

from __future__ import annotations

import contextlib
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import _tessera

SETUP_KEY = "_tessera_setup"
# uns key of an AnnData from `read_zarr`: the store its matrices stay in.
STORE_KEY = "_tessera_store"
# Stored values a store-backed AnnData's count check reads (the first ones of X or the layer).
COUNT_SAMPLE = 200_000


def _read_elem(element: Any) -> Any:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(element)


def _open_group(path: str) -> Any:
    import zarr

    try:
        return zarr.open_group(path, mode="r")
    except Exception as e:  # zarr raises several types for a missing or foreign path
        raise ValueError(f"{path}: not a readable Zarr store ({e})") from e


def read_zarr(path: str | os.PathLike[str]) -> Any:
    """The AnnData (or MuData) Zarr store at ``path`` with its obs and var in memory and its
    matrices left in the store: a model set up on it trains by streaming the store through
    the engine's loader (for atlases larger than memory) and writes nothing into it. Its obs
    columns are the store's: registered keys must be columns of the store. Encoding or
    decoding its cells later (``get_latent_representation(adata)``,
    ``get_normalized_expression``) reads the registered matrix into memory."""
    location = str(path)
    if "://" not in location:
        location = os.path.abspath(location)
    group = _open_group(location)
    if "mod" in group:
        return _read_mudata(location, group)
    return _store_anndata(location, group)


def _store_anndata(location: str, group: Any) -> Any:
    """An AnnData of the group's obs and var, its matrices left at ``location``."""
    import anndata

    for element in ("obs", "var", "X"):
        if element not in group:
            raise ValueError(f"{location} has no {element}: not an AnnData Zarr store")
    adata = anndata.AnnData(obs=_read_elem(group["obs"]), var=_read_elem(group["var"]))
    adata.uns[STORE_KEY] = location
    return adata


def _read_mudata(location: str, group: Any) -> Any:
    """A MuData of the store's obs, var and obsmap, each modality a store-backed AnnData (its
    own location ``<store>/mod/<name>``), in the store's modality order."""
    import mudata

    mods_group = group["mod"]
    order = [str(m) for m in mods_group.attrs.get("mod-order", sorted(mods_group.keys()))]
    mods = {name: _store_anndata(f"{location}/mod/{name}", mods_group[name]) for name in order}
    if "obsmap" not in group:
        raise ValueError(f"{location} has no obsmap: not a MuData Zarr store")
    obsmap = {name: np.asarray(group["obsmap"][name][:]) for name in order}
    mdata = mudata.MuData._init_from_dict_(
        mod=mods, obs=_read_elem(group["obs"]), var=_read_elem(group["var"]), obsmap=obsmap
    )
    mdata.uns[STORE_KEY] = location
    return mdata


def check_store_columns(store: str, setup: dict[str, Any]) -> None:
    """The registered obs columns must be the store's (its root obs, or for a MuData a
    modality's, where the engine also looks): the engine reads them there."""
    group = _open_group(store)
    columns = set(group["obs"].keys())
    for name in group["mod"].keys() if "mod" in group else []:
        columns |= set(group["mod"][name]["obs"].keys())
    categorical, continuous = covariate_keys(setup)
    keys = [setup.get("batch_key"), setup.get("labels_key"), *categorical, *continuous]
    for key in filter(None, keys):
        if key not in columns:
            raise KeyError(
                f"obs column {key!r} is not in {store}/obs: a store-backed AnnData trains on "
                "the store's columns (write it into the store, or read the AnnData into memory)"
            )


def store_of(adata: Any) -> str | None:
    """The store a ``read_zarr`` AnnData's matrices are in (None: in memory)."""
    location = adata.uns.get(STORE_KEY) if hasattr(adata, "uns") else None
    return None if location is None else str(location)


def setup_of(adata: Any) -> dict[str, Any]:
    """The registration ``setup_anndata`` stored, or a ValueError saying to call it."""
    setup = adata.uns.get(SETUP_KEY)
    if setup is None:
        raise ValueError(
            "this AnnData is not set up for tessera: call "
            "tessera.model.SCVI.setup_anndata(adata, ...) first"
        )
    return dict(setup)


def register(adata: Any, setup: dict[str, Any]) -> None:
    """Checks every key against the AnnData, then stores the registration (None left out)."""
    layer = setup.get("layer")
    store = store_of(adata)
    layers = sorted(adata.layers.keys()) if store is None else _store_layers(store)
    if layer is not None and layer not in layers:
        raise KeyError(f"layer {layer!r} is not in adata.layers (it has {layers})")
    for field in ("batch_key", "labels_key"):
        key = setup.get(field)
        if key is not None and key not in adata.obs:
            raise KeyError(f"{field} {key!r} is not a column of adata.obs")
    check_covariates(adata, setup)
    check_registered_matrix(adata, layer)
    adata.uns[SETUP_KEY] = {k: v for k, v in setup.items() if v is not None}


def check_registered_matrix(adata: Any, layer: str | None) -> None:
    """NaN, shape and the count warning, at setup rather than when training starts: of the
    matrix in memory, or of the first stored values of a store-backed one."""
    store = store_of(adata)
    if store is None:
        check_matrix(adata, layer)
    else:
        check_counts(_stored_sample(store, layer), f"{store}: {field_name(layer)}")


COVARIATE_FIELDS = ("categorical_covariate_keys", "continuous_covariate_keys")


def check_covariates(adata: Any, setup: dict[str, Any]) -> None:
    """The covariate keys of ``setup`` as lists (None when empty), each a column of
    ``adata.obs`` (an AnnData's or a MuData's), the continuous ones numbers in every cell."""
    for field in COVARIATE_FIELDS:
        keys = setup.get(field)
        if isinstance(keys, str):
            raise TypeError(f"{field} is a list of obs columns, got the string {keys!r}")
        setup[field] = None if not keys else [str(k) for k in keys]
        for key in setup[field] or []:
            if key not in adata.obs:
                raise KeyError(f"{field}: {key!r} is not a column of adata.obs")
    for key in setup.get("continuous_covariate_keys") or []:
        continuous(adata, key)


def covariate_columns(adata: Any, setup: dict[str, Any]) -> tuple[list, list]:
    """The registered covariates as ``attach_anndata``/``attach_mudata`` take obs columns:
    (name, codes, categories) and (name, values)."""
    categorical_keys, continuous_keys = covariate_keys(setup)
    return (
        [(key, *categorical(adata, key)) for key in categorical_keys],
        [(key, continuous(adata, key)) for key in continuous_keys],
    )


def covariate_keys(setup: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The registered categorical and continuous covariate columns (empty lists if none)."""
    return tuple([str(k) for k in (setup.get(f) or [])] for f in COVARIATE_FIELDS)


def continuous(adata: Any, key: str) -> list[float]:
    """A numeric obs column as floats; every cell needs a finite value."""
    column = adata.obs[key]
    if not pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise TypeError(
            f"continuous_covariate_keys: adata.obs[{key!r}] has dtype {column.dtype} "
            "(expected numbers; pass a categorical column as categorical_covariate_keys)"
        )
    values = column.to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"continuous_covariate_keys: adata.obs[{key!r}] has missing or infinite values "
            "(every cell needs one)"
        )
    return values.tolist()


def covariates(adata: Any, setup: dict[str, Any]) -> tuple[list[list[str]], list[list[float]]]:
    """Each cell's registered covariates, as the engine takes them for new cells: per
    categorical key the category names (a missing value is an error), per continuous key the
    values."""
    categorical_keys, continuous_keys = covariate_keys(setup)
    names = []
    for key in categorical_keys:
        if key not in adata.obs:
            raise KeyError(f"the model's covariate {key!r} is not a column of adata.obs")
        codes, categories = categorical(adata, key)
        if any(c < 0 for c in codes):
            raise ValueError(f"adata.obs[{key!r}] has missing values (every cell needs one)")
        names.append([categories[c] for c in codes])
    for key in continuous_keys:
        if key not in adata.obs:
            raise KeyError(f"the model's covariate {key!r} is not a column of adata.obs")
    return names, [continuous(adata, key) for key in continuous_keys]


def field_name(layer: str | None) -> str:
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def _store_layers(store: str) -> list[str]:
    group = _open_group(store)
    return sorted(group["layers"].keys()) if "layers" in group else []


def _stored_matrix(store: str, layer: str | None) -> Any:
    group = _open_group(store)
    return group["X"] if layer is None else group["layers"][layer]


def _stored_sample(store: str, layer: str | None) -> np.ndarray:
    """The first stored values of X or the layer (CSR/CSC data, or a dense matrix's first
    rows), for the count check."""
    import zarr

    element = _stored_matrix(store, layer)
    if isinstance(element, zarr.Group):
        return np.asarray(element["data"][:COUNT_SAMPLE])
    rows = max(1, COUNT_SAMPLE // max(1, element.shape[1]))
    return np.asarray(element[:rows]).ravel()


def _store_rows(adata: Any, layer: str | None, store: str) -> Any:
    """A store-backed AnnData's matrix read into memory, its rows those of ``adata`` (which
    may be a subset of the store's cells)."""
    x = _read_elem(_stored_matrix(store, layer))
    stored = pd.Index(_read_elem(_open_group(store)["obs"]).index)
    if stored.equals(pd.Index(adata.obs_names)):
        return x
    rows = stored.get_indexer(adata.obs_names)
    if np.any(rows < 0):
        raise KeyError(f"cells of this AnnData are not in {store}: {list(adata.obs_names[rows < 0][:3])}")
    return x[rows]


def check_counts(values: np.ndarray, name: str) -> None:
    """NaN and infinity are errors; negative or non-integer values warn as scvi-tools does,
    since the count likelihoods expect raw counts."""
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} holds NaN or infinite values (expected counts)")
    if values.size and (values.min() < 0 or np.any(values != np.round(values))):
        warnings.warn(
            f"{name} does not look like counts (negative or non-integer values); "
            "the count likelihoods expect unnormalised counts: register a layer of raw counts",
            UserWarning,
            stacklevel=4,
        )


def backed_reader(adata: Any, layer: str | None) -> tuple[np.ndarray, int, Any] | None:
    """A backed AnnData's X (``anndata.read_h5ad(path, backed="r")``) as the engine streams it
    from the file: (indptr, nnz, ``read(start, stop) -> (indices, data)``); None when X is in
    memory or a layer is registered (layers of a backed AnnData are in memory)."""
    if layer is not None or not getattr(adata, "isbacked", False) or adata.is_view:
        return None
    x = adata.X
    group = getattr(x, "group", None)
    if getattr(x, "format", None) != "csr" or group is None:
        kind = getattr(x, "format", type(x).__name__)
        raise ValueError(
            f"{adata.filename}: backed X is {kind}; tessera streams CSR from a backed file "
            "(read it into memory with adata.to_memory(), or `tessera convert` it to Zarr "
            "and use tessera.read_zarr)"
        )
    indices, data = group["indices"], group["data"]

    def read(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return (
            np.asarray(indices[start:stop], dtype=np.int32),
            np.asarray(data[start:stop], dtype=np.float32),
        )

    return np.asarray(group["indptr"][:], dtype=np.int64), int(data.shape[0]), read


def check_matrix(adata: Any, layer: str | None) -> None:
    """An in-memory or backed AnnData's X (or layer): its shape and values (``check_counts``;
    of a backed X, the first stored values), read where they are, without the conversion
    ``counts_matrix`` makes when training starts."""
    x = adata.X if layer is None else adata.layers[layer]
    name = field_name(layer)
    if x is None:
        raise ValueError(f"{name} is empty (expected a cells x genes count matrix)")
    if backed_reader(adata, layer) is not None:
        check_counts(np.asarray(x.group["data"][:COUNT_SAMPLE]), f"{adata.filename}: {name}")
        return
    values = x.data if sp.issparse(x) else np.asarray(x)
    if len(x.shape) != 2:
        raise ValueError(f"{name} has {len(x.shape)} dimensions (expected 2)")
    if tuple(x.shape) != (adata.n_obs, adata.n_vars):
        raise ValueError(f"{name} is {tuple(x.shape)}, adata is {(adata.n_obs, adata.n_vars)}")
    check_counts(values, name)


def counts_matrix(adata: Any, layer: str | None) -> sp.csr_matrix:
    """X (or the layer) as a float32 CSR matrix: scipy CSR of that dtype is used as it is,
    anything else is converted (a store-backed AnnData's is read from its store). Values are
    checked by ``check_counts``."""
    store = store_of(adata)
    x = _store_rows(adata, layer, store) if store else (
        adata.X if layer is None else adata.layers[layer]
    )
    name = field_name(layer)
    if x is None:
        raise ValueError(f"{name} is empty (expected a cells x genes count matrix)")
    if hasattr(x, "to_memory"):  # a backed AnnData's sparse dataset
        x = x.to_memory()
    if sp.issparse(x):
        csr = sp.csr_matrix(x, dtype=np.float32) if x.format != "csr" else x
        if csr.dtype != np.float32:
            csr = csr.astype(np.float32)
    else:
        dense = np.asarray(x)
        if dense.ndim != 2:
            raise ValueError(f"{name} has {dense.ndim} dimensions (expected 2)")
        csr = sp.csr_matrix(dense.astype(np.float32, copy=False))
    if csr.shape != (adata.n_obs, adata.n_vars):
        raise ValueError(f"{name} is {csr.shape}, adata is {(adata.n_obs, adata.n_vars)}")
    check_counts(csr.data, name)
    return csr


def csr_arrays(csr: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """indptr (int64), indices (int32), data (float32), contiguous: the matrix's own arrays
    where they already are (so the engine reads them in place), else converted copies."""
    return (
        _contiguous(csr.indptr, np.int64),
        _contiguous(csr.indices, np.int32),
        _contiguous(csr.data, np.float32),
    )


def _contiguous(array: np.ndarray, dtype: Any) -> np.ndarray:
    # np.asarray and np.ascontiguousarray may return a new view even when nothing changes
    # (an array read by zarr), but the engine must read, and Python mark read-only, the
    # array itself.
    if array.dtype == dtype and array.flags.c_contiguous:
        return array
    return np.ascontiguousarray(array, dtype=dtype)


@contextlib.contextmanager
def memory_store(write: Callable[[str, contextlib.ExitStack], None]) -> Iterator[str]:
    """A new in-memory store that ``write(location, attached)`` fills (its matrices attached,
    read-only while ``attached`` is open): what the engine reads, with no file written;
    freed on exit."""
    name = f"tessera-{uuid.uuid4().hex}"
    location = f"memory://{name}/data.zarr"
    with contextlib.ExitStack() as attached:
        try:
            write(location, attached)
            yield location
        finally:
            _tessera.forget_memory_store(name)


def attachable_counts(adata: Any, layer: str | None, attached: contextlib.ExitStack) -> tuple:
    """X (or the layer) as ``attach_anndata`` takes it: a backed file's reader, or the
    in-memory CSR arrays, read-only while ``attached`` is open."""
    backed = backed_reader(adata, layer)
    if backed is not None:
        return backed
    arrays = csr_arrays(counts_matrix(adata, layer))
    attached.enter_context(read_only(*arrays[1:]))
    return arrays


def attachable_modalities(
    mdata: Any, names: list[str], attached: contextlib.ExitStack
) -> list[tuple]:
    """The MuData's modalities ``names`` as ``attach_mudata`` takes them: each over the cells
    that measured it, in the MuData's cell order (the modality's own matrix, read in place,
    when it is in that order already), read-only while ``attached`` is open."""
    modalities = []
    for name in names:
        if name not in mdata.mod:
            raise KeyError(f"modality {name!r} is not in mdata.mod (it has {list(mdata.mod)})")
        if name not in mdata.obsmap:
            raise ValueError(f"mdata.obsmap has no {name!r}: call mdata.update() first")
        rows = np.asarray(mdata.obsmap[name]).astype(np.int64).ravel()
        present = rows > 0
        csr = counts_matrix(mdata.mod[name], None)
        picked = rows[present] - 1
        if not np.array_equal(picked, np.arange(csr.shape[0])):
            csr = csr[picked]
        arrays = csr_arrays(csr)
        attached.enter_context(read_only(*arrays[1:]))
        modalities.append((
            name, *arrays,
            [str(v) for v in mdata.mod[name].var_names],
            None if present.all() else present.tolist(),
        ))
    return modalities


@contextlib.contextmanager
def read_only(*arrays: np.ndarray) -> Iterator[None]:
    """The arrays marked read-only while the engine reads them in place from its threads (a
    write would raise instead of changing what training sees); restored on exit."""
    writeable = [a.flags.writeable for a in arrays]
    for a in arrays:
        a.flags.writeable = False
    try:
        yield
    finally:
        for a, was in zip(arrays, writeable):
            if was:
                a.flags.writeable = True


def categorical(adata: Any, key: str) -> tuple[list[int], list[str]]:
    """An obs column as codes (-1: missing) and category names; numbers become categories in
    numeric order, as they do in ``tessera train``."""
    column = adata.obs[key]
    values = pd.Categorical(column)  # keeps a categorical's own categories and order
    categories = [str(c) for c in values.categories]
    return values.codes.astype(int).tolist(), categories


def labels(adata: Any, key: str, unlabeled: str | None) -> tuple[list[int], list[str]]:
    """Label codes and classes with ``unlabeled`` (scANVI's ``unlabeled_category``) and missing
    values as -1, outside the classes."""
    codes, categories = categorical(adata, key)
    if unlabeled is None or unlabeled not in categories:
        return codes, categories
    dropped = categories.index(unlabeled)
    remap = [c - (c > dropped) if c != dropped else -1 for c in range(len(categories))]
    return [remap[c] if c >= 0 else -1 for c in codes], [
        c for c in categories if c != unlabeled
    ]


def batch_names(adata: Any, setup: dict[str, Any]) -> list[str]:
    """Each cell's batch as its category name (empty without a batch key)."""
    key = setup.get("batch_key")
    if key is None:
        return []
    codes, categories = categorical(adata, key)
    if any(c < 0 for c in codes):
        raise ValueError(f"adata.obs[{key!r}] has missing values (every cell needs a batch)")
    return [categories[c] for c in codes]


def with_genes(adata: Any, genes: pd.Index) -> Any:
    """A copy of ``adata`` with exactly ``genes`` as columns, in that order: its own where it
    has them, zeros (in X and every layer) where not."""
    import anndata

    position = pd.Index(adata.var_names).get_indexer(genes)
    have = position >= 0
    # Column j of the result is column position[j] of adata, or nothing.
    pick = sp.csr_matrix(
        (np.ones(int(have.sum()), dtype=np.float32),
         (position[have], np.flatnonzero(have))),
        shape=(adata.n_vars, len(genes)),
    )

    def aligned(x: Any) -> Any:
        product = sp.csr_matrix(x, dtype=np.float32) @ pick
        return product if sp.issparse(x) else product.toarray()

    layers = {key: aligned(value) for key, value in adata.layers.items()}
    return anndata.AnnData(
        X=None if adata.X is None else aligned(adata.X),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=pd.Index(genes, name=adata.var_names.name)),
        uns=dict(adata.uns),
        obsm=dict(adata.obsm),
        layers=layers,
    )
