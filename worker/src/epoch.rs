//! One epoch of training steps: the loop that `fit` (every rank of a job) and query
//! fine-tuning share. Each step takes one batch from each of this rank's part streams, turns it
//! into the model's input, and hands the parts to the [`StepReducer`] (gradients, the step's
//! all-reduce, the update); the loop ends when every part's stream has ended on every rank, or
//! after the step in which a rank asked to stop.

use std::time::Instant;

use tessera_data::MiniBatch;
use tessera_models::{LossTerms, Trainer};

use crate::batch::ModelBatch;
use crate::checkpoint::WithinEpoch;
use crate::collective::TrainBackend;
use crate::fit::on_pool;
use crate::parallel::{PartStream, Placement, StepReducer, Sums};
use crate::records::{FitError, StepTimes};

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
    /// The data's location, for errors.
    pub store: &'a str,
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
        convert: impl Fn(&MiniBatch) -> ModelBatch,
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
        loop {
            if self.place.hooks.interrupted() {
                return Err(FitError::Interrupted {
                    epoch,
                    step: self.trainer.step,
                }
                .into());
            }
            let waiting = Instant::now();
            let mut batches = Vec::with_capacity(streams.len());
            for s in &mut streams {
                if let Some(mb) = s.next_batch()? {
                    done.my_cells += mb.cells.len() as u64;
                    batches.push((s.part, convert(&mb)));
                }
            }
            let more = streams.iter().any(PartStream::more);
            done.times.data += waiting.elapsed().as_secs_f64();
            let parts: Vec<usize> = batches.iter().map(|(k, _)| *k).collect();
            let stop = self.place.hooks.stop_requested();
            let store = self.store;
            let stepped = self.reducer.step(
                self.trainer,
                self.place.comm.as_mut(),
                &parts,
                (more, stop),
                kl_weight,
                &mut done.times,
                |trainer, part| {
                    let (_, batch) = batches.iter().find(|(k, _)| *k == part).ok_or_else(|| {
                        FitError::Input {
                            store: store.to_string(),
                            reason: format!("part {part} has no batch"),
                        }
                    })?;
                    Ok(on_pool(|| {
                        batch.with(|b| trainer.part_gradients(b, epoch, part as u64))
                    })?)
                },
            )?;
            if let Some(terms) = stepped.terms {
                done.sums.add(&terms);
                on_step(&terms)?;
            }
            done.steps += 1;
            let step = self.trainer.step;
            self.place.hooks.step_done(epoch, step, done.my_cells);
            if stepped.stop {
                done.stopped = Some(stop);
                return Ok(done);
            }
            if !stepped.more {
                return Ok(done);
            }
        }
    }
}
