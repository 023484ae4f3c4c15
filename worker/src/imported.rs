//! A model folder from another tool's trained weights (scvi-tools' SCVI, its tensors renamed to
//! this crate's by the Python package): `config.json`, `model.safetensors` and
//! `reference.safetensors` as `fit` writes them, checked by building the model from them, so an
//! imported model embeds, decodes, saves and maps queries like a trained one.

use std::collections::BTreeSet;
use std::path::Path;

use tessera_kernels::backend::Cpu;

use crate::query::{QueryError, ReferenceModel, model_error};
use crate::reference::{REFERENCE_FILE, Reference};

/// One named tensor: shape and row-major values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Writes `folder`'s model files. `record` is `config.json` (modalities, batch categories,
/// covariates, the `model` and `train` tables), `tensors` every parameter and BatchNorm
/// statistic of that model by name, `reference` its reference cells (the latent may hold no
/// cells yet: [`set_reference_latent`] fills it once the model can embed them). A tensor the
/// model lacks, or one it has that is missing or of another shape, is refused by name.
pub fn write_model(
    folder: &Path,
    record: &serde_json::Value,
    tensors: &[NamedTensor],
    reference: &Reference,
) -> Result<(), QueryError> {
    let config = folder.join("config.json");
    let text =
        serde_json::to_string_pretty(record).map_err(|e| model_error(config.display(), e))?;
    std::fs::write(&config, text).map_err(|e| model_error(config.display(), e))?;
    crate::checkpoint::write_tensors(&folder.join("model.safetensors"), tensors, 0)?;
    write_reference(folder, reference)?;
    let location = folder.display().to_string();
    let model = ReferenceModel::open(&location)?;
    // Building the model copies every tensor it has by name and shape: missing or misshapen
    // ones fail here. What it does not have would be dropped silently: refused instead.
    let built = model.encoder(Cpu)?;
    let known: BTreeSet<&str> = (built.layout.slots().iter())
        .chain(built.state_layout.slots())
        .map(|s| s.name.as_str())
        .collect();
    if let Some((name, _, _)) = tensors.iter().find(|(n, _, _)| !known.contains(n.as_str())) {
        return Err(model_error(
            format!("{location}/model.safetensors"),
            format!("tensor {name:?} is not part of the model its config.json describes"),
        ));
    }
    Ok(())
}

/// Replaces the reference cells of `folder`'s model: their latent means (cells x the model's
/// latent width, row-major) and label codes (one per cell, −1 unlabelled; empty without labels).
pub fn set_reference_latent(
    folder: &Path,
    latent: Vec<f32>,
    labels: Vec<i32>,
) -> Result<(), QueryError> {
    let path = folder.join(REFERENCE_FILE);
    let mut reference = Reference::read(&path).map_err(|e| model_error(path.display(), e))?;
    let cells = latent.len() / reference.n_latent.max(1);
    if latent.len() != cells * reference.n_latent || !(labels.is_empty() || labels.len() == cells) {
        return Err(model_error(
            path.display(),
            format!(
                "{} latent values and {} labels: expected cells x {} values and a label per cell",
                latent.len(),
                labels.len(),
                reference.n_latent
            ),
        ));
    }
    reference.latent = latent;
    reference.labels = labels;
    write_reference(folder, &reference)
}

fn write_reference(folder: &Path, reference: &Reference) -> Result<(), QueryError> {
    let path = folder.join(REFERENCE_FILE);
    reference
        .write(&path)
        .map_err(|e| model_error(path.display(), e))
}
