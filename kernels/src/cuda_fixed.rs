//! A batch's source kept in device buffers that outlive it, for a training step captured as a
//! CUDA graph (`cuda_graph`): a replay reads what the buffers hold at its launch. Each staged
//! batch is copied into them outside the graph (the copy stream's event cannot be waited on
//! inside one); inside it, [`FixedBatch::to_device`] makes the step's matrix from them, as the
//! eager step makes it from its staging slot. Batches of one shape differ in their entries, so
//! the entry buffers have room for more than the first batch's: the kernels read each row's
//! span from the row pointers, and what lies past the batch's last entry is never read.

use std::sync::Arc;

use crate::backend::cuda::Staged;
use crate::cuda::{Gpu, Result};
use crate::cuda_cache::DeviceBuf;
use crate::ops::linear::CountTransform;
use crate::ops::linear::gpu::DeviceCsr;
use crate::ops::linear::resident_gpu::{self, ResidentCsr};

/// Where a fixed batch's matrix comes from.
enum Source {
    /// Copied whole: the arrays, the entries' with room for `capacity`.
    Copied(Box<DeviceCsr>),
    /// Gathered from a resident matrix: the row list and the rows' row pointers.
    Rows {
        from: Arc<ResidentCsr>,
        rows: DeviceBuf<u32>,
        indptr: DeviceBuf<u64>,
        nnz: usize,
    },
}

/// Device buffers a captured step reads its batch from: batches of one number of rows and one
/// source, with up to `capacity` entries each.
pub struct FixedBatch {
    source: Source,
    rows: usize,
    capacity: usize,
    transform: CountTransform,
}

impl std::fmt::Debug for FixedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "FixedBatch({} rows, {} entries)",
            self.rows, self.capacity
        )
    }
}

/// A staged batch's (rows, columns, entries), whether a replay can read it from fixed buffers
/// (its rows name each gene once, so its index is built on the device; it has entries), and
/// its resident source.
fn described(staged: &Staged) -> ((usize, usize, usize), bool, Option<&Arc<ResidentCsr>>) {
    match staged {
        Staged::Copied(x) => {
            let shape = x.shape();
            (shape, x.canonical() && shape.2 > 0, None)
        }
        Staged::Rows(x, _) => {
            let indptr = x.indptr();
            let n = indptr.len() - 1;
            let nnz = indptr[n] as usize;
            ((n, x.from().cols, nnz), nnz > 0, Some(x.from()))
        }
    }
}

impl FixedBatch {
    /// Buffers for batches like `staged` (its rows and source) with room for `capacity`
    /// entries (at least its own), zeroed; None where a replay could not read such a batch
    /// from fixed buffers: its rows repeat a gene (their index is built on the host) or it has
    /// no entries.
    pub fn for_batch(gpu: &Gpu, staged: &Staged, capacity: usize) -> Result<Option<FixedBatch>> {
        let ((rows, cols, nnz), replayable, from) = described(staged);
        if !replayable {
            return Ok(None);
        }
        let capacity = capacity.max(nnz);
        let source = match (staged, from) {
            (Staged::Rows(..), Some(from)) => Source::Rows {
                from: Arc::clone(from),
                rows: gpu.alloc_zeros::<u32>(rows)?,
                indptr: gpu.alloc_zeros::<u64>(rows + 1)?,
                nnz: 0,
            },
            _ => Source::Copied(Box::new(DeviceCsr::from_parts(
                rows,
                cols,
                (
                    gpu.alloc_zeros::<u64>(rows + 1)?,
                    gpu.alloc_zeros::<u32>(capacity)?,
                    gpu.alloc_zeros::<f32>(capacity)?,
                ),
                None,
                None,
                true,
            ))),
        };
        Ok(Some(FixedBatch {
            source,
            rows,
            capacity,
            transform: staged.transform(),
        }))
    }

    /// The entries of `staged`.
    pub fn entries(staged: &Staged) -> usize {
        described(staged).0.2
    }

    /// Whether a replay could read a batch like `staged` from fixed buffers
    /// ([`FixedBatch::for_batch`] makes them).
    pub fn readable(staged: &Staged) -> bool {
        described(staged).1
    }

    /// Whether `staged` can be written into these buffers: a batch a replay can read, of the
    /// same rows, columns, source and transform, with at most `capacity` entries.
    pub fn fits(&self, staged: &Staged) -> bool {
        let ((rows, cols, nnz), replayable, from) = described(staged);
        let same_source = match (&self.source, from) {
            (Source::Copied(x), None) => x.cols == cols,
            (Source::Rows { from: mine, .. }, Some(from)) => Arc::ptr_eq(mine, from),
            _ => false,
        };
        replayable
            && same_source
            && rows == self.rows
            && nnz <= self.capacity
            && staged.transform() == self.transform
    }

    /// Copies `staged` (which [`FixedBatch::fits`]) into the buffers on `gpu`'s compute stream,
    /// for the ops queued after this call.
    pub fn write(&mut self, gpu: &Gpu, staged: Staged) -> Result<()> {
        assert!(
            self.fits(&staged),
            "a fixed batch takes batches that fit it"
        );
        let entries = Self::entries(&staged);
        match (&mut self.source, staged) {
            (Source::Copied(x), Staged::Copied(staged)) => staged.write_into(gpu, x),
            (
                Source::Rows {
                    rows, indptr, nnz, ..
                },
                Staged::Rows(staged, _),
            ) => {
                *nnz = entries;
                staged.write_into(gpu, rows, indptr)
            }
            _ => unreachable!("fits checked the source"),
        }
    }

    /// The batch now in the buffers as the step's matrix, with its transposed index, made on
    /// `gpu`'s compute stream from what the buffers hold when the work runs (inside a graph:
    /// at each replay).
    pub fn to_device(&self, gpu: &Gpu) -> Result<DeviceCsr> {
        match &self.source {
            Source::Copied(x) => x.copied(gpu, self.transform),
            Source::Rows {
                from,
                rows,
                indptr,
                nnz,
            } => {
                let indptr = gpu.copy_of(&indptr.slice(..))?;
                let gathered = resident_gpu::gather(
                    gpu,
                    from,
                    (rows, self.rows),
                    (indptr, self.capacity),
                    self.transform,
                )?;
                Ok(gathered.holding(*nnz))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose
    use super::*;
    use crate::ops::linear::CsrRef;

    type Host = (Vec<u64>, Vec<u32>, Vec<f32>);

    /// `n` rows of 40 columns, row r holding columns r % 5, r % 5 + step, ... (step 1 + r % 7),
    /// from row `first` on; `repeat`: the first row names its first column twice.
    fn rows(first: usize, n: usize, repeat: bool) -> Host {
        let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
        for r in first..first + n {
            for j in (r % 5..40).step_by(1 + r % 7) {
                indices.push(j as u32);
                data.push(((r + 3 * j) % 9 + 1) as f32);
            }
            indptr.push(indices.len() as u64);
        }
        if repeat {
            indices[1] = indices[0];
        }
        (indptr, indices, data)
    }

    fn csr(x: &Host) -> CsrRef<'_, f32> {
        CsrRef {
            rows: x.0.len() - 1,
            cols: 40,
            indptr: &x.0,
            indices: &x.1,
            data: &x.2,
        }
    }

    const T: CountTransform = CountTransform::Log1p;

    /// A matrix's entries and its transposed index as the host reads them: its arrays up to
    /// its entries, the index's up to the same count.
    fn read(gpu: &Gpu, x: &DeviceCsr) -> (Host, Host) {
        let s = gpu.stream();
        let n = x.nnz;
        let (_, index) = x.transposed.get().unwrap();
        (
            (
                s.clone_dtoh(&x.indptr).unwrap(),
                s.clone_dtoh(&x.indices).unwrap()[..n].to_vec(),
                s.clone_dtoh(&x.data).unwrap()[..n].to_vec(),
            ),
            (
                s.clone_dtoh(&index.col_ptr).unwrap(),
                s.clone_dtoh(&index.rows_of).unwrap()[..n].to_vec(),
                s.clone_dtoh(&index.values).unwrap()[..n].to_vec(),
            ),
        )
    }

    /// `staged` fits the buffers, and the matrix made from them once it is written is `eager`'s.
    fn assert_makes(gpu: &Gpu, fixed: &mut FixedBatch, staged: Staged, eager: &DeviceCsr) {
        assert!(fixed.fits(&staged));
        fixed.write(gpu, staged).unwrap();
        let made = fixed.to_device(gpu).unwrap();
        assert_eq!(made.nnz, eager.nnz);
        assert_eq!(read(gpu, &made), read(gpu, eager));
    }

    /// Batches copied into fixed buffers (or their rows, gathered from a resident matrix) make
    /// the matrix and index the eager step makes from the staged batch, for a first batch, a
    /// smaller one after it and the first again (what the buffers hold past the batch's entries
    /// is never read); a batch with more entries than the room, of other rows, or whose rows
    /// repeat a gene does not fit; the last cannot be kept at all.
    #[test]
    fn a_fixed_batch_makes_the_staged_batchs_matrix() {
        let Some(gpu) = crate::testing::gpu_or_skip("fixed batches") else {
            return;
        };
        let staging = gpu.staging().unwrap();
        let copied = |x: &Host| Staged::Copied(Box::new(staging.stage(csr(x), T).unwrap()));
        let eager = |x: &Host| staging.stage(csr(x), T).unwrap().into_device(&gpu).unwrap();
        let (first, smaller) = (rows(0, 12, false), rows(30, 12, false));
        assert!(smaller.2.len() < first.2.len());
        let mut fixed = FixedBatch::for_batch(&gpu, &copied(&first), 0)
            .unwrap()
            .unwrap();
        for x in [&first, &smaller, &first] {
            assert_makes(&gpu, &mut fixed, copied(x), &eager(x));
        }
        let mut grown = first.clone();
        grown.1.push(39);
        grown.2.push(1.0);
        *grown.0.last_mut().unwrap() += 1;
        assert!(!fixed.fits(&copied(&grown)), "more entries than the room");
        assert!(!fixed.fits(&copied(&rows(0, 11, false))), "other rows");
        let repeats = rows(0, 12, true);
        assert!(!fixed.fits(&copied(&repeats)));
        assert!(
            FixedBatch::for_batch(&gpu, &copied(&repeats), 1000)
                .unwrap()
                .is_none()
        );

        // Rows of a resident matrix: the row list and row pointers fixed, the entries gathered.
        let whole = rows(0, 60, false);
        let resident = Arc::new(ResidentCsr::upload(&gpu, csr(&whole)).unwrap());
        let listed =
            |r: &[usize]| Staged::Rows(Box::new(staging.stage_rows(&resident, r).unwrap()), T);
        let (a, b): (Vec<usize>, Vec<usize>) = ((0..12).collect(), (30..42).rev().collect());
        let mut fixed = FixedBatch::for_batch(&gpu, &listed(&a), 0)
            .unwrap()
            .unwrap();
        for r in [&a, &b, &a] {
            let host = crate::ops::linear::gather_rows(csr(&whole), r);
            assert_makes(&gpu, &mut fixed, listed(r), &eager(&host));
        }
        // Rows whose step is 1 hold the most entries.
        let fullest: Vec<usize> = (0..12).map(|k| (7 * k) % 63).collect();
        assert!(!fixed.fits(&listed(&fullest)), "more entries");
        assert!(!fixed.fits(&copied(&first)), "another source");
    }
}
