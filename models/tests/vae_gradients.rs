//! Whole-model gradient checks: every likelihood, dispersion and covariate option of the VAE,
//! in f64 on the CPU backend, against central finite differences of the same loss.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_kernels::backend::Cpu;
use tessera_kernels::gradcheck::{check_at, spread};
use tessera_kernels::ops::linear::CsrRef;
use tessera_models::layers::Mode;
use tessera_models::{
    Categories, Dispersion, Joint, LikelihoodKind, LossTerms, ModalityConfig, ModalityCounts,
    OnDevice, Overlapped, PendingLoss, Prior, Supervision, Survival, TrainConfig, TrainError,
    Trainer, Vae, VaeBatch, VaeConfig,
};

/// Counts for `n` cells x `g` genes with an all-zero cell, as CSR.
fn counts(n: usize, g: usize, binary: bool) -> (Vec<u64>, Vec<u32>, Vec<f64>) {
    let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
    for r in 0..n {
        if r != 1 {
            for c in 0..g {
                let v = ((r * 7 + c * 3) % 5) as f64;
                if v > 0.0 {
                    indices.push(c as u32);
                    data.push(if binary { 1.0 } else { v * (1.0 + r as f64) });
                }
            }
        }
        indptr.push(data.len() as u64);
    }
    (indptr, indices, data)
}

/// Two batches, one more covariate column, three label categories.
const CATEGORIES: Categories = Categories {
    n_batch: 2,
    n_cov: 3,
    n_labels: 3,
};

/// Batch one-hot (2 batches) then a second covariate (1 column).
fn covariates(n: usize) -> Vec<f64> {
    (0..n)
        .flat_map(|r| {
            [
                if r % 2 == 0 { 1.0 } else { 0.0 },
                if r % 2 == 1 { 1.0 } else { 0.0 },
                if r % 3 == 0 { 1.0 } else { 0.0 },
            ]
        })
        .collect()
}

fn check_model(config: VaeConfig) {
    let (n, g) = (6, 7);
    let (indptr, indices, data) = counts(n, g, config.likelihood == LikelihoodKind::Bernoulli);
    let cov = covariates(n);
    let modalities = [ModalityCounts {
        counts: CsrRef {
            rows: n,
            cols: g,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        },
        present: None,
    }];
    let batch = VaeBatch::new(&modalities, &cov);
    let model = Vae::<f64, Cpu>::new(Cpu, config.clone(), &[("rna", g)], CATEGORIES, 11).unwrap();
    check_gradients(model, batch, &format!("{config:?}"));
}

/// The whole model's gradient against central differences at 400 parameters spread over the
/// layout, and a 1% error in it caught.
fn check_gradients(mut model: Vae<f64, Cpu>, batch: VaeBatch<'_, f64>, what: &str) {
    // Move off the initial point so log θ / log σ² gradients are generic.
    for (i, v) in model.values_mut().iter_mut().enumerate() {
        *v += 0.05 * ((i as f64) * 0.37).sin();
    }
    let mode = Mode::Train { seed: 5, step: 3 };
    let kl_weight = 0.7;
    let terms = model.loss_and_grad(batch, kl_weight, mode).unwrap();
    assert!(
        terms.loss.is_finite() && terms.reconstruction > 0.0 && terms.kl >= 0.0,
        "{what}: {terms:?}"
    );
    let analytic = model.grads().clone();
    let x0 = model.values().clone();
    let loss = |v: &[f64]| {
        model.values_mut().copy_from_slice(v);
        model.loss(batch, kl_weight, mode).unwrap().loss
    };
    let loss = std::cell::RefCell::new(loss);
    let at = spread(x0.len(), 400);
    check_at(
        |v| (loss.borrow_mut())(v),
        &x0,
        &analytic,
        at.clone(),
        1e-6,
        1e-6,
    )
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    // Not vacuous: gradients off by 1% are caught.
    let off: Vec<f64> = analytic.iter().map(|g| g * 1.01).collect();
    assert!(check_at(|v| (loss.borrow_mut())(v), &x0, &off, at, 1e-6, 1e-6).is_err());
}

#[test]
fn scvi_defaults_nb_gene_dispersion() {
    check_model(VaeConfig {
        n_hidden: 5,
        n_latent: 2,
        n_layers: 2,
        ..VaeConfig::default()
    });
}

#[test]
fn every_likelihood_and_dispersion() {
    for (likelihood, dispersion) in [
        (LikelihoodKind::Nb, Dispersion::GeneBatch),
        (LikelihoodKind::Nb, Dispersion::GeneCell),
        (LikelihoodKind::Zinb, Dispersion::Gene),
        (LikelihoodKind::Zinb, Dispersion::GeneCell),
        (LikelihoodKind::Poisson, Dispersion::Gene),
        (LikelihoodKind::Gaussian, Dispersion::Gene),
        (LikelihoodKind::Bernoulli, Dispersion::Gene),
        (LikelihoodKind::NbMixture, Dispersion::Gene),
        (LikelihoodKind::Nb, Dispersion::GeneBatch),
    ] {
        check_model(VaeConfig {
            n_hidden: 4,
            n_latent: 3,
            n_layers: 1,
            likelihood,
            dispersion,
            ..VaeConfig::default()
        });
    }
}

#[test]
fn batch_mmd_regulariser() {
    check_model(VaeConfig {
        n_hidden: 4,
        n_latent: 2,
        n_layers: 1,
        mmd_batch_weight: 3.0,
        mmd_bandwidths: vec![0.5, 2.0],
        ..VaeConfig::default()
    });
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    for joint in [Joint::Poe, Joint::Moe] {
        let mut model = mosaic.model(joint);
        model.config.mmd_batch_weight = 2.0;
        let batch = VaeBatch::new(&modalities, &mosaic.cov);
        let terms = model
            .loss(batch, 1.0, Mode::Train { seed: 1, step: 1 })
            .unwrap();
        assert!(
            terms.regularization > 0.0
                && (terms.loss - terms.reconstruction - terms.kl - terms.regularization).abs()
                    < 1e-9,
            "{terms:?}"
        );
        check_gradients(model, batch, &format!("{joint:?} + batch MMD"));
    }
}

#[test]
fn covariates_everywhere_without_batch_norm_or_dropout() {
    check_model(VaeConfig {
        n_hidden: 4,
        n_latent: 2,
        n_layers: 2,
        encode_covariates: true,
        deeply_inject_covariates: true,
        batch_norm: false,
        dropout: 0.0,
        ..VaeConfig::default()
    });
}

/// scArches' and MultiVI's layers (scvi-tools' `use_layer_norm="both"`), alone and after
/// BatchNorm, every covariate injected: the LayerNorm's input gradient through two layers of
/// each encoder and decoder.
#[test]
fn layer_norm_with_and_without_batch_norm() {
    for batch_norm in [false, true] {
        check_model(VaeConfig {
            n_hidden: 4,
            n_latent: 2,
            n_layers: 2,
            encode_covariates: true,
            batch_norm,
            layer_norm: true,
            dropout: 0.0,
            ..VaeConfig::default()
        });
    }
}

/// A small scVI-shaped trainer (one RNA modality of `g` genes).
fn small_trainer(g: usize) -> Trainer<f64, Cpu> {
    let config = VaeConfig {
        n_hidden: 4,
        n_latent: 2,
        ..VaeConfig::default()
    };
    let model = Vae::<f64, Cpu>::new(Cpu, config, &[("rna", g)], CATEGORIES, 1).unwrap();
    Trainer::new(model, TrainConfig::default()).unwrap()
}

/// The batch the step tests train on: 4 cells x 5 genes of counts (an all-zero cell among
/// them) and their covariates; [`small_trainer`] fits it.
struct Small {
    counts: (Vec<u64>, Vec<u32>, Vec<f64>),
    cov: Vec<f64>,
}

impl Small {
    const SHAPE: (usize, usize) = (4, 5);

    fn new() -> Small {
        let (n, g) = Self::SHAPE;
        Small {
            counts: counts(n, g, false),
            cov: covariates(n),
        }
    }

    fn rna(&self) -> [ModalityCounts<'_, f64>; 1] {
        let (indptr, indices, data) = &self.counts;
        rna(Self::SHAPE, indptr, indices, data)
    }

    fn trainer(&self) -> Trainer<f64, Cpu> {
        small_trainer(Self::SHAPE.1)
    }
}

/// One RNA modality of `n` cells x `g` genes, every cell measured.
fn rna<'a>(
    (n, g): (usize, usize),
    indptr: &'a [u64],
    indices: &'a [u32],
    data: &'a [f64],
) -> [ModalityCounts<'a, f64>; 1] {
    [ModalityCounts {
        counts: CsrRef {
            rows: n,
            cols: g,
            indptr,
            indices,
            data,
        },
        present: None,
    }]
}

#[test]
fn non_finite_input_stops_training_naming_the_step_and_term() {
    let (n, g) = (4, 5);
    let (indptr, indices, mut data) = counts(n, g, false);
    let cov = covariates(n);
    let mut trainer = small_trainer(g);
    let modalities = rna((n, g), &indptr, &indices, &data);
    trainer.step(VaeBatch::new(&modalities, &cov), 0).unwrap();
    let before = trainer.model.values().clone();
    data[0] = f64::NAN;
    let modalities = rna((n, g), &indptr, &indices, &data);
    let result = trainer.step(VaeBatch::new(&modalities, &cov), 0);
    assert_step_two_refused(result.map(Some), &trainer, &before);
}

/// Step 2 refused for its NaN reconstruction loss, with no parameter changed since step 1 and
/// the step not counted.
fn assert_step_two_refused(
    result: Result<Option<LossTerms>, TrainError>,
    trainer: &Trainer<f64, Cpu>,
    before: &[f64],
) {
    match result {
        Err(TrainError::NonFinite { step: 2, term, .. }) => assert_eq!(term, "reconstruction loss"),
        other => panic!("expected a non-finite error at step 2, got {other:?}"),
    }
    assert_eq!(
        trainer.model.values().as_slice(),
        before,
        "a failed step changes no parameter"
    );
    assert_eq!(trainer.step, 1);
}

/// The step learns whether its gradients are finite with its loss terms, so `apply` needs no
/// norm for them; gradients it knows nothing about, or knows to be non-finite, are still
/// measured and refused.
#[test]
fn gradients_flagged_finite_or_not_and_unknown_ones_are_still_refused() {
    let small = Small::new();
    let modalities = small.rna();
    let batch = || VaeBatch::new(&modalities, &small.cov);
    let mut trainer = small.trainer();
    let flagged = trainer.gradients(batch(), 0).unwrap();
    assert!(flagged.finite);
    trainer.apply(Some(flagged.finite)).unwrap();
    let before = trainer.model.values().clone();
    for finite in [None, Some(false)] {
        trainer.gradients(batch(), 0).unwrap();
        trainer.model.grads_mut()[3] = f64::NAN;
        match trainer.apply(finite) {
            Err(TrainError::NonFinite {
                step: 2,
                term,
                value,
            }) => {
                assert_eq!(term, "gradient norm", "{finite:?}");
                assert!(value.is_nan(), "{finite:?}");
            }
            other => panic!("expected the NaN refused ({finite:?}), got {other:?}"),
        }
    }
    assert_eq!(
        *trainer.model.values(),
        before,
        "a refused step changes nothing"
    );
    // A NaN in the gradients of a step is what the flag reports.
    let pending = trainer
        .part_terms(batch(), OnDevice::default(), 0, 0)
        .unwrap();
    trainer.model.grads_mut()[0] = f64::INFINITY;
    assert!(!trainer.read_terms(&pending).unwrap().finite);
}

/// Steps overlapped with their reads train the model, bit for bit, that steps read before
/// they are applied train, and hand each step's terms over once, in order, one step late.
#[test]
fn overlapped_steps_are_the_steps_read_first_one_step_late() {
    let small = Small::new();
    let modalities = small.rna();
    let batch = || VaeBatch::new(&modalities, &small.cov);
    for clip_norm in [None, Some(1e-3)] {
        let (mut read_first, mut overlapped) = (small.trainer(), small.trainer());
        read_first.config.clip_norm = clip_norm;
        overlapped.config.clip_norm = clip_norm;
        let mut queue = Overlapped::default();
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for _ in 0..4 {
            expected.push(read_first.step(batch(), 1).unwrap());
            let pending = overlapped
                .part_terms(batch(), OnDevice::default(), 1, 0)
                .unwrap();
            got.extend(queue.push(&mut overlapped, pending).unwrap());
            assert_eq!(
                got.len() + 1,
                expected.len(),
                "one step late ({clip_norm:?})"
            );
        }
        got.extend(queue.finish(&mut overlapped).unwrap());
        assert!(
            queue.finish(&mut overlapped).unwrap().is_none(),
            "handed over once"
        );
        assert_eq!(got.len(), 4);
        for (a, b) in got.iter().zip(&expected) {
            assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "{clip_norm:?}");
            assert_eq!(a.kl.to_bits(), b.kl.to_bits(), "{clip_norm:?}");
        }
        assert_eq!(overlapped.step, 4);
        assert_eq!(overlapped.model.values(), read_first.model.values());
        assert_eq!(overlapped.model.state(), read_first.model.state());
        assert_eq!(
            (&overlapped.m, &overlapped.v),
            (&read_first.m, &read_first.v)
        );
    }
}

/// An overlapped step whose gradients are not finite is skipped on the device; the next push
/// names it and nothing after it is applied: the parameters and moments are the step before's.
#[test]
fn an_overlapped_step_with_a_nan_gradient_is_skipped_and_named_by_the_next_push() {
    let small = Small::new();
    let modalities = small.rna();
    let batch = || VaeBatch::new(&modalities, &small.cov);
    let mut trainer = small.trainer();
    let mut queue = Overlapped::default();
    let pending = trainer
        .part_terms(batch(), OnDevice::default(), 0, 0)
        .unwrap();
    assert!(queue.push(&mut trainer, pending).unwrap().is_none());
    let pending = trainer
        .part_terms(batch(), OnDevice::default(), 0, 0)
        .unwrap();
    trainer.model.grads_mut()[3] = f64::NAN;
    let first = queue.push(&mut trainer, pending).unwrap();
    assert!(first.is_some_and(|t| t.loss.is_finite()), "step 1 read");
    let after_one = (
        trainer.model.values().clone(),
        trainer.m.clone(),
        trainer.v.clone(),
    );
    let pending = trainer
        .part_terms(batch(), OnDevice::default(), 0, 0)
        .unwrap();
    match queue.push(&mut trainer, pending) {
        Err(TrainError::NonFiniteGradient { step: 2 }) => {}
        other => panic!("expected step 2's gradient named, got {other:?}"),
    }
    assert_eq!(trainer.step, 1, "the skipped step does not count");
    assert_eq!(
        (
            trainer.model.values().clone(),
            trainer.m.clone(),
            trainer.v.clone()
        ),
        after_one,
        "the skipped step changed nothing, and no later step was applied"
    );
}

/// A NaN in the input makes the loss NaN: the next push names the step and the term.
#[test]
fn an_overlapped_step_with_a_nan_input_is_named_with_its_term() {
    let (n, g) = (4, 5);
    let (indptr, indices, mut data) = counts(n, g, false);
    let cov = covariates(n);
    let mut trainer = small_trainer(g);
    let mut queue = Overlapped::default();
    let modalities = rna((n, g), &indptr, &indices, &data);
    let pending = trainer
        .part_terms(VaeBatch::new(&modalities, &cov), OnDevice::default(), 0, 0)
        .unwrap();
    assert!(queue.push(&mut trainer, pending).unwrap().is_none());
    let before = trainer.model.values().clone();
    data[0] = f64::NAN;
    let modalities = rna((n, g), &indptr, &indices, &data);
    let pending = trainer
        .part_terms(VaeBatch::new(&modalities, &cov), OnDevice::default(), 0, 0)
        .unwrap();
    assert!(queue.push(&mut trainer, pending).unwrap().is_some());
    // Its NaN gradients skipped it on the device.
    assert_step_two_refused(queue.finish(&mut trainer), &trainer, &before);
}

/// With clipping the norm is computed anyway: the flag is not read, and the norm still refuses
/// a NaN.
#[test]
fn with_clipping_the_norm_checks_the_gradients_instead_of_the_flag() {
    let small = Small::new();
    let modalities = small.rna();
    let batch = || VaeBatch::new(&modalities, &small.cov);
    let mut trainer = small.trainer();
    trainer.config.clip_norm = Some(1e-3);
    let first = trainer.gradients(batch(), 0).unwrap();
    assert!(!first.finite, "not read");
    trainer.apply(Some(first.finite)).unwrap();
    assert_eq!(trainer.step, 1);
    let second = trainer.gradients(batch(), 0).unwrap();
    trainer.model.grads_mut()[2] = f64::NAN;
    match trainer.apply(Some(second.finite)) {
        Err(TrainError::NonFinite { step: 2, term, .. }) => assert_eq!(term, "gradient norm"),
        other => panic!("expected the NaN refused, got {other:?}"),
    }
}

/// A validation pass reads its batches' terms in one transfer, in the bits each read alone gives.
#[test]
fn validation_terms_read_together_are_the_terms_read_alone() {
    let (n, g) = (4, 5);
    let (indptr, indices, data) = counts(n, g, false);
    let cov = covariates(n);
    let modalities = rna((n, g), &indptr, &indices, &data);
    let mut trainer = small_trainer(g);
    trainer.config.kl_warmup_epochs = 4;
    let batch = || VaeBatch::new(&modalities, &cov);
    let alone: Vec<LossTerms> = (0..3)
        .map(|epoch| {
            trainer
                .validate(batch(), epoch)
                .unwrap()
                .resolve(&Cpu)
                .unwrap()
        })
        .collect();
    let pending: Vec<_> = (0..3)
        .map(|epoch| trainer.validate(batch(), epoch).unwrap())
        .collect();
    let together = PendingLoss::resolve_all(&Cpu, &pending).unwrap();
    assert_eq!(together, alone);
    assert!(
        alone[0].loss != alone[2].loss,
        "the KL weight differs by epoch"
    );
}

/// A part's terms summed on the device (data-parallel steps) are the terms the host reads,
/// up to the order of additions: slots 1.. of `sums` get every term, slot 0 nothing.
fn check_device_sums(trainer: &mut Trainer<f64, Cpu>, batch: VaeBatch<'_, f64>) -> LossTerms {
    let pending = trainer
        .part_terms(batch, OnDevice::default(), 3, 1)
        .unwrap();
    let mut sums = vec![0.5; 6];
    pending.add_device_sums(&Cpu, 2.0, &mut sums, 1).unwrap();
    let host = pending.host_sums(2.0);
    let read = trainer.read_terms(&pending).unwrap().terms;
    let expected = [
        read.reconstruction,
        read.kl,
        read.regularization,
        read.supervised,
    ];
    for (i, want) in expected.iter().map(|t| 2.0 * t).enumerate() {
        let got = sums[1 + i] - 0.5 + host[i];
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1.0),
            "{i}: {got} vs {want}"
        );
    }
    assert_eq!([sums[0], sums[5]], [0.5; 2], "only the terms' slots");
    read
}

#[test]
fn terms_summed_on_the_device_are_the_terms_read() {
    let (n, g) = (4, 5);
    let (indptr, indices, data) = counts(n, g, false);
    let cov = covariates(n);
    let modalities = rna((n, g), &indptr, &indices, &data);
    let mut trainer = small_trainer(g);
    let read = check_device_sums(&mut trainer, VaeBatch::new(&modalities, &cov));
    assert_eq!(read.cells, n);
}

/// The penalties left on the device (batch MMD, Jeffreys, the adversary, the cycle term, the
/// MMD prior) are summed there too, with the host's contrastive term beside them.
#[test]
fn penalties_summed_on_the_device_are_the_penalties_read() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let targets = Targets::new();
    let batch = VaeBatch::new(&modalities, &mosaic.cov).with_supervision(targets.supervision());
    for prior in [Prior::Kl, Prior::Mmd] {
        let model = mosaic.model_with(VaeConfig {
            prior,
            mmd_batch_weight: 3.0,
            jeffreys_weight: 2.0,
            adversarial_batch_weight: 1.5,
            cycle_weight: 0.5,
            ..supervised_config(Joint::Poe)
        });
        let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
        let read = check_device_sums(&mut trainer, batch);
        assert!(read.regularization > 0.0, "{prior:?}: {read:?}");
        assert!(read.kl > 0.0, "{prior:?}: {read:?}");
    }
}

#[test]
fn early_stopping_watches_the_unweighted_elbo() {
    let t = tessera_models::LossTerms {
        reconstruction: 100.0,
        kl: 20.0,
        regularization: 3.0,
        supervised: 1.0,
        loss: 109.0,
        cells: 8,
    };
    assert_eq!(t.negative_elbo(), 120.0);
}

/// A mosaic batch of 7 cells: RNA (7 genes, NB) in all, protein (4, NB) in cells 0, 2, 3, 5,
/// accessibility (5, Bernoulli) in 1, 2, 4, 5, 6: every combination of present modalities.
/// CSR indptr, indices, values and width.
type Counts = (Vec<u64>, Vec<u32>, Vec<f64>, usize);

struct Mosaic {
    counts: Vec<Counts>,
    present: Vec<Vec<bool>>,
    cov: Vec<f64>,
}

const MOSAIC_CELLS: usize = 7;

impl Mosaic {
    fn new() -> Mosaic {
        let n = MOSAIC_CELLS;
        let (rna_p, rna_i, rna_d) = counts(n, 7, false);
        let (prot_p, prot_i, prot_d) = counts(n, 4, false);
        let (atac_p, atac_i, atac_d) = counts(n, 5, true);
        let present = vec![
            vec![true; n],
            [0, 2, 3, 5].iter().fold(vec![false; n], |mut v, &r| {
                v[r] = true;
                v
            }),
            [1, 2, 4, 5, 6].iter().fold(vec![false; n], |mut v, &r| {
                v[r] = true;
                v
            }),
        ];
        Mosaic {
            counts: vec![
                (rna_p, rna_i, rna_d, 7),
                (prot_p, prot_i, prot_d, 4),
                (atac_p, atac_i, atac_d, 5),
            ],
            present,
            cov: covariates(n),
        }
    }

    fn modalities(&self) -> Vec<ModalityCounts<'_, f64>> {
        self.counts
            .iter()
            .zip(&self.present)
            .map(|((p, i, d, g), present)| ModalityCounts {
                counts: CsrRef {
                    rows: MOSAIC_CELLS,
                    cols: *g,
                    indptr: p,
                    indices: i,
                    data: d,
                },
                present: Some(present),
            })
            .collect()
    }

    fn model(&self, joint: Joint) -> Vae<f64, Cpu> {
        self.model_with(VaeConfig {
            joint,
            ..VaeConfig::default()
        })
    }

    /// A model of the three modalities with `config`'s options at test sizes.
    fn model_with(&self, config: VaeConfig) -> Vae<f64, Cpu> {
        let config = VaeConfig {
            n_hidden: 4,
            n_latent: 3,
            n_layers: 1,
            ..config
        };
        Vae::<f64, Cpu>::new(
            Cpu,
            config,
            &[("rna", 7), ("protein", 4), ("atac", 5)],
            CATEGORIES,
            17,
        )
        .unwrap()
    }

    /// The same batch with every absent cell's counts replaced by large garbage.
    fn with_garbage(&self) -> Mosaic {
        let counts = self
            .counts
            .iter()
            .zip(&self.present)
            .map(|((p, i, d, g), present)| {
                let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
                for (r, &here) in present.iter().enumerate() {
                    if here {
                        let span = p[r] as usize..p[r + 1] as usize;
                        indices.extend_from_slice(&i[span.clone()]);
                        data.extend_from_slice(&d[span]);
                    } else {
                        for c in 0..*g {
                            indices.push(c as u32);
                            data.push(1000.0 + (r * 31 + c) as f64);
                        }
                    }
                    indptr.push(data.len() as u64);
                }
                (indptr, indices, data, *g)
            })
            .collect();
        Mosaic {
            counts,
            present: self.present.clone(),
            cov: self.cov.clone(),
        }
    }
}

#[test]
fn multimodal_gradients_for_every_joint_posterior() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    assert_eq!(
        mosaic
            .model(Joint::Poe)
            .modalities
            .iter()
            .map(|m| m.likelihood)
            .collect::<Vec<_>>(),
        [
            LikelihoodKind::Nb,
            LikelihoodKind::NbMixture,
            LikelihoodKind::Bernoulli
        ]
    );
    for joint in [Joint::Poe, Joint::Moe, Joint::Concat] {
        check_gradients(
            mosaic.model(joint),
            VaeBatch::new(&modalities, &mosaic.cov),
            &format!("{joint:?}"),
        );
    }
}

#[test]
fn absent_modalities_are_ignored_by_loss_gradients_and_embedding() {
    let clean = Mosaic::new();
    let garbage = clean.with_garbage();
    assert_ne!(clean.counts, garbage.counts);
    for joint in [Joint::Poe, Joint::Moe, Joint::Concat] {
        let mode = Mode::Train { seed: 3, step: 1 };
        let run = |m: &Mosaic| {
            let mut model = m.model(joint);
            let modalities = m.modalities();
            let batch = VaeBatch::new(&modalities, &m.cov);
            let terms = model.loss_and_grad(batch, 0.5, mode).unwrap();
            (
                terms,
                model.grads().clone(),
                model.latent_mean(batch).unwrap(),
                model.latent_and_expression(batch, 1e4).unwrap().1,
            )
        };
        let (a, b) = (run(&clean), run(&garbage));
        assert_eq!(a.0, b.0, "{joint:?}: loss terms");
        assert_eq!(a.1, b.1, "{joint:?}: gradients");
        assert_eq!(a.2, b.2, "{joint:?}: embedding");
        assert_eq!(a.3, b.3, "{joint:?}: imputed expression");
        // Not vacuous: garbage in a present cell changes the loss.
        let mut touched = Mosaic::new();
        touched.counts[1].2[0] += 50.0;
        assert_ne!(run(&touched).0, a.0, "{joint:?}");
    }
}

#[test]
fn joint_posteriors_combine_experts_as_documented() {
    // Cell 0 has RNA and protein.
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let batch = VaeBatch::new(&modalities, &mosaic.cov);
    let single = |i: usize| {
        // Each expert alone: the same parameters, other modalities marked absent.
        let absent = vec![false; MOSAIC_CELLS];
        let masks: Vec<&[bool]> = (0..3)
            .map(|k| {
                if k == i {
                    mosaic.present[k].as_slice()
                } else {
                    absent.as_slice()
                }
            })
            .collect();
        let mods: Vec<ModalityCounts<'_, f64>> = modalities
            .iter()
            .zip(&masks)
            .map(|(m, p)| ModalityCounts {
                present: Some(p),
                ..*m
            })
            .collect();
        let mut model = mosaic.model(Joint::Concat);
        model
            .latent_mean(VaeBatch::new(&mods, &mosaic.cov))
            .unwrap()
    };
    let (rna, protein) = (single(0), single(1));
    let mut concat = mosaic.model(Joint::Concat);
    let mut moe = mosaic.model(Joint::Moe);
    let (c, m) = (
        concat.latent_mean(batch).unwrap(),
        moe.latent_mean(batch).unwrap(),
    );
    for k in 0..3 {
        assert!(
            (c[k] - (rna[k] + protein[k])).abs() < 1e-12,
            "concat sums the present heads"
        );
        assert!(
            (m[k] - 0.5 * (rna[k] + protein[k])).abs() < 1e-12,
            "a mixture's mean averages its experts"
        );
    }
}

/// Labels (one unlabelled cell), two regression targets with missing values, and survival
/// (one cell without a time), for the 7 mosaic cells.
struct Targets {
    labels: Vec<i32>,
    targets: Vec<f64>,
    times: Vec<f64>,
    events: Vec<bool>,
}

impl Targets {
    fn new() -> Targets {
        let n = MOSAIC_CELLS;
        Targets {
            labels: vec![0, 1, 2, -1, 0, 1, 2],
            targets: (0..2 * n)
                .map(|i| {
                    if i % 5 == 3 {
                        f64::NAN
                    } else {
                        (i as f64 * 0.7).sin()
                    }
                })
                .collect(),
            times: vec![3.0, 1.0, f64::NAN, 5.0, 2.0, 4.0, 2.5],
            events: vec![true, false, true, true, true, false, true],
        }
    }

    fn supervision(&self) -> Supervision<'_> {
        Supervision {
            labels: Some(&self.labels),
            targets: Some(&self.targets),
            survival: Some(Survival {
                times: &self.times,
                events: &self.events,
            }),
        }
    }
}

fn supervised_config(joint: Joint) -> VaeConfig {
    VaeConfig {
        joint,
        classifier_weight: 2.0,
        regression_keys: vec!["age".into(), "score".into()],
        regression_weight: 1.5,
        cox_weight: 0.8,
        contrastive_weight: 3.0,
        contrastive_margin: 0.1,
        ..VaeConfig::default()
    }
}

#[test]
fn supervised_heads_and_contrastive_loss_on_the_latent_mean() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let targets = Targets::new();
    for joint in [Joint::Poe, Joint::Moe, Joint::Concat] {
        let batch = VaeBatch::new(&modalities, &mosaic.cov).with_supervision(targets.supervision());
        let mut model = mosaic.model_with(supervised_config(joint));
        let terms = model
            .loss(batch, 1.0, Mode::Train { seed: 1, step: 1 })
            .unwrap();
        assert!(
            terms.supervised > 0.0 && terms.regularization > 0.0,
            "{joint:?}: {terms:?}"
        );
        assert!(
            (terms.loss
                - terms.reconstruction
                - terms.kl
                - terms.regularization
                - terms.supervised)
                .abs()
                < 1e-9
        );
        // The heads see only the latent: the unsupervised terms are those of the same model
        // without supervision.
        let plain = model
            .loss(
                VaeBatch::new(&modalities, &mosaic.cov),
                1.0,
                Mode::Train { seed: 1, step: 1 },
            )
            .unwrap();
        assert_eq!(
            (plain.reconstruction, plain.kl),
            (terms.reconstruction, terms.kl)
        );
        check_gradients(model, batch, &format!("{joint:?} + supervised heads"));
    }
}

#[test]
fn classifier_predicts_probabilities_per_cell() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let batch = VaeBatch::new(&modalities, &mosaic.cov);
    let mut model = mosaic.model_with(supervised_config(Joint::Poe));
    let p = model.predict_labels(batch).unwrap().expect("a classifier");
    assert_eq!(p.len(), MOSAIC_CELLS * 3);
    assert!(
        p.chunks(3).all(
            |row| (row.iter().sum::<f64>() - 1.0).abs() < 1e-12 && row.iter().all(|&v| v > 0.0)
        )
    );
    assert!(
        mosaic
            .model(Joint::Poe)
            .predict_labels(batch)
            .unwrap()
            .is_none(),
        "no classifier, no predictions"
    );
}

#[test]
fn mmd_prior_replaces_the_kl() {
    check_model(VaeConfig {
        n_hidden: 4,
        n_latent: 2,
        n_layers: 1,
        prior: Prior::Mmd,
        prior_mmd_weight: 50.0,
        mmd_bandwidths: vec![0.5, 2.0],
        ..VaeConfig::default()
    });
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    for joint in [Joint::Poe, Joint::Moe] {
        let batch = VaeBatch::new(&modalities, &mosaic.cov);
        let mut model = mosaic.model_with(VaeConfig {
            joint,
            prior: Prior::Mmd,
            ..VaeConfig::default()
        });
        let mode = Mode::Train { seed: 1, step: 1 };
        let mmd = model.loss(batch, 0.5, mode).unwrap();
        let mut kl_model = mosaic.model(joint);
        let kl = kl_model.loss(batch, 0.5, mode).unwrap();
        assert_eq!(
            mmd.reconstruction, kl.reconstruction,
            "{joint:?}: same samples decoded"
        );
        assert!(
            mmd.kl > 0.0
                && mmd.kl != kl.kl
                && (mmd.loss - mmd.reconstruction - 0.5 * mmd.kl).abs() < 1e-9,
            "{joint:?}: {mmd:?}"
        );
        check_gradients(model, batch, &format!("{joint:?} + MMD prior"));
    }
}

#[test]
fn jeffreys_divergence_between_modality_posteriors() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let batch = VaeBatch::new(&modalities, &mosaic.cov);
    for joint in [Joint::Poe, Joint::Moe, Joint::Concat] {
        let mut model = mosaic.model_with(VaeConfig {
            joint,
            jeffreys_weight: 2.0,
            ..VaeConfig::default()
        });
        let terms = model
            .loss(batch, 1.0, Mode::Train { seed: 1, step: 1 })
            .unwrap();
        assert!(terms.regularization > 0.0, "{joint:?}: {terms:?}");
        check_gradients(model, batch, &format!("{joint:?} + Jeffreys"));
    }
    // Cells with one modality contribute nothing: RNA alone in every cell gives 0.
    let rna_only = vec![false; MOSAIC_CELLS];
    let mods: Vec<ModalityCounts<'_, f64>> = modalities
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if i == 0 {
                *m
            } else {
                ModalityCounts {
                    present: Some(&rna_only),
                    ..*m
                }
            }
        })
        .collect();
    let mut model = mosaic.model_with(VaeConfig {
        jeffreys_weight: 2.0,
        ..VaeConfig::default()
    });
    assert_eq!(
        model
            .loss(
                VaeBatch::new(&mods, &mosaic.cov),
                1.0,
                Mode::Train { seed: 1, step: 1 }
            )
            .unwrap()
            .regularization,
        0.0
    );
}

#[test]
fn adversarial_batch_classifier_reverses_the_encoders_gradient() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let batch = VaeBatch::new(&modalities, &mosaic.cov);
    for joint in [Joint::Poe, Joint::Moe] {
        let config = |reversal: f64| VaeConfig {
            joint,
            adversarial_batch_weight: 1.5,
            adversarial_reversal: reversal,
            ..VaeConfig::default()
        };
        // λ = -1 is plain joint minimisation of the classifier's loss: an ordinary gradient.
        check_gradients(
            mosaic.model_with(config(-1.0)),
            batch,
            &format!("{joint:?} + adversary without reversal"),
        );
        let grads = |reversal: f64| {
            let mut model = mosaic.model_with(config(reversal));
            let terms = model
                .loss_and_grad(batch, 1.0, Mode::Train { seed: 2, step: 1 })
                .unwrap();
            assert!(terms.regularization > 0.0);
            (model.grads().clone(), model.layout.clone())
        };
        let ((g0, layout), (g_plus, _), (g_rev, _)) = (grads(0.0), grads(-1.0), grads(0.7));
        let mut encoder_changed = false;
        for slot in layout.slots() {
            let adversary = slot.name.starts_with("heads.adversary");
            for i in slot.range.clone() {
                let classifier_part = g_plus[i] - g0[i];
                // The classifier's own parameters train on its loss; everything else receives
                // -λ times the gradient it would get from minimising that loss.
                let expected = if adversary {
                    g_plus[i]
                } else {
                    g0[i] - 0.7 * classifier_part
                };
                assert!(
                    (g_rev[i] - expected).abs() <= 1e-9 * (1.0 + expected.abs()),
                    "{joint:?} {}: {} vs {expected}",
                    slot.name,
                    g_rev[i]
                );
                encoder_changed |= !adversary && classifier_part.abs() > 1e-6;
                if slot.name.contains("decoder") {
                    assert_eq!(
                        classifier_part, 0.0,
                        "{joint:?}: the adversary does not reach {}",
                        slot.name
                    );
                }
            }
        }
        assert!(
            encoder_changed,
            "{joint:?}: the adversary reaches the encoders"
        );
    }
}

#[test]
fn a_modality_measured_in_under_two_cells_of_a_training_batch_sits_the_step_out() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let (none, mut one) = (vec![false; MOSAIC_CELLS], vec![false; MOSAIC_CELLS]);
    one[2] = true;
    let mode = Mode::Train { seed: 4, step: 1 };
    let run = |protein: &[bool]| {
        let mods: Vec<ModalityCounts<'_, f64>> = modalities
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if i == 1 {
                    ModalityCounts {
                        present: Some(protein),
                        ..*m
                    }
                } else {
                    *m
                }
            })
            .collect();
        let mut model = mosaic.model(Joint::Poe);
        let terms = model
            .loss_and_grad(VaeBatch::new(&mods, &mosaic.cov), 1.0, mode)
            .unwrap();
        (terms, model.grads().clone(), model.state().clone())
    };
    let (absent, lone) = (run(&none), run(&one));
    assert!(absent.0.loss.is_finite());
    assert_eq!(absent, lone, "one protein cell trains like none");
    let protein = mosaic
        .model(Joint::Poe)
        .layout
        .slots()
        .iter()
        .filter(|s| s.name.starts_with("protein."))
        .flat_map(|s| s.range.clone())
        .collect::<Vec<_>>();
    assert!(
        protein.iter().all(|&i| absent.1[i] == 0.0),
        "an unmeasured modality's parameters get zero gradients"
    );
}

#[test]
fn totalvi_protein_mixture_in_the_mosaic_model() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let batch = VaeBatch::new(&modalities, &mosaic.cov);
    let protein = ModalityConfig {
        likelihood: Some(LikelihoodKind::NbMixture),
        dispersion: None,
    };
    for joint in [Joint::Poe, Joint::Moe] {
        let mut model = mosaic.model_with(VaeConfig {
            joint,
            modalities: [("protein".to_string(), protein.clone())].into(),
            ..VaeConfig::default()
        });
        assert_eq!(model.modalities[1].likelihood, LikelihoodKind::NbMixture);
        assert_eq!(
            model.layout.slot("protein.log_background").unwrap().shape,
            vec![2, 4],
            "one background rate per batch and protein"
        );
        // The denoised protein is the expected foreground: positive, and below the foreground
        // rate (σ(−π) < 1) which is at least the background rate.
        let (_, expression) = model.latent_and_expression(batch, 1e4).unwrap();
        assert!(expression[1].iter().all(|&v| v > 0.0 && v.is_finite()));
        check_gradients(model, batch, &format!("{joint:?} + NB mixture protein"));
    }
}

#[test]
fn per_batch_tables_without_a_batch_covariate_have_one_row() {
    let (n, g) = (6, 5);
    let (indptr, indices, data) = counts(n, g, false);
    let modalities = [ModalityCounts {
        counts: CsrRef {
            rows: n,
            cols: g,
            indptr: &indptr,
            indices: &indices,
            data: &data,
        },
        present: None,
    }];
    let batch = VaeBatch::new(&modalities, &[]);
    for likelihood in [LikelihoodKind::NbMixture, LikelihoodKind::Nb] {
        let config = VaeConfig {
            n_hidden: 4,
            n_latent: 2,
            likelihood,
            dispersion: Dispersion::GeneBatch,
            ..VaeConfig::default()
        };
        let model =
            Vae::<f64, Cpu>::new(Cpu, config, &[("rna", g)], Categories::default(), 3).unwrap();
        let table = if likelihood == LikelihoodKind::Nb {
            "log_theta"
        } else {
            "log_background"
        };
        let slot = model.layout.slot(table).unwrap().clone();
        assert_eq!(slot.shape, vec![1, g]);
        let mut m = model;
        m.loss_and_grad(batch, 1.0, Mode::Train { seed: 1, step: 1 })
            .unwrap();
        assert!(
            m.grads()[slot.range.clone()].iter().any(|&v| v != 0.0),
            "{likelihood:?}: the table learns"
        );
        check_gradients(m, batch, &format!("{likelihood:?} without batches"));
    }
}

#[test]
fn cross_modal_cycle_consistency() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let batch = VaeBatch::new(&modalities, &mosaic.cov);
    for joint in [Joint::Poe, Joint::Moe, Joint::Concat] {
        let mut model = mosaic.model_with(VaeConfig {
            joint,
            cycle_weight: 1.5,
            ..VaeConfig::default()
        });
        let mode = Mode::Train { seed: 1, step: 1 };
        let terms = model.loss(batch, 1.0, mode).unwrap();
        let plain = mosaic.model(joint).loss(batch, 1.0, mode).unwrap();
        assert!(terms.regularization > 0.0, "{joint:?}: {terms:?}");
        assert_eq!(
            (terms.reconstruction, terms.kl),
            (plain.reconstruction, plain.kl),
            "{joint:?}: the cycle adds a term only"
        );
        // The cycle pass leaves the BatchNorm running statistics as the main pass sets them.
        let mut with = mosaic.model_with(VaeConfig {
            joint,
            cycle_weight: 1.5,
            ..VaeConfig::default()
        });
        let mut without = mosaic.model(joint);
        with.loss_and_grad(batch, 1.0, mode).unwrap();
        without.loss_and_grad(batch, 1.0, mode).unwrap();
        assert_eq!(
            with.state(),
            without.state(),
            "{joint:?}: running statistics"
        );
        check_gradients(model, batch, &format!("{joint:?} + cycle"));
    }
}

#[test]
fn the_posterior_is_the_embeddings_mean_and_decoding_it_is_the_expression() {
    let mosaic = Mosaic::new();
    let modalities = mosaic.modalities();
    let batch = VaeBatch::new(&modalities, &mosaic.cov);
    for joint in [Joint::Poe, Joint::Concat] {
        let mut model = mosaic.model(joint);
        let (mean, variance) = model.latent_posterior(batch).unwrap().unwrap();
        assert_eq!(mean, model.latent_mean(batch).unwrap(), "{joint:?}");
        assert!(
            variance.iter().all(|&v| v > 0.0 && v.is_finite()),
            "{joint:?}"
        );
        let (_, expression) = model.latent_and_expression(batch, 1e4).unwrap();
        assert_eq!(
            model.expression_at(&mean, batch, 1e4).unwrap(),
            expression,
            "{joint:?}"
        );
        let moved: Vec<f64> = mean.iter().map(|m| m + 0.5).collect();
        assert_ne!(model.expression_at(&moved, batch, 1e4).unwrap(), expression);
    }
    // A mixture's posterior is no single Gaussian.
    assert!(
        mosaic
            .model(Joint::Moe)
            .latent_posterior(batch)
            .unwrap()
            .is_none()
    );
}
