//! The scalar types ops run in: f32 (training, both backends) and f64 (CPU reference for
//! gradient checks), with the special functions the likelihoods need.

use num_traits::Float;

pub trait Real: Float + Send + Sync + std::fmt::Debug + std::iter::Sum + 'static {
    fn of(x: f64) -> Self;
    fn f64(self) -> f64;

    /// dst[i] = ln(src[i]) for a whole slice (the hot likelihood loops take logarithms of whole
    /// rows). The default is the standard library's; f32 overrides it with a form the compiler
    /// vectorises.
    fn ln_to(src: &[Self], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s.ln();
        }
    }

    /// v[i] = exp(v[i]) for a whole slice (softmax rows); f32 overrides it like `ln_to`.
    fn exp_in_place(values: &mut [Self]) {
        values.iter_mut().for_each(|v| *v = v.exp());
    }
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        f64::from(self)
    }

    /// Cephes' logf (exponent and mantissa split by bits, degree-9 polynomial; within 2 ulp of
    /// the correctly rounded value for normal positive inputs), branch-free so a row of them
    /// runs in SIMD lanes. Zero, negative, subnormal, infinite and NaN inputs are redone with
    /// the standard library afterwards, so the special values stay exact.
    fn ln_to(src: &[f32], dst: &mut [f32]) {
        let mut unusual = false;
        for (d, &x) in dst.iter_mut().zip(src) {
            let bits = x.to_bits();
            let mut e = ((bits >> 23) & 0xff) as i32 - 126;
            let mut m = f32::from_bits((bits & 0x807f_ffff) | 0x3f00_0000); // [0.5, 1)
            let small = m < std::f32::consts::FRAC_1_SQRT_2;
            e -= i32::from(small);
            m = if small { m + m } else { m } - 1.0;
            let z = m * m;
            let mut y = 7.037_683_6e-2f32;
            for c in [
                -1.151_461_1e-1f32,
                1.167_699_9e-1,
                -1.242_014_1e-1,
                1.424_932_3e-1,
                -1.666_805_8e-1,
                2.000_071_5e-1,
                -2.499_999_4e-1,
                3.333_333e-1,
            ] {
                y = fma32(y, m, c);
            }
            let ef = e as f32;
            y = y * m * z - 2.121_944_4e-4 * ef - 0.5 * z;
            *d = m + y + 0.693_359_4 * ef;
            unusual |= !(f32::MIN_POSITIVE..f32::INFINITY).contains(&x);
        }
        if unusual {
            for (d, &x) in dst.iter_mut().zip(src) {
                if !(f32::MIN_POSITIVE..f32::INFINITY).contains(&x) {
                    *d = x.ln();
                }
            }
        }
    }

    fn exp_in_place(values: &mut [f32]) {
        // Chunks keep their inputs on the stack for the redo.
        const CHUNK: usize = 256;
        let mut kept = [0f32; CHUNK];
        for chunk in values.chunks_mut(CHUNK) {
            let kept = &mut kept[..chunk.len()];
            kept.copy_from_slice(chunk);
            exp_f32(kept, chunk);
        }
    }
}

/// Cephes' expf (n = round(x log2 e) by the 1.5·2^23 trick, which needs no SSE4.1 round;
/// x - n ln2 in two parts; degree-5 polynomial; 2^n by exponent bits): within 2 ulp over the
/// normal range, branch-free. Inputs outside [-87.3, 87] (results near or beyond the float
/// range) and NaN are redone with the standard library.
fn exp_f32(src: &[f32], dst: &mut [f32]) {
    const LO: f32 = -87.33;
    const HI: f32 = 88.0;
    const SHIFTER: f32 = 12_582_912.0; // 1.5 · 2^23
    let mut unusual = false;
    for (d, &x) in dst.iter_mut().zip(src) {
        let xc = x.clamp(LO, HI);
        let shifted = xc * std::f32::consts::LOG2_E + SHIFTER;
        let n = shifted - SHIFTER;
        let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let mut y = 1.987_569_1e-4f32;
        for c in [
            1.398_199_9e-3f32,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            y = fma32(y, r, c);
        }
        y = y * r * r + r + 1.0;
        // n ∈ [-126, 127] sits in the low mantissa bits of `shifted` (two's complement): 2^n
        // by its exponent field, in integer lanes (a float-to-int cast would not vectorise).
        let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
        *d = y * scale;
        unusual |= !(LO..=87.0).contains(&x);
    }
    if unusual {
        for (d, &x) in dst.iter_mut().zip(src) {
            if !(LO..=87.0).contains(&x) {
                *d = x.exp();
            }
        }
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
}

/// ln Γ(x) for x > 0: recurrence up to x ≥ 10, then the Stirling series to x^-9 (error
/// ~1e-14 in f64).
/// The CUDA kernels use the same algorithm, so CPU and GPU agree to rounding.
pub fn lgamma<T: Real>(x: T) -> T {
    let mut x = x.f64();
    // ln Γ(x) = ln Γ(x + k) - ln(x (x+1) ... (x+k-1)): one logarithm for the whole shift.
    let mut product = 1.0;
    while x < 10.0 {
        product *= x;
        x += 1.0;
    }
    let shift = -product.ln();
    let inv = 1.0 / x;
    let inv2 = inv * inv;
    let series = inv
        * (1.0 / 12.0
            - inv2
                * (1.0 / 360.0
                    - inv2 * (1.0 / 1260.0 - inv2 * (1.0 / 1680.0 - inv2 * (1.0 / 1188.0)))));
    T::of(shift + (x - 0.5) * x.ln() - x + 0.5 * (2.0 * std::f64::consts::PI).ln() + series)
}

/// ψ(x) = d/dx ln Γ(x) for x > 0: recurrence up to x ≥ 10, then the asymptotic series.
pub fn digamma<T: Real>(x: T) -> T {
    let mut x = x.f64();
    let mut shift = 0.0;
    while x < 10.0 {
        shift -= 1.0 / x;
        x += 1.0;
    }
    let inv2 = 1.0 / (x * x);
    let series = inv2
        * (1.0 / 12.0
            - inv2
                * (1.0 / 120.0
                    - inv2 * (1.0 / 252.0 - inv2 * (1.0 / 240.0 - inv2 * (1.0 / 132.0)))));
    T::of(shift + x.ln() - 0.5 / x - series)
}

/// Counts up to this take the exact finite sums in [`count_gamma_terms`].
pub const SMALL_COUNT: f64 = 32.0;

/// lnΓ(x+θ) − lnΓ(θ) − lnΓ(x+1) and ψ(x+θ) − ψ(θ), the count-dependent terms of the negative
/// binomial. For an integer count n ≤ [`SMALL_COUNT`] (nearly every entry of a count matrix)
/// they are ln(Π_{k<n} (θ+k) / n!) and Σ_{k<n} 1/(θ+k): one logarithm instead of the eight of
/// three lnΓ and two ψ. Exactly 0 at x = 0. The CUDA kernel mirrors this.
pub fn count_gamma_terms(x: f64, theta: f64) -> (f64, f64) {
    match count_gamma_parts(x, theta) {
        CountTerms::Product { ratio, dg } => (ratio.ln(), dg),
        CountTerms::Exact { lg, dg } => (lg, dg),
    }
}

/// [`count_gamma_terms`] before its one logarithm, so a row's logarithms run in SIMD lanes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CountTerms {
    /// lg = ln(ratio).
    Product {
        ratio: f64,
        dg: f64,
    },
    Exact {
        lg: f64,
        dg: f64,
    },
}

pub fn count_gamma_parts(x: f64, theta: f64) -> CountTerms {
    if x == 0.0 {
        return CountTerms::Exact { lg: 0.0, dg: 0.0 };
    }
    if x <= SMALL_COUNT && x.fract() == 0.0 && theta < 1e8 {
        // P(θ) = Π_{k<n} (θ+k) with its derivative P' carried along: ψ terms = P'/P, so the
        // whole count costs two divisions and one logarithm.
        let (mut p, mut dp, mut factorial) = (1.0f64, 0.0f64, 1.0f64);
        for k in 0..x as usize {
            let tk = theta + k as f64;
            dp = dp * tk + p;
            p *= tk;
            factorial *= k as f64 + 1.0;
        }
        return CountTerms::Product {
            ratio: p / factorial,
            dg: dp / p,
        };
    }
    CountTerms::Exact {
        lg: lgamma(x + theta) - lgamma(theta) - lgamma(x + 1.0),
        dg: digamma(x + theta) - digamma(theta),
    }
}

/// a·b + c in one fused instruction (one rounding) where the build target has FMA (x86-64-v3,
/// our default), else as a product and a sum: `mul_add` without hardware FMA is a slow
/// software call.
#[inline(always)]
pub fn mul_add<T: Real>(a: T, b: T, c: T) -> T {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`mul_add`] for f32 (the polynomials of the SIMD logarithm and exponential).
#[inline(always)]
fn fma32(a: f32, b: f32, c: f32) -> f32 {
    mul_add(a, b, c)
}

/// Σ v in a fixed order that vectorises (a left-to-right sum is one long dependency chain of
/// additions).
pub fn lane_sum<T: Real>(v: &[T]) -> T {
    lane_fold(v, T::zero(), |a, x| a + x)
}

/// The largest of `v` (−∞ for none), vectorised: `max` with its NaN rule is a scalar chain. A
/// NaN is not propagated reliably; callers meet it downstream.
pub fn lane_max<T: Real>(v: &[T]) -> T {
    lane_fold(v, T::neg_infinity(), |a, x| if x > a { x } else { a })
}

/// `op` folded over `v` in 16 interleaved lanes (one chain per lane, so the loop runs in SIMD
/// registers), then the lanes combined pairwise: a fixed order whatever the machine.
#[inline(always)]
fn lane_fold<T: Real>(v: &[T], init: T, op: impl Fn(T, T) -> T) -> T {
    const LANES: usize = 16;
    let mut acc = [init; LANES];
    let mut blocks = v.chunks_exact(LANES);
    for block in &mut blocks {
        for (a, &x) in acc.iter_mut().zip(block) {
            *a = op(*a, x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(blocks.remainder()) {
        *a = op(*a, x);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] = op(acc[i], acc[i + width]);
        }
    }
    acc[0]
}

/// log(1 + exp(x)) without overflow.
pub fn softplus<T: Real>(x: T) -> T {
    if x > T::zero() {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

pub fn sigmoid<T: Real>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

#[cfg(test)]
mod ln_tests {
    use super::*;

    #[test]
    fn vectorised_logf_is_within_two_ulp() {
        // Log-spaced over the whole normal range, plus the neighbourhood of 1 (where ln → 0).
        let mut xs: Vec<f32> = (0..200_000)
            .map(|i| 10f64.powf(-37.5 + 75.9 * i as f64 / 200_000.0) as f32)
            .collect();
        xs.extend((0..10_000).map(|i| 0.99 + 0.02 * i as f32 / 10_000.0));
        let mut ys = vec![0f32; xs.len()];
        f32::ln_to(&xs, &mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let exact = f64::from(x).ln();
            let ulp = f64::from(
                f32::from_bits((exact as f32).abs().to_bits() + 1) - (exact as f32).abs(),
            )
            .max(1e-45);
            assert!(
                (f64::from(y) - exact).abs() <= 2.0 * ulp,
                "ln({x}) = {y}, exact {exact}"
            );
        }
        let special = [0.0f32, -1.0, f32::INFINITY, f32::NAN, 1e-40, 1.0];
        let mut out = [0f32; 6];
        f32::ln_to(&special, &mut out);
        assert_eq!(out[0], f32::NEG_INFINITY);
        assert!(out[1].is_nan() && out[3].is_nan());
        assert_eq!(out[2], f32::INFINITY);
        assert_eq!(out[4], 1e-40f32.ln());
        assert_eq!(out[5], 0.0);
    }

    #[test]
    fn vectorised_expf_is_within_two_ulp() {
        let xs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + 174.0 * i as f32 / 200_000.0)
            .collect();
        let mut ys = xs.clone();
        f32::exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let exact = f64::from(x).exp();
            let ulp = f64::from(f32::from_bits((exact as f32).to_bits() + 1) - exact as f32);
            assert!(
                (f64::from(y) - exact).abs() <= 2.0 * ulp,
                "exp({x}) = {y}, exact {exact}"
            );
        }
        let special = [
            f32::NEG_INFINITY,
            -100.0,
            -87.5,
            0.0,
            88.0,
            89.0,
            f32::INFINITY,
            f32::NAN,
        ];
        let mut out = special;
        f32::exp_in_place(&mut out);
        assert_eq!(
            out[..7],
            special[..7].iter().map(|x| x.exp()).collect::<Vec<_>>()[..]
        );
        assert!(out[7].is_nan());
        assert_eq!(out[3], 1.0);
    }
}

#[cfg(test)]
mod count_tests {
    use super::*;

    #[test]
    fn finite_sums_match_the_special_functions() {
        for &theta in &[1e-3, 0.37, 1.0, 7.5, 250.0, 3e4, 2e7] {
            for n in 1..=32 {
                let x = n as f64;
                let (lg, dg) = count_gamma_terms(x, theta);
                let lg_ref = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1.0);
                let dg_ref = digamma(x + theta) - digamma(theta);
                // The reference cancels two lnΓ of size ~θ ln θ: its own error scales with them.
                let tol = 1e-12 + 1e-14 * (lgamma(x + theta).abs() + lgamma(theta).abs());
                assert!(
                    (lg - lg_ref).abs() <= tol,
                    "lg θ={theta} n={n}: {lg} vs {lg_ref}"
                );
                assert!(
                    (dg - dg_ref).abs() <= 1e-11 * (1.0 + dg_ref.abs()),
                    "dg θ={theta} n={n}: {dg} vs {dg_ref}"
                );
            }
        }
        assert_eq!(count_gamma_terms(0.0, 3.0), (0.0, 0.0));
        // n = 1: ln Γ(θ+1) − ln Γ(θ) = ln θ and ψ(θ+1) − ψ(θ) = 1/θ, exactly.
        assert_eq!(count_gamma_terms(1.0, 3e4), (3e4f64.ln(), 1.0 / 3e4));
        // Non-integer and large counts take the general path.
        let (lg, _) = count_gamma_terms(2.5, 3.0);
        assert!((lg - (lgamma(5.5) - lgamma(3.0) - lgamma(3.5))).abs() < 1e-14);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lgamma_matches_known_values() {
        // Γ(1) = Γ(2) = 1, Γ(0.5) = √π, Γ(10) = 9!
        assert!(lgamma(1.0f64).abs() < 1e-13);
        assert!(lgamma(2.0f64).abs() < 1e-13);
        assert!((lgamma(0.5f64) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
        assert!((lgamma(10.0f64) - 362_880f64.ln()).abs() < 1e-12);
        assert!((lgamma(1e-3f64) - 6.907_178_885_383_854).abs() < 1e-10);
    }

    #[test]
    fn digamma_is_the_derivative_of_lgamma() {
        for &x in &[1e-3, 0.3, 1.0, 2.5, 7.0, 150.0] {
            let h = 1e-6 * x;
            let numeric = (lgamma(x + h) - lgamma(x - h)) / (2.0 * h);
            assert!(
                (digamma(x) - numeric).abs() < 1e-6 * (1.0 + numeric.abs()),
                "x={x}: {} vs {numeric}",
                digamma(x)
            );
        }
        // ψ(1) = -γ
        assert!((digamma(1.0f64) + 0.577_215_664_901_532_9).abs() < 1e-13);
    }

    #[test]
    fn lane_folds_match_sequential_ones() {
        for n in [0usize, 1, 15, 16, 17, 2000] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i as f32) * 0.77).sin() * 50.0 - 20.0)
                .collect();
            assert_eq!(
                lane_max(&v),
                v.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                "max of {n}"
            );
            let sum = lane_sum(&v);
            let exact: f64 = v.iter().map(|&x| f64::from(x)).sum();
            assert!(
                (f64::from(sum) - exact).abs() <= 1e-5 * (1.0 + exact.abs()) * n as f64,
                "sum of {n}: {sum} vs {exact}"
            );
        }
    }

    #[test]
    fn softplus_and_sigmoid_are_stable() {
        assert_eq!(softplus(1000.0f64), 1000.0);
        assert!(softplus(-1000.0f64) >= 0.0);
        assert_eq!(sigmoid(-1000.0f64), 0.0);
        assert_eq!(sigmoid(1000.0f64), 1.0);
        assert!((softplus(0.0f64) - 2f64.ln()).abs() < 1e-15);
    }
}
