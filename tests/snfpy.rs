//! Affinities, the fused network and its clustering equal snfpy 0.2.2's (and scikit-learn's
//! spectral clustering) on snfpy's own example data (tests/python/snf_reference.py):
//! affinities to 1e-12, the fused network to 1e-6 (f64), Laplacian eigenvalues to 1e-8, the
//! same eigengap ranking and the same NMI against the true labels.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::path::Path;

use tessera_kernels::ops::affinity::{Metric, feature_affinity};
use tessera_metrics::cluster::nmi;
use tessera_network::{
    SnfParams, View, laplacian_eigenvalues, nemo, rank_by_eigengap, snf, spectral_clustering,
};
use tessera_tests::{python, run_python};

/// A CSV of numbers: (values row-major, columns).
fn read_csv(path: &Path) -> (Vec<f64>, usize) {
    let text = std::fs::read_to_string(path).unwrap();
    let rows: Vec<Vec<f64>> = text
        .lines()
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    let cols = rows[0].len();
    (rows.concat(), cols)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
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
            let w = feature_affinity(&mut x, n, d, Metric::SqEuclidean, 20, 0.5);
            let (reference, _) = read_csv(&dir.join(format!("affinity{v}.csv")));
            let diff = max_abs_diff(&w, &reference);
            let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(
                diff <= 1e-12 * scale,
                "{name} view {v}: affinity differs by {diff} (largest entry {scale})"
            );
            affinities.push(w);
        }
        let other_metrics = if name == "digits" {
            vec![
                ("euclidean", Metric::Euclidean),
                ("cosine", Metric::Cosine),
                ("correlation", Metric::Correlation),
            ]
        } else {
            Vec::new()
        };
        for (name_of_metric, metric) in other_metrics {
            let (mut x, d) = read_csv(&dir.join("view0.csv"));
            let n = x.len() / d;
            let w = feature_affinity(&mut x, n, d, metric, 20, 0.5);
            let (reference, _) = read_csv(&dir.join(format!("affinity0-{name_of_metric}.csv")));
            let diff = max_abs_diff(&w, &reference);
            let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(
                diff <= 1e-10 * scale,
                "{name} view 0, {name_of_metric}: affinity differs by {diff} (largest entry {scale})"
            );
        }
        let (reference, n) = read_csv(&dir.join("fused.csv"));
        let fused = snf(
            affinities.into_iter().map(View::complete).collect(),
            n,
            SnfParams::default(),
        )
        .unwrap();
        let diff = max_abs_diff(&fused, &reference);
        assert!(
            diff < 1e-6,
            "{name}: fused network differs from snfpy's by {diff}"
        );

        let spectral: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("spectral.json")).unwrap())
                .unwrap();
        let expected: Vec<f64> = spectral["eigenvalues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let eigenvalues = laplacian_eigenvalues(&fused, n, expected.len());
        let eigen_diff = max_abs_diff(&eigenvalues, &expected);
        assert!(
            eigen_diff < 1e-8,
            "{name}: Laplacian eigenvalues {eigenvalues:?} vs snfpy's {expected:?}"
        );
        let best: Vec<usize> = rank_by_eigengap(&eigenvalues, &[2, 3, 4, 5])
            .iter()
            .take(2)
            .map(|c| c.0)
            .collect();
        let snfpy_best: Vec<usize> = spectral["best"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(best, snfpy_best, "{name}: eigengap ranking");

        let (truth, _) = read_csv(&dir.join("labels.csv"));
        let truth: Vec<u32> = truth.iter().map(|&v| v as u32).collect();
        let k = spectral["clusters"].as_u64().unwrap() as usize;
        let labels = spectral_clustering(&fused, n, k, 0).unwrap();
        let (ours, theirs) = (nmi(&truth, &labels), spectral["nmi"].as_f64().unwrap());
        assert!(
            (ours - theirs).abs() < 1e-12,
            "{name}: spectral clustering NMI {ours} vs scikit-learn's {theirs}"
        );
        eprintln!(
            "{name}: fused max |diff| {diff:e}, eigenvalues max |diff| {eigen_diff:e}, best counts {best:?}, NMI {ours:.4}"
        );
    }
}

/// A view's affinity over the samples it has (rows without NaN), as snfpy's make_affinity
/// computes it when rows are NaN.
fn partial_view(path: &Path) -> (View, usize) {
    let (x, d) = read_csv(path);
    let n = x.len() / d;
    let samples: Vec<usize> = (0..n)
        .filter(|&i| x[i * d..(i + 1) * d].iter().all(|v| !v.is_nan()))
        .collect();
    let mut present: Vec<f64> = samples
        .iter()
        .flat_map(|&i| x[i * d..(i + 1) * d].to_vec())
        .collect();
    let s = samples.len();
    let w = feature_affinity(&mut present, s, d, Metric::SqEuclidean, 20, 0.5);
    (
        if s == n {
            View::complete(w)
        } else {
            View::partial(samples, w)
        },
        n,
    )
}

#[test]
fn samples_missing_from_views_fuse_as_the_reference() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let printed = run_python(
        &python,
        "snf_missing_reference.py",
        &[dir.path().to_str().unwrap()],
    );
    let views: usize = printed.split_whitespace().next().unwrap().parse().unwrap();
    let (views, sizes): (Vec<View>, Vec<usize>) = (0..views)
        .map(|v| partial_view(&dir.path().join(format!("view{v}.csv"))))
        .unzip();
    let n = sizes[0];
    assert_eq!(
        views.iter().filter(|v| v.samples.is_some()).count(),
        2,
        "views 1 and 3 miss samples"
    );

    let (reference, _) = read_csv(&dir.path().join("nemo.csv"));
    let network = nemo(&views, n, None).unwrap();
    let nemo_diff = max_abs_diff(&network, &reference);
    assert!(
        nemo_diff < 1e-12,
        "NEMO differs from the reference formula by {nemo_diff}"
    );

    let (reference, _) = read_csv(&dir.path().join("fused.csv"));
    let fused = snf(views, n, SnfParams::default()).unwrap();
    let diff = max_abs_diff(&fused, &reference);
    assert!(
        diff < 1e-6,
        "fused network with missing samples differs from the reference by {diff}"
    );
    eprintln!("missing samples: SNF max |diff| {diff:e}, NEMO max |diff| {nemo_diff:e}");
}
