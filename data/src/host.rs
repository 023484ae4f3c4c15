//! Matrices that live outside the store: a Python session's scipy CSR matrix (in memory) or a
//! backed `.h5ad`'s (read through h5py), attached to an in-memory store (`memory://NAME/...`)
//! in place of a stored element, so the loader reads them where they are instead of from a
//! Zarr copy. The rest of the store (obs, var, obsmap) is written as usual.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{DataError, Result};
use crate::matrix::{Csr, validate_indptr};
use crate::store::{Location, Store};

/// The column indices and values of a CSR matrix, owned elsewhere and not changed while they
/// are attached (the owner guarantees it; the Python package marks in-memory arrays read-only).
pub trait HostArrays: Send + Sync {
    /// How many entries (nnz).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Column indices and values of entries `span` (within `len`), copied out.
    fn entries(&self, span: Range<usize>) -> std::result::Result<(Vec<i32>, Vec<f32>), String>;
    /// Whether the entries are in this process's memory: caching decoded rows would only copy
    /// them.
    fn in_memory(&self) -> bool;
}

/// A CSR matrix over [`HostArrays`]: row pointers (copied and validated, one per cell), the
/// owner's indices and values, and the column count. Entries are checked as they are read
/// (and all at once by `check_entries`).
#[derive(Clone)]
pub struct HostCsr {
    pub(crate) indptr: Arc<[i64]>,
    pub(crate) n_cols: u64,
    pub(crate) arrays: Arc<dyn HostArrays>,
}

impl std::fmt::Debug for HostCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostCsr({} x {}, {} stored)",
            self.n_rows(),
            self.n_cols,
            self.nnz()
        )
    }
}

/// Entries a check or a read takes at a time.
const CHECK_SPAN: usize = 1 << 20;

impl HostCsr {
    /// The row pointers checked as a stored matrix's are at open: from 0 to nnz, never
    /// decreasing. The error says what is wrong, without the element's name (the caller
    /// knows it).
    pub fn new(
        indptr: Vec<i64>,
        n_cols: u64,
        arrays: Arc<dyn HostArrays>,
    ) -> std::result::Result<HostCsr, String> {
        let rows = indptr.len().saturating_sub(1) as u64;
        validate_indptr(&indptr, rows, n_cols, arrays.len() as u64)?;
        Ok(HostCsr {
            indptr: indptr.into(),
            n_cols,
            arrays,
        })
    }

    /// Every entry checked now, a span at a time (`rows` checks what it reads): for a matrix
    /// in memory, whose errors are better raised before training than during it.
    pub fn check_entries(&self) -> std::result::Result<(), String> {
        let nnz = self.arrays.len();
        (0..nnz).step_by(CHECK_SPAN).try_for_each(|start| {
            let (indices, data) = self.arrays.entries(start..nnz.min(start + CHECK_SPAN))?;
            check(&indices, &data, self.n_cols)
        })
    }

    pub fn n_rows(&self) -> u64 {
        self.indptr.len().saturating_sub(1) as u64
    }

    pub fn nnz(&self) -> u64 {
        self.arrays.len() as u64
    }

    pub fn in_memory(&self) -> bool {
        self.arrays.in_memory()
    }

    /// Rows [a, b) (within the matrix: the caller checks), copied out, their entries checked.
    pub fn rows(&self, rows: Range<u64>) -> std::result::Result<Csr, String> {
        let pointers = &self.indptr[rows.start as usize..=rows.end as usize];
        let (start, end) = (pointers[0], pointers[pointers.len() - 1]);
        let (indices, data) = self.arrays.entries(start as usize..end as usize)?;
        if indices.len() as i64 != end - start || data.len() as i64 != end - start {
            return Err(format!(
                "entries {start}..{end} read as {} indices and {} values",
                indices.len(),
                data.len()
            ));
        }
        check(&indices, &data, self.n_cols)?;
        Ok(Csr {
            n_rows: pointers.len() - 1,
            n_cols: self.n_cols as usize,
            indptr: pointers.iter().map(|&p| (p - start) as u64).collect(),
            indices: indices.into_iter().map(|j| j as u32).collect(),
            data,
        })
    }
}

/// Column indices within 0..n_cols and finite values.
fn check(indices: &[i32], data: &[f32], n_cols: u64) -> std::result::Result<(), String> {
    if let Some(bad) = indices.iter().find(|&&j| j < 0 || j as u64 >= n_cols) {
        return Err(format!("column index {bad} outside 0..{n_cols} (n_vars)"));
    }
    if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
        return Err(format!("holds {bad} (expected finite counts)"));
    }
    Ok(())
}

/// Attached matrices by (memory store name, element path from the store's root).
type Attachments = HashMap<(String, String), HostCsr>;

fn attachments() -> &'static Mutex<Attachments> {
    static ATTACHED: OnceLock<Mutex<Attachments>> = OnceLock::new();
    ATTACHED.get_or_init(Default::default)
}

fn lock() -> std::sync::MutexGuard<'static, Attachments> {
    attachments()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The key of element `path` of the store at `location`, which must be in memory.
fn key(location: &Location, path: &str) -> Option<(String, String)> {
    match location {
        Location::Memory { name, prefix } => {
            let full = [prefix.as_str(), path]
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("/");
            Some((name.clone(), full))
        }
        _ => None,
    }
}

/// Attaches `matrix` as the element `path` ("X", "mod/rna/X") of the in-memory store at
/// `location`: opening that element reads `matrix` until the store is forgotten
/// (`forget_memory_store`). Other locations are refused: a file store must hold its data.
pub fn attach_csr(location: &str, path: &str, matrix: HostCsr) -> Result<()> {
    let parsed = Location::parse(location)?;
    let Some(key) = key(&parsed, path) else {
        return Err(DataError::Location {
            location: location.into(),
            reason: "matrices are attached only to memory:// stores".into(),
        });
    };
    lock().insert(key, matrix);
    Ok(())
}

/// The matrix attached as element `path` of `store`, if any.
pub(crate) fn attached(store: &Store, path: &str) -> Option<HostCsr> {
    let key = key(&store.location, path)?;
    lock().get(&key).cloned()
}

impl Store {
    /// Whether a matrix is attached as element `path` of this (in-memory) store.
    pub(crate) fn has_attached(&self, path: &str) -> bool {
        attached(self, path).is_some()
    }
}

/// Drops every matrix attached to the in-memory store `name` (its owner's arrays are freed).
pub(crate) fn detach_all(name: &str) {
    lock().retain(|(store, _), _| store != name);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Owned(Vec<i32>, Vec<f32>);

    impl HostArrays for Owned {
        fn len(&self) -> usize {
            self.1.len()
        }
        fn entries(&self, span: Range<usize>) -> Result<(Vec<i32>, Vec<f32>), String> {
            // What is there (a short array gives short entries, as a faulty reader could).
            let take = |v: &[i32]| {
                v.iter()
                    .skip(span.start)
                    .take(span.len())
                    .copied()
                    .collect()
            };
            let values = self.1.iter().skip(span.start).take(span.len()).copied();
            Ok((take(&self.0), values.collect()))
        }
        fn in_memory(&self) -> bool {
            true
        }
    }

    fn host(
        indptr: Vec<i64>,
        n_cols: u64,
        indices: Vec<i32>,
        data: Vec<f32>,
    ) -> Result<HostCsr, String> {
        let m = HostCsr::new(indptr, n_cols, Arc::new(Owned(indices, data)))?;
        m.check_entries()?;
        Ok(m)
    }

    #[test]
    fn malformed_matrices_are_refused_with_the_reason() {
        let m = host(vec![0, 1, 1, 3], 3, vec![0, 1, 2], vec![1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            m.rows(0..3).unwrap(),
            Csr::from_dense(3, 3, &[1., 0., 0., 0., 0., 0., 0., 2., 3.])
        );
        assert_eq!(
            m.rows(1..3).unwrap(),
            Csr::from_dense(2, 3, &[0., 0., 0., 0., 2., 3.])
        );
        let cases = [
            (
                host(vec![0, 2, 1], 3, vec![0, 1], vec![1.0, 2.0]),
                "not monotone",
            ),
            (
                host(vec![0, 1, 2], 1, vec![0, 1], vec![1.0, 2.0]),
                "column index 1 outside 0..1",
            ),
            (
                host(vec![0, 1, 2], 3, vec![0, -1], vec![1.0, 2.0]),
                "column index -1",
            ),
            (host(vec![0, 1], 3, vec![0, 1], vec![1.0, 2.0]), "nnz = 2"),
            (
                host(vec![0, 1, 2], 3, vec![0, 1], vec![1.0, f32::NAN]),
                "finite",
            ),
            (host(vec![], 3, vec![], vec![]), "indptr has 0 entries"),
        ];
        for (result, expected) in cases {
            let err = result.unwrap_err();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
        // Unchecked at attach time (a backed file), a bad entry is found when its row is read.
        let lazy = HostCsr::new(
            vec![0, 1, 2],
            3,
            Arc::new(Owned(vec![0, 7], vec![1.0, 2.0])),
        );
        let lazy = lazy.unwrap();
        assert!(lazy.rows(0..1).is_ok());
        assert!(lazy.rows(1..2).unwrap_err().contains("column index 7"));
        // A reader returning the wrong number of entries is an error, not a short row.
        let short = HostCsr::new(vec![0, 2], 3, Arc::new(Owned(vec![0], vec![1.0, 2.0])));
        assert!(short.unwrap().rows(0..1).is_err());
    }

    #[test]
    fn only_memory_stores_take_attachments_and_forgetting_drops_them() {
        let m = host(vec![0, 1], 2, vec![1], vec![3.0]).unwrap();
        let err = attach_csr("/tmp/somewhere.zarr", "X", m.clone()).unwrap_err();
        assert!(err.to_string().contains("only to memory://"), "{err}");
        attach_csr("memory://host-test/a.zarr", "X", m).unwrap();
        let store = Store::connect("memory://host-test/a.zarr").unwrap();
        assert_eq!(attached(&store, "X").unwrap().nnz(), 1);
        assert!(attached(&store, "mod/rna/X").is_none());
        crate::store::forget_memory_store("host-test");
        assert!(attached(&store, "X").is_none());
    }
}
