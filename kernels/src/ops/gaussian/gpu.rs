//! GPU entry points of the latent Gaussian ops (kernels in `gaussian.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::PushKernelArg;

use super::CUDA_SOURCE;
use crate::cuda::{Gpu, Result, View, ViewMut, driver as failed, launch};
use crate::cuda_cache::DeviceBuf;

pub fn reparameterize_forward(
    gpu: &Gpu,
    m: &View<'_>,
    lv: &View<'_>,
    eps: &View<'_>,
    z: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        m.len() == lv.len() && lv.len() == eps.len() && eps.len() == z.len(),
        "reparameterize: lengths"
    );
    let f = gpu.function("gaussian", CUDA_SOURCE, "reparameterize_forward")?;
    let n = m.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m).arg(lv).arg(eps).arg(z).arg(&n);
    launch(b, n as usize, "reparameterize_forward")
}

pub fn reparameterize_backward(
    gpu: &Gpu,
    lv: &View<'_>,
    eps: &View<'_>,
    dz: &View<'_>,
    dm: &mut ViewMut<'_>,
    dlv: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        lv.len() == eps.len()
            && eps.len() == dz.len()
            && dz.len() == dm.len()
            && dm.len() == dlv.len(),
        "reparameterize backward: lengths"
    );
    let f = gpu.function("gaussian", CUDA_SOURCE, "reparameterize_backward")?;
    let n = lv.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(lv).arg(eps).arg(dz).arg(dm).arg(dlv).arg(&n);
    launch(b, n as usize, "reparameterize_backward")
}

/// As [`super::kl_standard_normal`], on the device.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn kl_standard_normal(
    gpu: &Gpu,
    m: &View<'_>,
    lv: &View<'_>,
    dim: usize,
    weights: Option<&View<'_>>,
    kl: &mut ViewMut<'_>,
    dm: &mut ViewMut<'_>,
    dlv: &mut ViewMut<'_>,
) -> Result<()> {
    let rows = kl.len();
    assert!(
        dim > 0
            && m.len() == rows * dim
            && lv.len() == m.len()
            && dm.len() == m.len()
            && dlv.len() == m.len(),
        "kl: shapes"
    );
    let f = gpu.function("gaussian", CUDA_SOURCE, "kl_standard_normal")?;
    let (rows64, dim64, null) = (rows as u64, dim as u64, 0u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m).arg(lv).arg(&rows64).arg(&dim64);
    match weights {
        Some(w) => b.arg(w),
        None => b.arg(&null),
    };
    b.arg(kl).arg(dm).arg(dlv);
    launch(b, rows, "kl_standard_normal")
}

/// As [`super::jeffreys`], on the device.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn jeffreys(
    gpu: &Gpu,
    m1: &View<'_>,
    lv1: &View<'_>,
    m2: &View<'_>,
    lv2: &View<'_>,
    dim: usize,
    weights: &View<'_>,
    value: &mut ViewMut<'_>,
    grads: [&mut ViewMut<'_>; 4],
) -> Result<()> {
    let (rows, n) = (value.len(), m1.len());
    assert!(
        dim > 0
            && n == rows * dim
            && [lv1.len(), m2.len(), lv2.len()].iter().all(|&l| l == n)
            && weights.len() == rows
            && grads.iter().all(|g| g.len() == n),
        "jeffreys: shapes"
    );
    let f = gpu.function("gaussian", CUDA_SOURCE, "jeffreys")?;
    let (rows64, dim64) = (rows as u64, dim as u64);
    let [dm1, dlv1, dm2, dlv2] = grads;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(m1)
        .arg(lv1)
        .arg(m2)
        .arg(lv2)
        .arg(&rows64)
        .arg(&dim64)
        .arg(weights)
        .arg(value)
        .arg(dm1)
        .arg(dlv1)
        .arg(dm2)
        .arg(dlv2);
    launch(b, rows, "jeffreys")
}

/// The experts of a device PoE stacked in one place: means and log-variances (experts x n),
/// presence (experts x rows, non-zero = present).
#[derive(Debug)]
pub struct DeviceExperts {
    pub experts: usize,
    pub dim: usize,
    pub means: DeviceBuf,
    pub logvars: DeviceBuf,
    pub present: DeviceBuf,
}

impl DeviceExperts {
    /// Copies each expert's views into the stacks (device to device).
    pub fn stack(
        gpu: &Gpu,
        means: &[View<'_>],
        logvars: &[View<'_>],
        present: &[View<'_>],
        dim: usize,
    ) -> Result<DeviceExperts> {
        let (experts, n) = (means.len(), means.first().map_or(0, View::len));
        assert!(
            dim > 0
                && n.is_multiple_of(dim)
                && logvars.len() == experts
                && present.len() == experts,
            "poe: one mean, log-variance and mask per expert"
        );
        assert!(
            means.iter().chain(logvars).all(|v| v.len() == n)
                && present.iter().all(|p| p.len() == n / dim),
            "poe: shapes"
        );
        Ok(DeviceExperts {
            experts,
            dim,
            means: concat(gpu, means)?,
            logvars: concat(gpu, logvars)?,
            present: concat(gpu, present)?,
        })
    }
}

/// The views one after another in a new buffer.
fn concat(gpu: &Gpu, parts: &[View<'_>]) -> Result<DeviceBuf> {
    // Written whole by the copies below.
    let mut out = gpu.alloc::<f32>(parts.iter().map(View::len).sum())?;
    let mut at = 0;
    for part in parts {
        gpu.stream()
            .memcpy_dtod(part, &mut out.slice_mut(at..at + part.len()))
            .map_err(failed("stacking experts"))?;
        at += part.len();
    }
    Ok(out)
}

/// Copies consecutive blocks of `stacked` into `outs`, in order (the inverse of [`concat`]).
pub fn unstack(gpu: &Gpu, stacked: &DeviceBuf, outs: &mut [ViewMut<'_>]) -> Result<()> {
    assert_eq!(
        stacked.len(),
        outs.iter().map(|o| o.len()).sum::<usize>(),
        "unstack: lengths"
    );
    let mut at = 0;
    for out in outs {
        let len = out.len();
        gpu.stream()
            .memcpy_dtod(&stacked.slice(at..at + len), out)
            .map_err(failed("unstacking expert gradients"))?;
        at += len;
    }
    Ok(())
}

/// As [`super::poe_forward`], on the device.
pub fn poe_forward(
    gpu: &Gpu,
    experts: &DeviceExperts,
    m: &mut ViewMut<'_>,
    lv: &mut ViewMut<'_>,
) -> Result<()> {
    let n = m.len();
    assert!(
        lv.len() == n
            && experts.means.len() == experts.experts * n
            && n.is_multiple_of(experts.dim),
        "poe: shapes"
    );
    let f = gpu.function("gaussian", CUDA_SOURCE, "poe_forward")?;
    let (e64, n64, d64) = (experts.experts as u64, n as u64, experts.dim as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&experts.means)
        .arg(&experts.logvars)
        .arg(&experts.present)
        .arg(&e64)
        .arg(&n64)
        .arg(&d64)
        .arg(m)
        .arg(lv);
    launch(b, n, "poe_forward")
}

/// As [`super::poe_backward`], on the device: gradients stacked like the experts.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn poe_backward(
    gpu: &Gpu,
    experts: &DeviceExperts,
    m: &View<'_>,
    lv: &View<'_>,
    dm: &View<'_>,
    dlv: &View<'_>,
    dmeans: &mut DeviceBuf,
    dlogvars: &mut DeviceBuf,
) -> Result<()> {
    let n = m.len();
    assert!(
        lv.len() == n
            && dm.len() == n
            && dlv.len() == n
            && dmeans.len() == experts.experts * n
            && dlogvars.len() == dmeans.len(),
        "poe backward: shapes"
    );
    let f = gpu.function("gaussian", CUDA_SOURCE, "poe_backward")?;
    let (e64, n64, d64) = (experts.experts as u64, n as u64, experts.dim as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&experts.means)
        .arg(&experts.logvars)
        .arg(&experts.present)
        .arg(&e64)
        .arg(&n64)
        .arg(&d64)
        .arg(m)
        .arg(lv)
        .arg(dm)
        .arg(dlv)
        .arg(dmeans)
        .arg(dlogvars);
    launch(b, n, "poe_backward")
}
