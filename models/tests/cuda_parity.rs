//! Whole models on the CUDA backend against the same models on the CPU backend: the same
//! initial parameters, batch and seeds must give the same loss terms, gradients and (after a
//! few AdamW steps) parameters, up to f32 rounding of different summation orders (`tessera
//! bench step --device cuda` times the same step). Without a GPU the parity test says SKIPPED;
//! the body still runs on the CPU (twice, bit for bit), so it cannot first fail on a borrowed
//! GPU.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_kernels::backend::{Backend, Cpu, Cuda, In};
use tessera_kernels::ops::linear::CsrRef;
use tessera_models::layers::Mode;
use tessera_models::{
    Categories, ENCODER_TRANSFORM, Joint, LikelihoodKind, ModalityConfig, ModalityCounts, OnDevice,
    Prior, Supervision, Survival, TrainConfig, Trainer, Vae, VaeBatch, VaeConfig,
};

const CELLS: usize = 96;

type Counts = (Vec<u64>, Vec<u32>, Vec<f32>);

/// Counts of `genes` features with about one in `every` non-zero, every 13th cell empty;
/// binary for accessibility.
fn counts(genes: usize, every: usize, binary: bool) -> Counts {
    let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
    for r in 0..CELLS {
        if r % 13 != 5 {
            for g in (0..genes).filter(|g| (g * 7 + r * 3) % every == 0) {
                indices.push(g as u32);
                data.push(if binary {
                    1.0
                } else {
                    ((g * 31 + r * 17) % 23) as f32 + 1.0
                });
            }
        }
        indptr.push(data.len() as u64);
    }
    (indptr, indices, data)
}

/// The model's outputs to compare: loss terms, gradients, then parameters after three steps.
struct Run {
    terms: Vec<f64>,
    grads: Vec<f32>,
    stepped: Vec<f32>,
    latent: Vec<f32>,
}

/// One configuration on backend `b`: a mosaic batch (RNA everywhere, protein in two cells of
/// three, accessibility in half) with labels, numeric targets and survival.
fn run<B: Backend<f32>>(b: B, config: &VaeConfig, modalities: &[(&str, usize)]) -> Run {
    let data: Vec<Counts> = modalities
        .iter()
        .map(|&(name, genes)| counts(genes, if name == "protein" { 2 } else { 9 }, name == "atac"))
        .collect();
    let present: Vec<Vec<bool>> = modalities
        .iter()
        .map(|&(name, _)| {
            (0..CELLS)
                .map(|r| match name {
                    "protein" => r % 3 != 0,
                    "atac" => r % 2 == 0,
                    _ => true,
                })
                .collect()
        })
        .collect();
    let counts: Vec<ModalityCounts<'_, f32>> = data
        .iter()
        .zip(modalities)
        .zip(&present)
        .map(|((d, &(_, genes)), p)| ModalityCounts {
            counts: CsrRef {
                rows: CELLS,
                cols: genes,
                indptr: &d.0,
                indices: &d.1,
                data: &d.2,
            },
            present: Some(p),
        })
        .collect();
    // Batch one-hot (3 batches) then one more covariate.
    let cov: Vec<f32> = (0..CELLS)
        .flat_map(|r| {
            [
                (r % 3 == 0) as u8,
                (r % 3 == 1) as u8,
                (r % 3 == 2) as u8,
                (r % 5 == 0) as u8,
            ]
            .map(f32::from)
        })
        .collect();
    let labels: Vec<i32> = (0..CELLS as i32)
        .map(|r| if r % 11 == 0 { -1 } else { r % 4 })
        .collect();
    let targets: Vec<f64> = (0..CELLS * config.regression_keys.len())
        .map(|i| {
            if i % 7 == 3 {
                f64::NAN
            } else {
                (i as f64 * 0.3).sin()
            }
        })
        .collect();
    let times: Vec<f64> = (0..CELLS).map(|r| ((r * 37) % 50) as f64 + 1.0).collect();
    let events: Vec<bool> = (0..CELLS).map(|r| r % 4 != 0).collect();
    let supervision = Supervision {
        labels: Some(&labels),
        targets: Some(&targets),
        survival: Some(Survival {
            times: &times,
            events: &events,
        }),
    };
    let batch = || VaeBatch::new(&counts, &cov).with_supervision(supervision);
    let model = Vae::<f32, B>::new(
        b,
        config.clone(),
        modalities,
        Categories {
            n_batch: 3,
            n_cov: 4,
            n_labels: 4,
        },
        7,
    )
    .unwrap();
    let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
    let t = trainer
        .model
        .loss_and_grad(batch(), 0.8, Mode::Train { seed: 3, step: 1 })
        .unwrap();
    let grads = trainer
        .model
        .backend()
        .download(In::all(trainer.model.grads()))
        .unwrap();
    // The steps take their counts as the training loop hands them over: staged on another
    // thread (used where every cell has the modality, uploaded again where some lack it); the
    // second step gathers them from matrices kept on the device, as a resident training set.
    let b = trainer.model.backend().clone();
    let resident: Vec<_> = counts
        .iter()
        .map(|m| std::sync::Arc::new(b.resident_csr(m.counts).unwrap()))
        .collect();
    let every_row: Vec<usize> = (0..CELLS).collect();
    for step in 0..3 {
        let (staged, values): (Vec<B::Staged>, _) = std::thread::scope(|s| {
            s.spawn(|| {
                let staged = counts
                    .iter()
                    .zip(&resident)
                    .map(|(m, kept)| match step {
                        1 => b.stage_rows(kept, &every_row, ENCODER_TRANSFORM),
                        _ => b.stage_csr(m.counts, ENCODER_TRANSFORM),
                    })
                    .map(Result::unwrap)
                    .collect();
                // The last step uploads its covariates in each pass and its labels in the
                // classifier, as evaluation does.
                let values = (step < 2).then(|| {
                    let codes: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
                    (
                        b.stage_values(&cov).unwrap(),
                        b.stage_values(&codes).unwrap(),
                    )
                });
                (staged, values)
            })
            .join()
            .unwrap()
        });
        let (covariates, labels) = values.unzip();
        let on_device = OnDevice {
            counts: staged
                .into_iter()
                .map(|s| Some(b.staged_csr(s).unwrap()))
                .collect(),
            covariates: covariates.map(|c| b.staged_values(c).unwrap()),
            labels: labels.map(|l| b.staged_values(l).unwrap()),
        };
        let g = trainer.part_gradients(batch(), on_device, 5, 0).unwrap();
        assert!(g.finite);
        trainer.apply(Some(g.finite)).unwrap();
    }
    let stepped = trainer
        .model
        .backend()
        .download(In::all(trainer.model.values()))
        .unwrap();
    let latent = trainer.model.latent_mean(batch()).unwrap();
    Run {
        terms: vec![t.loss, t.reconstruction, t.kl, t.regularization],
        grads,
        stepped,
        latent,
    }
}

/// The configurations compared: scVI's defaults at 2,000 genes, and the mosaic model with every
/// option a loss term can carry, for each joint posterior.
type Modalities = Vec<(&'static str, usize)>;

fn configs() -> Vec<(String, VaeConfig, Modalities)> {
    let mut out = vec![
        (
            "scVI defaults".to_string(),
            VaeConfig::default(),
            vec![("rna", 2000)],
        ),
        (
            // scArches' setting: LayerNorm instead of BatchNorm, two layers, covariates in.
            "scVI, scArches' layers".to_string(),
            VaeConfig {
                batch_norm: false,
                layer_norm: true,
                n_layers: 2,
                encode_covariates: true,
                ..VaeConfig::default()
            },
            vec![("rna", 2000)],
        ),
    ];
    for joint in [Joint::Poe, Joint::Moe, Joint::Concat] {
        let config = VaeConfig {
            joint,
            n_hidden: 64,
            n_latent: 8,
            modalities: [(
                "protein".to_string(),
                ModalityConfig {
                    likelihood: Some(LikelihoodKind::NbMixture),
                    dispersion: None,
                },
            )]
            .into(),
            mmd_batch_weight: 1.0,
            jeffreys_weight: 0.5,
            adversarial_batch_weight: 0.5,
            classifier_weight: 1.0,
            regression_keys: vec!["age".into()],
            regression_weight: 0.5,
            cox_weight: 0.3,
            contrastive_weight: 0.5,
            cycle_weight: 0.2,
            ..VaeConfig::default()
        };
        out.push((
            format!("mosaic {joint:?}"),
            config,
            vec![("rna", 300), ("protein", 20), ("atac", 200)],
        ));
    }
    // An MMD prior instead of the KL (its value left on the device like the batch MMD's).
    out.push((
        "scVI, an MMD prior".to_string(),
        VaeConfig {
            prior: Prior::Mmd,
            n_hidden: 64,
            ..VaeConfig::default()
        },
        vec![("rna", 300)],
    ));
    out
}

/// |a - b| <= tol · max|b| entry by entry: gradients of different layers differ by orders of
/// magnitude, and f32 sums in another order move each by a fraction of the largest.
fn assert_near(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * scale,
            "{what}[{i}]: {x} vs {y} (scale {scale})"
        );
    }
}

/// GPU 0, or None after saying SKIPPED (a failure where CI requires a device).
fn cuda_or_skip(what: &str) -> Option<Cuda> {
    tessera_kernels::testing::gpu_or_skip(what).map(Cuda::new)
}

#[test]
fn models_on_cuda_match_the_cpu() {
    let Some(gpu) = cuda_or_skip("model CPU/GPU parity") else {
        return;
    };
    for (what, config, modalities) in configs() {
        let (cpu, cuda) = (
            run(Cpu, &config, &modalities),
            run(gpu.clone(), &config, &modalities),
        );
        for (k, (g, c)) in cuda.terms.iter().zip(&cpu.terms).enumerate() {
            assert!(
                (g - c).abs() <= 1e-3 * (1.0 + c.abs()),
                "{what}: loss term {k}: cuda {g} vs cpu {c}"
            );
        }
        assert_near(&format!("{what}: gradients"), &cuda.grads, &cpu.grads, 1e-3);
        assert_near(
            &format!("{what}: parameters after 3 steps"),
            &cuda.stepped,
            &cpu.stepped,
            1e-3,
        );
        assert_near(
            &format!("{what}: latent means"),
            &cuda.latent,
            &cpu.latent,
            1e-2,
        );
    }
}

#[test]
fn the_parity_body_runs_on_the_cpu_and_repeats_bit_for_bit() {
    for (what, config, modalities) in configs() {
        let (a, b) = (
            run(Cpu, &config, &modalities),
            run(Cpu, &config, &modalities),
        );
        assert!(
            a.terms.iter().all(|t| t.is_finite()) && (a.terms[3] > 0.0 || what.starts_with("scVI")),
            "{what}: {:?}",
            a.terms
        );
        assert!(
            a.grads.iter().any(|g| *g != 0.0) && a.stepped.iter().all(|v| v.is_finite()),
            "{what}"
        );
        assert_eq!(
            (a.terms, a.grads, a.stepped, a.latent),
            (b.terms, b.grads, b.stepped, b.latent),
            "{what}"
        );
    }
}

/// The buffers a captured scVI step reads its batch from (a replay reads what they hold at its
/// launch) and the step itself: the batch copied out of them on the device, then the forward
/// and backward with the loss terms left there.
struct FixedBatch {
    counts: <Cuda as Backend<f32>>::Csr,
    covariates: <Cuda as Backend<f32>>::Buf,
}

type StepResult =
    Result<tessera_models::PendingLoss<<Cuda as Backend<f32>>::Buf>, Box<dyn std::error::Error>>;

impl FixedBatch {
    fn step(&self, trainer: &mut Trainer<f32, Cuda>, batch: VaeBatch<'_, f32>) -> StepResult {
        let cuda = trainer.model.backend().clone();
        let on_device = OnDevice {
            counts: vec![Some(self.counts.copied(cuda.gpu(), ENCODER_TRANSFORM)?)],
            covariates: Some(cuda.gpu().copy_of(&self.covariates.slice(..))?),
            labels: None,
        };
        Ok(trainer.part_terms(batch, on_device, 0, 0)?)
    }
}

/// scVI's training step (dropout, the latent draw, BatchNorm, the fused NB term, the KL)
/// captured as a CUDA graph and replayed: a replay computes from what the batch's fixed buffers
/// hold and the draws' step set before its launch, and gives the eager step's loss terms and
/// gradients bit for bit (the same kernels in the same order on the same values); nothing in
/// the step waits for the device, copies from pageable memory or allocates once its shapes
/// have been seen. The update stays outside the graph.
#[test]
fn a_captured_scvi_step_replays_to_the_eager_steps_terms_and_gradients() {
    let Some(cuda) = cuda_or_skip("capturing a training step") else {
        return;
    };
    let genes = 300;
    let first = counts(genes, 9, false);
    // The second batch: the same rows and genes, other counts.
    let second: Vec<f32> = first.2.iter().map(|v| (v * 3.0) % 17.0 + 1.0).collect();
    let cov: Vec<f32> = (0..CELLS)
        .flat_map(|r| [(r % 2 == 0) as u8, (r % 2 == 1) as u8].map(f32::from))
        .collect();
    let rows = |data: &[f32]| -> Counts { (first.0.clone(), first.1.clone(), data.to_vec()) };
    let batches = [rows(&first.2), rows(&second)];
    let views: Vec<[ModalityCounts<'_, f32>; 1]> = batches
        .iter()
        .map(|(indptr, indices, data)| {
            [ModalityCounts {
                counts: CsrRef {
                    rows: CELLS,
                    cols: genes,
                    indptr,
                    indices,
                    data,
                },
                present: None,
            }]
        })
        .collect();
    let batch = |k: usize| VaeBatch::new(&views[k], &cov);
    let model = Vae::<f32, Cuda>::new(
        cuda.clone(),
        VaeConfig {
            n_hidden: 64,
            ..VaeConfig::default()
        },
        &[("rna", genes)],
        Categories {
            n_batch: 2,
            n_cov: 2,
            n_labels: 0,
        },
        7,
    )
    .unwrap();
    let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
    let gpu = cuda.gpu();
    let mut fixed = FixedBatch {
        counts: cuda.upload_csr(views[0][0].counts).unwrap(),
        covariates: cuda.upload(&cov).unwrap(),
    };
    let grads = |t: &Trainer<f32, Cuda>| cuda.download(In::all(t.model.grads())).unwrap();
    let poison = |t: &mut Trainer<f32, Cuda>| {
        cuda.fill(
            tessera_kernels::backend::Out::all(t.model.grads_mut()),
            f32::NAN,
        )
        .unwrap()
    };

    // Eagerly first: the step's shapes fill the buffer cache (a capture allocates nothing).
    let pending = fixed.step(&mut trainer, batch(0)).unwrap();
    let eager = trainer.read_terms(&pending).unwrap();
    let eager_grads = grads(&trainer);
    assert!(eager.finite && eager_grads.iter().any(|g| *g != 0.0));
    // Its buffers back in the cache, for the capture to take.
    drop(pending);

    gpu.set_draw_step(trainer.step + 1).unwrap();
    let (graph, captured) = gpu.capture(|| fixed.step(&mut trainer, batch(0))).unwrap();
    poison(&mut trainer);
    graph.launch().unwrap();
    let replayed = trainer.read_terms(&captured).unwrap();
    assert_eq!(replayed.terms, eager.terms, "the replay's loss terms");
    assert_eq!(grads(&trainer), eager_grads, "the replay's gradients");

    // An update (outside the graph), the next step's draws and the second batch's counts
    // written into the fixed buffers: the replay follows all three.
    trainer.apply(Some(replayed.finite)).unwrap();
    gpu.set_draw_step(trainer.step + 1).unwrap();
    cuda.write(
        &second,
        tessera_kernels::backend::Out::all(&mut fixed.counts.data),
    )
    .unwrap();
    poison(&mut trainer);
    graph.launch().unwrap();
    // The captured step's terms read again: what the replay wrote into them.
    let replayed_again = trainer.read_terms(&captured).unwrap();
    let replayed_grads = grads(&trainer);
    let pending = fixed.step(&mut trainer, batch(1)).unwrap();
    let next = trainer.read_terms(&pending).unwrap();
    assert!(next.finite);
    assert_eq!(
        replayed_again.terms, next.terms,
        "the second replay's terms"
    );
    assert_eq!(
        replayed_grads,
        grads(&trainer),
        "the second replay's gradients"
    );
    assert_ne!(replayed_grads, eager_grads, "the second step's gradients");
    assert_ne!(next.terms, eager.terms, "the second step's terms");
}
