"""A thin wrapper over the generated stubs of proto/tessera/v1/atlas.proto."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import anndata as ad
import grpc
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._proto import atlas_pb2 as pb
from ._proto import atlas_pb2_grpc as rpc

UPLOAD_CHUNK_BYTES = 1 << 20
ENCODE_CELLS_PER_REQUEST = 5_000


class TesseraError(RuntimeError):
    """A refusal or failure reported by the server (its gRPC status code and message)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as e:  # the server's status, named
        raise TesseraError(e.code().name, e.details()) from None


def _status(s: pb.QueryJobStatus) -> dict:
    return {
        "job_id": s.job_id,
        "state": pb.JobState.Name(s.state).removeprefix("JOB_STATE_").lower(),
        "stage": s.stage,
        "progress": s.progress,
        "error": s.error,
        "report": json.loads(s.report_json) if s.report_json else None,
    }


def _covariates(cells: ad.AnnData, model: dict, rows: slice) -> list:
    """The model's covariates beside the batch, from the obs columns of the same names."""
    out = []
    for key, categories in model.items():
        if key not in cells.obs:
            raise KeyError(f"the model reads the covariate {key!r}: it is not a column of cells.obs")
        column = cells.obs[key].iloc[rows]
        if categories is None:
            out.append(pb.Covariate(key=key, values=column.astype(float).tolist()))
        else:
            out.append(pb.Covariate(key=key, categories=column.astype(str).tolist()))
    return out


def _model(m: pb.ModelInfo) -> dict:
    return {
        "name": m.name,
        "source_url": m.source_url,
        "modalities": {x.name: x.n_features for x in m.modalities},
        "batch_key": m.batch_key or None,
        "batches": list(m.batches),
        "label_key": m.label_key or None,
        "labels": list(m.labels),
        "n_latent": m.n_latent,
        "reference_cells": m.reference_cells,
        # Covariates beside the batch: key -> categories, or None for a continuous one.
        "covariates": {c.key: None if c.continuous else list(c.categories) for c in m.covariates},
    }


class _ProgressPrinter:
    """One status line rewritten in place on a terminal; in a log (not a TTY), a line only when
    the state or stage changes, so a notebook's or job's log gets a handful of lines."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.last = None

    def __call__(self, status: dict) -> None:
        line = f"[{status['job_id']}] {status['state']:>9} {100 * status['progress']:5.1f}% {status['stage']:<40}"
        done = status["state"] in ("succeeded", "failed", "cancelled")
        if self.live:
            print("\r" + line, end="\n" if done else "", file=self.stream, flush=True)
        elif (status["state"], status["stage"]) != self.last:
            print(line.rstrip(), file=self.stream, flush=True)
        self.last = (status["state"], status["stage"])


class Atlas:
    """A connection to `tessera serve`.

    address: host:port (default $TESSERA_SERVER or localhost:50061); token: the bearer token
    (default $TESSERA_TOKEN); root_certificates: PEM bytes of the CA that signed the server's
    certificate (TLS), None for plain text.
    """

    def __init__(self, address: str | None = None, token: str | None = None, root_certificates: bytes | None = None, max_message_bytes: int = 64 << 20):
        address = address or os.environ.get("TESSERA_SERVER", "localhost:50061")
        token = token if token is not None else os.environ.get("TESSERA_TOKEN")
        options = [("grpc.max_receive_message_length", max_message_bytes), ("grpc.max_send_message_length", max_message_bytes)]
        if root_certificates is not None:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._stub = rpc.AtlasStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Atlas":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # The registry.
    def list_models(self) -> list[dict]:
        return [_model(m) for m in _call(self._stub.ListModels, pb.ListModelsRequest(), metadata=self._metadata).models]

    def describe_model(self, name: str) -> dict:
        return _model(_call(self._stub.DescribeModel, pb.DescribeModelRequest(name=name), metadata=self._metadata))

    def register_model(self, name: str, source_url: str, replace: bool = False) -> dict:
        return _model(_call(self._stub.RegisterModel, pb.RegisterModelRequest(name=name, source_url=source_url, replace=replace), metadata=self._metadata))

    # Jobs.
    def upload(self, store: str | Path) -> str:
        """Sends a local Zarr store's files; returns the data_url a job can name."""
        root = Path(store)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a Zarr store folder")

        def chunks() -> Iterator[pb.UploadChunk]:
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                relative = path.relative_to(root).as_posix()
                data = path.read_bytes()
                for start in range(0, max(len(data), 1), UPLOAD_CHUNK_BYTES):
                    yield pb.UploadChunk(path=relative, data=data[start : start + UPLOAD_CHUNK_BYTES])

        return _call(self._stub.Upload, chunks(), metadata=self._metadata).data_url

    def submit(self, model: str, data_url: str, batch_key: str | None = None, epochs: int = 0, neighbours: int = 0, unfreeze_encoder_input: bool = False, unfreeze_decoder_input: bool = False, write_back: dict | None = None, seed: int = 0) -> str:
        job = pb.QueryJob(model=model, data_url=data_url, batch_key=batch_key or "", epochs=epochs, neighbours=neighbours, unfreeze_encoder_input=unfreeze_encoder_input, unfreeze_decoder_input=unfreeze_decoder_input, seed=seed)
        if write_back is not None:
            job.write_back.CopyFrom(pb.WriteBack(**write_back))
        return _call(self._stub.SubmitQuery, job, metadata=self._metadata).job_id

    def watch(self, job_id: str) -> Iterator[dict]:
        """The job's status now and after every change, until it ends."""
        try:
            for s in self._stub.WatchQuery(pb.JobRef(job_id=job_id), metadata=self._metadata):
                yield _status(s)
        except grpc.RpcError as e:
            raise TesseraError(e.code().name, e.details()) from None

    def cancel(self, job_id: str) -> dict:
        return _status(_call(self._stub.CancelQuery, pb.JobRef(job_id=job_id), metadata=self._metadata))

    def wait(self, job_id: str, progress: Callable[[dict], None] | bool = True) -> dict:
        """Follows the job to its end; raises TesseraError when it failed or was cancelled."""
        report = _ProgressPrinter() if progress is True else (progress or (lambda s: None))
        last = None
        for last in self.watch(job_id):
            report(last)
        if last is None or last["state"] != "succeeded":
            raise TesseraError("JOB_" + (last["state"].upper() if last else "LOST"), last["error"] if last else f"job {job_id} ended without a status")
        return last

    def results(self, job_id: str) -> dict:
        """A finished job's embedding (cells x n_latent), kNN labels (categorical, NaN: none),
        their uncertainties, the reference classifier's labels (when it has one) and the
        query's cell names."""
        embedding, codes, uncertainty, names, categories, n_latent, classified = [], [], [], [], [], 0, []
        try:
            for c in self._stub.QueryResults(pb.JobRef(job_id=job_id), metadata=self._metadata):
                if c.offset == 0:
                    categories, n_latent = list(c.label_categories), c.n_latent
                embedding.append(np.asarray(c.embedding, dtype=np.float32))
                codes.extend(c.labels)
                uncertainty.extend(c.uncertainty)
                names.extend(c.obs_names)
                classified.extend(c.classifier_labels)
        except grpc.RpcError as e:
            raise TesseraError(e.code().name, e.details()) from None
        out = {"embedding": np.concatenate(embedding).reshape(-1, n_latent), "obs_names": names}
        if categories and codes:
            out["labels"] = pd.Categorical.from_codes(np.asarray(codes), categories=categories)
            out["uncertainty"] = np.asarray(uncertainty)
        if categories and classified:
            out["classifier_labels"] = pd.Categorical.from_codes(np.asarray(classified), categories=categories)
        return out

    def map_query(self, query: ad.AnnData | str, model: str, batch_key: str | None = None, epochs: int = 0, neighbours: int = 0, embedding_key: str = "X_tessera", label_key: str = "tessera_label", overwrite: bool = False, progress: Callable[[dict], None] | bool = True, seed: int = 0) -> ad.AnnData:
        """Maps `query` onto the registered `model` (surgery for its new batches, fine-tuning,
        kNN label transfer) and returns an AnnData with obsm[embedding_key],
        obs[label_key] and obs[label_key + "_uncertainty"].

        When the reference trained a label classifier its predictions go to
        obs[label_key + "_classifier"].

        An AnnData (raw counts in X) is uploaded and a mapped copy returned (the input is not
        modified); a string is a store URL the server reads (under its allowed prefixes), and
        the result holds the query's cell names and the mapping only.
        """
        outputs = [("obsm", embedding_key), ("obs", label_key), ("obs", f"{label_key}_uncertainty"), ("obs", f"{label_key}_classifier")]
        if isinstance(query, str):
            job = self.submit(model, query, batch_key=batch_key, epochs=epochs, neighbours=neighbours, seed=seed)
            self.wait(job, progress)
            results = self.results(job)
            mapped = ad.AnnData(obs=pd.DataFrame(index=pd.Index(results["obs_names"], dtype=str)))
        else:
            if not overwrite:
                taken = [f"{where}[{key!r}]" for where, key in outputs if key in getattr(query, where)]
                if taken:
                    raise ValueError(f"the query already has {', '.join(taken)}: pass overwrite=True or other keys")
            key = batch_key or self.describe_model(model)["batch_key"]
            if batch_key and batch_key not in query.obs:
                raise KeyError(f"batch_key {batch_key!r} is not a column of the query's obs")
            # Only what mapping reads travels: counts, gene names, the batch column.
            obs = pd.DataFrame(index=query.obs_names.astype(str))
            if key and key in query.obs:
                obs[key] = pd.Categorical(query.obs[key].astype(str))
            send = ad.AnnData(X=sp.csr_matrix(query.X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=query.var_names.astype(str)))
            with tempfile.TemporaryDirectory(prefix="tessera-query-") as tmp:
                store = Path(tmp) / "query.zarr"
                send.write_zarr(store)
                data_url = self.upload(store)
            job = self.submit(model, data_url, batch_key=key if key and key in query.obs else None, epochs=epochs, neighbours=neighbours, seed=seed)
            self.wait(job, progress)
            results = self.results(job)
            if list(results["obs_names"]) != list(obs.index):
                raise TesseraError("DATA_LOSS", "the server's cells differ from the query's")
            mapped = query.copy()
        mapped.obsm[embedding_key] = results["embedding"]
        if "labels" in results:
            mapped.obs[label_key] = results["labels"]
            mapped.obs[f"{label_key}_uncertainty"] = results["uncertainty"]
        if "classifier_labels" in results:
            mapped.obs[f"{label_key}_classifier"] = results["classifier_labels"]
        return mapped

    def encode(self, cells: ad.AnnData, model: str, batch_key: str | None = None, transfer_labels: bool = False, neighbours: int = 0) -> dict:
        """Latent means of cells whose batches the reference knows (no fine-tuning), and kNN
        labels when asked. Sent in requests of ENCODE_CELLS_PER_REQUEST cells."""
        described = self.describe_model(model)
        name = next(iter(described["modalities"]))
        batches = [] if batch_key is None else cells.obs[batch_key].astype(str).tolist()
        x = sp.csr_matrix(cells.X, dtype=np.float32)
        var_names = cells.var_names.astype(str).tolist()
        latent, labels, uncertainty = [], [], []
        for start in range(0, cells.n_obs, ENCODE_CELLS_PER_REQUEST):
            part = x[start : start + ENCODE_CELLS_PER_REQUEST]
            counts = pb.EncodeModality(name=name, var_names=var_names, n_cells=part.shape[0], n_features=part.shape[1], indptr=part.indptr.astype(np.uint64), indices=part.indices.astype(np.uint32), data=part.data)
            rows = slice(start, start + ENCODE_CELLS_PER_REQUEST)
            answer = _call(self._stub.Encode, pb.EncodeRequest(model=model, modalities=[counts], batches=batches[rows], transfer_labels=transfer_labels, neighbours=neighbours, covariates=_covariates(cells, described["covariates"], rows)), metadata=self._metadata)
            latent.append(np.asarray(answer.latent, dtype=np.float32).reshape(-1, answer.n_latent))
            labels.extend(answer.labels)
            uncertainty.extend(answer.uncertainty)
        out = {"latent": np.concatenate(latent)}
        if transfer_labels:
            out["labels"] = np.asarray(labels)
            out["uncertainty"] = np.asarray(uncertainty)
        return out


def map_query(query: ad.AnnData | str, model: str, server: str | None = None, token: str | None = None, root_certificates: bytes | None = None, **options) -> ad.AnnData:
    """`Atlas(server, token, root_certificates).map_query(query, model, **options)`."""
    with Atlas(server, token, root_certificates) as atlas:
        return atlas.map_query(query, model, **options)
