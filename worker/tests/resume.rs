//! Checkpoint and resume: a run stopped after 3 epochs and resumed to 6 is bit for bit the run
//! that went 6 epochs straight (weights, Adam moments, schedule, early stopping, validation set,
//! loader order, dropout streams); so is one stopped on request in the middle of an epoch;
//! checkpoints of another run or cut short are refused.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use tessera_data::SimConfig;
use tessera_kernels::backend::Cpu;
use tessera_worker::checkpoint;
use tessera_worker::parallel::{Alone, EpochHooks, Placement};
use tessera_worker::ring::Ring;
use tessera_worker::{FitConfig, FitError, FitOptions, fit, train};

fn simulated(dir: &Path, name: &str) -> String {
    let location = dir.join(name).display().to_string();
    let config = SimConfig {
        n_cells: 600,
        n_genes: 80,
        n_types: 4,
        n_batches: 2,
        ..SimConfig::default()
    };
    tessera_data::simulate(&location, &config, |_| {}).unwrap();
    location
}

fn options(data: &str, out: &Path, epochs: usize, resume: bool) -> FitOptions {
    let mut config = FitConfig::default();
    config.model.n_hidden = 16;
    config.train.max_epochs = Some(epochs);
    config.train.kl_warmup_epochs = 4;
    config.train.batch_size = 64;
    config.train.checkpoint_every = Some(2);
    // Exercise the schedule's state: any epoch without improvement cuts the rate.
    config.train.reduce_lr_on_plateau = true;
    config.train.lr_patience = 0;
    config.train.lr = 5e-2;
    FitOptions {
        data: data.into(),
        modalities: Vec::new(),
        batch_key: Some("batch".into()),
        label_key: None,
        unlabeled_category: None,
        covariates: Default::default(),
        config,
        out: out.to_path_buf(),
        embedding_key: "X_tessera".into(),
        prediction_key: tessera_worker::fit::PREDICTION_KEY.into(),
        overwrite: resume,
        store_outputs: true,
        resume,
        denoised: None,
        cache_bytes: tessera_worker::DEFAULT_CACHE_MIB << 20,
        device: Default::default(),
        init_from: None,
        layer: None,
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        simulated(dir.path(), "a.zarr"),
        simulated(dir.path(), "b.zarr"),
    );
    let straight = fit(&options(&a, &dir.path().join("out-a"), 6, false), |_| {}).unwrap();
    let out_b = dir.path().join("out-b");
    let first = fit(&options(&b, &out_b, 3, false), |_| {}).unwrap();
    assert_eq!(first.history.len(), 3);
    let resumed = fit(&options(&b, &out_b, 6, true), |_| {}).unwrap();

    assert_eq!(
        resumed.history.len(),
        6,
        "history continues from the checkpoint"
    );
    for (s, r) in straight.history.iter().zip(&resumed.history) {
        assert_eq!(
            (s.epoch, s.kl_weight, s.lr, s.train, s.validation),
            (r.epoch, r.kl_weight, r.lr, r.train, r.validation)
        );
    }
    assert!(
        straight.history.iter().any(|r| r.lr < 5e-2),
        "the schedule cut the rate at least once: {:?}",
        straight.history.iter().map(|r| r.lr).collect::<Vec<_>>()
    );
    assert_eq!(straight.n_validation, resumed.n_validation);
    assert_eq!(straight.n_train, resumed.n_train);
    assert!(
        straight
            .embedding
            .iter()
            .zip(&resumed.embedding)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "embeddings differ"
    );
    let csv = std::fs::read_to_string(out_b.join("history.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    // The loss curves as a PNG (signature, then IHDR width and height).
    let png = std::fs::read(out_b.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(
        (
            u32::from_be_bytes(png[16..20].try_into().unwrap()),
            u32::from_be_bytes(png[20..24].try_into().unwrap())
        ),
        (900, 540)
    );
}

/// Asks to stop before global step `at` (as SIGTERM does in `tessera train`).
struct StopAt {
    at: u64,
    done: u64,
}

impl EpochHooks for StopAt {
    fn stop_requested(&self) -> bool {
        self.done + 1 >= self.at
    }
    fn step_done(&mut self, _epoch: usize, step: u64, _cells: u64) {
        self.done = step;
    }
}

/// One process with two parts per step, so the stop request also rides in the reduction.
fn two_parts(
    hooks: Box<dyn EpochHooks + Send>,
    resume_from: Option<std::path::PathBuf>,
) -> Placement<Cpu> {
    Placement {
        device: Cpu,
        comm: Box::new(Ring::single()),
        parts: 2,
        hooks,
        checkpoint_per_epoch: false,
        resume_from,
    }
}

#[test]
fn run_stopped_within_an_epoch_resumes_to_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        simulated(dir.path(), "a.zarr"),
        simulated(dir.path(), "b.zarr"),
    );
    let (out_a, out_b) = (dir.path().join("out-a"), dir.path().join("out-b"));
    let straight = train(
        &options(&a, &out_a, 5, false),
        &mut two_parts(Box::new(Alone), None),
        |_| {},
    )
    .unwrap()
    .unwrap();
    let err = train(
        &options(&b, &out_b, 5, false),
        &mut two_parts(Box::new(StopAt { at: 20, done: 0 }), None),
        |_| {},
    )
    .unwrap_err();
    let checkpoint = out_b.join("checkpoint");
    match &err {
        FitError::Stopped {
            step,
            checkpoint: at,
            here,
            ..
        } => assert_eq!(
            (*step, at.as_str(), *here),
            (20, checkpoint.to_str().unwrap(), true)
        ),
        other => panic!("expected a stop, got {other}"),
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("state.json")).unwrap())
            .unwrap();
    let (epochs_done, within) = (
        state["epochs_done"].as_u64().unwrap(),
        state["within_epoch"]["steps"].as_u64().unwrap(),
    );
    assert!(
        epochs_done >= 1 && within >= 1 && state["step"] == 20,
        "stopped inside an epoch after a whole one: {state}"
    );
    assert!(
        !out_b.join("history.csv").exists(),
        "a stopped run writes no outputs"
    );

    // A restarted rank 0 looks for its job's furthest checkpoint among per-epoch folders: an
    // earlier one, this one, and one cut short (no state.json) that must be passed over.
    let job = dir.path().join("job-checkpoints");
    assert_eq!(
        checkpoint::latest(&job).unwrap(),
        None,
        "no folder: nothing to resume"
    );
    let (earlier, stopped, torn) = (
        job.join("epoch-000001"),
        job.join(format!("epoch-{epochs_done:06}-step-20")),
        job.join("epoch-000009"),
    );
    for to in [&earlier, &stopped, &torn] {
        std::fs::create_dir_all(to).unwrap();
        std::fs::copy(checkpoint.join("state.json"), to.join("state.json")).unwrap();
    }
    let mut older = state.clone();
    older["step"] = serde_json::json!(7);
    std::fs::write(earlier.join("state.json"), older.to_string()).unwrap();
    std::fs::remove_file(torn.join("state.json")).unwrap();
    let found = checkpoint::latest(&job).unwrap().unwrap();
    assert_eq!(
        (found.location, found.epochs_done as u64, found.step),
        (stopped, epochs_done, 20)
    );

    let resumed = train(
        &options(&b, &out_b, 5, true),
        &mut two_parts(Box::new(Alone), Some(checkpoint)),
        |_| {},
    )
    .unwrap()
    .unwrap();
    assert_eq!(resumed.history.len(), 5);
    for (s, r) in straight.history.iter().zip(&resumed.history) {
        // The stopped epoch's train loss adds the checkpointed sums to the rest of the epoch.
        assert_eq!(
            (s.epoch, s.kl_weight, s.lr, s.train, s.validation),
            (r.epoch, r.kl_weight, r.lr, r.train, r.validation)
        );
    }
    assert_eq!(straight.n_train, resumed.n_train);
    assert!(
        straight
            .embedding
            .iter()
            .zip(&resumed.embedding)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "embeddings differ"
    );
}

#[test]
fn foreign_missing_and_cut_short_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path(), "c.zarr");
    let out = dir.path().join("out");
    let err = fit(&options(&data, &out, 2, true), |_| {}).unwrap_err();
    assert!(
        matches!(err, FitError::Checkpoint { .. }) && err.to_string().contains("nothing to resume"),
        "{err}"
    );

    fit(&options(&data, &out, 2, false), |_| {}).unwrap();
    let mut other = options(&data, &out, 4, true);
    other.config.model.n_hidden = 32;
    let err = fit(&other, |_| {}).unwrap_err().to_string();
    assert!(err.contains("model.n_hidden differs"), "{err}");

    // state.json says a later step than the weights hold: a checkpoint cut short.
    let state_path = out.join("checkpoint/state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["step"] = serde_json::json!(state["step"].as_u64().unwrap() + 10);
    std::fs::write(&state_path, state.to_string()).unwrap();
    let err = fit(&options(&data, &out, 4, true), |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("cut short"),
        "{err}"
    );
}

/// More concurrent fits than pool threads: each fit's decoding and compute share the global
/// pool, and no pool thread may block on a loader (that deadlocked once). A watchdog bounds the
/// test instead of letting a regression hang CI.
#[test]
fn concurrent_fits_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let n = rayon::current_num_threads() + 2;
    for i in 0..n {
        let data = simulated(dir.path(), &format!("p{i}.zarr"));
        let out = dir.path().join(format!("out{i}"));
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let result = fit(&options(&data, &out, 2, false), |_| {}).map(|r| r.history.len());
            done.send(result.map_err(|e| e.to_string())).unwrap();
        });
    }
    for _ in 0..n {
        let result = done_rx
            .recv_timeout(std::time::Duration::from_secs(300))
            .expect("a fit did not finish in 5 minutes: deadlock?");
        assert_eq!(result.unwrap(), 2);
    }
}

/// `layers/tessera_denoised`: the decoder's expression per cell, scaled to the library size,
/// following the counts (its mean profile tracks the mean normalised counts), and refused
/// before training when the key exists.
#[test]
fn denoised_layer_follows_the_counts() {
    let dir = tempfile::tempdir().unwrap();
    let data = simulated(dir.path(), "d.zarr");
    let mut opts = options(&data, &dir.path().join("out"), 15, false);
    opts.config.train.reduce_lr_on_plateau = false;
    opts.config.train.lr = 1e-2;
    opts.denoised = Some(tessera_worker::Denoised {
        key: "tessera_denoised".into(),
        library_size: 1e4,
    });
    fit(&opts, |_| {}).unwrap();

    let adata = tessera_data::AnnData::open(&data).unwrap();
    let store = &adata.store;
    let (n, g) = (adata.n_obs() as usize, adata.n_vars() as usize);
    let denoised = adata
        .layer("tessera_denoised")
        .unwrap()
        .read_rows(store, 0..n as u64)
        .unwrap();
    let counts = adata.x().unwrap().read_rows(store, 0..n as u64).unwrap();
    let (mut mean_denoised, mut mean_counts) = (vec![0f64; g], vec![0f64; g]);
    for i in 0..n {
        let (idx, values) = denoised.row(i);
        assert_eq!(idx.len(), g, "dense: every gene of cell {i}");
        let total: f64 = values.iter().map(|&v| f64::from(v)).sum();
        assert!(
            (total - 1e4).abs() < 1.0 && values.iter().all(|&v| v > 0.0),
            "cell {i} sums to {total}"
        );
        let (cidx, cvals) = counts.row(i);
        let library: f64 = cvals.iter().map(|&v| f64::from(v)).sum();
        for (&j, &v) in cidx.iter().zip(cvals) {
            mean_counts[j as usize] += f64::from(v) / library * 1e4 / n as f64;
        }
        for (j, &v) in values.iter().enumerate() {
            mean_denoised[j] += f64::from(v) / n as f64;
        }
    }
    let corr = {
        let (ma, mb) = (
            mean_denoised.iter().sum::<f64>() / g as f64,
            mean_counts.iter().sum::<f64>() / g as f64,
        );
        let cov: f64 = mean_denoised
            .iter()
            .zip(&mean_counts)
            .map(|(a, b)| (a - ma) * (b - mb))
            .sum();
        let va: f64 = mean_denoised.iter().map(|a| (a - ma).powi(2)).sum();
        let vb: f64 = mean_counts.iter().map(|b| (b - mb).powi(2)).sum();
        cov / (va * vb).sqrt()
    };
    assert!(
        corr > 0.95,
        "mean denoised vs mean normalised counts: r = {corr}"
    );

    let mut again = opts.clone();
    again.embedding_key = "X_other".into();
    let err = fit(&again, |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("layers/tessera_denoised") && err.contains("already exists"),
        "{err}"
    );
}

#[test]
fn a_save_cut_short_leaves_a_whole_checkpoint_to_resume_from() {
    let dir = tempfile::tempdir().unwrap();
    let (data, twin) = (
        simulated(dir.path(), "k.zarr"),
        simulated(dir.path(), "k2.zarr"),
    );
    let out = dir.path().join("out");
    let straight = fit(
        &options(&twin, &dir.path().join("straight"), 4, false),
        |_| {},
    )
    .unwrap();
    fit(&options(&data, &out, 2, false), |_| {}).unwrap();
    let (checkpoint, partial, previous) = (
        out.join("checkpoint"),
        out.join("checkpoint.partial"),
        out.join("checkpoint.previous"),
    );
    assert!(checkpoint.join("state.json").exists() && !partial.exists() && !previous.exists());
    // Cut short after the old checkpoint was moved aside and before the new one took its place,
    // with the new one's weights written but not its state: the old one is the whole one.
    std::fs::rename(&checkpoint, &previous).unwrap();
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::copy(
        previous.join("model.safetensors"),
        partial.join("model.safetensors"),
    )
    .unwrap();
    let report = fit(&options(&data, &out, 4, true), |_| {}).unwrap();
    assert_eq!(
        report.history.len(),
        4,
        "resumed after epoch 2, not from the start"
    );
    for (s, r) in straight.history.iter().zip(&report.history) {
        assert_eq!(
            (s.epoch, s.train, s.validation),
            (r.epoch, r.train, r.validation)
        );
    }
    assert!(checkpoint.join("state.json").exists() && !partial.exists() && !previous.exists());
}
