//! GPU entry point of the fused likelihoods (kernels in `likelihood.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::PushKernelArg;

use super::{CUDA_SOURCE, Likelihood};
use crate::cuda::{CudaError, Gpu, Result, View, ViewMut, grid};

/// As [`Likelihood::forward_backward`], on the device.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn forward_backward(gpu: &Gpu, family: Likelihood, x: &View<'_>, features: usize, params: &[View<'_>], weights: Option<&View<'_>>, ll: &mut ViewMut<'_>, grads: &mut [ViewMut<'_>]) -> Result<()> {
    let k = family.n_params();
    let n = x.len();
    assert!(features > 0 && n.is_multiple_of(features), "likelihood: shapes");
    assert!(params.len() == k && grads.len() == k, "{family:?} takes {k} parameters");
    assert!(params.iter().all(|p| p.len() == n || p.len() == features), "parameter lengths");
    assert!(grads.iter().all(|g| g.len() == n), "gradients are per entry");
    let rows = n / features;
    assert_eq!(ll.len(), rows, "one log-likelihood per row");
    let err = |kernel: &'static str| move |e: cudarc::driver::DriverError| CudaError::Driver { context: kernel.into(), reason: e.to_string() };
    let values = gpu.zeros(n)?;
    let null = 0u64;
    let (rows64, features64) = (rows as u64, features as u64);
    let shared: Vec<i32> = (0..3).map(|i| params.get(i).is_some_and(|p| p.len() == features && features != n) as i32).collect();
    let entries = gpu.function("likelihood", CUDA_SOURCE, "likelihood_entries")?;
    let code = family.code();
    let mut b = gpu.stream().launch_builder(&entries);
    b.arg(&code).arg(x).arg(&rows64).arg(&features64);
    for i in 0..3 {
        match params.get(i) {
            Some(p) => b.arg(p),
            None => b.arg(&null),
        };
    }
    b.arg(&shared[0]).arg(&shared[1]).arg(&shared[2]);
    match weights {
        Some(w) => b.arg(w),
        None => b.arg(&null),
    };
    b.arg(&values);
    let mut grads = grads.iter_mut();
    let (g0, g1, g2) = (grads.next(), grads.next(), grads.next());
    for g in [g0, g1, g2] {
        match g {
            Some(g) => b.arg(g),
            None => b.arg(&null),
        };
    }
    // SAFETY: argument order and types match likelihood_entries; absent parameters and
    // gradients are null pointers, which the kernel checks; every buffer has the asserted length.
    unsafe { b.launch(grid(n)) }.map_err(err("likelihood_entries"))?;
    let sums = gpu.function("likelihood", CUDA_SOURCE, "likelihood_row_sums")?;
    let mut b = gpu.stream().launch_builder(&sums);
    b.arg(&values).arg(ll).arg(&rows64).arg(&features64);
    // SAFETY: values holds rows*features floats, ll rows.
    unsafe { b.launch(grid(rows)) }.map(|_| ()).map_err(err("likelihood_row_sums"))
}

/// As [`super::nb_mixture`], on the device (per-entry values, then the same row sums).
#[allow(clippy::too_many_arguments)] // the four mixture parameters, each per entry
pub fn nb_mixture(gpu: &Gpu, x: &View<'_>, mu_back: &View<'_>, mu_fore: &View<'_>, theta: &View<'_>, pi: &View<'_>, features: usize, ll: &mut ViewMut<'_>, grads: [&mut ViewMut<'_>; 4]) -> Result<()> {
    let n = x.len();
    assert!(features > 0 && n.is_multiple_of(features) && ll.len() == n / features, "nb mixture: shapes");
    assert!([mu_back.len(), mu_fore.len(), theta.len(), pi.len()].iter().all(|&l| l == n) && grads.iter().all(|g| g.len() == n), "nb mixture: per-entry parameters");
    let err = |kernel: &'static str| move |e: cudarc::driver::DriverError| CudaError::Driver { context: kernel.into(), reason: e.to_string() };
    let values = gpu.zeros(n)?;
    let f = gpu.function("likelihood", CUDA_SOURCE, "nb_mixture_entries")?;
    let n64 = n as u64;
    let [g0, g1, g2, g3] = grads;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(mu_back).arg(mu_fore).arg(theta).arg(pi).arg(&n64).arg(&values).arg(g0).arg(g1).arg(g2).arg(g3);
    // SAFETY: every buffer holds n floats (asserted).
    unsafe { b.launch(grid(n)) }.map_err(err("nb_mixture_entries"))?;
    let sums = gpu.function("likelihood", CUDA_SOURCE, "likelihood_row_sums")?;
    let (rows64, features64) = ((n / features) as u64, features as u64);
    let mut b = gpu.stream().launch_builder(&sums);
    b.arg(&values).arg(ll).arg(&rows64).arg(&features64);
    // SAFETY: values holds rows*features floats, ll rows.
    unsafe { b.launch(grid(n / features)) }.map(|_| ()).map_err(err("likelihood_row_sums"))
}
