//! Spectral clustering of a sample network and snfpy's eigengap estimate of the cluster count.
//!
//! Both work on the normalised affinity A = D^{-1/2} G D^{-1/2}, with G the symmetrised network
//! with a zero diagonal and D its degrees (snfpy's `get_n_clusters`; scikit-learn's
//! `spectral_embedding` with `norm_laplacian=True`). The normalised Laplacian is I − A, so its
//! smallest eigenvalues are 1 minus A's largest, which Lanczos finds with a few dozen n x n
//! products instead of the dense O(n³) eigendecomposition both references use.

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::error::NetworkError;

/// The normalised affinity of the n x n network `w` and each sample's √degree.
pub fn normalised_affinity(w: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut g = w.to_vec();
    tessera_kernels::ops::affinity::symmetrise(&mut g, n);
    for i in 0..n {
        g[i * n + i] = 0.0;
    }
    let sqrt_degree: Vec<f64> = g
        .par_chunks(n)
        .map(|row| sqrt_degree(row.iter().sum()))
        .collect();
    g.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        row.iter_mut()
            .zip(&sqrt_degree)
            .for_each(|(v, dj)| *v /= sqrt_degree[i] * dj)
    });
    (g, sqrt_degree)
}

/// √degree, with numpy's isclose(degree, 0) (atol 1e-8) guarding isolated samples, as snfpy does.
fn sqrt_degree(d: f64) -> f64 {
    (if d.abs() <= 1e-8 { d + f64::EPSILON } else { d }).sqrt()
}

/// The `k` largest eigenvalues (descending) of the symmetric n x n `a` and their unit
/// eigenvectors ([`top_eigenpairs_of`] the dense matrix).
pub fn top_eigenpairs(a: &[f64], n: usize, k: usize, seed: u64) -> (Vec<f64>, Vec<Vec<f64>>) {
    let matvec = |v: &[f64]| -> Result<Vec<f64>, std::convert::Infallible> {
        Ok(a.par_chunks(n)
            .map(|row| row.iter().zip(v).map(|(x, y)| x * y).sum())
            .collect())
    };
    match top_eigenpairs_of(n, k, seed, matvec) {
        Ok(pairs) => pairs,
        Err(never) => match never {},
    }
}

/// The `k` largest eigenpairs of the symmetric operator `matvec` on n-vectors, by Lanczos with
/// full reorthogonalisation; the Krylov space grows until every returned pair's residual
/// |A v − λ v| is below 1e-9 (or spans everything). A failing product ends the search.
pub fn top_eigenpairs_of<E>(
    n: usize,
    k: usize,
    seed: u64,
    matvec: impl Fn(&[f64]) -> Result<Vec<f64>, E>,
) -> Result<(Vec<f64>, Vec<Vec<f64>>), E> {
    let k = k.min(n);
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let start: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    let mut steps = (2 * k + 40).min(n);
    loop {
        let (basis, alpha, beta) = lanczos(&matvec, &start, steps)?;
        let m = alpha.len();
        let mut t = vec![0.0; m * m];
        for i in 0..m {
            t[i * m + i] = alpha[i];
            if i + 1 < m {
                t[i * m + i + 1] = beta[i];
                t[(i + 1) * m + i] = beta[i];
            }
        }
        let (values, vectors) = jacobi_eigen(&mut t, m);
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|&x, &y| values[y].total_cmp(&values[x]));
        let take = k.min(m);
        let pairs: Vec<(f64, Vec<f64>)> = order[..take]
            .iter()
            .map(|&c| {
                let mut v = vec![0.0; n];
                for (q, basis_row) in basis.iter().enumerate() {
                    let y = vectors[q * m + c];
                    v.iter_mut().zip(basis_row).for_each(|(v, b)| *v += y * b);
                }
                let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                v.iter_mut().for_each(|x| *x /= norm);
                (values[c], v)
            })
            .collect();
        let mut converged = true;
        for (lambda, v) in &pairs {
            converged &= matvec(v)?
                .iter()
                .zip(v)
                .map(|(av, x)| (av - lambda * x).powi(2))
                .sum::<f64>()
                .sqrt()
                < 1e-9;
        }
        // A Krylov space that stopped growing (invariant subspace) is exact as well.
        if converged || m < steps || steps == n {
            return Ok(pairs.into_iter().unzip());
        }
        steps = (steps * 2).min(n);
    }
}

/// `steps` Lanczos steps from `start`: the orthonormal basis and the tridiagonal's diagonal and
/// off-diagonal. Stops early when the space becomes invariant.
type Krylov = (Vec<Vec<f64>>, Vec<f64>, Vec<f64>);

fn lanczos<E>(
    matvec: &impl Fn(&[f64]) -> Result<Vec<f64>, E>,
    start: &[f64],
    steps: usize,
) -> Result<Krylov, E> {
    let norm = start.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut basis = vec![start.iter().map(|x| x / norm).collect::<Vec<f64>>()];
    let (mut alpha, mut beta) = (Vec::new(), Vec::new());
    loop {
        let q = basis.last().map(Vec::as_slice).unwrap_or_default();
        let mut w = matvec(q)?;
        alpha.push(w.iter().zip(q).map(|(a, b)| a * b).sum());
        // Full reorthogonalisation, twice (classical Gram-Schmidt loses orthogonality once).
        for _ in 0..2 {
            for b in &basis {
                let c: f64 = w.iter().zip(b).map(|(x, y)| x * y).sum();
                w.iter_mut().zip(b).for_each(|(x, y)| *x -= c * y);
            }
        }
        let next = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        if basis.len() == steps || next < 1e-12 {
            return Ok((basis, alpha, beta));
        }
        beta.push(next);
        basis.push(w.into_iter().map(|x| x / next).collect());
    }
}

/// Eigenvalues and eigenvectors (columns of the returned m x m row-major matrix) of the small
/// symmetric `t`, by cyclic Jacobi rotations; `t` is destroyed.
fn jacobi_eigen(t: &mut [f64], m: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; m * m];
    for i in 0..m {
        v[i * m + i] = 1.0;
    }
    let scale: f64 = t
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..m)
            .flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| t[i * m + j].powi(2))
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * scale {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                let apq = t[p * m + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (t[q * m + q] - t[p * m + p]) / (2.0 * apq);
                // The smaller root of tan² + 2θ·tan − 1 = 0 zeroes t[p][q].
                let tan = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (tan * tan + 1.0).sqrt();
                let s = tan * c;
                for r in 0..m {
                    let (x, y) = (t[r * m + p], t[r * m + q]);
                    t[r * m + p] = c * x - s * y;
                    t[r * m + q] = s * x + c * y;
                }
                for r in 0..m {
                    let (x, y) = (t[p * m + r], t[q * m + r]);
                    t[p * m + r] = c * x - s * y;
                    t[q * m + r] = s * x + c * y;
                }
                for r in 0..m {
                    let (x, y) = (v[r * m + p], v[r * m + q]);
                    v[r * m + p] = c * x - s * y;
                    v[r * m + q] = s * x + c * y;
                }
            }
        }
    }
    ((0..m).map(|i| t[i * m + i]).collect(), v)
}

/// snfpy's `get_n_clusters`: from the normalised Laplacian's ascending eigenvalues e, the gap
/// after the c-th, |e_c − e_{c−1}|·(1 − e_{c−1})/(1 − e_c), ranks the candidate counts; the
/// candidates come back best first.
pub fn rank_by_eigengap(laplacian_eigenvalues: &[f64], candidates: &[usize]) -> Vec<(usize, f64)> {
    let e = laplacian_eigenvalues;
    let mut ranked: Vec<(usize, f64)> = candidates
        .iter()
        .filter(|&&c| c > 1 && c < e.len())
        .map(|&c| (c, (e[c] - e[c - 1]).abs() * (1.0 - e[c - 1]) / (1.0 - e[c])))
        .collect();
    // numpy's argsort()[::-1]: descending gap, ties to the later candidate.
    ranked.reverse();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked
}

/// The top of a network's spectrum, computed once for both the eigengap and the clustering.
#[derive(Debug, Clone)]
pub struct Spectrum {
    /// The smallest eigenvalues of the normalised Laplacian, ascending.
    pub laplacian: Vec<f64>,
    /// Their eigenvectors (of the normalised affinity), in the same order.
    vectors: Vec<Vec<f64>>,
    sqrt_degree: Vec<f64>,
}

impl Spectrum {
    /// The `count` smallest Laplacian eigenpairs of the n x n network `w`.
    pub fn of(w: &[f64], n: usize, count: usize, seed: u64) -> Spectrum {
        let (a, sqrt_degree) = normalised_affinity(w, n);
        let (values, vectors) = top_eigenpairs(&a, n, count, seed);
        Spectrum {
            laplacian: values.into_iter().map(|l| 1.0 - l).collect(),
            vectors,
            sqrt_degree,
        }
    }

    /// The `count` smallest Laplacian eigenpairs of a network seen only through products:
    /// `product(u)` = G·u for the symmetric network G with its diagonal left out, whose rows
    /// sum to `degree` (diagonal left out too). For networks kept out of core.
    pub fn of_operator<E>(
        degree: &[f64],
        count: usize,
        seed: u64,
        product: impl Fn(&[f64]) -> Result<Vec<f64>, E>,
    ) -> Result<Spectrum, E> {
        let sqrt_degree: Vec<f64> = degree.iter().map(|&d| sqrt_degree(d)).collect();
        // A = D^{-1/2} G D^{-1/2}: scale, multiply, scale.
        let matvec = |v: &[f64]| -> Result<Vec<f64>, E> {
            let u: Vec<f64> = v.iter().zip(&sqrt_degree).map(|(x, d)| x / d).collect();
            Ok(product(&u)?
                .into_iter()
                .zip(&sqrt_degree)
                .map(|(x, d)| x / d)
                .collect())
        };
        let (values, vectors) = top_eigenpairs_of(degree.len(), count, seed, matvec)?;
        Ok(Spectrum {
            laplacian: values.into_iter().map(|l| 1.0 - l).collect(),
            vectors,
            sqrt_degree,
        })
    }

    /// Spectral clustering into `k` clusters (scikit-learn's `spectral_clustering` with k-means
    /// labels): the first k eigenvectors divided by √degree embed the samples, k-means (10
    /// restarts) labels them.
    pub fn clusters(&self, k: usize, seed: u64) -> Result<Vec<u32>, NetworkError> {
        let n = self.sqrt_degree.len();
        if k == 0 || k > self.vectors.len() {
            return Err(NetworkError::BadClusters {
                k,
                n: self.vectors.len().min(n),
            });
        }
        let vectors = &self.vectors[..k];
        let embedding: Vec<f32> = (0..n)
            .flat_map(|i| {
                vectors
                    .iter()
                    .map(|v| (v[i] / self.sqrt_degree[i]) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        Ok(tessera_metrics::cluster::kmeans(&embedding, n, k, k, 10, seed).labels)
    }
}

/// The `count` smallest eigenvalues of the normalised Laplacian of `w`, ascending.
pub fn laplacian_eigenvalues(w: &[f64], n: usize, count: usize) -> Vec<f64> {
    Spectrum::of(w, n, count, 0).laplacian
}

/// Spectral clustering of the network `w` into `k` clusters ([`Spectrum::clusters`]).
pub fn spectral_clustering(
    w: &[f64],
    n: usize,
    k: usize,
    seed: u64,
) -> Result<Vec<u32>, NetworkError> {
    if k == 0 || k > n {
        return Err(NetworkError::BadClusters { k, n });
    }
    Spectrum::of(w, n, k, seed).clusters(k, seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jacobi_diagonalises_a_small_matrix() {
        // Eigenvalues of [[2, 1], [1, 2]] are 3 and 1.
        let mut t = vec![2.0, 1.0, 1.0, 2.0];
        let (mut values, _) = jacobi_eigen(&mut t, 2);
        values.sort_by(f64::total_cmp);
        assert!(
            (values[0] - 1.0).abs() < 1e-14 && (values[1] - 3.0).abs() < 1e-14,
            "{values:?}"
        );
    }

    #[test]
    fn lanczos_finds_the_top_of_a_known_spectrum() {
        // Diagonal with 1, 1/2, ..., 1/n in a rotated basis is still diagonal: use it directly.
        let n = 300;
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = 1.0 / (i + 1) as f64;
        }
        let (values, vectors) = top_eigenpairs(&a, n, 4, 3);
        for (c, (value, vector)) in values.iter().zip(&vectors).enumerate() {
            assert!(
                (value - 1.0 / (c + 1) as f64).abs() < 1e-10,
                "eigenvalue {c}: {value}"
            );
            assert!(
                (vector[c].abs() - 1.0).abs() < 1e-8,
                "eigenvector {c} is not e_{c}"
            );
        }
    }

    #[test]
    fn two_disconnected_blocks_are_two_clusters() {
        // Two cliques of 10 with weak links: Laplacian eigenvalues 0, ~0, then a gap.
        let n = 20;
        let w: Vec<f64> = (0..n * n)
            .map(|e| {
                if (e / n < 10) == (e % n < 10) {
                    1.0
                } else {
                    1e-3
                }
            })
            .collect();
        let e = laplacian_eigenvalues(&w, n, 6);
        assert!(e[0].abs() < 1e-10 && e[1] < 0.05 && e[2] > 0.9, "{e:?}");
        assert_eq!(rank_by_eigengap(&e, &[2, 3, 4, 5])[0].0, 2);
        let labels = spectral_clustering(&w, n, 2, 0).unwrap();
        assert!(
            labels[..10].iter().all(|&l| l == labels[0])
                && labels[10..].iter().all(|&l| l == labels[10])
                && labels[0] != labels[10],
            "{labels:?}"
        );
        assert_eq!(
            spectral_clustering(&w, n, 0, 0),
            Err(NetworkError::BadClusters { k: 0, n })
        );
    }
}
