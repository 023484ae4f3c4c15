//! The network job behind `tessera snf`: views of the cells read from a store, per-view
//! affinities, SNF or NEMO, spectral clusters, written back (the network into `obsp`, the
//! clusters into `obs`) with NMI/ARI against a label column and a JSON report.

use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::ops::Range;

use tessera_data::{AnnData, Column, Csr, DataError, Dataset, TileMatrices};
use tessera_kernels::ops::affinity::{
    Metric, distance_rows, exponential_rows, feature_affinity, mean_nearest, zscore_columns,
};
use tessera_metrics::cluster::{ari, nmi};
use tessera_network::distributed::{Exchange, all_gather, gather_to_rank0, row_range, snf_rows};
use tessera_network::out_of_core::{
    TileStore, matrices_needed, row_blocks, snf_out_of_core, stored_spectrum,
};
use tessera_network::{NetworkError, SnfParams, Spectrum, View, rank_by_eigengap};

use crate::eval::DEFAULT_LABEL_KEY;

#[derive(Debug, thiserror::Error)]
pub enum NetworkJobError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{store}: {problem}")]
    Network {
        store: String,
        problem: NetworkError,
    },
    #[error("{store}: {reason}")]
    Input { store: String, reason: String },
    #[error("writing {path}: {reason}")]
    Output { path: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Similarity Network Fusion (snfpy 0.2.2's arithmetic).
    Snf,
    /// NEMO (the authors' nemo.affinity.graph).
    Nemo,
    /// The unweighted mean of the views' affinities (kernel averaging).
    Average,
}

impl Method {
    /// Its name in reports and file names (`<name>.json`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Snf => "snf",
            Method::Nemo => "nemo",
            Method::Average => "average",
        }
    }
}

/// The distance each view's affinity is built on (snfpy's `metric`, scipy's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    #[default]
    SqEuclidean,
    Euclidean,
    Cosine,
    Correlation,
}

impl From<Distance> for Metric {
    fn from(d: Distance) -> Metric {
        match d {
            Distance::SqEuclidean => Metric::SqEuclidean,
            Distance::Euclidean => Metric::Euclidean,
            Distance::Cosine => Metric::Cosine,
            Distance::Correlation => Metric::Correlation,
        }
    }
}

/// Which cells' features form one view: `X` of the store or of a MuData modality (`rna`), or
/// an `obsm` entry of either (`obsm/X_pca`, `rna:obsm/X_pca`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewSpec {
    pub modality: Option<String>,
    pub obsm: Option<String>,
}

impl ViewSpec {
    pub fn parse(text: &str) -> ViewSpec {
        let (modality, rest) = match text.split_once(':') {
            Some((m, rest)) => (Some(m.to_string()), Some(rest)),
            None if text.starts_with("obsm/") => (None, Some(text)),
            None if text == "X" => (None, None),
            None => (Some(text.to_string()), None),
        };
        let obsm = rest.map(|r| r.strip_prefix("obsm/").unwrap_or(r).to_string());
        ViewSpec { modality, obsm }
    }

    pub fn name(&self) -> String {
        match (&self.modality, &self.obsm) {
            (Some(m), Some(k)) => format!("{m}:obsm/{k}"),
            (Some(m), None) => m.clone(),
            (None, Some(k)) => format!("obsm/{k}"),
            (None, None) => "X".into(),
        }
    }
}

/// The job; as TOML it is a distributed job's `JobSpec.network_toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkRequest {
    pub data: String,
    /// Empty: every modality's X (MuData) or X (AnnData).
    pub views: Vec<ViewSpec>,
    pub method: Method,
    /// K, t and alpha of SNF; K is also the affinity's neighbour count.
    pub snf: SnfParams,
    /// NEMO's neighbours per view (default: the view's samples / 6).
    pub nemo_k: Option<usize>,
    /// Width of the scaled exponential kernel (snfpy's mu).
    pub mu: f64,
    /// The distance under the affinities.
    #[serde(default)]
    pub metric: Distance,
    /// Count matrices (X) scaled to 10⁴ per cell and log1p'd before the z-scores, as scanpy's
    /// normalize_total + log1p; obsm entries are always used as they are.
    pub log_normalise: bool,
    /// Cluster count; None: the best by snfpy's eigengap among `candidates`.
    pub clusters: Option<usize>,
    pub candidates: Vec<usize>,
    /// obs column of true labels for NMI/ARI (default: cell_type when present).
    pub label_key: Option<String>,
    /// The network goes to obsp/<key>, the clusters to obs/<key>_clusters.
    pub key: String,
    /// Keep the `top_k` strongest entries of each row (sparse obsp); None: the dense matrix.
    pub top_k: Option<usize>,
    pub overwrite: bool,
    pub seed: u64,
    /// SNF with its n x n matrices in a scratch tile store instead of memory (one machine).
    #[serde(default)]
    pub out_of_core: Option<OutOfCore>,
}

/// Where out-of-core SNF keeps its matrices (2·views + 1 of n x n f64) and how many rows it
/// holds in memory at a time (about 3 blocks of n f64).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfCore {
    /// A new Zarr store (path or URL), removed when the job ends.
    pub scratch: String,
    /// Rows per block, and the side of the square tiles.
    pub block: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewSummary {
    pub name: String,
    pub samples: usize,
    pub features: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkReport {
    pub store: String,
    pub method: Method,
    pub n_obs: usize,
    pub views: Vec<ViewSummary>,
    pub k: usize,
    pub t: usize,
    pub mu: f64,
    pub clusters: usize,
    /// Candidate counts best first with snfpy's eigengap score.
    pub eigengap: Vec<(usize, f64)>,
    pub label_key: Option<String>,
    pub nmi: Option<f64>,
    pub ari: Option<f64>,
    pub network: String,
    pub network_entries: usize,
    pub cluster_column: String,
    pub seconds_affinities: f64,
    pub seconds_network: f64,
    pub seconds_clustering: f64,
    pub seconds_write: f64,
    /// This process's peak resident memory at the end of the job (Linux), MiB.
    #[serde(default)]
    pub peak_memory_mib: Option<f64>,
}

/// One view's features: the global index of each present cell and its row-major f64 values.
struct Features {
    samples: Vec<usize>,
    values: Vec<f64>,
    cols: usize,
}

fn input(store: &str, reason: impl Into<String>) -> NetworkJobError {
    NetworkJobError::Input {
        store: store.to_string(),
        reason: reason.into(),
    }
}

/// Dense rows of a count matrix, optionally scaled to 10⁴ per cell and log1p'd.
fn dense_rows(
    adata: &AnnData,
    rows: &[usize],
    log_normalise: bool,
) -> Result<(Vec<f64>, usize), DataError> {
    let x = adata.x()?;
    let csr: Csr = x.read_rows(&adata.store, 0..adata.n_obs())?;
    let cols = csr.n_cols;
    let mut values = vec![0.0f64; rows.len() * cols];
    values
        .par_chunks_mut(cols.max(1))
        .zip(rows.par_iter())
        .for_each(|(out, &r)| {
            let (idx, val) = csr.row(r);
            let total: f64 = val.iter().map(|&v| f64::from(v)).sum();
            for (&j, &v) in idx.iter().zip(val) {
                out[j as usize] = if log_normalise && total > 0.0 {
                    (f64::from(v) * 1e4 / total).ln_1p()
                } else {
                    f64::from(v)
                };
            }
        });
    Ok((values, cols))
}

/// The rows of an obsm entry, cells with any NaN left out (missing from the view).
fn obsm_rows(adata: &AnnData, key: &str, cells: &[usize]) -> Result<Features, DataError> {
    let (x, cols) = adata.obsm(key)?;
    let (samples, values): (Vec<usize>, Vec<Vec<f64>>) = cells
        .iter()
        .enumerate()
        .map(|(local, &global)| (global, &x[local * cols..(local + 1) * cols]))
        .filter(|(_, row)| row.iter().all(|v| !v.is_nan()))
        .map(|(g, row)| (g, row.iter().map(|&v| f64::from(v)).collect()))
        .unzip();
    Ok(Features {
        samples,
        values: values.concat(),
        cols,
    })
}

fn read_view(
    dataset: &Dataset,
    spec: &ViewSpec,
    req: &NetworkRequest,
) -> Result<Features, NetworkJobError> {
    match (dataset, &spec.modality) {
        (Dataset::AnnData(a), None) => {
            let all: Vec<usize> = (0..a.n_obs() as usize).collect();
            match &spec.obsm {
                Some(key) => Ok(obsm_rows(a, key, &all)?),
                None => {
                    let (values, cols) = dense_rows(a, &all, req.log_normalise)?;
                    Ok(Features {
                        samples: all,
                        values,
                        cols,
                    })
                }
            }
        }
        (Dataset::AnnData(_), Some(m)) => Err(input(
            &req.data,
            format!(
                "view {:?}: the store is an AnnData, it has no modality {m:?} (use X or obsm/<key>)",
                spec.name()
            ),
        )),
        (Dataset::MuData(md), None) => match &spec.obsm {
            Some(key) => Ok(obsm_rows(
                &md.root(),
                key,
                &(0..md.n_obs() as usize).collect::<Vec<_>>(),
            )?),
            None => Err(input(
                &req.data,
                "view \"X\": a MuData store has no root X; name a modality (rna) or obsm/<key>",
            )),
        },
        (Dataset::MuData(md), Some(m)) => {
            let (index, adata) = md.modality(m)?;
            // obsmap: 1-based row of each global cell in the modality, 0 = absent.
            let (samples, rows): (Vec<usize>, Vec<usize>) = md.obsmap[index]
                .iter()
                .enumerate()
                .filter(|&(_, &r)| r > 0)
                .map(|(g, &r)| (g, r as usize - 1))
                .unzip();
            match &spec.obsm {
                Some(key) => {
                    let local =
                        obsm_rows(adata, key, &(0..adata.n_obs() as usize).collect::<Vec<_>>())?;
                    // Back from modality rows to global cells, in global order.
                    let position: std::collections::HashMap<usize, usize> = local
                        .samples
                        .iter()
                        .enumerate()
                        .map(|(p, &r)| (r, p))
                        .collect();
                    let (samples, values): (Vec<usize>, Vec<&[f64]>) = samples
                        .iter()
                        .zip(&rows)
                        .filter_map(|(&g, r)| {
                            position
                                .get(r)
                                .map(|&p| (g, &local.values[p * local.cols..(p + 1) * local.cols]))
                        })
                        .unzip();
                    Ok(Features {
                        samples,
                        values: values.concat(),
                        cols: local.cols,
                    })
                }
                None => {
                    let (values, cols) = dense_rows(adata, &rows, req.log_normalise)?;
                    Ok(Features {
                        samples,
                        values,
                        cols,
                    })
                }
            }
        }
    }
}

/// The scaled exponential affinity of one view over its cells.
fn affinity(mut f: Features, k: usize, mu: f64, metric: Metric, n: usize) -> View {
    let s = f.samples.len();
    let w = feature_affinity(&mut f.values, s, f.cols, metric, k, mu);
    if s == n {
        View::complete(w)
    } else {
        View::partial(f.samples, w)
    }
}

/// The `top_k` largest entries of each row (n long) of `w` as CSR (columns ascending).
fn top_k_rows(w: &[f64], n: usize, top_k: usize) -> Csr {
    let rows: Vec<Vec<(u32, f32)>> = w
        .par_chunks(n)
        .map(|row| {
            let mut order: Vec<usize> = (0..n).collect();
            let keep = top_k.min(n);
            if keep < n {
                order.select_nth_unstable_by(keep, |&a, &b| row[b].total_cmp(&row[a]));
            }
            let mut kept: Vec<(u32, f32)> = order[..keep]
                .iter()
                .map(|&j| (j as u32, row[j] as f32))
                .collect();
            kept.sort_unstable_by_key(|e| e.0);
            kept
        })
        .collect();
    let mut csr = Csr {
        n_rows: rows.len(),
        n_cols: n,
        indptr: vec![0],
        ..Csr::default()
    };
    for row in rows {
        csr.indices.extend(row.iter().map(|e| e.0));
        csr.data.extend(row.iter().map(|e| e.1));
        csr.indptr.push(csr.indices.len() as u64);
    }
    csr
}

/// What every run needs before the expensive part: the store, the views, the outputs' names
/// (refused at once if they exist and may not be replaced) and the true labels.
struct Prepared {
    dataset: Dataset,
    n: usize,
    root: AnnData,
    specs: Vec<ViewSpec>,
    cluster_column: String,
    truth: Option<(String, Vec<i32>)>,
}

fn prepare(req: &NetworkRequest) -> Result<Prepared, NetworkJobError> {
    let dataset = Dataset::open(&req.data)?;
    let n = dataset.n_obs() as usize;
    let root = match &dataset {
        Dataset::AnnData(a) => a.clone(),
        Dataset::MuData(m) => m.root(),
    };
    let specs: Vec<ViewSpec> = match (&dataset, req.views.is_empty()) {
        (_, false) => req.views.clone(),
        (Dataset::AnnData(_), true) => vec![ViewSpec {
            modality: None,
            obsm: None,
        }],
        (Dataset::MuData(m), true) => m
            .modalities
            .iter()
            .map(|(name, _)| ViewSpec {
                modality: Some(name.clone()),
                obsm: None,
            })
            .collect(),
    };
    let cluster_column = format!("{}_clusters", req.key);
    for (mapping, key) in [("obsp", req.key.as_str()), ("obs", cluster_column.as_str())] {
        if !req.overwrite
            && root
                .keys(mapping)
                .unwrap_or_default()
                .iter()
                .any(|k| k == key)
        {
            return Err(DataError::Exists {
                store: root.store.name(),
                path: root.element(&format!("{mapping}/{key}")),
            }
            .into());
        }
    }
    let truth = match &req.label_key {
        Some(key) => Some((key.clone(), label_codes(&root, key, &req.data)?)),
        None => root
            .has_obs_column(DEFAULT_LABEL_KEY)?
            .then(|| {
                label_codes(&root, DEFAULT_LABEL_KEY, &req.data)
                    .map(|c| (DEFAULT_LABEL_KEY.to_string(), c))
            })
            .transpose()?,
    };
    Ok(Prepared {
        dataset,
        n,
        root,
        specs,
        cluster_column,
        truth,
    })
}

/// A view's features, checked: at least two cells, finite values.
fn checked_view(
    job: &Prepared,
    spec: &ViewSpec,
    req: &NetworkRequest,
) -> Result<Features, NetworkJobError> {
    let features = read_view(&job.dataset, spec, req)?;
    let s = features.samples.len();
    if features.cols == 0 {
        return Err(input(
            &req.data,
            format!(
                "view {}: 0 features, nothing to compare cells by",
                spec.name()
            ),
        ));
    }
    if s < 2 {
        return Err(input(
            &req.data,
            format!("view {}: {s} cells have it, need at least 2", spec.name()),
        ));
    }
    if let Some(bad) = features.values.iter().position(|v| !v.is_finite()) {
        return Err(input(
            &req.data,
            format!(
                "view {}: cell {} has a non-finite value",
                spec.name(),
                features.samples[bad / features.cols.max(1)]
            ),
        ));
    }
    Ok(features)
}

/// Every view's checked features turned into what the method needs by `make` (`progress`
/// hears `stage` and the view's name first): those, the views' summaries and the seconds taken.
fn build_views<T>(
    req: &NetworkRequest,
    job: &Prepared,
    stage: &str,
    progress: &mut impl FnMut(&str),
    mut make: impl FnMut(&ViewSpec, Features) -> Result<T, NetworkJobError>,
) -> Result<(Vec<T>, Vec<ViewSummary>, f64), NetworkJobError> {
    let started = Instant::now();
    let mut views = Vec::with_capacity(job.specs.len());
    let mut summaries = Vec::with_capacity(job.specs.len());
    for spec in &job.specs {
        progress(&format!("{stage} of view {}", spec.name()));
        let features = checked_view(job, spec, req)?;
        summaries.push(ViewSummary {
            name: spec.name(),
            samples: features.samples.len(),
            features: features.cols,
        });
        views.push(make(spec, features)?);
    }
    Ok((views, summaries, started.elapsed().as_secs_f64()))
}

/// Runs the job on this machine; `progress` hears each stage as it starts.
pub fn network_store(
    req: &NetworkRequest,
    mut progress: impl FnMut(&str),
) -> Result<NetworkReport, NetworkJobError> {
    if let Some(out_of_core) = &req.out_of_core {
        return network_out_of_core(req, out_of_core, progress);
    }
    let job = prepare(req)?;
    let n = job.n;
    let (views, summaries, seconds_affinities) =
        build_views(req, &job, "affinity", &mut progress, |_, features| {
            let s = features.samples.len();
            let k = match req.method {
                Method::Snf | Method::Average => req.snf.k,
                Method::Nemo => req
                    .nemo_k
                    .unwrap_or_else(|| tessera_network::nemo::default_neighbours(s)),
            };
            Ok(affinity(
                features,
                k.min(s - 1).max(1),
                req.mu,
                req.metric.into(),
                n,
            ))
        })?;

    let started = Instant::now();
    progress(&format!(
        "{:?} of {} views over {n} cells",
        req.method,
        views.len()
    ));
    let w = match req.method {
        Method::Snf => tessera_network::snf(views, n, req.snf)
            .map_err(|problem| network_error(req, problem))?,
        Method::Nemo => tessera_network::nemo(&views, n, req.nemo_k)
            .map_err(|problem| network_error(req, problem))?,
        Method::Average => tessera_network::kernel_average(&views, n)
            .map_err(|problem| network_error(req, problem))?,
    };
    let timings = [seconds_affinities, started.elapsed().as_secs_f64()];
    finish(req, &job, Fused::Memory(&w), summaries, timings, progress)
}

const DENSE_OUT_OF_CORE: &str = "out-of-core SNF writes the network as top-k rows \
     (a dense obsp would hold it all in memory): give --top-k > 0";

/// The out-of-core tile store: a scratch Zarr store ([`TileMatrices`]).
struct ZarrTiles(TileMatrices);

impl TileStore for ZarrTiles {
    fn block(&self) -> usize {
        self.0.block()
    }

    fn write_rows(
        &mut self,
        matrix: usize,
        rows: Range<usize>,
        values: &[f64],
    ) -> Result<(), String> {
        self.0
            .write_rows(matrix, rows, values)
            .map_err(|e| e.to_string())
    }

    fn read_rows(&self, matrix: usize, rows: Range<usize>) -> Result<Vec<f64>, String> {
        self.0.read_rows(matrix, rows).map_err(|e| e.to_string())
    }

    fn read_columns(&self, matrix: usize, cols: Range<usize>) -> Result<Vec<f64>, String> {
        self.0.read_columns(matrix, cols).map_err(|e| e.to_string())
    }
}

/// A view's scaled exponential affinity, row block by row block: the z-scored features and
/// each present cell's mean distance to its K nearest are kept; rows are recomputed on demand.
struct RowAffinity {
    features: Features,
    near: Vec<f64>,
    metric: Metric,
    mu: f64,
    n: usize,
}

impl RowAffinity {
    fn new(
        mut features: Features,
        k: usize,
        mu: f64,
        metric: Metric,
        n: usize,
        block: usize,
    ) -> RowAffinity {
        let (s, d) = (features.samples.len(), features.cols);
        zscore_columns(&mut features.values, s, d);
        let mut near = Vec::with_capacity(s);
        for rows in row_blocks(s, block) {
            let mut dist = vec![0.0; rows.len() * s];
            distance_rows(&features.values, s, d, rows, metric, &mut dist);
            near.extend(mean_nearest(&dist, s, k));
        }
        RowAffinity {
            features,
            near,
            metric,
            mu,
            n,
        }
    }

    /// Rows `rows` of the affinity over all n cells (zero where a cell lacks the view).
    fn rows(&self, rows: Range<usize>) -> Vec<f64> {
        let (samples, n) = (&self.features.samples, self.n);
        let s = samples.len();
        // The view's cells among `rows` are a contiguous run of its (ascending) samples.
        let local = samples.partition_point(|&g| g < rows.start)
            ..samples.partition_point(|&g| g < rows.end);
        let mut w = vec![0.0; local.len() * s];
        distance_rows(
            &self.features.values,
            s,
            self.features.cols,
            local.clone(),
            self.metric,
            &mut w,
        );
        exponential_rows(&mut w, s, &self.near[local.clone()], &self.near, self.mu);
        if s == n {
            return w;
        }
        let mut out = vec![0.0; rows.len() * n];
        for (from, &g) in w.chunks(s).zip(&samples[local]) {
            let row = &mut out[(g - rows.start) * n..(g - rows.start + 1) * n];
            samples.iter().zip(from).for_each(|(&j, &v)| row[j] = v);
        }
        out
    }
}

/// SNF with its n x n matrices in the scratch store of `out_of_core` (removed at the end,
/// whatever the outcome); views may miss cells.
fn network_out_of_core(
    req: &NetworkRequest,
    out_of_core: &OutOfCore,
    mut progress: impl FnMut(&str),
) -> Result<NetworkReport, NetworkJobError> {
    if req.method != Method::Snf {
        return Err(input(
            &req.data,
            "only SNF runs out of core (NEMO and kernel averaging hold one n x n matrix: run them in memory)",
        ));
    }
    if req.top_k.is_none() {
        return Err(input(&req.data, DENSE_OUT_OF_CORE));
    }
    if out_of_core.block == 0 {
        return Err(input(
            &req.data,
            "out-of-core block: expected at least 1 row",
        ));
    }
    let job = prepare(req)?;
    let n = job.n;
    let (views, summaries, seconds_affinities) = build_views(
        req,
        &job,
        "neighbour distances",
        &mut progress,
        |_, features| {
            let s = features.samples.len();
            Ok(RowAffinity::new(
                features,
                req.snf.k.min(s - 1).max(1),
                req.mu,
                req.metric.into(),
                n,
                out_of_core.block,
            ))
        },
    )?;
    let samples: Vec<Option<Vec<usize>>> = views
        .iter()
        .map(|v| (v.features.samples.len() < n).then(|| v.features.samples.clone()))
        .collect();
    let matrices = matrices_needed(views.len());
    let created = TileMatrices::create(&out_of_core.scratch, n, out_of_core.block, matrices);
    let tiles = created.map_err(|e| match e {
        DataError::Occupied { store } => input(
            &req.data,
            format!(
                "the scratch location {store} is not empty: name a new one \
                 (the scratch store is removed after the run, with all it holds)"
            ),
        ),
        other => other.into(),
    })?;
    let mut tiles = ZarrTiles(tiles);
    let result = (|| {
        let started = Instant::now();
        progress(&format!(
            "SNF of {} views over {n} cells, out of core in {}",
            views.len(),
            tiles.0.name()
        ));
        let network = snf_out_of_core(&samples, n, req.snf, &mut tiles, |v, rows| {
            Ok(views[v].rows(rows))
        })
        .map_err(|problem| network_error(req, problem))?;
        let timings = [seconds_affinities, started.elapsed().as_secs_f64()];
        finish(
            req,
            &job,
            Fused::Stored(&tiles, network),
            summaries,
            timings,
            &mut progress,
        )
    })();
    let removed = tiles.0.remove();
    let report = result?;
    removed?;
    Ok(report)
}

fn network_error(req: &NetworkRequest, problem: NetworkError) -> NetworkJobError {
    NetworkJobError::Network {
        store: req.data.clone(),
        problem,
    }
}

/// One rank of SNF over row blocks (`tessera snf --workers`): every rank reads the views'
/// features and computes its rows of each affinity and of the fusion; rank 0 gathers the fused
/// network, clusters it, writes it and returns the report (other ranks: None), with the number
/// of rows this rank held. Every cell must be in every view.
pub fn network_rank(
    req: &NetworkRequest,
    ex: &mut impl Exchange,
) -> Result<(usize, Option<NetworkReport>), NetworkJobError> {
    if req.method != Method::Snf {
        return Err(input(
            &req.data,
            "only SNF runs across workers (NEMO and kernel averaging are one pass: run them on one machine)",
        ));
    }
    let job = prepare(req)?;
    let n = job.n;
    let mine = row_range(n, ex.world(), ex.rank());
    let (views, summaries, seconds_affinities) = build_views(
        req,
        &job,
        "affinity rows",
        &mut |_| {},
        |spec, mut f| {
            if f.samples.len() != n {
                return Err(input(
                    &req.data,
                    format!(
                        "view {}: {} of {n} cells have it; SNF across workers needs every cell in every view (run on one machine)",
                        spec.name(),
                        f.samples.len()
                    ),
                ));
            }
            zscore_columns(&mut f.values, n, f.cols);
            let mut rows = vec![0.0; mine.len() * n];
            distance_rows(
                &f.values,
                n,
                f.cols,
                mine.clone(),
                req.metric.into(),
                &mut rows,
            );
            let near = mean_nearest(&rows, n, req.snf.k.min(n - 1));
            let near_all =
                all_gather(ex, near.clone()).map_err(|problem| network_error(req, problem))?;
            exponential_rows(&mut rows, n, &near, &near_all, req.mu);
            Ok(rows)
        },
    )?;
    let started = Instant::now();
    let fused = snf_rows(views, n, req.snf, ex).map_err(|problem| network_error(req, problem))?;
    let whole = gather_to_rank0(ex, fused).map_err(|problem| network_error(req, problem))?;
    let timings = [seconds_affinities, started.elapsed().as_secs_f64()];
    Ok((
        mine.len(),
        whole
            .map(|w| finish(req, &job, Fused::Memory(&w), summaries, timings, |_| {}))
            .transpose()?,
    ))
}

/// The fused network: in memory, or a matrix of the out-of-core tile store.
#[derive(Clone, Copy)]
enum Fused<'a> {
    Memory(&'a [f64]),
    Stored(&'a ZarrTiles, usize),
}

impl Fused<'_> {
    fn spectrum(self, n: usize, count: usize, seed: u64) -> Result<Spectrum, NetworkError> {
        match self {
            Fused::Memory(w) => Ok(Spectrum::of(w, n, count, seed)),
            Fused::Stored(tiles, matrix) => stored_spectrum(tiles, matrix, n, count, seed),
        }
    }

    fn top_k(self, n: usize, top_k: usize) -> Result<Csr, NetworkError> {
        match self {
            Fused::Memory(w) => Ok(top_k_rows(w, n, top_k)),
            Fused::Stored(tiles, matrix) => {
                let mut graph = Csr {
                    n_cols: n,
                    indptr: vec![0],
                    ..Csr::default()
                };
                for rows in row_blocks(n, tiles.block()) {
                    graph.append_rows(&top_k_rows(
                        &tiles.read_rows(matrix, rows).map_err(NetworkError::Store)?,
                        n,
                        top_k,
                    ));
                }
                Ok(graph)
            }
        }
    }
}

/// Clusters the network `w`, scores the clusters, writes both; [affinity, network] seconds.
fn finish(
    req: &NetworkRequest,
    job: &Prepared,
    w: Fused<'_>,
    summaries: Vec<ViewSummary>,
    [seconds_affinities, seconds_network]: [f64; 2],
    mut progress: impl FnMut(&str),
) -> Result<NetworkReport, NetworkJobError> {
    let (n, root) = (job.n, &job.root);
    let started = Instant::now();
    progress("spectral clustering");
    // One Lanczos run serves the eigengap and the clustering.
    let most = req.candidates.iter().copied().max().unwrap_or(2);
    let spectrum = w
        .spectrum(
            n,
            (most + 1).max(req.clusters.unwrap_or(0)).min(n),
            req.seed,
        )
        .map_err(|problem| network_error(req, problem))?;
    let eigengap = rank_by_eigengap(&spectrum.laplacian, &req.candidates);
    let clusters = match (req.clusters, eigengap.first()) {
        (Some(c), _) => c,
        (None, Some(&(c, _))) => c,
        (None, None) => {
            return Err(input(
                &req.data,
                format!(
                    "no candidate cluster count in {:?} fits {n} cells",
                    req.candidates
                ),
            ));
        }
    };
    let labels = spectrum
        .clusters(clusters, req.seed)
        .map_err(|problem| network_error(req, problem))?;
    let (nmi_score, ari_score) = match &job.truth {
        Some((_, codes)) => {
            let known: Vec<usize> = (0..n).filter(|&i| codes[i] >= 0).collect();
            let t: Vec<u32> = known.iter().map(|&i| codes[i] as u32).collect();
            let l: Vec<u32> = known.iter().map(|&i| labels[i]).collect();
            (Some(nmi(&t, &l)), Some(ari(&t, &l)))
        }
        None => (None, None),
    };
    let seconds_clustering = started.elapsed().as_secs_f64();

    let started = Instant::now();
    progress("writing the network and the clusters");
    let network_entries = match req.top_k {
        Some(top_k) => {
            let graph = w
                .top_k(n, top_k)
                .map_err(|problem| network_error(req, problem))?;
            root.write_obsp(&req.key, &graph, req.overwrite)?;
            graph.nnz()
        }
        None => {
            let Fused::Memory(w) = w else {
                return Err(input(&req.data, DENSE_OUT_OF_CORE));
            };
            let dense: Vec<f32> = w.iter().map(|&v| v as f32).collect();
            root.write_obsp_dense(&req.key, &dense, req.overwrite)?;
            dense.len()
        }
    };
    let categories: Vec<String> = (0..clusters).map(|c| c.to_string()).collect();
    let column = Column::Categorical {
        codes: labels.iter().map(|&l| l as i32).collect(),
        categories,
        ordered: false,
    };
    root.write_obs_column(&job.cluster_column, &column, req.overwrite)?;
    let seconds_write = started.elapsed().as_secs_f64();

    Ok(NetworkReport {
        store: req.data.clone(),
        method: req.method,
        n_obs: n,
        views: summaries,
        k: req.snf.k,
        t: req.snf.t,
        mu: req.mu,
        clusters,
        eigengap,
        label_key: job.truth.as_ref().map(|t| t.0.clone()),
        nmi: nmi_score,
        ari: ari_score,
        network: root.element(&format!("obsp/{}", req.key)),
        network_entries,
        cluster_column: root.element(&format!("obs/{}", job.cluster_column)),
        seconds_affinities,
        seconds_network,
        seconds_clustering,
        seconds_write,
        peak_memory_mib: crate::peak_memory_mib(),
    })
}

/// The coordinator's check of a submitted network job (`JobSpec.network_toml`): the request
/// parses, runs across workers, and the store opens; its cell count.
pub fn check_network_job(data: &str, network_toml: &str) -> Result<u64, String> {
    let req: NetworkRequest =
        toml::from_str(network_toml).map_err(|e| format!("network_toml: {e}"))?;
    if req.method != Method::Snf {
        return Err("network_toml: only SNF runs across workers".into());
    }
    if req.out_of_core.is_some() {
        return Err("network_toml: out_of_core runs on one machine, not across workers".into());
    }
    Dataset::open(data)
        .map(|d| d.n_obs())
        .map_err(|e| e.to_string())
}

/// Label codes of an obs column (-1 = missing), as the evaluation reads them.
fn label_codes(root: &AnnData, key: &str, store: &str) -> Result<Vec<i32>, NetworkJobError> {
    crate::eval::codes(root, key, store).map_err(|e| match e {
        crate::EvalError::Data(d) => d.into(),
        crate::EvalError::Input { store, reason } => NetworkJobError::Input { store, reason },
        other => input(store, other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "data = \"nowhere.zarr\"\nviews = []\nmethod = \"snf\"\nmu = 0.5\nlog_normalise = true\ncandidates = [2, 3]\nkey = \"snf\"\noverwrite = false\nseed = 0\n[snf]\nk = 20\nt = 20\nalpha = 1.0\n";

    #[test]
    fn jobs_that_cannot_run_across_workers_are_refused_at_submission() {
        let nemo = JOB.replace("method = \"snf\"", "method = \"nemo\"");
        assert_eq!(
            check_network_job("nowhere.zarr", &nemo),
            Err("network_toml: only SNF runs across workers".into())
        );
        let on_disk = JOB.replace(
            "seed = 0\n",
            "seed = 0\n[out_of_core]\nscratch = \"s.zarr\"\nblock = 64\n",
        );
        assert_eq!(
            check_network_job("nowhere.zarr", &on_disk),
            Err("network_toml: out_of_core runs on one machine, not across workers".into())
        );
        let e = check_network_job("/nonexistent/nowhere.zarr", JOB).unwrap_err();
        assert!(e.contains("nowhere.zarr"), "{e}");
        assert!(
            check_network_job("x", "method = 3")
                .unwrap_err()
                .starts_with("network_toml:")
        );
    }
}
