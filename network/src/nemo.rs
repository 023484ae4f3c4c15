//! NEMO (Rappoport & Shamir 2019, the authors' `nemo.affinity.graph`): in each view, every
//! sample's affinities to its k nearest (itself included) divided by their sum; the view's
//! relative similarity is that matrix plus its transpose; the network averages each pair over
//! the views that measured both, and a pair no view shares gets the mean of the others.

use rayon::prelude::*;

use crate::error::NetworkError;
use crate::view::{View, mean_over_views};

/// NEMO's default neighbour count: the view's samples / 6, rounded half to even as R does.
pub fn default_neighbours(samples: usize) -> usize {
    ((samples as f64 / 6.0).round_ties_even() as usize).max(1)
}

/// The NEMO network of the views over n samples; `k` neighbours per sample in every view, or
/// each view's [`default_neighbours`].
pub fn nemo(views: &[View], n: usize, k: Option<usize>) -> Result<Vec<f64>, NetworkError> {
    let (mut total, shared) = mean_over_views(views, n, |view, total| {
        let s = view.size(n);
        let k = k.unwrap_or_else(|| default_neighbours(s));
        if k == 0 || k > s {
            return Err(NetworkError::BadK { k, n: s });
        }
        // Row i: entries at or above its k-th largest (ties kept, as the reference's `>=`).
        let rows: Vec<Vec<(usize, f64)>> = view
            .affinity
            .par_chunks(s)
            .map(|row| {
                let mut sorted = row.to_vec();
                let (_, &mut threshold, _) =
                    sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
                let kept: Vec<(usize, f64)> = row
                    .iter()
                    .enumerate()
                    .filter(|&(_, &v)| v >= threshold)
                    .map(|(j, &v)| (j, v))
                    .collect();
                let sum: f64 = kept.iter().map(|e| e.1).sum();
                kept.into_iter()
                    .map(|(j, v)| (j, if sum > 0.0 { v / sum } else { 0.0 }))
                    .collect()
            })
            .collect();
        // Relative similarity: the normalised rows plus their transpose.
        for (i, row) in rows.iter().enumerate() {
            let gi = view.global(i);
            for &(j, v) in row {
                let gj = view.global(j);
                total[gi * n + gj] += v;
                total[gj * n + gi] += v;
            }
        }
        Ok(())
    })?;
    if shared.contains(&0) {
        // The reference fills unshared pairs with the mean of the shared ones below the diagonal.
        let (sum, count) = (0..n)
            .flat_map(|i| (0..i).map(move |j| i * n + j))
            .filter(|&e| shared[e] > 0)
            .fold((0.0, 0usize), |(s, c), e| (s + total[e], c + 1));
        let fill = if count > 0 { sum / count as f64 } else { 0.0 };
        total
            .iter_mut()
            .zip(&shared)
            .filter(|(_, c)| **c == 0)
            .for_each(|(v, _)| *v = fill);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_similarity_by_hand() {
        // One view, 3 samples, k = 2: each row keeps itself and its nearest other.
        let w = vec![1.0, 0.5, 0.1, 0.5, 1.0, 0.2, 0.1, 0.2, 1.0];
        let got = nemo(&[View::complete(w)], 3, Some(2)).unwrap();
        // Normalised rows: [2/3, 1/3, 0], [1/3, 2/3, 0], [0, 1/6, 5/6]; plus the transpose.
        let expected = [
            4.0 / 3.0,
            2.0 / 3.0,
            0.0,
            2.0 / 3.0,
            4.0 / 3.0,
            1.0 / 6.0,
            0.0,
            1.0 / 6.0,
            5.0 / 3.0,
        ];
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-15, "{got:?}");
        }
    }

    #[test]
    fn pairs_average_over_the_views_that_share_them() {
        // View 0 has samples 0, 1; view 1 has 1, 2: pair (0, 2) is shared by none.
        let a = View::partial(vec![0, 1], vec![1.0, 1.0, 1.0, 1.0]);
        let b = View::partial(vec![1, 2], vec![1.0, 3.0, 3.0, 1.0]);
        let got = nemo(&[a, b], 3, Some(2)).unwrap();
        let at = |i: usize, j: usize| got[i * 3 + j];
        // View 0: every row [1/2, 1/2] → relative similarity 1 everywhere. View 1: rows
        // [1/4, 3/4], [3/4, 1/4] → [[1/2, 3/2], [3/2, 1/2]].
        assert_eq!(at(0, 1), 1.0);
        assert_eq!(at(1, 1), (1.0 + 0.5) / 2.0);
        assert_eq!(at(1, 2), 1.5);
        // Unshared (0, 2): the mean of the shared pairs below the diagonal, (1 + 1.5) / 2.
        assert_eq!(at(0, 2), 1.25);
        assert_eq!(at(2, 0), 1.25);
        assert_eq!(default_neighbours(15), 2, "2.5 rounds to even");
        assert_eq!(default_neighbours(21), 4, "3.5 rounds to even");
        assert!(matches!(
            nemo(&[View::complete(vec![1.0; 4])], 2, Some(3)),
            Err(NetworkError::BadK { k: 3, n: 2 })
        ));
        assert!(matches!(
            nemo(&[View::partial(vec![1, 0], vec![1.0; 4])], 2, None),
            Err(NetworkError::Samples { view: 0, .. })
        ));
    }
}
