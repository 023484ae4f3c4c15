//! `tessera inspect`: the truth about a store, as a table or JSON.

use anyhow::{Context, Result};
use tessera_data::inspect::StoreSummary;

/// Categories shown per column in the table (JSON has all).
const SHOWN_CATEGORIES: usize = 12;

pub fn run(store: &str, json: bool) -> Result<()> {
    let summary = tessera_data::inspect(store).with_context(|| format!("inspecting {store}"))?;
    if json {
        say!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        say_raw!("{}", table(&summary));
    }
    Ok(())
}

fn shape(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join("x")
}

pub fn table(s: &StoreSummary) -> String {
    let mut out = format!(
        "{}\n  {} (Zarr v{}), {} cells, {} modalit{}\n",
        s.location,
        s.kind,
        s.zarr_format,
        s.n_obs,
        s.modalities.len(),
        if s.modalities.len() == 1 { "y" } else { "ies" }
    );
    for m in &s.modalities {
        let path = if m.path.is_empty() {
            "/".to_string()
        } else {
            m.path.clone()
        };
        out += &format!(
            "\nmodality {} ({path}): {} cells x {} features\n",
            m.name, m.n_obs, m.n_vars
        );
        out += &format!(
            "  {:<16} {:<6} {:<8} {:>14} {:>12} {:>8}  {:<12} {}\n",
            "matrix", "format", "dtype", "shape", "nnz", "density", "chunks", "shards"
        );
        for x in &m.matrices {
            out += &format!(
                "  {:<16} {:<6} {:<8} {:>14} {:>12} {:>8.4}  {:<12} {}\n",
                x.element,
                format!("{:?}", x.format).to_lowercase(),
                x.dtype,
                format!("{}x{}", x.shape.0, x.shape.1),
                x.nnz,
                x.density,
                shape(&x.chunks),
                x.shards.as_deref().map(shape).unwrap_or_else(|| "-".into())
            );
        }
        for o in &m.obsm {
            out += &format!("  obsm/{}: {} columns\n", o.key, o.columns);
        }
    }
    if !s.global_obsm.is_empty() {
        out += &format!("\nglobal obsm: {}\n", s.global_obsm.join(", "));
    }
    out += "\nobs columns:\n";
    for c in &s.obs {
        out += &format!("  {:<16} {:<12} missing {:>6}", c.name, c.kind, c.missing);
        if let Some(counts) = &c.counts {
            let shown: Vec<String> = counts
                .iter()
                .take(SHOWN_CATEGORIES)
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            let more = counts.len().saturating_sub(SHOWN_CATEGORIES);
            out += &format!(
                "  {}{}",
                shown.join(" "),
                if more > 0 {
                    format!(" (+{more} more)")
                } else {
                    String::new()
                }
            );
        }
        out += "\n";
    }
    out
}
