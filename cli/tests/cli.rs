//! The `tessera` binary as a user runs it.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::process::{Command, Output};

use common::{ok, tessera};
use serde_json::Value;

fn fixture(name: &str) -> String {
    common::fixture(name).to_string_lossy().into_owned()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "tessera failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn inspect_table_tells_the_truth() {
    let out = stdout(&tessera(&["inspect", &fixture("ad013_v3.zarr")]));
    assert!(
        out.contains("AnnData (Zarr v3), 500 cells, 1 modality"),
        "{out}"
    );
    assert!(out.contains("500x200") && out.contains("42230"), "{out}");
    assert!(
        out.contains("layers/counts") && out.contains("int32"),
        "{out}"
    );
    assert!(out.contains("obsm/X_pca: 8 columns"), "{out}");
    let cell_type = out
        .lines()
        .find(|l| l.trim_start().starts_with("cell_type"))
        .unwrap();
    assert!(
        cell_type.contains("missing      7") && cell_type.contains("alpha=181"),
        "{cell_type}"
    );
}

#[test]
fn inspect_json_for_both_zarr_versions_and_mudata() {
    let v2: Value = serde_json::from_str(&stdout(&tessera(&[
        "inspect",
        "--json",
        &fixture("ad013_v2_csc.zarr"),
    ])))
    .unwrap();
    assert_eq!(v2["zarr_format"], 2);
    assert_eq!(v2["modalities"][0]["matrices"][0]["format"], "csc");
    assert_eq!(v2["modalities"][0]["matrices"][0]["nnz"], 42230);
    assert!(v2["modalities"][0]["matrices"][0]["shards"].is_null());
    let v3: Value = serde_json::from_str(&stdout(&tessera(&[
        "inspect",
        "--json",
        &fixture("ad013_v3.zarr"),
    ])))
    .unwrap();
    assert_eq!(
        v3["modalities"][0]["matrices"][0]["shards"],
        serde_json::json!([42230])
    );
    let age = v3["obs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "age")
        .unwrap();
    assert_eq!(
        (age["kind"].as_str(), age["missing"].as_u64()),
        (Some("int"), Some(63))
    );
    let mu: Value = serde_json::from_str(&stdout(&tessera(&[
        "inspect",
        "--json",
        &fixture("mu013_v3.zarr"),
    ])))
    .unwrap();
    assert_eq!(mu["kind"], "MuData");
    let prot = &mu["modalities"][1];
    assert_eq!(
        (
            prot["name"].as_str(),
            prot["n_obs"].as_u64(),
            prot["n_vars"].as_u64()
        ),
        (Some("prot"), Some(380), Some(12))
    );
}

#[test]
fn simulate_hard_scenario_defaults_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("hard.zarr");
    let store = store.to_str().unwrap();
    tessera(&[
        "simulate",
        store,
        "--scenario",
        "hard",
        "--cells",
        "600",
        "--genes",
        "50",
    ]);
    let json: Value =
        serde_json::from_str(&stdout(&tessera(&["inspect", "--json", store]))).unwrap();
    let column = |name: &str| -> Vec<(String, u64)> {
        let obs = json["obs"].as_array().unwrap();
        let c = obs.iter().find(|c| c["name"] == name).unwrap();
        c["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| (kv[0].as_str().unwrap().into(), kv[1].as_u64().unwrap()))
            .collect()
    };
    // 4 batches weighted 4:3:2:1, 12 types in 4 lineages.
    let batches: Vec<u64> = column("batch").into_iter().map(|(_, n)| n).collect();
    assert_eq!(batches, [240, 180, 120, 60]);
    assert_eq!(column("cell_type").len(), 12);
    assert_eq!(column("lineage").len(), 4);
    // Types outside lineages of 3 are refused, naming the rule.
    let bad = dir.path().join("bad.zarr");
    let out = tessera(&[
        "simulate",
        bad.to_str().unwrap(),
        "--scenario",
        "hard",
        "--types",
        "8",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lineages of 3"), "{err}");
}

#[test]
fn simulate_then_inspect_and_no_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("sim.zarr");
    let store = store.to_str().unwrap();
    let out = stdout(&tessera(&[
        "simulate",
        store,
        "--cells",
        "2000",
        "--genes",
        "50",
        "--proteins",
        "8",
        "--peaks",
        "40",
        "--missing",
        "0.3",
        "--zarr-format",
        "2",
    ]));
    assert!(
        out.contains("MuData") && out.contains("rna: 2000 cells x 50 features"),
        "{out}"
    );
    let json: Value =
        serde_json::from_str(&stdout(&tessera(&["inspect", "--json", store]))).unwrap();
    assert_eq!(json["zarr_format"], 2);
    let names: Vec<&str> = json["modalities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["rna", "prot", "atac"]);
    assert_eq!(json["global_obsm"], serde_json::json!(["X_true_latent"]));
    let again = tessera(&["simulate", store, "--cells", "10"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    // simulate has no --overwrite: the advice is one the user can follow.
    assert!(
        err.contains("already exists") && err.contains("write to a new location"),
        "{err}"
    );
    assert!(!err.contains("--overwrite"), "{err}");
}

#[test]
fn bad_locations_fail_with_named_errors() {
    let missing = tessera(&["inspect", "/nonexistent/store.zarr"]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("/nonexistent/store.zarr") && err.contains("no such directory"),
        "{err}"
    );
    // An S3 endpoint on a closed loopback port: a storage error naming the store, in bounded time
    // (object_store retries are capped in the data layer).
    let unreachable = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["inspect", "s3://bucket/atlas.zarr"])
        .env("AWS_ENDPOINT", "http://127.0.0.1:9")
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("TESSERA_LOG", "warn")
        .output()
        .unwrap();
    assert!(!unreachable.status.success());
    let err = String::from_utf8_lossy(&unreachable.stderr);
    assert!(
        err.contains("s3://bucket/atlas.zarr") && err.contains("storage error"),
        "{err}"
    );
}

#[test]
fn bench_step_runs_on_the_cpu_and_a_missing_gpu_is_named() {
    let small = [
        "bench", "step", "--genes", "50", "--batch", "16", "--hidden", "8", "--nnz", "10",
        "--steps", "5",
    ];
    let out = stdout(&tessera(&small));
    assert!(
        out.contains("training step on cpu: 50 genes, 1 x 8 hidden") && out.contains("cells/s"),
        "{out}"
    );
    // No machine here or on the GPU hosts has a ninth GPU: the error says which and why.
    let missing = tessera(&[&small[..], &["--device", "cuda:8"]].concat());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success()
            && err.contains("--device cuda:8")
            && err.contains("no CUDA device"),
        "{err}"
    );
    let bad = tessera(&[&small[..], &["--device", "gpu"]].concat());
    assert!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad.stderr).contains("expected cpu, cuda or cuda:N")
    );
    for flag in ["--tf32", "--bf16"] {
        let reduced = tessera(&[&small[..], &[flag]].concat());
        assert!(
            !reduced.status.success()
                && String::from_utf8_lossy(&reduced.stderr)
                    .contains("--tf32 and --bf16 apply to --device cuda only"),
            "{flag}"
        );
    }
    let both = tessera(&[&small[..], &["--tf32", "--bf16"]].concat());
    assert!(
        !both.status.success()
            && String::from_utf8_lossy(&both.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&both.stderr)
    );
}

/// Every file under `dir`, with its bytes, in path order.
fn snapshot(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// Zero epochs would have replaced a trained embedding with an untrained model's (and then
/// failed drawing the loss): refused before the store or the output folder is touched.
#[test]
fn zero_epochs_are_refused_and_nothing_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (store, out) = (dir.path().join("s.zarr"), dir.path().join("out"));
    let (store, out) = (store.to_str().unwrap(), out.to_str().unwrap());
    stdout(&tessera(&[
        "simulate", store, "--cells", "600", "--genes", "40",
    ]));
    stdout(&tessera(&[
        "train", "--data", store, "--out", out, "--epochs", "1",
    ]));
    let (before, out_before) = (
        snapshot(std::path::Path::new(store)),
        snapshot(std::path::Path::new(out)),
    );
    let o = tessera(&[
        "train",
        "--data",
        store,
        "--out",
        out,
        "--epochs",
        "0",
        "--overwrite",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("max_epochs = 0") && err.contains("expected at least 1"),
        "{err}"
    );
    assert!(
        snapshot(std::path::Path::new(store)) == before,
        "the store changed"
    );
    assert!(
        snapshot(std::path::Path::new(out)) == out_before,
        "the outputs changed"
    );
}

/// The weights, the reference and the checkpoint are readable as the other outputs are (they
/// were created 0600 while history.csv followed the umask: a shared volume's readers failed).
#[test]
fn every_output_file_takes_the_same_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (store, out) = (dir.path().join("s.zarr"), dir.path().join("out"));
    let (store_s, out_s) = (store.to_str().unwrap(), out.to_str().unwrap());
    stdout(&tessera(&[
        "simulate", store_s, "--cells", "400", "--genes", "30",
    ]));
    stdout(&tessera(&[
        "train", "--data", store_s, "--out", out_s, "--epochs", "1",
    ]));
    let mode = |p: &str| std::fs::metadata(out.join(p)).unwrap().permissions().mode() & 0o777;
    let expected = mode("history.csv");
    for file in [
        "model.safetensors",
        "reference.safetensors",
        "checkpoint/model.safetensors",
        "checkpoint/optimizer.safetensors",
        "config.json",
        "loss.png",
        "embedding.png",
    ] {
        assert_eq!(
            mode(file),
            expected,
            "{file}: {:o} vs {expected:o}",
            mode(file)
        );
    }
}

/// `tessera plot` draws the panels it was asked for and never replaces a file unasked.
#[test]
fn plot_draws_the_named_columns_and_keeps_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr");
    let store = store.to_str().unwrap();
    stdout(&tessera(&[
        "simulate", store, "--cells", "300", "--genes", "30",
    ]));
    let out = dir.path().join("p.png");
    let out = out.to_str().unwrap();
    let plot = [
        "plot",
        "--data",
        store,
        "--embedding-key",
        "X_true_latent",
        "--color",
        "batch",
        "--color",
        "cell_type",
        "--out",
        out,
    ];
    let said = stdout(&tessera(&plot));
    assert!(
        said.contains("coloured by batch, cell_type") && said.contains("300 cells"),
        "{said}"
    );
    let png = std::fs::read(out).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let again = tessera(&plot);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(out).unwrap(), png, "the picture was replaced");
}

/// A picture that cannot be drawn after training is a warning: the model and the embedding
/// are written and the run succeeds.
#[test]
fn a_picture_that_cannot_be_drawn_does_not_fail_the_training() {
    let dir = tempfile::tempdir().unwrap();
    let (store, out) = (dir.path().join("s.zarr"), dir.path().join("out"));
    let (store, out_s) = (store.to_str().unwrap(), out.to_str().unwrap());
    stdout(&tessera(&[
        "simulate", store, "--cells", "200", "--genes", "20",
    ]));
    // A folder where the picture goes: it cannot be renamed into place.
    std::fs::create_dir_all(out.join("embedding.png")).unwrap();
    let o = train_one_epoch(store, out_s, &[]);
    let said = stdout(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("the embedding picture was not drawn"), "{err}");
    assert!(said.contains("scIB metrics"), "{said}");
    assert!(out.join("model.safetensors").exists() && out.join("loss.png").exists());
}

/// Every option says what it does, and `train --seed` overrides the configuration's seed (it
/// was only settable in a config file, while map and snf took --seed).
#[test]
fn options_are_described_and_train_takes_a_seed() {
    let help = |args: &[&str]| stdout(&tessera(args));
    let submit = help(&["submit", "-h"]);
    for text in [
        "The MuData modalities to model",
        "obs column with the batch",
        "obs column with cell types",
        "obsm key of the embedding",
        "Override `train.seed`",
    ] {
        assert!(submit.contains(text), "submit -h lacks {text:?}:\n{submit}");
    }
    let convert = help(&["convert", "-h"]);
    for text in [
        "an .h5ad or .h5mu file",
        "Where to write the Zarr store",
        "Zarr format",
    ] {
        assert!(
            convert.contains(text),
            "convert -h lacks {text:?}:\n{convert}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr");
    let store = store.to_str().unwrap();
    stdout(&tessera(&[
        "simulate", store, "--cells", "600", "--genes", "40",
    ]));
    let config = dir.path().join("seed.toml");
    std::fs::write(&config, "[train]\nseed = 5\n").unwrap();
    let config = config.to_str().unwrap();
    let held_out = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let out = out.to_str().unwrap();
        let key = format!("X_{name}");
        let mut args = vec![
            "train",
            "--data",
            store,
            "--out",
            out,
            "--epochs",
            "1",
            "--embedding-key",
            &key,
        ];
        args.extend_from_slice(extra);
        let summary = stdout(&tessera(&args));
        // The summary says the KL is shown unweighted, and which epoch it reports.
        assert!(
            summary.contains("KL ")
                && summary.contains("unweighted x weight 0.000")
                && summary.contains("epoch 0 (history.csv counts epochs from 0"),
            "{summary}"
        );
        std::fs::read_to_string(dir.path().join(name).join("validation_cells.csv")).unwrap()
    };
    let flag = held_out("flag", &["--seed", "5"]);
    let file = held_out("file", &["--config", config]);
    let other = held_out("other", &["--config", config, "--seed", "6"]);
    assert_eq!(flag, file, "--seed 5 splits as train.seed = 5 does");
    assert_ne!(flag, other, "--seed overrides the file's seed");
}

/// Log lines carry no colour codes when stderr is not a terminal; with JSON logs a fatal error
/// is a JSON line too; an unknown log format is refused (it was ignored).
#[test]
fn logs_fit_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr");
    let store = store.to_str().unwrap();
    let with_format = |format: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .env("TESSERA_LOG", "info")
            .env("TESSERA_LOG_FORMAT", format)
            .output()
            .unwrap()
    };
    let o = with_format(
        "text",
        &["simulate", store, "--cells", "300", "--genes", "20"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains("simulated"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in a piped log: {err:?}"
    );

    let o = with_format("json", &["inspect", &format!("{store}-absent")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let last: Value = serde_json::from_str(err.trim().lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{err}");
    assert!(
        last["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("-absent"),
        "{err}"
    );
    let o = with_format("xml", &["inspect", store]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TESSERA_LOG_FORMAT=\"xml\""), "{err}");
}

/// 60 cells x 8 genes of small integer counts times `scale`.
fn scaled_counts(scale: f32) -> tessera_data::Csr {
    let (cells, genes) = (60usize, 8usize);
    let mut x = tessera_data::Csr {
        n_rows: cells,
        n_cols: genes,
        indptr: vec![0],
        ..Default::default()
    };
    for c in 0..cells {
        for g in 0..genes {
            x.indices.push(g as u32);
            x.data.push(((c * 7 + g * 3) % 5 + 1) as f32 * scale);
        }
        x.indptr.push(x.data.len() as u64);
    }
    x
}

/// A store whose X is `scaled_counts(scale)`.
fn scaled_counts_store(path: &std::path::Path, scale: f32) {
    store_with_obs(path, scale, &[]);
}

/// A store whose X is `scaled_counts(scale)`, with these obs columns.
fn store_with_obs(path: &std::path::Path, scale: f32, obs: &[(String, tessera_data::Column)]) {
    use tessera_data::{StoreWriter, ZarrVersion};
    let x = scaled_counts(scale);
    let writer = StoreWriter::create(path.to_str().unwrap(), ZarrVersion::V3).unwrap();
    let names = |prefix: &str, n: usize| (0..n).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>();
    writer
        .anndata("", &names("cell", x.n_rows), obs, &names("gene", x.n_cols))
        .unwrap();
    let mut csr = writer.csr("X", x.n_cols as u64).unwrap();
    csr.push(&x).unwrap();
    csr.finish().unwrap();
    writer.consolidate().unwrap();
}

/// `tessera train` for one epoch on `data` into `out`, with `extra` arguments.
fn train_one_epoch(data: &str, out: &str, extra: &[&str]) -> Output {
    let mut args = vec!["train", "--data", data, "--epochs", "1", "--out", out];
    args.extend_from_slice(extra);
    tessera(&args)
}

#[test]
fn training_on_values_that_are_not_counts_warns_naming_the_cell_and_gene() {
    let dir = tempfile::tempdir().unwrap();
    for (scale, warned) in [(1.0, false), (0.5, true)] {
        let store = dir.path().join(format!("x{scale}.zarr"));
        scaled_counts_store(&store, scale);
        let out = dir.path().join(format!("out{scale}"));
        let run = train_one_epoch(store.to_str().unwrap(), out.to_str().unwrap(), &[]);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{stderr}");
        assert_eq!(
            stderr.contains("does not look like counts"),
            warned,
            "{stderr}"
        );
        if warned {
            // Cell 0, gene 0 holds (0 + 0) % 5 + 1 = 1, times 0.5.
            assert!(
                stderr.contains("cell=cell0") && stderr.contains("gene=gene0"),
                "{stderr}"
            );
            assert!(stderr.contains("value=0.5"), "{stderr}");
        }
    }
}

#[test]
fn init_from_starts_from_a_trained_model_of_the_same_data_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("x.zarr");
    scaled_counts_store(&store, 1.0);
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let train = |extra: &[&str], data: &str, out: &str| {
        train_one_epoch(data, out, &[extra, &["--overwrite"]].concat())
    };
    let data = store.to_string_lossy().into_owned();
    ok(&train(&[], &data, &path("first")));
    ok(&train(
        &["--init-from", &path("first")],
        &data,
        &path("second"),
    ));
    // Another store (its batches and genes): refused, naming the folder, before any training.
    let other = fixture("ad013_v3.zarr");
    let copy = dir.path().join("ad013.zarr");
    common::copy_dir(std::path::Path::new(&other), &copy);
    let refused = train(
        &["--init-from", &path("first")],
        &copy.to_string_lossy(),
        &path("third"),
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("differ from the data's") && stderr.contains("first"),
        "{stderr}"
    );
    // Two worker processes start from it too: the same model as one process over the same
    // two parts.
    let parts = path("parts.toml");
    std::fs::write(&parts, "[train]\nparts = 2\nbatch_size = 16\n").unwrap();
    let embedding = |extra: &[&str], out: &str| {
        ok(&train(
            &[&["--init-from", &path("first")], extra].concat(),
            &data,
            out,
        ));
        tessera_data::AnnData::open(&data)
            .unwrap()
            .obsm("X_tessera")
            .unwrap()
            .0
    };
    let alone = embedding(&["--config", &parts], &path("fourth"));
    let workers = embedding(&["--config", &parts, "--workers", "2"], &path("fifth"));
    assert_eq!(alone, workers);
    let fresh = {
        ok(&train(&["--config", &parts], &data, &path("sixth")));
        tessera_data::AnnData::open(&data)
            .unwrap()
            .obsm("X_tessera")
            .unwrap()
            .0
    };
    assert_ne!(fresh, workers, "--init-from made no difference");
}

#[test]
fn a_retrain_names_the_outputs_an_earlier_run_left_and_records_who_wrote_what() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("x.zarr");
    scaled_counts_store(&store, 1.0);
    let data = store.to_string_lossy().into_owned();
    let out = dir.path().join("out").to_string_lossy().into_owned();
    let train = |extra: &[&str]| train_one_epoch(&data, &out, extra);
    let first = ok(&train(&["--denoised"]));
    assert!(!first.contains("left from an earlier run"), "{first}");
    let again = ok(&train(&["--overwrite"]));
    assert!(
        again.contains("left from an earlier run, not rewritten: layers/tessera_denoised"),
        "{again}"
    );
    let adata = tessera_data::AnnData::open(&data).unwrap();
    let records: Vec<Value> = adata
        .uns_strings("tessera_provenance")
        .unwrap()
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r).unwrap())
        .collect();
    let elements: Vec<&str> = records
        .iter()
        .map(|r| r["element"].as_str().unwrap())
        .collect();
    // The denoised layer keeps the first run's record; the embedding has the second's.
    assert_eq!(elements, ["layers/tessera_denoised", "obsm/X_tessera"]);
    assert!(records[0]["unix_time"].as_u64().unwrap() <= records[1]["unix_time"].as_u64().unwrap());
    for r in &records {
        assert_eq!(r["tool"], format!("tessera {}", env!("CARGO_PKG_VERSION")));
        assert_eq!(r["data"], data.as_str());
        assert_eq!(r["config"]["train"]["max_epochs"], 1);
    }
}

#[test]
fn layer_trains_on_a_layer_of_counts_instead_of_a_normalised_x() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("x.zarr");
    scaled_counts_store(&store, 0.5);
    let data = store.to_string_lossy().into_owned();
    tessera_data::AnnData::open(&data)
        .unwrap()
        .write_layer("counts", &scaled_counts(1.0), false)
        .unwrap();
    let out = dir.path().join("out").to_string_lossy().into_owned();
    let train = |extra: &[&str]| train_one_epoch(&data, &out, extra);
    let run = train(&["--layer", "counts"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(!stderr.contains("does not look like counts"), "{stderr}");
    let run = train(&["--overwrite"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("does not look like counts") && stderr.contains("element=X"),
        "{stderr}"
    );
    let missing = train(&["--layer", "nope", "--overwrite"]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("layers/nope"),
        "{stderr}"
    );
}

#[test]
fn covariates_reach_the_model_and_bad_columns_are_refused_by_name() {
    use tessera_data::Column;
    let dir = tempfile::tempdir().unwrap();
    let cells = 60;
    let depth: Vec<f64> = (0..cells).map(|c| c as f64 / 60.0).collect();
    let mut with_nan = depth.clone();
    with_nan[7] = f64::NAN;
    let columns = |donors: i64| {
        vec![
            (
                "donor".to_string(),
                Column::Int((0..cells).map(|c| Some(c as i64 % donors)).collect()),
            ),
            ("depth".to_string(), Column::Float(depth.clone())),
            ("depth_nan".to_string(), Column::Float(with_nan.clone())),
        ]
    };
    let store = dir.path().join("x.zarr");
    store_with_obs(&store, 1.0, &columns(3));
    let data = store.to_string_lossy().into_owned();
    let out = dir.path().join("out").to_string_lossy().into_owned();
    let train = |extra: &[&str]| train_one_epoch(&data, &out, extra);
    let run = train(&[
        "--categorical-covariate-keys",
        "donor",
        "--continuous-covariate-keys",
        "depth",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{out}/config.json")).unwrap()).unwrap();
    // Integer categories in numeric order, one-hot after the (absent) batch, then the value.
    assert_eq!(
        config["covariates"],
        serde_json::json!({"categorical": [["donor", ["0", "1", "2"]]], "continuous": ["depth"]})
    );
    for (args, expected) in [
        (
            ["--continuous-covariate-keys", "depth_nan"],
            "obs/depth_nan: 1 missing or infinite values",
        ),
        (["--categorical-covariate-keys", "nope"], "obs/nope"),
        (["--continuous-covariate-keys", "nope"], "obs/nope"),
    ] {
        let refused = train(&[args[0], args[1], "--overwrite"]);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(expected),
            "{stderr}"
        );
    }
    // Mapping keeps the reference's covariates; a donor it never saw is refused.
    let query = dir.path().join("q.zarr");
    store_with_obs(&query, 1.0, &columns(4));
    let mapped = tessera(&[
        "map",
        "--model",
        &out,
        "--data",
        query.to_str().unwrap(),
        "--epochs",
        "1",
        "--out",
        dir.path().join("map").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&mapped.stderr);
    assert!(
        !mapped.status.success()
            && stderr.contains("obs/donor: category \"3\" is not one of the reference's (0, 1, 2)"),
        "{stderr}"
    );
}

#[test]
fn map_reads_the_query_from_a_layer_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let reference = path("reference.zarr");
    scaled_counts_store(std::path::Path::new(&reference), 1.0);
    let model = path("model");
    let run = train_one_epoch(&reference, &model, &[]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The same counts in X of one query and in layers/counts (X halved) of the other.
    let (plain, layered) = (path("plain.zarr"), path("layered.zarr"));
    scaled_counts_store(std::path::Path::new(&plain), 1.0);
    scaled_counts_store(std::path::Path::new(&layered), 0.5);
    tessera_data::AnnData::open(&layered)
        .unwrap()
        .write_layer("counts", &scaled_counts(1.0), false)
        .unwrap();
    let map = |data: &str, extra: &[&str]| {
        let mut args = vec!["map", "--model", &model, "--data", data, "--epochs", "2"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", dir.path().to_str().unwrap(), "--overwrite"]);
        let o = tessera(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        tessera_data::AnnData::open(data)
            .unwrap()
            .obsm("X_tessera")
            .unwrap()
            .0
    };
    let from_x = map(&plain, &[]);
    assert_eq!(map(&layered, &["--layer", "counts"]), from_x);
    assert_ne!(map(&layered, &[]), from_x);
}

#[test]
fn model_sizes_and_dropout_out_of_range_are_named_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("x.zarr");
    scaled_counts_store(&store, 1.0);
    let config = dir.path().join("c.toml");
    for (line, expected) in [
        ("n_latent = 0", "n_latent = 0: expected 1 to 65536"),
        ("n_layers = 0", "n_layers = 0: expected 1 to 64"),
        ("n_hidden = 1000000000", "n_hidden = 1000000000"),
        (
            "dropout = 1.5",
            "dropout = 1.5: expected a probability in [0, 1)",
        ),
    ] {
        std::fs::write(&config, format!("[model]\n{line}\n")).unwrap();
        let run = train_one_epoch(
            store.to_str().unwrap(),
            dir.path().join("out").to_str().unwrap(),
            &["--config", config.to_str().unwrap()],
        );
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{line}: {stderr}");
        assert!(
            stderr.contains(expected) && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}
