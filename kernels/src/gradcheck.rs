//! Central finite differences in f64, to hold every op's backward (and every model's loss) to
//! its forward.

/// Deterministic, smooth, sign-changing test inputs: sin((i + seed) · φ⁻¹) for i < n.
pub fn wave(n: usize, seed: f64) -> Vec<f64> {
    (0..n)
        .map(|i| ((i as f64 + seed) * 0.618_034).sin())
        .collect()
}

/// Coordinates to probe in an input of `n`: all of them when small, else ~`k` spread evenly
/// (first and last included).
pub fn spread(n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..k).map(|i| i * (n - 1) / (k - 1)).collect();
    v.dedup();
    v
}

/// Compares `analytic` with the central difference of `f` at `x`, entry by entry:
/// |analytic - numeric| <= tol * (1 + |numeric|). Returns the worst entry on failure.
pub fn check(
    f: impl Fn(&[f64]) -> f64,
    x: &[f64],
    analytic: &[f64],
    eps: f64,
    tol: f64,
) -> Result<(), String> {
    check_at(f, x, analytic, 0..x.len(), eps, tol)
}

/// [`check`] at the coordinates `at` only: for large inputs, where each coordinate costs a
/// full evaluation of `f`.
pub fn check_at(
    f: impl Fn(&[f64]) -> f64,
    x: &[f64],
    analytic: &[f64],
    at: impl IntoIterator<Item = usize>,
    eps: f64,
    tol: f64,
) -> Result<(), String> {
    assert_eq!(
        x.len(),
        analytic.len(),
        "one analytic gradient entry per input"
    );
    let mut worst: Option<(usize, f64, f64, f64)> = None;
    let mut probe = x.to_vec();
    for i in at {
        let h = eps * (1.0 + x[i].abs());
        probe[i] = x[i] + h;
        let up = f(&probe);
        probe[i] = x[i] - h;
        let down = f(&probe);
        probe[i] = x[i];
        let numeric = (up - down) / (2.0 * h);
        let err = (analytic[i] - numeric).abs() / (1.0 + numeric.abs());
        if err > tol && worst.is_none_or(|(_, e, _, _)| err > e) {
            worst = Some((i, err, analytic[i], numeric));
        }
    }
    match worst {
        None => Ok(()),
        Some((i, err, a, n)) => Err(format!(
            "entry {i}: analytic {a:.9e} vs numeric {n:.9e} (relative error {err:.2e} > {tol:.0e})"
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn catches_a_wrong_gradient() {
        let f = |x: &[f64]| x[0] * x[0] + 3.0 * x[1];
        assert!(super::check(f, &[2.0, 1.0], &[4.0, 3.0], 1e-6, 1e-7).is_ok());
        let err = super::check(f, &[2.0, 1.0], &[4.0, 3.1], 1e-6, 1e-7).unwrap_err();
        assert!(err.contains("entry 1"), "{err}");
    }
}
