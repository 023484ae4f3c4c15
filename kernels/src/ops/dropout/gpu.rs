//! GPU entry point of dropout (kernel in `dropout.cu`); the backward is the same launch on dy.
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::CUDA_SOURCE;
use crate::cuda::{CudaError, Gpu, Result, grid};

pub fn dropout_forward(gpu: &Gpu, x: &CudaSlice<f32>, p: f32, seed: u64, stream: u64, y: &mut CudaSlice<f32>) -> Result<()> {
    assert!((0.0..1.0).contains(&p) && x.len() == y.len(), "dropout: arguments");
    let f = gpu.function("dropout", CUDA_SOURCE, "dropout_forward")?;
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&p).arg(&seed).arg(&stream).arg(y).arg(&n);
    // SAFETY: the arguments match the kernel's signature; x and y hold n floats.
    unsafe { b.launch(grid(n as usize)) }.map(|_| ()).map_err(|e| CudaError::Driver { context: "dropout_forward".into(), reason: e.to_string() })
}
