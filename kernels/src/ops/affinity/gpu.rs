//! GPU entry points of the affinity ops (kernels in `affinity.cu`), f64 like their CPU twins.
#![allow(unsafe_code)] // kernel launches: argument types and lengths are checked before each

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::CUDA_SOURCE;
use crate::cuda::{Gpu, Result, driver as failed, grid};

/// As the epilogue of [`super::sq_euclidean_rows`]: `d` (rows x n) holds −2 X_rows Xᵀ from
/// the GEMM; adds the squared norms, clamps at 0, zeroes the diagonal.
pub fn sq_distance_finish(
    gpu: &Gpu,
    d: &mut CudaSlice<f64>,
    norms: &CudaSlice<f64>,
    row0: usize,
    n: usize,
) -> Result<()> {
    let rows = d.len() / n.max(1);
    assert!(
        d.len() == rows * n && norms.len() == n && row0 + rows <= n,
        "sq_distance_finish: shapes"
    );
    let f = gpu.function("affinity", CUDA_SOURCE, "sq_distance_finish")?;
    let (row0, rows64, n64) = (row0 as u64, rows as u64, n as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(d).arg(norms).arg(&row0).arg(&rows64).arg(&n64);
    // SAFETY: d holds rows x n doubles, norms n; the kernel touches nothing else.
    unsafe { b.launch(grid(rows * n)) }
        .map(|_| ())
        .map_err(failed("sq_distance_finish"))
}

/// As [`super::exponential_rows`], on the device.
pub fn exponential_rows(
    gpu: &Gpu,
    d: &mut CudaSlice<f64>,
    near_rows: &CudaSlice<f64>,
    near_all: &CudaSlice<f64>,
    mu: f64,
) -> Result<()> {
    let (rows, n) = (near_rows.len(), near_all.len());
    assert_eq!(d.len(), rows * n, "exponential_rows: shapes");
    let f = gpu.function("affinity", CUDA_SOURCE, "exponential_rows")?;
    let (rows64, n64) = (rows as u64, n as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(d)
        .arg(near_rows)
        .arg(near_all)
        .arg(&rows64)
        .arg(&n64)
        .arg(&mu);
    // SAFETY: d holds rows x n doubles, near_rows rows, near_all n.
    unsafe { b.launch(grid(rows * n)) }
        .map(|_| ())
        .map_err(failed("exponential_rows"))
}

/// As [`super::sparse_times_dense_transposed`], on the device: out = (S·X)ᵀ·scale for the
/// n-row CSR S and the dense n x n X.
#[allow(clippy::too_many_arguments)] // the CSR's three arrays plus the dense operands
pub fn sparse_times_dense_transposed(
    gpu: &Gpu,
    indptr: &CudaSlice<u64>,
    cols: &CudaSlice<u32>,
    vals: &CudaSlice<f64>,
    x: &CudaSlice<f64>,
    n: usize,
    scale: f64,
    out: &mut CudaSlice<f64>,
) -> Result<()> {
    assert!(
        indptr.len() == n + 1 && cols.len() == vals.len() && x.len() == n * n && out.len() == n * n,
        "sparse_times_dense_transposed: shapes"
    );
    assert!(
        n.div_ceil(32) <= 65_535,
        "sparse_times_dense_transposed: n = {n} exceeds the grid"
    );
    let f = gpu.function("affinity", CUDA_SOURCE, "sparse_times_dense_transposed")?;
    let tiles = n.div_ceil(32).max(1) as u32;
    let config = LaunchConfig {
        grid_dim: (tiles, tiles, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    let n64 = n as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(indptr)
        .arg(cols)
        .arg(vals)
        .arg(x)
        .arg(out)
        .arg(&n64)
        .arg(&scale);
    // SAFETY: indptr has n + 1 offsets into cols/vals (checked by the CPU side that built it),
    // x and out hold n x n doubles; each thread writes only its own (c, j).
    unsafe { b.launch(config) }
        .map(|_| ())
        .map_err(failed("sparse_times_dense_transposed"))
}
