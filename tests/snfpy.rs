//! Affinities, the fused network and its clustering equal snfpy 0.2.2's (and scikit-learn's
//! spectral clustering) on snfpy's own example data (tests/python/snf_reference.py):
//! affinities to 1e-12, the fused network to 1e-6 (f64), Laplacian eigenvalues to 1e-8, the
//! same eigengap ranking and the same NMI against the true labels.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use tessera_kernels::ops::affinity::{scaled_exponential, sq_euclidean, zscore_columns};
use tessera_metrics::cluster::nmi;
use tessera_network::{SnfParams, laplacian_eigenvalues, rank_by_eigengap, snf, spectral_clustering};
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
fn affinities_fused_network_and_clusters_equal_snfpy() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let printed = run_python(&python, "snf_reference.py", &[dir.path().to_str().unwrap()]);
    for line in printed.lines() {
        let mut fields = line.split_whitespace();
        let name = fields.next().unwrap();
        let views: usize = fields.next().unwrap().parse().unwrap();
        let dir = dir.path().join(name);
        let mut affinities = Vec::new();
        for v in 0..views {
            let (mut x, d) = read_csv(&dir.join(format!("view{v}.csv")));
            let n = x.len() / d;
            zscore_columns(&mut x, n, d);
            let mut w = vec![0.0; n * n];
            sq_euclidean(&x, n, d, &mut w);
            scaled_exponential(&mut w, n, 20, 0.5);
            let (reference, _) = read_csv(&dir.join(format!("affinity{v}.csv")));
            let diff = max_abs_diff(&w, &reference);
            let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(diff <= 1e-12 * scale, "{name} view {v}: affinity differs by {diff} (largest entry {scale})");
            affinities.push(w);
        }
        let (reference, n) = read_csv(&dir.join("fused.csv"));
        let fused = snf(affinities, n, SnfParams::default()).unwrap();
        let diff = max_abs_diff(&fused, &reference);
        assert!(diff < 1e-6, "{name}: fused network differs from snfpy's by {diff}");

        let spectral: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("spectral.json")).unwrap()).unwrap();
        let expected: Vec<f64> = spectral["eigenvalues"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let eigenvalues = laplacian_eigenvalues(&fused, n, expected.len());
        let eigen_diff = max_abs_diff(&eigenvalues, &expected);
        assert!(eigen_diff < 1e-8, "{name}: Laplacian eigenvalues {eigenvalues:?} vs snfpy's {expected:?}");
        let best: Vec<usize> = rank_by_eigengap(&eigenvalues, &[2, 3, 4, 5]).iter().take(2).map(|c| c.0).collect();
        let snfpy_best: Vec<usize> = spectral["best"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        assert_eq!(best, snfpy_best, "{name}: eigengap ranking");

        let (truth, _) = read_csv(&dir.join("labels.csv"));
        let truth: Vec<u32> = truth.iter().map(|&v| v as u32).collect();
        let k = spectral["clusters"].as_u64().unwrap() as usize;
        let labels = spectral_clustering(&fused, n, k, 0).unwrap();
        let (ours, theirs) = (nmi(&truth, &labels), spectral["nmi"].as_f64().unwrap());
        assert!((ours - theirs).abs() < 1e-12, "{name}: spectral clustering NMI {ours} vs scikit-learn's {theirs}");
        eprintln!("{name}: fused max |diff| {diff:e}, eigenvalues max |diff| {eigen_diff:e}, best counts {best:?}, NMI {ours:.4}");
    }
}
