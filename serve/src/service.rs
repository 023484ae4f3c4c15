//! The gRPC face of the atlas: each request is checked (its URLs against the allow-list, its
//! sizes and names), then the registry, the job queue or an encoder does the work on blocking
//! threads. A bad request gets a status naming the field and what was expected.

use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tessera_data::{Csr, Dataset};
use tessera_proto::v1 as pb;
use tessera_proto::v1::atlas_server::Atlas;
use tessera_worker::Covariates;
use tessera_worker::encode::EncodeError;
use tessera_worker::query::{Cells, CellsModality, ModelSummary, Outputs, QueryRequest, Unfreeze};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::ServeError;
use crate::access::AllowList;
use crate::jobs::{Jobs, estimate_bytes, is_terminal};
use crate::observe::{CallStats, Telemetry};
use crate::registry::Registry;

/// Names of uploads no job has claimed yet (`upload-<pid>-<n>`) and of claimed ones.
const UPLOAD: &str = "upload-";
const CLAIMED: &str = "claimed-";

/// Takes the upload `dir` for a job: renamed `claimed-...`, out of the expiry's reach. Gone
/// already (expired, or claimed by another job) is the client's error.
async fn claim(dir: &Path) -> Result<PathBuf, Status> {
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with(UPLOAD))
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "data_url {}: in the scratch folder but not an upload",
                dir.display()
            ))
        })?;
    let claimed = dir.with_file_name(name.replacen(UPLOAD, CLAIMED, 1));
    tokio::fs::rename(dir, &claimed).await.map_err(|e| {
        Status::failed_precondition(format!(
            "data_url {}: the upload is gone (expired, or used by another job): {e}",
            dir.display()
        ))
    })?;
    Ok(claimed)
}

/// Removes the uploads in `scratch` that no job claimed within `ttl` of their making;
/// returns how many.
pub fn expire_uploads(scratch: &Path, ttl: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let unclaimed = entry.file_name().to_string_lossy().starts_with(UPLOAD);
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        if unclaimed && age.is_some_and(|a| a >= ttl) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(dir = %entry.path().display(), error = %e, "expiring an upload")
                }
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "unclaimed uploads expired");
    }
    removed
}

/// `expire_uploads` at start and then every quarter of `ttl` (at least every second), for as
/// long as the server runs (also after a restart: what the previous process left expires).
pub async fn expire_uploads_every(scratch: PathBuf, ttl: Duration) {
    let mut ticks = tokio::time::interval((ttl / 4).max(Duration::from_secs(1)));
    loop {
        ticks.tick().await;
        let (dir, ttl) = (scratch.clone(), ttl);
        let _ = tokio::task::spawn_blocking(move || expire_uploads(&dir, ttl)).await;
    }
}

/// The most fine-tuning epochs a job may ask for (scArches uses a few hundred): a larger
/// number holds a job slot for days.
pub const MAX_EPOCHS: usize = 10_000;
/// The most neighbours a label transfer may vote with.
pub const MAX_NEIGHBOURS: usize = 1_000;

/// A request's count field: its default when 0, refused (naming the field) above `max`.
fn bounded(field: &str, value: u32, default: usize, max: usize) -> Result<usize, Status> {
    match value as usize {
        0 => Ok(default),
        v if v <= max => Ok(v),
        v => Err(Status::invalid_argument(format!(
            "{field} = {v} is more than the {max} this service allows"
        ))),
    }
}

/// Fine-tuning epochs when a job does not say (scArches fine-tunes for a few hundred; our
/// quick default maps simulated and PBMC queries at full accuracy).
pub const DEFAULT_EPOCHS: usize = 100;
const DEFAULT_NEIGHBOURS: usize = 50;
/// Cells per results message (a few hundred KiB with a 10- to 30-wide latent).
const RESULT_CHUNK_CELLS: usize = 4096;

#[derive(Debug)]
pub struct AtlasService {
    pub registry: Arc<Registry>,
    pub jobs: Jobs,
    pub allow: AllowList,
    /// Uploads go here, one folder each.
    pub scratch: PathBuf,
    pub max_upload_bytes: u64,
    pub default_epochs: usize,
    uploads: AtomicU64,
    calls: Arc<CallStats>,
}

impl AtlasService {
    pub fn new(
        registry: Arc<Registry>,
        jobs: Jobs,
        allow: AllowList,
        scratch: PathBuf,
        max_upload_bytes: u64,
        default_epochs: usize,
    ) -> AtlasService {
        AtlasService {
            registry,
            jobs,
            allow,
            scratch,
            max_upload_bytes,
            default_epochs,
            uploads: AtomicU64::new(0),
            calls: Arc::default(),
        }
    }

    /// Handles on what the metrics endpoint reports (taken before the service is served).
    pub fn telemetry(&self) -> Telemetry {
        Telemetry {
            calls: Arc::clone(&self.calls),
            jobs: self.jobs.clone(),
            registry: Arc::clone(&self.registry),
        }
    }
}

/// Runs blocking work (store reads, model loading, encoding) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServeError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker thread: {e}")))?
        .map_err(Status::from)
}

fn model_info(name: &str, source_url: &str, s: ModelSummary) -> pb::ModelInfo {
    pb::ModelInfo {
        name: name.to_string(),
        source_url: source_url.to_string(),
        modalities: s
            .modalities
            .into_iter()
            .map(|(name, g)| pb::ModalityInfo {
                name,
                n_features: g as u32,
            })
            .collect(),
        batch_key: s.batch_key.unwrap_or_default(),
        batches: s.batches,
        label_key: s.label_key.unwrap_or_default(),
        labels: s.labels,
        n_latent: s.n_latent as u32,
        reference_cells: s.reference_cells as u64,
        covariates: s
            .covariates
            .categorical
            .into_iter()
            .map(|(key, categories)| pb::CovariateInfo {
                key,
                categories,
                continuous: false,
            })
            .chain(
                s.covariates
                    .continuous
                    .into_iter()
                    .map(|key| pb::CovariateInfo {
                        key,
                        categories: Vec::new(),
                        continuous: true,
                    }),
            )
            .collect(),
    }
}

/// Per categorical covariate each cell's category, per continuous one each cell's value.
type CovariateColumns = (Vec<Vec<String>>, Vec<Vec<f64>>);

/// The request's covariates in the model's order (`Cells::categorical`, `Cells::continuous`):
/// each of the model's by key, of the right kind.
fn covariate_columns(
    model: &Covariates,
    given: &[pb::Covariate],
) -> Result<CovariateColumns, ServeError> {
    let find = |key: &str| {
        given.iter().find(|c| c.key == key).ok_or_else(|| {
            ServeError::Invalid(format!(
                "covariates: the model needs {key:?} (DescribeModel lists its covariates)"
            ))
        })
    };
    let categorical = model
        .categorical
        .iter()
        .map(|(key, _)| find(key).map(|c| c.categories.clone()))
        .collect::<Result<_, _>>()?;
    let continuous = model
        .continuous
        .iter()
        .map(|key| find(key).map(|c| c.values.clone()))
        .collect::<Result<_, _>>()?;
    Ok((categorical, continuous))
}

/// A relative path inside an uploaded store: plain segments only.
fn upload_path(path: &str) -> Result<&Path, Status> {
    let p = Path::new(path);
    let plain = !path.is_empty()
        && !path.contains('\\')
        && p.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(p)
    } else {
        Err(Status::invalid_argument(format!(
            "upload path {path:?}: expected a relative path inside the store (no '..', no leading '/')"
        )))
    }
}

/// An Encode modality as CSR counts, every index and value checked.
fn csr(m: &pb::EncodeModality) -> Result<Csr, Status> {
    let bad = |what: String| Status::invalid_argument(format!("modalities[{:?}]: {what}", m.name));
    let (rows, cols) = (m.n_cells as usize, m.n_features as usize);
    if m.indptr.len() != rows + 1 || m.indptr.first() != Some(&0) {
        return Err(bad(format!(
            "indptr has {} entries, expected n_cells + 1 = {} starting at 0",
            m.indptr.len(),
            rows + 1
        )));
    }
    if m.indptr.windows(2).any(|w| w[0] > w[1])
        || m.indptr.last().copied() != Some(m.indices.len() as u64)
        || m.indices.len() != m.data.len()
    {
        return Err(bad(format!(
            "indptr must rise to the number of indices ({}) and data ({})",
            m.indices.len(),
            m.data.len()
        )));
    }
    if let Some(j) = m.indices.iter().find(|&&j| j as usize >= cols) {
        return Err(bad(format!("column index {j} outside n_features = {cols}")));
    }
    if let Some(v) = m.data.iter().find(|v| !v.is_finite() || **v < 0.0) {
        return Err(bad(format!(
            "count {v}: expected finite, non-negative counts"
        )));
    }
    Ok(Csr {
        n_rows: rows,
        n_cols: cols,
        indptr: m.indptr.clone(),
        indices: m.indices.clone(),
        data: m.data.clone(),
    })
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::QueryJobStatus, Status>> + Send>>;
type ResultsStream = Pin<Box<dyn Stream<Item = Result<pb::QueryResultsChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Atlas for AtlasService {
    async fn register_model(
        &self,
        request: Request<pb::RegisterModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let r = request.into_inner();
        self.allow.check("source_url", &r.source_url)?;
        let registry = Arc::clone(&self.registry);
        let (name, source) = (r.name.clone(), r.source_url.clone());
        let summary = blocking(move || registry.register(&name, &source, r.replace)).await?;
        Ok(Response::new(model_info(&r.name, &r.source_url, summary)))
    }

    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let registry = Arc::clone(&self.registry);
        let models = blocking(move || {
            Ok(registry
                .list()?
                .into_iter()
                .map(|(name, entry)| model_info(&name, &entry.source_url, entry.summary))
                .collect())
        })
        .await?;
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn describe_model(
        &self,
        request: Request<pb::DescribeModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let name = request.into_inner().name;
        let registry = Arc::clone(&self.registry);
        let info = blocking(move || {
            let entry = registry.entry(&name)?;
            Ok(model_info(&name, &entry.source_url, entry.summary))
        })
        .await?;
        Ok(Response::new(info))
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadChunk>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let id = self.uploads.fetch_add(1, Ordering::SeqCst);
        let dir = self
            .scratch
            .join(format!("{UPLOAD}{}-{id}", std::process::id()));
        let received = receive(request.into_inner(), &dir, self.max_upload_bytes).await;
        match received {
            Ok((bytes, files)) => {
                tracing::info!(dir = %dir.display(), bytes, files, "query store uploaded");
                Ok(Response::new(pb::UploadResponse {
                    data_url: dir.display().to_string(),
                    bytes,
                    files,
                }))
            }
            Err(status) => {
                // Nothing half-written stays behind.
                let _ = tokio::fs::remove_dir_all(&dir).await;
                Err(status)
            }
        }
    }

    async fn submit_query(
        &self,
        request: Request<pb::QueryJob>,
    ) -> Result<Response<pb::QueryJobStatus>, Status> {
        let r = request.into_inner();
        self.allow.check("data_url", &r.data_url)?;
        if let Some(w) = &r.write_back
            && (w.embedding_key.is_empty() || w.label_key.is_empty())
        {
            return Err(Status::invalid_argument(
                "write_back: embedding_key and label_key must both be named",
            ));
        }
        let mut req = QueryRequest {
            model_out: None,
            layer: None,
            data: r.data_url.clone(),
            batch_key: (!r.batch_key.is_empty()).then(|| r.batch_key.clone()),
            epochs: bounded("epochs", r.epochs, self.default_epochs, MAX_EPOCHS)?,
            unfreeze: Unfreeze {
                encoder_input: r.unfreeze_encoder_input,
                decoder_input: r.unfreeze_decoder_input,
            },
            neighbours: bounded(
                "neighbours",
                r.neighbours,
                DEFAULT_NEIGHBOURS,
                MAX_NEIGHBOURS,
            )?,
            write: r.write_back.map(|w| Outputs {
                embedding_key: w.embedding_key,
                label_key: w.label_key,
                overwrite: w.overwrite,
            }),
            seed: r.seed,
            device: self.registry.device(),
        };
        let registry = Arc::clone(&self.registry);
        let (model_name, data) = (r.model.clone(), r.data_url.clone());
        let (model, estimate) = blocking(move || {
            let model = registry.get(&model_name)?;
            let dataset =
                Dataset::open(&data).map_err(|e| ServeError::Invalid(format!("data_url: {e}")))?;
            let estimate = estimate_bytes(&dataset, &model)?;
            Ok((model, estimate))
        })
        .await?;
        // An uploaded store is the job's own: claimed (so no expiry removes it), then removed
        // when the job ends.
        let scratch = match Path::new(&r.data_url).starts_with(&self.scratch) {
            true => Some(claim(Path::new(&r.data_url)).await?),
            false => None,
        };
        if let Some(dir) = &scratch {
            req.data = dir.display().to_string();
        }
        let job = self.jobs.submit(model, req, estimate, scratch)?;
        Ok(Response::new(job.status()))
    }

    type WatchQueryStream = StatusStream;

    async fn watch_query(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<StatusStream>, Status> {
        let job = self.jobs.get(&request.into_inner().job_id)?;
        let updates = futures::stream::unfold((job.watch(), false), |(mut rx, done)| async move {
            if done {
                return None;
            }
            let status = rx.borrow_and_update().clone();
            let terminal = is_terminal(status.state());
            if !terminal && rx.changed().await.is_err() {
                return Some((Ok(status), (rx, true)));
            }
            Some((Ok(status), (rx, terminal)))
        });
        Ok(Response::new(Box::pin(updates)))
    }

    async fn cancel_query(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::QueryJobStatus>, Status> {
        let job = self.jobs.get(&request.into_inner().job_id)?;
        job.cancel();
        Ok(Response::new(job.status()))
    }

    type QueryResultsStream = ResultsStream;

    async fn query_results(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<ResultsStream>, Status> {
        let job = self.jobs.get(&request.into_inner().job_id)?;
        let status = job.status();
        let Some(results) = job.results() else {
            return Err(Status::failed_precondition(format!(
                "job {} is {} ({}): results exist once it has succeeded",
                job.id,
                status.state().as_str_name(),
                status.stage
            )));
        };
        let n = results.output.report.n_cells;
        let starts: Vec<usize> = (0..n.max(1)).step_by(RESULT_CHUNK_CELLS).collect();
        let chunks = futures::stream::iter(starts).map(move |start| {
            let (out, d) = (&results.output, results.output.n_latent);
            let end = (start + RESULT_CHUNK_CELLS).min(n);
            let labels = out.labels.get(start..end).unwrap_or_default();
            Ok(pb::QueryResultsChunk {
                n_cells: n as u64,
                n_latent: d as u32,
                label_categories: if start == 0 {
                    out.label_categories.clone()
                } else {
                    Vec::new()
                },
                offset: start as u64,
                obs_names: results
                    .obs_names
                    .get(start..end)
                    .unwrap_or_default()
                    .to_vec(),
                embedding: out.embedding[start * d..end * d].to_vec(),
                labels: labels.iter().map(|t| t.label).collect(),
                uncertainty: labels.iter().map(|t| t.uncertainty).collect(),
                classifier_labels: out
                    .classifier_labels
                    .get(start..end)
                    .unwrap_or_default()
                    .to_vec(),
            })
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn encode(
        &self,
        request: Request<pb::EncodeRequest>,
    ) -> Result<Response<pb::EncodeResponse>, Status> {
        let r = request.into_inner();
        if r.modalities.is_empty() {
            return Err(Status::invalid_argument(
                "modalities: at least one modality's counts expected",
            ));
        }
        let mut cells = Cells {
            modalities: Vec::with_capacity(r.modalities.len()),
            batches: r.batches,
            ..Cells::default()
        };
        for m in &r.modalities {
            cells.modalities.push(CellsModality {
                name: m.name.clone(),
                var_names: m.var_names.clone(),
                counts: csr(m)?,
                present: Vec::new(),
            });
        }
        let registry = Arc::clone(&self.registry);
        let neighbours = bounded(
            "neighbours",
            r.neighbours,
            DEFAULT_NEIGHBOURS,
            MAX_NEIGHBOURS,
        )?;
        let transfer = r.transfer_labels.then_some(neighbours);
        let name = r.model.clone();
        let loaded = blocking(move || registry.get(&name)).await?;
        // Counted against the budget the mapping jobs share, held until the answer is built.
        let estimate = loaded.pool.model.encode_bytes(&cells, transfer);
        let _held = self.jobs.reserve(estimate, "this Encode call").await?;
        let response = blocking(move || {
            (cells.categorical, cells.continuous) =
                covariate_columns(loaded.pool.model.covariates(), &r.covariates)?;
            let encoded = loaded.pool.encode(&cells, transfer).map_err(|e| match e {
                EncodeError::NoReferenceLabels => ServeError::Precondition(format!(
                    "model {:?} has no reference labels to transfer",
                    r.model
                )),
                EncodeError::Query(e) => ServeError::Invalid(e.to_string()),
            })?;
            Ok(pb::EncodeResponse {
                n_latent: encoded.n_latent as u32,
                latent: encoded.latent,
                labels: encoded.labels,
                uncertainty: encoded.uncertainty,
            })
        })
        .await?;
        Ok(Response::new(response))
    }
}

/// Writes an upload's chunks under `dir`; (bytes, files) received.
async fn receive(
    mut chunks: Streaming<pb::UploadChunk>,
    dir: &Path,
    limit: u64,
) -> Result<(u64, u32), Status> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| Status::internal(format!("creating the upload folder: {e}")))?;
    let (mut bytes, mut files) = (0u64, 0u32);
    let mut current: Option<(String, tokio::fs::File)> = None;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        bytes += chunk.data.len() as u64;
        if bytes > limit {
            return Err(Status::resource_exhausted(format!(
                "upload larger than the server's limit of {limit} bytes"
            )));
        }
        if current.as_ref().is_none_or(|(path, _)| *path != chunk.path) {
            let relative = upload_path(&chunk.path)?;
            let path = dir.join(relative);
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| Status::internal(format!("upload {}: {e}", chunk.path)))?;
            }
            // A path sent twice, not in a row, would be overwritten: refused instead.
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
                .map_err(|e| {
                    Status::invalid_argument(format!(
                        "upload path {:?}: {e} (each file's chunks must come in a row)",
                        chunk.path
                    ))
                })?;
            if let Some((_, mut done)) = current.take() {
                done.flush()
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
            }
            current = Some((chunk.path.clone(), file));
            files += 1;
        }
        if let Some((_, file)) = current.as_mut() {
            file.write_all(&chunk.data)
                .await
                .map_err(|e| Status::internal(format!("upload {}: {e}", chunk.path)))?;
        }
    }
    if let Some((_, mut done)) = current.take() {
        done.flush()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
    }
    if files == 0 {
        return Err(Status::invalid_argument(
            "empty upload: expected the files of a Zarr store",
        ));
    }
    Ok((bytes, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unclaimed_uploads_expire_and_claimed_ones_stay() {
        let scratch = tempfile::tempdir().unwrap();
        let (old, taken) = (
            scratch.path().join("upload-1-1"),
            scratch.path().join("upload-1-2"),
        );
        for dir in [&old, &taken] {
            std::fs::create_dir_all(dir.join("X")).unwrap();
        }
        let claimed = claim(&taken).await.unwrap();
        assert_eq!(claimed, scratch.path().join("claimed-1-2"));
        // Claimed once: a second job naming the same upload finds it gone.
        let e = claim(&taken).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);
        assert!(e.message().contains("upload is gone"), "{}", e.message());
        assert_eq!(
            expire_uploads(scratch.path(), Duration::from_secs(3600)),
            0,
            "too young"
        );
        assert_eq!(expire_uploads(scratch.path(), Duration::ZERO), 1);
        assert!(!old.exists() && claimed.exists());
    }

    #[test]
    fn encode_covariates_are_taken_by_key_in_the_models_order() {
        let model = Covariates {
            categorical: vec![("donor".into(), vec!["d0".into(), "d1".into()])],
            continuous: vec!["pct".into()],
        };
        let given = vec![
            pb::Covariate {
                key: "pct".into(),
                values: vec![0.5, 1.5],
                ..Default::default()
            },
            pb::Covariate {
                key: "donor".into(),
                categories: vec!["d1".into(), "d0".into()],
                ..Default::default()
            },
        ];
        let (categorical, continuous) = covariate_columns(&model, &given).unwrap();
        assert_eq!(categorical, vec![vec!["d1".to_string(), "d0".to_string()]]);
        assert_eq!(continuous, vec![vec![0.5, 1.5]]);
        let e = covariate_columns(&model, &given[..1]).unwrap_err();
        assert!(e.to_string().contains("the model needs \"donor\""), "{e}");
        assert_eq!(
            covariate_columns(&Covariates::default(), &given).unwrap(),
            (Vec::new(), Vec::new())
        );
    }
}
