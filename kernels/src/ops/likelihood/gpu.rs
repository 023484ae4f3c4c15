//! GPU entry point of the fused likelihoods (kernels in `likelihood.cu`).
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{CUDA_SOURCE, Likelihood};
use crate::cuda::{Gpu, Result, View, ViewMut, driver, launch};
use crate::ops::linear::gpu::DeviceCsr;

/// As [`Likelihood::forward_backward`], on the device.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn forward_backward(
    gpu: &Gpu,
    family: Likelihood,
    x: &View<'_>,
    features: usize,
    params: &[View<'_>],
    weights: Option<&View<'_>>,
    ll: &mut ViewMut<'_>,
    grads: &mut [ViewMut<'_>],
) -> Result<()> {
    let k = family.n_params();
    let n = x.len();
    assert!(
        features > 0 && n.is_multiple_of(features),
        "likelihood: shapes"
    );
    assert!(
        params.len() == k && grads.len() == k,
        "{family:?} takes {k} parameters"
    );
    assert!(
        params.iter().all(|p| p.len() == n || p.len() == features),
        "parameter lengths"
    );
    assert!(
        grads.iter().all(|g| g.len() == n),
        "gradients are per entry"
    );
    let rows = n / features;
    assert_eq!(ll.len(), rows, "one log-likelihood per row");
    let values = gpu.zeros(n)?;
    let null = 0u64;
    let (rows64, features64) = (rows as u64, features as u64);
    let shared: Vec<i32> = (0..3)
        .map(|i| {
            params
                .get(i)
                .is_some_and(|p| p.len() == features && features != n) as i32
        })
        .collect();
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
    // Absent parameters and gradients are null pointers, which the kernel checks.
    launch(b, n, "likelihood_entries")?;
    let sums = gpu.function("likelihood", CUDA_SOURCE, "likelihood_row_sums")?;
    let mut b = gpu.stream().launch_builder(&sums);
    b.arg(&values).arg(ll).arg(&rows64).arg(&features64);
    launch(b, rows, "likelihood_row_sums")
}

/// As [`super::nb_mixture`], on the device (per-entry values, then the same row sums).
#[allow(clippy::too_many_arguments)] // the four mixture parameters, each per entry
pub fn nb_mixture(
    gpu: &Gpu,
    x: &View<'_>,
    mu_back: &View<'_>,
    mu_fore: &View<'_>,
    theta: &View<'_>,
    pi: &View<'_>,
    features: usize,
    ll: &mut ViewMut<'_>,
    grads: [&mut ViewMut<'_>; 4],
) -> Result<()> {
    let n = x.len();
    assert!(
        features > 0 && n.is_multiple_of(features) && ll.len() == n / features,
        "nb mixture: shapes"
    );
    assert!(
        [mu_back.len(), mu_fore.len(), theta.len(), pi.len()]
            .iter()
            .all(|&l| l == n)
            && grads.iter().all(|g| g.len() == n),
        "nb mixture: per-entry parameters"
    );
    let values = gpu.zeros(n)?;
    let f = gpu.function("likelihood", CUDA_SOURCE, "nb_mixture_entries")?;
    let n64 = n as u64;
    let [g0, g1, g2, g3] = grads;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x)
        .arg(mu_back)
        .arg(mu_fore)
        .arg(theta)
        .arg(pi)
        .arg(&n64)
        .arg(&values)
        .arg(g0)
        .arg(g1)
        .arg(g2)
        .arg(g3);
    launch(b, n, "nb_mixture_entries")?;
    let sums = gpu.function("likelihood", CUDA_SOURCE, "likelihood_row_sums")?;
    let (rows64, features64) = ((n / features) as u64, features as u64);
    let mut b = gpu.stream().launch_builder(&sums);
    b.arg(&values).arg(ll).arg(&rows64).arg(&features64);
    launch(b, n / features, "likelihood_row_sums")
}

/// As [`super::softmax_nb`], on the device: one block per cell (the row's softmax, NB terms at
/// x = 0 for every gene, then the row's non-zeros), the θ gradient as the column sums of a
/// per-row scratch (no atomics: the same bits every run). The counts come from the host batch.
#[allow(clippy::too_many_arguments)] // mirrors the CPU signature plus the device
pub fn softmax_nb(
    gpu: &Gpu,
    logits: &View<'_>,
    library: &View<'_>,
    counts: &DeviceCsr,
    theta: &View<'_>,
    weights: &View<'_>,
    ll: &mut ViewMut<'_>,
    dlogits: &mut ViewMut<'_>,
    dtheta: &mut ViewMut<'_>,
) -> Result<()> {
    let (rows, genes) = (counts.rows, counts.cols);
    assert!(
        genes > 0 && logits.len() == rows * genes && dlogits.len() == rows * genes,
        "softmax nb: logits and their gradient are {rows} rows of {genes}"
    );
    assert!(
        theta.len() == genes && dtheta.len() == genes,
        "softmax nb: one θ per gene"
    );
    assert!(
        library.len() == rows && weights.len() == rows && ll.len() == rows,
        "softmax nb: one library size, weight and value per row"
    );
    // The encoder's upload, unless a row repeats a column (then a summed copy, once).
    let (indptr, indices, data) = counts.unique_columns(gpu)?;
    let per_row = gpu.zeros(rows * genes)?;
    if rows > 0 {
        let f = gpu.function("likelihood", CUDA_SOURCE, "softmax_nb")?;
        let genes64 = genes as u64;
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(logits)
            .arg(library)
            .arg(indptr)
            .arg(indices)
            .arg(data)
            .arg(theta)
            .arg(weights)
            .arg(&genes64)
            .arg(ll)
            .arg(dlogits)
            .arg(&per_row);
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block of 256 threads (a multiple of 32, as block_sum needs) per row; the
        // CSR was checked and its columns made unique; every buffer has the asserted length.
        unsafe { b.launch(config) }.map_err(driver("softmax_nb"))?;
    }
    crate::ops::elementwise::gpu::column_sums(gpu, &per_row.as_view(), dtheta)
}
