//! The optimisation loop's step: KL warm-up, Adam or AdamW, gradient clipping and NaN/Inf detection
//! that names the step and the term. Epochs, data and validation live with the caller (the CLI
//! on one node, the worker in a cluster), which hands minibatches to [`Trainer::step`], or, to
//! all-reduce in between, to [`Trainer::gradients`] then [`Trainer::apply`], or, to read each
//! step while the next computes, to [`Trainer::part_terms`] then [`Overlapped::push`].

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tessera_kernels::Real;
use tessera_kernels::backend::{Backend, EngineError, In, Out};
use tessera_kernels::ops::optim::AdamW;

use crate::layers::Mode;
use crate::pending::{PendingLoss, ReadingLoss};
use crate::vae::{LossTerms, OnDevice, Vae, VaeBatch};

/// Optimisation settings; defaults are scvi-tools' (Adam with L2 weight decay, lr 1e-3, eps 1e-2, weight decay
/// 1e-6, batch 128, KL warm-up over 400 epochs, 10% validation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Epochs; None: scvi-tools' rule min(400, round(400 · 20,000 / cells)).
    pub max_epochs: Option<usize>,
    pub batch_size: usize,
    pub lr: f64,
    /// Adam (weight decay as an L2 term in the gradient: scvi-tools' default) or AdamW.
    pub optimizer: Optimizer,
    pub weight_decay: f64,
    pub adam_eps: f64,
    /// KL weight rises linearly from 0 to `max_kl_weight` over this many epochs (0: no warm-up).
    pub kl_warmup_epochs: usize,
    pub max_kl_weight: f64,
    /// floor(fraction · cells) are held out for validation (scvi-tools' split).
    pub validation_fraction: f64,
    /// Validation cells are held in memory: at most this many.
    pub max_validation_cells: usize,
    /// Stop after this many epochs without a lower validation negative ELBO (None: never).
    pub early_stopping_patience: Option<usize>,
    /// Clip the global gradient norm to this (None: no clipping).
    pub clip_norm: Option<f64>,
    /// Multiply the learning rate by `lr_factor` after more than `lr_patience` epochs without a
    /// validation ELBO lower than the best by more than `lr_threshold` (scvi-tools'
    /// `reduce_lr_on_plateau`, PyTorch's ReduceLROnPlateau in "abs" mode), down to `lr_min`.
    pub reduce_lr_on_plateau: bool,
    pub lr_factor: f64,
    pub lr_patience: usize,
    pub lr_threshold: f64,
    pub lr_min: f64,
    /// Parts each step's batch is cut into, one per data shard (None: one part alone, the
    /// job's world size in a cluster). The results depend on the parts, not on how many
    /// workers share them, so a job keeps its parts when it loses or gains a worker.
    /// BatchNorm normalises over each part (PyTorch DDP without SyncBatchNorm, at world size =
    /// parts).
    pub parts: Option<usize>,
    /// Write a resumable checkpoint every this many epochs (and always at the end; None: only
    /// at the end).
    pub checkpoint_every: Option<usize>,
    pub seed: u64,
    /// On a GPU, let cuBLAS run the f32 GEMMs on TF32 tensor cores (10-bit mantissa inputs,
    /// f32 accumulation: several times the f32 rate, ~1e-3 relative error per product).
    /// Ignored on the CPU.
    pub tf32: bool,
    /// Whether the training set's count matrices are kept on the device and each step's
    /// batches gathered there, so that only their row lists cross from the host.
    pub resident_data: ResidentData,
    /// On a GPU, capture each step shape's forward and backward as a CUDA graph once it has
    /// run twice, and replay it from then on: the same bits, queued by one launch instead of
    /// ~80. Only for models whose steps read their batches through the device alone
    /// ([`crate::Vae::replayable_step`]). Ignored on the CPU.
    pub cuda_graphs: bool,
}

/// Where the training set's counts live during training ([`TrainConfig::resident_data`]). The
/// trained model is the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResidentData {
    /// On a GPU, when this rank's parts take at most half of its free memory.
    #[default]
    Auto,
    /// On any device, whatever it takes (on the CPU a second copy in host memory, which only
    /// tests want).
    Always,
    /// Every batch is copied from the host.
    Never,
}

/// scvi-tools' `optimizer` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    Adam,
    AdamW,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_epochs: None,
            batch_size: 128,
            lr: 1e-3,
            optimizer: Optimizer::Adam,
            weight_decay: 1e-6,
            adam_eps: 1e-2,
            kl_warmup_epochs: 400,
            max_kl_weight: 1.0,
            validation_fraction: 0.1,
            max_validation_cells: 10_000,
            early_stopping_patience: Some(45),
            clip_norm: None,
            reduce_lr_on_plateau: false,
            lr_factor: 0.6,
            lr_patience: 30,
            lr_threshold: 0.0,
            lr_min: 0.0,
            parts: None,
            checkpoint_every: Some(10),
            seed: 0,
            tf32: false,
            resident_data: ResidentData::Auto,
            cuda_graphs: true,
        }
    }
}

impl TrainConfig {
    pub fn epochs(&self, n_cells: u64) -> usize {
        self.max_epochs.unwrap_or_else(|| {
            ((400.0 * 20_000.0 / n_cells.max(1) as f64).round() as usize).clamp(1, 400)
        })
    }

    /// Cells held out for validation out of `n_cells`: floor(fraction · n), at most the cap.
    pub fn validation_cells(&self, n_cells: u64) -> u64 {
        ((n_cells as f64 * self.validation_fraction).floor() as u64)
            .min(self.max_validation_cells as u64)
    }

    /// The KL weight of an epoch (0-based), scvi-tools' linear warm-up.
    pub fn kl_weight(&self, epoch: usize) -> f64 {
        if self.kl_warmup_epochs == 0 {
            return self.max_kl_weight;
        }
        self.max_kl_weight * (epoch as f64 / self.kl_warmup_epochs as f64).min(1.0)
    }
}

/// The learning-rate schedule's state: best monitored value and epochs since, current rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plateau {
    pub best: f64,
    pub bad_epochs: usize,
    pub lr: f64,
}

impl Plateau {
    pub fn new(lr: f64) -> Plateau {
        Plateau {
            best: f64::INFINITY,
            bad_epochs: 0,
            lr,
        }
    }

    /// Records an epoch's monitored value; returns the (possibly reduced) learning rate.
    pub fn observe(&mut self, value: f64, config: &TrainConfig) -> f64 {
        if value < self.best - config.lr_threshold {
            self.best = value;
            self.bad_epochs = 0;
        } else {
            self.bad_epochs += 1;
        }
        if config.reduce_lr_on_plateau && self.bad_epochs > config.lr_patience {
            self.lr = (self.lr * config.lr_factor).max(config.lr_min);
            self.bad_epochs = 0;
        }
        self.lr
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(
        "step {step}: the {term} is {value} (not finite); lower the learning rate, enable clip_norm, or check the input for NaN/Inf"
    )]
    NonFinite {
        step: u64,
        term: &'static str,
        value: f64,
    },
    #[error(
        "step {step}: a gradient is NaN or infinite (the step was not applied); lower the learning rate, enable clip_norm, or check the input for NaN/Inf"
    )]
    NonFiniteGradient { step: u64 },
}

/// A step's loss terms and whether its gradients are all finite, read together.
#[derive(Debug, Clone, Copy)]
pub struct Gradients {
    pub terms: LossTerms,
    /// For [`Trainer::apply`]: gradients known finite need no norm unless clipped. False where
    /// not known: with `clip_norm` set the flag is not read (the norm is computed anyway).
    pub finite: bool,
}

/// A model and its optimiser state, on the model's backend.
#[derive(Debug)]
pub struct Trainer<T: Real, B: Backend<T>> {
    pub model: Vae<T, B>,
    pub config: TrainConfig,
    opt: AdamW,
    /// Adam's first and second moments, with the parameters' layout.
    pub m: B::Buf,
    pub v: B::Buf,
    /// Steps taken (the next step is `step + 1`).
    pub step: u64,
    /// Sorted, disjoint ranges of the parameters the optimiser changes; None: all of them.
    trainable: Option<Vec<Range<usize>>>,
    /// Ranges of the BatchNorm state kept as they were (frozen layers), with their values.
    kept_state: Vec<(Range<usize>, B::Buf)>,
}

impl<T: Real, B: Backend<T>> Trainer<T, B> {
    pub fn new(model: Vae<T, B>, config: TrainConfig) -> Result<Self, TrainError> {
        let n = model.layout.len();
        let m = model.backend().zeros(n)?;
        let v = model.backend().zeros(n)?;
        let opt = AdamW {
            lr: config.lr,
            eps: config.adam_eps,
            weight_decay: config.weight_decay,
            decoupled: config.optimizer == Optimizer::AdamW,
            ..AdamW::default()
        };
        Ok(Trainer {
            model,
            config,
            opt,
            m,
            v,
            step: 0,
            trainable: None,
            kept_state: Vec::new(),
        })
    }

    pub fn lr(&self) -> f64 {
        self.opt.lr
    }

    /// Sets the learning rate of the following steps (the schedule's decision).
    pub fn set_lr(&mut self, lr: f64) {
        self.opt.lr = lr;
    }

    /// From now on only `ranges` of the parameters change (query fine-tuning after surgery):
    /// the others, and their Adam moments, stay as they are.
    pub fn freeze_except(&mut self, ranges: Vec<Range<usize>>) {
        let trainable = crate::surgery::merge_ranges(ranges);
        // The backward then skips weight gradients of layers with nothing to train.
        self.model.trained = Some(trainable.clone());
        self.trainable = Some(trainable);
    }

    /// Keeps `ranges` of the BatchNorm running statistics as they are now: training batches
    /// still normalise by their own statistics, but the frozen layers' running statistics (what
    /// evaluation uses) stay the reference's.
    pub fn freeze_state(&mut self, ranges: Vec<Range<usize>>) -> Result<(), TrainError> {
        let b = self.model.backend().clone();
        self.kept_state = crate::surgery::merge_ranges(ranges)
            .into_iter()
            .map(|r| {
                let mut kept = b.zeros(r.len())?;
                b.copy(In::part(&self.model.state, r.clone()), Out::all(&mut kept))?;
                Ok((r, kept))
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(())
    }

    /// One optimisation step on a minibatch.
    pub fn step(&mut self, batch: VaeBatch<'_, T>, epoch: usize) -> Result<LossTerms, TrainError> {
        let g = self.gradients(batch, epoch)?;
        self.apply(Some(g.finite))?;
        Ok(g.terms)
    }

    /// Loss terms and gradients (in `model.grads`) of the next step, checked for NaN/Inf.
    pub fn gradients(
        &mut self,
        batch: VaeBatch<'_, T>,
        epoch: usize,
    ) -> Result<Gradients, TrainError> {
        self.part_gradients(batch, OnDevice::default(), epoch, 0)
    }

    /// [`Trainer::gradients`] of part `part` of a step's batch ([`Trainer::part_terms`]),
    /// its terms read ([`Trainer::read_terms`]).
    pub fn part_gradients(
        &mut self,
        batch: VaeBatch<'_, T>,
        on_device: OnDevice<B::Csr, B::Buf>,
        epoch: usize,
        part: u64,
    ) -> Result<Gradients, TrainError> {
        let pending = self.part_terms(batch, on_device, epoch, part)?;
        self.read_terms(&pending)
    }

    /// The gradients (in `model.grads`) of part `part` of a step's batch (data-parallel
    /// training cuts each step's batch into parts), its loss terms left on the device: nothing
    /// is read. The part draws its own dropout masks and latent noise, so a part's gradient is
    /// the same whichever worker computes it; part 0 draws what a whole batch does.
    /// `on_device`: what of the batch is already on the device ([`Vae::forward_backward`]).
    pub fn part_terms(
        &mut self,
        batch: VaeBatch<'_, T>,
        on_device: OnDevice<B::Csr, B::Buf>,
        epoch: usize,
        part: u64,
    ) -> Result<PendingLoss<B::Buf>, TrainError> {
        let step = self.step + 1;
        let seed = self.config.seed ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let pending = self.model.forward_backward(
            batch,
            on_device,
            self.config.kl_weight(epoch),
            Mode::Train { seed, step },
        )?;
        let b = self.model.backend().clone();
        for (r, kept) in &self.kept_state {
            b.copy(In::all(kept), Out::part(&mut self.model.state, r.clone()))?;
        }
        Ok(pending)
    }

    /// The terms of [`Trainer::part_terms`] and whether every gradient now in `model.grads`
    /// is finite, in one read (on a GPU the step's one wait); an error naming the step and
    /// the term if a loss term is not finite.
    pub fn read_terms(&self, pending: &PendingLoss<B::Buf>) -> Result<Gradients, TrainError> {
        let b = self.model.backend();
        // Clipping computes the gradients' norm anyway, which refuses NaN/Inf: no flag then.
        if self.config.clip_norm.is_some() {
            let terms = pending.resolve(b)?;
            self.check_terms(&terms)?;
            return Ok(Gradients {
                terms,
                finite: false,
            });
        }
        let flag = self.gradient_flag()?;
        let (terms, flag) = pending.resolve_with(b, &[&flag])?;
        self.check_terms(&terms)?;
        Ok(Gradients {
            terms,
            finite: read_finite(&flag),
        })
    }

    /// [`Backend::flag_non_finite`] of the gradients now in the model, left on the device.
    fn gradient_flag(&self) -> Result<B::Buf, TrainError> {
        let b = self.model.backend();
        let mut flag = b.output_buf(1)?;
        b.flag_non_finite(In::all(&self.model.grads), Out::all(&mut flag))?;
        Ok(flag)
    }

    /// An error naming the next step and the term if a loss term is NaN or infinite.
    pub fn check_terms(&self, terms: &LossTerms) -> Result<(), TrainError> {
        check_terms_of(self.step + 1, terms)
    }

    /// Clips (if configured) and applies the gradients in `model.grads`: Adam or AdamW.
    /// `finite`: whether `Backend::flag_non_finite` found every one of them finite since they
    /// were last written ([`Gradients::finite`]); None: unknown, so their norm is computed to
    /// refuse NaN/Inf (on a GPU a second wait for the device per step, hence the flag).
    pub fn apply(&mut self, finite: Option<bool>) -> Result<(), TrainError> {
        let step = self.step + 1;
        let ranges = self.trained_ranges();
        let b = self.model.backend().clone();
        if finite != Some(true) || self.config.clip_norm.is_some() {
            check_and_clip(
                &b,
                &mut self.model.grads,
                &ranges,
                self.config.clip_norm,
                step,
            )?;
        }
        self.update(None)
    }

    /// AdamW over the trainable ranges, skipped on the device where `skip` (one value) is not
    /// 0; counts the step.
    fn update(&mut self, skip: Option<&B::Buf>) -> Result<(), TrainError> {
        let step = self.step + 1;
        let b = self.model.backend().clone();
        for r in self.trained_ranges() {
            b.adamw_step(
                &self.opt,
                step,
                Out::part(&mut self.model.values, r.clone()),
                In::part(&self.model.grads, r.clone()),
                Out::part(&mut self.m, r.clone()),
                Out::part(&mut self.v, r.clone()),
                skip.map(In::all),
            )?;
        }
        self.step = step;
        Ok(())
    }

    /// The ranges of the parameters the optimiser changes.
    fn trained_ranges(&self) -> Vec<Range<usize>> {
        match &self.trainable {
            Some(ranges) => ranges.clone(),
            None => std::iter::once(0..self.model.layout.len()).collect(),
        }
    }

    /// Validation loss terms of a batch (running statistics, no dropout, sampled latent), left
    /// on the device: a validation pass reads all its batches' terms at once
    /// ([`PendingLoss::resolve_all`]), so a GPU waits once per pass, not once per batch.
    pub fn validate(
        &mut self,
        batch: VaeBatch<'_, T>,
        epoch: usize,
    ) -> Result<PendingLoss<B::Buf>, TrainError> {
        Ok(self.model.forward_only(
            batch,
            self.config.kl_weight(epoch),
            Mode::Validate {
                seed: self.config.seed ^ 0x5eed,
                step: 0,
            },
        )?)
    }
}

/// Whether a [`Trainer::gradient_flag`] read back (the only extra value of its read) says
/// every gradient is finite.
fn read_finite<T: Real>(flag: &[Vec<T>]) -> bool {
    flag.concat().first().is_some_and(|f| f.f64() == 0.0)
}

/// An error naming `step` and the term if a loss term is NaN or infinite.
fn check_terms_of(step: u64, terms: &LossTerms) -> Result<(), TrainError> {
    for (term, value) in [
        ("reconstruction loss", terms.reconstruction),
        ("KL divergence", terms.kl),
    ] {
        if !value.is_finite() {
            return Err(TrainError::NonFinite { step, term, value });
        }
    }
    Ok(())
}

/// Steps applied one after another, each one's loss terms read while the next one computes:
/// on a GPU the host then waits for a step's terms with the next step already queued, so the
/// device never idles through the read (issue 24). Every step's terms come out once, in step
/// order, one step late ([`Overlapped::push`], then [`Overlapped::finish`] for the last).
///
/// A step whose gradients are not all finite is skipped on the device (the flag is computed
/// there and read with the terms); the host learns it one step later and stops with an error
/// naming that step, before queuing any further update, so the parameters and Adam's moments
/// are those of the step before it, as when the flag was read first. A step whose loss alone is
/// not finite (its gradients finite) is applied before the error names it. With `clip_norm`
/// the gradients' norm is needed on the host before the update, so each step is read before it
/// is applied (its terms still come out one step late).
#[derive(Debug)]
pub struct Overlapped<T: Real, B: Backend<T>> {
    queued: Option<Queued<T, B>>,
}

/// The last step pushed: its terms on their way, or already read.
#[derive(Debug)]
enum Queued<T: Real, B: Backend<T>> {
    Reading {
        step: u64,
        reading: ReadingLoss<B::Buf, B::Download>,
    },
    Read(LossTerms),
}

impl<T: Real, B: Backend<T>> Default for Overlapped<T, B> {
    fn default() -> Self {
        Overlapped { queued: None }
    }
}

impl<T: Real, B: Backend<T>> Overlapped<T, B> {
    /// Queues the update of the step whose gradients are in the model and whose terms are
    /// `pending` ([`Trainer::part_terms`], or a replay's: shared with its graph); returns the
    /// terms of the step pushed before it, waiting for them while this one computes.
    pub fn push(
        &mut self,
        trainer: &mut Trainer<T, B>,
        pending: impl Into<Arc<PendingLoss<B::Buf>>>,
    ) -> Result<Option<LossTerms>, TrainError> {
        let pending = pending.into();
        if trainer.config.clip_norm.is_some() {
            let g = trainer.read_terms(&pending)?;
            let before = self.finish(trainer)?;
            trainer.apply(Some(g.finite))?;
            self.queued = Some(Queued::Read(g.terms));
            return Ok(before);
        }
        let flag = trainer.gradient_flag()?;
        let reading = pending.start_read(trainer.model.backend(), &[&flag])?;
        // The step before is read before this one's update is queued: a failed step stops
        // training with no later update applied.
        let before = self.finish(trainer)?;
        trainer.update(Some(&flag))?;
        self.queued = Some(Queued::Reading {
            step: trainer.step,
            reading,
        });
        Ok(before)
    }

    /// The terms of the last step pushed (waiting for them), if not yet returned; an error
    /// naming it if a term or a gradient was not finite (the step is then not counted).
    pub fn finish(&mut self, trainer: &mut Trainer<T, B>) -> Result<Option<LossTerms>, TrainError> {
        let (step, reading) = match self.queued.take() {
            None => return Ok(None),
            Some(Queued::Read(terms)) => return Ok(Some(terms)),
            Some(Queued::Reading { step, reading }) => (step, reading),
        };
        let (terms, flag) = reading.finish(trainer.model.backend())?;
        let gradients = if read_finite(&flag) {
            Ok(())
        } else {
            Err(TrainError::NonFiniteGradient { step })
        };
        let checked = check_terms_of(step, &terms).and(gradients);
        if checked.is_err() {
            // Not applied (gradients) or to be redone (loss): the step does not count.
            trainer.step = step - 1;
        }
        checked.map(|()| Some(terms))
    }
}

/// The norm of `grads` over `ranges`: an error (naming `step`) if it is not finite; the
/// gradients scaled to `clip_norm` where they exceed it.
fn check_and_clip<T: Real, B: Backend<T>>(
    b: &B,
    grads: &mut B::Buf,
    ranges: &[Range<usize>],
    clip_norm: Option<f64>,
    step: u64,
) -> Result<(), TrainError> {
    let norm = match ranges {
        [one] => b.grad_norm(In::part(grads, one.clone()))?,
        _ => ranges
            .iter()
            .map(|r| b.grad_norm(In::part(grads, r.clone())).map(|n| n * n))
            .sum::<Result<f64, _>>()?
            .sqrt(),
    };
    if !norm.is_finite() {
        return Err(TrainError::NonFinite {
            step,
            term: "gradient norm",
            value: norm,
        });
    }
    if let Some(max) = clip_norm
        && norm > max
    {
        b.scale(Out::all(grads), T::of(max / (norm + 1e-6)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_reduces_after_more_than_patience_bad_epochs() {
        let config = TrainConfig {
            reduce_lr_on_plateau: true,
            lr_patience: 2,
            lr_factor: 0.5,
            lr_min: 0.2,
            ..TrainConfig::default()
        };
        let mut p = Plateau::new(1.0);
        // 10 is best; 3 epochs not better (> patience 2) → halve, counter restarts.
        let lrs: Vec<f64> = [10.0, 10.0, 11.0, 10.5, 9.0, 9.5, 9.5, 9.5, 9.5, 9.5, 9.5]
            .iter()
            .map(|&v| p.observe(v, &config))
            .collect();
        assert_eq!(
            lrs,
            vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2]
        );
        assert_eq!(p.best, 9.0);
        // Switched off, the state is still tracked but the rate never changes.
        let mut off = Plateau::new(1.0);
        let config = TrainConfig {
            reduce_lr_on_plateau: false,
            lr_patience: 0,
            ..config
        };
        assert_eq!([5.0, 6.0, 7.0].map(|v| off.observe(v, &config)), [1.0; 3]);
        assert_eq!(off.bad_epochs, 2);
    }
}
