//! K-means with k = the number of labels (scib-metrics' default clustering for NMI/ARI), and the
//! agreement scores NMI (arithmetic normalisation) and ARI with scikit-learn's definitions.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;

const MAX_ITER: usize = 300;

#[derive(Debug, Clone)]
pub struct KMeans {
    pub labels: Vec<u32>,
    pub inertia: f64,
    pub iterations: usize,
}

fn squared_distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Nearest centroid (lowest index on ties) and its squared distance.
fn nearest(point: &[f64], centroids: &[f64], d: usize) -> (u32, f64) {
    let mut best = (0u32, f64::INFINITY);
    for (c, centroid) in centroids.chunks_exact(d).enumerate() {
        let dist = squared_distance(point, centroid);
        if dist < best.1 {
            best = (c as u32, dist);
        }
    }
    best
}

/// Greedy k-means++ seeding: each new centre is the best (lowest potential) of 2 + ⌊ln k⌋
/// candidates drawn with probability ∝ squared distance to the nearest chosen centre.
fn seed_centroids(
    x: &[f64],
    n: usize,
    d: usize,
    k: usize,
    rng: &mut Xoshiro256PlusPlus,
) -> Vec<f64> {
    let mut centroids = Vec::with_capacity(k * d);
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(&x[first * d..(first + 1) * d]);
    let mut min_sq: Vec<f64> = x
        .par_chunks_exact(d)
        .map(|p| squared_distance(p, &centroids[..d]))
        .collect();
    let trials = 2 + (k as f64).ln() as usize;
    for _ in 1..k {
        let total: f64 = min_sq.iter().sum();
        let mut best: Option<(f64, usize, Vec<f64>)> = None;
        for _ in 0..trials {
            let candidate = if total > 0.0 {
                let mut u = rng.random::<f64>() * total;
                let mut pick = n - 1;
                for (j, &w) in min_sq.iter().enumerate() {
                    if u < w {
                        pick = j;
                        break;
                    }
                    u -= w;
                }
                pick
            } else {
                rng.random_range(0..n)
            };
            let c = &x[candidate * d..(candidate + 1) * d];
            let updated: Vec<f64> = x
                .par_chunks_exact(d)
                .zip(&min_sq)
                .map(|(p, &m)| m.min(squared_distance(p, c)))
                .collect();
            let potential: f64 = updated.iter().sum();
            if best.as_ref().is_none_or(|(b, _, _)| potential < *b) {
                best = Some((potential, candidate, updated));
            }
        }
        if let Some((_, candidate, updated)) = best {
            centroids.extend_from_slice(&x[candidate * d..(candidate + 1) * d]);
            min_sq = updated;
        }
    }
    centroids
}

/// Lloyd's algorithm from k-means++ seeds, `n_init` times (best inertia kept), on the row-major
/// `x` (`n x d`). Runs until the assignment stops changing (or 300 iterations); an emptied
/// cluster keeps its previous centre.
pub fn kmeans(x: &[f32], n: usize, d: usize, k: usize, n_init: usize, seed: u64) -> KMeans {
    // Centred for accuracy, as scib-metrics does; the clustering is unchanged by the shift.
    let mut mean = vec![0f64; d];
    for p in x.chunks_exact(d) {
        mean.iter_mut()
            .zip(p)
            .for_each(|(m, &v)| *m += f64::from(v));
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let xc: Vec<f64> = x
        .chunks_exact(d)
        .flat_map(|p| p.iter().zip(&mean).map(|(&v, m)| f64::from(v) - m))
        .collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut best: Option<KMeans> = None;
    for _ in 0..n_init.max(1) {
        let run = lloyd(&xc, n, d, seed_centroids(&xc, n, d, k, &mut rng), k);
        if best.as_ref().is_none_or(|b| run.inertia < b.inertia) {
            best = Some(run);
        }
    }
    best.unwrap_or(KMeans {
        labels: vec![0; n],
        inertia: 0.0,
        iterations: 0,
    })
}

fn lloyd(x: &[f64], n: usize, d: usize, mut centroids: Vec<f64>, k: usize) -> KMeans {
    let mut labels: Vec<u32> = vec![u32::MAX; n];
    let mut iterations = 0;
    let mut inertia;
    loop {
        let assigned: Vec<(u32, f64)> = x
            .par_chunks_exact(d)
            .map(|p| nearest(p, &centroids, d))
            .collect();
        inertia = assigned.iter().map(|a| a.1).sum();
        let changed = assigned.iter().zip(&labels).any(|(a, &l)| a.0 != l);
        labels = assigned.into_iter().map(|a| a.0).collect();
        if !changed || iterations == MAX_ITER {
            break;
        }
        let mut sums = vec![0f64; k * d];
        let mut counts = vec![0usize; k];
        for (p, &l) in x.chunks_exact(d).zip(&labels) {
            counts[l as usize] += 1;
            sums[l as usize * d..(l as usize + 1) * d]
                .iter_mut()
                .zip(p)
                .for_each(|(s, v)| *s += v);
        }
        for c in 0..k {
            if counts[c] > 0 {
                for j in 0..d {
                    centroids[c * d + j] = sums[c * d + j] / counts[c] as f64;
                }
            }
        }
        iterations += 1;
    }
    KMeans {
        labels,
        inertia,
        iterations,
    }
}

/// Contingency table of two labelings (dense codes), with row and column sums.
struct Contingency {
    counts: Vec<Vec<u64>>,
    rows: Vec<u64>,
    cols: Vec<u64>,
    n: u64,
}

fn dense(codes: &[u32]) -> (Vec<usize>, usize) {
    let mut present: Vec<u32> = codes.to_vec();
    present.sort_unstable();
    present.dedup();
    (
        codes
            .iter()
            .map(|c| present.partition_point(|p| p < c))
            .collect(),
        present.len(),
    )
}

impl Contingency {
    fn new(a: &[u32], b: &[u32]) -> Contingency {
        let ((a, na), (b, nb)) = (dense(a), dense(b));
        let mut counts = vec![vec![0u64; nb]; na];
        for (&i, &j) in a.iter().zip(&b) {
            counts[i][j] += 1;
        }
        let rows = counts.iter().map(|r| r.iter().sum()).collect();
        let cols = (0..nb).map(|j| counts.iter().map(|r| r[j]).sum()).collect();
        Contingency {
            counts,
            rows,
            cols,
            n: a.len() as u64,
        }
    }
}

fn entropy(sizes: &[u64], n: u64) -> f64 {
    let n = n as f64;
    -sizes
        .iter()
        .filter(|&&s| s > 0)
        .map(|&s| s as f64 / n * (s as f64 / n).ln())
        .sum::<f64>()
}

/// Normalised mutual information, MI / mean(H(a), H(b)) (scikit-learn's "arithmetic").
pub fn nmi(a: &[u32], b: &[u32]) -> f64 {
    let t = Contingency::new(a, b);
    if t.rows.len() == t.cols.len() && t.rows.len() <= 1 {
        return 1.0;
    }
    let n = t.n as f64;
    let mut mi = 0.0;
    for (i, row) in t.counts.iter().enumerate() {
        for (j, &c) in row.iter().enumerate().filter(|(_, c)| **c > 0) {
            let c = c as f64;
            mi += c / n * (c * n / (t.rows[i] as f64 * t.cols[j] as f64)).ln();
        }
    }
    let mi = mi.max(0.0);
    if mi == 0.0 {
        return 0.0;
    }
    mi / ((entropy(&t.rows, t.n) + entropy(&t.cols, t.n)) / 2.0)
}

/// Adjusted Rand index from the pair confusion matrix.
pub fn ari(a: &[u32], b: &[u32]) -> f64 {
    let t = Contingency::new(a, b);
    let sq = |v: u64| (v as f64) * (v as f64);
    let sum_squares: f64 = t.counts.iter().flatten().map(|&c| sq(c)).sum();
    let n = t.n as f64;
    let tp = sum_squares - n;
    let fp = t.cols.iter().map(|&c| sq(c)).sum::<f64>() - sum_squares;
    let fn_ = t.rows.iter().map(|&r| sq(r)).sum::<f64>() - sum_squares;
    let tn = n * n - fp - fn_ - sum_squares;
    if fn_ == 0.0 && fp == 0.0 {
        return 1.0;
    }
    2.0 * (tp * tn - fn_ * fp) / ((tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_scores_match_scikit_learn() {
        // sklearn 1.9: adjusted_rand_score([0,0,1,1],[0,0,1,2]) = 0.5714285714285715,
        // normalized_mutual_info_score(...) = 0.8
        let a = [0, 0, 1, 1];
        let b = [0, 0, 1, 2];
        assert!((ari(&a, &b) - 0.571_428_571_428_571_5).abs() < 1e-12);
        assert!((nmi(&a, &b) - 0.8).abs() < 1e-12);
        // Relabelled identical partitions score 1; a constant vs anything scores NMI 0.
        assert_eq!(ari(&[5, 5, 7], &[1, 1, 0]), 1.0);
        assert!((nmi(&[5, 5, 7], &[1, 1, 0]) - 1.0).abs() < 1e-12);
        assert_eq!(nmi(&[0, 0, 0], &[0, 1, 2]), 0.0);
        assert_eq!(nmi(&[3, 3], &[4, 4]), 1.0);
    }

    #[test]
    fn kmeans_finds_separated_blobs() {
        let mut x = Vec::new();
        for c in 0..3 {
            for i in 0..20 {
                x.extend_from_slice(&[c as f32 * 100.0 + (i % 5) as f32, (i / 5) as f32]);
            }
        }
        let km = kmeans(&x, 60, 2, 3, 1, 7);
        let truth: Vec<u32> = (0..60).map(|i| i / 20).collect();
        assert_eq!(ari(&truth, &km.labels), 1.0);
        // Within-blob inertia: per blob Σ(x−2)² + Σ(y−1.5)² = 4·10 + 5·5 = 65.
        assert!((km.inertia - 195.0).abs() < 1e-9, "{}", km.inertia);
    }
}
