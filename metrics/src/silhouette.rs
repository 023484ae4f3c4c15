//! Silhouette widths (scIB's ASW): per cell s = (b − a) / max(a, b), a the mean distance to the
//! other cells of its group, b the smallest mean distance to another group; 0 for a group of one
//! cell, a single group or coincident points (scib-metrics' `nan_to_num`).

use crate::distance::{Columns, scan};
use crate::groups::Groups;

/// One cell's silhouette from its distances to all cells in `groups.order` order.
pub fn silhouette_from_row(row: &[f64], own: usize, groups: &Groups) -> f64 {
    let mut a = f64::NAN;
    let mut b = f64::INFINITY;
    for (g, r) in groups.ranges.iter().enumerate() {
        let sum: f64 = row[r.clone()].iter().sum();
        if g == own {
            a = sum / (r.len() as f64 - 1.0);
        } else {
            b = b.min(sum / r.len() as f64);
        }
    }
    let s = (b - a) / a.max(b);
    if s.is_finite() { s } else { 0.0 }
}

/// Silhouette of each of `cells` (rows of the row-major `x`, `d` columns) with respect to
/// `codes`, returned in the order of `cells`.
pub fn silhouette_samples(x: &[f32], d: usize, codes: &[u32], cells: &[usize]) -> Vec<f64> {
    let local: Vec<u32> = cells.iter().map(|&c| codes[c]).collect();
    let groups = Groups::new(&local, 0..cells.len());
    let sorted: Vec<usize> = groups.order.iter().map(|&p| cells[p]).collect();
    let columns = Columns::subset(x, d, &sorted);
    let by_position = scan(&columns, |p, row| {
        silhouette_from_row(row, groups.group_of[p], &groups)
    });
    let mut out = vec![0.0; cells.len()];
    for (p, &local_index) in groups.order.iter().enumerate() {
        out[local_index] = by_position[p];
    }
    out
}

/// Cell-type ASW rescaled to [0, 1]: (mean silhouette + 1) / 2.
pub fn silhouette_label(samples: &[f64]) -> f64 {
    (mean(samples) + 1.0) / 2.0
}

/// Batch ASW (scIB): within each label, 1 − |silhouette w.r.t. batch|, averaged per label and
/// then over labels. Labels seen in one batch only, or with every cell in its own batch, are
/// skipped; None when every label is.
pub fn silhouette_batch(x: &[f32], d: usize, labels: &[u32], batches: &[u32]) -> Option<f64> {
    let by_label = Groups::new(labels, 0..labels.len());
    let mut per_label = Vec::new();
    for r in &by_label.ranges {
        let cells = &by_label.order[r.clone()];
        let n_batches = Groups::new(batches, cells.iter().copied()).len();
        if n_batches == 1 || n_batches == cells.len() {
            continue;
        }
        let s = silhouette_samples(x, d, batches, cells);
        per_label.push(s.iter().map(|v| 1.0 - v.abs()).sum::<f64>() / s.len() as f64);
    }
    (!per_label.is_empty()).then(|| mean(&per_label))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_tight_clusters_have_silhouette_near_one() {
        // Cells 0,1 at x≈0 and 2,3 at x≈10.
        let x = [0.0f32, 1.0, 10.0, 11.0];
        let s = silhouette_samples(&x, 1, &[0, 0, 1, 1], &[0, 1, 2, 3]);
        // Cell 0: a = 1, b = (10 + 11) / 2 = 10.5 → s = 9.5 / 10.5.
        assert!((s[0] - 9.5 / 10.5).abs() < 1e-12);
        // Cell 1: a = 1, b = (9 + 10) / 2 = 9.5 → s = 8.5 / 9.5.
        assert!((s[1] - 8.5 / 9.5).abs() < 1e-12);
        assert!((silhouette_label(&s) - (1.0 + s.iter().sum::<f64>() / 4.0) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn singletons_and_a_single_group_score_zero() {
        let x = [0.0f32, 1.0, 5.0];
        assert_eq!(silhouette_samples(&x, 1, &[0, 0, 1], &[0, 1, 2])[2], 0.0);
        assert_eq!(
            silhouette_samples(&x, 1, &[3, 3, 3], &[0, 1, 2]),
            vec![0.0; 3]
        );
    }

    #[test]
    fn batch_asw_skips_labels_in_one_batch() {
        // Label 0 in batches 0 and 1, perfectly mixed; label 1 only in batch 0 (skipped).
        let x = [0.0f32, 0.0, 1.0, 1.0, 50.0, 51.0];
        let labels = [0, 0, 0, 0, 1, 1];
        let batches = [0, 1, 0, 1, 0, 0];
        let s = silhouette_samples(&x, 1, &batches, &[0, 1, 2, 3]);
        let expected = s.iter().map(|v| 1.0 - v.abs()).sum::<f64>() / 4.0;
        assert_eq!(silhouette_batch(&x, 1, &labels, &batches), Some(expected));
        assert_eq!(silhouette_batch(&x, 1, &[0; 6], &[0; 6]), None);
    }
}
