//! GPU entry points of the latent Gaussian ops (kernels in `gaussian.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::{CudaSlice, PushKernelArg};

use super::CUDA_SOURCE;
use crate::cuda::{CudaError, Gpu, Result, driver as failed, grid};


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

/// As [`super::jeffreys`], on the device.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn jeffreys(gpu: &Gpu, m1: &CudaSlice<f32>, lv1: &CudaSlice<f32>, m2: &CudaSlice<f32>, lv2: &CudaSlice<f32>, dim: usize, weights: &CudaSlice<f32>, value: &mut CudaSlice<f32>, grads: [&mut CudaSlice<f32>; 4]) -> Result<()> {
    let (rows, n) = (value.len(), m1.len());
    assert!(dim > 0 && n == rows * dim && [lv1.len(), m2.len(), lv2.len()].iter().all(|&l| l == n) && weights.len() == rows && grads.iter().all(|g| g.len() == n), "jeffreys: shapes");
    let f = gpu.function("gaussian", CUDA_SOURCE, "jeffreys")?;
    let (rows64, dim64) = (rows as u64, dim as u64);
    let [dm1, dlv1, dm2, dlv2] = grads;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m1).arg(lv1).arg(m2).arg(lv2).arg(&rows64).arg(&dim64).arg(weights).arg(value).arg(dm1).arg(dlv1).arg(dm2).arg(dlv2);
    // SAFETY: one thread per row; every buffer's length was checked against rows x dim.
    unsafe { b.launch(grid(rows)) }.map(|_| ()).map_err(failed("jeffreys"))
}

/// Experts for the device PoE: means and log-variances stacked (experts x n) and presence as
/// bytes (experts x rows).
#[derive(Debug)]
pub struct DeviceExperts {
    pub experts: usize,
    pub dim: usize,
    pub means: CudaSlice<f32>,
    pub logvars: CudaSlice<f32>,
    pub present: CudaSlice<u8>,
}

impl DeviceExperts {
    pub fn upload(gpu: &Gpu, means: &[&[f32]], logvars: &[&[f32]], present: &[&[bool]], dim: usize) -> Result<DeviceExperts> {
        let stack = |parts: &[&[f32]]| parts.concat();
        let mask: Vec<u8> = present.iter().flat_map(|p| p.iter().map(|&b| u8::from(b))).collect();
        let err = |e: cudarc::driver::DriverError| CudaError::Driver { context: "upload experts".into(), reason: e.to_string() };
        Ok(DeviceExperts { experts: means.len(), dim, means: gpu.upload(&stack(means))?, logvars: gpu.upload(&stack(logvars))?, present: gpu.stream().clone_htod(&mask).map_err(err)? })
    }
}

/// As [`super::poe_forward`], on the device.
pub fn poe_forward(gpu: &Gpu, experts: &DeviceExperts, m: &mut CudaSlice<f32>, lv: &mut CudaSlice<f32>) -> Result<()> {
    let n = m.len();
    assert!(lv.len() == n && experts.means.len() == experts.experts * n && n.is_multiple_of(experts.dim), "poe: shapes");
    let f = gpu.function("gaussian", CUDA_SOURCE, "poe_forward")?;
    let (e64, n64, d64) = (experts.experts as u64, n as u64, experts.dim as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&experts.means).arg(&experts.logvars).arg(&experts.present).arg(&e64).arg(&n64).arg(&d64).arg(m).arg(lv);
    // SAFETY: the stacked buffers hold experts*n floats and experts*rows bytes (asserted / built so).
    unsafe { b.launch(grid(n)) }.map(|_| ()).map_err(failed("poe_forward"))
}

/// As [`super::poe_backward`], on the device: gradients stacked like the experts.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn poe_backward(gpu: &Gpu, experts: &DeviceExperts, m: &CudaSlice<f32>, lv: &CudaSlice<f32>, dm: &CudaSlice<f32>, dlv: &CudaSlice<f32>, dmeans: &mut CudaSlice<f32>, dlogvars: &mut CudaSlice<f32>) -> Result<()> {
    let n = m.len();
    assert!(lv.len() == n && dm.len() == n && dlv.len() == n && dmeans.len() == experts.experts * n && dlogvars.len() == dmeans.len(), "poe backward: shapes");
    let f = gpu.function("gaussian", CUDA_SOURCE, "poe_backward")?;
    let (e64, n64, d64) = (experts.experts as u64, n as u64, experts.dim as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&experts.means).arg(&experts.logvars).arg(&experts.present).arg(&e64).arg(&n64).arg(&d64).arg(m).arg(lv).arg(dm).arg(dlv).arg(dmeans).arg(dlogvars);
    // SAFETY: as above.
    unsafe { b.launch(grid(n)) }.map(|_| ()).map_err(failed("poe_backward"))
}
