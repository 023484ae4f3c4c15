//! Kernel averaging: the unweighted mean of the views' kernels, the plainest multiple-kernel
//! combination (a baseline next to SNF and NEMO). Each pair is averaged over the views that
//! have both samples; a pair no view shares is 0.

use crate::error::NetworkError;
use crate::view::{View, mean_over_views};

pub fn kernel_average(views: &[View], n: usize) -> Result<Vec<f64>, NetworkError> {
    let (mean, _) = mean_over_views(views, n, |view, total| {
        let s = view.size(n);
        for (i, row) in view.affinity.chunks(s.max(1)).enumerate() {
            let out = &mut total[view.global(i) * n..(view.global(i) + 1) * n];
            row.iter()
                .enumerate()
                .for_each(|(j, &v)| out[view.global(j)] += v);
        }
        Ok(())
    })?;
    Ok(mean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_average_over_the_views_that_have_them() {
        // View 0 covers samples 0, 1, 2; view 1 covers 1, 2.
        let a = View::complete(vec![1.0, 0.2, 0.4, 0.2, 1.0, 0.6, 0.4, 0.6, 1.0]);
        let b = View::partial(vec![1, 2], vec![0.8, 0.0, 0.0, 0.8]);
        let k = kernel_average(&[a, b], 3).unwrap();
        let at = |i: usize, j: usize| k[i * 3 + j];
        assert_eq!(at(0, 1), 0.2, "(0, 1) only in view 0");
        assert_eq!(at(1, 1), 0.9);
        assert_eq!(at(1, 2), 0.3);
        assert!(matches!(
            kernel_average(&[], 3),
            Err(NetworkError::TooFewViews(0))
        ));
    }
}
