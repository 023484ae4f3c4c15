//! Whole-model gradient checks: every likelihood, dispersion and covariate option of the VAE,
//! in f64 on the CPU backend, against central finite differences of the same loss.
#![allow(clippy::unwrap_used)]

use tessera_kernels::backend::Cpu;
use tessera_kernels::gradcheck::{check_at, spread};
use tessera_kernels::ops::linear::CsrRef;
use tessera_models::layers::Mode;
use tessera_models::{Dispersion, LikelihoodKind, Vae, VaeBatch, VaeConfig};

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

/// Batch one-hot (2 batches) then a second covariate (1 column).
fn covariates(n: usize) -> Vec<f64> {
    (0..n).flat_map(|r| [if r % 2 == 0 { 1.0 } else { 0.0 }, if r % 2 == 1 { 1.0 } else { 0.0 }, if r % 3 == 0 { 1.0 } else { 0.0 }]).collect()
}

fn check_model(config: VaeConfig) {
    let (n, g) = (6, 7);
    let (indptr, indices, data) = counts(n, g, config.likelihood == LikelihoodKind::Bernoulli);
    let cov = covariates(n);
    let batch = VaeBatch { counts: CsrRef { rows: n, cols: g, indptr: &indptr, indices: &indices, data: &data }, covariates: &cov };
    let mut model = Vae::<f64, Cpu>::new(Cpu, config.clone(), g, 2, 3, 11).unwrap();
    // Move off the initial point so log θ / log σ² gradients are generic.
    for (i, v) in model.values.iter_mut().enumerate() {
        *v += 0.05 * ((i as f64) * 0.37).sin();
    }
    let mode = Mode::Train { seed: 5, step: 3 };
    let kl_weight = 0.7;
    let terms = model.loss_and_grad(batch, kl_weight, mode).unwrap();
    assert!(terms.loss.is_finite() && terms.reconstruction > 0.0 && terms.kl >= 0.0, "{config:?}: {terms:?}");
    let analytic = model.grads.clone();
    let x0 = model.values.clone();
    let loss = |v: &[f64]| {
        model.values.copy_from_slice(v);
        model.loss(batch, kl_weight, mode).unwrap().loss
    };
    let loss = std::cell::RefCell::new(loss);
    let at = spread(x0.len(), 400);
    check_at(|v| (loss.borrow_mut())(v), &x0, &analytic, at.clone(), 1e-6, 1e-6).unwrap_or_else(|e| panic!("{config:?}: {e}"));
    // Not vacuous: gradients off by 1% are caught.
    let off: Vec<f64> = analytic.iter().map(|g| g * 1.01).collect();
    assert!(check_at(|v| (loss.borrow_mut())(v), &x0, &off, at, 1e-6, 1e-6).is_err());
}

#[test]
fn scvi_defaults_nb_gene_dispersion() {
    check_model(VaeConfig { n_hidden: 5, n_latent: 2, n_layers: 2, ..VaeConfig::default() });
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
    ] {
        check_model(VaeConfig { n_hidden: 4, n_latent: 3, n_layers: 1, likelihood, dispersion, ..VaeConfig::default() });
    }
}

#[test]
fn covariates_everywhere_without_batch_norm_or_dropout() {
    check_model(VaeConfig { n_hidden: 4, n_latent: 2, n_layers: 2, encode_covariates: true, deeply_inject_covariates: true, batch_norm: false, dropout: 0.0, ..VaeConfig::default() });
}

#[test]
fn non_finite_input_stops_training_naming_the_step_and_term() {
    use tessera_models::{TrainConfig, TrainError, Trainer};
    let (n, g) = (4, 5);
    let (indptr, indices, mut data) = counts(n, g, false);
    let cov = covariates(n);
    let model = Vae::<f64, Cpu>::new(Cpu, VaeConfig { n_hidden: 4, n_latent: 2, ..VaeConfig::default() }, g, 2, 3, 1).unwrap();
    let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
    let batch = VaeBatch { counts: CsrRef { rows: n, cols: g, indptr: &indptr, indices: &indices, data: &data }, covariates: &cov };
    trainer.step(batch, 0).unwrap();
    let before = trainer.model.values.clone();
    data[0] = f64::NAN;
    let batch = VaeBatch { counts: CsrRef { rows: n, cols: g, indptr: &indptr, indices: &indices, data: &data }, covariates: &cov };
    match trainer.step(batch, 0) {
        Err(TrainError::NonFinite { step: 2, term, .. }) => assert_eq!(term, "reconstruction loss"),
        other => panic!("expected a non-finite error at step 2, got {other:?}"),
    }
    assert_eq!(trainer.model.values, before, "a failed step changes no parameter");
    assert_eq!(trainer.step, 1);
}

#[test]
fn early_stopping_watches_the_unweighted_elbo() {
    let t = tessera_models::LossTerms { reconstruction: 100.0, kl: 20.0, loss: 105.0, cells: 8 };
    assert_eq!(t.negative_elbo(), 120.0);
}
