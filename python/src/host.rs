//! Count matrices the engine's threads read where they are, attached to a `memory://` store
//! instead of copied into it: an in-memory AnnData's numpy arrays (`NumpyArrays`, read in
//! place) and a backed `.h5ad`'s (`PyReader`, entries read through a Python callable).
#![allow(unsafe_code)] // slices over numpy buffers: kept alive by their references, read-only

use std::ops::Range;

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use tessera_data::HostArrays;

/// A numpy array pair (column indices, values) read in place from other threads: the
/// references keep the buffers alive.
pub(crate) struct NumpyArrays {
    _owners: (Py<PyArray1<i32>>, Py<PyArray1<f32>>),
    indices: (*const i32, usize),
    data: (*const f32, usize),
}

// SAFETY: the pointers are into the buffers of the two arrays held in `_owners`; numpy neither
// moves nor frees a buffer while a reference is held (`resize` refuses), and nothing writes
// them while they are shared: attached arrays must be read-only (`CsrArgs::attach`), and the
// copies made by `to_csr` finish before the call returns to Python.
unsafe impl Send for NumpyArrays {}
unsafe impl Sync for NumpyArrays {}

impl NumpyArrays {
    pub(crate) fn new(
        indices: &PyReadonlyArray1<'_, i32>,
        data: &PyReadonlyArray1<'_, f32>,
    ) -> Result<NumpyArrays, String> {
        let index_slice = indices.as_slice().map_err(|e| e.to_string())?;
        let data_slice = data.as_slice().map_err(|e| e.to_string())?;
        if index_slice.len() != data_slice.len() {
            return Err(format!(
                "{} column indices for {} values (expected as many)",
                index_slice.len(),
                data_slice.len()
            ));
        }
        Ok(NumpyArrays {
            indices: (index_slice.as_ptr(), index_slice.len()),
            data: (data_slice.as_ptr(), data_slice.len()),
            _owners: (
                indices.as_unbound().clone_ref(indices.py()),
                data.as_unbound().clone_ref(data.py()),
            ),
        })
    }

    fn indices(&self) -> &[i32] {
        // SAFETY: see `NumpyArrays`; the pointer and length came from a slice of the array.
        unsafe { std::slice::from_raw_parts(self.indices.0, self.indices.1) }
    }

    fn data(&self) -> &[f32] {
        // SAFETY: as `indices`.
        unsafe { std::slice::from_raw_parts(self.data.0, self.data.1) }
    }
}

impl HostArrays for NumpyArrays {
    fn len(&self) -> usize {
        self.data.1
    }

    fn entries(&self, span: Range<usize>) -> Result<(Vec<i32>, Vec<f32>), String> {
        let (indices, data) = (self.indices(), self.data());
        match (indices.get(span.clone()), data.get(span.clone())) {
            (Some(i), Some(d)) => Ok((i.to_vec(), d.to_vec())),
            _ => Err(format!(
                "entries {span:?} outside the {} stored",
                data.len()
            )),
        }
    }

    fn in_memory(&self) -> bool {
        true
    }
}

/// Entries read by a Python callable `read(start, stop) -> (indices int32, data float32)`, e.g.
/// slices of a backed `.h5ad`'s h5py datasets. Reading takes the GIL: the thread that
/// started training has released it.
pub(crate) struct PyReader {
    read: Py<PyAny>,
    nnz: usize,
}

impl PyReader {
    pub(crate) fn new(read: Bound<'_, PyAny>, nnz: usize) -> PyReader {
        PyReader {
            read: read.unbind(),
            nnz,
        }
    }
}

impl HostArrays for PyReader {
    fn len(&self) -> usize {
        self.nnz
    }

    fn entries(&self, span: Range<usize>) -> Result<(Vec<i32>, Vec<f32>), String> {
        Python::attach(|py| {
            let read = self.read.bind(py).call1((span.start, span.end))?;
            let (indices, data): (PyReadonlyArray1<'_, i32>, PyReadonlyArray1<'_, f32>) =
                read.extract()?;
            Ok::<_, PyErr>((indices.as_slice()?.to_vec(), data.as_slice()?.to_vec()))
        })
        .map_err(|e| format!("reading entries {span:?}: {e}"))
    }

    fn in_memory(&self) -> bool {
        false
    }
}
