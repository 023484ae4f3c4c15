//! Data-parallel training. A job's cells are cut into `parts` contiguous shards; every step's
//! batch is one batch from each shard (`batch_size / parts` cells each), and the job's workers
//! share the parts (rank r takes parts r, r + world, ...). Each step every rank computes its
//! parts' gradients, then one ring all-reduce sums the flat gradient (weighted by cells), the
//! BatchNorm statistics and the loss sums; every rank applies the same update to the same
//! weights. The data order, the random draws (per part) and BatchNorm's batches (per part)
//! depend on the parts alone, so 1, 2 or 4 workers over the same parts train the same model up
//! to the summation order of floating point.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tessera_data::{Dataset, Epoch, MiniBatch};
use tessera_kernels::backend::{In, Out, Storage};
use tessera_models::{LossTerms, Overlapped, PendingLoss, Trainer};

use crate::collective::{Collective, TrainBackend};
use crate::records::{EpochRecord, FitError, StepTimes};
use crate::ring::Ring;

/// Where this process trains: its device, the collective between the job's workers (its rank
/// and world size), the job's parts and what to tell the coordinator.
pub struct Placement<B: TrainBackend> {
    pub device: B,
    pub comm: Box<dyn Collective<B>>,
    /// The job's parts (`TrainConfig::parts` resolved); every worker of a job has the same.
    pub parts: usize,
    pub hooks: Box<dyn EpochHooks + Send>,
    /// Checkpoints go to `<out>/checkpoint/epoch-<n>` rather than `<out>/checkpoint`.
    pub checkpoint_per_epoch: bool,
    /// Load this checkpoint before training (the coordinator's last recorded one).
    pub resume_from: Option<std::path::PathBuf>,
}

impl<B: TrainBackend> std::fmt::Debug for Placement<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("device", &self.device.name())
            .field("rank", &self.comm.rank())
            .field("world", &self.comm.world())
            .field("parts", &self.parts)
            .finish()
    }
}

impl<B: TrainBackend> Placement<B> {
    /// One process training alone on `device`, one part per step, stopping after the step in
    /// which `stop` is set (`FitError::Stopped`, the step checkpointed for `--resume`).
    pub fn alone_until(device: B, stop: Arc<AtomicBool>) -> Placement<B> {
        Placement {
            device,
            comm: Box::new(Ring::single()),
            parts: 1,
            hooks: Box::new(StopOn(stop)),
            checkpoint_per_epoch: false,
            resume_from: None,
        }
    }

    /// The same placement with each step cut into `parts` parts.
    pub fn with_parts(self, parts: usize) -> Placement<B> {
        Placement { parts, ..self }
    }

    /// The parts this rank trains.
    pub fn my_parts(&self) -> impl Iterator<Item = usize> + '_ {
        (self.comm.rank()..self.parts).step_by(self.comm.world())
    }
}

/// A rank's end of an epoch.
#[derive(Debug)]
pub struct EpochEnd<'a> {
    pub epoch: usize,
    pub step: u64,
    /// Training cells this rank trained on in the epoch.
    pub cells: u64,
    /// Training ends with this epoch (the last, or early stopping).
    pub last: bool,
    /// The job's record (the same on every rank but for the timings).
    pub record: &'a EpochRecord,
    pub times: StepTimes,
}

/// What a trainer tells the world outside the ring.
pub trait EpochHooks {
    /// Whether to stop now (the group was re-formed or the job ended); asked before each step.
    fn interrupted(&self) -> bool {
        false
    }
    /// This process was asked to stop (SIGTERM): the request rides in the step's reduction,
    /// so every rank stops after the same step, which rank 0 checkpoints.
    fn stop_requested(&self) -> bool {
        false
    }
    /// This rank finished a step: `cells` of the epoch so far (for live status; may drop it).
    fn step_done(&mut self, _epoch: usize, _step: u64, _cells: u64) {}
    /// This rank finished an epoch. On the last epoch rank 0 says so after writing the outputs.
    fn epoch_done(&mut self, _end: &EpochEnd<'_>) -> Result<(), FitError> {
        Ok(())
    }
    /// Rank 0 saved a checkpoint after every rank said its epochs were done.
    fn checkpoint_saved(
        &mut self,
        _epochs_done: usize,
        _step: u64,
        _location: &Path,
    ) -> Result<(), FitError> {
        Ok(())
    }
}

/// No one to tell.
#[derive(Debug)]
pub struct Alone;

impl EpochHooks for Alone {}

/// No one to tell; stops (checkpointing the step) once the flag is set, e.g. by SIGTERM.
#[derive(Debug)]
pub struct StopOn(pub Arc<AtomicBool>);

impl EpochHooks for StopOn {
    fn stop_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The job's cells cut into `parts` contiguous shards: where the count matrix's chunks begin,
/// balancing non-zeros (AnnData), or evenly (MuData, whose modalities chunk differently). Each
/// shard needs a batch's worth of cells.
pub fn part_ranges(
    dataset: &Dataset,
    parts: usize,
    batch_size: usize,
) -> Result<Vec<Range<u64>>, FitError> {
    let n = dataset.n_obs();
    let invalid = |reason: String| FitError::Config {
        file: "[train]".into(),
        reason,
    };
    if parts == 1 {
        // One part: the whole store, whatever its size.
        return Ok(std::iter::once(0..n).collect());
    }
    if parts == 0 || batch_size / parts < 2 {
        return Err(invalid(format!(
            "parts = {parts} with batch_size = {batch_size}: expected 1 <= parts <= batch_size / 2 (BatchNorm needs two cells of each part)"
        )));
    }
    let ranges = match dataset {
        Dataset::AnnData(a) => {
            tessera_data::ShardPlan::for_matrix(&a.store, &a.matrix("X")?, parts)?.shards
        }
        Dataset::MuData(_) => (0..parts as u64)
            .map(|k| k * n / parts as u64..(k + 1) * n / parts as u64)
            .collect(),
    };
    if ranges.len() != parts || ranges.iter().any(|r| r.end - r.start < batch_size as u64) {
        return Err(invalid(format!(
            "parts = {parts}: {n} cells cut into {:?}; every part needs at least batch_size = {batch_size} cells",
            ranges
        )));
    }
    Ok(ranges)
}

/// Cells of part `k` in each step's batch: the batch size shared out, the remainder to the
/// first parts.
pub fn part_batch_size(batch_size: usize, parts: usize, k: usize) -> usize {
    batch_size / parts + usize::from(k < batch_size % parts)
}

/// One part's batches of an epoch, one batch ahead: a following batch of one cell (a fetch's
/// remainder) joins the one before, since BatchNorm needs two cells and every cell is trained
/// on once per epoch.
pub(crate) struct PartStream {
    pub part: usize,
    batches: Epoch,
    ahead: Option<MiniBatch>,
}

impl PartStream {
    pub fn new(part: usize, mut batches: Epoch) -> Result<PartStream, FitError> {
        let ahead = batches.next().transpose()?;
        Ok(PartStream {
            part,
            batches,
            ahead,
        })
    }

    pub fn next_batch(&mut self) -> Result<Option<MiniBatch>, FitError> {
        let Some(mut batch) = self.ahead.take() else {
            return Ok(None);
        };
        self.ahead = self.batches.next().transpose()?;
        while let Some(small) = self.ahead.take_if(|a| a.cells.len() < 2) {
            batch.append(&small);
            self.ahead = self.batches.next().transpose()?;
        }
        Ok(Some(batch))
    }

    pub fn more(&self) -> bool {
        self.ahead.is_some()
    }
}

/// Cell-weighted sums of loss terms.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Sums {
    pub reconstruction: f64,
    pub kl: f64,
    pub regularization: f64,
    pub supervised: f64,
    pub cells: usize,
}

impl Sums {
    pub fn add(&mut self, t: &LossTerms) {
        let w = t.cells as f64;
        self.reconstruction += t.reconstruction * w;
        self.kl += t.kl * w;
        self.regularization += t.regularization * w;
        self.supervised += t.supervised * w;
        self.cells += t.cells;
    }

    pub fn mean(&self, kl_weight: f64) -> LossTerms {
        let n = self.cells.max(1) as f64;
        let (reconstruction, kl, regularization, supervised) = (
            self.reconstruction / n,
            self.kl / n,
            self.regularization / n,
            self.supervised / n,
        );
        LossTerms {
            reconstruction,
            kl,
            regularization,
            supervised,
            loss: reconstruction + kl_weight * kl + regularization + supervised,
            cells: self.cells,
        }
    }

    /// The cell-weighted sums of what the host knows of `parts`' terms (the rest is summed on
    /// the device: `PendingLoss::add_device_sums`).
    fn of_host_terms<S: Storage>(parts: &[Arc<PendingLoss<S>>]) -> Sums {
        let mut sums = Sums::default();
        for part in parts {
            let [r, k, reg, sup] = part.host_sums(part.cells() as f64);
            sums.reconstruction += r;
            sums.kl += k;
            sums.regularization += reg;
            sums.supervised += sup;
            sums.cells += part.cells();
        }
        sums
    }

    const LEN: usize = 5;

    fn write(&self, out: &mut [f32]) {
        out[..Sums::LEN].copy_from_slice(
            &[
                self.reconstruction,
                self.kl,
                self.regularization,
                self.supervised,
                self.cells as f64,
            ]
            .map(|v| v as f32),
        );
    }

    fn read(from: &[f32]) -> Sums {
        let v = |i: usize| f64::from(from[i]);
        Sums {
            reconstruction: v(0),
            kl: v(1),
            regularization: v(2),
            supervised: v(3),
            cells: v(4).round() as usize,
        }
    }

    /// The sums over every rank (as f32 on the ring: loss sums of up to ~10^7 keep 6 digits).
    pub fn all_reduce<B: TrainBackend>(
        self,
        comm: &mut dyn Collective<B>,
    ) -> Result<Sums, FitError> {
        if comm.world() == 1 {
            return Ok(self);
        }
        let mut buf = [0f32; Sums::LEN];
        self.write(&mut buf);
        comm.reduce_sum_host(&mut buf)?;
        Ok(Sums::read(&buf))
    }
}

/// A step's result on every rank: the mean loss terms of the steps read back with it, in
/// step order (alone, a step's terms arrive with the next step, [`Overlapped`]; a step where no
/// rank had cells has none), whether any rank has another batch this epoch, and whether any rank
/// was asked to stop.
pub(crate) struct Stepped {
    pub terms: Vec<LossTerms>,
    pub more: bool,
    pub stop: bool,
}

/// The per-step reduction: one flat device buffer [gradients × cells | BatchNorm statistics |
/// parts, more, stop, loss sums | the reduced gradients' finiteness flag], one collective call,
/// and one download of its small tail (with the statistics) per step.
pub(crate) struct StepReducer<B: TrainBackend> {
    buf: B::Buf,
    n_params: usize,
    n_state: usize,
    start_state: B::Buf,
    flag: B::Buf,
    /// Alone with one part: the steps' terms read while the next step computes.
    overlapped: Overlapped<f32, B>,
}

const PARTS: usize = 0;
const MORE: usize = 1;
const STOP: usize = 2;
const SUMS: usize = 3;
const TAIL: usize = SUMS + Sums::LEN;
/// After the tail, not reduced: 1 if a reduced gradient is NaN or infinite.
const FLAG: usize = TAIL;

impl<B: TrainBackend> StepReducer<B> {
    pub fn new(trainer: &Trainer<f32, B>) -> Result<StepReducer<B>, FitError> {
        let model = &trainer.model;
        let (n_params, n_state) = (model.grads().len(), model.state().len());
        let device = model.backend();
        Ok(StepReducer {
            buf: device.zeros(n_params + n_state + TAIL + 1)?,
            n_params,
            n_state,
            start_state: device.zeros(n_state)?,
            flag: device.zeros(1)?,
            overlapped: Overlapped::default(),
        })
    }

    /// Gradients of this rank's parts of the step, summed with every other rank's, applied.
    /// `(more, stop)`: this rank has another batch, was asked to stop. `gradients(trainer,
    /// part)` computes one part's gradients (in the model), its loss terms left on the device.
    #[allow(clippy::too_many_arguments)] // one step's inputs; bundling them would only rename them
    pub fn step(
        &mut self,
        trainer: &mut Trainer<f32, B>,
        comm: &mut dyn Collective<B>,
        parts: &[usize],
        (more, stop): (bool, bool),
        kl_weight: f64,
        times: &mut StepTimes,
        mut gradients: impl FnMut(
            &mut Trainer<f32, B>,
            usize,
        ) -> Result<Arc<PendingLoss<B::Buf>>, FitError>,
    ) -> Result<Stepped, FitError> {
        let started = Instant::now();
        // Alone with one part: the model's own buffers, no copies, the terms of the step
        // before read while this one computes.
        if comm.world() == 1 && parts.len() <= 1 {
            let Some(&part) = parts.first() else {
                return Ok(Stepped {
                    terms: Vec::new(),
                    more,
                    stop,
                });
            };
            let pending = gradients(trainer, part)?;
            let terms = self.overlapped.push(trainer, pending)?;
            times.compute += started.elapsed().as_secs_f64();
            return Ok(Stepped {
                terms: terms.into_iter().collect(),
                more,
                stop,
            });
        }
        // A step alone before this one (a part's stream ended before the others') is read
        // first.
        let mut landed: Vec<LossTerms> = self.finish(trainer)?.into_iter().collect();
        let pending = self.accumulate(trainer, parts, &mut gradients)?;
        let (p, s) = (self.n_params, self.n_state);
        let device = trainer.model.backend().clone();
        let mut tail = [0f32; TAIL];
        tail[PARTS] = parts.len() as f32;
        tail[MORE] = f32::from(u8::from(more));
        tail[STOP] = f32::from(u8::from(stop));
        Sums::of_host_terms(&pending).write(&mut tail[SUMS..]);
        device.write(&tail, Out::part(&mut self.buf, p + s..p + s + TAIL))?;
        // The terms still on the device are summed into the tail there: the step reads them
        // with the reduction, its one wait for the device.
        for part in &pending {
            part.add_device_sums(&device, part.cells() as f64, &mut self.buf, p + s + SUMS)?;
        }
        let reducing = Instant::now();
        times.compute += (reducing - started).as_secs_f64();
        comm.reduce_sum(&device, Out::part(&mut self.buf, 0..p + s + TAIL))?;
        // The op reads the gradients and writes the flag: two views of one buffer cannot be
        // both, so the flag is made beside it and copied in.
        device.flag_non_finite(In::part(&self.buf, 0..p), Out::all(&mut self.flag))?;
        let flag = p + s + FLAG;
        device.copy(
            In::all(&self.flag),
            Out::part(&mut self.buf, flag..flag + 1),
        )?;
        // The statistics, the tail and the flag in one read back (the optimiser then needs no
        // gradient norm unless it clips): the step's one wait for the device (counted on the
        // emulated driver: docs/benchmarks.md).
        let mut host = device.download(In::part(&self.buf, p..p + s + TAIL + 1))?;
        let applying = Instant::now();
        times.allreduce += (applying - reducing).as_secs_f64();
        let (state, tail) = host.split_at_mut(s);
        let (total_parts, more, stop) = (tail[PARTS], tail[MORE] > 0.0, tail[STOP] > 0.0);
        let sums = Sums::read(&tail[SUMS..TAIL]);
        if sums.cells == 0 {
            device.copy(
                In::all(&self.start_state),
                Out::all(trainer.model.state_mut()),
            )?;
            return Ok(Stepped {
                terms: landed,
                more,
                stop,
            });
        }
        let terms = sums.mean(kl_weight);
        // A part's NaN reaches every rank through the sums: all stop at the same step.
        trainer.check_terms(&terms)?;
        let model = &mut trainer.model;
        device.copy(In::part(&self.buf, 0..p), Out::all(model.grads_mut()))?;
        device.scale(Out::all(model.grads_mut()), 1.0 / sums.cells as f32)?;
        // A division, not a product with the reciprocal: the parts' mean in the bits the CPU
        // ring path has always produced.
        state.iter_mut().for_each(|v| *v /= total_parts);
        device.write(state, Out::all(model.state_mut()))?;
        // Scaling by 1/cells keeps finite values finite and NaN or infinite ones not.
        trainer.apply(Some(tail[FLAG] == 0.0))?;
        times.compute += applying.elapsed().as_secs_f64();
        landed.push(terms);
        Ok(Stepped {
            terms: landed,
            more,
            stop,
        })
    }

    /// The terms of the last step taken alone, if not yet returned (waiting for them): at the
    /// end of an epoch, or before a step that reduces.
    pub fn finish(&mut self, trainer: &mut Trainer<f32, B>) -> Result<Option<LossTerms>, FitError> {
        Ok(self.overlapped.finish(trainer)?)
    }

    /// This rank's parts, one after another, each from the step's BatchNorm statistics:
    /// Σ cells × gradient and Σ statistics into the buffer; returns the parts' loss terms,
    /// still on the device.
    fn accumulate(
        &mut self,
        trainer: &mut Trainer<f32, B>,
        parts: &[usize],
        gradients: &mut impl FnMut(
            &mut Trainer<f32, B>,
            usize,
        ) -> Result<Arc<PendingLoss<B::Buf>>, FitError>,
    ) -> Result<Vec<Arc<PendingLoss<B::Buf>>>, FitError> {
        let (p, s) = (self.n_params, self.n_state);
        let device = trainer.model.backend().clone();
        device.zero(Out::part(&mut self.buf, 0..p + s))?;
        device.copy(
            In::all(trainer.model.state()),
            Out::all(&mut self.start_state),
        )?;
        let mut pending = Vec::with_capacity(parts.len());
        for &part in parts {
            // Each part's BatchNorm update starts from the step's statistics; the parts'
            // results are averaged, so the update does not depend on which rank ran which part.
            device.copy(
                In::all(&self.start_state),
                Out::all(trainer.model.state_mut()),
            )?;
            // Read nothing: the sum is checked once, after the all-reduce.
            let terms = gradients(trainer, part)?;
            let model = &trainer.model;
            device.axpy(
                terms.cells() as f32,
                In::all(model.grads()),
                Out::part(&mut self.buf, 0..p),
            )?;
            device.axpy(
                1.0,
                In::all(model.state()),
                Out::part(&mut self.buf, p..p + s),
            )?;
            pending.push(terms);
        }
        Ok(pending)
    }
}

#[cfg(test)]
mod tests {
    use tessera_kernels::backend::Cpu;
    use tessera_models::{Categories, TrainConfig, TrainError, Vae, VaeConfig};

    use super::*;

    fn trainer() -> Trainer<f32, Cpu> {
        let model = Vae::new(
            Cpu,
            VaeConfig::default(),
            &[("rna", 12)],
            Categories::default(),
            3,
        )
        .unwrap();
        Trainer::new(model, TrainConfig::default()).unwrap()
    }

    /// Part k's synthetic gradient and BatchNorm statistics (what a backward would leave).
    fn part_values(k: usize, n: usize, salt: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + k * 13) % 11) as f32 / (3.0 + salt) - 1.3)
            .collect()
    }

    /// The reduction through the device ops is, bit for bit, the host arithmetic the CPU ring
    /// path always did: grad = Σ cells_k · g_k / Σ cells_k, state = Σ s_k / parts (a division).
    #[test]
    fn a_step_over_three_parts_applies_the_cell_weighted_mean_in_the_host_bits() {
        let parts = [0usize, 1, 2];
        let cells = |k: usize| 5 + 3 * k;
        let (mut reduced, mut reference) = (trainer(), trainer());
        let (p, s) = (reduced.model.grads().len(), reduced.model.state().len());
        let mut reducer = StepReducer::new(&reduced).unwrap();
        let stepped = reducer
            .step(
                &mut reduced,
                &mut Ring::single(),
                &parts,
                (true, false),
                1.0,
                &mut StepTimes::default(),
                |t, k| {
                    t.model.grads_mut().copy_from_slice(&part_values(k, p, 0.0));
                    t.model.state_mut().copy_from_slice(&part_values(k, s, 1.0));
                    let terms = LossTerms {
                        reconstruction: k as f64,
                        cells: cells(k),
                        ..LossTerms::default()
                    };
                    Ok(PendingLoss::on_host(&terms, 1.0).into())
                },
            )
            .unwrap();
        assert!(stepped.more && !stepped.stop);
        let [terms] = stepped.terms[..] else {
            panic!("one step's terms, got {}", stepped.terms.len());
        };
        assert_eq!(terms.cells, 5 + 8 + 11);
        assert!((terms.reconstruction - (8.0 + 22.0) / 24.0).abs() < 1e-6);

        let (mut grad, mut state) = (vec![0f32; p], vec![0f32; s]);
        for &k in &parts {
            let w = cells(k) as f32;
            for (acc, g) in grad.iter_mut().zip(part_values(k, p, 0.0)) {
                *acc += g * w;
            }
            for (acc, v) in state.iter_mut().zip(part_values(k, s, 1.0)) {
                *acc += v;
            }
        }
        let inv = 1.0 / 24f32;
        grad.iter_mut().for_each(|g| *g *= inv);
        state.iter_mut().for_each(|v| *v /= 3.0);
        reference.model.grads_mut().copy_from_slice(&grad);
        reference.model.state_mut().copy_from_slice(&state);
        reference.apply(None).unwrap();
        assert_eq!(reduced.model.state(), reference.model.state());
        assert_eq!(reduced.model.values(), reference.model.values());
    }

    /// A part whose loss is NaN stops the step after the reduction, on every rank alike (the
    /// sums carry it), naming the step and the term; nothing is applied.
    #[test]
    fn a_part_with_a_nan_loss_stops_the_step_naming_it_and_changes_nothing() {
        let mut t = trainer();
        let before = t.model.values().clone();
        let mut reducer = StepReducer::new(&t).unwrap();
        let result = reducer.step(
            &mut t,
            &mut Ring::single(),
            &[0, 1],
            (true, false),
            1.0,
            &mut StepTimes::default(),
            |_, k| {
                let terms = LossTerms {
                    reconstruction: if k == 1 { f64::NAN } else { 2.0 },
                    cells: 4,
                    ..LossTerms::default()
                };
                Ok(PendingLoss::on_host(&terms, 1.0).into())
            },
        );
        match result {
            Err(FitError::Train(TrainError::NonFinite { step: 1, term, .. })) => {
                assert_eq!(term, "reconstruction loss");
            }
            Err(other) => panic!("expected step 1's reconstruction loss named, got {other}"),
            Ok(_) => panic!("a NaN loss was applied"),
        }
        assert_eq!(*t.model.values(), before);
        assert_eq!(t.step, 0);
    }
}
