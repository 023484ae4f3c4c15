"""``tessera.model.SCVI``: scvi-tools' SCVI interface over tessera's engine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd

from .. import _anndata, _tessera
from . import _scvi_tools
from .._progress import EpochProgress

# scvi-tools' keyword → tessera's `[model]` key, where the names differ.
_MODEL_NAMES = {"dropout_rate": "dropout", "gene_likelihood": "likelihood"}
# scvi-tools' `plan_kwargs` → tessera's `[train]` key.
_PLAN_NAMES = {"eps": "adam_eps", "n_epochs_kl_warmup": "kl_warmup_epochs"}
# scvi-tools' keywords that have no equivalent here: refused rather than ignored.
_UNSUPPORTED = {
    "n_steps_kl_warmup": "use n_epochs_kl_warmup",
    "callbacks": "Lightning callbacks do not run in tessera's engine; model.history has every "
    "epoch's values after training",
}
# Lightning Trainer keywords scvi-tools scripts pass whose effect tessera has anyway: validation
# every epoch, logging every step, checkpoints in the model's folder, shuffled split, sparse
# minibatches.
_LIGHTNING_SAME = (
    "check_val_every_n_epoch",
    "log_every_n_steps",
    "enable_checkpointing",
    "shuffle_set_split",
    "load_sparse_tensor",
    "enable_model_summary",
)
# The files of a saved model besides the engine's (`tessera train --out`).
_SETUP_FILE = "tessera_setup.json"
_HISTORY_FILE = "history.json"
# scvi-tools' default patience when early_stopping=True.
_EARLY_STOPPING_PATIENCE = 45


class SCVI:
    """scVI (Lopez et al. 2018) trained by tessera's engine, with scvi-tools' interface.

    A variational autoencoder with a negative binomial (or ZINB, Poisson) likelihood over
    counts, the batch as a covariate of the decoder, and a 10-dimensional latent space by
    default. Every keyword of scvi-tools' ``scvi.model.SCVI`` below means what it means there;
    any other key of ``tessera train``'s ``[model]`` table (``mmd_batch_weight``,
    ``encode_covariates``, ``adversarial_batch_weight``, ...) is accepted as a keyword too, and
    an unknown one is a TypeError.

    Parameters
    ----------
    adata
        An AnnData registered with :meth:`setup_anndata`.
    n_hidden, n_latent, n_layers, dropout_rate
        Width of the hidden layers, latent dimensions, hidden layers, dropout.
    dispersion
        ``"gene"`` (one inverse dispersion per gene), ``"gene-batch"`` or ``"gene-cell"``.
    gene_likelihood
        ``"nb"``, ``"zinb"`` or ``"poisson"``.
    **model_kwargs
        Further ``[model]`` keys, and scvi-tools' ``use_batch_norm``/``use_layer_norm``
        (``"both"`` or ``"none"``; scArches' setting: ``use_layer_norm="both",
        use_batch_norm="none"``).

    Examples
    --------
    >>> tessera.model.SCVI.setup_anndata(adata, batch_key="batch")
    >>> model = tessera.model.SCVI(adata)
    >>> model.train(max_epochs=100)
    >>> adata.obsm["X_scVI"] = model.get_latent_representation()
    """

    def __init__(
        self,
        adata: Any,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "nb",
        **model_kwargs: Any,
    ) -> None:
        self.adata = adata
        self._setup = _anndata.setup_of(adata)
        init = dict(
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            **model_kwargs,
        )
        self.init_params_ = init
        self._model = _model_table(init)
        if dispersion == "gene-label":
            raise ValueError("dispersion='gene-label' is not supported: use 'gene', 'gene-batch' or 'gene-cell'")
        _tessera.check_config(json.dumps({"model": self._model}))
        self.is_trained_ = False
        self.history_: dict[str, pd.DataFrame] = {}
        self._train: dict[str, Any] = {}
        self._folder = tempfile.TemporaryDirectory(prefix="tessera-model-")
        self._embedding: np.ndarray | None = None
        self._engine: Any = None
        self._device = "cpu"
        # Set by load_query_data: the reference's folder and what fine-tuning may change.
        self._query: dict[str, Any] | None = None
        self.query_report_: dict[str, Any] | None = None
        self.transferred_labels_: pd.DataFrame | None = None
        self._query_predictions: np.ndarray | None = None
        self._denoised: dict[str, tuple[bool, np.ndarray]] = {}
        # A trained model's folder to start from (SCANVI.from_scvi_model), and its owner,
        # kept alive with it.
        self._init_from: str | None = None
        self._init_owner: Any = None

    # -- registration ----------------------------------------------------------------------

    @classmethod
    def setup_anndata(
        cls,
        adata: Any,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
    ) -> None:
        """Registers which fields of ``adata`` the model reads (stored in ``adata.uns``).

        Parameters
        ----------
        layer
            The layer of counts (``None``: ``adata.X``). Negative or non-integer values warn.
        batch_key
            obs column of batches (categorical, strings or integers).
        labels_key
            obs column of cell labels (used by label-aware models; kept for SCVI).
        categorical_covariate_keys
            obs columns of further categorical covariates (donor, technology...): each one-hot
            and injected where the batch is. New cells must have categories the model saw.
        continuous_covariate_keys
            Numeric obs columns given to the model as they are (every cell needs a value).
        """
        _anndata.register(
            adata,
            {
                "layer": layer,
                "batch_key": batch_key,
                "labels_key": labels_key,
                "categorical_covariate_keys": categorical_covariate_keys,
                "continuous_covariate_keys": continuous_covariate_keys,
            },
        )

    # -- training --------------------------------------------------------------------------

    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices: Any = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        batch_size: int = 128,
        early_stopping: bool = False,
        plan_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
        progress_bar: bool = True,
        **trainer_kwargs: Any,
    ) -> None:
        """Trains the model on the registered AnnData (in memory: no file is written).

        Parameters
        ----------
        max_epochs
            Epochs; ``None``: scvi-tools' rule, min(400, round(400 · 20,000 / cells)).
        accelerator
            ``"cpu"``, or ``"gpu"``/``"cuda"`` for the first GPU; ``"auto"`` is the CPU.
        devices
            A GPU index when ``accelerator`` is a GPU (``"auto"``: the first).
        train_size, validation_size
            Shares of cells trained on and held out (default 0.9 and the rest).
        batch_size
            Cells per minibatch.
        early_stopping
            Stop after 45 epochs (``early_stopping_patience``) without a lower validation ELBO.
        plan_kwargs
            scvi-tools' training-plan keywords: ``lr``, ``weight_decay``, ``eps``,
            ``optimizer``, ``n_epochs_kl_warmup``, ``max_kl_weight``, ``reduce_lr_on_plateau``,
            ``lr_factor``, ``lr_patience``, ``lr_threshold``, ``lr_min``; or any key of
            ``tessera train``'s ``[train]`` table.
        seed
            Seeds initialisation, the split, minibatches and dropout: the same seed gives the
            same model as ``tessera train --seed``.
        progress_bar
            Show a bar (tqdm, when installed) or a line per tenth of the epochs.
        **trainer_kwargs
            ``early_stopping_patience``, or any other ``[train]`` key; ``enable_progress_bar``
            (as ``progress_bar``); Lightning's ``check_val_every_n_epoch``,
            ``log_every_n_steps``, ``enable_checkpointing``, ``enable_model_summary``,
            ``shuffle_set_split`` and ``load_sparse_tensor`` are accepted and change nothing
            (tessera validates every epoch and always reads sparse minibatches).
        """
        if self._query is not None:
            self._train_query(max_epochs, seed)
            return
        train = self._train_config(
            max_epochs, train_size, validation_size, batch_size, early_stopping, seed
        )
        progress_bar = trainer_kwargs.pop("enable_progress_bar", progress_bar)
        for key in _LIGHTNING_SAME:
            trainer_kwargs.pop(key, None)
        for key, value in {**(plan_kwargs or {}), **trainer_kwargs}.items():
            if key in _UNSUPPORTED:
                raise TypeError(f"{key} is not supported: {_UNSUPPORTED[key]}")
            if key == "optimizer" and isinstance(value, str):
                value = value.lower()
            train[_PLAN_NAMES.get(key, key)] = value
        config = json.dumps({"model": self._model, "train": train})
        _tessera.check_config(config)
        device = _device(accelerator, devices)
        embedding, report = self._fit(config, device, progress_bar)
        self._embedding = embedding
        self._engine = None
        self._device = device
        self._train = train
        self._report = json.loads(report)
        self.history_ = _history(self._report["history"])
        self.is_trained_ = True

    def _train_config(
        self,
        max_epochs: int | None,
        train_size: float | None,
        validation_size: float | None,
        batch_size: int,
        early_stopping: bool,
        seed: int,
    ) -> dict[str, Any]:
        train_size = 0.9 if train_size is None else float(train_size)
        # Rounded so that train_size=0.9 holds out floor(0.1 · n) cells, as `tessera train`
        # does, not one fewer (1 - 0.9 is 0.09999999999999998).
        held_out = round(1.0 - train_size, 12) if validation_size is None else validation_size
        held_out = float(held_out)
        if not 0.0 < train_size <= 1.0 or not 0.0 <= held_out < 1.0:
            raise ValueError(
                f"train_size {train_size} and validation_size {held_out}: expected shares in (0, 1]"
            )
        return {
            "max_epochs": max_epochs,
            "batch_size": batch_size,
            "validation_fraction": held_out,
            "early_stopping_patience": _EARLY_STOPPING_PATIENCE if early_stopping else None,
            "seed": seed,
        }

    def _fit(self, config: str, device: str, progress_bar: bool) -> tuple[np.ndarray, str]:
        """Trains on the registered AnnData (in memory, or streamed from its store)."""
        progress = EpochProgress(progress_bar)
        try:
            with self._data_location() as (location, layer, unlabeled):
                embedding, report, denoised = _tessera.fit(
                    location,
                    layer,
                    config,
                    self._folder.name,
                    self._setup.get("modalities", []),
                    self._setup.get("batch_key"),
                    self._label_key(),
                    unlabeled,
                    *_anndata.covariate_keys(self._setup),
                    "X_tessera",
                    self._denoised_library_size(),
                    self._init_from,
                    device,
                    progress,
                )
                self._denoised = {name: (scales, values) for name, scales, values in denoised}
                return embedding, report
        finally:
            progress.close()

    @contextlib.contextmanager
    def _data_location(self) -> Iterator[tuple[str, str | None, str | None]]:
        """Where the engine reads the registered data, which layer and which label marks an
        unlabelled cell: a store-backed AnnData's own store (``tessera.read_zarr``: streamed,
        never written), else an in-memory store whose X is the registered matrix (read in place)
        and whose labels are already coded without the unlabelled category."""
        store = _anndata.store_of(self.adata)
        if store is None:
            with self._memory_store() as location:
                yield location, None, None
            return
        _anndata.check_store_columns(store, self._setup)
        yield store, self._setup.get("layer"), self._setup.get("unlabeled_category")

    def _memory_store(self) -> contextlib.AbstractContextManager[str]:
        """The registered data as an in-memory store (freed on exit): what the engine reads,
        with no file written. The count matrix is attached, not copied: read in place, and
        read-only until the store is freed."""
        return _anndata.memory_store(self._write_store)

    def _write_store(self, location: str, attached: contextlib.ExitStack) -> None:
        """The AnnData's counts (attached, read-only while ``attached`` is open), batches and
        labels as a new in-memory store at ``location``."""
        setup = self._setup
        batch_key, label_key = setup.get("batch_key"), self._label_key()
        categoricals = []
        if batch_key:
            categoricals.append((batch_key, *_anndata.categorical(self.adata, batch_key)))
        if label_key and label_key != batch_key:
            labels = _anndata.labels(self.adata, label_key, setup.get("unlabeled_category"))
            categoricals.append((label_key, *labels))
        written = {name for name, _, _ in categoricals}
        covariates, floats = _anndata.covariate_columns(self.adata, setup)
        categoricals += [c for c in covariates if c[0] not in written]
        _tessera.attach_anndata(
            location,
            _anndata.attachable_counts(self.adata, setup.get("layer"), attached),
            self.adata.n_vars,
            [str(n) for n in self.adata.obs_names],
            [str(n) for n in self.adata.var_names],
            categoricals,
            floats,
        )

    def _label_key(self) -> str | None:
        """The obs column the engine trains labels from (none for SCVI, which ignores them)."""
        return None

    def _denoised_library_size(self) -> float | None:
        """The library size of the expression the engine returns after training (None: none;
        SCVI decodes on demand instead)."""
        return None

    # -- results ---------------------------------------------------------------------------

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch values under scvi-tools' keys (``elbo_train``, ``elbo_validation``,
        ``reconstruction_loss_train``, ``kl_local_train``, ``train_loss_epoch``,
        ``validation_loss``, ``kl_weight``, ``lr``...), each a one-column DataFrame indexed by
        epoch."""
        return self.history_

    def get_latent_representation(
        self,
        adata: Any | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """The latent mean of each cell (cells x n_latent, float32); ``give_mean=False``: one
        draw from each cell's posterior instead (seeded from numpy's global generator, so
        ``np.random.seed`` makes it repeatable).

        ``adata`` defaults to the AnnData the model trained on; another AnnData must be set
        up the same way, have the model's genes and only batches the model knows (map new
        batches with ``tessera map``). ``batch_size`` is accepted for compatibility and not
        needed.
        """
        self._check_trained()
        if not give_mean:
            cells = self._cells(self.adata if adata is None else adata)
            z = self._loaded().posterior_samples(cells, 1, _engine_seed())[0]
            return z if indices is None else z[np.asarray(indices)]
        if adata is None and self._embedding is not None:
            z = self._embedding
        else:
            z = self._encode(self.adata if adata is None else adata)
        return z if indices is None else z[np.asarray(indices)]

    def get_normalized_expression(
        self,
        adata: Any | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float = 1.0,
        n_samples: int = 1,
        return_numpy: bool | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> pd.DataFrame | np.ndarray:
        """The decoder's expected expression of every gene at each cell's latent mean, scaled
        to ``library_size`` counts per cell (1: proportions), as a cells x genes DataFrame
        (``return_numpy=True``: an array).

        ``transform_batch``: decode every cell as if it came from this batch (a list: the mean
        over those batches), scvi-tools' batch-corrected expression; ``None``: each cell's own
        batch. ``gene_list``: only these genes, in this order. ``n_samples=1`` decodes the latent
        mean (the expression ``tessera train --denoised`` writes; deterministic), where
        scvi-tools decodes one posterior sample; ``n_samples > 1`` averages the expression
        decoded at that many posterior draws per cell (seeded from numpy's global generator).
        With ``n_samples > 1`` and ``return_mean=False``, each draw's values instead: an array
        of n_samples x cells x genes, as scvi-tools returns.
        """
        self._check_trained()
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples={n_samples!r}: expected a positive integer")
        if not isinstance(library_size, (int, float)):
            raise ValueError(f"library_size={library_size!r}: expected a number")
        adata = self.adata if adata is None else adata
        if indices is not None:
            adata = adata[np.asarray(indices)]
        modalities, own, categorical, continuous = self._cells(adata)
        runs = [own] if transform_batch is None else [
            [b] * adata.n_obs for b in _as_list(transform_batch, own)
        ]
        if transform_batch is not None and self._model.get("encode_covariates"):
            raise ValueError(
                "transform_batch with encode_covariates=True is not supported yet: the encoder "
                "would see the transformed batch too"
            )
        draws = n_samples > 1 and not return_mean

        def decoded(batches: list[str]) -> np.ndarray:
            cells = (modalities, batches, categorical, continuous)
            if n_samples == 1:
                return self._loaded().expression(cells, float(library_size))[0]
            values = self._loaded().expression_sampled(
                cells, float(library_size), n_samples, _engine_seed(), return_mean
            )[0]
            return values.reshape(n_samples, adata.n_obs, -1) if draws else values

        values = np.mean([decoded(batches) for batches in runs], axis=0).astype(np.float32)
        genes = self._genes()
        columns = np.arange(len(genes))
        if gene_list is not None:
            missing = [g for g in gene_list if g not in genes]
            if missing:
                raise KeyError(f"gene_list names genes the model does not have: {missing[:5]}")
            columns = genes.get_indexer(list(gene_list))
        if draws:
            # scvi-tools' return_mean=False: one cells x genes array per draw.
            return values[:, :, columns]
        frame = pd.DataFrame(
            values[:, columns], index=adata.obs_names.copy(), columns=genes[columns]
        )
        return frame.to_numpy() if return_numpy else frame

    def _genes(self) -> pd.Index:
        """The model's genes in its order (from the reference it saved)."""
        return pd.Index(self.adata.var_names.copy())

    def _encode(self, adata: Any) -> np.ndarray:
        return self._loaded().latent(self._cells(adata))

    def _loaded(self) -> Any:
        """The trained model in the engine, loaded once."""
        if self._engine is None:
            self._engine = _tessera.Model(self._folder.name, self._device)
        return self._engine

    def _cells(self, adata: Any) -> tuple[Any, ...]:
        """``adata``'s counts (CSR arrays), gene names, batches and covariates, as the engine
        takes them."""
        csr = _anndata.counts_matrix(adata, _anndata.setup_of(adata).get("layer"))
        setup = self._setup_for(adata)
        modality = ("", *_anndata.csr_arrays(csr), [str(n) for n in adata.var_names], None)
        return (
            [modality],
            _anndata.batch_names(adata, setup),
            *_anndata.covariates(adata, setup),
        )

    def _setup_for(self, adata: Any) -> dict[str, Any]:
        """The model's batch key read from ``adata`` (which must have that column)."""
        key = self._setup.get("batch_key")
        if key is not None and key not in adata.obs:
            raise KeyError(f"the model's batch_key {key!r} is not a column of adata.obs")
        return self._setup

    def _check_trained(self) -> None:
        if not self.is_trained_:
            raise RuntimeError("the model is not trained yet: call .train() first")

    # -- saving ----------------------------------------------------------------------------

    def save(
        self,
        dir_path: str | os.PathLike[str],
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
    ) -> None:
        """Writes the trained model into ``dir_path``: the engine's files (``model.safetensors``,
        ``config.json``, the reference embedding ``tessera load`` and ``tessera map`` read,
        ``history.csv``, ``loss.png``), the registration and the history; a query model
        (``load_query_data`` + ``train``) saves with the query's batches added and loads like
        any model; with
        ``save_anndata``, ``adata.h5ad`` too. An existing folder is refused unless
        ``overwrite``."""
        self._check_trained()
        if prefix:
            raise ValueError("prefix is not supported: save each model into its own folder")
        target = Path(dir_path)
        if target.exists() and not overwrite:
            raise ValueError(
                f"{target} already exists: pass overwrite=True or another directory"
            )
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self._folder.name, target, dirs_exist_ok=True)
        saved = {
            "setup": self._setup,
            "init_params": self.init_params_,
            "train": self._train,
            "var_names": [str(n) for n in self.adata.var_names],
        }
        (target / _SETUP_FILE).write_text(json.dumps(saved, indent=2))
        (target / _HISTORY_FILE).write_text(json.dumps(self._report["history"]))
        if save_anndata:
            import anndata

            # An AnnData read from a recent store may hold pandas' string arrays; they are
            # written as they are rather than refused.
            with anndata.settings.override(allow_write_nullable_strings=True):
                if hasattr(self.adata, "mod"):
                    self.adata.write_h5mu(target / "mdata.h5mu")
                else:
                    self.adata.write_h5ad(target / "adata.h5ad")

    @classmethod
    def load(cls, dir_path: str | os.PathLike[str], adata: Any | None = None) -> "SCVI":
        """A model saved by :meth:`save`, or by scvi-tools' ``scvi.model.SCVI.save`` (a
        folder with ``model.pt``: its weights are read without torch and run in tessera's
        engine), on ``adata`` (default: the ``adata.h5ad`` saved with it). ``adata`` must have
        the model's genes in order; it is registered with the model's setup when it is not
        registered yet."""
        source = Path(dir_path)
        setup_file = source / _SETUP_FILE
        if not setup_file.is_file() and (source / "model.pt").is_file():
            return cls._load_scvi_tools(source, adata)
        if not setup_file.is_file():
            raise ValueError(f"{setup_file} is missing: {source} is not a saved tessera model")
        saved = json.loads(setup_file.read_text())
        if adata is None:
            adata = _read_saved_anndata(source)
        if _anndata.SETUP_KEY not in adata.uns:
            cls._transfer_setup(adata, saved["setup"])
        model = cls(adata, **saved["init_params"])
        _check_genes(source, adata)
        shutil.copytree(source, model._folder.name, dirs_exist_ok=True)
        model._train = saved["train"]
        model._report = {"history": json.loads((source / _HISTORY_FILE).read_text())}
        model.history_ = _history(model._report["history"])
        model.is_trained_ = True
        return model

    def save_scvi_tools(
        self,
        dir_path: str | os.PathLike[str],
        overwrite: bool = False,
        save_anndata: bool = False,
    ) -> None:
        """Writes the trained model as ``scvi.model.SCVI.save`` does (``dir_path/model.pt``;
        with ``save_anndata`` also ``adata.h5ad``) for ``scvi.model.SCVI.load(dir_path,
        adata)``, which then gives the latent means and expression this model gives. torch is
        not needed to write it. Only what scvi-tools' SCVI computes: NB, ZINB or Poisson,
        dispersion ``"gene"`` or ``"gene-batch"``, BatchNorm, the batch as the only covariate
        (regularisers such as ``mmd_batch_weight`` shaped training and need nothing there).
        An existing ``model.pt`` is refused unless ``overwrite``."""
        self._check_trained()
        refused = _scvi_tools.export_refusals(self._model)
        if type(self) is not SCVI or self._setup.get("modalities"):
            refused.append(f"a {type(self).__name__} model")
        if any(_anndata.covariate_keys(self._setup)):
            refused.append("covariates besides the batch")
        if refused:
            raise ValueError(f"scvi-tools' SCVI has no counterpart of {', '.join(refused)}")
        target = Path(dir_path)
        if (target / "model.pt").exists() and not overwrite:
            raise ValueError(f"{target / 'model.pt'} already exists: pass overwrite=True or another directory")
        config = json.loads((Path(self._folder.name) / "config.json").read_text())
        tensors = {n: v.reshape(shape) for n, shape, v in self._loaded().tensors()}
        var_names = [str(n) for n in self.adata.var_names]
        labels_key = self._setup.get("labels_key")
        labels = _anndata.categorical(self.adata, labels_key)[1] if labels_key else []
        state, attr = _scvi_tools.exported(
            self._model, tensors, self._setup, (self.adata.n_obs, var_names),
            (config.get("batch_categories", []), labels), self.history_,
        )
        target.mkdir(parents=True, exist_ok=True)
        _scvi_tools.write_model_pt(target / "model.pt", state, var_names, attr)
        if save_anndata:
            self.adata.write_h5ad(target / "adata.h5ad")

    # scvi-tools' model class whose saved folders `load` reads (None: none).
    _SCVI_TOOLS_MODEL: str | None = "SCVI"

    @classmethod
    def _load_scvi_tools(cls, source: Path, adata: Any | None) -> "SCVI":
        """A model scvi-tools trained and saved (``source/model.pt``), its weights copied into
        a tessera model folder; its reference cells are ``adata``'s."""
        path = source / "model.pt"
        saved = _scvi_tools.read_model_pt(path)
        registry = saved["attr_dict"].get("registry_", {})
        kind = registry.get("model_name")
        if cls._SCVI_TOOLS_MODEL is None or kind != cls._SCVI_TOOLS_MODEL:
            raise ValueError(
                f"{path} holds a scvi-tools {kind} model: tessera.model.{cls.__name__}.load "
                f"reads {cls._SCVI_TOOLS_MODEL or 'tessera'} models (scvi-tools' SCVI: "
                "tessera.model.SCVI.load)"
            )
        params = _scvi_tools.init_params(saved["attr_dict"], path)
        setup = registry.get("setup_args", {})
        _scvi_tools.check_setup(setup, path)
        adata = _read_saved_anndata(source) if adata is None else adata
        adata = cls._registered_like(adata, saved, setup, path)
        model = cls(
            adata,
            **{k: params[k] for k in ("n_hidden", "n_latent", "n_layers", "dropout_rate")},
            dispersion=params.get("dispersion", "gene"),
            gene_likelihood=params.get("gene_likelihood", "zinb"),
            encode_covariates=params.get("encode_covariates", False),
            deeply_inject_covariates=params.get("deeply_inject_covariates", True),
            **_scvi_tools.norms(params),
        )
        model._take_scvi_tools_weights(saved, params, setup, path)
        return model

    @classmethod
    def _registered_like(cls, adata: Any, saved: dict[str, Any], setup: dict[str, Any], path: Path) -> Any:
        """``adata`` checked against the saved model's genes, and registered with its setup
        (refused when it is registered otherwise)."""
        var_names = [str(v) for v in saved["var_names"]]
        if [str(v) for v in adata.var_names] != var_names:
            raise ValueError(
                f"adata's {adata.n_vars} genes are not the {len(var_names)} genes of {path} in "
                "order (SCVI.prepare_query_anndata aligns a query's genes)"
            )
        if _anndata.SETUP_KEY not in adata.uns:
            cls.setup_anndata(
                adata,
                layer=setup.get("layer"),
                batch_key=setup.get("batch_key"),
                labels_key=setup.get("labels_key"),
            )
        registered = _anndata.setup_of(adata)
        for key in ("layer", "batch_key"):
            if registered.get(key) != setup.get(key):
                raise ValueError(
                    f"adata is set up with {key}={registered.get(key)!r}, the model in {path} "
                    f"with {key}={setup.get(key)!r}"
                )
        return adata

    def _take_scvi_tools_weights(
        self, saved: dict[str, Any], params: dict[str, Any], setup: dict[str, Any], path: Path
    ) -> None:
        """Writes the engine's model folder from scvi-tools' weights, embeds ``adata`` as its
        reference cells and marks the model trained (with scvi-tools' history)."""
        attr, registry = saved["attr_dict"], saved["attr_dict"].get("registry_", {})
        var_names = [str(v) for v in saved["var_names"]]
        batch_key, labels_key = setup.get("batch_key"), setup.get("labels_key")
        labels = _scvi_tools.categories(registry, "labels") if labels_key else []
        batches = _scvi_tools.categories(registry, "batch") if batch_key else []
        record = {
            "data": str(path),
            "imported_from": f"scvi-tools {registry.get('scvi_version')} {registry.get('model_name')}",
            "modalities": [["X", len(var_names)]],
            "batch_key": batch_key,
            "label_key": labels_key,
            "n_obs": self.adata.n_obs,
            "batch_categories": batches,
            "label_categories": labels,
            "covariates": {"categorical": [], "continuous": []},
            "model": self._model,
            "train": {},
        }
        tensors = _scvi_tools.tessera_tensors(saved["model_state_dict"], params, len(var_names), len(batches))
        folder = self._folder.name
        _tessera.write_imported_model(
            folder, json.dumps(record), tensors, {"X": var_names}, (batch_key, labels_key), labels
        )
        latent = self._encode(self.adata)
        _tessera.set_reference_latent(folder, latent, _label_codes(self.adata, labels_key, labels))
        self._engine = None  # reopened with the reference cells
        self._embedding = latent
        self._report = {"history": []}
        self.history_ = {
            k: v for k, v in attr.get("history_", {}).items() if isinstance(v, pd.DataFrame)
        }
        self.is_trained_ = True

    # -- query mapping (scArches) ---------------------------------------------------------

    @classmethod
    def prepare_query_anndata(
        cls,
        adata: Any,
        reference_model: "SCVI | str | os.PathLike[str]",
        return_reference_var_names: bool = False,
        inplace: bool = True,
    ) -> Any:
        """Puts ``adata``'s genes in the reference's order, with zero columns for the genes it
        lacks and its other genes dropped, as scvi-tools does (tessera's mapping also aligns
        by name, so this is optional). ``reference_model``: a trained model or its saved
        folder. Returns the reference's gene names with ``return_reference_var_names``, the
        new AnnData with ``inplace=False``, else None."""
        genes = pd.Index(_reference(reference_model)[1]["var_names"])
        if return_reference_var_names:
            return genes
        padded = _anndata.with_genes(adata, genes)
        if not inplace:
            return padded
        adata._init_as_actual(
            X=padded.X, obs=padded.obs, var=padded.var, uns=padded.uns, obsm=padded.obsm,
            layers=padded.layers,
        )
        return None

    @classmethod
    def load_query_data(
        cls,
        adata: Any,
        reference_model: "SCVI | str | os.PathLike[str]",
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device: Any = "auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
        freeze_classifier: bool = True,
    ) -> "SCVI":
        """A query model for ``adata`` from a trained reference (a model or its saved folder),
        as scArches' architecture surgery: the query's new batches get covariate rows; with
        the defaults only those rows train (``freeze_expression=False`` also opens the first
        encoder and decoder layers, ``freeze_decoder_first_layer=False`` the first decoder
        layer). Then ``.train(max_epochs)`` fine-tunes and embeds the query (``tessera map``'s
        engine); the reference's labels are transferred to ``transferred_labels_`` by its
        cells' nearest neighbours. ``adata`` gets the reference's registration when it has
        none."""
        defaults = {
            "unfrozen": (unfrozen, False),
            "freeze_dropout": (freeze_dropout, False),
            "freeze_batchnorm_encoder": (freeze_batchnorm_encoder, True),
            "freeze_batchnorm_decoder": (freeze_batchnorm_decoder, False),
            "freeze_classifier": (freeze_classifier, True),
        }
        for name, (value, default) in defaults.items():
            if value != default:
                raise ValueError(f"{name}={value} is not supported yet (only {default})")
        folder, saved = _reference(reference_model)
        if _anndata.SETUP_KEY not in adata.uns:
            cls._transfer_setup(adata, saved["setup"])
        model = cls(adata, **saved["init_params"])
        model._query = {
            "reference": folder,
            "encoder_input": not freeze_expression,
            "decoder_input": not (freeze_expression and freeze_decoder_first_layer),
            "device": _device(accelerator, device),
        }
        return model

    @classmethod
    def _transfer_setup(cls, adata: Any, setup: dict[str, Any]) -> None:
        cls.setup_anndata(adata, **setup)

    def _train_query(self, max_epochs: int | None, seed: int) -> None:
        assert self._query is not None
        epochs = max_epochs
        if epochs is None:  # scvi-tools' rule, as for training
            epochs = _epoch_rule(self.adata.n_obs)
        q = self._query
        with self._data_location() as (location, layer, _):
            z, transferred, uncertainty, classifier, report = _tessera.map_query(
                q["reference"], location, layer, self._setup.get("batch_key"), epochs,
                q["encoder_input"], q["decoder_input"], 50, seed, q["device"],
                self._folder.name,
            )
        self._device = q["device"]
        self._engine = None
        self._embedding = z
        self.query_report_ = json.loads(report)
        index = self.adata.obs_names.copy()
        self.transferred_labels_ = (
            pd.DataFrame({"label": transferred, "uncertainty": uncertainty}, index=index)
            if transferred
            else None
        )
        self._query_predictions = np.asarray(classifier, dtype=object) if classifier else None
        # Fine-tuning keeps no per-epoch history (query_report_ has its final loss).
        self._report = {"history": []}
        self.is_trained_ = True

    def __repr__(self) -> str:
        params = ", ".join(f"{k}: {v}" for k, v in self.init_params_.items())
        status = "trained" if self.is_trained_ else "not trained"
        return f"{type(self).__name__} model (tessera) with {params}; {status}"


def _engine_seed() -> int:
    """A seed for the engine's draws from numpy's global generator (``np.random.seed``)."""
    return int(np.random.randint(0, 2**63 - 1, dtype=np.int64))


def _epoch_rule(n_cells: int) -> int:
    """scvi-tools' default epochs: min(400, round(400 · 20,000 / cells))."""
    return int(min(400, max(1, round(400 * 20_000 / max(1, n_cells)))))


def _model_table(init: dict[str, Any]) -> dict[str, Any]:
    """The ``[model]`` table of scvi-tools' keywords: renamed where tessera names them otherwise,
    ``use_batch_norm``/``use_layer_norm`` ("both" or "none": tessera normalises encoders and
    decoders alike) as ``batch_norm``/``layer_norm``."""
    table = {}
    for key, value in init.items():
        if key in ("use_batch_norm", "use_layer_norm"):
            if value not in ("both", "none"):
                raise ValueError(
                    f"{key}={value!r} is not supported: 'both' or 'none' (tessera normalises "
                    "the encoder and the decoder alike)"
                )
            table[key.removeprefix("use_")] = value == "both"
        else:
            table[_MODEL_NAMES.get(key, key)] = value
    return table


def _device(accelerator: str, devices: Any) -> str:
    if accelerator in ("auto", "cpu"):
        return "cpu"
    if accelerator in ("gpu", "cuda"):
        return "cuda" if devices in ("auto", None, 1, -1) else f"cuda:{int(devices)}"
    raise ValueError(f"accelerator {accelerator!r}: expected 'auto', 'cpu', 'gpu' or 'cuda'")


def _as_list(batches: str | Sequence[str], own: list[str]) -> list[str]:
    names = [batches] if isinstance(batches, str) else list(batches)
    if not own:
        raise ValueError("transform_batch: the model was trained without batches")
    return names


def _history(records: list[dict[str, Any]]) -> dict[str, pd.DataFrame]:
    """scvi-tools' history tables from the engine's epoch records."""
    columns: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        columns.setdefault(key, []).append(value)

    for r in records:
        for split, terms in (("train", r["train"]), ("validation", r.get("validation"))):
            if terms is None:
                continue
            add(f"elbo_{split}", terms["reconstruction"] + terms["kl"])
            add(f"reconstruction_loss_{split}", terms["reconstruction"])
            add(f"kl_local_{split}", terms["kl"])
            add("train_loss_epoch" if split == "train" else "validation_loss", terms["loss"])
        add("kl_weight", r["kl_weight"])
        add("lr", r["lr"])
    epochs = [r["epoch"] for r in records]
    return {
        key: pd.DataFrame({key: values}, index=pd.Index(epochs[: len(values)], name="epoch"))
        for key, values in columns.items()
    }


def _reference(model: "SCVI | str | os.PathLike[str]") -> tuple[str, dict[str, Any]]:
    """A reference's engine folder and its saved setup, init parameters and genes."""
    if isinstance(model, SCVI):
        model._check_trained()
        saved = {
            "setup": model._setup,
            "init_params": model.init_params_,
            "var_names": [str(n) for n in model.adata.var_names],
        }
        return model._folder.name, saved
    setup_file = Path(model) / _SETUP_FILE
    if not setup_file.is_file():
        raise ValueError(f"{setup_file} is missing: {model} is not a saved tessera model")
    return str(model), json.loads(setup_file.read_text())


def _label_codes(adata: Any, key: str | None, categories: list[str]) -> list[int]:
    """Each cell's label as a code into ``categories`` (-1: missing or another label)."""
    if key is None:
        return []
    index = {c: i for i, c in enumerate(categories)}
    return [index.get(str(v), -1) if not pd.isna(v) else -1 for v in adata.obs[key]]


def _read_saved_anndata(source: Path) -> Any:
    if (source / "mdata.h5mu").is_file():
        import mudata

        return mudata.read_h5mu(source / "mdata.h5mu")
    path = source / "adata.h5ad"
    if not path.is_file():
        raise ValueError(f"pass adata: {source} holds no adata.h5ad (saved without save_anndata)")
    import anndata

    return anndata.read_h5ad(path)


def _check_genes(source: Path, adata: Any) -> None:
    """The model's features per modality (from its config) against ``adata``'s (a MuData's
    modalities by name)."""
    config = json.loads((source / "config.json").read_text())
    for name, expected in config.get("modalities", [])[: None if hasattr(adata, "mod") else 1]:
        given = adata.mod[name] if hasattr(adata, "mod") else adata
        if given.n_vars != expected:
            what = f"modality {name!r} has {given.n_vars} features" if hasattr(adata, "mod") else (
                f"adata has {given.n_vars} genes"
            )
            raise ValueError(f"{what}, the model in {source} was trained on {expected}")
