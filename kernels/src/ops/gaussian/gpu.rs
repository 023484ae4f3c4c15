//! GPU entry points of the latent Gaussian ops (kernels in `gaussian.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::CUDA_SOURCE;
use crate::cuda::{CudaError, Gpu, Result, grid};

fn failed(kernel: &str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver { context: kernel.into(), reason: e.to_string() }
}

pub fn reparameterize_forward(gpu: &Gpu, m: &CudaSlice<f32>, lv: &CudaSlice<f32>, eps: &CudaSlice<f32>, z: &mut CudaSlice<f32>) -> Result<()> {
    assert!(m.len() == lv.len() && lv.len() == eps.len() && eps.len() == z.len(), "reparameterize: lengths");
    let f = gpu.function("gaussian", CUDA_SOURCE, "reparameterize_forward")?;
    let n = m.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m).arg(lv).arg(eps).arg(z).arg(&n);
    // SAFETY: the arguments match the kernel; all buffers hold n floats.
    unsafe { b.launch(grid(n as usize)) }.map(|_| ()).map_err(failed("reparameterize_forward"))
}

pub fn reparameterize_backward(gpu: &Gpu, lv: &CudaSlice<f32>, eps: &CudaSlice<f32>, dz: &CudaSlice<f32>, dm: &mut CudaSlice<f32>, dlv: &mut CudaSlice<f32>) -> Result<()> {
    assert!(lv.len() == eps.len() && eps.len() == dz.len() && dz.len() == dm.len() && dm.len() == dlv.len(), "reparameterize backward: lengths");
    let f = gpu.function("gaussian", CUDA_SOURCE, "reparameterize_backward")?;
    let n = lv.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(lv).arg(eps).arg(dz).arg(dm).arg(dlv).arg(&n);
    // SAFETY: as above.
    unsafe { b.launch(grid(n as usize)) }.map(|_| ()).map_err(failed("reparameterize_backward"))
}

/// As [`super::kl_standard_normal`], on the device.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn kl_standard_normal(gpu: &Gpu, m: &CudaSlice<f32>, lv: &CudaSlice<f32>, dim: usize, weights: Option<&CudaSlice<f32>>, kl: &mut CudaSlice<f32>, dm: &mut CudaSlice<f32>, dlv: &mut CudaSlice<f32>) -> Result<()> {
    let rows = kl.len();
    assert!(dim > 0 && m.len() == rows * dim && lv.len() == m.len() && dm.len() == m.len() && dlv.len() == m.len(), "kl: shapes");
    let f = gpu.function("gaussian", CUDA_SOURCE, "kl_standard_normal")?;
    let (rows64, dim64, null) = (rows as u64, dim as u64, 0u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m).arg(lv).arg(&rows64).arg(&dim64);
    match weights {
        Some(w) => b.arg(w),
        None => b.arg(&null),
    };
    b.arg(kl).arg(dm).arg(dlv);
    // SAFETY: one thread per row; an absent weight vector is a null pointer the kernel checks.
    unsafe { b.launch(grid(rows)) }.map(|_| ()).map_err(failed("kl_standard_normal"))
}
