//! Dropout with a counter-based RNG (Philox4x32-10, Salmon et al. 2011): the keep/drop decision
//! of element i depends only on (seed, stream, i), so CPU and GPU draw the same mask, in any
//! order, with no RNG state to carry between steps.

use rayon::prelude::*;

use crate::real::Real;

pub const CUDA_SOURCE: &str = include_str!("dropout.cu");

pub mod gpu;

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = u64::from(a) * u64::from(b);
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds: four 32-bit words from a 128-bit counter and a 64-bit key.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The uniform in [0, 1) of element `i` of stream `stream` under `seed` (24-bit resolution,
/// exactly representable in f32 on both backends).
pub fn uniform(seed: u64, stream: u64, i: u64) -> f32 {
    uniform4(seed, stream, i / 4)[(i % 4) as usize]
}

/// The uniforms of elements 4q..4q+4: one Philox call yields all four.
fn uniform4(seed: u64, stream: u64, q: u64) -> [f32; 4] {
    let words = philox4x32_10(
        [
            q as u32,
            (q >> 32) as u32,
            stream as u32,
            (stream >> 32) as u32,
        ],
        [seed as u32, (seed >> 32) as u32],
    );
    words.map(|w| (w >> 8) as f32 * (1.0 / 16_777_216.0))
}

/// The standard normal of element `i` of stream `stream` under `seed` (Box-Muller on uniforms
/// 2i and 2i+1): the reparameterisation noise, identical on CPU and GPU up to rounding of
/// log/cos.
pub fn normal(seed: u64, stream: u64, i: u64) -> f32 {
    let u1 = 1.0 - uniform(seed, stream, 2 * i); // in (0, 1]: the log is finite
    let u2 = uniform(seed, stream, 2 * i + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// out_i = normal(seed, stream, i).
pub fn normal_fill<T: Real>(seed: u64, stream: u64, out: &mut [T]) {
    out.par_iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = T::of(f64::from(normal(seed, stream, i as u64))));
}

/// y = x ⊙ mask / (1 - p), mask_i = uniform(seed, stream, i) >= p.
pub fn dropout_forward<T: Real>(x: &[T], p: f32, seed: u64, stream: u64, y: &mut [T]) {
    assert!(
        (0.0..1.0).contains(&p),
        "dropout probability must be in [0, 1)"
    );
    assert_eq!(x.len(), y.len(), "dropout: lengths");
    let scale = T::of(1.0 / (1.0 - f64::from(p)));
    y.par_chunks_mut(4)
        .zip(x.par_chunks(4))
        .enumerate()
        .with_min_len(256)
        .for_each(|(q, (y, x))| {
            for ((y, &x), u) in y.iter_mut().zip(x).zip(uniform4(seed, stream, q as u64)) {
                *y = if u >= p { x * scale } else { T::zero() };
            }
        });
}

/// dx = dy ⊙ mask / (1 - p), regenerating the same mask.
pub fn dropout_backward<T: Real>(dy: &[T], p: f32, seed: u64, stream: u64, dx: &mut [T]) {
    dropout_forward(dy, p, seed, stream, dx);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Random123's known-answer vectors for philox4x32-10.
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn normals_have_unit_moments_and_depend_on_stream() {
        let n = 200_000;
        let mut z = vec![0.0f64; n];
        normal_fill(3, 0, &mut z);
        let mean = z.iter().sum::<f64>() / n as f64;
        let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "mean {mean} var {var}"
        );
        assert!(z.iter().all(|v| v.is_finite()));
        let mut again = vec![0.0f64; n];
        normal_fill(3, 0, &mut again);
        assert_eq!(z, again);
        normal_fill(3, 1, &mut again);
        assert_ne!(z, again);
    }

    #[test]
    fn dropout_rate_scale_and_gradient() {
        let n = 100_000;
        let x = vec![1.0f64; n];
        let mut y = vec![0.0; n];
        dropout_forward(&x, 0.3, 7, 0, &mut y);
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.01, "kept {kept}");
        let scale = 1.0 / (1.0 - f64::from(0.3f32));
        assert!(y.iter().all(|&v| v == 0.0 || (v - scale).abs() < 1e-12));
        // The backward applies the same mask; another stream or seed gives another mask.
        let mut dx = vec![0.0; n];
        dropout_backward(&x, 0.3, 7, 0, &mut dx);
        assert_eq!(dx, y);
        let mut other = vec![0.0; n];
        dropout_forward(&x, 0.3, 7, 1, &mut other);
        assert_ne!(other, y);
        // The mean is preserved in expectation.
        let mean = y.iter().sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.02, "mean {mean}");
    }
}
