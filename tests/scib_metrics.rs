//! `tessera-metrics` against scib-metrics (pinned in tests/python/requirements.txt) on the same
//! embeddings: every metric, the k-means agreement scores and scIB's aggregate.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::Value;
use tessera_metrics::{EvalOptions, cluster, evaluate};
use tessera_tests::{python, run_python};

/// Cell types of the given sizes (type 4 seen in batch 0 only) around random centres, three
/// batches shifted by `batch_shift` (0 = perfectly mixed).
fn embedding(
    sizes: &[usize],
    batch_shift: f64,
    seed: u64,
) -> (Vec<f32>, Vec<u32>, Vec<u32>, usize, usize) {
    let d = 8usize;
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let normal = Normal::new(0.0, 1.0).unwrap();
    let centres: Vec<f64> = (0..sizes.len() * d)
        .map(|_| 4.0 * normal.sample(&mut rng))
        .collect();
    let shifts: Vec<f64> = (0..3 * d)
        .map(|_| batch_shift * normal.sample(&mut rng))
        .collect();
    let (mut x, mut labels, mut batches) = (Vec::new(), Vec::new(), Vec::new());
    for (t, &size) in sizes.iter().enumerate() {
        for i in 0..size {
            let b = if t == 4 { 0 } else { i % 3 };
            for k in 0..d {
                x.push((centres[t * d + k] + shifts[b * d + k] + normal.sample(&mut rng)) as f32);
            }
            labels.push(t as u32 * 10 + 3); // codes need not be dense
            batches.push(b as u32);
        }
    }
    let n = labels.len();
    (x, labels, batches, n, d)
}

fn close(ours: f64, theirs: &Value, tol: f64, what: &str) {
    let theirs = theirs
        .as_f64()
        .unwrap_or_else(|| panic!("{what}: scib-metrics gave {theirs}"));
    assert!(
        (ours - theirs).abs() <= tol,
        "{what}: tessera {ours} vs scib-metrics {theirs}"
    );
}

#[test]
fn metrics_agree_with_scib_metrics() {
    let Some(py) = python() else { return };
    // Uneven types with one of 3 cells (k-means with k = 6 labels then has several local optima),
    // and even ones where the partition into types is the one optimum.
    let uneven = [400usize, 300, 200, 150, 147, 3];
    let even = [220usize, 200, 190, 180, 170, 160];
    for (sizes, shift, seed) in [(&uneven, 0.3, 1u64), (&uneven, 3.0, 2), (&even, 0.5, 3)] {
        let (x, labels, batches, n, d) = embedding(sizes, shift, seed);
        let dir = tempfile::tempdir().unwrap();
        let bytes = |v: &[u32]| v.iter().flat_map(|c| c.to_le_bytes()).collect::<Vec<u8>>();
        std::fs::write(
            dir.path().join("x.f32"),
            x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        )
        .unwrap();
        std::fs::write(dir.path().join("labels.u32"), bytes(&labels)).unwrap();
        std::fs::write(dir.path().join("batches.u32"), bytes(&batches)).unwrap();
        std::fs::write(
            dir.path().join("shape.json"),
            format!("{{\"n\": {n}, \"d\": {d}}}"),
        )
        .unwrap();
        let reference: Value = serde_json::from_str(&run_python(
            &py,
            "scib_reference.py",
            &[dir.path().to_str().unwrap()],
        ))
        .unwrap();

        let s = evaluate(&x, n, d, &labels, &batches, &EvalOptions::default()).unwrap();
        eprintln!("sizes {sizes:?}, batch shift {shift}: tessera {s:?}");
        // Distances in f64 here, f32 in JAX: agreement to ~1e-6; LISI's bandwidth search stops
        // at |ΔH| < 1e-5 on either side, so it gets a looser bound.
        close(
            s.silhouette_label,
            &reference["silhouette_label"],
            1e-5,
            "silhouette label",
        );
        close(
            s.silhouette_batch.unwrap(),
            &reference["silhouette_batch"],
            1e-5,
            "silhouette batch",
        );
        close(
            s.graph_connectivity,
            &reference["graph_connectivity"],
            1e-12,
            "graph connectivity",
        );
        close(s.clisi.unwrap(), &reference["clisi"], 1e-4, "cLISI");
        close(s.ilisi.unwrap(), &reference["ilisi"], 1e-4, "iLISI");
        // The agreement scores on scib-metrics' own k-means labels equal scikit-learn's exactly.
        let theirs: Vec<u32> = reference["kmeans_labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        close(
            cluster::nmi(&labels, &theirs),
            &reference["sklearn_nmi_of_kmeans"],
            1e-12,
            "NMI of the same clustering",
        );
        close(
            cluster::ari(&labels, &theirs),
            &reference["sklearn_ari_of_kmeans"],
            1e-12,
            "ARI of the same clustering",
        );
        // Our k-means draws other seeds than JAX's: it must reach a partition at least as good by
        // k-means' own objective, and the same one where the optimum is unique.
        let ours = cluster::kmeans(&x, n, d, sizes.len(), EvalOptions::default().kmeans_init, 0);
        let their_inertia = reference["kmeans_inertia"].as_f64().unwrap();
        assert!(
            ours.inertia <= their_inertia * (1.0 + 1e-5),
            "k-means inertia: tessera {} vs scib-metrics {their_inertia}",
            ours.inertia
        );
        if sizes == &even {
            close(s.nmi, &reference["nmi"], 1e-9, "k-means NMI");
            close(s.ari, &reference["ari"], 1e-9, "k-means ARI");
        }
        // The aggregate from scib-metrics' values with our NMI/ARI swapped in is ours.
        let bio = (s.silhouette_label + s.nmi + s.ari + s.clisi.unwrap()) / 4.0;
        close(
            s.bio_conservation,
            &Value::from(bio),
            1e-12,
            "bio conservation",
        );
        close(
            s.batch_correction.unwrap(),
            &reference["batch_correction"],
            1e-4,
            "batch correction",
        );
        close(
            s.total.unwrap(),
            &Value::from(0.6 * bio + 0.4 * s.batch_correction.unwrap()),
            1e-12,
            "total",
        );
        if sizes == &even {
            close(s.total.unwrap(), &reference["total"], 1e-4, "total");
        }
    }
}
