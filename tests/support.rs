//! Helpers for the end-to-end tests: where the shared data and the Python interpreter are.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `shared/data` beside the checkout (or `TESSERA_SHARED_DATA`).
pub fn shared_data() -> PathBuf {
    std::env::var_os("TESSERA_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

/// The Python with the pinned anndata/mudata (`TESSERA_PYTHON`, set by `.ci/run`). Without it
/// the interop tests say so and skip, unless `TESSERA_REQUIRE_PYTHON` (set by CI) makes that a
/// failure.
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("TESSERA_PYTHON") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            let why = "TESSERA_PYTHON is not set (run `bash .ci/run`, or point it at a Python \
                       with tests/python/requirements.txt)";
            tessera_kernels::testing::skip("TESSERA_REQUIRE_PYTHON", why);
            None
        }
    }
}

pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// Runs a script of tests/python and returns its stdout; panics with stderr on failure.
pub fn run_python(python: &Path, name: &str, args: &[&str]) -> String {
    let output = Command::new(python)
        .arg(script(name))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        output.status.success(),
        "{name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}
