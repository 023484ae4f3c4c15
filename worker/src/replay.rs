//! Training steps replayed from CUDA graphs (issue 24's lever "CUDA graphs for the step"): a
//! step queues ~80 ops, each costing the host a few microseconds, about as long as a GPU takes
//! to run them at Census size; a graph of the step is queued with one launch.
//!
//! Each part's batches of one number of rows share device buffers that outlive them
//! ([`FixedBatch`]): a staged batch is copied into them outside the graph, and the step makes
//! its matrix from them inside it, so a replay computes on whatever batch they hold. A step is
//! run eagerly through them twice (its buffers' sizes then wait in the cache, which a capture
//! takes from), captured at the third batch of its shape and replayed from then on, bit for bit
//! the eager step (the same kernels on the same values). A batch's label codes, where the
//! classifier or the contrastive margin reads them, are staged and copied in the same way; the
//! adversary's batch codes are made from the covariates there. The draws' step and the KL
//! weight are read from device cells set before each launch, so a graph serves a whole run,
//! KL warm-up included; it serves one set of model buffers (the parameters, gradients and
//! BatchNorm statistics it read and wrote at their addresses): a new set drops the graphs.
//! Steps whose
//! terms take values from each batch on the host, or with a modality missing for some cells,
//! stay eager ([`tessera_models::Vae::replayable_step`]); so does every step once a capture
//! failed (logged once), and every step with `train.cuda_graphs = false`. Nothing in a
//! captured step may copy from host memory (`Gpu::write` refuses it there): the batch one-hot,
//! dense counts and row selections of a batch whose cells have every modality are made on the
//! device.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::DevicePtr;
use tessera_kernels::backend::Cuda;
use tessera_kernels::backend::cuda::Staged;
use tessera_kernels::cuda_cache::DeviceBuf;
use tessera_kernels::cuda_fixed::FixedBatch;
use tessera_kernels::cuda_graph::Captured;
use tessera_kernels::cuda_staging::StagedValues;
use tessera_models::{OnDevice, PendingLoss, Trainer};

use crate::batch::ModelBatch;
use crate::epoch::{StagedPart, eager, part_terms_on};
use crate::records::FitError;

/// Eager steps of a shape before its capture: the first fills the buffer cache with the
/// step's sizes, the second's terms are still being read when the capture takes buffers.
const EAGER_BEFORE_CAPTURE: u32 = 2;

/// The graphs of one GPU's training steps, by (part, rows).
pub struct Replays {
    /// False once a capture failed.
    enabled: bool,
    /// A capture was logged (once, at info).
    announced: bool,
    /// The model's buffers the graphs were captured for.
    captured_for: Option<[u64; 3]>,
    shapes: HashMap<(usize, usize), Shape>,
}

impl Default for Replays {
    fn default() -> Self {
        Replays {
            enabled: true,
            announced: false,
            captured_for: None,
            shapes: HashMap::new(),
        }
    }
}

impl std::fmt::Debug for Replays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Replays({} shapes)", self.shapes.len())
    }
}

/// A step shape's fixed buffers and, once captured, its graph and the terms a replay writes.
struct Shape {
    counts: Vec<FixedBatch>,
    covariates: DeviceBuf,
    /// The label codes, where the batches have labels.
    labels: Option<DeviceBuf>,
    eager: u32,
    graph: Option<(Captured, Arc<PendingLoss<DeviceBuf>>)>,
}

impl Replays {
    /// One part's forward and backward on `input`: replayed where its shape was captured,
    /// else eager (through the shape's fixed buffers where it will be captured).
    pub(crate) fn part_terms(
        &mut self,
        trainer: &mut Trainer<f32, Cuda>,
        input: StagedPart<'_, Cuda>,
        epoch: usize,
        part: usize,
    ) -> Result<Arc<PendingLoss<DeviceBuf>>, FitError> {
        let replayable = self.enabled
            && trainer.config.cuda_graphs
            && trainer.model.replayable_step(input.labels.is_some())
            && input.covariates.is_some()
            && input.staged.iter().all(Option::is_some);
        if !replayable {
            return eager(trainer, input, epoch, part);
        }
        self.forget_other_models(trainer);
        let key = (part, input.batch.rows);
        let gpu = trainer.model.backend().gpu();
        let fits = self.shapes.get(&key).is_some_and(|s| s.fits(&input));
        if !fits {
            self.shapes.remove(&key);
            match Shape::for_input(gpu, &input)? {
                Some(shape) => self.shapes.insert(key, shape),
                None => return eager(trainer, input, epoch, part),
            };
        }
        let shape = self.shapes.get_mut(&key).expect("made above");
        shape.write(gpu, input.staged, input.covariates, input.labels)?;
        let batch = input.batch;
        let due = shape.graph.is_none() && shape.eager >= EAGER_BEFORE_CAPTURE;
        if let Err(e) = due
            .then(|| shape.capture(trainer, batch, epoch, part))
            .transpose()
        {
            tracing::warn!(
                "training steps run op by op from now on: capturing one as a CUDA graph failed ({e})"
            );
            let pending = shape.step(trainer, batch, epoch, part)?;
            self.enabled = false;
            self.shapes.clear();
            return Ok(Arc::new(pending));
        }
        if due && !std::mem::replace(&mut self.announced, true) {
            tracing::info!(
                "training steps replayed from CUDA graphs from step {} on (one per batch shape; train.cuda_graphs = false: op by op)",
                trainer.step + 1
            );
        }
        match &shape.graph {
            Some((graph, pending)) => {
                let kl_weight = set_cells(trainer, epoch)?;
                pending.set_kl_weight(kl_weight);
                graph.launch()?;
                Ok(Arc::clone(pending))
            }
            None => {
                shape.eager += 1;
                Ok(Arc::new(shape.step(trainer, batch, epoch, part)?))
            }
        }
    }

    /// Drops the graphs when the model's buffers are not theirs.
    fn forget_other_models(&mut self, trainer: &Trainer<f32, Cuda>) {
        let now = model_buffers(trainer);
        if self.captured_for != Some(now) {
            self.shapes.clear();
            self.captured_for = Some(now);
        }
    }
}

/// The draws' step and the KL weight (returned) of the next step into the device cells a
/// captured step reads them from, ahead of its capture or launch.
fn set_cells(trainer: &Trainer<f32, Cuda>, epoch: usize) -> Result<f64, FitError> {
    let gpu = trainer.model.backend().gpu();
    let kl_weight = trainer.config.kl_weight(epoch);
    gpu.set_draw_step(trainer.step + 1)?;
    gpu.set_kl_weight(kl_weight)?;
    Ok(kl_weight)
}

/// Device addresses of the parameters, gradients and BatchNorm statistics a graph reads and
/// writes (a checkpoint's restore replaces the buffers).
fn model_buffers(trainer: &Trainer<f32, Cuda>) -> [u64; 3] {
    let model = &trainer.model;
    let stream = model.backend().gpu().stream();
    [model.values(), model.grads(), model.state()].map(|buf| buf.device_ptr(stream).0)
}

impl Shape {
    /// Fixed buffers for batches like `input`'s, with a quarter more room for entries than
    /// its own; None where some modality cannot be read from fixed buffers.
    fn for_input(
        gpu: &tessera_kernels::cuda::Gpu,
        input: &StagedPart<'_, Cuda>,
    ) -> Result<Option<Shape>, FitError> {
        // Checked for every modality before any buffer is made.
        if !input.staged.iter().flatten().all(FixedBatch::readable) {
            return Ok(None);
        }
        let mut counts = Vec::with_capacity(input.staged.len());
        for staged in input.staged.iter().flatten() {
            let nnz = FixedBatch::entries(staged);
            counts.extend(FixedBatch::for_batch(gpu, staged, nnz + nnz / 4)?);
        }
        let n = input.covariates.as_ref().map_or(0, StagedValues::len);
        let labels = input.labels.as_ref().map(StagedValues::len);
        Ok(Some(Shape {
            counts,
            covariates: gpu.alloc_zeros::<f32>(n)?,
            labels: labels.map(|n| gpu.alloc_zeros::<f32>(n)).transpose()?,
            eager: 0,
            graph: None,
        }))
    }

    /// Whether `input` can be written into these buffers.
    fn fits(&self, input: &StagedPart<'_, Cuda>) -> bool {
        let n = input.covariates.as_ref().map_or(0, StagedValues::len);
        n == self.covariates.len()
            && input.labels.as_ref().map(StagedValues::len) == self.labels.as_ref().map(|l| l.len())
            && input.staged.len() == self.counts.len()
            && self
                .counts
                .iter()
                .zip(&input.staged)
                .all(|(fixed, staged)| staged.as_ref().is_some_and(|s| fixed.fits(s)))
    }

    /// `staged`, `covariates` and `labels` (which fit) copied into the buffers, for the ops
    /// queued after.
    fn write(
        &mut self,
        gpu: &tessera_kernels::cuda::Gpu,
        staged: Vec<Option<Staged>>,
        covariates: Option<StagedValues>,
        labels: Option<StagedValues>,
    ) -> Result<(), FitError> {
        for (fixed, staged) in self.counts.iter_mut().zip(staged.into_iter().flatten()) {
            fixed.write(gpu, staged)?;
        }
        if let Some(covariates) = covariates {
            covariates.write_into(gpu, &mut self.covariates)?;
        }
        if let (Some(labels), Some(fixed)) = (labels, self.labels.as_mut()) {
            labels.write_into(gpu, fixed)?;
        }
        Ok(())
    }

    /// The step on what the buffers hold when it runs.
    fn step(
        &self,
        trainer: &mut Trainer<f32, Cuda>,
        batch: &ModelBatch,
        epoch: usize,
        part: usize,
    ) -> Result<PendingLoss<DeviceBuf>, FitError> {
        let cuda = trainer.model.backend().clone();
        let gpu = cuda.gpu();
        let on_device = OnDevice {
            counts: self
                .counts
                .iter()
                .map(|fixed| fixed.to_device(gpu).map(Some))
                .collect::<Result<_, _>>()?,
            covariates: Some(gpu.copy_of(&self.covariates.slice(..))?),
            labels: self
                .labels
                .as_ref()
                .map(|l| gpu.copy_of(&l.slice(..)))
                .transpose()?,
        };
        part_terms_on(trainer, batch, on_device, epoch, part)
    }

    /// Captures the step (not run: the caller launches it).
    fn capture(
        &mut self,
        trainer: &mut Trainer<f32, Cuda>,
        batch: &ModelBatch,
        epoch: usize,
        part: usize,
    ) -> Result<(), FitError> {
        set_cells(trainer, epoch)?;
        let cuda = trainer.model.backend().clone();
        let (graph, pending) = cuda
            .gpu()
            .capture(|| self.step(trainer, batch, epoch, part))?;
        tracing::debug!(
            rows = batch.rows,
            part,
            "a training step captured as a CUDA graph"
        );
        self.graph = Some((graph, Arc::new(pending)));
        Ok(())
    }
}
