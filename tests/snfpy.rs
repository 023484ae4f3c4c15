//! Affinities and the fused network equal snfpy 0.2.2's on its own simulated example
//! (tests/python/snf_reference.py): affinities to 1e-12, the fused network to 1e-6 (f64).
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use tessera_kernels::ops::affinity::{scaled_exponential, sq_euclidean, zscore_columns};
use tessera_network::{SnfParams, snf};
use tessera_tests::{python, run_python};

/// A CSV of numbers: (values row-major, columns).
fn read_csv(path: &Path) -> (Vec<f64>, usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let rows: Vec<Vec<f64>> = text.lines().map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    let cols = rows[0].len();
    (rows.concat(), cols)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn affinities_and_fused_network_equal_snfpy() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = run_python(&python, "snf_reference.py", &[dir.path().to_str().unwrap()]);
    let views: usize = out.split_whitespace().next().unwrap().parse().unwrap();
    let mut affinities = Vec::new();
    for v in 0..views {
        let (mut x, d) = read_csv(&dir.path().join(format!("view{v}.csv")));
        let n = x.len() / d;
        zscore_columns(&mut x, n, d);
        let mut w = vec![0.0; n * n];
        sq_euclidean(&x, n, d, &mut w);
        scaled_exponential(&mut w, n, 20, 0.5);
        let (reference, _) = read_csv(&dir.path().join(format!("affinity{v}.csv")));
        let diff = max_abs_diff(&w, &reference);
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(diff <= 1e-12 * scale, "view {v}: affinity differs by {diff} (largest entry {scale})");
        affinities.push(w);
    }
    let (reference, n) = read_csv(&dir.path().join("fused.csv"));
    let fused = snf(affinities, n, SnfParams::default()).unwrap();
    let diff = max_abs_diff(&fused, &reference);
    assert!(diff < 1e-6, "fused network differs from snfpy's by {diff}");
    eprintln!("snfpy parity: fused max |diff| = {diff:e} over {n} x {n}");
}
