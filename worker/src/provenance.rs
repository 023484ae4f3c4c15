//! Which run wrote which output of a store: `uns/tessera_provenance`, one JSON record per
//! element (tool and version, time, data, options, the whole configuration), kept across runs;
//! and the outputs an earlier run left that this one did not rewrite (stale).

use serde_json::{Value, json};
use tessera_data::AnnData;

use crate::fit::FitOptions;
use crate::records::FitError;

/// The `uns` key of the records.
pub const PROVENANCE_KEY: &str = "tessera_provenance";

/// Outputs `tessera train` writes under fixed names: found without a record, they are an
/// earlier run's (stores trained before provenance existed).
fn default_outputs(opts: &FitOptions) -> [String; 3] {
    [
        "layers/tessera_denoised".to_string(),
        format!("obs/{}", opts.prediction_key),
        format!("obsm/{}_probabilities", opts.prediction_key),
    ]
}

/// Records `written` (element names relative to `target`) as this run's in
/// `uns/tessera_provenance`, keeping the records of other elements; returns the elements that
/// an earlier run wrote, this run did not, and are still there.
pub fn record(
    target: &AnnData,
    written: &[String],
    opts: &FitOptions,
) -> Result<Vec<String>, FitError> {
    let previous: Vec<Value> = target
        .uns_strings(PROVENANCE_KEY)?
        .unwrap_or_default()
        .iter()
        .filter_map(|s| serde_json::from_str(s).ok())
        .collect();
    let element = |r: &Value| r["element"].as_str().unwrap_or_default().to_string();
    let mut candidates: Vec<String> = previous.iter().map(element).collect();
    candidates.extend(default_outputs(opts));
    let mut stale = Vec::new();
    for name in candidates {
        if !written.contains(&name) && !stale.contains(&name) && target.has_element(&name)? {
            stale.push(name);
        }
    }
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let run = json!({
        "tool": format!("tessera {}", env!("CARGO_PKG_VERSION")),
        "unix_time": unix_time,
        "data": opts.data,
        "out": opts.out.display().to_string(),
        "modalities": opts.modalities,
        "batch_key": opts.batch_key,
        "label_key": opts.label_key,
        "init_from": opts.init_from,
        "config": opts.config,
    });
    let mut records: Vec<String> = previous
        .iter()
        .filter(|r| !written.contains(&element(r)))
        .map(Value::to_string)
        .collect();
    for name in written {
        let mut entry = run.clone();
        entry["element"] = json!(name);
        records.push(entry.to_string());
    }
    target.write_uns_strings(PROVENANCE_KEY, &records, true)?;
    Ok(stale)
}
