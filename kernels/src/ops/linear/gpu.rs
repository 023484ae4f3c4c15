//! GEMM on the GPU through cuBLAS, with the CPU version's row-major convention.
#![allow(unsafe_code)] // the cuBLAS call: dimensions and buffer sizes are checked before it

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::CudaSlice;

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
