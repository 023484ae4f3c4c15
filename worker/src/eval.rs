//! `tessera eval`: scIB metrics of an `obsm` embedding of a store, against its obs label and
//! batch columns, written as JSON and CSV (scib-metrics' Benchmarker layout: metric, kind, value).

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;
use tessera_data::{AnnData, Dataset};
use tessera_metrics::{EvalOptions, METRIC_NAMES, MetricsError, Scores};

pub const DEFAULT_LABEL_KEY: &str = "cell_type";
pub const DEFAULT_BATCH_KEY: &str = "batch";
/// Cells evaluated before subsampling (exact neighbours cost O(n² d)).
pub const DEFAULT_MAX_CELLS: usize = 100_000;

#[derive(Debug, Clone)]
pub struct EvalRequest {
    pub data: String,
    /// For MuData: the modality whose obsm/obs to read (default: the root if it holds the key,
    /// else the first modality that does).
    pub modality: Option<String>,
    pub embedding_key: String,
    /// obs column of cell types (default: `cell_type` when obs has it).
    pub label_key: Option<String>,
    /// obs column of batches (default: `batch` when obs has it; without one every cell is one
    /// batch and the batch metrics are undefined).
    pub batch_key: Option<String>,
    /// Uniform subsample (seeded) above this many cells: exact neighbours cost O(n²d).
    pub max_cells: Option<usize>,
    pub options: EvalOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Data(#[from] tessera_data::DataError),
    #[error("{element}: {source}")]
    Metrics {
        element: String,
        source: MetricsError,
    },
    #[error("{store}: {reason}")]
    Input { store: String, reason: String },
    #[error("writing {path}: {reason}")]
    Output { path: String, reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub store: String,
    /// The embedding's element path in the store.
    pub embedding: String,
    pub label_key: String,
    pub batch_key: Option<String>,
    pub n_obs: usize,
    /// Cells left out because their label or batch is missing.
    pub excluded_missing: usize,
    /// Cells evaluated (after exclusion and subsampling).
    pub n_evaluated: usize,
    pub subsampled: bool,
    pub options: EvalOptions,
    pub scores: Scores,
    pub seconds: f64,
}

/// Reads the embedding and obs columns and computes every metric.
pub fn evaluate_store(req: &EvalRequest) -> Result<Evaluation, EvalError> {
    let started = std::time::Instant::now();
    let source = Embedded::open(&req.data, req.modality.as_deref(), &req.embedding_key)?;
    let embedded = &source.adata;
    let embedding = source.element.clone();
    let (x, d) = embedded.obsm(&req.embedding_key)?;
    let n_obs = embedded.n_obs() as usize;
    let label_key = match &req.label_key {
        Some(k) => k.clone(),
        None if source.has(DEFAULT_LABEL_KEY) => DEFAULT_LABEL_KEY.to_string(),
        None => {
            return Err(EvalError::Input {
                store: req.data.clone(),
                reason: format!(
                    "{}: no {DEFAULT_LABEL_KEY:?} column; name the cell-type column (--label-key)",
                    embedded.element("obs")
                ),
            });
        }
    };
    let batch_key = req.batch_key.clone().or_else(|| {
        source
            .has(DEFAULT_BATCH_KEY)
            .then(|| DEFAULT_BATCH_KEY.to_string())
    });
    let labels = codes(source.obs_of(&label_key), &label_key, &req.data)?;
    let batches = match &batch_key {
        Some(key) => codes(source.obs_of(key), key, &req.data)?,
        None => vec![0; n_obs],
    };
    let mut keep: Vec<usize> = (0..n_obs)
        .filter(|&i| labels[i] >= 0 && batches[i] >= 0)
        .collect();
    let excluded_missing = n_obs - keep.len();
    if excluded_missing > 0 {
        tracing::warn!(
            excluded_missing,
            "cells without a label or batch are left out of the evaluation"
        );
    }
    let subsampled = req.max_cells.is_some_and(|m| keep.len() > m);
    if let Some(m) = req.max_cells {
        keep = subsample(keep, m, req.options.seed);
    }
    let xs: Vec<f32> = keep
        .iter()
        .flat_map(|&i| x[i * d..(i + 1) * d].iter().copied())
        .collect();
    let pick = |c: &[i32]| -> Vec<u32> { keep.iter().map(|&i| c[i] as u32).collect() };
    let scores = tessera_metrics::evaluate(
        &xs,
        keep.len(),
        d,
        &pick(&labels),
        &pick(&batches),
        &req.options,
    )
    .map_err(|source| EvalError::Metrics {
        element: format!("{}: {embedding}", req.data),
        source,
    })?;
    Ok(Evaluation {
        store: req.data.clone(),
        embedding,
        label_key,
        batch_key,
        n_obs,
        excluded_missing,
        n_evaluated: keep.len(),
        subsampled,
        options: req.options,
        scores,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A uniform seeded subsample of `cells` (kept in order) when there are more than `max`.
pub(crate) fn subsample(cells: Vec<usize>, max: usize, seed: u64) -> Vec<usize> {
    if cells.len() <= max {
        return cells;
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut picked: Vec<usize> = sample(&mut rng, cells.len(), max)
        .into_iter()
        .map(|p| cells[p])
        .collect();
    picked.sort_unstable();
    picked
}

/// The AnnData holding an embedding (the store itself, or for MuData the root (a joint
/// embedding) or a modality), and AnnData whose obs columns also describe its cells: a
/// modality holding every global cell in order shares the MuData root's obs.
pub(crate) struct Embedded {
    pub(crate) adata: AnnData,
    /// The embedding's element path in the store (`obsm/<key>` of `adata`).
    pub(crate) element: String,
    columns: Vec<AnnData>,
}

impl Embedded {
    /// Opens `store` and finds `obsm/<embedding_key>` (in `modality`, for MuData, if named).
    pub(crate) fn open(
        store: &str,
        modality: Option<&str>,
        embedding_key: &str,
    ) -> Result<Embedded, EvalError> {
        let (adata, columns) = match Dataset::open(store)? {
            Dataset::AnnData(a) => (a, Vec::new()),
            Dataset::MuData(m) => Self::in_mudata(&m, store, modality, embedding_key)?,
        };
        let element = adata.element(&format!("obsm/{embedding_key}"));
        Ok(Embedded {
            adata,
            element,
            columns,
        })
    }

    fn in_mudata(
        m: &tessera_data::MuData,
        store: &str,
        modality: Option<&str>,
        embedding_key: &str,
    ) -> Result<(AnnData, Vec<AnnData>), EvalError> {
        let with_root = |i: usize, a: &AnnData| {
            let in_order = a.n_obs() == m.n_obs()
                && m.obsmap[i]
                    .iter()
                    .enumerate()
                    .all(|(r, &row)| row as usize == r + 1);
            (
                a.clone(),
                if in_order { vec![m.root()] } else { Vec::new() },
            )
        };
        if let Some(name) = modality {
            let (i, a) = m.modality(name)?;
            return Ok(with_root(i, a));
        }
        let root = m.root();
        if root.keys("obsm")?.iter().any(|k| k == embedding_key) {
            return Ok((root, Vec::new()));
        }
        for (i, (_, a)) in m.modalities.iter().enumerate() {
            if a.keys("obsm")?.iter().any(|k| k == embedding_key) {
                return Ok(with_root(i, a));
            }
        }
        let names: Vec<&str> = m.modalities.iter().map(|(n, _)| n.as_str()).collect();
        Err(EvalError::Input {
            store: store.to_string(),
            reason: format!(
                "neither the root nor a modality of {names:?} has obsm/{embedding_key}"
            ),
        })
    }

    /// Where obs column `key` is read: the embedding's own obs first.
    pub(crate) fn obs_of(&self, key: &str) -> &AnnData {
        std::iter::once(&self.adata)
            .chain(&self.columns)
            .find(|a| a.has_obs_column(key).unwrap_or(false))
            .unwrap_or(&self.adata)
    }

    /// Present, not readable: a broken column is an error when read, never a missing one.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.obs_of(key).has_obs_column(key).unwrap_or(false)
    }
}

/// The label codes of an obs column (-1 = missing); categorical, string, integer or boolean
/// columns.
pub(crate) fn codes(adata: &AnnData, key: &str, store: &str) -> Result<Vec<i32>, EvalError> {
    categories(adata, key, store).map(|(codes, _)| codes)
}

/// An obs column's codes (-1 = missing) and category names.
pub(crate) fn categories(
    adata: &AnnData,
    key: &str,
    store: &str,
) -> Result<(Vec<i32>, Vec<String>), EvalError> {
    let column = adata.obs_column(key)?;
    column.codes().ok_or_else(|| EvalError::Input {
        store: store.into(),
        reason: format!(
            "{}: obs column {key:?} is {}, expected categories \
             (categorical, strings, integers or booleans)",
            adata.element("obs"),
            column.kind()
        ),
    })
}

/// `eval.json` (everything) and `eval.csv` (metric, kind, value) into `dir`; returns their paths.
pub fn write_evaluation(dir: &Path, evaluation: &Evaluation) -> Result<[PathBuf; 2], EvalError> {
    let out = |path: &Path, e: &dyn std::fmt::Display| EvalError::Output {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| out(dir, &e))?;
    let json = dir.join("eval.json");
    let text = serde_json::to_string_pretty(evaluation).map_err(|e| out(&json, &e))?;
    std::fs::write(&json, text).map_err(|e| out(&json, &e))?;
    let csv = dir.join("eval.csv");
    let mut table = String::from("metric,type,value\n");
    for ((name, kind), value) in METRIC_NAMES.iter().zip(evaluation.scores.values()) {
        table.push_str(&format!(
            "{name},{kind},{}\n",
            value.map_or(String::new(), |v| v.to_string())
        ));
    }
    std::fs::write(&csv, table).map_err(|e| out(&csv, &e))?;
    Ok([json, csv])
}

/// The metrics as an aligned text table.
pub fn format_table(scores: &Scores) -> String {
    let mut s = String::new();
    for ((name, kind), value) in METRIC_NAMES.iter().zip(scores.values()) {
        let v = value.map_or("n/a".to_string(), |v| format!("{v:.4}"));
        s.push_str(&format!("  {name:<20} {v:>8}   {kind}\n"));
    }
    s
}
