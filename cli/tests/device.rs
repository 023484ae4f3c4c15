//! `--device` and `TESSERA_CUDA_LIBS` as a user meets them on a machine without a GPU (CI): the
//! libraries named by the variable are found under the names cudarc loads, a GPU asked for
//! where there is none is an error naming what was looked for, a bad device name is refused.
//! On a GPU host the GPU paths run in `bench/gpu/check.sh`.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{failed, ok, tessera};

/// The folder of NVIDIA's NVRTC wheel that CI installs (found on LD_LIBRARY_PATH, as `.ci/run`
/// sets it).
fn nvrtc_folder() -> Option<PathBuf> {
    std::env::var("LD_LIBRARY_PATH")
        .ok()?
        .split(':')
        .map(PathBuf::from)
        .find(|d| d.join("libnvrtc.so.12").is_file() || d.join("libnvrtc.so.13").is_file())
}

/// [`nvrtc_folder`], or None after saying SKIPPED (an error where CI requires NVRTC).
fn nvrtc_or_skip() -> Option<PathBuf> {
    let folder = nvrtc_folder();
    if folder.is_none() {
        let why = "no NVRTC wheel on LD_LIBRARY_PATH (bash .ci/setup installs it)";
        tessera_kernels::testing::skip("TESSERA_REQUIRE_NVRTC", why);
    }
    folder
}

fn devices(env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.arg("devices").env_remove("LD_LIBRARY_PATH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    ok(&cmd.output().unwrap())
}

#[test]
fn cuda_libraries_named_by_the_variable_are_found() {
    let Some(folder) = nvrtc_or_skip() else {
        return;
    };
    let folder = folder.display().to_string();
    // With `pip install nvidia-cuda-nvrtc-cu12` a `libnvrtc.so` link may also exist; the
    // point is the folder is searched because the variable names it.
    let without = devices(&[]);
    assert!(without.contains("libnvrtc not found"), "{without}");
    let with = devices(&[("TESSERA_CUDA_LIBS", &folder)]);
    assert!(with.contains("libnvrtc found"), "{with}");
    assert!(
        with.contains("tessera-cuda-libs-"),
        "the link folder leads the path: {with}"
    );
}

/// The host's CUDA 12 and CUDA 13 NVRTC (NVIDIA's wheels, which CI installs) each compile every
/// kernel source, found through TESSERA_CUDA_LIBS; the GPU hosts run CUDA 13.
#[test]
fn every_cuda_source_compiles_with_the_nvrtc_of_cuda_12_and_13() {
    let Some(folder) = nvrtc_or_skip() else {
        return;
    };
    // site-packages/nvidia/cuda_nvrtc/lib (CUDA 12) and site-packages/nvidia/cu13/lib (CUDA 13).
    let nvidia = folder
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .to_path_buf();
    for (major, lib) in [(12, "cuda_nvrtc/lib"), (13, "cu13/lib")] {
        let lib = nvidia.join(lib);
        if !lib.is_dir() {
            let why = format!(
                "no CUDA {major} NVRTC at {} (bash .ci/setup installs it)",
                lib.display()
            );
            tessera_kernels::testing::skip("TESSERA_REQUIRE_NVRTC", &why);
            continue;
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
        cmd.args(["devices", "--compile"])
            .env_remove("LD_LIBRARY_PATH")
            .env("TESSERA_CUDA_LIBS", &lib);
        let out = ok(&cmd.output().unwrap());
        assert!(
            out.contains(&format!("NVRTC {major}.")) && out.contains("9 CUDA sources compiled"),
            "{out}"
        );
    }
}

#[test]
fn a_gpu_where_there_is_none_is_an_error_naming_what_was_looked_for() {
    let listing = devices(&[]);
    if !listing.contains("no GPU") {
        return eprintln!("SKIPPED: this machine has a GPU:\n{listing}");
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out").display().to_string();
    let data = dir.path().join("data.zarr");
    common::copy_dir(&common::fixture("ad013_v3.zarr"), &data);
    let err = failed(&tessera(&[
        "train",
        "--data",
        &data.display().to_string(),
        "--out",
        &out,
        "--device",
        "cuda:0",
    ]));
    assert!(
        err.contains("device cuda:0") && err.contains("libcuda"),
        "{err}"
    );
    // The same from the environment (what the GPU manifests set).
    let from_env = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "train",
            "--data",
            &data.display().to_string(),
            "--out",
            &out,
        ])
        .env("TESSERA_DEVICE", "cuda:1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = failed(&from_env);
    assert!(err.contains("device cuda:1"), "{err}");
    let err = failed(&tessera(&[
        "map", "--model", &out, "--data", "x.zarr", "--device", "tpu",
    ]));
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
}

/// The device check script's CPU fallback, what CI can run of it: every stage on the CPU at
/// small sizes, the parity binaries reported missing (cargo keeps them elsewhere), the summary
/// table last; on a GPU host the same script runs the CUDA stages.
#[test]
fn the_device_check_script_runs_its_cpu_fallback_to_a_passing_table() {
    if !devices(&[]).contains("no GPU") {
        return eprintln!("SKIPPED: this machine has a GPU: run bench/gpu/check.sh itself");
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tessera"), bin.join("tessera")).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/gpu/check.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&bin)
        .env("TESSERA_CHECK_DIR", dir.path().join("work"))
        .env("TESSERA_CHECK_SCRATCH", dir.path().join("scratch"))
        .env("TESSERA_CHECK_CELLS", "2000")
        .env("TESSERA_CHECK_WHEELS", dir.path().join("no-wheels"))
        .env("TESSERA_LOG", "warn")
        .output()
        .unwrap();
    let table = ok(&out);
    let row = |stage: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {stage}")))
            .unwrap_or_else(|| panic!("no {stage:?} row in:\n{table}"))
            .to_string()
    };
    assert!(row("devices").contains("| cpu "), "{table}");
    if nvrtc_folder().is_some() {
        assert!(
            row("NVRTC compiles the kernels").contains("9 CUDA sources compiled"),
            "{table}"
        );
    }
    assert!(row("kernels_cuda_parity").contains("missing"), "{table}");
    for stage in [
        "bench ops --device cpu",
        "step scVI size",
        "step scVI size, classifier + adversary",
        "step Census size",
        "train --device cpu (2000 cells)",
        "train the default data",
        "train the Census-size model",
        "train --workers 2 (2 CPU workers)",
    ] {
        assert!(row(stage).contains("| ok "), "{stage}: {table}");
    }
    assert!(
        row("step Census size").contains("cells/s")
            && row("step scVI size").contains("staged cells/s")
            && row("step scVI size").contains("resident cells/s")
            && row("step scVI size").contains("queues a resident step's forward and backward in"),
        "{table}"
    );
    assert!(
        row("train --device cpu").contains("waiting for batches")
            && row("train --device cpu").contains("training set streamed from"),
        "{table}"
    );
    // The same device twice: the step losses agree to the bit.
    let steps = row("first 50 steps vs the CPU");
    assert!(
        steps.contains("| ok ") && steps.contains("difference 0.00e+00"),
        "{table}"
    );
    assert!(row("bench nccl").contains("SKIPPED"), "{table}");
    // The Python stages run where python3 imports the packages, and are named as skipped
    // where not.
    let python = row("Python API on the device");
    assert!(
        (python.contains("| SKIPPED ") && python.contains("build.sh's wheel"))
            || (python.contains("| ok ") && python.contains("cells/s over the train call")),
        "{table}"
    );
    let anchor = table
        .lines()
        .filter(|l| l.starts_with("| scvi-tools"))
        .collect::<Vec<_>>();
    assert!(
        matches!(&anchor[..], [one] if one.contains("| SKIPPED ") && one.contains("wheels.sh"))
            || (anchor.len() == 2
                && anchor
                    .iter()
                    .all(|l| l.contains("| ok ") && l.trim_end().ends_with("x |"))),
        "{table}"
    );
    let csv = std::fs::read_to_string(dir.path().join("scratch/train-cpu/steps.csv")).unwrap();
    let summary = std::fs::read_to_string(dir.path().join("work/summary.md")).unwrap();
    assert!(summary.contains("| first 50 steps vs the CPU"), "{summary}");
    assert!(csv.starts_with("step,loss,reconstruction,kl"), "{csv}");
    // 1,800 training cells (10% held out) in batches of 128: 14 full and one of 8, twice.
    assert_eq!(csv.lines().count(), 1 + 30, "{csv}");
    assert!(csv.lines().nth(30).unwrap().ends_with(",8"), "{csv}");
}
