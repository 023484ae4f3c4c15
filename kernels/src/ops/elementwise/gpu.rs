//! GPU entry points of the elementwise ops (kernels in `elementwise.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::{Activation, CUDA_SOURCE};
use crate::cuda::{Gpu, Result, driver as failed, grid};


pub fn activation_forward(gpu: &Gpu, act: Activation, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
    assert_eq!(x.len(), y.len(), "activation: lengths");
    let f = gpu.function("elementwise", CUDA_SOURCE, "activation_forward")?;
    let (kind, a) = act.code();
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&kind).arg(&a).arg(x).arg(y).arg(&n);
    // SAFETY: the argument list matches the kernel's signature; x and y hold n floats.
    unsafe { b.launch(grid(x.len())) }.map(|_| ()).map_err(failed("activation_forward"))
}

pub fn activation_backward(gpu: &Gpu, act: Activation, x: &CudaSlice<f32>, y: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) -> Result<()> {
    assert!(x.len() == y.len() && y.len() == dy.len() && dy.len() == dx.len(), "activation backward: lengths");
    let f = gpu.function("elementwise", CUDA_SOURCE, "activation_backward")?;
    let (kind, a) = act.code();
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&kind).arg(&a).arg(x).arg(y).arg(dy).arg(dx).arg(&n);
    // SAFETY: as above; all four buffers hold n floats.
    unsafe { b.launch(grid(x.len())) }.map(|_| ()).map_err(failed("activation_backward"))
}

pub fn bias_add_forward(gpu: &Gpu, y: &mut CudaSlice<f32>, bias: &CudaSlice<f32>) -> Result<()> {
    let cols = bias.len();
    assert!(cols > 0 && y.len().is_multiple_of(cols), "bias add: shapes");
    let f = gpu.function("elementwise", CUDA_SOURCE, "bias_add_forward")?;
    let n = y.len();
    let (rows, cols64) = ((n / cols) as u64, cols as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(y).arg(bias).arg(&rows).arg(&cols64);
    // SAFETY: y holds rows*cols floats, bias cols.
    unsafe { b.launch(grid(n)) }.map(|_| ()).map_err(failed("bias_add_forward"))
}

pub fn column_sums(gpu: &Gpu, m: &CudaSlice<f32>, out: &mut CudaSlice<f32>) -> Result<()> {
    let cols = out.len();
    assert!(cols > 0 && m.len().is_multiple_of(cols), "column sums: shapes");
    let f = gpu.function("elementwise", CUDA_SOURCE, "bias_add_backward")?;
    let (rows, cols64) = ((m.len() / cols) as u64, cols as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m).arg(out).arg(&rows).arg(&cols64);
    // SAFETY: m holds rows*cols floats, out cols; one thread per column.
    unsafe { b.launch(grid(cols)) }.map(|_| ()).map_err(failed("column_sums"))
}
