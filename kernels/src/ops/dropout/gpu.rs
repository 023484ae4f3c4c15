//! GPU entry points of dropout and the normal draws (kernels in `dropout.cu`); dropout's
//! backward is the same launch on dy.
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::PushKernelArg;

use super::CUDA_SOURCE;
use crate::cuda::{Gpu, Result, View, ViewMut, launch};

pub fn dropout_forward(
    gpu: &Gpu,
    x: &View<'_>,
    p: f32,
    seed: u64,
    stream: u64,
    y: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        (0.0..1.0).contains(&p) && x.len() == y.len(),
        "dropout: arguments"
    );
    let f = gpu.function("dropout", CUDA_SOURCE, "dropout_forward")?;
    let (low, high) = split(gpu, stream)?;
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x)
        .arg(&p)
        .arg(&seed)
        .arg(&low)
        .arg(high)
        .arg(y)
        .arg(&n);
    launch(b, x.len(), "dropout_forward")
}

/// As [`super::normal_fill`]: out_i = the standard normal of element i.
pub fn normal_fill(gpu: &Gpu, seed: u64, stream: u64, out: &mut ViewMut<'_>) -> Result<()> {
    let f = gpu.function("dropout", CUDA_SOURCE, "normal_fill")?;
    let (low, high) = split(gpu, stream)?;
    let n = out.len();
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&seed).arg(&low).arg(high).arg(out).arg(&n64);
    launch(b, n, "normal_fill")
}

/// A stream's low 20 bits, the kernels' argument, and its high bits in the device cell the
/// kernels read them from (`Gpu::draw_cell`).
fn split(gpu: &Gpu, stream: u64) -> Result<(u64, &cudarc::driver::CudaSlice<u64>)> {
    Ok((stream & ((1 << 20) - 1), gpu.draw_cell(stream >> 20)?))
}
