//! `tessera train --device cuda` end to end on the CPU, under the emulated CUDA driver of
//! `kernels/emu` (`bash kernels/emu/build.sh`; the folder it built named by
//! `TESSERA_CUDA_EMULATOR`, NVRTC on LD_LIBRARY_PATH as `.ci/run` sets it): the integration
//! layer's CUDA path — library discovery, the resident training set and its device gather, the
//! staged copies, the step's single read-back, every kernel launch — trains the losses the CPU
//! trains. Our kernels run compiled by g++ with a block's threads as fibers: this checks logic
//! and launches, not a GPU. Without the variable: SKIPPED (`TESSERA_REQUIRE_DEVICE=1`: a failure).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::ok;

/// The emulator's folder and NVRTC's, or None after saying SKIPPED.
fn emulator_or_skip() -> Option<(PathBuf, PathBuf)> {
    let emulator = std::env::var_os("TESSERA_CUDA_EMULATOR").map(PathBuf::from);
    let nvrtc = std::env::var("LD_LIBRARY_PATH").ok().and_then(|path| {
        path.split(':')
            .map(PathBuf::from)
            .find(|d| d.join("libnvrtc.so.12").is_file() || d.join("libnvrtc.so.13").is_file())
    });
    match (emulator, nvrtc) {
        (Some(e), Some(n)) if e.join("libcuda.so").is_file() => Some((e, n)),
        _ => {
            assert!(
                std::env::var_os("TESSERA_REQUIRE_DEVICE").is_none(),
                "TESSERA_REQUIRE_DEVICE is set but TESSERA_CUDA_EMULATOR names no built \
                 emulator (bash kernels/emu/build.sh) or NVRTC is not on LD_LIBRARY_PATH"
            );
            eprintln!(
                "SKIPPED: set TESSERA_CUDA_EMULATOR to kernels/emu/build.sh's folder \
                 (NVRTC on LD_LIBRARY_PATH) to train on the emulated driver"
            );
            None
        }
    }
}

/// Trains `store` for 2 epochs on `device`; the log and the epochs' training losses.
fn train(store: &Path, out: &Path, device: &str, libs: &str, resident: &str) -> (String, Vec<f64>) {
    let config = out.with_extension("toml");
    std::fs::write(
        &config,
        format!("[train]\nresident_data = \"{resident}\"\n"),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train", "--data"])
        .arg(store)
        .args(["--epochs", "2", "--overwrite", "--device", device, "--out"])
        .arg(out)
        .arg("--config")
        .arg(&config)
        .env_remove("LD_LIBRARY_PATH")
        .env("TESSERA_CUDA_LIBS", libs)
        .env("TESSERA_LOG", "info")
        .env("RUST_BACKTRACE", "0")
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

#[test]
fn training_on_the_emulated_device_gives_the_cpus_losses_resident_and_streamed() {
    let Some((emulator, nvrtc)) = emulator_or_skip() else {
        return;
    };
    let libs = format!("{}:{}", emulator.display(), nvrtc.display());
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.zarr");
    let store_arg = store.to_str().unwrap();
    ok(&common::tessera(&[
        "simulate", store_arg, "--cells", "1200", "--genes", "300",
    ]));
    let (_, cpu) = train(&store, &dir.path().join("cpu"), "cpu", &libs, "never");
    assert_eq!(cpu.len(), 2);
    for (resident, where_) in [("auto", "kept on cuda:0"), ("never", "streamed")] {
        let out = dir.path().join(format!("cuda-{resident}"));
        let (log, cuda) = train(&store, &out, "cuda", &libs, resident);
        assert!(log.contains("tessera CUDA emulator"), "{log}");
        assert!(log.contains(where_), "resident_data = {resident}: {log}");
        for (epoch, (g, c)) in cuda.iter().zip(&cpu).enumerate() {
            // The same arithmetic up to f32 summation order in a few reductions.
            assert!(
                (g - c).abs() <= 1e-5 * c.abs(),
                "resident_data = {resident}, epoch {epoch}: cuda {g} vs cpu {c}"
            );
        }
    }
}
