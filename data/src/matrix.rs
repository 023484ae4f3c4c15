//! Count matrices (X, layers, raw/X) as AnnData stores them: `csr_matrix`, `csc_matrix` or a
//! dense `array`. Opening validates the structure once (indptr monotone, starts at 0, ends at
//! nnz; shapes); reading a row range of CSR touches only the chunks that hold those rows. A CSR
//! matrix attached to an in-memory store (`host`) is read in place instead.

use std::ops::Range;
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::host::{HostCsr, attached};
use crate::store::{Store, ZarrVersion};
use zarrs::array::ArrayShardedExt;

use crate::zarr::{NodeKind, ZArray, dtype_name, encoding_type, read_i64, read_rows};

/// Rows of a sparse matrix in CSR form, rows rebased to 0.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Csr {
    pub n_rows: usize,
    pub n_cols: usize,
    pub indptr: Vec<u64>,
    pub indices: Vec<u32>,
    pub data: Vec<f32>,
}

impl Csr {
    /// No rows yet, room for `rows` rows and `nnz` entries ([`Csr::append_rows`] fills it).
    pub fn with_capacity(n_cols: usize, rows: u64, nnz: usize) -> Csr {
        let mut indptr = Vec::with_capacity(usize::try_from(rows).unwrap_or(0).saturating_add(1));
        indptr.push(0);
        Csr {
            n_rows: 0,
            n_cols,
            indptr,
            indices: Vec::with_capacity(nnz),
            data: Vec::with_capacity(nnz),
        }
    }

    pub fn nnz(&self) -> usize {
        self.data.len()
    }

    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (s, e) = (self.indptr[i] as usize, self.indptr[i + 1] as usize);
        (&self.indices[s..e], &self.data[s..e])
    }

    /// Appends `other`'s rows (same columns).
    pub fn append_rows(&mut self, other: &Csr) {
        debug_assert_eq!(self.n_cols, other.n_cols);
        let base = self.indptr.last().copied().unwrap_or(0);
        if self.indptr.is_empty() {
            self.indptr.push(0);
        }
        self.indptr.extend(
            other
                .indptr
                .iter()
                .skip(1)
                .map(|&p| base + p - other.indptr[0]),
        );
        let span = other.indptr[0] as usize..other.indptr.last().copied().unwrap_or(0) as usize;
        self.indices.extend_from_slice(&other.indices[span.clone()]);
        self.data.extend_from_slice(&other.data[span]);
        self.n_rows += other.n_rows;
    }

    /// Sum of each row (the library size for counts).
    pub fn row_sums(&self) -> Vec<f32> {
        (0..self.n_rows)
            .map(|i| self.row(i).1.iter().sum())
            .collect()
    }

    /// The rows at `rows`, in that order.
    pub fn select_rows(&self, rows: &[usize]) -> Csr {
        let mut out = Csr {
            n_rows: rows.len(),
            n_cols: self.n_cols,
            indptr: Vec::with_capacity(rows.len() + 1),
            ..Default::default()
        };
        out.indptr.push(0);
        for &r in rows {
            let (idx, val) = self.row(r);
            out.indices.extend_from_slice(idx);
            out.data.extend_from_slice(val);
            out.indptr.push(out.data.len() as u64);
        }
        out
    }

    /// Builds CSR from dense row-major values, keeping non-zeros.
    pub fn from_dense(n_rows: usize, n_cols: usize, values: &[f32]) -> Csr {
        let mut out = Csr {
            n_rows,
            n_cols,
            indptr: Vec::with_capacity(n_rows + 1),
            ..Default::default()
        };
        out.indptr.push(0);
        for row in values.chunks(n_cols.max(1)).take(n_rows) {
            for (j, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    out.indices.push(j as u32);
                    out.data.push(v);
                }
            }
            out.indptr.push(out.data.len() as u64);
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatrixFormat {
    Csr,
    Csc,
    Dense,
}

/// An opened, validated matrix element.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub path: String,
    pub format: MatrixFormat,
    pub shape: (u64, u64),
    pub dtype: String,
    pub nnz: u64,
    /// Chunk shape of the values array (`data` for sparse, the array itself for dense).
    pub chunk_shape: Vec<u64>,
    /// Inner chunk shape when the values array is sharded (Zarr v3 sharding codec).
    pub inner_chunk_shape: Option<Vec<u64>>,
    /// The compressed pointer array (rows for CSR, columns for CSC), validated.
    indptr: Arc<[i64]>,
    source: Source,
}

/// Where a matrix's entries are read from.
#[derive(Debug, Clone)]
enum Source {
    /// Stored arrays: the values (`data`, or the dense array) and, when sparse, `indices`.
    Stored {
        values: Handle,
        indices: Option<Handle>,
    },
    /// A CSR matrix attached to an in-memory store (`host::attach_csr`), read in place.
    Host(HostCsr),
}

/// An opened zarrs array shared between clones of a [`Matrix`].
#[derive(Clone)]
struct Handle(std::sync::Arc<ZArray>);

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "array{:?}", self.0.shape())
    }
}

impl std::ops::Deref for Handle {
    type Target = ZArray;
    fn deref(&self) -> &ZArray {
        &self.0
    }
}

impl Matrix {
    /// Opens the matrix at `path`, whose shape must be `expected` (obs x var): checked from
    /// the metadata before anything sized by it is read.
    pub(crate) fn open(
        store: &Store,
        version: ZarrVersion,
        path: &str,
        expected: (u64, u64),
    ) -> Result<Matrix> {
        let at = store.at(path);
        let check_shape = |shape: (u64, u64)| {
            if shape == expected {
                Ok(())
            } else {
                Err(at.invalid(format!(
                    "shape {shape:?} does not match obs x var = {expected:?}"
                )))
            }
        };
        if let Some(host) = attached(store, path) {
            check_shape((host.n_rows(), host.n_cols))?;
            return Ok(Matrix::host(path, host));
        }
        let Some((kind, attrs)) = store.node(version, path)? else {
            return Err(at.missing("matrix"));
        };
        let encoding = encoding_type(&attrs).unwrap_or("<none>");
        match (kind, encoding) {
            (NodeKind::Array, "array") => {
                let values = store.array(path)?;
                let shape = match values.shape() {
                    &[r, c] => (r, c),
                    other => {
                        return Err(at.invalid(format!(
                            "dense matrix has shape {other:?}, expected 2 dimensions"
                        )));
                    }
                };
                check_shape(shape)?;
                check_numeric(store, path, &values)?;
                let (chunk_shape, inner_chunk_shape) = chunking(&values);
                Ok(Matrix {
                    path: path.into(),
                    format: MatrixFormat::Dense,
                    shape,
                    dtype: dtype_name(&values),
                    nnz: shape.0 * shape.1,
                    chunk_shape,
                    inner_chunk_shape,
                    indptr: Arc::new([]),
                    source: Source::Stored {
                        values: Handle(values.into()),
                        indices: None,
                    },
                })
            }
            (NodeKind::Group, "csr_matrix" | "csc_matrix") => {
                let format = if encoding == "csr_matrix" {
                    MatrixFormat::Csr
                } else {
                    MatrixFormat::Csc
                };
                let shape = match attrs
                    .get("shape")
                    .and_then(Value::as_array)
                    .map(|s| s.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
                {
                    Some(Some(s)) if s.len() == 2 => (s[0], s[1]),
                    _ => {
                        return Err(at.invalid(
                            "attribute 'shape' missing or not two non-negative integers",
                        ));
                    }
                };
                check_shape(shape)?;
                let data_path = format!("{path}/data");
                let indices_path = format!("{path}/indices");
                let indptr_path = format!("{path}/indptr");
                let values = store.array(&data_path)?;
                let indices = store.array(&indices_path)?;
                check_numeric(store, &data_path, &values)?;
                store.check_chunks_stored(&data_path, &values)?;
                store.check_chunks_stored(&indices_path, &indices)?;
                let nnz = values.shape().first().copied().unwrap_or(0);
                if indices.shape() != [nnz] {
                    return Err(store.at(&indices_path).invalid(format!(
                        "indices has shape {:?}, expected [{nnz}] like data",
                        indices.shape()
                    )));
                }
                let (major, minor) = if format == MatrixFormat::Csr {
                    shape
                } else {
                    (shape.1, shape.0)
                };
                let declared = store.array(&indptr_path)?.shape().to_vec();
                if declared != [major + 1] {
                    return Err(store.at(&indptr_path).invalid(format!(
                        "indptr has shape {declared:?}, expected [{}] (one more than the {major} rows/columns)",
                        major + 1
                    )));
                }
                let indptr = read_i64(store, &indptr_path)?;
                validate_indptr(&indptr, major, minor, nnz)
                    .map_err(|p| store.at(&indptr_path).invalid(p))?;
                let idx_dtype = dtype_name(&indices);
                if !idx_dtype.contains("int") {
                    return Err(store.at(&indices_path).dtype(idx_dtype, "an integer type"));
                }
                let (chunk_shape, inner_chunk_shape) = chunking(&values);
                Ok(Matrix {
                    path: path.into(),
                    format,
                    shape,
                    dtype: dtype_name(&values),
                    nnz,
                    chunk_shape,
                    inner_chunk_shape,
                    indptr: indptr.into(),
                    source: Source::Stored {
                        values: Handle(values.into()),
                        indices: Some(Handle(indices.into())),
                    },
                })
            }
            (_, found) => Err(at.encoding(found, "'csr_matrix', 'csc_matrix' (groups) or 'array'")),
        }
    }

    /// An attached in-memory CSR matrix as an element: one "chunk" per row, since any row
    /// range is read without waste.
    fn host(path: &str, host: HostCsr) -> Matrix {
        Matrix {
            path: path.into(),
            format: MatrixFormat::Csr,
            shape: (host.n_rows(), host.n_cols),
            dtype: "float32".into(),
            nnz: host.nnz(),
            chunk_shape: vec![1],
            inner_chunk_shape: None,
            indptr: host.indptr.clone(),
            source: Source::Host(host),
        }
    }

    /// Whether the entries are in this process's memory already (an attached in-memory
    /// matrix), so caching decoded rows would only copy them.
    pub fn in_memory(&self) -> bool {
        matches!(&self.source, Source::Host(host) if host.in_memory())
    }

    pub fn n_rows(&self) -> u64 {
        self.shape.0
    }

    /// Non-zeros in rows `rows` (clamped to the matrix): exact from the row pointers of CSR,
    /// pro rata of the whole for other formats.
    pub fn nnz_in(&self, rows: Range<u64>) -> u64 {
        let (start, end) = (rows.start.min(self.shape.0), rows.end.min(self.shape.0));
        match self.format {
            MatrixFormat::Csr => (self.indptr[end as usize] - self.indptr[start as usize]) as u64,
            _ => self.nnz * end.saturating_sub(start) / self.shape.0.max(1),
        }
    }

    /// Non-zeros in each row, from the row pointers (CSR) or the chunk reads (others).
    pub fn row_nnz(&self, store: &Store) -> Result<Vec<u64>> {
        match self.format {
            MatrixFormat::Csr => Ok(self
                .indptr
                .windows(2)
                .map(|w| (w[1] - w[0]) as u64)
                .collect()),
            _ => {
                let all = self.read_rows(store, 0..self.shape.0)?;
                Ok(all.indptr.windows(2).map(|w| w[1] - w[0]).collect())
            }
        }
    }

    /// Reads rows [a, b) as CSR. For CSR only the chunks of `data`/`indices` holding those rows
    /// are fetched (both arrays concurrently, chunks decoded in parallel by zarrs/rayon). CSC must
    /// be read whole to select rows: convert such stores for streaming.
    pub fn read_rows(&self, store: &Store, rows: Range<u64>) -> Result<Csr> {
        let at = store.at(&self.path);
        if rows.end > self.shape.0 || rows.start > rows.end {
            return Err(at.invalid(format!(
                "rows {}..{} requested, matrix has {}",
                rows.start, rows.end, self.shape.0
            )));
        }
        let n_rows = (rows.end - rows.start) as usize;
        let n_cols = self.shape.1 as usize;
        let values = match &self.source {
            Source::Host(host) => return host.rows(rows).map_err(|problem| at.read(problem)),
            Source::Stored { values, .. } => values,
        };
        match self.format {
            MatrixFormat::Dense => {
                let values = read_rows(store, &self.path, values, rows)?
                    .into_f32()
                    .map_err(|t| at.dtype(t, "numeric"))?;
                Ok(Csr::from_dense(n_rows, n_cols, &values))
            }
            MatrixFormat::Csr => {
                let start = self.indptr[rows.start as usize];
                let end = self.indptr[rows.end as usize];
                let span = start as u64..end as u64;
                let (data, indices) = self.read_entries(store, span, self.shape.1)?;
                let indptr = self.indptr[rows.start as usize..=rows.end as usize]
                    .iter()
                    .map(|&p| (p - start) as u64)
                    .collect();
                let mut csr = Csr {
                    n_rows,
                    n_cols,
                    indptr,
                    indices,
                    data,
                };
                sort_rows(&mut csr).map_err(|(row, col)| {
                    store.at(&format!("{}/indices", self.path)).invalid(format!(
                        "row {} holds column {col} twice (a CSR row names each column once)",
                        rows.start + row as u64
                    ))
                })?;
                Ok(csr)
            }
            MatrixFormat::Csc => {
                let (data, indices) = self.read_entries(store, 0..self.nnz, self.shape.0)?;
                Ok(csc_rows_to_csr(&self.indptr, &indices, &data, rows, n_cols))
            }
        }
    }

    /// Reads entries `span` of data and indices (concurrently), with every index checked
    /// against `bound` (columns for CSR, rows for CSC).
    fn read_entries(
        &self,
        store: &Store,
        span: Range<u64>,
        bound: u64,
    ) -> Result<(Vec<f32>, Vec<u32>)> {
        let data_path = format!("{}/data", self.path);
        let indices_path = format!("{}/indices", self.path);
        let Source::Stored {
            values,
            indices: Some(indices),
        } = &self.source
        else {
            return Ok((Vec::new(), Vec::new()));
        };
        let (data, idx) = rayon::join(
            || read_rows(store, &data_path, values, span.clone()),
            || read_rows(store, &indices_path, indices, span.clone()),
        );
        let data = data?
            .into_f32()
            .map_err(|t| store.at(&data_path).dtype(t, "numeric"))?;
        let idx = idx?
            .into_indices(bound)
            .map_err(|problem| store.at(&indices_path).invalid(problem))?;
        Ok((data, idx))
    }
}

/// Puts each row's columns in increasing order (scipy leaves them unsorted after some
/// operations, and anndata writes them so); a column named twice in a row is the error
/// (row, column), since summing or dropping either would change the data silently.
fn sort_rows(csr: &mut Csr) -> std::result::Result<(), (usize, u32)> {
    for r in 0..csr.n_rows {
        let span = csr.indptr[r] as usize..csr.indptr[r + 1] as usize;
        let indices = &csr.indices[span.clone()];
        if indices.windows(2).all(|w| w[0] < w[1]) {
            continue;
        }
        let mut pairs: Vec<(u32, f32)> = indices
            .iter()
            .copied()
            .zip(csr.data[span.clone()].iter().copied())
            .collect();
        pairs.sort_unstable_by_key(|&(c, _)| c);
        if let Some(w) = pairs.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err((r, w[0].0));
        }
        for (k, (c, v)) in span.zip(pairs) {
            csr.indices[k] = c;
            csr.data[k] = v;
        }
    }
    Ok(())
}

fn check_numeric(store: &Store, path: &str, array: &ZArray) -> Result<()> {
    let name = dtype_name(array);
    if ["int", "float", "bool"].iter().any(|t| name.contains(t)) {
        Ok(())
    } else {
        Err(store.at(path).dtype(name, "a numeric type"))
    }
}

/// Outer chunk shape, and the inner (sub)chunk shape when the array is sharded.
fn chunking(array: &ZArray) -> (Vec<u64>, Option<Vec<u64>>) {
    let outer = array
        .chunk_shape(&vec![0; array.dimensionality()])
        .map(|s| s.iter().map(|n| n.get()).collect())
        .unwrap_or_default();
    let inner = array
        .subchunk_shape()
        .map(|s| s.iter().map(|n| n.get()).collect());
    (outer, inner)
}

/// Row pointers (column pointers of CSC) over `major` rows: from 0 to `nnz`, never
/// decreasing, no row holding more entries than the `minor` columns (a longer one repeats a
/// column, and would size reads beyond the matrix).
pub(crate) fn validate_indptr(
    indptr: &[i64],
    major: u64,
    minor: u64,
    nnz: u64,
) -> std::result::Result<(), String> {
    if indptr.len() as u64 != major + 1 {
        return Err(format!(
            "indptr has {} entries, expected {} (one more than the {major} rows/columns)",
            indptr.len(),
            major + 1
        ));
    }
    if indptr.first().copied() != Some(0) {
        return Err(format!("indptr starts at {:?}, expected 0", indptr.first()));
    }
    if let Some(i) = indptr.windows(2).position(|w| w[1] < w[0]) {
        return Err(format!(
            "indptr is not monotone: entry {} is {} after {}",
            i + 1,
            indptr[i + 1],
            indptr[i]
        ));
    }
    if let Some(i) = indptr.windows(2).position(|w| (w[1] - w[0]) as u64 > minor) {
        return Err(format!(
            "row {i} holds {} entries, more than the {minor} columns",
            indptr[i + 1] - indptr[i]
        ));
    }
    let last = indptr.last().copied().unwrap_or(0);
    if last as u64 != nnz {
        return Err(format!(
            "indptr ends at {last}, expected nnz = {nnz} (the length of data)"
        ));
    }
    Ok(())
}

/// Selects rows [a, b) of a CSC matrix into CSR (counting sort by row).
fn csc_rows_to_csr(
    indptr: &[i64],
    indices: &[u32],
    data: &[f32],
    rows: Range<u64>,
    n_cols: usize,
) -> Csr {
    let n_rows = (rows.end - rows.start) as usize;
    let (a, b) = (rows.start as u32, rows.end as u32);
    let mut counts = vec![0u64; n_rows + 1];
    for &r in indices {
        if (a..b).contains(&r) {
            counts[(r - a) as usize + 1] += 1;
        }
    }
    for i in 0..n_rows {
        counts[i + 1] += counts[i];
    }
    let nnz = counts[n_rows] as usize;
    let mut out_idx = vec![0u32; nnz];
    let mut out_data = vec![0f32; nnz];
    let mut next = counts.clone();
    for col in 0..n_cols {
        for k in indptr[col] as usize..indptr[col + 1] as usize {
            let r = indices[k];
            if (a..b).contains(&r) {
                let slot = &mut next[(r - a) as usize];
                out_idx[*slot as usize] = col as u32;
                out_data[*slot as usize] = data[k];
                *slot += 1;
            }
        }
    }
    Csr {
        n_rows,
        n_cols,
        indptr: counts,
        indices: out_idx,
        data: out_data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_appended_to_a_sized_matrix_are_the_rows_joined() {
        // Two row ranges read from a larger matrix: their row pointers do not start at 0.
        let first = Csr {
            n_rows: 2,
            n_cols: 4,
            indptr: vec![3, 4, 6],
            indices: vec![9, 9, 9, 1, 0, 3],
            data: vec![0.0, 0.0, 0.0, 5.0, 1.0, 2.0],
        };
        let second = Csr {
            n_rows: 1,
            n_cols: 4,
            indptr: vec![0, 2],
            indices: vec![2, 3],
            data: vec![7.0, 8.0],
        };
        let mut joined = Csr::with_capacity(4, 3, 5);
        joined.append_rows(&first);
        joined.append_rows(&second);
        assert_eq!(
            joined,
            Csr {
                n_rows: 3,
                n_cols: 4,
                indptr: vec![0, 1, 3, 5],
                indices: vec![1, 0, 3, 2, 3],
                data: vec![5.0, 1.0, 2.0, 7.0, 8.0],
            }
        );
        assert!(joined.data.capacity() == 5 && joined.indptr.capacity() == 4);
    }

    #[test]
    fn indptr_validation_names_the_problem() {
        assert!(validate_indptr(&[0, 1, 3], 2, 3, 3).is_ok());
        assert!(
            validate_indptr(&[0, 1], 2, 3, 1)
                .unwrap_err()
                .contains("expected 3")
        );
        assert!(
            validate_indptr(&[1, 1, 3], 2, 3, 3)
                .unwrap_err()
                .contains("expected 0")
        );
        assert!(
            validate_indptr(&[0, 2, 1], 2, 3, 1)
                .unwrap_err()
                .contains("not monotone")
        );
        assert!(
            validate_indptr(&[0, 1, 2], 2, 3, 5)
                .unwrap_err()
                .contains("nnz = 5")
        );
    }

    #[test]
    fn csc_rows_match_dense() {
        // [[1 0 2], [0 3 0], [4 0 5]] in CSC
        let indptr = [0i64, 2, 3, 5];
        let indices = [0u32, 2, 1, 0, 2];
        let data = [1.0f32, 4.0, 3.0, 2.0, 5.0];
        let csr = csc_rows_to_csr(&indptr, &indices, &data, 1..3, 3);
        assert_eq!(csr, Csr::from_dense(2, 3, &[0.0, 3.0, 0.0, 4.0, 0.0, 5.0]));
    }

    #[test]
    fn select_rows_and_sums() {
        let m = Csr::from_dense(3, 2, &[1.0, 0.0, 0.0, 0.0, 2.0, 3.0]);
        assert_eq!(m.row_sums(), vec![1.0, 0.0, 5.0]);
        let s = m.select_rows(&[2, 0]);
        assert_eq!(s, Csr::from_dense(2, 2, &[2.0, 3.0, 1.0, 0.0]));
    }
}
