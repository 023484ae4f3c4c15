"""``tessera.model.MULTIVAE`` and ``TOTALVI``: one joint embedding of every modality of a
MuData, cells missing a modality included, with each modality's expression imputed."""

from __future__ import annotations

import contextlib

from typing import Any, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _anndata, _tessera
from ._scvi import SCVI


class MULTIVAE(SCVI):
    """A multimodal VAE over the modalities of a MuData (tessera's joint model).

    Each modality has its encoder and decoder and its likelihood (NB for RNA; Bernoulli for
    accessibility, ``atac``/``peaks``; totalVI's background/foreground NB mixture for proteins,
    ``prot``/``adt``; any modality's can be set with ``modalities={"name": {"likelihood":
    ...}}``); the experts are joined by a product (``joint="poe"``), a mixture (``"moe"``) or
    concatenation. A cell that lacks a modality (``mdata.obsmap[name] == 0``) is encoded from
    the ones it has, and its missing modality is imputed. Trained on the MuData in memory (no
    file is written), or streamed from its store (``tessera.read_zarr``).

    Examples
    --------
    >>> tessera.model.MULTIVAE.setup_mudata(mdata, modalities=["rna", "atac"], batch_key="batch")
    >>> model = tessera.model.MULTIVAE(mdata)
    >>> model.train(max_epochs=100)
    >>> mdata.obsm["X_tessera"] = model.get_latent_representation()
    >>> peaks = model.get_normalized_expression(modality="atac")  # every cell, imputed
    """

    def __init__(
        self,
        mdata: Any,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        joint: str = "poe",
        **model_kwargs: Any,
    ) -> None:
        super().__init__(
            mdata, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers,
            dropout_rate=dropout_rate, joint=joint, **model_kwargs,
        )

    @classmethod
    def setup_anndata(cls, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        raise TypeError(f"{cls.__name__} models a MuData: use {cls.__name__}.setup_mudata")

    @classmethod
    def setup_mudata(
        cls,
        mdata: Any,
        modalities: Sequence[str] | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
    ) -> None:
        """Registers the modalities to model (default: every one, in ``mdata.mod`` order), the
        batch column of ``mdata.obs`` and further covariates of ``mdata.obs`` (as
        :meth:`SCVI.setup_anndata`'s). Each modality's X must hold counts (a warning
        otherwise)."""
        names = list(mdata.mod) if modalities is None else list(modalities)
        for name in names:
            if name not in mdata.mod:
                raise KeyError(f"modality {name!r} is not in mdata.mod (it has {list(mdata.mod)})")
            _anndata.check_registered_matrix(mdata.mod[name], None)
            if name not in mdata.obsmap:
                raise ValueError(f"mdata.obsmap has no {name!r}: call mdata.update() first")
        if not names:
            raise ValueError("no modalities to model")
        for field, key in (("batch_key", batch_key), ("labels_key", labels_key)):
            if key is not None and key not in mdata.obs:
                raise KeyError(f"{field} {key!r} is not a column of mdata.obs")
        setup = {
            "modalities": names,
            "batch_key": batch_key,
            "labels_key": labels_key,
            "categorical_covariate_keys": categorical_covariate_keys,
            "continuous_covariate_keys": continuous_covariate_keys,
        }
        _anndata.check_covariates(mdata, setup)
        mdata.uns[_anndata.SETUP_KEY] = {k: v for k, v in setup.items() if v is not None}

    @classmethod
    def _transfer_setup(cls, adata: Any, setup: dict[str, Any]) -> None:
        MULTIVAE.setup_mudata(adata, **setup)

    def _denoised_library_size(self) -> float | None:
        return 1.0

    def _cells(self, adata: Any) -> tuple[Any, ...]:
        """The model's modalities that the MuData ``adata`` has, each with a row per cell (empty
        where ``obsmap`` says the cell lacks it), and its batches, as the engine takes them. A
        modality the MuData lacks is missing in every cell (encoded from the others, imputed)."""
        modalities = []
        names = [n for n in self._setup["modalities"] if n in getattr(adata, "mod", {})]
        if not names:
            raise KeyError(
                f"this {type(adata).__name__} has none of the model's modalities "
                f"({self._setup['modalities']}): pass a MuData"
            )
        for name in names:
            if name not in adata.obsmap:
                raise ValueError(f"mdata.obsmap has no {name!r}: call mdata.update() first")
            rows = np.asarray(adata.obsmap[name]).astype(np.int64)
            present = rows > 0
            csr = _anndata.counts_matrix(adata.mod[name], None)
            # Row i of the result is row rows[i] - 1 of the modality, or empty.
            pick = sp.csr_matrix(
                (np.ones(int(present.sum()), dtype=np.float32),
                 (np.flatnonzero(present), rows[present] - 1)),
                shape=(adata.n_obs, csr.shape[0]),
            )
            modalities.append((
                name, *_anndata.csr_arrays(sp.csr_matrix(pick @ csr)),
                [str(v) for v in adata.mod[name].var_names],
                None if present.all() else present.tolist(),
            ))
        setup = self._setup_for(adata)
        return modalities, _anndata.batch_names(adata, setup), *_anndata.covariates(adata, setup)

    def _write_store(self, location: str, attached: contextlib.ExitStack) -> None:
        """The MuData's registered modalities (``_anndata.attachable_modalities``) and
        batches as a new in-memory store at ``location``."""
        mdata, setup = self.adata, self._setup
        categoricals, floats = _anndata.covariate_columns(mdata, setup)
        if setup.get("batch_key") and setup["batch_key"] not in {c[0] for c in categoricals}:
            categoricals.append((setup["batch_key"], *_anndata.categorical(mdata, setup["batch_key"])))
        modalities = _anndata.attachable_modalities(mdata, setup["modalities"], attached)
        _tessera.attach_mudata(
            location, [str(n) for n in mdata.obs_names], categoricals, floats, modalities
        )

    def get_latent_representation(
        self,
        adata: Any | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """The joint latent mean of every cell (cells x n_latent) of the MuData the model
        trained on, or of another MuData with the model's modalities (by name; features
        aligned by name, zero where missing) and known batches; cells missing a modality are
        encoded from the ones they have."""
        return super().get_latent_representation(adata, indices, give_mean, batch_size)

    def get_normalized_expression(  # type: ignore[override]
        self,
        adata: Any | None = None,
        indices: Sequence[int] | None = None,
        modality: str | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float = 1.0,
        return_numpy: bool | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """One modality's expression decoded at every cell's joint latent mean (cells x
        features), imputed for the cells that lack the modality: RNA proportions × 
        ``library_size``, accessibility probabilities, proteins' expected foreground counts
        (``library_size`` applies to count likelihoods only). Cells of the training MuData (by
        default) or of another with the model's modalities, each decoded with its own batch."""
        self._check_trained()
        names = list(self._setup["modalities"])
        modality = names[0] if modality is None else modality
        if modality not in names:
            raise KeyError(f"modality {modality!r} is not one the model has ({names})")
        if (adata is None or adata is self.adata) and modality in self._denoised:
            # What training decoded (at library size 1) for the cells it trained on.
            scales, values = self._denoised[modality]
            values = values * np.float32(library_size) if scales else values
        else:
            values = self._loaded().expression(
                self._cells(self.adata if adata is None else adata), float(library_size)
            )[names.index(modality)]
        adata = self.adata if adata is None else adata
        frame = pd.DataFrame(
            values,
            index=adata.obs_names.copy(),
            columns=self.adata.mod[modality].var_names.copy(),
        )
        if gene_list is not None:
            frame = frame[list(gene_list)]
        if indices is not None:
            frame = frame.iloc[np.asarray(indices)]
        return frame.to_numpy() if return_numpy else frame


class TOTALVI(MULTIVAE):
    """totalVI's setup (RNA + surface proteins of a CITE-seq MuData) on tessera's joint model:
    NB for RNA and totalVI's background/foreground NB mixture for the proteins, a product of
    experts, so cells without protein data are embedded from RNA and get imputed proteins.

    >>> tessera.model.TOTALVI.setup_mudata(mdata, batch_key="batch",
    ...     modalities={"rna_layer": "rna", "protein_layer": "prot"})
    >>> model = tessera.model.TOTALVI(mdata)
    >>> model.train(max_epochs=100)
    >>> rna, protein = model.get_normalized_expression()
    """

    def __init__(self, mdata: Any, n_latent: int = 20, **model_kwargs: Any) -> None:
        setup = _anndata.setup_of(mdata)
        protein = setup["modalities"][1]
        overrides = dict(model_kwargs.pop("modalities", {}))
        overrides.setdefault(protein, {"likelihood": "nb-mixture"})
        super().__init__(mdata, n_latent=n_latent, modalities=overrides, **model_kwargs)

    @classmethod
    def setup_mudata(  # type: ignore[override]
        cls,
        mdata: Any,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        batch_key: str | None = None,
        modalities: dict[str, str] | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
    ) -> None:
        """``modalities`` names the RNA and protein modalities as in scvi-tools
        (``{"rna_layer": "rna", "protein_layer": "prot"}``); layers other than X are not
        supported yet."""
        if rna_layer is not None or protein_layer is not None:
            raise ValueError("rna_layer/protein_layer are not supported yet: put counts in X")
        names = modalities or {}
        if "rna_layer" not in names or "protein_layer" not in names:
            raise ValueError(
                "modalities must name the RNA and protein modalities: "
                '{"rna_layer": "rna", "protein_layer": "prot"}'
            )
        super().setup_mudata(
            mdata, modalities=[names["rna_layer"], names["protein_layer"]], batch_key=batch_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    def get_normalized_expression(  # type: ignore[override]
        self,
        adata: Any | None = None,
        indices: Sequence[int] | None = None,
        library_size: float = 1.0,
        return_numpy: bool | None = None,
        **kwargs: Any,
    ) -> tuple[pd.DataFrame | np.ndarray, pd.DataFrame | np.ndarray]:
        """(RNA, protein) expression of every cell, as totalVI returns them; proteins without
        their background, imputed for cells without protein data."""
        rna, protein = self._setup["modalities"]
        return tuple(  # type: ignore[return-value]
            super(TOTALVI, self).get_normalized_expression(
                adata, indices, modality=m, library_size=library_size, return_numpy=return_numpy
            )
            for m in (rna, protein)
        )
