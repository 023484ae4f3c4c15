//! `loss.png`: train loss, validation loss (the minimised objective, KL weighted by the warm-up)
//! and the validation negative ELBO that early stopping watches, per epoch. The loss axis is
//! logarithmic when the values span two decades; otherwise linear, and when the first epochs
//! sit far above the rest they are clipped to the top edge, marked, and the clip is stated.

use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::{Area, FONT, render};
use crate::records::EpochRecord;

const WIDTH: u32 = 900;
const HEIGHT: u32 = 540;
/// Curves with more points than this are drawn as lines only.
const MAX_MARKED_POINTS: usize = 60;

/// A curve: legend name, colour, (epoch, value) points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// How the loss axis is drawn.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scale {
    /// Positive values spanning two decades or more: a log axis, nothing clipped.
    Log { lo: f64, hi: f64 },
    /// A linear axis; the `clipped` values above `hi` are drawn on the top edge, marked.
    Linear { lo: f64, hi: f64, clipped: usize },
}

/// The axis for these (finite) values. A linear axis is clipped at the 95th percentile when the
/// top 5% of values take more than three quarters of the whole range: the first epochs' spike
/// would otherwise flatten every later epoch into one line.
pub(crate) fn scale(values: &[f64]) -> Scale {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
    if min > 0.0 && max / min >= 100.0 {
        return Scale::Log {
            lo: min / 1.25,
            hi: max * 1.25,
        };
    }
    let q95 = sorted[(sorted.len() * 95 / 100).min(sorted.len() - 1)];
    let top = if max - min > 4.0 * (q95 - min) && q95 > min {
        q95
    } else {
        max
    };
    let pad = ((top - min) * 0.05).max(1e-9 * top.abs().max(1.0));
    let hi = top + pad;
    Scale::Linear {
        lo: min - pad,
        hi,
        clipped: values.iter().filter(|&&v| v > hi).count(),
    }
}

/// The curves of `history` into `path`.
pub fn loss_plot(history: &[EpochRecord], path: &Path) -> Result<(), String> {
    let series: Vec<Series<'_>> = vec![
        (
            "train loss",
            RGBColor(31, 119, 180),
            history
                .iter()
                .map(|r| (r.epoch as f64, r.train.loss))
                .collect(),
        ),
        (
            "validation loss",
            RGBColor(255, 127, 14),
            history
                .iter()
                .filter_map(|r| r.validation.map(|v| (r.epoch as f64, v.loss)))
                .collect(),
        ),
        (
            "validation -ELBO",
            RGBColor(44, 160, 44),
            history
                .iter()
                .filter_map(|r| r.validation.map(|v| (r.epoch as f64, v.negative_elbo())))
                .collect(),
        ),
    ];
    let series: Vec<Series<'_>> = series
        .into_iter()
        .map(|(name, colour, points)| {
            let finite: Vec<(f64, f64)> = points.into_iter().filter(|p| p.1.is_finite()).collect();
            (name, colour, finite)
        })
        .filter(|s| !s.2.is_empty())
        .collect();
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .collect();
    if values.is_empty() {
        return Err("no finite loss to plot".into());
    }
    let last_epoch = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let axis = scale(&values);
    render(WIDTH, HEIGHT, path, |root| match axis {
        Scale::Log { lo, hi } => draw_chart(root, last_epoch, (lo..hi).log_scale(), &series, None),
        Scale::Linear { lo, hi, clipped } => {
            draw_chart(root, last_epoch, lo..hi, &series, Some((hi, clipped)))
        }
    })
}

/// The axes, curves and legend; `clip`: the linear axis' top and how many values lie above it.
fn draw_chart<Y>(
    root: &Area<'_>,
    last_epoch: f64,
    y: Y,
    series: &[Series<'_>],
    clip: Option<(f64, usize)>,
) -> Result<(), String>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let log = clip.is_none();
    let area = root
        .titled("Training loss", (FONT, 22))
        .map_err(|e| e.to_string())?;
    let note = clip.filter(|c| c.1 > 0).map(|(top, n)| clip_note(top, n));
    if let Some(note) = &note {
        let style = (FONT, 15).into_font().color(&BLACK);
        area.draw(&Text::new(note.as_str(), (100, 2), style))
            .map_err(|e| e.to_string())?;
    }
    let mut chart = ChartBuilder::on(&area)
        .margin(16)
        // Room under the title for the clipping note.
        .margin_top(if note.is_some() { 28 } else { 8 })
        .x_label_area_size(48)
        .y_label_area_size(84)
        .build_cartesian_2d(0f64..last_epoch, y)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(if log {
            "loss per cell (log scale)"
        } else {
            "loss per cell"
        })
        .axis_desc_style((FONT, 17))
        .label_style((FONT, 14))
        .light_line_style(WHITE)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, colour, points) in series {
        // A marker per epoch where they stay apart (and a lone point shows); past that they
        // bead the line.
        let markers = if points.len() <= MAX_MARKED_POINTS {
            2
        } else {
            0
        };
        let top = clip.map_or(f64::INFINITY, |c| c.0);
        let shown: Vec<(f64, f64)> = points.iter().map(|&(x, v)| (x, v.min(top))).collect();
        let colour = *colour;
        chart
            .draw_series(LineSeries::new(shown, colour.stroke_width(2)).point_size(markers))
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 22, y)], colour.stroke_width(3))
            });
        // Clipped values: an upward triangle on the top edge, in the curve's colour.
        let over = points.iter().filter(|p| p.1 > top);
        chart
            .draw_series(over.map(|&(x, _)| TriangleMarker::new((x, top), 7, colour.filled())))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 15))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// What the picture says about clipped values.
pub(crate) fn clip_note(top: f64, clipped: usize) -> String {
    let points = if clipped == 1 { "value" } else { "values" };
    format!("\u{25b2} {clipped} {points} above {top:.1} drawn on the top edge (axis clipped)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spike_in_the_first_epochs_is_clipped_and_counted() {
        // Epoch 0 far above a slowly falling curve.
        let mut values = vec![5000.0, 2600.0];
        values.extend((0..60).map(|e| 1100.0 - e as f64));
        let Scale::Linear { lo, hi, clipped } = scale(&values) else {
            panic!("expected a linear axis");
        };
        assert_eq!(clipped, 2);
        assert!(lo < 1041.0 && hi < 1200.0 && hi > 1100.0, "{lo} {hi}");
        assert_eq!(
            clip_note(1103.0, 2),
            "\u{25b2} 2 values above 1103.0 drawn on the top edge (axis clipped)"
        );
    }

    #[test]
    fn a_smooth_curve_is_not_clipped() {
        let values: Vec<f64> = (0..50).map(|e| 1000.0 + 300.0 / (1.0 + e as f64)).collect();
        let Scale::Linear { hi, clipped, .. } = scale(&values) else {
            panic!("expected a linear axis");
        };
        assert_eq!(clipped, 0);
        assert!(hi >= 1300.0);
    }

    #[test]
    fn values_spanning_decades_get_a_log_axis() {
        let values: Vec<f64> = (0..40).map(|e| 1e4 / (1.0 + e as f64).powi(2)).collect();
        assert_eq!(
            scale(&values),
            Scale::Log {
                lo: 1e4 / 1600.0 / 1.25,
                hi: 1e4 * 1.25
            }
        );
        // Negative values never get a log axis.
        assert!(matches!(scale(&[-1.0, 500.0, 0.5]), Scale::Linear { .. }));
    }
}
