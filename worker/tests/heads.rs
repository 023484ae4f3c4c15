//! The regularisers and supervised heads through `fit`: on real PBMC counts (read from
//! ../shared/data, trained on a copy) a classifier trained on two thirds of the labels predicts
//! the rest, regression and Cox heads learn obs columns, every regulariser trains; on a
//! simulated mosaic store the multimodal regularisers (Jeffreys, adversary, cycle) and the
//! totalVI protein mixture train; bad head configurations are named.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use tessera_data::{AnnData, Column};
use tessera_models::{LikelihoodKind, ModalityConfig, Prior};
use tessera_worker::{FitError, FitOptions, fit};

mod common;
use common::{options, pbmc_copy};

fn cell_types(data: &str) -> (Vec<i32>, Vec<String>) {
    let Column::Categorical {
        codes, categories, ..
    } = AnnData::open(data)
        .unwrap()
        .obs_column("cell_type")
        .unwrap()
    else {
        panic!("cell_type is categorical")
    };
    (codes, categories)
}

#[test]
fn classifier_trained_on_two_thirds_of_the_labels_predicts_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = pbmc_copy(dir.path());
    let (codes, categories) = cell_types(&data);
    // Every third cell unlabelled (a missing value), written as a new obs column.
    let partial: Vec<i32> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| if i % 3 == 0 { -1 } else { c })
        .collect();
    AnnData::open(&data)
        .unwrap()
        .write_obs_column(
            "cell_type_partial",
            &Column::Categorical {
                codes: partial,
                categories: categories.clone(),
                ordered: false,
            },
            false,
        )
        .unwrap();

    let mut opts = options(&data, &dir.path().join("out"), 60);
    opts.label_key = Some("cell_type_partial".into());
    opts.config.model.classifier_weight = 50.0;
    let report = fit(&opts, |_| {}).unwrap();
    assert_eq!(
        report.prediction_elements,
        vec![
            "obs/tessera_prediction".to_string(),
            "obsm/tessera_prediction_probabilities".to_string()
        ]
    );
    let first = report.history[0].train.supervised;
    let last = report.history.last().unwrap().train.supervised;
    assert!(
        first > 0.0 && last < 0.5 * first,
        "classifier loss {first} -> {last}"
    );

    let adata = AnnData::open(&data).unwrap();
    let Column::Categorical {
        codes: predicted,
        categories: predicted_categories,
        ..
    } = adata.obs_column("tessera_prediction").unwrap()
    else {
        panic!("predictions are categorical")
    };
    assert_eq!(predicted_categories, categories);
    assert!(
        adata.obs().unwrap().column("tessera_prediction").is_some(),
        "listed in the obs dataframe"
    );
    let unlabelled: Vec<usize> = (0..codes.len()).filter(|i| i % 3 == 0).collect();
    let accuracy = unlabelled
        .iter()
        .filter(|&&i| predicted[i] == codes[i])
        .count() as f64
        / unlabelled.len() as f64;
    // The largest sorted population is 34% of the cells.
    eprintln!(
        "classifier: accuracy {accuracy:.3} on the {} unlabelled cells; loss {first:.3} -> {last:.3}",
        unlabelled.len()
    );
    assert!(
        accuracy > 0.6,
        "accuracy on the unlabelled third {accuracy}"
    );
    let (p, k) = adata.obsm("tessera_prediction_probabilities").unwrap();
    assert_eq!(k, categories.len());
    assert!(
        p.chunks(k)
            .all(|row| (row.iter().sum::<f32>() - 1.0).abs() < 1e-4)
    );
    assert!(
        p.chunks(k)
            .zip(&predicted)
            .all(|(row, &c)| row.iter().all(|&v| v <= row[c as usize])),
        "the prediction is the most probable label"
    );

    // Predictions are outputs like any other: not replaced without being asked.
    opts.config.train.max_epochs = Some(1);
    opts.embedding_key = "X_again".into();
    let err = fit(&opts, |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("obs/tessera_prediction")
            && err.to_string().contains("already exists"),
        "{err}"
    );
    // Under another key, a second run's predictions sit beside the first's.
    opts.prediction_key = "again_prediction".into();
    let again = fit(&opts, |_| {}).unwrap();
    assert_eq!(
        again.prediction_elements,
        vec![
            "obs/again_prediction".to_string(),
            "obsm/again_prediction_probabilities".to_string()
        ]
    );
    let adata = AnnData::open(&data).unwrap();
    assert_eq!(
        adata.obs_column("tessera_prediction").unwrap(),
        Column::Categorical {
            codes: predicted,
            categories: categories.clone(),
            ordered: false
        },
        "the first run's predictions are kept"
    );
    assert!(adata.obs().unwrap().column("again_prediction").is_some());
    assert_eq!(adata.obsm("again_prediction_probabilities").unwrap().1, k);
}

#[test]
fn regression_and_cox_heads_learn_obs_columns() {
    let dir = tempfile::tempdir().unwrap();
    let data = pbmc_copy(dir.path());
    let (codes, _) = cell_types(&data);
    let adata = AnnData::open(&data).unwrap();
    // A score and a survival time that depend on the cell type; some values missing.
    let score: Vec<f64> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            if i % 10 == 0 {
                f64::NAN
            } else {
                c as f64 * 0.5 - 2.0
            }
        })
        .collect();
    let time: Vec<f64> = codes
        .iter()
        .map(|&c| 1.0 + (c as f64 * 7.0) % 10.0)
        .collect();
    let event: Vec<Option<bool>> = (0..codes.len()).map(|i| Some(i % 4 != 0)).collect();
    adata
        .write_obs_column("score", &Column::Float(score), false)
        .unwrap();
    adata
        .write_obs_column("time", &Column::Float(time), false)
        .unwrap();
    adata
        .write_obs_column("event", &Column::Bool(event), false)
        .unwrap();

    let mut opts = options(&data, &dir.path().join("out"), 40);
    let m = &mut opts.config.model;
    (m.regression_keys, m.regression_weight) = (vec!["score".into()], 20.0);
    (m.survival_time_key, m.survival_event_key, m.cox_weight) =
        (Some("time".into()), Some("event".into()), 5.0);
    let report = fit(&opts, |_| {}).unwrap();
    let first = report.history[0].train.supervised;
    let last = report.history.last().unwrap().train.supervised;
    assert!(
        first.is_finite() && last < 0.5 * first,
        "regression + Cox loss {first} -> {last}"
    );
}

#[test]
fn every_regulariser_trains_on_real_counts() {
    let dir = tempfile::tempdir().unwrap();
    let data = pbmc_copy(dir.path());
    let mut opts = options(&data, &dir.path().join("out"), 30);
    // Two pseudo-batches so the batch terms have something to act on.
    let phase = AnnData::open(&data).unwrap().obs_column("phase").unwrap();
    assert!(matches!(phase, Column::Categorical { .. }));
    opts.batch_key = Some("phase".into());
    let m = &mut opts.config.model;
    (m.prior, m.prior_mmd_weight) = (Prior::Mmd, 100.0);
    (m.mmd_batch_weight, m.adversarial_batch_weight) = (1.0, 1.0);
    (m.contrastive_weight, m.contrastive_margin) = (10.0, 0.1);
    let report = fit(&opts, |_| {}).unwrap();
    let (first, last) = (
        report.history[0].validation.unwrap(),
        report.history.last().unwrap().validation.unwrap(),
    );
    assert!(first.regularization > 0.0 && last.kl > 0.0, "{last:?}");
    assert!(
        last.reconstruction < 0.8 * first.reconstruction,
        "reconstruction {} -> {}",
        first.reconstruction,
        last.reconstruction
    );
    assert!(report.embedding.iter().all(|v| v.is_finite()));
}

#[test]
fn jeffreys_adversary_and_cycle_train_on_a_mosaic_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mosaic.zarr").display().to_string();
    let config = tessera_data::SimConfig {
        n_cells: 1200,
        n_genes: 200,
        n_proteins: 20,
        n_peaks: 100,
        n_types: 5,
        missing: 0.3,
        seed: 9,
        ..tessera_data::SimConfig::default()
    };
    tessera_data::simulate(&data, &config, |_| {}).unwrap();
    let mut opts = options(&data, &dir.path().join("out"), 20);
    opts.batch_key = Some("batch".into());
    (
        opts.config.model.jeffreys_weight,
        opts.config.model.adversarial_batch_weight,
        opts.config.model.cycle_weight,
    ) = (0.5, 1.0, 1.0);
    let report = fit(&opts, |_| {}).unwrap();
    let (first, last) = (
        report.history[0].validation.unwrap(),
        report.history.last().unwrap().validation.unwrap(),
    );
    assert!(
        last.regularization > 0.0 && last.negative_elbo() < 0.9 * first.negative_elbo(),
        "{first:?} -> {last:?}"
    );
}

#[test]
fn head_configurations_without_their_columns_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = pbmc_copy(dir.path());
    let out = dir.path().join("out");
    let refuse = |edit: &dyn Fn(&mut FitOptions), expect: &[&str]| {
        let mut opts = options(&data, &out, 1);
        edit(&mut opts);
        let err = fit(&opts, |_| {}).unwrap_err();
        assert!(expect.iter().all(|e| err.to_string().contains(e)), "{err}");
        err
    };
    let err = refuse(
        &|o| (o.label_key, o.config.model.classifier_weight) = (None, 1.0),
        &["classifier_weight", "--label-key"],
    );
    assert!(matches!(err, FitError::Config { .. }));
    refuse(
        &|o| o.config.model.regression_weight = 1.0,
        &["regression_keys"],
    );
    refuse(
        &|o| {
            (o.config.model.cox_weight, o.config.model.survival_time_key) =
                (1.0, Some("n_counts".into()))
        },
        &["survival_event_key"],
    );
    refuse(
        &|o| o.config.model.jeffreys_weight = f64::NAN,
        &["jeffreys_weight", "finite"],
    );
    refuse(
        &|o| {
            (
                o.config.model.regression_keys,
                o.config.model.regression_weight,
            ) = (vec!["cell_type".into()], 1.0)
        },
        &["obs/cell_type", "numeric"],
    );
    refuse(
        &|o| {
            (
                o.config.model.regression_keys,
                o.config.model.regression_weight,
            ) = (vec!["no_such_column".into()], 1.0)
        },
        &["no_such_column"],
    );
    // Nothing was trained or written by a refused run.
    assert!(
        !AnnData::open(&data)
            .unwrap()
            .keys("obsm")
            .unwrap()
            .contains(&"X_tessera".to_string())
    );
}

#[test]
fn totalvi_protein_mixture_trains_on_a_mosaic_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mosaic.zarr").display().to_string();
    // The simulator's proteins have a per-batch background under a type-specific foreground.
    let config = tessera_data::SimConfig {
        n_cells: 1200,
        n_genes: 200,
        n_proteins: 20,
        n_peaks: 100,
        n_types: 5,
        missing: 0.3,
        seed: 9,
        ..tessera_data::SimConfig::default()
    };
    tessera_data::simulate(&data, &config, |_| {}).unwrap();
    let run = |likelihood: LikelihoodKind| {
        let mut opts = options(&data, &dir.path().join(format!("out-{likelihood:?}")), 40);
        opts.batch_key = Some("batch".into());
        opts.embedding_key = format!("X_{likelihood:?}");
        opts.config.model.modalities.insert(
            "prot".into(),
            ModalityConfig {
                likelihood: Some(likelihood),
                dispersion: None,
            },
        );
        fit(&opts, |_| {}).unwrap()
    };
    let (mixture, nb) = (run(LikelihoodKind::NbMixture), run(LikelihoodKind::Nb));
    let (m, n) = (
        mixture.history.last().unwrap().validation.unwrap(),
        nb.history.last().unwrap().validation.unwrap(),
    );
    eprintln!(
        "protein NB mixture vs NB, validation reconstruction (all modalities): {:.2} vs {:.2}",
        m.reconstruction, n.reconstruction
    );
    assert!(
        m.reconstruction < n.reconstruction,
        "the background/foreground mixture fits the simulated proteins better: {} vs {}",
        m.reconstruction,
        n.reconstruction
    );
    let root = tessera_data::MuData::open(&data).unwrap().root();
    let Column::Categorical { codes, .. } = root.obs_column("cell_type").unwrap() else {
        panic!("cell_type is categorical")
    };
    let (x, d) = root.obsm("X_NbMixture").unwrap();
    let same_type_nearest = (0..codes.len()).filter(|&i| {
        let nearest = (0..codes.len()).filter(|&j| j != i).min_by(|&a, &b| {
            let dist = |j: usize| {
                (0..d)
                    .map(|c| (x[i * d + c] - x[j * d + c]).powi(2))
                    .sum::<f32>()
            };
            dist(a).total_cmp(&dist(b))
        });
        nearest.is_some_and(|j| codes[j] == codes[i])
    });
    let accuracy = same_type_nearest.count() as f64 / codes.len() as f64;
    assert!(
        accuracy > 0.9,
        "nearest-neighbour cell-type accuracy {accuracy}"
    );
}
