//! One epoch of training steps: the loop that `fit` (every rank of a job) and query
//! fine-tuning share. Each step takes one batch from each of this rank's part streams, turns it
//! into the model's input, and hands the parts to the [`StepReducer`] (gradients, the step's
//! all-reduce, the update); the loop ends when every part's stream has ended on every rank, or
//! after the step in which a rank asked to stop. Taking and converting the batches, and starting
//! their uploads ([`tessera_kernels::backend::Backend::stage_csr`]), runs a step or two ahead on
//! a thread of its own, so a GPU computes while the next batch is prepared and copied; the
//! steps and their batches are the same as when it ran in line.

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use tessera_data::MiniBatch;
use tessera_models::{ENCODER_TRANSFORM, LossTerms, OnDevice, PendingLoss, Trainer};

use crate::batch::ModelBatch;
use crate::checkpoint::WithinEpoch;
use crate::collective::TrainBackend;
use crate::fit::on_pool;
use crate::parallel::{PartStream, Placement, StepReducer, Sums};
use crate::records::{FitError, StepTimes};
use crate::resident::ResidentPart;

/// One part's batch of a step, with the count matrices its model reads whole already on their
/// way to the device.
struct PartInput<B: TrainBackend> {
    part: usize,
    batch: ModelBatch,
    /// By modality; None where some cell lacks the modality (the model uploads those rows).
    staged: Vec<Option<B::Staged>>,
    /// The batch's covariates.
    covariates: Option<B::StagedValues>,
    /// The batch's label codes as f32, where it has labels.
    labels: Option<B::StagedValues>,
}

/// One part's batch as staged: its count matrices by modality (None: the model uploads the
/// rows), its covariates and its label codes (where it has labels).
pub struct StagedPart<'a, B: TrainBackend> {
    pub(crate) batch: &'a ModelBatch,
    pub(crate) staged: Vec<Option<B::Staged>>,
    pub(crate) covariates: Option<B::StagedValues>,
    pub(crate) labels: Option<B::StagedValues>,
}

impl<B: TrainBackend> std::fmt::Debug for StagedPart<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedPart({} rows)", self.batch.rows)
    }
}

/// One part's forward and backward, op by op, from its staged batch: gradients in the model,
/// terms left on the device.
pub(crate) fn eager<B: TrainBackend>(
    trainer: &mut Trainer<f32, B>,
    input: StagedPart<'_, B>,
    epoch: usize,
    part: usize,
) -> Result<Arc<PendingLoss<B::Buf>>, FitError> {
    let device = trainer.model.backend().clone();
    let on_device = OnDevice {
        counts: input
            .staged
            .into_iter()
            .map(|s| s.map(|s| device.staged_csr(s)).transpose())
            .collect::<Result<Vec<_>, _>>()?,
        covariates: input
            .covariates
            .map(|c| device.staged_values(c))
            .transpose()?,
        labels: input.labels.map(|l| device.staged_values(l)).transpose()?,
    };
    Ok(Arc::new(part_terms_on(
        trainer,
        input.batch,
        on_device,
        epoch,
        part,
    )?))
}

/// [`Trainer::part_terms`] of `batch` with `on_device` (what of it is already there), on the
/// pool as every step runs.
pub(crate) fn part_terms_on<B: TrainBackend>(
    trainer: &mut Trainer<f32, B>,
    batch: &ModelBatch,
    on_device: OnDevice<B::Csr, B::Buf>,
    epoch: usize,
    part: usize,
) -> Result<PendingLoss<B::Buf>, FitError> {
    Ok(on_pool(|| {
        batch.with(|b| trainer.part_terms(b, on_device, epoch, part as u64))
    })?)
}

/// What one step of this rank takes: a batch per part whose stream has one.
struct StepInputs<B: TrainBackend> {
    parts: Vec<PartInput<B>>,
    /// Some part's stream has a batch after these.
    more: bool,
    cells: u64,
}

/// The next step's batches, one from each stream that has one, converted to the model's input
/// and staged on `device` (gathered there from `resident` matrices where the part has them).
/// Once every stream has ended, a step without batches (this rank still takes part in the steps
/// of ranks that have data).
fn next_step<B: TrainBackend>(
    streams: &mut [PartStream],
    convert: &(impl Fn(MiniBatch) -> ModelBatch + Sync),
    device: &B,
    resident: &[ResidentPart<B>],
) -> Result<StepInputs<B>, FitError> {
    let mut step = StepInputs {
        parts: Vec::with_capacity(streams.len()),
        more: false,
        cells: 0,
    };
    for s in streams.iter_mut() {
        if let Some(mb) = s.next_batch()? {
            step.cells += mb.cells.len() as u64;
            let kept = resident.iter().find(|r| r.part == s.part);
            // Every resident modality of the batch gathers the same rows.
            let rows = kept.map_or_else(Vec::new, |r| r.rows(&mb.cells));
            let batch = convert(mb);
            let staged = batch
                .modalities
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    if m.present.is_some() {
                        return Ok(None);
                    }
                    match kept.and_then(|r| r.matrix(i)) {
                        Some(x) => device.stage_rows(x, &rows, ENCODER_TRANSFORM),
                        None => device.stage_csr(m.counts_ref(batch.rows), ENCODER_TRANSFORM),
                    }
                    .map(Some)
                })
                .collect::<Result<_, _>>()?;
            let covariates = Some(device.stage_values(&batch.covariates)?);
            let labels = batch
                .label_codes()
                .map(|codes| device.stage_values(&codes))
                .transpose()?;
            step.parts.push(PartInput {
                part: s.part,
                batch,
                staged,
                covariates,
                labels,
            });
        }
    }
    step.more = streams.iter().any(PartStream::more);
    Ok(step)
}

/// What one epoch's steps did on this rank.
#[derive(Debug)]
pub(crate) struct EpochSteps {
    pub started: Instant,
    pub times: StepTimes,
    /// The epoch's loss sums over every rank.
    pub sums: Sums,
    pub steps: u64,
    /// Seconds spent on the epoch before a resume within it.
    pub seconds_before: f64,
    /// Training cells this rank read in the epoch.
    pub my_cells: u64,
    /// Set when the epoch ended early on a stop request; true when this rank was asked.
    pub stopped: Option<bool>,
}

impl EpochSteps {
    /// Where a checkpoint of this (stopped) epoch stands.
    pub fn within(&self) -> WithinEpoch {
        WithinEpoch {
            steps: self.steps,
            sums: self.sums,
            seconds: self.seconds_before + self.started.elapsed().as_secs_f64(),
        }
    }
}

/// The trainer, where it trains and its step's reduction: what every step needs.
pub(crate) struct Stepper<'a, B: TrainBackend> {
    pub trainer: &'a mut Trainer<f32, B>,
    pub place: &'a mut Placement<B>,
    pub reducer: &'a mut StepReducer<B>,
    /// This rank's parts' counts kept on the device (empty: every batch is copied from the host).
    pub resident: &'a [ResidentPart<B>],
    /// The data's location, for errors.
    pub store: &'a str,
    /// Steps captured to replay (on a GPU: `replay.rs`), kept from epoch to epoch.
    pub replays: &'a mut B::Replays,
}

impl<B: TrainBackend> Stepper<'_, B> {
    /// The steps of epoch `epoch` over `streams` (one per part of this rank), each minibatch
    /// turned into the model's input by `convert`; `on_step` sees every step's all-reduced loss
    /// terms. `within`: a resume inside this epoch, whose steps are read again without
    /// training (the batches depend on the parts alone), their cells counted: the coordinator
    /// counts every cell of the epoch.
    pub fn epoch<E: From<FitError>>(
        &mut self,
        epoch: usize,
        mut streams: Vec<PartStream>,
        within: Option<WithinEpoch>,
        convert: impl Fn(MiniBatch) -> ModelBatch + Sync,
        mut on_step: impl FnMut(&LossTerms) -> Result<(), E>,
    ) -> Result<EpochSteps, E> {
        let mut done = EpochSteps {
            started: Instant::now(),
            times: StepTimes::default(),
            sums: Sums::default(),
            steps: 0,
            seconds_before: 0.0,
            my_cells: 0,
            stopped: None,
        };
        if let Some(within) = within {
            for s in &mut streams {
                for _ in 0..within.steps {
                    done.my_cells += s.next_batch()?.map_or(0, |mb| mb.cells.len() as u64);
                }
            }
            (done.sums, done.steps, done.seconds_before) =
                (within.sums, within.steps, within.seconds);
        }
        let kl_weight = self.trainer.config.kl_weight(epoch);
        let device = self.trainer.model.backend().clone();
        let resident = self.resident;
        std::thread::scope(|scope| {
            // The next steps' batches are converted and their uploads started on another
            // thread while this one computes: at most one waits in the channel, one is made.
            let (send, steps) = std::sync::mpsc::sync_channel(1);
            let convert = &convert;
            scope.spawn(move || {
                let mut streams = streams;
                loop {
                    let next = next_step(&mut streams, convert, &device, resident);
                    let failed = next.is_err();
                    if send.send(next).is_err() || failed {
                        return;
                    }
                }
            });
            self.steps(epoch, kl_weight, &steps, &mut done, &mut on_step)
        })?;
        Ok(done)
    }

    /// The training steps of an epoch, their inputs from `steps`, until every part's stream
    /// has ended on every rank or a rank asked to stop; the last step's terms read.
    fn steps<E: From<FitError>>(
        &mut self,
        epoch: usize,
        kl_weight: f64,
        steps: &Receiver<Result<StepInputs<B>, FitError>>,
        done: &mut EpochSteps,
        on_step: &mut impl FnMut(&LossTerms) -> Result<(), E>,
    ) -> Result<(), E> {
        loop {
            if self.place.hooks.interrupted() {
                return Err(FitError::Interrupted {
                    epoch,
                    step: self.trainer.step,
                }
                .into());
            }
            let waiting = Instant::now();
            let mut inputs = steps.recv().map_err(|_| FitError::Input {
                store: self.store.to_string(),
                reason: "the batch reader ended".into(),
            })??;
            done.my_cells += inputs.cells;
            done.times.data += waiting.elapsed().as_secs_f64();
            let parts: Vec<usize> = inputs.parts.iter().map(|p| p.part).collect();
            let stop = self.place.hooks.stop_requested();
            let (store, replays) = (self.store, &mut *self.replays);
            let stepped = self.reducer.step(
                self.trainer,
                self.place.comm.as_mut(),
                &parts,
                (inputs.more, stop),
                kl_weight,
                &mut done.times,
                |trainer, part| {
                    let input = inputs
                        .parts
                        .iter_mut()
                        .find(|p| p.part == part)
                        .ok_or_else(|| FitError::Input {
                            store: store.to_string(),
                            reason: format!("part {part} has no batch"),
                        })?;
                    let staged = StagedPart {
                        batch: &input.batch,
                        staged: std::mem::take(&mut input.staged),
                        covariates: input.covariates.take(),
                        labels: input.labels.take(),
                    };
                    B::part_terms(trainer, replays, staged, epoch, part)
                },
            )?;
            for terms in &stepped.terms {
                done.sums.add(terms);
                on_step(terms)?;
            }
            done.steps += 1;
            let step = self.trainer.step;
            self.place.hooks.step_done(epoch, step, done.my_cells);
            if stepped.stop {
                done.stopped = Some(stop);
                break;
            }
            if !stepped.more {
                break;
            }
        }
        // Read even after a stop request: the stopped step is checkpointed with its terms.
        if let Some(terms) = self.reducer.finish(self.trainer)? {
            done.sums.add(&terms);
            on_step(&terms)?;
        }
        Ok(())
    }
}
