//! GEMM on the GPU through cuBLAS (with the CPU version's row-major convention) and the sparse
//! first layer (kernels in `linear.cu`).
#![allow(unsafe_code)] // cuBLAS and kernel launches: dimensions and sizes are checked before each

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::{CUDA_SOURCE, CountTransform, CsrRef, MatmulPrecision};
use crate::background::Background;
use crate::cuda::{CudaError, Gpu, Result, View, ViewMut, driver as failed};
use crate::cuda_cache::DeviceBuf;

/// C (m x n, row-major) = alpha · op(A) op(B) + beta · C, as [`super::Gemm::gemm`].
/// cuBLAS is column-major, so it computes Cᵀ = op(B)ᵀ op(A)ᵀ on the same buffers.
#[allow(clippy::too_many_arguments)] // an op's operands, outputs and shape, as its kernel takes them
pub fn gemm(
    gpu: &Gpu,
    ta: bool,
    tb: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &View<'_>,
    b: &View<'_>,
    beta: f32,
    c: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        a.len() == m * k && b.len() == k * n && c.len() == m * n,
        "gemm: buffer sizes do not match {m}x{k} * {k}x{n}"
    );
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        // cuBLAS refuses k = 0; C = beta C is what the product means then.
        return crate::ops::elementwise::gpu::scale(gpu, c, beta);
    }
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
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
    let blas = gpu.blas()?;
    gpu.bind()?;
    let failed = |call: &'static str| {
        move |e: cudarc::cublas::result::CublasError| CudaError::Driver {
            context: call.into(),
            reason: e.to_string(),
        }
    };
    let compute = match gpu.matmul() {
        MatmulPrecision::Highest => {
            // SAFETY: the leading dimensions describe exactly the asserted buffer sizes.
            return unsafe { blas.gemm(cfg, b, a, c) }.map_err(failed("cublasSgemm"));
        }
        MatmulPrecision::High => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        MatmulPrecision::Medium => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
    };
    // The same product on the tensor cores: f32 buffers, inputs rounded to the compute type.
    let stream = gpu.stream();
    let (b_ptr, _b_read) = b.device_ptr(stream);
    let (a_ptr, _a_read) = a.device_ptr(stream);
    let (c_ptr, _c_written) = c.device_ptr_mut(stream);
    let f32_type = cudaDataType::CUDA_R_32F;
    // SAFETY: as for SGEMM above; alpha and beta are f32, as CUBLAS_COMPUTE_32F_* reads them.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *blas.handle(),
            cfg.transa,
            cfg.transb,
            cfg.m,
            cfg.n,
            cfg.k,
            (&cfg.alpha as *const f32).cast(),
            b_ptr as *const _,
            f32_type,
            cfg.lda,
            a_ptr as *const _,
            f32_type,
            cfg.ldb,
            (&cfg.beta as *const f32).cast(),
            c_ptr as *mut _,
            f32_type,
            cfg.ldc,
            compute,
            cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .map_err(failed("cublasGemmEx"))
}

/// A CSR count matrix on the device, with its host copy where it was uploaded: the backward's
/// transposed index is built on the host from it (it depends only on the batch's counts) at
/// the first backward. A canonical batch (no row names a gene twice) gathered from a resident
/// matrix or staged has no host copy; its index is built on the device
/// ([`super::resident_gpu`]).
#[derive(Debug)]
pub struct DeviceCsr {
    pub rows: usize,
    pub cols: usize,
    /// The batch's entries, `indptr[rows]`: the arrays may hold more (buffers sized for an
    /// epoch's largest batch, `cuda_fixed`), past it never read.
    pub nnz: usize,
    pub indptr: DeviceBuf<u64>,
    pub indices: DeviceBuf<u32>,
    pub data: DeviceBuf,
    host: Option<Arc<HostRows>>,
    pub(crate) transposed: OnceLock<(CountTransform, DeviceTransposed)>,
    /// The backward's transposed index, being built on the host since the forward was queued.
    building: Mutex<Option<(CountTransform, Background<HostTransposed>)>>,
    /// With each row's repeated columns summed, when a row repeats one (None: it is itself).
    unique: OnceLock<Option<UniqueRows>>,
}

/// A CSR's arrays on the device.
type UniqueRows = (DeviceBuf<u64>, DeviceBuf<u32>, DeviceBuf);

/// A CSR's arrays on the host: indptr, indices, data.
pub(crate) type HostRows = (Vec<u64>, Vec<u32>, Vec<f32>);

/// The transposed index's arrays on the host: column pointers, rows, transformed values.
pub(crate) type HostTransposed = (Vec<u64>, Vec<u32>, Vec<f32>);

/// t(X) by columns: column pointers, the row of each entry and its transformed value.
#[derive(Debug)]
pub(crate) struct DeviceTransposed {
    pub col_ptr: DeviceBuf<u64>,
    pub rows_of: DeviceBuf<u32>,
    pub values: DeviceBuf,
}

impl DeviceCsr {
    pub fn upload(gpu: &Gpu, x: CsrRef<'_, f32>) -> Result<DeviceCsr> {
        x.check_entries();
        let arrays = (
            gpu.upload(x.indptr)?,
            gpu.upload(x.indices)?,
            gpu.upload(x.data)?,
        );
        let host = (x.indptr.to_vec(), x.indices.to_vec(), x.data.to_vec());
        Ok(DeviceCsr::from_parts(
            x.rows,
            x.cols,
            arrays,
            Some(host),
            None,
            false,
        ))
    }

    /// A copy made on the device: the arrays, and the backward's transposed index for
    /// `transform` built from them there (nothing read from the host). What a captured step
    /// takes from a batch in fixed buffers, so that each replay reads what they hold then. Its
    /// rows must name each gene once, as the stores' do.
    pub fn copied(&self, gpu: &Gpu, transform: CountTransform) -> Result<DeviceCsr> {
        let arrays = (
            gpu.copy_of(&self.indptr.slice(..))?,
            gpu.copy_of(&self.indices.slice(..))?,
            gpu.copy_of(&self.data.slice(..))?,
        );
        let copy = super::resident_gpu::indexed(gpu, (self.rows, self.cols), arrays, transform)?;
        Ok(copy.holding(self.nnz))
    }

    /// Its rows `times` over, in order (as [`super::gather_rows`] of them repeated), made on the
    /// device: each modality's decoder of a mixture of experts reads the batch once per expert.
    /// The arrays have room for `times` × this one's room; the row pointers end at `times` ×
    /// its entries, read there.
    pub fn tiled(&self, gpu: &Gpu, times: usize) -> Result<DeviceCsr> {
        let room = self.indices.len().min(self.data.len());
        let mut arrays = (
            gpu.alloc::<u64>(times * self.rows + 1)?,
            gpu.alloc::<u32>(times * room)?,
            gpu.alloc::<f32>(times * room)?,
        );
        let f = gpu.function("linear", CUDA_SOURCE, "csr_tile")?;
        let (rows, room64, times64) = (self.rows as u64, room as u64, times as u64);
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(&self.indptr)
            .arg(&self.indices)
            .arg(&self.data)
            .arg(&rows)
            .arg(&room64)
            .arg(&times64)
            .arg(&mut arrays.0)
            .arg(&mut arrays.1)
            .arg(&mut arrays.2);
        crate::cuda::launch(b, (times * room).max(times * self.rows + 1), "csr_tile")?;
        let host = self.host().map(|x| super::tiled(x, times));
        // Repeating rows repeats no column within one: as canonical as this one.
        let canonical = matches!(self.unique.get(), Some(None));
        let tiled =
            DeviceCsr::from_parts(times * self.rows, self.cols, arrays, host, None, canonical);
        Ok(tiled.holding(times * self.nnz))
    }

    /// The same matrix with `nnz` entries: its arrays' first ones (the row pointers end there).
    pub(crate) fn holding(mut self, nnz: usize) -> DeviceCsr {
        debug_assert!(nnz <= self.data.len() && nnz <= self.indices.len());
        self.nnz = nnz;
        self
    }

    /// A matrix whose arrays are already on the device (`device`: indptr, indices, data) and,
    /// unless it was gathered there, on the host (`host`); the backward's transposed index if
    /// it was made already; `canonical`: no row names a column twice (known to the caller).
    pub(crate) fn from_parts(
        rows: usize,
        cols: usize,
        (indptr, indices, data): (DeviceBuf<u64>, DeviceBuf<u32>, DeviceBuf),
        host: Option<HostRows>,
        transposed: Option<(CountTransform, DeviceTransposed)>,
        canonical: bool,
    ) -> DeviceCsr {
        DeviceCsr {
            rows,
            cols,
            nnz: data.len(),
            indptr,
            indices,
            data,
            host: host.map(Arc::new),
            transposed: transposed.map_or_else(OnceLock::new, OnceLock::from),
            building: Mutex::new(None),
            // A canonical matrix serves scVI's term as it is.
            unique: if canonical {
                OnceLock::from(None)
            } else {
                OnceLock::new()
            },
        }
    }

    /// The matrix with each row's repeated columns summed into one entry (what scVI's fused
    /// term reads: it adds each non-zero's change to its gene once): the uploaded arrays
    /// themselves when no row repeats a column, the usual case, else a summed copy uploaded at
    /// the first call.
    #[allow(clippy::type_complexity)] // the three arrays the kernel takes
    pub fn unique_columns(
        &self,
        gpu: &Gpu,
    ) -> Result<(&DeviceBuf<u64>, &DeviceBuf<u32>, &DeviceBuf)> {
        if let (None, Some(host)) = (self.unique.get(), self.host()) {
            let (indptr, indices, data) = unique_columns(host);
            let copy = if indices.len() == self.data.len() {
                None
            } else {
                Some((
                    gpu.upload(&indptr)?,
                    gpu.upload(&indices)?,
                    gpu.upload(&data)?,
                ))
            };
            // A racing call made the same copy; either is right.
            let _ = self.unique.set(copy);
        }
        Ok(match self.unique.get() {
            Some(Some((p, i, d))) => (p, i, d),
            _ => (&self.indptr, &self.indices, &self.data),
        })
    }

    /// The host rows it was uploaded from (None for a canonical batch gathered or staged).
    pub fn host(&self) -> Option<CsrRef<'_, f32>> {
        let host = self.host.as_ref()?;
        Some(rows_of(host, self.rows, self.cols))
    }

    /// Starts building the backward's transposed index on the host pool, so it overlaps the
    /// kernels the forward and backward queue (the backward's sparse layer waits for it).
    pub(crate) fn start_transpose(&self, transform: CountTransform) {
        let Some(host) = (self.transposed.get().is_none())
            .then_some(self.host.as_ref())
            .flatten()
        else {
            return;
        };
        let mut building = self.building.lock().unwrap_or_else(|p| p.into_inner());
        if building.is_none() {
            let host = Arc::clone(host);
            let (rows, cols) = (self.rows, self.cols);
            let task =
                Background::spawn(move || host_transposed(rows_of(&host, rows, cols), transform));
            *building = Some((transform, task));
        }
    }

    fn transpose(&self, gpu: &Gpu, transform: CountTransform) -> Result<DeviceTransposed> {
        let started = self
            .building
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let built = match started {
            Some((t, task)) if t == transform => task.wait(),
            _ => None,
        };
        let Some(host) = self.host() else {
            // Canonical, without host rows: indexed on the device for this transform too.
            let arrays = (&self.indptr, &self.indices, &self.data);
            return super::resident_gpu::transposed(gpu, arrays, self.rows, self.cols, transform);
        };
        let (col_ptr, rows_of, values) = built.unwrap_or_else(|| host_transposed(host, transform));
        Ok(DeviceTransposed {
            col_ptr: gpu.upload(&col_ptr)?,
            rows_of: gpu.upload(&rows_of)?,
            values: gpu.upload(&values)?,
        })
    }
}

/// The host arrays as a CSR view.
fn rows_of(host: &HostRows, rows: usize, cols: usize) -> CsrRef<'_, f32> {
    CsrRef {
        rows,
        cols,
        indptr: &host.0,
        indices: &host.1,
        data: &host.2,
    }
}

/// The backward's transposed index as the arrays the kernel reads.
pub(crate) fn host_transposed(x: CsrRef<'_, f32>, transform: CountTransform) -> HostTransposed {
    let (col_ptr, entries) = super::transposed(x, transform);
    (
        col_ptr.into_iter().map(|c| c as u64).collect(),
        entries.iter().map(|&(r, _)| r as u32).collect(),
        entries.iter().map(|&(_, v)| v).collect(),
    )
}

/// The CSR with each row's repeated columns summed into one entry (the kernel adds each
/// non-zero's change to its gene once), as owned arrays; a copy when nothing repeats.
fn unique_columns(x: CsrRef<'_, f32>) -> (Vec<u64>, Vec<u32>, Vec<f32>) {
    // The entry of column j in the current row, if any (u64::MAX for none).
    let mut at = vec![u64::MAX; x.cols];
    let (mut indptr, mut indices, mut data) = (
        Vec::with_capacity(x.rows + 1),
        Vec::with_capacity(x.indices.len()),
        Vec::with_capacity(x.data.len()),
    );
    indptr.push(0u64);
    for r in 0..x.rows {
        let start = indices.len();
        for k in x.indptr[r] as usize..x.indptr[r + 1] as usize {
            let j = x.indices[k] as usize;
            match at[j] {
                e if e != u64::MAX && e as usize >= start => data[e as usize] += x.data[k],
                _ => {
                    at[j] = indices.len() as u64;
                    indices.push(x.indices[k]);
                    data.push(x.data[k]);
                }
            }
        }
        indptr.push(indices.len() as u64);
    }
    (indptr, indices, data)
}

fn tiles(outer: usize, d_out: usize) -> LaunchConfig {
    let threads = d_out.clamp(1, 256) as u32;
    LaunchConfig {
        grid_dim: (
            outer.max(1) as u32,
            d_out.div_ceil(threads as usize).max(1) as u32,
            1,
        ),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// As [`super::sparse_input_forward`], on the device.
pub fn sparse_input_forward(
    gpu: &Gpu,
    x: &DeviceCsr,
    transform: CountTransform,
    w: &View<'_>,
    d_out: usize,
    y: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        w.len() == x.cols * d_out && y.len() == x.rows * d_out,
        "sparse input: shapes"
    );
    if y.is_empty() {
        return Ok(());
    }
    let f = gpu.function("linear", CUDA_SOURCE, "sparse_input_forward")?;
    let (kind, scale) = transform.code();
    let (rows, d_out64) = (x.rows as u64, d_out as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&x.indptr)
        .arg(&x.indices)
        .arg(&x.data)
        .arg(&rows)
        .arg(&kind)
        .arg(&scale)
        .arg(w)
        .arg(&d_out64)
        .arg(y);
    x.start_transpose(transform);
    // SAFETY: the CSR arrays were validated at upload; w and y have the asserted sizes.
    unsafe { b.launch(tiles(x.rows, d_out)) }
        .map(|_| ())
        .map_err(failed("sparse_input_forward"))
}

/// As [`super::sparse_input_backward`] (overwrites dw): the products run on the device over
/// the transposed index, made once per batch (again if another transform is asked for).
pub fn sparse_input_backward(
    gpu: &Gpu,
    x: &DeviceCsr,
    transform: CountTransform,
    dy: &View<'_>,
    d_out: usize,
    dw: &mut ViewMut<'_>,
) -> Result<()> {
    assert!(
        dw.len() == x.cols * d_out && dy.len() == x.rows * d_out,
        "sparse input backward: shapes"
    );
    if dw.is_empty() {
        return Ok(());
    }
    let fresh;
    let t = match x.transposed.get() {
        Some((t, index)) if *t == transform => index,
        Some(_) => {
            fresh = x.transpose(gpu, transform)?;
            &fresh
        }
        None => {
            let index = x.transpose(gpu, transform)?;
            &x.transposed.get_or_init(|| (transform, index)).1
        }
    };
    let f = gpu.function("linear", CUDA_SOURCE, "sparse_input_backward")?;
    let (genes, d_out64) = (x.cols as u64, d_out as u64);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&t.col_ptr)
        .arg(&t.rows_of)
        .arg(&t.values)
        .arg(&genes)
        .arg(dy)
        .arg(&d_out64)
        .arg(dw);
    // SAFETY: col_ptr has genes+1 entries ending at the entry count; dy and dw have the asserted sizes.
    unsafe { b.launch(tiles(x.cols, d_out)) }
        .map(|_| ())
        .map_err(failed("sparse_input_backward"))
}

/// As [`super::csr_dense`], on the device: `out` zeroed, then a thread per row.
pub fn csr_dense(gpu: &Gpu, x: &DeviceCsr, binary: bool, out: &mut ViewMut<'_>) -> Result<()> {
    assert_eq!(out.len(), x.rows * x.cols, "csr dense: rows x cols values");
    if out.is_empty() {
        return Ok(());
    }
    gpu.stream()
        .memset_zeros(out)
        .map_err(crate::cuda::driver("zeroing a dense matrix"))?;
    let f = gpu.function("linear", CUDA_SOURCE, "csr_dense")?;
    let (rows, cols, binary) = (x.rows as u64, x.cols as u64, i32::from(binary));
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&x.indptr)
        .arg(&x.indices)
        .arg(&x.data)
        .arg(&rows)
        .arg(&cols)
        .arg(&binary)
        .arg(out);
    crate::cuda::launch(b, x.rows, "csr_dense")
}

/// As [`super::row_sums`], on the device (a warp per row: the same sums to rounding).
pub fn row_sums(gpu: &Gpu, x: &DeviceCsr, out: &mut ViewMut<'_>) -> Result<()> {
    assert_eq!(out.len(), x.rows, "row sums: one per row");
    if x.rows == 0 {
        return Ok(());
    }
    let f = gpu.function("linear", CUDA_SOURCE, "csr_row_sums")?;
    let rows = x.rows as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&x.indptr).arg(&x.data).arg(&rows).arg(out);
    crate::cuda::launch(b, 32 * x.rows, "csr_row_sums")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_columns_of_a_row_are_summed_once() {
        let (indptr, indices, data) = (
            vec![0u64, 3, 3, 6],
            vec![2u32, 0, 2, 1, 1, 2],
            vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0],
        );
        let x = CsrRef {
            rows: 3,
            cols: 3,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        };
        // Row 0: column 2 twice (1 + 3); row 1 empty; row 2: column 1 twice (4 + 5), column 2
        // once (a column repeated only across rows stays per row).
        assert_eq!(
            unique_columns(x),
            (vec![0, 2, 2, 4], vec![2, 0, 1, 2], vec![4.0, 2.0, 9.0, 6.0])
        );
    }
}
