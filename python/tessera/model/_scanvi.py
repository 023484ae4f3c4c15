"""``tessera.model.SCANVI``: scvi-tools' SCANVI interface (semi-supervised scVI)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from .. import _anndata
from ._scvi import SCVI, _epoch_rule

# scvi-tools' default `classification_ratio`: the classifier's weight in the loss.
_CLASSIFICATION_RATIO = 50.0


class SCANVI(SCVI):
    """scANVI (Xu et al. 2021) trained by tessera's engine, with scvi-tools' interface.

    scVI plus a label classifier on the latent mean, trained on the cells whose label is not
    ``unlabeled_category`` (weight ``classification_ratio``, 50 as in scvi-tools), so the
    embedding separates the known cell types and :meth:`predict` labels the other cells.
    tessera's classifier is one hidden layer on the latent mean; scvi-tools' SCANVI also has a
    label-conditioned second latent layer, which this model does not.

    Parameters are :class:`SCVI`'s; ``linear_classifier=True`` is not supported yet.

    Examples
    --------
    >>> tessera.model.SCANVI.setup_anndata(adata, "cell_type", "Unknown", batch_key="batch")
    >>> model = tessera.model.SCANVI(adata)
    >>> model.train(max_epochs=100)
    >>> adata.obs["predicted"] = model.predict()
    """

    # scvi-tools' SCANVI folders are not read (its second latent layer has no counterpart).
    _SCVI_TOOLS_MODEL = None

    def __init__(
        self,
        adata: Any,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "nb",
        linear_classifier: bool = False,
        **model_kwargs: Any,
    ) -> None:
        if linear_classifier:
            raise ValueError("linear_classifier=True is not supported yet")
        model_kwargs.setdefault("classifier_weight", _CLASSIFICATION_RATIO)
        super().__init__(
            adata, n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood,
            **model_kwargs,
        )
        if "labels_key" not in self._setup:
            raise ValueError("SCANVI needs labels: call SCANVI.setup_anndata(adata, labels_key, ...)")

    @classmethod
    def setup_anndata(  # type: ignore[override]
        cls,
        adata: Any,
        labels_key: str,
        unlabeled_category: str,
        layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
    ) -> None:
        """Registers the fields the model reads, as :meth:`SCVI.setup_anndata`, with the obs
        column of labels and the value in it that marks an unlabelled cell (missing values are
        unlabelled too)."""
        cls._register(
            adata, labels_key, unlabeled_category, layer, batch_key, categorical_covariate_keys,
            continuous_covariate_keys,
        )
        _, classes = _anndata.labels(adata, labels_key, str(unlabeled_category))
        if len(classes) < 2:
            raise ValueError(
                f"adata.obs[{labels_key!r}] has {len(classes)} labelled classes besides "
                f"{unlabeled_category!r} (the classifier needs at least 2)"
            )

    @classmethod
    def _register(
        cls,
        adata: Any,
        labels_key: str,
        unlabeled_category: str,
        layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
    ) -> None:
        if labels_key is None or labels_key not in adata.obs:
            raise KeyError(f"labels_key {labels_key!r} is not a column of adata.obs")
        SCVI.setup_anndata(
            adata, layer=layer, batch_key=batch_key, labels_key=labels_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )
        setup = _anndata.setup_of(adata)
        setup["unlabeled_category"] = str(unlabeled_category)
        adata.uns[_anndata.SETUP_KEY] = setup

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: SCVI,
        unlabeled_category: str,
        labels_key: str | None = None,
        adata: Any | None = None,
        **scanvi_kwargs: Any,
    ) -> "SCANVI":
        """A SCANVI with ``scvi_model``'s architecture, registration and, once it is trained,
        its weights (every tensor; the classifier starts fresh), plus labels. :meth:`train`
        then runs scvi-tools' default for this case, min(10, max(2, round(epochs / 3))) epochs
        of scvi-tools' epoch rule, unless ``max_epochs`` says otherwise."""
        adata = scvi_model.adata if adata is None else adata
        setup = dict(scvi_model._setup)
        labels_key = labels_key or setup.get("labels_key")
        if labels_key is None:
            raise ValueError("pass labels_key: the SCVI model was set up without one")
        cls.setup_anndata(
            adata, labels_key, unlabeled_category, layer=setup.get("layer"),
            batch_key=setup.get("batch_key"),
            categorical_covariate_keys=setup.get("categorical_covariate_keys"),
            continuous_covariate_keys=setup.get("continuous_covariate_keys"),
        )
        init = {**scvi_model.init_params_, **scanvi_kwargs}
        model = cls(adata, **init)
        if scvi_model.is_trained_:
            model._init_from = scvi_model._folder.name
            model._init_owner = scvi_model
        return model

    def train(self, *args: Any, plan_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """:meth:`SCVI.train`; ``plan_kwargs`` also takes ``classification_ratio``."""
        plan_kwargs = dict(plan_kwargs or {})
        if self._init_from is not None and not args and kwargs.get("max_epochs") is None:
            kwargs["max_epochs"] = int(min(10, max(2, round(_epoch_rule(self.adata.n_obs) / 3))))
        if "classification_ratio" in plan_kwargs:
            self._model["classifier_weight"] = float(plan_kwargs.pop("classification_ratio"))
        super().train(*args, plan_kwargs=plan_kwargs, **kwargs)

    def _label_key(self) -> str | None:
        # A query's cells train no classifier (surgery freezes it): no labels go to the engine.
        return None if self._query is not None else self._setup["labels_key"]

    @classmethod
    def _transfer_setup(cls, adata: Any, setup: dict[str, Any]) -> None:
        # A query without the label column is unlabelled throughout, as in scvi-tools.
        if setup["labels_key"] not in adata.obs:
            adata.obs[setup["labels_key"]] = setup["unlabeled_category"]
        cls._register(adata, **setup)

    def predict(
        self,
        adata: Any | None = None,
        indices: Sequence[int] | None = None,
        soft: bool = False,
        batch_size: int | None = None,
    ) -> np.ndarray | pd.DataFrame:
        """Each cell's most probable label (an array of class names), or with ``soft=True`` the
        class probabilities as a DataFrame with the classes as columns."""
        self._check_trained()
        if self._query_predictions is not None and adata is None:
            if soft:
                raise ValueError("soft=True is not supported for a query model yet")
            p = self._query_predictions
            return p if indices is None else p[np.asarray(indices)]
        adata = self.adata if adata is None else adata
        if indices is not None:
            adata = adata[np.asarray(indices)]
        engine = self._loaded()
        p = engine.probabilities(self._cells(adata))
        classes = list(engine.label_categories)
        if soft:
            return pd.DataFrame(p, index=adata.obs_names.copy(), columns=classes)
        return np.asarray(classes, dtype=object)[np.argmax(p, axis=1)]
