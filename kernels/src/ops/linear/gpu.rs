//! GEMM on the GPU through cuBLAS (with the CPU version's row-major convention) and the sparse
//! first layer (kernels in `linear.cu`).
#![allow(unsafe_code)] // cuBLAS and kernel launches: dimensions and sizes are checked before each

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{CUDA_SOURCE, CountTransform, CsrRef};
use crate::cuda::{CudaError, Gpu, Result};

/// C (m x n, row-major) = alpha · op(A) op(B) + beta · C, as [`super::Gemm::gemm`].
/// cuBLAS is column-major, so it computes Cᵀ = op(B)ᵀ op(A)ᵀ on the same buffers.
#[allow(clippy::too_many_arguments)]
pub fn gemm(gpu: &Gpu, ta: bool, tb: bool, m: usize, k: usize, n: usize, alpha: f32, a: &CudaSlice<f32>, b: &CudaSlice<f32>, beta: f32, c: &mut CudaSlice<f32>) -> Result<()> {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n, "gemm: buffer sizes do not match {m}x{k} * {k}x{n}");
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let cfg = GemmConfig {
        transa: op(tb),
        transb: op(ta),
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha,
        lda: if tb { k } else { n } as i32,
        ldb: if ta { m } else { k } as i32,
        beta,
        ldc: n as i32,
    };
    // SAFETY: the leading dimensions describe exactly the asserted buffer sizes.
    unsafe { gpu.blas()?.gemm(cfg, b, a, c) }.map_err(|e| CudaError::Driver { context: "cublasSgemm".into(), reason: e.to_string() })
}

/// A CSR matrix on the device.
#[derive(Debug)]
pub struct DeviceCsr {
    pub rows: usize,
    pub cols: usize,
    pub indptr: CudaSlice<u64>,
    pub indices: CudaSlice<u32>,
    pub data: CudaSlice<f32>,
}

impl DeviceCsr {
    pub fn upload(gpu: &Gpu, x: CsrRef<'_, f32>) -> Result<DeviceCsr> {
        x.check();
        let err = |e: cudarc::driver::DriverError| CudaError::Driver { context: "upload csr".into(), reason: e.to_string() };
        Ok(DeviceCsr {
            rows: x.rows,
            cols: x.cols,
            indptr: gpu.stream().clone_htod(x.indptr).map_err(err)?,
            indices: gpu.stream().clone_htod(x.indices).map_err(err)?,
            data: gpu.stream().clone_htod(x.data).map_err(err)?,
        })
    }
}

fn tiles(outer: usize, d_out: usize) -> LaunchConfig {
    let threads = d_out.clamp(1, 256) as u32;
    LaunchConfig { grid_dim: (outer.max(1) as u32, d_out.div_ceil(threads as usize) as u32, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// As [`super::sparse_input_forward`], on the device.
pub fn sparse_input_forward(gpu: &Gpu, x: &DeviceCsr, transform: CountTransform, w: &CudaSlice<f32>, d_out: usize, y: &mut CudaSlice<f32>) -> Result<()> {
    assert!(w.len() == x.cols * d_out && y.len() == x.rows * d_out, "sparse input: shapes");
    let f = gpu.function("linear", CUDA_SOURCE, "sparse_input_forward")?;
    let (kind, scale) = transform.code();
    let (rows, d_out64) = (x.rows as u64, d_out as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&x.indptr).arg(&x.indices).arg(&x.data).arg(&rows).arg(&kind).arg(&scale).arg(w).arg(&d_out64).arg(y);
    // SAFETY: the CSR arrays were validated at upload; w and y have the asserted sizes.
    unsafe { b.launch(tiles(x.rows, d_out)) }.map(|_| ()).map_err(|e| CudaError::Driver { context: "sparse_input_forward".into(), reason: e.to_string() })
}

/// As [`super::sparse_input_backward`]: the transposed index is built on the host (it depends
/// only on the batch's counts) and the products run on the device.
pub fn sparse_input_backward(gpu: &Gpu, x: CsrRef<'_, f32>, transform: CountTransform, dy: &CudaSlice<f32>, d_out: usize, dw: &mut CudaSlice<f32>) -> Result<()> {
    assert!(dw.len() == x.cols * d_out && dy.len() == x.rows * d_out, "sparse input backward: shapes");
    let (col_ptr, entries) = super::transposed(x, transform);
    let err = |e: cudarc::driver::DriverError| CudaError::Driver { context: "sparse_input_backward".into(), reason: e.to_string() };
    let col_ptr: Vec<u64> = col_ptr.into_iter().map(|c| c as u64).collect();
    let rows_of: Vec<u32> = entries.iter().map(|&(r, _)| r as u32).collect();
    let values: Vec<f32> = entries.iter().map(|&(_, v)| v).collect();
    let (cp, ro, va) = (gpu.stream().clone_htod(&col_ptr).map_err(err)?, gpu.stream().clone_htod(&rows_of).map_err(err)?, gpu.stream().clone_htod(&values).map_err(err)?);
    let f = gpu.function("linear", CUDA_SOURCE, "sparse_input_backward")?;
    let (genes, d_out64) = (x.cols as u64, d_out as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&cp).arg(&ro).arg(&va).arg(&genes).arg(dy).arg(&d_out64).arg(dw);
    // SAFETY: col_ptr has genes+1 entries ending at the entry count; dy and dw have the asserted sizes.
    unsafe { b.launch(tiles(x.cols, d_out)) }.map(|_| ()).map_err(err)
}
