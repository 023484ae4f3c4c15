//! `tessera train --device cuda` end to end on the CPU, under the emulated CUDA driver of
//! `kernels/emu` (`bash kernels/emu/build.sh`; the folder it built named by
//! `TESSERA_CUDA_EMULATOR`, NVRTC on LD_LIBRARY_PATH as `.ci/run` sets it): the integration
//! layer's CUDA path — library discovery, the resident training set and its device gather, the
//! staged copies, the step's single read-back, every kernel launch — trains the losses the CPU
//! trains, and two GPU workers reduce through NCCL (the emulated library) to one process's
//! losses. Our kernels run compiled by g++ with a block's threads as fibers: this checks logic
//! and launches, not a GPU. Without the variable: SKIPPED (`TESSERA_REQUIRE_DEVICE=1`: a failure).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::ok;

/// `TESSERA_CUDA_LIBS` naming the emulator's folder and NVRTC's, or None after saying SKIPPED.
fn emulator_or_skip() -> Option<String> {
    let emulator = std::env::var_os("TESSERA_CUDA_EMULATOR").map(PathBuf::from);
    let nvrtc = std::env::var("LD_LIBRARY_PATH").ok().and_then(|path| {
        path.split(':')
            .map(PathBuf::from)
            .find(|d| d.join("libnvrtc.so.12").is_file() || d.join("libnvrtc.so.13").is_file())
    });
    match (emulator, nvrtc) {
        (Some(e), Some(n)) if e.join("libcuda.so").is_file() => {
            Some(format!("{}:{}", e.display(), n.display()))
        }
        _ => {
            let why = "TESSERA_CUDA_EMULATOR names no folder kernels/emu/build.sh built, or \
                       NVRTC is not on LD_LIBRARY_PATH: nothing trains on the emulated driver";
            tessera_kernels::testing::skip("TESSERA_REQUIRE_DEVICE", why);
            None
        }
    }
}

/// Trains `store` for 2 epochs on `device` with `train` (the TOML section's lines) and `extra`
/// arguments; the log and the epochs' training losses.
fn train(
    store: &Path,
    out: &Path,
    device: (&str, &str),
    train: &str,
    extra: &[&str],
) -> (String, Vec<f64>) {
    train_with(store, out, device, (train, extra), &[])
}

/// [`train`] with `env` set for the process (the emulator's switches).
fn train_with(
    store: &Path,
    out: &Path,
    (device, libs): (&str, &str),
    (train, extra): (&str, &[&str]),
    env: &[(&str, &str)],
) -> (String, Vec<f64>) {
    let config = out.with_extension("toml");
    std::fs::write(&config, format!("[train]\n{train}\n")).unwrap();
    // The emulated driver's count of what each stream queued between synchronisations.
    let stats = out.join("emu-stats");
    std::fs::create_dir_all(&stats).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "--data"])
        .arg(store)
        .args(["--epochs", "2", "--overwrite", "--device", device, "--out"])
        .arg(out)
        .arg("--config")
        .arg(&config)
        .args(extra)
        .env_remove("LD_LIBRARY_PATH")
        // Two emulated devices, one for each worker where there are two.
        .env("TESSERA_EMU_DEVICES", "2")
        .env("TESSERA_EMU_STATS", &stats)
        .env("TESSERA_CUDA_LIBS", libs)
        .env("TESSERA_LOG", "info")
        .env("RUST_BACKTRACE", "0")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    ok(&output);
    let history = std::fs::read_to_string(out.join("history.csv")).unwrap();
    let mut lines = history.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = header.iter().position(|h| *h == "train_loss").unwrap();
    let losses = lines
        .map(|l| l.split(',').nth(column).unwrap().parse().unwrap())
        .collect();
    (String::from_utf8_lossy(&output.stderr).into_owned(), losses)
}

/// |a - b| <= 1e-5 |b| epoch by epoch: the same arithmetic up to f32 summation order in a few
/// reductions.
fn assert_same_losses(what: &str, a: &[f64], b: &[f64]) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (epoch, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs(),
            "{what}, epoch {epoch}: {x} vs {y}"
        );
    }
}

type Work = serde_json::Map<String, serde_json::Value>;

/// The reports of every process that `train` ran (`emu-stats` under `out`).
fn reports(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_dir(out.join("emu-stats"))
        .unwrap()
        .map(|file| {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            serde_json::from_str(&text).unwrap()
        })
        .collect()
}

/// A report's intervals between host synchronisations, as (times seen, work queued).
fn intervals_of(report: &serde_json::Value) -> impl Iterator<Item = (u64, Work)> + '_ {
    report["intervals"].as_array().unwrap().iter().map(|i| {
        let work = i["work"].as_object().unwrap().clone();
        (i["count"].as_u64().unwrap(), work)
    })
}

/// Every interval that the processes under `out` counted.
fn intervals(out: &Path) -> Vec<(u64, Work)> {
    reports(out).iter().flat_map(intervals_of).collect()
}

/// How often each process looked a kernel up in the driver, and how many distinct kernels it
/// launched, summed over the processes under `out`.
fn lookups_and_kernels(out: &Path) -> (u64, usize) {
    let (mut lookups, mut kernels) = (0, 0);
    for report in reports(out) {
        lookups += report["totals"]["function lookup"].as_u64().unwrap_or(0);
        let launched: std::collections::BTreeSet<String> = intervals_of(&report)
            .flat_map(|(_, work)| work.into_iter().map(|(k, _)| k))
            .filter(|k| k.starts_with("launch "))
            .collect();
        kernels += launched.len();
    }
    (lookups, kernels)
}

/// Every training step waits for the device once, for its loss terms and whether its gradients
/// are finite in one transfer (not once per term, and no gradient norm: nothing is clipped),
/// into page-locked memory after the next step was queued: the device runs that step while the
/// host reads (all but an epoch's last step and the first ones). Its GEMMs went to cuBLAS, its
/// activations and gradients are allocated without a memset each and, after the first steps,
/// not allocated at all (kept for reuse), and its kernels were looked up in the driver once, not
/// at every launch.
fn assert_one_read_back_per_step(what: &str, out: &Path) {
    let all = intervals(out);
    let (lookups, kernels) = lookups_and_kernels(out);
    assert!(
        kernels > 0 && lookups as usize <= kernels,
        "{what}: {lookups} lookups of {kernels} kernels"
    );
    let norms = all
        .iter()
        .filter(|(_, work)| work.contains_key("launch chunk_sum_squares"));
    assert_eq!(norms.count(), 0, "{what}: {all:?}");
    let steps: Vec<&(u64, Work)> = all
        .iter()
        .filter(|(_, work)| work.contains_key("launch sparse_input_backward"))
        .collect();
    let seen: u64 = steps.iter().map(|(n, _)| n).sum();
    assert!(seen >= 10, "{what}: {seen} steps counted: {steps:?}");
    assert_buffers_reused(what, &steps);
    let mut overlapped = 0;
    for (n, work) in &steps {
        let count = |k: &str| work.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        // The step's forwards (one per modality) are in the backward's interval: nothing read
        // in between.
        assert_eq!(
            count("launch sparse_input_forward"),
            count("launch sparse_input_backward"),
            "{what}: {work:?}"
        );
        assert_eq!(count("download"), 1, "{what}: {work:?}");
        assert_eq!(count("download to pageable memory"), 0, "{what}: {work:?}");
        assert_eq!(count("blocking download"), 0, "{what}: {work:?}");
        assert_eq!(count("launch flag_non_finite"), 1, "{what}: {work:?}");
        assert!(count("gemm") >= 6, "{what}: {work:?}");
        let launches: u64 = work
            .iter()
            .filter(|(k, _)| k.starts_with("launch "))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum();
        // Zeroing each activation and gradient made more memsets than launches and GEMMs.
        assert!(
            2 * count("memset") <= launches + count("gemm"),
            "{what}: {work:?}"
        );
        // The next step's launches (and this one's update) were queued when the host waited.
        if count("queued behind the wait (launches)") + 1 >= launches {
            overlapped += n;
        }
    }
    assert!(
        3 * overlapped >= 2 * seen,
        "{what}: {overlapped} of {seen} steps read with the next step queued: {steps:?}"
    );
}

/// How many times the intervals of `steps` that hold `key` were seen.
fn seen_with(steps: &[&(u64, Work)], key: &str) -> u64 {
    steps
        .iter()
        .filter(|(_, work)| work.contains_key(key))
        .map(|(n, _)| n)
        .sum()
}

/// Buffers are reused, not allocated and freed (~70 of each per step before the cache): only a
/// step of a batch shape not seen before, or with more non-zeros than any before (beyond an
/// eighth), asks the driver for memory; none gives any back.
fn assert_buffers_reused(what: &str, steps: &[&(u64, Work)]) {
    let seen: u64 = steps.iter().map(|(n, _)| n).sum();
    let allocating = seen_with(steps, "alloc");
    assert!(
        3 * allocating <= seen,
        "{what}: {allocating} of {seen} steps allocate: {steps:?}"
    );
    assert!(
        steps.iter().all(|(_, work)| !work.contains_key("free")),
        "{what}: {steps:?}"
    );
}

/// A steady step copies nothing from pageable host memory: its covariates and, with the data
/// resident, its rows and their offsets are staged on the copy stream from page-locked memory,
/// its weights filled on the device (`Backend::upload_weights`). (A stream capture of the step
/// would refuse such a copy.)
fn assert_no_pageable_uploads(what: &str, out: &Path) {
    for (_, work) in intervals(out)
        .iter()
        .filter(|(_, work)| work.contains_key("launch sparse_input_backward"))
        .filter(|(_, work)| !work.contains_key("alloc"))
    {
        let uploads = work
            .get("upload from pageable memory")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        assert_eq!(uploads, 0, "{what}: {work:?}");
    }
}

/// `bench step` on the emulated device times the step replayed from a CUDA graph too (the
/// capture and replays run; the emulator's timings mean nothing): scVI's, and scANVI's with its
/// labels in fixed buffers, and with an adversarial batch classifier (its batch codes made on
/// the device); a step that takes host values per batch (the batch MMD's groups) is said not to
/// replay, and the bench still ends well.
#[test]
fn bench_step_on_the_emulated_device_replays_the_captured_step() {
    let Some(libs) = emulator_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let models = [
        ("scvi", "", "replayed cells/s"),
        ("scanvi", "classifier_weight = 50.0", "replayed cells/s"),
        (
            "adversarial",
            "adversarial_batch_weight = 1.0",
            "replayed cells/s",
        ),
        ("batch mmd", "mmd_batch_weight = 1.0", "not replayed"),
    ];
    for (what, model, expected) in models {
        let config = dir.path().join(format!("{what}.toml"));
        std::fs::write(&config, format!("[model]\n{model}\n")).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args([
                "bench", "step", "--device", "cuda", "--genes", "200", "--batch", "32",
            ])
            .args(["--hidden", "16", "--nnz", "20", "--steps", "5", "--config"])
            .arg(&config)
            .env_remove("LD_LIBRARY_PATH")
            .env("TESSERA_CUDA_LIBS", &libs)
            .output()
            .unwrap();
        ok(&output);
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(said.contains(expected), "{what}: {said}");
    }
}

/// A simulated store in `dir` (1,200 cells, 300 genes and what `modalities` adds) and
/// `copies - 1` copies of it (training writes into its store).
fn stores(dir: &Path, copies: usize, modalities: &[&str]) -> Vec<PathBuf> {
    let first = dir.join("s0.zarr");
    let path = first.to_str().unwrap();
    let mut args = vec!["simulate", path, "--cells", "1200", "--genes", "300"];
    args.extend(modalities);
    ok(&common::tessera(&args));
    let mut all = vec![first.clone()];
    for i in 1..copies {
        let copy = dir.join(format!("s{i}.zarr"));
        common::copy_dir(&first, &copy);
        all.push(copy);
    }
    all
}

/// The checkpoint's Adam moments.
const OPTIMIZER: &str = "checkpoint/optimizer.safetensors";

/// Each of `files` in `out` byte for byte the one in `eager_out` (the op-by-op run's).
fn assert_same_files(what: &str, out: &Path, eager_out: &Path, files: &[&str]) {
    for file in files {
        assert!(
            std::fs::read(out.join(file)).unwrap() == std::fs::read(eager_out.join(file)).unwrap(),
            "{what}: {file} differs from the eager run's"
        );
    }
}

#[test]
fn training_on_the_emulated_device_gives_the_cpus_losses_resident_and_streamed() {
    let Some(libs) = emulator_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = &stores(dir.path(), 1, &[])[0];
    let never = "resident_data = \"never\"";
    let (_, cpu) = train(store, &dir.path().join("cpu"), ("cpu", &libs), never, &[]);
    assert_eq!(cpu.len(), 2);
    for (resident, where_) in [("auto", "kept on cuda:0"), ("never", "streamed")] {
        let what = format!("resident_data = {resident}");
        let setting = format!("resident_data = \"{resident}\"");
        // Op by op, every step's ops counted.
        let eager_out = dir.path().join(format!("cuda-{resident}-eager"));
        let eager_setting = format!("{setting}\ncuda_graphs = false");
        let (log, eager) = train(store, &eager_out, ("cuda", &libs), &eager_setting, &[]);
        assert!(log.contains("tessera CUDA emulator"), "{log}");
        assert!(log.contains(where_), "{what}: {log}");
        assert_same_losses(&what, &eager, &cpu);
        assert_one_read_back_per_step(&what, &eager_out);
        assert_no_pageable_uploads(&what, &eager_out);
        assert_like_steps_compared(&what, &eager_out);
        // Replayed from CUDA graphs (the default): the same bits.
        let out = dir.path().join(format!("cuda-{resident}"));
        let (_, replayed) = train(store, &out, ("cuda", &libs), &setting, &[]);
        assert_eq!(replayed, eager, "{what}: the replayed steps' losses");
        assert_same_files(&what, &out, &eager_out, &["model.safetensors", OPTIMIZER]);
        assert_steps_replayed(&what, &out);
    }
}

/// totalVI's and MultiVI's kinds of model (RNA with a gene-batch dispersion, the proteins' NB
/// mixture, Bernoulli peaks; a product of experts with the Jeffreys divergence between them, a
/// mixture of experts, whose decoders read the batch once per expert (and whose adversarial
/// batch classifier reads each sample's batch code, made on the device), and concatenated experts
/// under an MMD prior, whose weight follows the KL warm-up) replay their steps: the
/// batch one-hot, dense counts, tiled rows and row selections are made on the device, so a
/// capture copies nothing from the host; bit for bit the eager run, which gives the CPU's
/// losses.
#[test]
fn multimodal_models_replay_their_steps_as_the_eager_run_computes_them() {
    let Some(libs) = emulator_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = &stores(dir.path(), 1, &["--proteins", "20", "--peaks", "100"])[0];
    let models = [
        (
            "poe",
            "joint = \"poe\"\njeffreys_weight = 1.0\ndispersion = \"gene-batch\"",
        ),
        ("moe", "joint = \"moe\"\nadversarial_batch_weight = 1.0"),
        ("mmd prior", "joint = \"concat\"\nprior = \"mmd\""),
    ];
    for (what, model) in models {
        let settings = |graphs: bool| format!("cuda_graphs = {graphs}\n[model]\n{model}");
        let cpu_out = dir.path().join(format!("{what}-cpu"));
        let (_, cpu) = train(store, &cpu_out, ("cpu", &libs), &settings(true), &[]);
        let eager = assert_replayed_as_eager(what, (store, dir.path()), &libs, settings, &[]);
        assert_same_losses(what, &eager, &cpu);
    }
}

/// Trains `store` on the emulated device op by op and replayed from CUDA graphs
/// (`settings(cuda_graphs)`, `extra` arguments), into `dir`'s `<what>-eager` and
/// `<what>-replayed`: no capture fails, and the replayed run replays its steps with the eager
/// run's losses, model and Adam moments bit for bit. The eager run's losses.
fn assert_replayed_as_eager(
    what: &str,
    (store, dir): (&Path, &Path),
    libs: &str,
    settings: impl Fn(bool) -> String,
    extra: &[&str],
) -> Vec<f64> {
    let at = |run: &str| dir.join(format!("{what}-{run}"));
    let (_, eager) = train(store, &at("eager"), ("cuda", libs), &settings(false), extra);
    let out = at("replayed");
    let (log, replayed) = train(store, &out, ("cuda", libs), &settings(true), extra);
    assert!(!log.contains("op by op from now on"), "{what}: {log}");
    assert_eq!(replayed, eager, "{what}: the replayed steps' losses");
    let files = ["model.safetensors", OPTIMIZER];
    assert_same_files(what, &out, &at("eager"), &files);
    assert_steps_replayed(what, &out);
    eager
}

/// A capture the driver refuses (the emulator ends every one invalidated) leaves training op
/// by op from then on, said once, with the bits of a run that never captured.
#[test]
fn a_failed_capture_leaves_training_op_by_op_with_the_same_bits() {
    let Some(libs) = emulator_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = &stores(dir.path(), 1, &[])[0];
    let eager_out = dir.path().join("eager");
    let device = ("cuda", libs.as_str());
    let (_, eager) = train(store, &eager_out, device, "cuda_graphs = false", &[]);
    let out = dir.path().join("refused");
    let refused = [("TESSERA_EMU_CAPTURE_FAILS", "1")];
    let (log, losses) = train_with(store, &out, device, ("", &[]), &refused);
    assert_eq!(
        log.matches("op by op from now on: capturing one as a CUDA graph failed")
            .count(),
        1,
        "{log}"
    );
    assert_eq!(losses, eager, "the losses after a failed capture");
    let files = ["model.safetensors", OPTIMIZER];
    assert_same_files("failed capture", &out, &eager_out, &files);
    let replays = intervals(&out);
    assert!(
        replays
            .iter()
            .all(|(_, work)| !work.contains_key("graph launch")),
        "{replays:?}"
    );
}

/// Most steps were replayed from a CUDA graph: the host queued the graph's launch, the batch's
/// copies into its fixed buffers, the draws' step and KL weight, the gradient flag and the
/// update, not the step's ~80 ops; nothing copied from pageable memory; one read back; nothing
/// allocated but in the first replay (what its capture took from the cache, asked for once).
fn assert_steps_replayed(what: &str, out: &Path) {
    let all = intervals(out);
    let step = |work: &Work| {
        work.contains_key("graph launch") || work.contains_key("launch sparse_input_backward")
    };
    let seen: u64 = all.iter().filter(|(_, w)| step(w)).map(|(n, _)| n).sum();
    let replays: Vec<&(u64, Work)> = all
        .iter()
        .filter(|(_, work)| work.contains_key("graph launch"))
        .collect();
    let replayed: u64 = replays.iter().map(|(n, _)| n).sum();
    // Per shape, two eager steps, then replays across the epochs, although the KL weight
    // changes at each (a warm-up): only the first two full batches and each epoch's last,
    // shorter one (its third is in a third epoch) run op by op.
    assert!(
        seen >= 16 && replayed + 4 >= seen,
        "{what}: {replayed} of {seen} steps replayed: {all:?}"
    );
    let allocating = seen_with(&replays, "alloc");
    assert!(
        allocating <= 1,
        "{what}: {allocating} replays allocate: {all:?}"
    );
    // An epoch's last step's update is queued after its read, with the validation.
    let updated = seen_with(&replays, "launch adamw_step");
    assert!(
        updated + 2 >= replayed,
        "{what}: {updated} of {replayed} replays queue their update: {all:?}"
    );
    for (_, work) in replays {
        let count = |k: &str| work.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let launches: u64 = work
            .iter()
            .filter(|(k, _)| k.starts_with("launch "))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum();
        assert_eq!(count("graph launch"), 1, "{what}: {work:?}");
        assert_eq!(count("download"), 1, "{what}: {work:?}");
        assert!(count("launch adamw_step") <= 1, "{what}: {work:?}");
        assert!(launches <= 3 && count("gemm") == 0, "{what}: {work:?}");
        for absent in ["free", "upload from pageable memory", "blocking download"] {
            assert_eq!(count(absent), 0, "{what}: {absent} in {work:?}");
        }
    }
}

/// The report compares each step with the one before it op by op (what a CUDA graph of the
/// step, which replays the arguments it was captured with, would need held fixed): most steps
/// are compared, an op is counted as changed at most once per comparison and occurrence, and
/// the optimiser's arguments change at every step (its bias corrections are kernel arguments).
fn assert_like_steps_compared(what: &str, out: &Path) {
    let (mut seen, mut compared) = (0, 0);
    for report in reports(out) {
        for interval in report["intervals"].as_array().unwrap() {
            let work = interval["work"].as_object().unwrap();
            if !work.contains_key("launch sparse_input_backward") {
                continue;
            }
            let n = interval["compared"].as_u64().unwrap();
            seen += interval["count"].as_u64().unwrap();
            compared += n;
            let changed = interval["changed"].as_object().unwrap();
            for (op, times) in changed {
                let queued = work.get(op).and_then(serde_json::Value::as_u64);
                assert!(
                    queued.is_some_and(|q| times.as_u64().unwrap() <= q * n),
                    "{what}: {op} changed {times} times: {interval}"
                );
            }
            let adam = changed
                .get("launch adamw_step")
                .and_then(serde_json::Value::as_u64);
            assert_eq!(adam.unwrap_or(0), n, "{what}: {interval}");
        }
    }
    assert!(
        2 * compared >= seen,
        "{what}: {compared} of {seen} steps compared"
    );
}

/// Trains a store of `modalities` with `model` (the `[model]` table's lines) and `extra`
/// arguments on the CPU and on the emulated device: the same losses, `column` of the history
/// positive at every epoch, and one read-back per step with each of `kernels` launched in it
/// (a loss read on its own would end an interval before the backward).
fn check_loss_read_with_the_step(
    what: &str,
    (modalities, model, extra): (&[&str], &str, &[&str]),
    column: &str,
    kernels: &[&str],
) {
    let Some(libs) = emulator_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = &stores(dir.path(), 1, modalities)[0];
    // The helper's TOML is its [train] section; the [model] table follows it. Op by op: the
    // counts below are of the steps' own ops (replays are checked apart).
    let settings = format!("resident_data = \"auto\"\ncuda_graphs = false\n[model]\n{model}");
    let (_, cpu) = train(
        store,
        &dir.path().join("cpu"),
        ("cpu", &libs),
        &settings,
        extra,
    );
    let out = dir.path().join("cuda");
    let (_, cuda) = train(store, &out, ("cuda", &libs), &settings, extra);
    assert_same_losses(what, &cuda, &cpu);
    let history = std::fs::read_to_string(out.join("history.csv")).unwrap();
    let header: Vec<&str> = history.lines().next().unwrap().split(',').collect();
    let at = header.iter().position(|h| *h == column).unwrap();
    for line in history.lines().skip(1) {
        let value: f64 = line.split(',').nth(at).unwrap().parse().unwrap();
        assert!(value > 0.0, "{what}: {column} is in the step: {history}");
    }
    assert_one_read_back_per_step(what, &out);
    let steps = intervals(&out);
    let steps = steps
        .iter()
        .filter(|(_, work)| work.contains_key("launch sparse_input_backward"));
    for (_, work) in steps {
        for kernel in kernels {
            assert!(work.contains_key(*kernel), "{what}: {kernel}: {work:?}");
        }
    }
}

/// scANVI's classifier on the device: its loss is summed there and read with the step's other
/// terms (one read-back per step, as scVI's), and training gives the CPU's losses.
#[test]
fn a_label_classifier_on_the_emulated_device_reads_its_loss_with_the_step() {
    check_loss_read_with_the_step(
        "classifier",
        (
            &[],
            "classifier_weight = 50.0",
            &["--label-key", "cell_type"],
        ),
        "train_supervised",
        &["launch cross_entropy"],
    );
}

/// scANVI's classifier (and here MOSA's contrastive margin) reads each batch's labels where they
/// were staged with it (f32 codes, copied into the step shape's fixed buffers), so its steps
/// replay as scVI's do: bit for bit the op-by-op run.
#[test]
fn a_label_classifier_replays_its_steps_with_the_labels_on_the_device() {
    let Some(libs) = emulator_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = &stores(dir.path(), 1, &[])[0];
    let heads = "classifier_weight = 50.0\ncontrastive_weight = 1.0";
    let settings = |graphs: bool| format!("cuda_graphs = {graphs}\n[model]\n{heads}");
    let labelled = ["--label-key", "cell_type"];
    assert_replayed_as_eager(
        "classifier",
        (store, dir.path()),
        &libs,
        settings,
        &labelled,
    );
}

/// MultiVI's and Multigrate's penalties on the device (the Jeffreys divergence of the RNA and
/// peak experts, the adversarial batch classifier, the MMD between batches), the cycle term and
/// the contrastive margin: their values are summed there and read with the step's other terms
/// (the cycle's norm too: no `chunk_sum_squares`), and training gives the CPU's losses.
#[test]
fn penalties_on_the_emulated_device_are_read_with_the_step() {
    check_loss_read_with_the_step(
        "penalties",
        (
            &["--peaks", "200"],
            "jeffreys_weight = 1.0\nadversarial_batch_weight = 1.0\nmmd_batch_weight = 1.0\n\
             cycle_weight = 0.2\ncontrastive_weight = 1.0",
            &["--label-key", "cell_type"],
        ),
        "train_regularization",
        &[
            "launch jeffreys",
            "launch cross_entropy",
            "launch mmd_value",
        ],
    );
}

/// Two GPU workers under the coordinator reduce through NCCL (the emulated library: ranks are
/// processes sharing memory) and train what one CPU process trains over the same two parts.
#[test]
fn two_workers_on_emulated_devices_reduce_through_nccl_to_the_cpus_losses() {
    let Some(libs) = emulator_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let stores = stores(dir.path(), 2, &[]);
    let parts = "parts = 2";
    let (_, one) = train(
        &stores[0],
        &dir.path().join("one"),
        ("cpu", &libs),
        parts,
        &[],
    );
    let (log, two) = train(
        &stores[1],
        &dir.path().join("two"),
        ("cuda", &libs),
        parts,
        &["--workers", "2"],
    );
    assert!(
        log.contains("device=cuda:1"),
        "one worker per device: {log}"
    );
    assert!(!log.contains("TCP ring"), "NCCL, not the ring: {log}");
    assert_same_losses("2 workers on cuda vs 1 CPU process", &two, &one);
    // One wait per step: the part's backward (one part per worker), its loss terms summed on
    // the device, the NCCL call and the reduced gradients' flag in one interval (a step where
    // a worker has no batch left is the reduction alone); no flag of a part's gradients (they
    // are checked once summed), no norm.
    let all = intervals(&dir.path().join("two"));
    let count = |work: &Work, key: &str| work.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    let reduces: Vec<&(u64, Work)> = all
        .iter()
        .filter(|(_, work)| work.contains_key("all-reduce"))
        .collect();
    assert!(!reduces.is_empty(), "{all:?}");
    assert_buffers_reused("2 workers", &reduces);
    for (_, work) in reduces {
        for key in ["all-reduce", "launch flag_non_finite"] {
            assert_eq!(count(work, key), 1, "{key}: {work:?}");
        }
        assert!(count(work, "launch sparse_input_backward") <= 1, "{work:?}");
    }
    let backwards = |(n, work): &(u64, Work)| n * count(work, "launch sparse_input_backward");
    let stepped: u64 = all
        .iter()
        .filter(|(_, work)| work.contains_key("all-reduce"))
        .map(backwards)
        .sum();
    assert!(stepped > 0, "{all:?}");
    assert_eq!(stepped, all.iter().map(backwards).sum::<u64>(), "{all:?}");
    let total = |key: &str| -> u64 { all.iter().map(|(n, work)| n * count(work, key)).sum() };
    assert_eq!(
        total("launch flag_non_finite"),
        total("all-reduce"),
        "{all:?}"
    );
    assert!(
        !all.iter()
            .any(|(_, work)| work.contains_key("launch chunk_sum_squares")),
        "{all:?}"
    );
}
