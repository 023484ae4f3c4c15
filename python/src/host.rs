//! numpy arrays read in place by the engine's threads (the scipy matrix of an in-memory
//! AnnData attached to a `memory://` store instead of copied into it).
#![allow(unsafe_code)] // slices over numpy buffers: kept alive by their references, read-only

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
        Ok(NumpyArrays {
            indices: (index_slice.as_ptr(), index_slice.len()),
            data: (data_slice.as_ptr(), data_slice.len()),
            _owners: (
                indices.as_unbound().clone_ref(indices.py()),
                data.as_unbound().clone_ref(data.py()),
            ),
        })
    }
}

impl HostArrays for NumpyArrays {
    fn indices(&self) -> &[i32] {
        // SAFETY: see `NumpyArrays`; the pointer and length came from a slice of the array.
        unsafe { std::slice::from_raw_parts(self.indices.0, self.indices.1) }
    }
    fn data(&self) -> &[f32] {
        // SAFETY: as `indices`.
        unsafe { std::slice::from_raw_parts(self.data.0, self.data.1) }
    }
}
