//! Pictures: `loss.png` (the training curves) and embedding pictures (a 2-D UMAP coloured by obs
//! columns, side by side), drawn with plotters into an RGB buffer and written as PNG. The font
//! (DejaVu Sans) is compiled in: servers and containers often have no fonts at all.

mod embedding;
mod loss;

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::{BitMapBackend, DrawingArea, IntoDrawingArea, WHITE};
use plotters::style::FontStyle;

pub use embedding::{
    DEFAULT_PLOT_CELLS, Panel, PlotReport, PlotRequest, draw_embedding, plot_store,
};
pub use loss::loss_plot;

/// The family every text style names; registered once, from the embedded font.
const FONT: &str = "sans-serif";

pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bytes are DejaVu Sans as shipped; a failure here is a build defect.
        let registered =
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        debug_assert!(registered.is_ok(), "embedded DejaVu Sans did not parse");
    });
}

/// A `width x height` white picture drawn by `draw`, written to `path` through a temporary
/// file, so a failed or interrupted draw never leaves a half-written PNG under the name.
pub(crate) fn render(
    width: u32,
    height: u32,
    path: &Path,
    draw: impl FnOnce(&Area<'_>) -> Result<(), String>,
) -> Result<(), String> {
    register_font();
    let mut pixels = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&root)?;
        root.present().map_err(|e| e.to_string())?;
    }
    let partial = path.with_extension("png.partial");
    write_png(&pixels, width, height, &partial)
        .and_then(|()| std::fs::rename(&partial, path).map_err(|e| e.to_string()))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })
}

fn write_png(pixels: &[u8], width: u32, height: u32, path: &Path) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(pixels).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}
