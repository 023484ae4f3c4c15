//! `fit` end to end on real counts (PBMC, read from ../shared/data and trained on a copy):
//! the ELBO falls, the embedding separates the sorted cell types and lands in the store, and
//! bad inputs and existing outputs are refused with errors that name them.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use tessera_data::{AnnData, Column};
use tessera_worker::{FitConfig, FitError, fit};

mod common;
use common::{options, pbmc_copy, shared_data};

/// Leave-one-out k-nearest-neighbour accuracy of `labels` in an embedding.
fn knn_accuracy(x: &[f32], dim: usize, labels: &[i32], k: usize) -> f64 {
    let n = labels.len();
    let mut correct = 0;
    for i in 0..n {
        let mut d: Vec<(f32, i32)> = (0..n)
            .filter(|&j| j != i)
            .map(|j| {
                (
                    (0..dim)
                        .map(|c| (x[i * dim + c] - x[j * dim + c]).powi(2))
                        .sum(),
                    labels[j],
                )
            })
            .collect();
        d.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut votes = std::collections::HashMap::new();
        for (_, l) in &d[..k] {
            *votes.entry(*l).or_insert(0) += 1;
        }
        let best = votes.into_iter().max_by_key(|&(l, c)| (c, -l)).unwrap().0;
        correct += usize::from(best == labels[i]);
    }
    correct as f64 / n as f64
}

#[test]
fn pbmc_trains_and_separates_cell_types() {
    let dir = tempfile::tempdir().unwrap();
    let data = pbmc_copy(dir.path());
    let out = dir.path().join("out");
    let report = fit(&options(&data, &out, 40), |_| {}).unwrap();

    // The ELBO falls: validation loss at the end well below the first epoch's.
    let first = report.history[0].validation.unwrap().loss;
    let last = report.history.last().unwrap().validation.unwrap().loss;
    assert!(last < 0.8 * first, "validation loss {first} -> {last}");
    assert_eq!(report.n_train + report.n_validation, 700);
    assert_eq!(
        report.n_validation, 70,
        "scvi-tools' split: floor(10% of 700) held out"
    );
    let listed: Vec<u64> = std::fs::read_to_string(out.join("validation_cells.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(listed.len(), 70, "the held-out cells are listed");
    assert!(
        listed.windows(2).all(|w| w[0] < w[1]) && listed.iter().all(|&c| c < 700),
        "distinct obs rows in order"
    );

    // The embedding is in the store, equal to what fit returned.
    let adata = AnnData::open(&data).unwrap();
    let (stored, cols) = adata.obsm("X_tessera").unwrap();
    assert_eq!((cols, stored.len()), (10, 7000));
    assert_eq!(stored, report.embedding);

    // Sorted PBMC populations are neighbours in the latent space: 15-NN label accuracy far
    // above the largest class (240/700 = 34%).
    let Column::Categorical { codes, .. } = adata.obs_column("cell_type").unwrap() else {
        panic!("cell_type is categorical")
    };
    let acc = knn_accuracy(&report.embedding, 10, &codes, 15);
    assert!(acc > 0.6, "15-NN cell-type accuracy {acc}");

    // Records: one CSV row per epoch, weights, resolved config.
    let csv = std::fs::read_to_string(out.join("history.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + report.history.len());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model"]["n_latent"], 10);
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&weights).unwrap();
    assert_eq!(
        tensors.tensor("decoder.main.w").unwrap().shape(),
        &[128, 765]
    );
    assert_eq!(
        tensors.tensor("encoder.0.bn_running_var").unwrap().shape(),
        &[128]
    );
    // What query mapping needs: the reference's latent, labels and gene names.
    let reference =
        tessera_worker::reference::Reference::read(&out.join("reference.safetensors")).unwrap();
    assert_eq!(reference.latent, report.embedding);
    assert_eq!((reference.n_latent, reference.n_cells()), (10, 700));
    let var = adata.var().unwrap().index;
    assert_eq!(reference.var_names.values().next().unwrap(), &var);
    if let Some(key) = reference.label_key.as_deref() {
        let Column::Categorical {
            codes, categories, ..
        } = adata.obs_column(key).unwrap()
        else {
            panic!("{key} is categorical")
        };
        assert_eq!(
            (reference.labels.clone(), reference.label_categories.clone()),
            (codes, categories)
        );
    }

    // An existing embedding is not overwritten without being asked (refused before any
    // training step), and stays as it was.
    let mut steps = 0;
    let again = fit(&options(&data, &out, 1), |p| {
        steps += usize::from(matches!(p, tessera_worker::fit::Progress::Batch { .. }))
    })
    .unwrap_err();
    assert!(
        again.to_string().contains("obsm/X_tessera")
            && again.to_string().contains("already exists"),
        "{again}"
    );
    assert_eq!(steps, 0, "refused before training");
    assert_eq!(
        AnnData::open(&data).unwrap().obsm("X_tessera").unwrap().0,
        report.embedding
    );
    let mut replace = options(&data, &out, 1);
    replace.overwrite = true;
    let replaced = fit(&replace, |_| {}).unwrap();
    assert_eq!(
        AnnData::open(&data).unwrap().obsm("X_tessera").unwrap().0,
        replaced.embedding
    );
}

#[test]
fn same_seed_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let runs: Vec<Vec<f32>> = (0..2)
        .map(|i| {
            let sub = dir.path().join(format!("run{i}"));
            let data = pbmc_copy(&sub);
            fit(&options(&data, &sub.join("out"), 2), |_| {})
                .unwrap()
                .embedding
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn bad_inputs_are_named() {
    let err = FitConfig::from_toml("[model]\nn_latnt = 5\n", "run.toml").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("run.toml") && msg.contains("n_latnt"), "{msg}");
    let err = FitConfig::from_toml("[model]\nlikelihood = \"gamma\"\n", "run.toml").unwrap_err();
    assert!(err.to_string().contains("gamma"), "{err}");
    let parsed = FitConfig::from_toml(
        "[model]\nlikelihood = \"zinb\"\ndispersion = \"gene-batch\"\n[train]\nlr = 0.01\n",
        "run.toml",
    )
    .unwrap();
    assert_eq!((parsed.model.n_hidden, parsed.train.lr), (128, 0.01));

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.zarr").display().to_string();
    let err = fit(&options(&missing, dir.path(), 1), |_| {}).unwrap_err();
    assert!(
        matches!(err, FitError::Data(_)) && err.to_string().contains("nothing.zarr"),
        "{err}"
    );

    let mudata = shared_data().join("fixtures/mu013_v3.zarr");
    let mut opts = options(&mudata.display().to_string(), dir.path(), 1);
    opts.label_key = None;
    opts.modalities = vec!["rna".into(), "atac".into()];
    let err = fit(&opts, |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("mod/atac") && err.to_string().contains("rna, prot"),
        "{err}"
    );
    let pbmc = pbmc_copy(dir.path());
    let mut opts = options(&pbmc, dir.path(), 1);
    opts.modalities = vec!["prot".into()];
    let err = fit(&opts, |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("\"prot\"") && err.to_string().contains("one matrix"),
        "{err}"
    );
}

/// The recipes in bench/recipes are what README and docs/benchmarks.md tell users to pass as
/// `--config`: each must parse, validate and change something from the defaults.
#[test]
fn every_recipe_is_a_valid_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/recipes");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let config = FitConfig::from_toml(&text, &path.display().to_string()).unwrap();
        config.model.validate().unwrap();
        assert_ne!(config, FitConfig::default(), "{}", path.display());
        names.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    names.sort();
    assert_eq!(
        names,
        [
            "hard.toml",
            "missing_modality.toml",
            "multiome.toml",
            "scanvi.toml"
        ]
    );
    let multiome = std::fs::read_to_string(dir.join("multiome.toml")).unwrap();
    let model = FitConfig::from_toml(&multiome, "multiome.toml")
        .unwrap()
        .model;
    assert_eq!(
        (
            model.n_latent,
            model.jeffreys_weight,
            model.adversarial_batch_weight
        ),
        (6, 1.0, 1.0)
    );
}

/// A simulated mosaic CITE-seq + accessibility store: 3 batches, 6 cell types, protein and
/// accessibility each missing in 30% of cells.
fn mosaic_store(dir: &Path) -> String {
    let location = dir.join("mosaic.zarr").display().to_string();
    let config = tessera_data::SimConfig {
        n_cells: 1500,
        n_genes: 300,
        n_proteins: 20,
        n_peaks: 150,
        n_types: 6,
        missing: 0.3,
        seed: 4,
        ..tessera_data::SimConfig::default()
    };
    tessera_data::simulate(&location, &config, |_| {}).unwrap();
    location
}

#[test]
fn mosaic_multimodal_training_integrates_every_cell_and_imputes() {
    let dir = tempfile::tempdir().unwrap();
    let data = mosaic_store(dir.path());
    for joint in [
        tessera_models::Joint::Poe,
        tessera_models::Joint::Moe,
        tessera_models::Joint::Concat,
    ] {
        let out = dir.path().join(format!("out-{joint:?}"));
        let mut opts = options(&data, &out, 40);
        opts.batch_key = Some("batch".into());
        opts.config.model.joint = joint;
        opts.embedding_key = format!("X_{joint:?}");
        opts.denoised = Some(tessera_worker::Denoised {
            key: format!("denoised_{joint:?}"),
            library_size: 1e4,
        });
        let report = fit(&opts, |_| {}).unwrap();
        assert_eq!(
            report.modalities,
            vec![
                ("rna".to_string(), 300),
                ("prot".to_string(), 20),
                ("atac".to_string(), 150)
            ]
        );
        assert_eq!(
            report.embedding_element,
            format!("obsm/X_{joint:?}"),
            "a joint embedding goes to the MuData root"
        );
        let first = report.history[0].validation.unwrap().negative_elbo();
        let last = report
            .history
            .last()
            .unwrap()
            .validation
            .unwrap()
            .negative_elbo();
        assert!(
            last < 0.9 * first,
            "{joint:?}: validation -ELBO {first} -> {last}"
        );

        // Every cell, with or without protein/accessibility, lands among its type.
        let mu = tessera_data::MuData::open(&data).unwrap();
        let root = mu.root();
        let (x, d) = root.obsm(&format!("X_{joint:?}")).unwrap();
        assert_eq!((x.len() / d, d), (1500, 10));
        let Column::Categorical { codes, .. } = root.obs_column("cell_type").unwrap() else {
            panic!("cell_type is categorical")
        };
        let accuracy = knn_accuracy(&x, d, &codes, 15);
        assert!(
            accuracy > 0.9,
            "{joint:?}: kNN cell-type accuracy {accuracy}"
        );
        let (pi, _) = mu.modality("prot").unwrap();
        let missing: Vec<usize> = mu
            .presence(pi)
            .iter()
            .enumerate()
            .filter(|(_, p)| !**p)
            .map(|(i, _)| i)
            .collect();
        assert!(missing.len() > 300, "{} cells lack protein", missing.len());

        // Imputed protein for cells without it: every cell has a row, and it tracks the cell
        // type (cells of one type closer to their type's mean imputed profile than to others').
        let (imputed, p) = root.obsm(&format!("denoised_{joint:?}_prot")).unwrap();
        assert_eq!((imputed.len() / p, p), (1500, 20));
        assert!(imputed.iter().all(|v| v.is_finite() && *v >= 0.0));
        let types = 6;
        let mut means = vec![vec![0f64; p]; types];
        let mut counts = vec![0usize; types];
        for (i, &t) in codes.iter().enumerate() {
            if mu.presence(pi)[i] {
                counts[t as usize] += 1;
                for (m, v) in means[t as usize]
                    .iter_mut()
                    .zip(&imputed[i * p..(i + 1) * p])
                {
                    *m += (*v as f64 + 1.0).ln();
                }
            }
        }
        means
            .iter_mut()
            .zip(&counts)
            .for_each(|(m, &c)| m.iter_mut().for_each(|v| *v /= c as f64));
        let nearest_type = |row: &[f32]| {
            (0..types)
                .min_by(|&a, &b| {
                    let dist = |t: usize| {
                        means[t]
                            .iter()
                            .zip(row)
                            .map(|(m, v)| (m - (*v as f64 + 1.0).ln()).powi(2))
                            .sum::<f64>()
                    };
                    dist(a).total_cmp(&dist(b))
                })
                .unwrap()
        };
        let hits = missing
            .iter()
            .filter(|&&i| nearest_type(&imputed[i * p..(i + 1) * p]) == codes[i] as usize)
            .count();
        assert!(
            hits as f64 > 0.9 * missing.len() as f64,
            "{joint:?}: imputed protein matches the type of {hits}/{} cells",
            missing.len()
        );
    }
}

#[test]
fn mudata_fixture_trains_jointly_and_refuses_existing_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("mu.zarr").display().to_string();
    tessera_data::convert(
        &shared_data()
            .join("fixtures/mu013_v3.zarr")
            .display()
            .to_string(),
        &data,
        tessera_data::ZarrVersion::V3,
        |_| {},
    )
    .unwrap();
    let mut opts = options(&data, &dir.path().join("out"), 2);
    opts.label_key = None;
    let report = fit(&opts, |_| {}).unwrap();
    assert_eq!(
        report.modalities,
        vec![("rna".to_string(), 200), ("prot".to_string(), 12)]
    );
    let root = tessera_data::MuData::open(&data).unwrap().root();
    assert_eq!(root.obsm("X_tessera").unwrap().1, 10);
    let err = fit(&opts, |_| {}).unwrap_err();
    assert!(err.to_string().contains("obsm/X_tessera"), "{err}");
    // RNA alone holds every cell: its own obsm, as a single-modality model.
    opts.modalities = vec!["rna".into()];
    let report = fit(&opts, |_| {}).unwrap();
    assert_eq!(report.embedding_element, "mod/rna/obsm/X_tessera");
}

/// An AnnData store of `cells` x `genes` counts (every entry 1), no obs columns.
fn tiny_store(dir: &Path, name: &str, cells: usize, genes: usize) -> String {
    let location = dir.join(name).display().to_string();
    let writer =
        tessera_data::StoreWriter::create(&location, tessera_data::ZarrVersion::V3).unwrap();
    let obs: Vec<String> = (0..cells).map(|i| format!("c{i}")).collect();
    let var: Vec<String> = (0..genes).map(|j| format!("g{j}")).collect();
    writer.anndata("", &obs, &[], &var).unwrap();
    let mut x = writer.csr("X", genes as u64).unwrap();
    x.push(&tessera_data::Csr {
        n_rows: cells,
        n_cols: genes,
        indptr: (0..=cells as u64).map(|i| i * genes as u64).collect(),
        indices: (0..cells).flat_map(|_| 0..genes as u32).collect(),
        data: vec![1.0; cells * genes],
    })
    .unwrap();
    x.finish().unwrap();
    writer.consolidate().unwrap();
    location
}

#[test]
fn zero_genes_and_a_single_cell_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let no_genes = tiny_store(dir.path(), "no_genes.zarr", 20, 0);
    let mut opts = options(&no_genes, dir.path(), 1);
    opts.label_key = None;
    let err = fit(&opts, |_| {}).unwrap_err();
    assert!(
        matches!(err, FitError::Input { .. }) && err.to_string().contains("0 features"),
        "{err}"
    );
    let one_cell = tiny_store(dir.path(), "one_cell.zarr", 1, 5);
    let mut opts = options(&one_cell, dir.path(), 1);
    opts.label_key = None;
    let err = fit(&opts, |_| {}).unwrap_err();
    assert!(
        matches!(err, FitError::Input { .. }) && err.to_string().contains("1 training cell"),
        "{err}"
    );
    // Without BatchNorm one cell trains.
    opts.config.model.batch_norm = false;
    opts.out = dir.path().join("one");
    fit(&opts, |_| {}).unwrap();
}

#[test]
fn a_run_that_fails_writing_its_outputs_leaves_the_store_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_store(dir.path(), "s.zarr", 64, 8);
    let out = dir.path().join("out");
    // A directory where the loss plot goes: the run fails at its outputs.
    std::fs::create_dir_all(out.join("loss.png")).unwrap();
    let mut opts = options(&data, &out, 1);
    opts.label_key = None;
    let err = fit(&opts, |_| {}).unwrap_err();
    assert!(err.to_string().contains("loss.png"), "{err}");
    let adata = tessera_data::AnnData::open(&data).unwrap();
    assert!(
        !adata.has_element("obsm/X_tessera").unwrap(),
        "the embedding was published by a failing run"
    );
}
