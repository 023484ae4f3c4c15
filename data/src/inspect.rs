//! What a store holds, for `tessera inspect`: read from metadata, indices and obs columns;
//! matrices are not decoded (nnz comes from indptr or the shape).

use serde::Serialize;

use crate::anndata::{AnnData, Dataset};
use crate::dataframe::{Column, DataFrame};
use crate::error::Result;
use crate::matrix::{Matrix, MatrixFormat};

#[derive(Debug, Clone, Serialize)]
pub struct StoreSummary {
    pub location: String,
    pub kind: &'static str,
    pub zarr_format: u8,
    pub n_obs: u64,
    pub modalities: Vec<ModalitySummary>,
    /// MuData's global `obsm` keys (an AnnData's are in its modality).
    pub global_obsm: Vec<String>,
    pub obs: Vec<ColumnSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModalitySummary {
    pub name: String,
    /// Group path in the store ("" for an AnnData root).
    pub path: String,
    pub n_obs: u64,
    pub n_vars: u64,
    pub matrices: Vec<MatrixSummary>,
    pub obsm: Vec<ObsmSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MatrixSummary {
    pub element: String,
    pub format: MatrixFormat,
    pub dtype: String,
    pub shape: (u64, u64),
    pub nnz: u64,
    pub density: f64,
    /// The unit of reading: inner chunk of a sharded array, else the chunk.
    pub chunks: Vec<u64>,
    /// The stored object (shard) shape when sharded.
    pub shards: Option<Vec<u64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ObsmSummary {
    pub key: String,
    pub columns: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ColumnSummary {
    pub name: String,
    pub kind: &'static str,
    pub missing: usize,
    /// Category (or distinct value) counts; None for numeric columns.
    pub counts: Option<Vec<(String, usize)>>,
}

fn matrix_summary(element: &str, m: &Matrix) -> MatrixSummary {
    let cells = (m.shape.0 * m.shape.1).max(1) as f64;
    let (chunks, shards) = match &m.inner_chunk_shape {
        Some(inner) => (inner.clone(), Some(m.chunk_shape.clone())),
        None => (m.chunk_shape.clone(), None),
    };
    let nnz = m.nnz;
    MatrixSummary {
        element: element.into(),
        format: m.format,
        dtype: m.dtype.clone(),
        shape: m.shape,
        nnz,
        density: nnz as f64 / cells,
        chunks,
        shards,
    }
}

fn modality_summary(name: &str, a: &AnnData) -> Result<ModalitySummary> {
    let mut matrices = Vec::new();
    if let Ok(x) = a.x() {
        matrices.push(matrix_summary("X", &x));
    }
    for layer in a.keys("layers")? {
        matrices.push(matrix_summary(
            &format!("layers/{layer}"),
            &a.layer(&layer)?,
        ));
    }
    if let Some((raw, _)) = a.raw_x()? {
        matrices.push(matrix_summary("raw/X", &raw));
    }
    let mut obsm = Vec::new();
    for key in a.keys("obsm")? {
        // Non-dense obsm entries (dataframes, sparse) are listed with 0 columns.
        let columns = a.obsm_shape(&key)?.map(|(_, c)| c).unwrap_or(0);
        obsm.push(ObsmSummary { key, columns });
    }
    Ok(ModalitySummary {
        name: name.into(),
        path: a.path.clone(),
        n_obs: a.n_obs(),
        n_vars: a.n_vars(),
        matrices,
        obsm,
    })
}

fn columns(df: &DataFrame) -> Vec<ColumnSummary> {
    df.columns
        .iter()
        .map(|(name, c): &(String, Column)| ColumnSummary {
            name: name.clone(),
            kind: c.kind(),
            missing: c.missing(),
            counts: c.value_counts(),
        })
        .collect()
}

/// Summarises the store at `location`.
pub fn inspect(location: &str) -> Result<StoreSummary> {
    let dataset = Dataset::open(location)?;
    let (kind, version, modalities, global_obsm, obs) = match &dataset {
        Dataset::AnnData(a) => (
            "AnnData",
            a.version,
            vec![modality_summary("X", a)?],
            Vec::new(),
            columns(&a.obs()?),
        ),
        Dataset::MuData(m) => {
            let modalities = m
                .modalities
                .iter()
                .map(|(n, a)| modality_summary(n, a))
                .collect::<Result<_>>()?;
            let obs = crate::dataframe::read_dataframe(&m.store, m.version, "obs")?;
            let obsm = if m.store.node(m.version, "obsm")?.is_some() {
                m.store.children("obsm")?
            } else {
                Vec::new()
            };
            ("MuData", m.version, modalities, obsm, columns(&obs))
        }
    };
    Ok(StoreSummary {
        location: location.into(),
        kind,
        zarr_format: version.number(),
        n_obs: dataset.n_obs(),
        modalities,
        global_obsm,
        obs,
    })
}
