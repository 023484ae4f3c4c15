//! UMAP (McInnes, Healy & Melville 2018, as umap-learn computes it) of an embedding into 2-D,
//! for pictures: this crate's exact kNN, the fuzzy simplicial set (per-cell rho and sigma, joined
//! by fuzzy union), a PCA start scaled to [0, 10], and umap-learn's SGD with negative sampling
//! (one sample's negative pushes summed, see `optimize`).
//! umap-learn starts from a spectral layout by default; PCA is its documented alternative
//! (`init="pca"`) and needs no eigensolver here. Defaults are scanpy's (`sc.pp.neighbors`: 15
//! neighbours; `sc.tl.umap`: min_dist 0.5, spread 1). The SGD runs on one thread, so a seed
//! gives one picture.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::distance::Columns;
use crate::neighbors::Neighbors;
use crate::{MetricsError, check_embedding};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UmapOptions {
    /// Neighbours per cell, the cell itself included (as umap-learn counts them).
    pub n_neighbors: usize,
    pub min_dist: f64,
    pub spread: f64,
    /// SGD epochs; `None`: 500 up to 10,000 cells, else 200 (umap-learn's rule).
    pub n_epochs: Option<usize>,
    pub negative_sample_rate: usize,
    pub seed: u64,
}

impl Default for UmapOptions {
    fn default() -> Self {
        UmapOptions {
            n_neighbors: 15,
            min_dist: 0.5,
            spread: 1.0,
            n_epochs: None,
            negative_sample_rate: 5,
            seed: 0,
        }
    }
}

/// The 2-D layout of the row-major `n x d` embedding `x`, one point per cell in order.
pub fn umap(
    x: &[f32],
    n: usize,
    d: usize,
    options: &UmapOptions,
) -> Result<Vec<[f32; 2]>, MetricsError> {
    check_embedding(x, n, d)?;
    let neighbors = Neighbors::exact(&Columns::new(x, n, d), options.n_neighbors.clamp(2, n));
    let graph = fuzzy_graph(&neighbors);
    let (a, b) = curve_parameters(options.min_dist, options.spread);
    let epochs = options
        .n_epochs
        .unwrap_or(if n <= 10_000 { 500 } else { 200 });
    let mut layout = pca_start(x, n, d);
    optimize(&mut layout, &graph, Curve { a, b }, epochs, options);
    Ok(layout)
}

/// umap-learn's `smooth_knn_dist` for one cell: rho, the distance to its nearest other cell, and
/// sigma such that Σ exp(-(d - rho) / sigma) over its neighbours is log2(k). `distances`
/// excludes the cell itself; `k` counts it.
fn smooth_distances(distances: &[f64], k: usize, mean_all: f64) -> (f64, f64) {
    let rho = distances.iter().copied().find(|&d| d > 0.0).unwrap_or(0.0);
    let target = (k as f64).log2();
    let (mut lo, mut hi, mut mid) = (0.0, f64::INFINITY, 1.0);
    for _ in 0..64 {
        let sum: f64 = distances
            .iter()
            .map(|&d| {
                let over = d - rho;
                if over > 0.0 { (-over / mid).exp() } else { 1.0 }
            })
            .sum();
        if (sum - target).abs() < 1e-5 {
            break;
        }
        if sum > target {
            hi = mid;
            mid = (lo + hi) / 2.0;
        } else {
            lo = mid;
            mid = if hi.is_finite() {
                (lo + hi) / 2.0
            } else {
                mid * 2.0
            };
        }
    }
    // umap-learn's floor keeps sigma from collapsing where distances are equal.
    let mean_own = distances.iter().sum::<f64>() / distances.len().max(1) as f64;
    let floor = 1e-3 * if rho > 0.0 { mean_own } else { mean_all };
    (rho, mid.max(floor))
}

/// Edge weights, both directions of every joined pair: `(from, to, weight)`.
type Graph = Vec<(u32, u32, f32)>;

/// The fuzzy simplicial set: directed memberships exp(-(d - rho_i) / sigma_i), joined by fuzzy
/// union w_ij + w_ji - w_ij·w_ji.
fn fuzzy_graph(neighbors: &Neighbors) -> Graph {
    let n = neighbors.n();
    let mean_all = neighbors.distances.iter().sum::<f64>() / neighbors.distances.len() as f64;
    // Keyed by (smaller, larger) cell so both directions of a pair sort together.
    let mut directed: Vec<(u32, u32, f64)> = Vec::with_capacity(n * neighbors.k);
    for i in 0..n {
        let (indices, distances) = neighbors.row(i);
        let others: Vec<(u32, f64)> = indices
            .iter()
            .zip(distances)
            .filter(|(j, _)| **j as usize != i)
            .map(|(&j, &d)| (j, d))
            .collect();
        let own: Vec<f64> = others.iter().map(|o| o.1).collect();
        let (rho, sigma) = smooth_distances(&own, neighbors.k, mean_all);
        for (j, d) in others {
            let w = if d - rho <= 0.0 {
                1.0
            } else {
                (-(d - rho) / sigma).exp()
            };
            directed.push(((i as u32).min(j), (i as u32).max(j), w));
        }
    }
    directed.sort_by_key(|p| (p.0, p.1));
    let mut graph = Graph::with_capacity(directed.len() * 2);
    let mut at = 0;
    while at < directed.len() {
        let (lo, hi, w) = directed[at];
        let (joined, step) = match directed.get(at + 1) {
            Some(&(l, h, v)) if (l, h) == (lo, hi) => (w + v - w * v, 2),
            _ => (w, 1),
        };
        graph.push((lo, hi, joined as f32));
        graph.push((hi, lo, joined as f32));
        at += step;
    }
    graph
}

/// The low-dimensional similarity 1 / (1 + a·d^(2b)).
#[derive(Debug, Clone, Copy)]
struct Curve {
    a: f32,
    b: f32,
}

/// umap-learn's `find_ab_params`: a and b of 1 / (1 + a·x^(2b)) fitted by least squares to 1
/// below `min_dist` and exp(-(x - min_dist) / spread) above, on 300 points of [0, 3·spread]
/// (Levenberg-Marquardt from (1, 1), as scipy's curve_fit does).
fn curve_parameters(min_dist: f64, spread: f64) -> (f32, f32) {
    let xs: Vec<f64> = (0..300).map(|i| 3.0 * spread * i as f64 / 299.0).collect();
    let target = |x: f64| {
        if x < min_dist {
            1.0
        } else {
            (-(x - min_dist) / spread).exp()
        }
    };
    let sse = |a: f64, b: f64| -> f64 {
        xs.iter()
            .map(|&x| (1.0 / (1.0 + a * x.powf(2.0 * b)) - target(x)).powi(2))
            .sum()
    };
    let (mut a, mut b, mut damping) = (1.0f64, 1.0f64, 1e-3);
    let mut error = sse(a, b);
    for _ in 0..500 {
        // Normal equations J'J δ = -J'r of the residuals r = f(x) - target(x).
        let (mut jtj, mut jtr) = ([[0.0f64; 2]; 2], [0.0f64; 2]);
        for &x in xs.iter().filter(|&&x| x > 0.0) {
            let u = x.powf(2.0 * b);
            let f = 1.0 / (1.0 + a * u);
            let grad = [-u * f * f, -a * u * 2.0 * x.ln() * f * f];
            let r = f - target(x);
            for p in 0..2 {
                jtr[p] += grad[p] * r;
                for q in 0..2 {
                    jtj[p][q] += grad[p] * grad[q];
                }
            }
        }
        let m = [
            [jtj[0][0] * (1.0 + damping), jtj[0][1]],
            [jtj[1][0], jtj[1][1] * (1.0 + damping)],
        ];
        let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
        if det.abs() < 1e-300 {
            break;
        }
        let step = [
            -(m[1][1] * jtr[0] - m[0][1] * jtr[1]) / det,
            -(m[0][0] * jtr[1] - m[1][0] * jtr[0]) / det,
        ];
        let (na, nb) = (a + step[0], b + step[1]);
        let trial = sse(na, nb);
        if na > 0.0 && nb > 0.0 && trial < error {
            let converged = (error - trial) < 1e-15 * error.max(1e-300);
            (a, b, error, damping) = (na, nb, trial, damping / 10.0);
            if converged {
                break;
            }
        } else {
            damping *= 10.0;
            if damping > 1e12 {
                break;
            }
        }
    }
    (a as f32, b as f32)
}

/// The first two principal components of `x`, each scaled to [0, 10] as umap-learn scales a
/// given start. With one dimension (or a flat component) the second coordinate is seeded noise
/// of the same range, so points never start stacked.
fn pca_start(x: &[f32], n: usize, d: usize) -> Vec<[f32; 2]> {
    let mut mean = vec![0f64; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += f64::from(v) / n as f64;
        }
    }
    let mut cov = vec![0f64; d * d];
    for row in x.chunks_exact(d) {
        for p in 0..d {
            let vp = f64::from(row[p]) - mean[p];
            for q in 0..d {
                cov[p * d + q] += vp * (f64::from(row[q]) - mean[q]);
            }
        }
    }
    let first = leading_vector(&cov, d, 0);
    // Deflation: the second component leads what the first leaves.
    let lambda = rayleigh(&cov, &first, d);
    let deflated: Vec<f64> = (0..d * d)
        .map(|pq| cov[pq] - lambda * first[pq / d] * first[pq % d])
        .collect();
    let second = leading_vector(&deflated, d, 1);
    let project = |row: &[f32], v: &[f64]| -> f64 {
        row.iter()
            .zip(&mean)
            .zip(v)
            .map(|((&x, m), v)| (f64::from(x) - m) * v)
            .sum()
    };
    let mut coords: Vec<[f64; 2]> = x
        .chunks_exact(d)
        .map(|row| [project(row, &first), project(row, &second)])
        .collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x5eed);
    for axis in 0..2 {
        let (lo, hi) = coords.iter().fold((f64::MAX, f64::MIN), |(lo, hi), c| {
            (lo.min(c[axis]), hi.max(c[axis]))
        });
        for c in &mut coords {
            c[axis] = if hi - lo > 1e-12 * hi.abs().max(1.0) {
                10.0 * (c[axis] - lo) / (hi - lo)
            } else {
                rng.random_range(0.0..10.0)
            };
        }
    }
    coords
        .into_iter()
        .map(|[p, q]| [p as f32, q as f32])
        .collect()
}

/// The leading eigenvector of a symmetric positive semi-definite `d x d` matrix by power
/// iteration from a fixed start (`salt` varies it so a deflated matrix need not start orthogonal
/// to its answer).
fn leading_vector(m: &[f64], d: usize, salt: usize) -> Vec<f64> {
    let mut v: Vec<f64> = (0..d)
        .map(|i| 1.0 + ((i * 7 + salt * 13) % 11) as f64 / 11.0)
        .collect();
    for _ in 0..1000 {
        let next: Vec<f64> = (0..d)
            .map(|p| (0..d).map(|q| m[p * d + q] * v[q]).sum())
            .collect();
        let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm < 1e-300 {
            return vec![0.0; d];
        }
        let next: Vec<f64> = next.into_iter().map(|x| x / norm).collect();
        let moved: f64 = next.iter().zip(&v).map(|(a, b)| (a - b).abs()).sum();
        v = next;
        if moved < 1e-12 {
            break;
        }
    }
    v
}

fn rayleigh(m: &[f64], v: &[f64], d: usize) -> f64 {
    (0..d)
        .map(|p| v[p] * (0..d).map(|q| m[p * d + q] * v[q]).sum::<f64>())
        .sum()
}

/// umap-learn's `optimize_layout_euclidean` (both ends of an edge move): each edge is sampled
/// in proportion to its weight, pulled together along the curve's gradient, and its head pushed
/// away from `negative_sample_rate` random cells per sample; the learning rate falls linearly
/// from 1 to 0.
fn optimize(
    layout: &mut [[f32; 2]],
    graph: &Graph,
    curve: Curve,
    epochs: usize,
    options: &UmapOptions,
) {
    let n = layout.len();
    let strongest = graph.iter().map(|e| e.2).fold(0f32, f32::max);
    // umap-learn drops edges too weak to be sampled once in the run.
    let edges: Vec<(usize, usize, f64)> = graph
        .iter()
        .filter(|e| e.2 >= strongest / epochs as f32 && e.2 > 0.0)
        .map(|&(i, j, w)| (i as usize, j as usize, f64::from(strongest / w)))
        .collect();
    let rate = options.negative_sample_rate.max(1) as f64;
    let mut next: Vec<f64> = edges.iter().map(|e| e.2).collect();
    let mut next_negative: Vec<f64> = edges.iter().map(|e| e.2 / rate).collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(options.seed);
    let Curve { a, b } = curve;
    let clip = |g: f32| g.clamp(-4.0, 4.0);
    for epoch in 0..epochs {
        let alpha = 1.0 - epoch as f32 / epochs as f32;
        let now = epoch as f64;
        for (e, &(i, j, every)) in edges.iter().enumerate() {
            if next[e] > now {
                continue;
            }
            let (p, q) = (layout[i], layout[j]);
            let d2 = squared_distance(p, q);
            if d2 > 0.0 {
                // d2^(b-1) as d2^b / d2: one powf per update, the SGD's cost.
                let power = d2.powf(b);
                let coeff = -2.0 * a * b * (power / d2) / (a * power + 1.0);
                let g = [
                    clip(coeff * (p[0] - q[0])) * alpha,
                    clip(coeff * (p[1] - q[1])) * alpha,
                ];
                layout[i] = [p[0] + g[0], p[1] + g[1]];
                layout[j] = [q[0] - g[0], q[1] - g[1]];
            }
            next[e] += every;
            let negative_every = every / rate;
            let samples = ((now - next_negative[e]) / negative_every).max(0.0) as usize;
            // Every negative sample's push is taken from the head's position after the pull
            // and summed (umap-learn applies them one after another): independent updates
            // pipeline instead of waiting on each other's results.
            let p = layout[i];
            let mut push = [0f32; 2];
            for _ in 0..samples {
                let other = rng.random_range(0..n);
                let q = layout[other];
                let d2 = squared_distance(p, q);
                if d2 > 0.0 {
                    let coeff = 2.0 * b / ((0.001 + d2) * (a * d2.powf(b) + 1.0));
                    push[0] += clip(coeff * (p[0] - q[0]));
                    push[1] += clip(coeff * (p[1] - q[1]));
                } else if other != i {
                    push[0] += 4.0;
                    push[1] += 4.0;
                }
            }
            layout[i] = [p[0] + push[0] * alpha, p[1] + push[1] * alpha];
            next_negative[e] += samples as f64 * negative_every;
        }
    }
}

fn squared_distance(p: [f32; 2], q: [f32; 2]) -> f32 {
    (p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, StandardNormal};

    /// `per` cells around each of `centres` (one per row), unit noise, in `d` dimensions.
    fn blobs(centres: &[Vec<f32>], per: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut labels = Vec::new();
        for (c, centre) in centres.iter().enumerate() {
            for _ in 0..per {
                for &m in centre {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    x.push(m + z);
                }
                labels.push(c as u32);
            }
        }
        (x, labels)
    }

    #[test]
    fn curve_matches_umap_learns_fit() {
        // umap-learn's find_ab_params(spread=1, min_dist=0.1): a 1.5769, b 0.8951.
        let (a, b) = curve_parameters(0.1, 1.0);
        assert!(
            (a - 1.5769).abs() < 2e-3 && (b - 0.8951).abs() < 1e-3,
            "{a} {b}"
        );
        // scanpy's default min_dist 0.5: a 0.5830, b 1.3342.
        let (a, b) = curve_parameters(0.5, 1.0);
        assert!(
            (a - 0.5830).abs() < 2e-3 && (b - 1.3342).abs() < 1e-3,
            "{a} {b}"
        );
    }

    #[test]
    fn sigma_spreads_log2_k_membership() {
        let distances = [0.5, 0.7, 0.8, 1.5, 2.0, 2.2, 3.0];
        let (rho, sigma) = smooth_distances(&distances, 8, 1.0);
        assert_eq!(rho, 0.5);
        let sum: f64 = distances.iter().map(|d| (-(d - rho) / sigma).exp()).sum();
        assert!((sum - 3.0).abs() < 1e-4, "{sum}");
    }

    #[test]
    fn fuzzy_union_is_symmetric_and_bounded() {
        let (x, _) = blobs(&[vec![0.0; 4], vec![6.0; 4]], 30, 1);
        let nb = Neighbors::exact(&Columns::new(&x, 60, 4), 10);
        let graph = fuzzy_graph(&nb);
        let mut weights = std::collections::HashMap::new();
        for &(i, j, w) in &graph {
            assert_ne!(i, j);
            assert!(w > 0.0 && w <= 1.0, "{w}");
            assert!(weights.insert((i, j), w).is_none(), "edge {i}->{j} twice");
        }
        for (&(i, j), w) in &weights {
            assert_eq!(weights.get(&(j, i)), Some(w));
        }
        // Each cell's nearest neighbour is joined at full membership.
        for i in 0..60u32 {
            assert!(graph.iter().any(|&(p, _, w)| p == i && w == 1.0));
        }
    }

    #[test]
    fn separated_types_stay_apart_in_two_dimensions() {
        let centres: Vec<Vec<f32>> = (0..4)
            .map(|c| (0..10).map(|k| if k == c { 8.0 } else { 0.0 }).collect())
            .collect();
        let (x, labels) = blobs(&centres, 100, 7);
        let layout = umap(&x, 400, 10, &UmapOptions::default()).expect("layout");
        assert!(layout.iter().all(|p| p[0].is_finite() && p[1].is_finite()));
        // Every cell's 5 nearest cells in the picture share its type.
        let flat: Vec<f32> = layout.iter().flat_map(|p| [p[0], p[1]]).collect();
        let nb = Neighbors::exact(&Columns::new(&flat, 400, 2), 6);
        let agree = (0..400)
            .map(|i| {
                let (idx, _) = nb.row(i);
                idx.iter()
                    .filter(|&&j| labels[j as usize] == labels[i])
                    .count()
                    - 1
            })
            .sum::<usize>() as f64
            / (400.0 * 5.0);
        assert!(agree > 0.98, "{agree}");
        // One seed, one picture; another seed another.
        assert_eq!(
            layout,
            umap(&x, 400, 10, &UmapOptions::default()).expect("again")
        );
        let other = UmapOptions {
            seed: 1,
            ..UmapOptions::default()
        };
        assert_ne!(layout, umap(&x, 400, 10, &other).expect("seed 1"));
    }

    #[test]
    fn refuses_what_it_cannot_lay_out() {
        let x = [0.0, 1.0, f32::NAN, 2.0, 3.0, 4.0];
        assert!(matches!(
            umap(&x, 3, 2, &UmapOptions::default()),
            Err(MetricsError::NonFinite {
                cell: 1,
                dim: 0,
                ..
            })
        ));
        assert_eq!(
            umap(&[0.0, 1.0], 2, 1, &UmapOptions::default()),
            Err(MetricsError::TooSmall { n: 2, d: 1 })
        );
        // Identical cells still get a layout without NaN.
        let same = umap(&[1.0; 12], 6, 2, &UmapOptions::default()).expect("duplicates");
        assert!(same.iter().all(|p| p[0].is_finite() && p[1].is_finite()));
    }
}
