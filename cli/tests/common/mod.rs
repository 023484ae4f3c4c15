//! Running the `tessera` binary from the CLI's integration tests.
#![allow(dead_code, clippy::unwrap_used)] // each test crate uses its own subset; test setup

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A fixture store of `shared/data/fixtures` beside the checkout (or under
/// `TESSERA_SHARED_DATA`, as the other crates' tests read it).
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("TESSERA_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
        .join("fixtures")
        .join(name)
}

pub fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("TESSERA_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("tessera runs")
}

/// Stdout of a run that must succeed.
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "tessera failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr of a run that must fail.
pub fn failed(o: &Output) -> String {
    assert!(
        !o.status.success(),
        "tessera should have failed: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A private copy of a store (commands write into their stores; shared data stays untouched).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target)
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A plain HTTP GET: (status line and headers, body).
pub fn http_get(address: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: tessera\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}
