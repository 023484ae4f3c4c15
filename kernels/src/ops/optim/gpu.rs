//! GPU entry points of the optimiser step and the gradient norm (kernels in `optim.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::PushKernelArg;

use super::{AdamW, CUDA_SOURCE, GRAIN};
use crate::cuda::{Gpu, Result, View, ViewMut, driver as failed, launch};

/// As [`AdamW::step`], on the device; nothing changes where `skip` (one value) is not 0,
/// decided there.
#[allow(clippy::too_many_arguments)] // the step's operands; bundling them would only rename them
pub fn adamw_step(
    gpu: &Gpu,
    opt: &AdamW,
    t: u64,
    params: &mut ViewMut<'_>,
    grads: &View<'_>,
    m: &mut ViewMut<'_>,
    v: &mut ViewMut<'_>,
    skip: Option<&View<'_>>,
) -> Result<()> {
    assert!(
        params.len() == grads.len() && grads.len() == m.len() && m.len() == v.len(),
        "AdamW: arguments"
    );
    assert!(skip.is_none_or(|s| s.len() == 1), "AdamW: one skip flag");
    let k = opt.at(t);
    let f = gpu.function("optim", CUDA_SOURCE, "adamw_step")?;
    let n = params.len() as u64;
    let (b1, b2, step_size, inv_c2, eps, decay, l2) = (
        k.beta1 as f32,
        k.beta2 as f32,
        k.step_size as f32,
        k.inv_correction2 as f32,
        k.eps as f32,
        k.decay as f32,
        k.l2 as f32,
    );
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(params)
        .arg(grads)
        .arg(m)
        .arg(v)
        .arg(&n)
        .arg(&b1)
        .arg(&b2)
        .arg(&step_size)
        .arg(&inv_c2)
        .arg(&eps)
        .arg(&decay)
        .arg(&l2);
    // A null pointer where there is no flag.
    let none = 0u64;
    match skip {
        Some(flag) => b.arg(flag),
        None => b.arg(&none),
    };
    launch(b, n as usize, "adamw_step")
}

/// As [`super::grad_norm`]: squares summed in f64 per fixed chunk of `GRAIN` elements, the
/// chunks added on the host in order: the CPU's partition and order, so the norms agree.
pub fn grad_norm(gpu: &Gpu, grads: &View<'_>) -> Result<f64> {
    let n = grads.len();
    let chunks = n.div_ceil(GRAIN).max(1);
    let mut partial = gpu.alloc_zeros::<f64>(chunks)?;
    let f = gpu.function("optim", CUDA_SOURCE, "chunk_sum_squares")?;
    let (n64, chunk64) = (n as u64, GRAIN as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(grads).arg(&n64).arg(&chunk64).arg(&mut partial);
    // One thread per chunk of `GRAIN` elements; partial holds one double per chunk.
    launch(b, chunks, "chunk_sum_squares")?;
    let sums = gpu
        .stream()
        .clone_dtoh(&partial)
        .map_err(failed("download"))?;
    Ok(sums.iter().sum::<f64>().sqrt())
}

/// As [`super::non_finite_flag`], into `flag` (one value), on the device.
pub fn flag_non_finite(gpu: &Gpu, x: &View<'_>, flag: &mut ViewMut<'_>) -> Result<()> {
    assert_eq!(flag.len(), 1, "flag_non_finite: one flag");
    gpu.stream()
        .memset_zeros(flag)
        .map_err(failed("zeroing the flag"))?;
    let f = gpu.function("optim", CUDA_SOURCE, "flag_non_finite")?;
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&n).arg(flag);
    launch(b, x.len(), "flag_non_finite")
}
