//! The training set kept on the device (issue 24): when this rank's parts fit in a share of the
//! device's free memory, each part's count matrices are read once, in cell order, and uploaded;
//! every step's batches are then gathered there from their rows
//! ([`tessera_kernels::backend::Backend::stage_rows`]), so only the row lists cross from the
//! host, and their transposed indices are built there too. The batches, and so the trained
//! model, are the ones the host would have copied.

use std::ops::Range;
use std::sync::Arc;

use tessera_data::{Csr, Loader};
use tessera_kernels::ops::linear::repeats_a_column;
use tessera_models::ResidentData;

use crate::batch::csr_ref;
use crate::collective::TrainBackend;
use crate::records::FitError;

/// The share of the device's free memory (measured once the model is on it) this rank's
/// training set may take; the rest is the steps' activations and the batches' copies.
const SHARE_OF_FREE: f64 = 0.5;

/// One part's count matrices on the device, by model modality.
pub(crate) struct ResidentPart<B: TrainBackend> {
    pub part: usize,
    /// The part's first cell: a cell's row in the part's matrices is `cell - first_cell`.
    first_cell: u64,
    /// None where some cell of the part lacks the modality or a row names a gene twice (those
    /// batches are copied from the host).
    modalities: Vec<Option<Arc<B::Resident>>>,
}

impl<B: TrainBackend> ResidentPart<B> {
    /// Model modality `m`'s matrix, if it is on the device.
    pub fn matrix(&self, m: usize) -> Option<&Arc<B::Resident>> {
        self.modalities.get(m)?.as_ref()
    }

    /// The rows `cells` are in the part's matrices.
    pub fn rows(&self, cells: &[u64]) -> Vec<usize> {
        cells
            .iter()
            .map(|&c| (c - self.first_cell) as usize)
            .collect()
    }
}

/// One of this rank's parts: its number, its cells and its loader (every cell, in order).
pub(crate) type PartCells<'a> = (usize, Range<u64>, &'a Loader);

/// This rank's parts' matrices of model modalities `modalities` (loader modality indices) on
/// `device`, when `mode` asks for it and they fit; none otherwise. `store` names the data in
/// errors.
pub(crate) fn keep_on_device<B: TrainBackend>(
    device: &B,
    mode: ResidentData,
    parts: &[PartCells<'_>],
    modalities: &[usize],
    store: &str,
) -> Result<Vec<ResidentPart<B>>, FitError> {
    let wanted: u64 = parts.iter().map(|(_, _, l)| l.shard_bytes()).sum();
    let mib = |b: u64| b >> 20;
    let streamed = |why: String| {
        tracing::info!(
            "training set streamed from the host to {}: {why}",
            device.name()
        );
        Ok(Vec::new())
    };
    match (mode, device.free_memory()?) {
        (ResidentData::Never, _) => return streamed("resident_data = never".into()),
        (ResidentData::Auto, None) => return streamed("its memory is the host's".into()),
        (ResidentData::Auto, Some(free)) if wanted as f64 > SHARE_OF_FREE * free as f64 => {
            return streamed(format!(
                "{} MiB of counts, {} MiB free",
                mib(wanted),
                mib(free)
            ));
        }
        _ => {}
    }
    let kept = parts
        .iter()
        .map(|&(part, ref cells, loader)| {
            let matrices = read_part(store, loader, cells.clone(), modalities)?;
            let modalities = matrices
                .iter()
                .map(|m| {
                    m.as_ref()
                        .map(|x| device.resident_csr(csr_ref(x)).map(Arc::new))
                        .transpose()
                })
                .collect::<Result<_, _>>()?;
            Ok(ResidentPart {
                part,
                first_cell: cells.start,
                modalities,
            })
        })
        .collect::<Result<Vec<_>, FitError>>()?;
    tracing::info!(
        "training set kept on {}: {} MiB of counts",
        device.name(),
        mib(wanted)
    );
    Ok(kept)
}

/// Every cell of a part, in order, by model modality: None for a modality some cell lacks or
/// whose rows name a gene twice (the device indexes only matrices whose rows do not).
fn read_part(
    store: &str,
    loader: &Loader,
    cells: Range<u64>,
    modalities: &[usize],
) -> Result<Vec<Option<Csr>>, FitError> {
    let mut matrices: Vec<Option<Csr>> = vec![None; modalities.len()];
    let mut complete = vec![true; modalities.len()];
    let mut next = cells.start;
    for mb in loader.ordered().epoch(0) {
        let mb = mb?;
        // A row of the part's matrices is its cell's offset: the loader's ordered cells must be
        // the part's, in order.
        if mb.cells.iter().zip(next..).any(|(&c, n)| c != n) {
            return Err(out_of_order(store, &cells));
        }
        next += mb.cells.len() as u64;
        for (i, &m) in modalities.iter().enumerate() {
            let modality = &mb.modalities[m];
            complete[i] &= modality.present.iter().all(|&p| p);
            if !complete[i] {
                matrices[i] = None;
                continue;
            }
            matrices[i]
                .get_or_insert_with(|| {
                    // Sized once for the part: appends would hold up to twice its entries.
                    let nnz = usize::try_from(loader.shard_nnz(m)).unwrap_or(0);
                    Csr::with_capacity(modality.counts.n_cols, cells.end - cells.start, nnz)
                })
                .append_rows(&modality.counts);
        }
    }
    if next != cells.end {
        return Err(out_of_order(store, &cells));
    }
    Ok(matrices
        .into_iter()
        .map(|m| m.filter(|x| !repeats_a_column(csr_ref(x))))
        .collect())
}

fn out_of_order(store: &str, cells: &Range<u64>) -> FitError {
    FitError::Input {
        store: store.to_string(),
        reason: format!("the part of cells {cells:?} was not read whole and in order"),
    }
}
