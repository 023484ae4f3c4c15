//! `loss.png`: the training curves (train and validation loss, and the validation negative ELBO
//! that early stopping watches) drawn into an RGB buffer and saved as PNG. A few primitives
//! (lines, an 8x8 bitmap font) instead of a plotting stack that needs system fonts.

use std::io::BufWriter;
use std::path::Path;

use font8x8::legacy::BASIC_LEGACY;

use crate::records::EpochRecord;

const WIDTH: usize = 900;
const HEIGHT: usize = 520;
const LEFT: usize = 90;
const RIGHT: usize = 30;
const TOP: usize = 40;
const BOTTOM: usize = 60;

type Rgb = [u8; 3];
/// A curve: legend name, colour, (epoch, value) points.
type Series<'a> = (&'a str, Rgb, Vec<(f64, f64)>);
const BLACK: Rgb = [0, 0, 0];
const GREY: Rgb = [215, 215, 215];

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            pixels: vec![255; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let p = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[p..p + 3].copy_from_slice(&c);
        }
    }

    /// A line `width` pixels thick (Bresenham, thickened with a square brush).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, width: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for ox in 0..width {
                for oy in 0..width {
                    self.set(x + ox - width / 2, y + oy - width / 2, c);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// ASCII text with its top-left corner at (x, y), each font pixel `scale` pixels wide.
    fn text(&mut self, x: i64, y: i64, s: &str, c: Rgb, scale: i64) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = BASIC_LEGACY[(ch as usize).min(127)];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        for (ox, oy) in (0..scale).flat_map(|a| (0..scale).map(move |b| (a, b))) {
                            self.set(
                                x + (i as i64 * 8 + col) * scale + ox,
                                y + row as i64 * scale + oy,
                                c,
                            );
                        }
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> Result<(), String> {
        let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
        let mut encoder = png::Encoder::new(BufWriter::new(file), WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
        writer
            .write_image_data(&self.pixels)
            .map_err(|e| e.to_string())
    }
}

/// About five round tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo).max(1e-12) / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

fn label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.decimals$}")
}

/// The curves of `history` into `path`. Series: train loss, validation loss (the minimised
/// objective, KL weighted by the warm-up) and validation negative ELBO.
pub fn loss_plot(history: &[EpochRecord], path: &Path) -> Result<(), String> {
    let series: Vec<Series<'_>> = vec![
        (
            "train loss",
            [31, 119, 180],
            history
                .iter()
                .map(|r| (r.epoch as f64, r.train.loss))
                .collect(),
        ),
        (
            "validation loss",
            [255, 127, 14],
            history
                .iter()
                .filter_map(|r| r.validation.map(|v| (r.epoch as f64, v.loss)))
                .collect(),
        ),
        (
            "validation -ELBO",
            [44, 160, 44],
            history
                .iter()
                .filter_map(|r| r.validation.map(|v| (r.epoch as f64, v.negative_elbo())))
                .collect(),
        ),
    ];
    let points = || series.iter().flat_map(|s| s.2.iter());
    let finite: Vec<(f64, f64)> = points().copied().filter(|p| p.1.is_finite()).collect();
    if finite.is_empty() {
        return Err("no finite loss to plot".into());
    }
    let (x_lo, x_hi) = (0.0, finite.iter().map(|p| p.0).fold(1.0, f64::max));
    // The first epochs sit far above the rest; the axis starts at the 5th-percentile-high
    // region so the later curves stay readable, and clipped points sit on the top edge.
    let mut ys: Vec<f64> = finite.iter().map(|p| p.1).collect();
    ys.sort_by(f64::total_cmp);
    let y_lo = ys[0];
    let y_hi = ys[(ys.len() * 95 / 100).min(ys.len() - 1)].max(y_lo + 1e-9);
    let pad = (y_hi - y_lo) * 0.05;
    let (y_lo, y_hi) = (y_lo - pad, y_hi + pad);
    let (plot_w, plot_h) = (
        (WIDTH - LEFT - RIGHT) as f64,
        (HEIGHT - TOP - BOTTOM) as f64,
    );
    let px = |x: f64| (LEFT as f64 + (x - x_lo) / (x_hi - x_lo) * plot_w).round() as i64;
    let py = |y: f64| {
        (TOP as f64 + (1.0 - (y.clamp(y_lo, y_hi) - y_lo) / (y_hi - y_lo)) * plot_h).round() as i64
    };

    let mut c = Canvas::new();
    let y_ticks = ticks(y_lo, y_hi);
    let y_step = y_ticks
        .get(1)
        .zip(y_ticks.first())
        .map_or(1.0, |(b, a)| b - a);
    for &t in &y_ticks {
        c.line(
            (LEFT as i64, py(t)),
            ((WIDTH - RIGHT) as i64, py(t)),
            GREY,
            1,
        );
        let text = label(t, y_step);
        c.text(
            LEFT as i64 - 8 - 8 * text.len() as i64,
            py(t) - 4,
            &text,
            BLACK,
            1,
        );
    }
    for &t in &ticks(x_lo, x_hi) {
        c.line(
            (px(t), (HEIGHT - BOTTOM) as i64),
            (px(t), (HEIGHT - BOTTOM + 5) as i64),
            BLACK,
            1,
        );
        let text = label(t, 1.0);
        c.text(
            px(t) - 4 * text.len() as i64,
            (HEIGHT - BOTTOM + 10) as i64,
            &text,
            BLACK,
            1,
        );
    }
    c.line(
        (LEFT as i64, TOP as i64),
        (LEFT as i64, (HEIGHT - BOTTOM) as i64),
        BLACK,
        1,
    );
    c.line(
        (LEFT as i64, (HEIGHT - BOTTOM) as i64),
        ((WIDTH - RIGHT) as i64, (HEIGHT - BOTTOM) as i64),
        BLACK,
        1,
    );
    c.text(
        (LEFT + (WIDTH - LEFT - RIGHT) / 2 - 20) as i64,
        (HEIGHT - 25) as i64,
        "epoch",
        BLACK,
        1,
    );
    c.text(LEFT as i64, 12, "loss per cell", BLACK, 2);
    for (i, (name, colour, pts)) in series.iter().enumerate() {
        for w in pts.windows(2) {
            c.line(
                (px(w[0].0), py(w[0].1)),
                (px(w[1].0), py(w[1].1)),
                *colour,
                2,
            );
        }
        if let [only] = pts.as_slice() {
            c.line(
                (px(only.0) - 3, py(only.1)),
                (px(only.0) + 3, py(only.1)),
                *colour,
                3,
            );
        }
        let (lx, ly) = ((WIDTH - RIGHT - 190) as i64, (TOP + 12 + 16 * i) as i64);
        c.line((lx, ly + 4), (lx + 24, ly + 4), *colour, 3);
        c.text(lx + 32, ly, name, BLACK, 1);
    }
    c.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ticks() {
        assert_eq!(ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(1032.0, 1101.0), vec![1040.0, 1060.0, 1080.0, 1100.0]);
        assert_eq!(label(0.25, 0.05), "0.25");
        assert_eq!(label(1040.0, 20.0), "1040");
    }
}
