//! One view (modality) of the samples: its affinity matrix over the samples it measured.

use rayon::prelude::*;

use crate::error::NetworkError;

/// A view's affinities. Samples missing from a view are left out of its matrix (`samples`
/// lists those present); the methods then combine each pair over the views that have both.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// Global indices (ascending, distinct, < n) of the samples the matrix covers; `None`: all.
    pub samples: Option<Vec<usize>>,
    /// Row-major s x s affinities, s = the number of samples covered; finite and >= 0.
    pub affinity: Vec<f64>,
}

impl View {
    pub fn complete(affinity: Vec<f64>) -> View {
        View {
            samples: None,
            affinity,
        }
    }

    pub fn partial(samples: Vec<usize>, affinity: Vec<f64>) -> View {
        View {
            samples: Some(samples),
            affinity,
        }
    }

    /// How many samples the matrix covers.
    pub fn size(&self, n: usize) -> usize {
        self.samples.as_ref().map_or(n, Vec::len)
    }

    /// The global index of the view's `i`-th sample.
    pub fn global(&self, i: usize) -> usize {
        self.samples.as_ref().map_or(i, |s| s[i])
    }

    /// Checks the sample list and the matrix (`view` names it in errors).
    pub fn validate(&self, view: usize, n: usize) -> Result<(), NetworkError> {
        check_samples(self.samples.as_deref(), view, n)?;
        let s = self.size(n);
        if self.affinity.len() != s * s {
            return Err(NetworkError::Shape {
                view,
                n: s,
                found: self.affinity.len(),
            });
        }
        if let Some((at, &value)) = self
            .affinity
            .iter()
            .enumerate()
            .find(|&(_, &v)| !(v.is_finite() && v >= 0.0))
        {
            return Err(NetworkError::BadValue {
                view,
                row: self.global(at / s),
                col: self.global(at % s),
                value,
            });
        }
        Ok(())
    }

    /// The view's s x s matrix `sub` placed in an n x n one, zero where a sample is missing.
    pub fn expand(&self, sub: Vec<f64>, n: usize) -> Vec<f64> {
        let Some(samples) = &self.samples else {
            return sub;
        };
        let s = samples.len();
        let mut full = vec![0.0; n * n];
        for (i, &gi) in samples.iter().enumerate() {
            let row = &mut full[gi * n..(gi + 1) * n];
            for (j, &gj) in samples.iter().enumerate() {
                row[gj] = sub[i * s + j];
            }
        }
        full
    }
}

/// A view's sample list (None: all n) must be ascending, distinct and below n.
pub(crate) fn check_samples(
    samples: Option<&[usize]>,
    view: usize,
    n: usize,
) -> Result<(), NetworkError> {
    let Some(samples) = samples else {
        return Ok(());
    };
    if let Some(w) = samples.windows(2).find(|w| w[0] >= w[1]) {
        return Err(NetworkError::Samples {
            view,
            problem: format!(
                "sample indices must be ascending and distinct, found {} then {}",
                w[0], w[1]
            ),
        });
    }
    if let Some(&last) = samples.last().filter(|&&last| last >= n) {
        return Err(NetworkError::Samples {
            view,
            problem: format!("sample index {last} is out of range for {n} samples"),
        });
    }
    Ok(())
}

/// Each pair's mean over the views that have both of its samples: `add(view, total)`
/// adds a validated view's contribution into the n x n `total`. Returns the means and how many
/// views share each pair (0: none, the mean left at 0).
pub(crate) fn mean_over_views(
    views: &[View],
    n: usize,
    mut add: impl FnMut(&View, &mut [f64]) -> Result<(), NetworkError>,
) -> Result<(Vec<f64>, Vec<u16>), NetworkError> {
    if views.is_empty() {
        return Err(NetworkError::TooFewViews(0));
    }
    let mut total = vec![0.0; n * n];
    let mut shared = vec![0u16; n * n];
    for (index, view) in views.iter().enumerate() {
        view.validate(index, n)?;
        add(view, &mut total)?;
        let s = view.size(n);
        for i in 0..s {
            let row = &mut shared[view.global(i) * n..(view.global(i) + 1) * n];
            (0..s).for_each(|j| row[view.global(j)] += 1);
        }
    }
    total
        .par_iter_mut()
        .zip(shared.par_iter())
        .for_each(|(v, &c)| {
            if c > 0 {
                *v /= f64::from(c)
            }
        });
    Ok((total, shared))
}
