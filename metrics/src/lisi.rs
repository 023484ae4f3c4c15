//! Local inverse Simpson's index (Harmony's LISI as scIB/scib-metrics compute it): per cell, a
//! Gaussian kernel over its kNN distances whose bandwidth is searched so the neighbour
//! distribution's perplexity hits the target; the LISI is 1 / Σ_c (kernel mass of category c)².
//! iLISI (batches) and cLISI (labels) are its medians, rescaled to [0, 1] with higher = better.

use rayon::prelude::*;

use crate::groups::Groups;
use crate::neighbors::Neighbors;

const TOLERANCE: f64 = 1e-5;
const MAX_TRIES: usize = 50;

/// Entropy and normalised kernel of one cell's neighbours (the cell itself masked out).
fn kernel(distances: &[f64], is_other: &[bool], beta: f64, p: &mut [f64]) -> f64 {
    let mut sum = 0.0;
    let mut weighted = 0.0;
    for ((pj, &d), &other) in p.iter_mut().zip(distances).zip(is_other) {
        *pj = if other { (-d * beta).exp() } else { 0.0 };
        sum += *pj;
        weighted += d * *pj;
    }
    if sum == 0.0 {
        p.fill(0.0);
        return 0.0;
    }
    p.iter_mut().for_each(|pj| *pj /= sum);
    sum.ln() + beta * weighted / sum
}

/// Simpson's index of one cell; −1 where the kernel degenerates (scib-metrics' convention).
fn simpson(
    cell: usize,
    indices: &[u32],
    distances: &[f64],
    codes: &[u32],
    n_categories: usize,
    perplexity: f64,
) -> f64 {
    let is_other: Vec<bool> = indices.iter().map(|&j| j as usize != cell).collect();
    let mut p = vec![0.0; distances.len()];
    let target = perplexity.ln();
    let (mut beta, mut beta_min, mut beta_max) = (1.0f64, f64::NEG_INFINITY, f64::INFINITY);
    let mut h = kernel(distances, &is_other, beta, &mut p);
    let mut tries = 0;
    while (h - target).abs() >= TOLERANCE && tries < MAX_TRIES {
        if h > target {
            beta_min = beta;
            beta = if beta_max == f64::INFINITY {
                beta * 2.0
            } else {
                (beta + beta_max) / 2.0
            };
        } else {
            beta_max = beta;
            beta = if beta_min == f64::NEG_INFINITY {
                beta / 2.0
            } else {
                (beta + beta_min) / 2.0
            };
        }
        h = kernel(distances, &is_other, beta, &mut p);
        tries += 1;
    }
    if h == 0.0 {
        return -1.0;
    }
    let mut mass = vec![0.0; n_categories];
    for (&j, &pj) in indices.iter().zip(&p) {
        mass[codes[j as usize] as usize] += pj;
    }
    mass.iter().map(|m| m * m).sum()
}

/// Per-cell LISI with respect to `codes` (perplexity = ⌊k / 3⌋ as in scib-metrics).
pub fn lisi(neighbors: &Neighbors, codes: &[u32]) -> Vec<f64> {
    let n_categories = codes.iter().max().map_or(0, |&m| m as usize + 1);
    let perplexity = (neighbors.k / 3) as f64;
    (0..neighbors.n())
        .into_par_iter()
        .map(|i| {
            let (idx, dist) = neighbors.row(i);
            1.0 / simpson(i, idx, dist, codes, n_categories, perplexity)
        })
        .collect()
}

/// Median ignoring NaN (numpy's nanmedian); NaN when nothing is left.
pub fn nan_median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// iLISI scaled to [0, 1]: (median − 1) / (batches − 1); None with a single batch.
pub fn ilisi(neighbors: &Neighbors, batches: &[u32]) -> Option<f64> {
    let nb = Groups::count(batches);
    (nb > 1).then(|| (nan_median(&lisi(neighbors, batches)) - 1.0) / (nb as f64 - 1.0))
}

/// cLISI scaled to [0, 1]: (labels − median) / (labels − 1); None with a single label.
pub fn clisi(neighbors: &Neighbors, labels: &[u32]) -> Option<f64> {
    let nl = Groups::count(labels);
    (nl > 1).then(|| (nl as f64 - nan_median(&lisi(neighbors, labels))) / (nl as f64 - 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equidistant_neighbours_give_the_category_count() {
        // Each cell: itself, then 6 coincident neighbours → a uniform kernel whatever β.
        // Categories alternate 0/1/2 → mass 1/3 each → Simpson 1/3 → LISI 3.
        let n = 7;
        let k = 7;
        let mut indices = Vec::new();
        let mut distances = Vec::new();
        for i in 0..n {
            indices.push(i as u32);
            distances.push(0.0);
            for j in (0..n).filter(|&j| j != i) {
                indices.push(j as u32);
                distances.push(0.0);
            }
        }
        let nn = Neighbors {
            k,
            indices,
            distances,
        };
        let codes: Vec<u32> = (0..n as u32).map(|i| i % 3).collect();
        let l = lisi(&nn, &codes);
        // Cell 0 (category 0) sees categories [1,2,0,1,2,0] → 1/3 each.
        assert!((l[0] - 3.0).abs() < 1e-12, "{l:?}");
        let one: Vec<u32> = vec![0; n];
        assert!(lisi(&nn, &one).iter().all(|&v| (v - 1.0).abs() < 1e-12));
        assert_eq!(clisi(&nn, &one), None);
    }

    #[test]
    fn median_ignores_nan() {
        assert_eq!(nan_median(&[3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert_eq!(nan_median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(nan_median(&[f64::NAN]).is_nan());
    }
}
