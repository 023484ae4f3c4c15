//! Label transfer by a weighted kNN classifier on a reference embedding, as scArches'
//! `weighted_knn_transfer` computes it: the k nearest reference cells of each query cell
//! (Euclidean, exact), weights exp(−dᵢ / (2/σ)²) with σ the standard deviation (ddof 0) of the
//! k distances, normalised to sum 1; the label with the largest weight sum wins (ties: the
//! smaller code), and the uncertainty is 1 − that sum. Unlabelled reference neighbours (code −1)
//! keep their weight but vote for no label, so they raise the uncertainty.

use rayon::prelude::*;

use crate::MetricsError;
use crate::distance::Columns;
use crate::neighbors::nearest_in_row;

/// One query cell's transferred label (a code into the reference's categories; −1 when no
/// neighbour is labelled) and its uncertainty in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transferred {
    pub label: i32,
    pub uncertainty: f64,
}

fn check(x: &[f32], n: usize, d: usize) -> Result<(), MetricsError> {
    if x.len() != n * d {
        return Err(MetricsError::Shape { len: x.len(), n, d });
    }
    match x.iter().position(|v| !v.is_finite()) {
        Some(at) => Err(MetricsError::NonFinite {
            cell: at / d.max(1),
            dim: at % d.max(1),
            value: x[at],
        }),
        None => Ok(()),
    }
}

/// Labels for the `query` cells (row-major, `d` columns) from the `reference` cells and their
/// `labels` (one code per reference cell, −1 unlabelled) through their `k` nearest neighbours.
pub fn knn_transfer(
    reference: &[f32],
    labels: &[i32],
    query: &[f32],
    d: usize,
    k: usize,
) -> Result<Vec<Transferred>, MetricsError> {
    let n_ref = labels.len();
    check(reference, n_ref, d)?;
    let n_query = query.len() / d.max(1);
    check(query, n_query, d)?;
    if n_ref == 0 || n_query == 0 {
        return Ok(vec![
            Transferred {
                label: -1,
                uncertainty: 1.0
            };
            n_query
        ]);
    }
    let k = k.clamp(1, n_ref);
    let n_labels = labels.iter().copied().max().unwrap_or(-1).max(-1) + 1;
    // Reference and query in one set of columns; each query row is scanned over the reference.
    let all = Columns::new(&[reference, query].concat(), n_ref + n_query, d);
    const BLOCK: usize = 64;
    let blocks: Vec<usize> = (0..n_query).step_by(BLOCK).collect();
    let per_block: Vec<Vec<Transferred>> = blocks
        .par_iter()
        .map(|&first| {
            let rows = first..(first + BLOCK).min(n_query);
            let mut dist = vec![0.0; rows.len() * (n_ref + n_query)];
            all.distances(n_ref + rows.start..n_ref + rows.end, &mut dist);
            dist.chunks(n_ref + n_query)
                .map(|row| {
                    vote(
                        &nearest_in_row(&row[..n_ref], k, 0),
                        labels,
                        n_labels as usize,
                    )
                })
                .collect()
        })
        .collect();
    Ok(per_block.concat())
}

fn vote(neighbours: &[(u32, f64)], labels: &[i32], n_labels: usize) -> Transferred {
    let k = neighbours.len() as f64;
    let mean = neighbours.iter().map(|e| e.1).sum::<f64>() / k;
    let sd = (neighbours.iter().map(|e| (e.1 - mean).powi(2)).sum::<f64>() / k).sqrt();
    // numpy: σ = 0 gives (2/0)² = inf and every weight exp(−d/inf) = 1.
    let scale = (2.0 / sd).powi(2);
    let raw: Vec<f64> = neighbours.iter().map(|e| (-(e.1 / scale)).exp()).collect();
    let total: f64 = raw.iter().sum();
    let mut mass = vec![0.0; n_labels];
    for (&(j, _), w) in neighbours.iter().zip(&raw) {
        if let Some(m) = usize::try_from(labels[j as usize])
            .ok()
            .and_then(|l| mass.get_mut(l))
        {
            *m += w / total;
        }
    }
    let (label, best) = mass
        .iter()
        .enumerate()
        .fold((-1i32, 0.0f64), |(bl, bm), (l, &m)| {
            if m > bm { (l as i32, m) } else { (bl, bm) }
        });
    Transferred {
        label,
        uncertainty: (1.0 - best).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_uncertainty_follow_scarches() {
        // Reference on a line at 0, 1, 2, 10 with labels 0, 0, 1, 1; one query at 0.4, k = 3:
        // distances 0.4, 0.6, 1.6, σ = sqrt(((−0.467)² + (−0.267)² + 0.733²)/3).
        let reference = [0.0f32, 1.0, 2.0, 10.0];
        let labels = [0, 0, 1, 1];
        let got = knn_transfer(&reference, &labels, &[0.4], 1, 3).unwrap();
        let d = [0.4f64, 0.6, 1.6];
        let mean = d.iter().sum::<f64>() / 3.0;
        let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
        let w: Vec<f64> = d.iter().map(|x| (-x / (2.0 / sd).powi(2)).exp()).collect();
        let p0 = (w[0] + w[1]) / w.iter().sum::<f64>();
        assert_eq!(got[0].label, 0);
        assert!(
            (got[0].uncertainty - (1.0 - p0)).abs() < 1e-6,
            "{} vs {}",
            got[0].uncertainty,
            1.0 - p0
        );
    }

    #[test]
    fn equal_distances_vote_evenly_and_unlabelled_neighbours_add_uncertainty() {
        let got = knn_transfer(&[1.0f32, -1.0, 5.0], &[1, 0, 0], &[0.0], 1, 2).unwrap();
        // Both neighbours at distance 1 (σ = 0, weights equal): labels 1 and 0 tie → code 0.
        assert_eq!(
            got[0],
            Transferred {
                label: 0,
                uncertainty: 0.5
            }
        );
        let got = knn_transfer(&[0.0f32, 0.1, 3.0], &[-1, -1, 2], &[0.05], 1, 2).unwrap();
        assert_eq!(
            got[0],
            Transferred {
                label: -1,
                uncertainty: 1.0
            },
            "no labelled neighbour"
        );
        // Many query cells (several blocks) against themselves: each finds its own label.
        let n = 150;
        let x: Vec<f32> = (0..n)
            .map(|i| (i / 50) as f32 * 100.0 + (i % 50) as f32 * 0.01)
            .collect();
        let labels: Vec<i32> = (0..n).map(|i| i / 50).collect();
        let got = knn_transfer(&x, &labels, &x, 1, 15).unwrap();
        assert!(
            got.iter()
                .zip(&labels)
                .all(|(t, &l)| t.label == l && t.uncertainty < 1e-9)
        );
    }

    #[test]
    fn bad_embeddings_are_refused() {
        assert_eq!(
            knn_transfer(&[0.0, 1.0, 2.0], &[0, 1], &[0.0, 0.0], 2, 1),
            Err(MetricsError::Shape { len: 3, n: 2, d: 2 })
        );
        assert!(matches!(
            knn_transfer(&[0.0, 1.0], &[0, 1], &[f32::NAN], 1, 1),
            Err(MetricsError::NonFinite {
                cell: 0,
                dim: 0,
                ..
            })
        ));
    }
}
