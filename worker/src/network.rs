//! The network job behind `tessera snf`: views of the cells read from a store, per-view
//! affinities, SNF or NEMO, spectral clusters, written back (the network into `obsp`, the
//! clusters into `obs`) with NMI/ARI against a label column and a JSON report.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use tessera_data::{AnnData, Column, Csr, Dataset, DataError};
use tessera_kernels::ops::affinity::{scaled_exponential, sq_euclidean, zscore_columns};
use tessera_metrics::cluster::{ari, nmi};
use tessera_network::{NetworkError, SnfParams, View, laplacian_eigenvalues, rank_by_eigengap, spectral_clustering};

use crate::eval::DEFAULT_LABEL_KEY;

#[derive(Debug, thiserror::Error)]
pub enum NetworkJobError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("{store}: {problem}")]
    Network { store: String, problem: NetworkError },
    #[error("{store}: {reason}")]
    Input { store: String, reason: String },
    #[error("writing {path}: {reason}")]
    Output { path: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Similarity Network Fusion (snfpy 0.2.2's arithmetic).
    Snf,
    /// NEMO (the authors' nemo.affinity.graph).
    Nemo,
}

/// Which cells' features form one view: `X` of the store or of a MuData modality (`rna`), or
/// an `obsm` entry of either (`obsm/X_pca`, `rna:obsm/X_pca`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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

#[derive(Debug, Clone)]
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
}

#[derive(Debug, Clone, Serialize)]
pub struct ViewSummary {
    pub name: String,
    pub samples: usize,
    pub features: usize,
}

#[derive(Debug, Clone, Serialize)]
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
}

/// One view's features: the global index of each present cell and its row-major f64 values.
struct Features {
    samples: Vec<usize>,
    values: Vec<f64>,
    cols: usize,
}

fn input(store: &str, reason: impl Into<String>) -> NetworkJobError {
    NetworkJobError::Input { store: store.to_string(), reason: reason.into() }
}

/// Dense rows of a count matrix, optionally scaled to 10⁴ per cell and log1p'd.
fn dense_rows(adata: &AnnData, rows: &[usize], log_normalise: bool) -> Result<(Vec<f64>, usize), DataError> {
    let x = adata.x()?;
    let csr: Csr = x.read_rows(&adata.store, 0..adata.n_obs())?;
    let cols = csr.n_cols;
    let mut values = vec![0.0f64; rows.len() * cols];
    values.par_chunks_mut(cols.max(1)).zip(rows.par_iter()).for_each(|(out, &r)| {
        let (idx, val) = csr.row(r);
        let total: f64 = val.iter().map(|&v| f64::from(v)).sum();
        for (&j, &v) in idx.iter().zip(val) {
            out[j as usize] = if log_normalise && total > 0.0 { (f64::from(v) * 1e4 / total).ln_1p() } else { f64::from(v) };
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
    Ok(Features { samples, values: values.concat(), cols })
}

fn read_view(dataset: &Dataset, spec: &ViewSpec, req: &NetworkRequest) -> Result<Features, NetworkJobError> {
    match (dataset, &spec.modality) {
        (Dataset::AnnData(a), None) => {
            let all: Vec<usize> = (0..a.n_obs() as usize).collect();
            match &spec.obsm {
                Some(key) => Ok(obsm_rows(a, key, &all)?),
                None => {
                    let (values, cols) = dense_rows(a, &all, req.log_normalise)?;
                    Ok(Features { samples: all, values, cols })
                }
            }
        }
        (Dataset::AnnData(_), Some(m)) => Err(input(&req.data, format!("view {:?}: the store is an AnnData, it has no modality {m:?} (use X or obsm/<key>)", spec.name()))),
        (Dataset::MuData(md), None) => match &spec.obsm {
            Some(key) => Ok(obsm_rows(&md.root(), key, &(0..md.n_obs() as usize).collect::<Vec<_>>())?),
            None => Err(input(&req.data, "view \"X\": a MuData store has no root X; name a modality (rna) or obsm/<key>")),
        },
        (Dataset::MuData(md), Some(m)) => {
            let (index, adata) = md.modality(m)?;
            // obsmap: 1-based row of each global cell in the modality, 0 = absent.
            let (samples, rows): (Vec<usize>, Vec<usize>) = md.obsmap[index].iter().enumerate().filter(|&(_, &r)| r > 0).map(|(g, &r)| (g, r as usize - 1)).unzip();
            match &spec.obsm {
                Some(key) => {
                    let local = obsm_rows(adata, key, &(0..adata.n_obs() as usize).collect::<Vec<_>>())?;
                    // Back from modality rows to global cells, in global order.
                    let position: std::collections::HashMap<usize, usize> = local.samples.iter().enumerate().map(|(p, &r)| (r, p)).collect();
                    let (samples, values): (Vec<usize>, Vec<&[f64]>) = samples.iter().zip(&rows).filter_map(|(&g, r)| position.get(r).map(|&p| (g, &local.values[p * local.cols..(p + 1) * local.cols]))).unzip();
                    Ok(Features { samples, values: values.concat(), cols: local.cols })
                }
                None => {
                    let (values, cols) = dense_rows(adata, &rows, req.log_normalise)?;
                    Ok(Features { samples, values, cols })
                }
            }
        }
    }
}

/// The scaled exponential affinity of one view over its cells.
fn affinity(mut f: Features, k: usize, mu: f64, n: usize) -> View {
    let s = f.samples.len();
    zscore_columns(&mut f.values, s, f.cols);
    let mut w = vec![0.0; s * s];
    sq_euclidean(&f.values, s, f.cols, &mut w);
    scaled_exponential(&mut w, s, k, mu);
    if s == n { View::complete(w) } else { View::partial(f.samples, w) }
}

/// The `top_k` largest entries of each row as CSR (columns ascending).
fn top_k_rows(w: &[f64], n: usize, top_k: usize) -> Csr {
    let rows: Vec<Vec<(u32, f32)>> = w
        .par_chunks(n)
        .map(|row| {
            let mut order: Vec<usize> = (0..n).collect();
            let keep = top_k.min(n);
            if keep < n {
                order.select_nth_unstable_by(keep, |&a, &b| row[b].total_cmp(&row[a]));
            }
            let mut kept: Vec<(u32, f32)> = order[..keep].iter().map(|&j| (j as u32, row[j] as f32)).collect();
            kept.sort_unstable_by_key(|e| e.0);
            kept
        })
        .collect();
    let mut csr = Csr { n_rows: n, n_cols: n, indptr: vec![0], ..Csr::default() };
    for row in rows {
        csr.indices.extend(row.iter().map(|e| e.0));
        csr.data.extend(row.iter().map(|e| e.1));
        csr.indptr.push(csr.indices.len() as u64);
    }
    csr
}

/// Runs the job; `progress` hears each stage as it starts.
pub fn network_store(req: &NetworkRequest, mut progress: impl FnMut(&str)) -> Result<NetworkReport, NetworkJobError> {
    let dataset = Dataset::open(&req.data)?;
    let n = dataset.n_obs() as usize;
    let root = match &dataset {
        Dataset::AnnData(a) => a.clone(),
        Dataset::MuData(m) => m.root(),
    };
    let specs: Vec<ViewSpec> = match (&dataset, req.views.is_empty()) {
        (_, false) => req.views.clone(),
        (Dataset::AnnData(_), true) => vec![ViewSpec { modality: None, obsm: None }],
        (Dataset::MuData(m), true) => m.modalities.iter().map(|(name, _)| ViewSpec { modality: Some(name.clone()), obsm: None }).collect(),
    };
    let network_key = root.element(&format!("obsp/{}", req.key));
    let cluster_column = format!("{}_clusters", req.key);
    // Refuse before the expensive part what the write would refuse after it.
    for (mapping, key) in [("obsp", req.key.as_str()), ("obs", cluster_column.as_str())] {
        if !req.overwrite && root.keys(mapping).unwrap_or_default().iter().any(|k| k == key) {
            return Err(DataError::Exists { store: root.store.name(), path: root.element(&format!("{mapping}/{key}")) }.into());
        }
    }
    let truth = match &req.label_key {
        Some(key) => Some((key.clone(), label_codes(&root, key, &req.data)?)),
        None => root.obs_column(DEFAULT_LABEL_KEY).ok().map(|_| label_codes(&root, DEFAULT_LABEL_KEY, &req.data).map(|c| (DEFAULT_LABEL_KEY.to_string(), c))).transpose()?,
    };

    let started = Instant::now();
    let mut views = Vec::with_capacity(specs.len());
    let mut summaries = Vec::with_capacity(specs.len());
    for spec in &specs {
        progress(&format!("affinity of view {}", spec.name()));
        let features = read_view(&dataset, spec, req)?;
        let s = features.samples.len();
        if s < 2 {
            return Err(input(&req.data, format!("view {}: {s} cells have it, need at least 2", spec.name())));
        }
        if let Some(bad) = features.values.iter().position(|v| !v.is_finite()) {
            return Err(input(&req.data, format!("view {}: cell {} has a non-finite value", spec.name(), features.samples[bad / features.cols.max(1)])));
        }
        summaries.push(ViewSummary { name: spec.name(), samples: s, features: features.cols });
        let k = match req.method {
            Method::Snf => req.snf.k,
            Method::Nemo => req.nemo_k.unwrap_or_else(|| tessera_network::nemo::default_neighbours(s)),
        };
        views.push(affinity(features, k.min(s - 1).max(1), req.mu, n));
    }
    let seconds_affinities = started.elapsed().as_secs_f64();

    let started = Instant::now();
    progress(&format!("{:?} of {} views over {n} cells", req.method, views.len()));
    let network_error = |problem| NetworkJobError::Network { store: req.data.clone(), problem };
    let w = match req.method {
        Method::Snf => tessera_network::snf(views, n, req.snf).map_err(network_error)?,
        Method::Nemo => tessera_network::nemo(&views, n, req.nemo_k).map_err(network_error)?,
    };
    let seconds_network = started.elapsed().as_secs_f64();

    let started = Instant::now();
    progress("spectral clustering");
    let most = req.candidates.iter().copied().max().unwrap_or(2);
    let eigengap = rank_by_eigengap(&laplacian_eigenvalues(&w, n, (most + 1).min(n)), &req.candidates);
    let clusters = match (req.clusters, eigengap.first()) {
        (Some(c), _) => c,
        (None, Some(&(c, _))) => c,
        (None, None) => return Err(input(&req.data, format!("no candidate cluster count in {:?} fits {n} cells", req.candidates))),
    };
    let labels = spectral_clustering(&w, n, clusters, req.seed).map_err(network_error)?;
    let (nmi_score, ari_score) = match &truth {
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
            let graph = top_k_rows(&w, n, top_k);
            root.write_obsp(&req.key, &graph, req.overwrite)?;
            graph.nnz()
        }
        None => {
            let dense: Vec<f32> = w.iter().map(|&v| v as f32).collect();
            root.write_obsp_dense(&req.key, &dense, req.overwrite)?;
            dense.len()
        }
    };
    let categories: Vec<String> = (0..clusters).map(|c| c.to_string()).collect();
    let column = Column::Categorical { codes: labels.iter().map(|&l| l as i32).collect(), categories, ordered: false };
    root.write_obs_column(&cluster_column, &column, req.overwrite)?;
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
        label_key: truth.map(|t| t.0),
        nmi: nmi_score,
        ari: ari_score,
        network: network_key,
        network_entries,
        cluster_column: root.element(&format!("obs/{cluster_column}")),
        seconds_affinities,
        seconds_network,
        seconds_clustering,
        seconds_write,
    })
}

/// Label codes of an obs column (-1 = missing).
fn label_codes(root: &AnnData, key: &str, store: &str) -> Result<Vec<i32>, NetworkJobError> {
    let column = root.obs_column(key)?;
    column.codes().map(|(codes, _)| codes).ok_or_else(|| input(store, format!("{}: a {} column, expected categories or strings for labels", root.element(&format!("obs/{key}")), column.kind())))
}
