//! GPU entry points of the row softmax (kernels in `norm.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::CUDA_SOURCE;
use crate::cuda::{CudaError, Gpu, Result, grid};

fn failed(kernel: &str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver { context: kernel.into(), reason: e.to_string() }
}

pub fn softmax_forward(gpu: &Gpu, x: &CudaSlice<f32>, features: usize, y: &mut CudaSlice<f32>) -> Result<()> {
    assert!(features > 0 && x.len() == y.len() && x.len().is_multiple_of(features), "softmax: shapes");
    let f = gpu.function("norm", CUDA_SOURCE, "softmax_forward")?;
    let (rows, features64) = ((x.len() / features) as u64, features as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&rows).arg(&features64);
    // SAFETY: one thread per row; x and y hold rows*features floats.
    unsafe { b.launch(grid(rows as usize)) }.map(|_| ()).map_err(failed("softmax_forward"))
}

pub fn softmax_backward(gpu: &Gpu, y: &CudaSlice<f32>, dy: &CudaSlice<f32>, features: usize, dx: &mut CudaSlice<f32>) -> Result<()> {
    assert!(y.len() == dy.len() && dy.len() == dx.len() && y.len().is_multiple_of(features), "softmax backward: shapes");
    let f = gpu.function("norm", CUDA_SOURCE, "softmax_backward")?;
    let (rows, features64) = ((y.len() / features) as u64, features as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y).arg(dy).arg(dx).arg(&rows).arg(&features64);
    // SAFETY: as above.
    unsafe { b.launch(grid(rows as usize)) }.map(|_| ()).map_err(failed("softmax_backward"))
}
