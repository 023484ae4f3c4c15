//! Architecture surgery on a whole model: the extended model maps the reference's cells as the
//! reference did, and fine-tuning on the query changes only what it may.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_kernels::backend::{Backend, Cpu, In};
use tessera_kernels::ops::linear::CsrRef;
use tessera_kernels::params::Layout;
use tessera_models::surgery::{
    BatchExtension, Unfreeze, encoder_ranges, transfer, unfrozen_ranges,
};
use tessera_models::{
    Categories, Dispersion, ModalityCounts, TrainConfig, Trainer, Vae, VaeBatch, VaeConfig,
};

const GENES: usize = 9;

fn counts(n: usize, shift: usize) -> (Vec<u64>, Vec<u32>, Vec<f64>) {
    let (mut indptr, mut indices, mut data) = (vec![0u64], Vec::new(), Vec::new());
    for r in 0..n {
        for c in 0..GENES {
            let v = ((r * 7 + c * 3 + shift) % 6) as f64;
            if v > 1.0 {
                indices.push(c as u32);
                data.push(v * (1.0 + (r % 4) as f64));
            }
        }
        indptr.push(data.len() as u64);
    }
    (indptr, indices, data)
}

/// One-hot of `batch` among `n_batch`, then one more covariate column (alternating).
fn covariates(n: usize, n_batch: usize, batch: impl Fn(usize) -> usize) -> Vec<f64> {
    (0..n)
        .flat_map(|r| {
            (0..n_batch)
                .map(|b| f64::from(u8::from(b == batch(r))))
                .chain([f64::from(u8::from(r % 2 == 0))])
                .collect::<Vec<_>>()
        })
        .collect()
}

fn config() -> VaeConfig {
    VaeConfig {
        n_hidden: 8,
        n_latent: 3,
        encode_covariates: true,
        dispersion: Dispersion::GeneBatch,
        ..VaeConfig::default()
    }
}

fn latent(
    model: &mut Vae<f64, Cpu>,
    data: &(Vec<u64>, Vec<u32>, Vec<f64>),
    cov: &[f64],
    n: usize,
) -> Vec<f64> {
    let modalities = [ModalityCounts {
        counts: CsrRef {
            rows: n,
            cols: GENES,
            indptr: &data.0,
            indices: &data.1,
            data: &data.2,
        },
        present: None,
    }];
    model.latent_mean(VaeBatch::new(&modalities, cov)).unwrap()
}

/// A reference trained a few steps on batches 0 and 1.
fn reference() -> Vae<f64, Cpu> {
    let n = 12;
    let data = counts(n, 0);
    let cov = covariates(n, 2, |r| r % 2);
    let model = Vae::<f64, Cpu>::new(
        Cpu,
        config(),
        &[("rna", GENES)],
        Categories {
            n_batch: 2,
            n_cov: 3,
            n_labels: 0,
        },
        5,
    )
    .unwrap();
    let mut trainer = Trainer::new(model, TrainConfig::default()).unwrap();
    for _ in 0..5 {
        let modalities = [ModalityCounts {
            counts: CsrRef {
                rows: n,
                cols: GENES,
                indptr: &data.0,
                indices: &data.1,
                data: &data.2,
            },
            present: None,
        }];
        trainer.step(VaeBatch::new(&modalities, &cov), 0).unwrap();
    }
    trainer.model
}

/// The query model: the reference extended by one batch.
fn extended(reference: &Vae<f64, Cpu>) -> (Vae<f64, Cpu>, Vec<std::ops::Range<usize>>) {
    let mut query = Vae::<f64, Cpu>::new(
        Cpu,
        config(),
        &[("rna", GENES)],
        Categories {
            n_batch: 3,
            n_cov: 4,
            n_labels: 0,
        },
        99,
    )
    .unwrap();
    let ext = BatchExtension {
        reference_batches: 2,
        added: 1,
    };
    let mut added = Vec::new();
    let mut extend =
        |ref_layout: &Layout, ref_buf: &Vec<f64>, layout: &Layout, buf: &mut Vec<f64>| {
            let host = Cpu.download(In::all(ref_buf)).unwrap();
            let mut values = Cpu.download(In::all(buf)).unwrap();
            let lookup = |name: &str| {
                ref_layout
                    .slot(name)
                    .map(|s| (s.shape.clone(), host[s.range.clone()].to_vec()))
            };
            added.extend(transfer(layout, &mut values, lookup, ext).unwrap());
            *buf = Cpu.upload(&values).unwrap();
        };
    let (layout, state_layout) = (query.layout.clone(), query.state_layout.clone());
    extend(
        &reference.layout,
        reference.values(),
        &layout,
        query.values_mut(),
    );
    extend(
        &reference.state_layout,
        reference.state(),
        &state_layout,
        query.state_mut(),
    );
    (query, added)
}

#[test]
fn the_extended_model_maps_reference_cells_as_the_reference_did() {
    let mut reference = reference();
    let (mut query, _) = extended(&reference);
    let n = 12;
    let data = counts(n, 0);
    let before = latent(&mut reference, &data, &covariates(n, 2, |r| r % 2), n);
    let after = latent(&mut query, &data, &covariates(n, 3, |r| r % 2), n);
    let diff = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        diff < 1e-12,
        "reference cells moved by {diff} after surgery"
    );
}

#[test]
fn fine_tuning_changes_only_the_new_batch_and_keeps_the_reference_embedding() {
    let mut reference = reference();
    let (query, added) = extended(&reference);
    assert!(!added.is_empty());
    let frozen_values = Cpu.download(In::all(query.values())).unwrap();
    let state_ranges = encoder_ranges(&query.state_layout);
    let mut trainer = Trainer::new(query, TrainConfig::default()).unwrap();
    trainer.freeze_except(added.clone());
    trainer.freeze_state(state_ranges.clone()).unwrap();
    let state_before = Cpu.download(In::all(trainer.model.state())).unwrap();
    // Query cells: batch 2 only, other counts.
    let n = 10;
    let data = counts(n, 2);
    let cov = covariates(n, 3, |_| 2);
    for _ in 0..4 {
        let modalities = [ModalityCounts {
            counts: CsrRef {
                rows: n,
                cols: GENES,
                indptr: &data.0,
                indices: &data.1,
                data: &data.2,
            },
            present: None,
        }];
        trainer.step(VaeBatch::new(&modalities, &cov), 0).unwrap();
    }
    let tuned = Cpu.download(In::all(trainer.model.values())).unwrap();
    let inside = |i: usize| added.iter().any(|r| r.contains(&i));
    assert!(
        (0..tuned.len())
            .filter(|&i| !inside(i))
            .all(|i| tuned[i] == frozen_values[i]),
        "a frozen parameter changed"
    );
    assert!(
        (0..tuned.len())
            .filter(|&i| inside(i))
            .any(|i| tuned[i] != frozen_values[i]),
        "no new parameter was trained"
    );
    let state = Cpu.download(In::all(trainer.model.state())).unwrap();
    assert!(
        state_ranges
            .iter()
            .flat_map(|r| r.clone())
            .all(|i| state[i] == state_before[i]),
        "encoder running statistics changed"
    );
    // So the reference's cells still embed exactly where the reference put them.
    let n = 12;
    let data = counts(n, 0);
    let before = latent(&mut reference, &data, &covariates(n, 2, |r| r % 2), n);
    let after = latent(&mut trainer.model, &data, &covariates(n, 3, |r| r % 2), n);
    let diff = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        diff < 1e-12,
        "reference cells moved by {diff} after fine-tuning"
    );
}

#[test]
fn unfreezing_the_encoder_input_trains_it_too() {
    let reference = reference();
    let (query, added) = extended(&reference);
    let opened = unfrozen_ranges(
        &query.layout,
        Unfreeze {
            encoder_input: true,
            decoder_input: false,
        },
    );
    assert!(!opened.is_empty());
    let start = Cpu.download(In::all(query.values())).unwrap();
    let mut trainer = Trainer::new(query, TrainConfig::default()).unwrap();
    trainer.freeze_except(added.into_iter().chain(opened.clone()).collect());
    let n = 10;
    let data = counts(n, 2);
    let cov = covariates(n, 3, |_| 2);
    let modalities = [ModalityCounts {
        counts: CsrRef {
            rows: n,
            cols: GENES,
            indptr: &data.0,
            indices: &data.1,
            data: &data.2,
        },
        present: None,
    }];
    trainer.step(VaeBatch::new(&modalities, &cov), 0).unwrap();
    let tuned = Cpu.download(In::all(trainer.model.values())).unwrap();
    assert!(
        opened
            .iter()
            .flat_map(|r| r.clone())
            .any(|i| tuned[i] != start[i]),
        "the encoder's input layer did not train"
    );
    let w = trainer
        .model
        .layout
        .slot("decoder.main.w")
        .unwrap()
        .range
        .clone();
    assert_eq!(tuned[w.clone()], start[w], "the decoder stays frozen");
}

#[test]
fn a_frozen_backward_gives_the_trained_rows_the_full_backward_gradient() {
    let reference = reference();
    let (full, added) = extended(&reference);
    let (frozen, _) = extended(&reference);
    let mut full = Trainer::new(full, TrainConfig::default()).unwrap();
    let mut frozen = Trainer::new(frozen, TrainConfig::default()).unwrap();
    frozen.freeze_except(added.clone());
    let n = 10;
    let data = counts(n, 2);
    let cov = covariates(n, 3, |r| if r < 5 { 2 } else { r % 2 });
    let modalities = [ModalityCounts {
        counts: CsrRef {
            rows: n,
            cols: GENES,
            indptr: &data.0,
            indices: &data.1,
            data: &data.2,
        },
        present: None,
    }];
    let a = full.gradients(VaeBatch::new(&modalities, &cov), 0).unwrap();
    let b = frozen
        .gradients(VaeBatch::new(&modalities, &cov), 0)
        .unwrap();
    assert_eq!(a.terms.loss, b.terms.loss);
    let (ga, gb) = (
        Cpu.download(In::all(full.model.grads())).unwrap(),
        Cpu.download(In::all(frozen.model.grads())).unwrap(),
    );
    for r in &added {
        assert_eq!(
            ga[r.clone()],
            gb[r.clone()],
            "gradient of trained range {r:?}"
        );
    }
    assert!(
        added.iter().flat_map(|r| r.clone()).any(|i| ga[i] != 0.0),
        "the new rows get a gradient"
    );
    // The frozen backward skipped something: the first encoder layer's weights (sparse input).
    let w = frozen
        .model
        .layout
        .slots()
        .iter()
        .find(|s| s.name.ends_with("encoder.0.w"))
        .unwrap()
        .range
        .clone();
    assert!(
        gb[w.clone()].iter().all(|&g| g == 0.0) && ga[w].iter().any(|&g| g != 0.0),
        "frozen weight gradients are not computed"
    );
}
