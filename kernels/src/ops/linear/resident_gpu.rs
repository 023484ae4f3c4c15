//! Count matrices kept on the device for a whole run (issue 24: a training set that fits is
//! uploaded once) and the batches gathered from them there, so a step moves only its row list
//! over PCIe: the batch's entries are copied on the device ([`super::gather_rows`] on the host),
//! and its transposed index is built there too, in [`super::transposed`]'s order (per-block
//! counts by gene, their runs, a scan, then each block's rows placed in order), for matrices
//! whose rows name a gene at most once (checked once, at upload).
#![allow(unsafe_code)] // kernel launches: sizes are checked before each

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::gpu::{DeviceCsr, DeviceTransposed};
use super::{CUDA_SOURCE, CountTransform, CsrRef};
use crate::cuda::{Gpu, Result, driver as failed, grid};
use crate::cuda_cache::DeviceBuf;

/// A count matrix on the device whose rows name each column at most once, and its row pointers
/// on the host (a batch's are worked out there, so its size is known without a read-back).
#[derive(Debug)]
pub struct ResidentCsr {
    pub rows: usize,
    pub cols: usize,
    host_indptr: Vec<u64>,
    indptr: DeviceBuf<u64>,
    indices: DeviceBuf<u32>,
    data: DeviceBuf,
}

impl ResidentCsr {
    /// Uploads `x`. Its entries must be in range and no row may repeat a column
    /// ([`super::repeats_a_column`]): the caller checks, as the training loop does before it
    /// chooses to keep a matrix on the device.
    pub fn upload(gpu: &Gpu, x: CsrRef<'_, f32>) -> Result<ResidentCsr> {
        x.check_entries();
        assert!(
            !super::repeats_a_column(x),
            "resident counts: a row names a column twice"
        );
        Ok(ResidentCsr {
            rows: x.rows,
            cols: x.cols,
            host_indptr: x.indptr.to_vec(),
            indptr: gpu.upload(x.indptr)?,
            indices: gpu.upload(x.indices)?,
            data: gpu.upload(x.data)?,
        })
    }

    /// Device bytes of a resident matrix of `rows` rows and `nnz` non-zeros.
    pub fn bytes(rows: usize, nnz: usize) -> u64 {
        8 * (rows as u64 + 1) + 8 * nnz as u64
    }

    /// The row pointers of rows `rows` gathered in that order (what [`gather`] needs).
    pub fn batch_indptr(&self, rows: &[u32]) -> Vec<u64> {
        let mut indptr = Vec::with_capacity(rows.len() + 1);
        indptr.push(0u64);
        let mut at = 0u64;
        for &r in rows {
            let r = r as usize;
            at += self.host_indptr[r + 1] - self.host_indptr[r];
            indptr.push(at);
        }
        indptr
    }
}

/// Rows of `x` as a batch on the compute stream, with its transposed index for `transform`
/// queued behind: `rows`, the row list (at least `n` values; the first `n` are read), and
/// `indptr`, their row pointers in the batch ([`ResidentCsr::batch_indptr`], `n + 1` values
/// ending at `nnz`, which becomes the batch's), both already on the device; `nnz` > 0 (an
/// empty batch has nothing to gather or index on the device).
pub fn gather(
    gpu: &Gpu,
    x: &ResidentCsr,
    (rows, n): (&CudaSlice<u32>, usize),
    (indptr, nnz): (DeviceBuf<u64>, usize),
    transform: CountTransform,
) -> Result<DeviceCsr> {
    assert!(
        rows.len() >= n && indptr.len() == n + 1 && nnz > 0,
        "gather: {n} rows of a {}-row matrix, their row pointers and some entries",
        x.rows
    );
    let stream = gpu.stream();
    // Both are written whole by the gather below before any read.
    let (mut indices, mut data) = (gpu.alloc::<u32>(nnz)?, gpu.alloc::<f32>(nnz)?);
    let f = gpu.function("linear", CUDA_SOURCE, "csr_gather_entries")?;
    let n64 = n as u64;
    let mut b = stream.launch_builder(&f);
    b.arg(&x.indptr)
        .arg(&x.indices)
        .arg(&x.data)
        .arg(rows)
        .arg(&n64)
        .arg(&indptr)
        .arg(&mut indices)
        .arg(&mut data);
    // SAFETY: the row list names rows of x (`batch_indptr` indexed its host row pointers by
    // them) and indptr holds the gathered rows' lengths, ending at nnz, the size of both
    // outputs.
    unsafe { b.launch(per_row(n)) }.map_err(failed("csr_gather_entries"))?;
    indexed(gpu, (n, x.cols), (indptr, indices, data), transform)
}

/// A `rows` x `cols` matrix whose rows name each gene once, its arrays (indptr, indices, data)
/// already on the device, with the backward's transposed index for `transform` built there.
pub(crate) fn indexed(
    gpu: &Gpu,
    (rows, cols): (usize, usize),
    arrays: (DeviceBuf<u64>, DeviceBuf<u32>, DeviceBuf),
    transform: CountTransform,
) -> Result<DeviceCsr> {
    let index = transposed(
        gpu,
        (&arrays.0, &arrays.1, &arrays.2),
        rows,
        cols,
        transform,
    )?;
    Ok(DeviceCsr::from_parts(
        rows,
        cols,
        arrays,
        None,
        Some((transform, index)),
        true,
    ))
}

/// The transposed index of a CSR on the device whose rows name each column at most once, for
/// `transform`: the arrays [`super::transposed`] makes on the host.
pub(crate) fn transposed(
    gpu: &Gpu,
    (indptr, indices, data): (&DeviceBuf<u64>, &DeviceBuf<u32>, &DeviceBuf),
    rows: usize,
    cols: usize,
    transform: CountTransform,
) -> Result<DeviceTransposed> {
    let nnz = data.len();
    assert!(
        indptr.len() == rows + 1 && indices.len() == nnz && nnz > 0 && cols > 0,
        "transposed: a non-empty {rows} x {cols} CSR"
    );
    // Rows per block: at least 32 (the fill's barrier per row is cheap next to its entries),
    // more where blocks x cols counters would pass 2^24 (64 MiB).
    let span = rows.div_ceil(((1usize << 24) / cols).max(1)).max(32);
    let blocks = rows.div_ceil(span);
    let stream = gpu.stream();
    let (mut counts, mut col_ptr) = (
        gpu.alloc_zeros::<u32>(blocks * cols)?,
        gpu.alloc_zeros::<u64>(cols + 1)?,
    );
    let (rows64, span64, cols64, blocks64) = (rows as u64, span as u64, cols as u64, blocks as u64);
    let count = gpu.function("linear", CUDA_SOURCE, "transpose_count")?;
    let mut b = stream.launch_builder(&count);
    b.arg(indptr)
        .arg(indices)
        .arg(&rows64)
        .arg(&span64)
        .arg(&cols64)
        .arg(&mut counts);
    // SAFETY: counts holds blocks x cols counters; every index is below cols (checked at upload).
    unsafe { b.launch(per_row(blocks)) }.map_err(failed("transpose_count"))?;
    let runs = gpu.function("linear", CUDA_SOURCE, "transpose_runs")?;
    let mut b = stream.launch_builder(&runs);
    b.arg(&mut counts)
        .arg(&blocks64)
        .arg(&cols64)
        .arg(&mut col_ptr);
    // SAFETY: the same counters; col_ptr holds cols + 1.
    unsafe { b.launch(grid(cols)) }.map_err(failed("transpose_runs"))?;
    scan(gpu, &mut col_ptr)?;
    // The fill writes every one of the nnz places (each entry's column run holds it).
    let (mut rows_of, mut values) = (gpu.alloc::<u32>(nnz)?, gpu.alloc::<f32>(nnz)?);
    let (kind, scale) = transform.code();
    let fill = gpu.function("linear", CUDA_SOURCE, "transpose_fill")?;
    let mut b = stream.launch_builder(&fill);
    b.arg(indptr)
        .arg(indices)
        .arg(data)
        .arg(&rows64)
        .arg(&span64)
        .arg(&cols64)
        .arg(&kind)
        .arg(&scale)
        .arg(&col_ptr)
        .arg(&mut counts)
        .arg(&mut rows_of)
        .arg(&mut values);
    // SAFETY: as the count; col_ptr ends at nnz, the size of both outputs.
    unsafe { b.launch(per_row(blocks)) }.map_err(failed("transpose_fill"))?;
    Ok(DeviceTransposed {
        col_ptr,
        rows_of,
        values,
    })
}

/// In-place inclusive prefix sum by one block.
fn scan(gpu: &Gpu, x: &mut DeviceBuf<u64>) -> Result<()> {
    let f = gpu.function("linear", CUDA_SOURCE, "scan_inclusive_u64")?;
    let n = x.len() as u64;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(x).arg(&n);
    let one_block = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the kernel touches x[0..n] only.
    unsafe { b.launch(one_block) }
        .map(|_| ())
        .map_err(failed("scan_inclusive_u64"))
}

/// A block per row (or per row block), 256 threads over its entries.
fn per_row(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.clamp(1, 1 << 30) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose
    use super::*;

    fn gpu_or_skip() -> Option<Gpu> {
        crate::testing::gpu_or_skip("gathering and indexing on the device")
    }

    /// The device's gathered arrays and transposed index against the host's, array by array
    /// (the positions exactly; the values to the rounding of two log1p implementations).
    #[test]
    fn gathered_arrays_and_index_are_the_hosts() {
        let Some(gpu) = gpu_or_skip() else { return };
        let (n, cols) = (2000usize, 700usize);
        let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
        for r in 0..n {
            for j in (r % 3..cols).step_by(1 + r % 11) {
                indices.push(j as u32);
                data.push(((r + 3 * j) % 25) as f32);
            }
            indptr.push(indices.len() as u64);
        }
        let whole = CsrRef {
            rows: n,
            cols,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        };
        let resident = std::sync::Arc::new(ResidentCsr::upload(&gpu, whole).unwrap());
        let rows: Vec<usize> = (0..1500).map(|i| (i * 7919 + 5) % n).collect();
        let transform = CountTransform::NormalizedLog1p { scale: 1e4 };
        // Through the copy stream, as training stages them.
        let staged = gpu.staging().unwrap().stage_rows(&resident, &rows).unwrap();
        let batch = staged.into_device(&gpu, transform).unwrap();
        let host = super::super::gather_rows(whole, &rows);
        let stream = gpu.stream();
        assert_eq!(stream.clone_dtoh(&batch.indptr).unwrap(), host.0);
        assert_eq!(stream.clone_dtoh(&batch.indices).unwrap(), host.1);
        assert_eq!(stream.clone_dtoh(&batch.data).unwrap(), host.2);
        let x = CsrRef {
            rows: rows.len(),
            cols,
            indptr: &host.0,
            indices: &host.1,
            data: &host.2,
        };
        let (col_ptr, entries) = super::super::transposed(x, transform);
        let (_, index) = batch.transposed.get().unwrap();
        let col_ptr: Vec<u64> = col_ptr.iter().map(|&p| p as u64).collect();
        assert_eq!(stream.clone_dtoh(&index.col_ptr).unwrap(), col_ptr);
        let rows_of: Vec<u32> = entries.iter().map(|&(r, _)| r as u32).collect();
        assert_eq!(stream.clone_dtoh(&index.rows_of).unwrap(), rows_of);
        let values = stream.clone_dtoh(&index.values).unwrap();
        for (k, (g, &(_, c))) in values.iter().zip(&entries).enumerate() {
            assert!(
                (g - c).abs() <= 1e-6 + 1e-5 * c.abs(),
                "value {k}: {g} vs {c}"
            );
        }
    }

    /// Rows without entries make an empty batch of their shape, and the slot serves the next
    /// batch, whose rows have entries.
    #[test]
    fn a_batch_of_empty_rows_is_empty_and_the_next_is_gathered() {
        let Some(gpu) = gpu_or_skip() else { return };
        // Rows 0 and 2 empty; row 1 holds (0, 2.0), (3, 5.0).
        let (indptr, indices, data) = (vec![0u64, 0, 2, 2], vec![0u32, 3], vec![2.0f32, 5.0]);
        let whole = CsrRef {
            rows: 3,
            cols: 4,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        };
        let resident = std::sync::Arc::new(ResidentCsr::upload(&gpu, whole).unwrap());
        let staging = gpu.staging().unwrap();
        let transform = CountTransform::Log1p;
        let empty = staging.stage_rows(&resident, &[2, 0]).unwrap();
        let empty = empty.into_device(&gpu, transform).unwrap();
        assert_eq!((empty.rows, empty.cols, empty.data.len()), (2, 4, 0));
        assert_eq!(
            gpu.stream().clone_dtoh(&empty.indptr).unwrap(),
            vec![0, 0, 0]
        );
        let next = staging.stage_rows(&resident, &[1, 2, 1]).unwrap();
        let next = next.into_device(&gpu, transform).unwrap();
        assert_eq!(
            gpu.stream().clone_dtoh(&next.indptr).unwrap(),
            vec![0, 2, 2, 4]
        );
        assert_eq!(
            gpu.stream().clone_dtoh(&next.indices).unwrap(),
            vec![0, 3, 0, 3]
        );
        assert_eq!(gpu.download(&*next.data).unwrap(), vec![2.0, 5.0, 2.0, 5.0]);
    }
}
