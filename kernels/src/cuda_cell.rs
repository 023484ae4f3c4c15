//! One 64-bit value in device memory that kernels read instead of taking it as an argument: a
//! CUDA graph replays its ops with the arguments they were captured with, so what changes
//! between replays of a training step (the draws' step, the KL weight of a warm-up) must be
//! read from memory written before each launch.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaSlice, CudaStream};

use crate::cuda::{CudaError, Result, driver};

/// A device cell, made at first use, and the value it holds (written only when it changes).
#[derive(Debug)]
pub(crate) struct DeviceCell {
    /// What the cell holds, and its value as a person reads it, for errors.
    what: &'static str,
    show: fn(u64) -> String,
    cell: OnceLock<CudaSlice<u64>>,
    holds: Mutex<Option<u64>>,
}

impl DeviceCell {
    pub(crate) const fn new(what: &'static str, show: fn(u64) -> String) -> DeviceCell {
        DeviceCell {
            what,
            show,
            cell: OnceLock::new(),
            holds: Mutex::new(None),
        }
    }

    /// The cell, holding `value` for the ops queued after: written on `stream` (a memset of
    /// each 32-bit half that changed) when it held another value. A change inside a capture
    /// is an error: the graph would write it again at every replay.
    #[allow(unsafe_code)]
    pub(crate) fn holding(
        &self,
        stream: &Arc<CudaStream>,
        capturing: bool,
        value: u64,
    ) -> Result<&CudaSlice<u64>> {
        let cell = match self.cell.get() {
            Some(cell) => cell,
            None => {
                let made = stream.alloc_zeros::<u64>(1).map_err(driver(self.what))?;
                *self.holds.lock().unwrap_or_else(|p| p.into_inner()) = Some(0);
                // A racing call made another, holding 0 too; either serves.
                self.cell.get_or_init(|| made)
            }
        };
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        let before = holds.unwrap_or(!value);
        if before == value {
            return Ok(cell);
        }
        if capturing {
            return Err(CudaError::Capture(format!(
                "{} changed from {} to {} inside a capture",
                self.what,
                (self.show)(before),
                (self.show)(value)
            )));
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        let (ptr, _record) = cudarc::driver::DevicePtr::device_ptr(cell, stream);
        for (half, offset) in [(0, 0u64), (32, 4)] {
            let (old, new) = ((before >> half) as u32, (value >> half) as u32);
            if old != new {
                // SAFETY: one 4-byte word of the cell's 8 bytes, on `stream`.
                unsafe {
                    cudarc::driver::sys::cuMemsetD32Async(ptr + offset, new, 1, stream.cu_stream())
                }
                .result()
                .map_err(driver(self.what))?;
            }
        }
        *holds = Some(value);
        Ok(cell)
    }
}
