//! Embedding pictures: a 2-D UMAP of an `obsm` embedding (`tessera_metrics::umap`), one panel
//! per obs column (cell type, batch...) side by side, coloured by category with scanpy's
//! palette, points drawn in a seeded random order so no category hides beneath another.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;
use tessera_metrics::umap::{UmapOptions, umap};

use super::{Area, FONT, render};
use crate::eval::{
    DEFAULT_BATCH_KEY, DEFAULT_LABEL_KEY, Embedded, EvalError, categories, subsample,
};

const PANEL_WIDTH: u32 = 660;
const HEIGHT: u32 = 560;
/// Pixels of a panel left for its legend.
const LEGEND_WIDTH: u32 = 210;
const LEGEND_ROW: i32 = 18;
/// Cells with a missing value: drawn first, in light grey (scanpy's NA colour).
const MISSING: RGBColor = RGBColor(211, 211, 211);
/// scanpy's `default_20` palette (vega's category20, reordered).
const PALETTE_20: [u32; 20] = [
    0x1f77b4, 0xff7f0e, 0x279e68, 0xd62728, 0xaa40fc, 0x8c564b, 0xe377c2, 0xb5bd61, 0x17becf,
    0xaec7e8, 0xffbb78, 0x98df8a, 0xff9896, 0xc5b0d5, 0xc49c94, 0xf7b6d2, 0xdbdb8d, 0x9edae5,
    0xad494a, 0x8c6d31,
];
/// Cells laid out by default: exact neighbours cost O(n²d) and a picture shows no more.
pub const DEFAULT_PLOT_CELLS: usize = 50_000;

/// One panel: an obs column's codes per drawn cell (-1 = missing) and its category names.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub codes: Vec<i32>,
    pub categories: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct PlotRequest {
    pub data: String,
    /// For MuData: the modality whose obsm/obs to read (default: as `tessera eval` finds it).
    pub modality: Option<String>,
    pub embedding_key: String,
    /// obs columns, one panel each; empty: `cell_type` and `batch`, where present.
    pub color: Vec<String>,
    /// Seeded uniform subsample above this many cells (`None`: every cell).
    pub max_cells: Option<usize>,
    pub seed: u64,
    pub out: PathBuf,
    /// Also store the 2-D layout of every cell as `obsm/<key>` (scanpy reads `X_umap`).
    pub layout_key: Option<String>,
    /// Replace an existing picture at `out`, or layout at `obsm/<layout_key>`.
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlotReport {
    pub path: PathBuf,
    /// The embedding's element path in the store.
    pub embedding: String,
    pub color: Vec<String>,
    pub n_obs: usize,
    pub n_drawn: usize,
    /// Where the layout was stored, if asked.
    pub layout_element: Option<String>,
    pub seconds: f64,
}

/// Reads the embedding and obs columns, lays the cells out and draws the panels.
pub fn plot_store(req: &PlotRequest) -> Result<PlotReport, EvalError> {
    let started = std::time::Instant::now();
    let output_error = |reason: String| EvalError::Output {
        path: req.out.display().to_string(),
        reason,
    };
    if !req.overwrite && req.out.exists() {
        return Err(output_error(
            "exists; pass --overwrite to replace it".to_string(),
        ));
    }
    let source = Embedded::open(&req.data, req.modality.as_deref(), &req.embedding_key)?;
    let color = colour_keys(&source, req)?;
    let embedding = source.element.clone();
    let (x, d) = source.adata.obsm(&req.embedding_key)?;
    let n_obs = source.adata.n_obs() as usize;
    let cells = subsample(
        (0..n_obs).collect(),
        req.max_cells.unwrap_or(n_obs),
        req.seed,
    );
    let layout_element = check_layout_key(&source, req, cells.len() < n_obs)?;
    let panels = panels(&source, &color, &cells, &req.data)?;
    let xs: Vec<f32> = cells
        .iter()
        .flat_map(|&c| x[c * d..(c + 1) * d].iter().copied())
        .collect();
    let options = UmapOptions {
        seed: req.seed,
        ..UmapOptions::default()
    };
    let layout = umap(&xs, cells.len(), d, &options).map_err(|source| EvalError::Metrics {
        element: format!("{}: {embedding}", req.data),
        source,
    })?;
    let subtitle = if cells.len() < n_obs {
        format!("UMAP of {embedding}, {} of {n_obs} cells", cells.len())
    } else {
        format!("UMAP of {embedding}, {n_obs} cells")
    };
    draw_embedding(&layout, &panels, &subtitle, req.seed, &req.out).map_err(output_error)?;
    if let Some(key) = &req.layout_key {
        let flat: Vec<f32> = layout.iter().flatten().copied().collect();
        source.adata.write_obsm(key, &flat, 2, req.overwrite)?;
    }
    Ok(PlotReport {
        path: req.out.clone(),
        embedding,
        color,
        n_obs,
        n_drawn: cells.len(),
        layout_element,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One panel per obs column in `color`: its codes at `cells`.
fn panels(
    source: &Embedded,
    color: &[String],
    cells: &[usize],
    store: &str,
) -> Result<Vec<Panel>, EvalError> {
    color
        .iter()
        .map(|key| {
            let (codes, names) = categories(source.obs_of(key), key, store)?;
            Ok(Panel {
                title: key.clone(),
                codes: cells.iter().map(|&c| codes[c]).collect(),
                categories: names,
            })
        })
        .collect()
}

/// The element the layout will be stored as, refused up front where it cannot be: a
/// subsample's layout has too few rows, and an existing element is kept unless replaced on
/// purpose.
fn check_layout_key(
    source: &Embedded,
    req: &PlotRequest,
    subsampled: bool,
) -> Result<Option<String>, EvalError> {
    let Some(key) = &req.layout_key else {
        return Ok(None);
    };
    let element = format!("obsm/{key}");
    let refuse = |reason: String| EvalError::Input {
        store: req.data.clone(),
        reason: format!("{}: {reason}", source.adata.element(&element)),
    };
    if subsampled {
        return Err(refuse(
            "a subsample's layout cannot be stored per cell; lay out every cell \
             (--max-cells 0) to store it"
                .to_string(),
        ));
    }
    if !req.overwrite && source.adata.has_element(&element)? {
        return Err(refuse("exists; pass --overwrite to replace it".to_string()));
    }
    Ok(Some(source.adata.element(&element)))
}

/// The requested columns, each checked present; by default `cell_type` and `batch` where
/// present.
fn colour_keys(source: &Embedded, req: &PlotRequest) -> Result<Vec<String>, EvalError> {
    let input_error = |reason: String| EvalError::Input {
        store: req.data.clone(),
        reason,
    };
    if req.color.is_empty() {
        let found: Vec<String> = [DEFAULT_LABEL_KEY, DEFAULT_BATCH_KEY]
            .into_iter()
            .filter(|k| source.has(k))
            .map(str::to_string)
            .collect();
        if found.is_empty() {
            return Err(input_error(format!(
                "{}: no {DEFAULT_LABEL_KEY:?} or {DEFAULT_BATCH_KEY:?} column to colour by; \
                 name obs columns with --color",
                source.adata.element("obs")
            )));
        }
        return Ok(found);
    }
    match req.color.iter().find(|k| !source.has(k)) {
        Some(missing) => Err(input_error(format!(
            "{}: no obs column {missing:?} to colour by",
            source.adata.element("obs")
        ))),
        None => Ok(req.color.clone()),
    }
}

/// The colour of category `code` of `n`: scanpy's 20 for up to 20, else hues spread by the
/// golden angle, in three lightness bands.
fn colour(code: usize, n: usize) -> RGBColor {
    if n <= PALETTE_20.len() {
        let c = PALETTE_20[code];
        return RGBColor((c >> 16) as u8, (c >> 8) as u8, c as u8);
    }
    let hue = (code as f64 * 137.507_764) % 360.0;
    let lightness = [0.45, 0.6, 0.35][code % 3];
    let rgb = HSLColor(hue / 360.0, 0.65, lightness)
        .to_backend_color()
        .rgb;
    RGBColor(rgb.0, rgb.1, rgb.2)
}

/// Draws one panel per entry of `panels` side by side into `path`.
pub fn draw_embedding(
    layout: &[[f32; 2]],
    panels: &[Panel],
    subtitle: &str,
    seed: u64,
    path: &Path,
) -> Result<(), String> {
    if let Some(p) = panels.iter().find(|p| p.codes.len() != layout.len()) {
        return Err(format!(
            "panel {:?} has {} cells, the layout {}",
            p.title,
            p.codes.len(),
            layout.len()
        ));
    }
    let mut order: Vec<usize> = (0..layout.len()).collect();
    order.shuffle(&mut Xoshiro256PlusPlus::seed_from_u64(seed));
    let width = PANEL_WIDTH * panels.len().max(1) as u32;
    render(width, HEIGHT, path, |root| {
        let titled = root
            .titled(subtitle, (FONT, 18))
            .map_err(|e| e.to_string())?;
        for (area, panel) in titled
            .split_evenly((1, panels.len().max(1)))
            .iter()
            .zip(panels)
        {
            draw_panel(area, layout, &order, panel)?;
        }
        Ok(())
    })
}

fn draw_panel(
    area: &Area<'_>,
    layout: &[[f32; 2]],
    order: &[usize],
    panel: &Panel,
) -> Result<(), String> {
    let (plot, legend) = area.split_horizontally(PANEL_WIDTH - LEGEND_WIDTH);
    let range = |axis: usize| {
        let (lo, hi) = layout.iter().fold((f32::MAX, f32::MIN), |(lo, hi), p| {
            (lo.min(p[axis]), hi.max(p[axis]))
        });
        let pad = ((hi - lo) * 0.03).max(1e-3);
        (lo - pad)..(hi + pad)
    };
    let mut chart = ChartBuilder::on(&plot)
        .caption(&panel.title, (FONT, 20))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(28)
        .build_cartesian_2d(range(0), range(1))
        .map_err(|e| e.to_string())?;
    // UMAP coordinates carry no units: axis names only, as scanpy draws them.
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc("UMAP1")
        .y_desc("UMAP2")
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(|e| e.to_string())?;
    let n = panel.categories.len();
    let radius = (30_000.0 / layout.len().max(1) as f64)
        .sqrt()
        .clamp(1.0, 4.0) as i32;
    let missing_first = order
        .iter()
        .filter(|&&c| panel.codes[c] < 0)
        .chain(order.iter().filter(|&&c| panel.codes[c] >= 0));
    chart
        .draw_series(missing_first.map(|&c| {
            let code = panel.codes[c];
            let fill = if code < 0 || code as usize >= n {
                MISSING
            } else {
                colour(code as usize, n)
            };
            Circle::new((layout[c][0], layout[c][1]), radius, fill.filled())
        }))
        .map_err(|e| e.to_string())?;
    draw_legend(&legend, panel)
}

/// Category names with their colours, most frequent first when not all fit.
fn draw_legend(area: &Area<'_>, panel: &Panel) -> Result<(), String> {
    let n = panel.categories.len();
    let mut counts = vec![0usize; n];
    for &c in panel.codes.iter().filter(|&&c| c >= 0 && (c as usize) < n) {
        counts[c as usize] += 1;
    }
    let missing = panel
        .codes
        .iter()
        .filter(|&&c| c < 0 || c as usize >= n)
        .count();
    let (_, height) = area.dim_in_pixel();
    let rows = ((height as i32 - 60) / LEGEND_ROW).max(2) as usize;
    let mut shown: Vec<usize> = (0..n).filter(|&c| counts[c] > 0).collect();
    let present = shown.len();
    if present >= rows {
        // One row goes to the "+ N more" line.
        shown.sort_by_key(|&c| std::cmp::Reverse(counts[c]));
        shown.truncate(rows - 2);
        shown.sort_unstable();
    }
    let hidden = present - shown.len();
    let mut entries: Vec<(String, RGBColor)> = shown
        .iter()
        .map(|&c| (panel.categories[c].clone(), colour(c, n)))
        .collect();
    if missing > 0 {
        entries.push(("NA".to_string(), MISSING));
    }
    let text = (FONT, 14).into_font().color(&BLACK);
    for (row, (name, fill)) in entries.iter().enumerate() {
        let y = 48 + row as i32 * LEGEND_ROW;
        area.draw(&Circle::new((10, y), 5, fill.filled()))
            .map_err(|e| e.to_string())?;
        area.draw(&Text::new(shorten(name, 26), (22, y - 8), text.clone()))
            .map_err(|e| e.to_string())?;
    }
    if hidden > 0 {
        let y = 48 + entries.len() as i32 * LEGEND_ROW;
        let more = format!("+ {hidden} more");
        area.draw(&Text::new(more, (22, y - 8), text))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// At most `max` characters, an ellipsis marking a cut.
fn shorten(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        return name.to_string();
    }
    name.chars().take(max - 1).chain(['…']).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_is_scanpys_then_distinct_hues() {
        assert_eq!(colour(0, 12), RGBColor(0x1f, 0x77, 0xb4));
        assert_eq!(colour(2, 20), RGBColor(0x27, 0x9e, 0x68));
        let many: Vec<RGBColor> = (0..40).map(|c| colour(c, 40)).collect();
        for (i, a) in many.iter().enumerate() {
            for b in &many[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn long_names_are_cut_with_a_mark() {
        assert_eq!(shorten("B cell", 26), "B cell");
        assert_eq!(shorten("abcdefghij", 5), "abcd…");
    }
}
