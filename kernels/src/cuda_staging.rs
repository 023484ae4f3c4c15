//! Count matrices uploaded while the previous step computes (issue 24's copy stream): a second,
//! non-blocking stream copies from page-locked host buffers (the DMA engine reads them directly,
//! so the copy neither blocks the host nor queues behind the compute stream) into device staging
//! buffers; the compute stream waits for the copy on the GPU and copies the arrays out into its
//! own allocations (microseconds at device bandwidth), after which the slot is reused. The
//! sparse layer's transposed index is then built on the device for rows that name each gene once
//! (what stores hold; `resident_gpu::transposed`), and otherwise on the host and copied with
//! the matrix.
//!
//! Event tracking is off in our contexts ([`crate::cuda::Gpu::new`]), so every cross-stream
//! order here is an explicit event: `copied` (copy stream, after the upload) before the compute
//! stream reads a slot, `consumed` (compute stream, after the copy out) before the copy stream
//! overwrites it, and a host wait on `copied` before the host rewrites the page-locked buffers.
#![allow(unsafe_code)] // page-locked allocations: every buffer is written before it is read

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice};

use crate::cuda::{CudaError, Gpu, Result, driver};
use crate::cuda_cache::DeviceBuf;
use crate::ops::linear::gpu::{DeviceCsr, DeviceTransposed, host_transposed};
use crate::ops::linear::resident_gpu::ResidentCsr;
use crate::ops::linear::{CountTransform, CsrRef, repeats_a_column, resident_gpu};

/// The copy stream and its free slots (a slot in use belongs to its [`StagedCsr`]).
pub struct Staging {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    free: Mutex<Vec<Slot>>,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staging({})", self.ctx.ordinal())
    }
}

impl Staging {
    pub(crate) fn new(ctx: &Arc<CudaContext>) -> Result<Staging> {
        Ok(Staging {
            ctx: Arc::clone(ctx),
            stream: ctx.new_stream().map_err(driver("the copy stream"))?,
            free: Mutex::new(Vec::new()),
        })
    }

    /// Starts copying `x` (and, where a row repeats a gene, the backward's transposed index
    /// for `transform`, built here on the calling thread) to the device on the copy stream;
    /// callable from any thread.
    pub fn stage(
        self: &Arc<Self>,
        x: CsrRef<'_, f32>,
        transform: CountTransform,
    ) -> Result<StagedCsr> {
        x.check_entries();
        // Rows naming each gene once (what stores hold) are indexed on the device once copied:
        // the host's counting sort, and half the bytes, leave the step.
        let canonical = !x.data.is_empty() && !repeats_a_column(x);
        let index = (!canonical).then(|| host_transposed(x, transform));
        let slot = self.filled(|slot, to| {
            slot.indptr.fill(to, x.indptr)?;
            slot.indices.fill(to, x.indices)?;
            slot.data.fill(to, x.data)?;
            if let Some((col_ptr, rows_of, values)) = &index {
                slot.col_ptr.fill(to, col_ptr)?;
                slot.rows_of.fill(to, rows_of)?;
                slot.values.fill(to, values)?;
            }
            Ok(())
        })?;
        Ok(StagedCsr {
            staging: Arc::clone(self),
            slot: Some(slot),
            rows: x.rows,
            cols: x.cols,
            transform,
            nnz: x.data.len(),
            canonical,
            // A canonical batch is indexed from its device arrays, for any transform: it needs
            // no host copy.
            host: (!canonical).then(|| {
                (
                    par_to_vec(x.indptr),
                    par_to_vec(x.indices),
                    par_to_vec(x.data),
                )
            }),
        })
    }

    /// Starts copying a batch's row list and row pointers ([`ResidentCsr::batch_indptr`]) to
    /// the device on the copy stream, for a gather of those rows of `from`; callable from any
    /// thread.
    pub fn stage_rows(
        self: &Arc<Self>,
        from: &Arc<ResidentCsr>,
        rows: &[usize],
    ) -> Result<StagedRows> {
        let rows: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let indptr = from.batch_indptr(&rows);
        let slot = self.filled(|slot, to| {
            slot.indices.fill(to, &rows)?;
            slot.indptr.fill(to, &indptr)
        })?;
        Ok(StagedRows {
            staging: Arc::clone(self),
            slot: Some(slot),
            from: Arc::clone(from),
            indptr,
        })
    }

    /// Starts copying `values` (a batch's covariates) to the device on the copy stream;
    /// callable from any thread.
    pub fn stage_values(self: &Arc<Self>, values: &[f32]) -> Result<StagedValues> {
        let slot = self.filled(|slot, to| slot.data.fill(to, values))?;
        Ok(StagedValues {
            staging: Arc::clone(self),
            slot: Some(slot),
            n: values.len(),
        })
    }

    /// A free slot with `fill`'s copies queued on the copy stream and their event recorded.
    fn filled(&self, fill: impl FnOnce(&mut Slot, &CopyTo<'_>) -> Result<()>) -> Result<Slot> {
        let mut slot = self.free_slot()?;
        fill(
            &mut slot,
            &CopyTo {
                ctx: &self.ctx,
                stream: &self.stream,
            },
        )?;
        slot.copied
            .record(&self.stream)
            .map_err(driver("staging: recording the upload"))?;
        Ok(slot)
    }

    /// A slot whose last upload is done and whose device buffers the compute stream has copied
    /// out (both recorded before it came back to the free list), or a new one.
    fn free_slot(&self) -> Result<Slot> {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let slot = match reused {
            Some(slot) => slot,
            None => Slot::new(&self.ctx, &self.stream)?,
        };
        slot.copied
            .synchronize()
            .map_err(driver("staging: the last upload"))?;
        self.stream
            .wait(&slot.consumed)
            .map_err(driver("staging: the last copy out"))?;
        Ok(slot)
    }

    /// Hands a slot back once the compute stream has queued its last read of it.
    fn release(&self, slot: Slot, compute: &Arc<CudaStream>) -> Result<()> {
        slot.consumed
            .record(compute)
            .map_err(driver("staging: recording the copy out"))?;
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(slot);
        Ok(())
    }
}

/// A batch's row list and row pointers on their way to the device:
/// [`StagedRows::into_device`] gathers the rows there.
pub struct StagedRows {
    staging: Arc<Staging>,
    slot: Option<Slot>,
    from: Arc<ResidentCsr>,
    /// The row pointers, on the host too: an empty batch is made from them there.
    indptr: Vec<u64>,
}

impl std::fmt::Debug for StagedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedRows({})", self.indptr.len() - 1)
    }
}

impl StagedRows {
    /// The rows gathered on `gpu`'s compute stream into a batch, with its transposed index
    /// for `transform`, usable by every op queued after this call.
    pub fn into_device(mut self, gpu: &Gpu, transform: CountTransform) -> Result<DeviceCsr> {
        let slot = arrived(&mut self.slot, gpu)?;
        let n = self.indptr.len() - 1;
        let nnz = self.indptr[n] as usize;
        let gathered = if nnz == 0 {
            // Nothing to copy or index: the empty arrays, uploaded as any batch's.
            let empty = CsrRef {
                rows: n,
                cols: self.from.cols,
                indptr: &self.indptr,
                indices: &[],
                data: &[],
            };
            DeviceCsr::upload(gpu, empty)
        } else {
            let indptr = slot.indptr.copy_out(gpu, n + 1)?;
            let rows = slot.indices.device().expect("filled before it is read");
            resident_gpu::gather(gpu, &self.from, (rows, n), (indptr, nnz), transform)
        };
        // The gather, the slot's last reader, is queued (or nothing read it).
        self.staging.release(slot, gpu.stream())?;
        gathered
    }

    /// The resident matrix the rows are of.
    pub(crate) fn from(&self) -> &Arc<ResidentCsr> {
        &self.from
    }

    /// The rows' row pointers (`rows + 1`, ending at their entries).
    pub(crate) fn indptr(&self) -> &[u64] {
        &self.indptr
    }

    /// The row list and row pointers copied on `gpu`'s compute stream into the start of
    /// `rows` and `indptr`, for a gather queued after this call.
    pub(crate) fn write_into(
        mut self,
        gpu: &Gpu,
        rows: &mut DeviceBuf<u32>,
        indptr: &mut DeviceBuf<u64>,
    ) -> Result<()> {
        let slot = arrived(&mut self.slot, gpu)?;
        let n = self.indptr.len() - 1;
        slot.indices.copy_into(gpu, n, rows)?;
        slot.indptr.copy_into(gpu, n + 1, indptr)?;
        self.staging.release(slot, gpu.stream())
    }
}

/// Values on their way to the device: [`StagedValues::into_device`] copies them into a buffer of
/// the compute stream.
pub struct StagedValues {
    staging: Arc<Staging>,
    slot: Option<Slot>,
    n: usize,
}

impl std::fmt::Debug for StagedValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedValues({})", self.n)
    }
}

impl StagedValues {
    /// The values in a buffer of `gpu`'s stream, usable by every op queued on it after this
    /// call.
    pub fn into_device(mut self, gpu: &Gpu) -> Result<DeviceBuf> {
        let slot = arrived(&mut self.slot, gpu)?;
        let values = slot.data.copy_out(gpu, self.n)?;
        self.staging.release(slot, gpu.stream())?;
        Ok(values)
    }

    /// How many values.
    pub fn len(&self) -> usize {
        self.n
    }

    /// No values.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The values copied on `gpu`'s compute stream into the start of `to`.
    pub fn write_into(mut self, gpu: &Gpu, to: &mut DeviceBuf) -> Result<()> {
        let slot = arrived(&mut self.slot, gpu)?;
        slot.data.copy_into(gpu, self.n, to)?;
        self.staging.release(slot, gpu.stream())
    }
}

/// A count matrix on its way to the device: [`StagedCsr::into_device`] on the compute stream
/// makes it a [`DeviceCsr`]. Dropped unused, its slot is freed once its copies are done.
pub struct StagedCsr {
    staging: Arc<Staging>,
    slot: Option<Slot>,
    rows: usize,
    cols: usize,
    transform: CountTransform,
    nnz: usize,
    /// No row names a column twice: the transposed index is made on the device, not copied.
    canonical: bool,
    /// The host rows, kept where the matrix is not canonical (scVI's term sums its repeats).
    host: Option<(Vec<u64>, Vec<u32>, Vec<f32>)>,
}

impl std::fmt::Debug for StagedCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedCsr({} x {})", self.rows, self.cols)
    }
}

impl StagedCsr {
    /// (rows, columns, entries).
    pub(crate) fn shape(&self) -> (usize, usize, usize) {
        (self.rows, self.cols, self.nnz)
    }

    /// The count transform its index is made for.
    pub(crate) fn transform(&self) -> CountTransform {
        self.transform
    }

    /// No row names a column twice (its index is built on the device).
    pub(crate) fn canonical(&self) -> bool {
        self.canonical
    }

    /// The arrays copied on `gpu`'s compute stream into the start of `to`'s (which has room
    /// for them), `to` then holding this matrix's entries.
    pub(crate) fn write_into(mut self, gpu: &Gpu, to: &mut DeviceCsr) -> Result<()> {
        let slot = arrived(&mut self.slot, gpu)?;
        slot.indptr.copy_into(gpu, self.rows + 1, &mut to.indptr)?;
        slot.indices.copy_into(gpu, self.nnz, &mut to.indices)?;
        slot.data.copy_into(gpu, self.nnz, &mut to.data)?;
        to.nnz = self.nnz;
        self.staging.release(slot, gpu.stream())
    }

    /// The matrix in allocations of `gpu`'s stream, usable by every op queued on it after this
    /// call.
    pub fn into_device(mut self, gpu: &Gpu) -> Result<DeviceCsr> {
        let compute = gpu.stream();
        let slot = arrived(&mut self.slot, gpu)?;
        let nnz = self.nnz;
        let arrays = (
            slot.indptr.copy_out(gpu, self.rows + 1)?,
            slot.indices.copy_out(gpu, nnz)?,
            slot.data.copy_out(gpu, nnz)?,
        );
        let copied = (!self.canonical)
            .then(|| {
                Ok::<_, CudaError>(DeviceTransposed {
                    col_ptr: slot.col_ptr.copy_out(gpu, self.cols + 1)?,
                    rows_of: slot.rows_of.copy_out(gpu, nnz)?,
                    values: slot.values.copy_out(gpu, nnz)?,
                })
            })
            .transpose()?;
        self.staging.release(slot, compute)?;
        let transposed = match copied {
            Some(index) => index,
            None => resident_gpu::transposed(
                gpu,
                (&arrays.0, &arrays.1, &arrays.2),
                self.rows,
                self.cols,
                self.transform,
            )?,
        };
        Ok(DeviceCsr::from_parts(
            self.rows,
            self.cols,
            arrays,
            self.host.take(),
            Some((self.transform, transposed)),
            self.canonical,
        ))
    }
}

/// A staged value's slot, taken (once: `into_device` and `write_into` consume what holds it),
/// with the compute stream made to wait for its upload.
fn arrived(slot: &mut Option<Slot>, gpu: &Gpu) -> Result<Slot> {
    let slot = slot
        .take()
        .expect("a staged value is taken once (into_device and write_into consume it)");
    gpu.stream()
        .wait(&slot.copied)
        .map_err(driver("waiting for a staged upload"))?;
    Ok(slot)
}

/// Page-locked host buffers and device buffers for one matrix and its transposed index, and
/// the two events that order their reuse.
struct Slot {
    indptr: Lane<u64>,
    indices: Lane<u32>,
    data: Lane<f32>,
    col_ptr: Lane<u64>,
    rows_of: Lane<u32>,
    values: Lane<f32>,
    copied: CudaEvent,
    consumed: CudaEvent,
    stream: Arc<CudaStream>,
}

impl Slot {
    fn new(ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>) -> Result<Slot> {
        let event = || ctx.new_event(None).map_err(driver("staging: an event"));
        Ok(Slot {
            indptr: Lane::default(),
            indices: Lane::default(),
            data: Lane::default(),
            col_ptr: Lane::default(),
            rows_of: Lane::default(),
            values: Lane::default(),
            copied: event()?,
            consumed: event()?,
            stream: Arc::clone(stream),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // The page-locked buffers are freed at once, the device buffers in copy-stream order:
        // neither may go while a copy from or out of them is queued.
        let _ = self.copied.synchronize();
        let _ = self.stream.wait(&self.consumed);
    }
}

/// Where a lane's values go: the context's page-locked memory, then the copy stream.
struct CopyTo<'a> {
    ctx: &'a Arc<CudaContext>,
    stream: &'a Arc<CudaStream>,
}

/// One array's page-locked host buffer and device buffer, grown to the largest array seen.
struct Lane<T> {
    buffers: Option<(PinnedHostSlice<T>, CudaSlice<T>)>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Lane { buffers: None }
    }
}

impl<T: DeviceRepr + Copy + Send + Sync + cudarc::driver::ValidAsZeroBits> Lane<T> {
    /// `values` into the host buffer, then queued for the device buffer on the copy stream.
    fn fill(&mut self, to: &CopyTo<'_>, values: &[T]) -> Result<()> {
        let CopyTo { ctx, stream } = *to;
        let (host, device) = match &mut self.buffers {
            Some(buffers) if buffers.0.len() >= values.len() => buffers,
            buffers => {
                // Room for growth, so that batches of nearly equal size do not reallocate.
                let n = (values.len() + values.len() / 4).max(1);
                // SAFETY: both buffers are written (below) before any read of them.
                buffers.insert(unsafe {
                    (
                        ctx.alloc_pinned::<T>(n)
                            .map_err(driver("staging: page-locked memory"))?,
                        stream
                            .alloc::<T>(n)
                            .map_err(driver("staging: device memory"))?,
                    )
                })
            }
        };
        if values.is_empty() {
            return Ok(());
        }
        let n = values.len();
        par_copy(
            &mut host
                .as_mut_slice()
                .map_err(driver("staging: page-locked memory"))?[..n],
            values,
        );
        // The source is page-locked, so the driver queues the copy without waiting for it.
        let source = &host
            .as_slice()
            .map_err(driver("staging: page-locked memory"))?[..n];
        stream
            .memcpy_htod(source, &mut device.slice_mut(0..n))
            .map_err(driver("staging: the upload"))
    }

    /// The device buffer, once filled.
    fn device(&self) -> Option<&CudaSlice<T>> {
        self.buffers.as_ref().map(|(_, device)| device)
    }

    /// The first `n` values, copied on `gpu`'s compute stream into the start of `to`.
    fn copy_into(&self, gpu: &Gpu, n: usize, to: &mut DeviceBuf<T>) -> Result<()> {
        match &self.buffers {
            Some((_, device)) => gpu.copy_into(&device.slice(0..n), &mut to.slice_mut(0..n)),
            None if n == 0 => Ok(()),
            None => panic!("staging: a lane is filled before it is copied out"),
        }
    }

    /// The first `n` values, copied on `gpu`'s compute stream into a buffer of it.
    fn copy_out(&self, gpu: &Gpu, n: usize) -> Result<DeviceBuf<T>> {
        // The copy writes every value before any op reads them.
        let mut out = gpu.alloc::<T>(n)?;
        self.copy_into(gpu, n, &mut out)?;
        Ok(out)
    }
}

/// Copies in 1 MiB pieces on the rayon pool: a Census-size batch stages ~25 MB a step, which one
/// thread copies in a few milliseconds, longer than the GPU step it has to keep ahead of.
fn par_copy<T: Copy + Send + Sync>(to: &mut [T], from: &[T]) {
    let piece = (1 << 20) / std::mem::size_of::<T>().max(1);
    to.par_chunks_mut(piece)
        .zip(from.par_chunks(piece))
        .for_each(|(t, f)| t.copy_from_slice(f));
}

fn par_to_vec<T: Copy + Default + Send + Sync>(from: &[T]) -> Vec<T> {
    let mut to = vec![T::default(); from.len()];
    par_copy(&mut to, from);
    to
}
