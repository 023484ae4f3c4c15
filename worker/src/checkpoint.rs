//! Resumable checkpoints of a `fit` run in `<out>/checkpoint/`: `model.safetensors` (parameters
//! and BatchNorm statistics by name), `optimizer.safetensors` (Adam's moments) and `state.json`
//! (epochs done, step, schedule and early-stopping state, history, the resolved run). A save
//! writes a new folder beside the last one (`state.json` last) and switches it in by renames, so
//! a save cut short at any point leaves a whole checkpoint to resume from; the step is recorded
//! in all three files, so files of different saves are refused rather than half-loaded.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::TensorView;
use serde::{Deserialize, Serialize};
use tessera_kernels::backend::{Backend, In};
use tessera_kernels::params::Layout;
use tessera_models::{Plateau, Trainer};

use crate::parallel::Sums;
use crate::records::{EpochRecord, FitError};

/// Everything besides tensors that a resumed run needs to continue bit for bit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitState {
    pub epochs_done: usize,
    pub step: u64,
    pub plateau: Plateau,
    /// Early stopping: lowest monitored value and epochs since.
    pub best: f64,
    pub since_best: usize,
    pub n_train: u64,
    pub history: Vec<EpochRecord>,
    /// The resolved run (data, keys, shapes, configuration) the checkpoint belongs to.
    pub run: serde_json::Value,
    /// Set when the run stopped within epoch `epochs_done` (SIGTERM): how far it got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) within_epoch: Option<WithinEpoch>,
}

/// How far into an epoch a checkpoint was taken.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WithinEpoch {
    /// Steps of the epoch done (each one batch of every part).
    pub steps: u64,
    /// The epoch's loss sums so far, over every rank.
    pub sums: Sums,
    /// Seconds spent on the epoch so far (its record's time and throughput include them).
    pub seconds: f64,
}

fn error(path: &Path, reason: impl std::fmt::Display) -> FitError {
    FitError::Checkpoint {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// `dir` with `.suffix` appended to its name ("checkpoint" → "checkpoint.partial").
fn beside(dir: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

fn remove_if_there(dir: &Path) -> Result<(), FitError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(error(dir, e)),
        _ => Ok(()),
    }
}

/// Writes the checkpoint into `<dir>.partial` (state.json last), then switches it into place:
/// `dir` → `<dir>.previous`, `<dir>.partial` → `dir`, `<dir>.previous` removed. Whenever it is
/// cut short a whole checkpoint remains, which `load` finds (see `whole`).
pub fn save<B: Backend<f32>>(
    dir: &Path,
    state: &FitState,
    trainer: &Trainer<f32, B>,
) -> Result<(), FitError> {
    let staged = beside(dir, "partial");
    remove_if_there(&staged)?;
    std::fs::create_dir_all(&staged).map_err(|e| error(&staged, e))?;
    let model = &trainer.model;
    // One transfer for the whole checkpoint (on a GPU, one wait).
    let [values, statistics, m, v]: [Vec<f32>; 4] = model
        .backend()
        .download_together(&[
            In::all(model.values()),
            In::all(model.state()),
            In::all(&trainer.m),
            In::all(&trainer.v),
        ])?
        .try_into()
        .map_err(|_| error(dir, "four buffers downloaded, another count came back"))?;
    write_tensors(
        &staged.join("model.safetensors"),
        &weight_tensors(trainer, &values, &statistics),
        trainer.step,
    )?;
    let shape = vec![model.layout.len()];
    let optimizer = vec![
        ("adam.m".to_string(), shape.clone(), m),
        ("adam.v".to_string(), shape, v),
    ];
    write_tensors(
        &staged.join("optimizer.safetensors"),
        &optimizer,
        trainer.step,
    )?;
    let json = serde_json::to_string_pretty(state).map_err(|e| error(dir, e))?;
    let state_path = staged.join("state.json");
    std::fs::write(&state_path, json).map_err(|e| error(&state_path, e))?;
    let previous = beside(dir, "previous");
    if dir.exists() {
        remove_if_there(&previous)?;
        std::fs::rename(dir, &previous).map_err(|e| error(dir, e))?;
    }
    std::fs::rename(&staged, dir).map_err(|e| error(dir, e))?;
    remove_if_there(&previous)
}

/// The whole checkpoint at `dir`: `dir` itself when it has its state.json, else one a cut-short
/// `save` left beside it — the new one written but not switched in (`.partial` with its
/// state.json, written last) or the one it replaces (`.previous`).
fn whole(dir: &Path) -> std::path::PathBuf {
    if dir.join("state.json").exists() {
        return dir.to_path_buf();
    }
    [beside(dir, "partial"), beside(dir, "previous")]
        .into_iter()
        .find(|d| d.join("state.json").exists())
        .unwrap_or_else(|| dir.to_path_buf())
}

/// A checkpoint found on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub location: std::path::PathBuf,
    pub epochs_done: usize,
    pub step: u64,
}

/// The furthest complete checkpoint among a job's `<root>/epoch-*` folders (the one with the
/// most steps; folders without a readable `state.json` are cut short and skipped); None when
/// `root` holds none or does not exist.
pub fn latest(root: &Path) -> Result<Option<Found>, FitError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(error(root, e)),
    };
    let mut best: Option<Found> = None;
    for entry in entries.flatten() {
        let dir = entry.path();
        // `epoch-*.partial` / `.previous` are a save in progress (see `save`).
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("epoch-") && !n.contains('.'))
        {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join("state.json")) else {
            continue;
        };
        let Ok(state) = serde_json::from_str::<FitState>(&text) else {
            continue;
        };
        if best.as_ref().is_none_or(|b| state.step > b.step) {
            best = Some(Found {
                location: dir,
                epochs_done: state.epochs_done,
                step: state.step,
            });
        }
    }
    Ok(best)
}

/// Removes the per-epoch checkpoints `<root>/epoch-<n>` (and those within an epoch,
/// `<root>/epoch-<n>-step-<s>`) with n < `keep_from`.
pub fn remove_before(root: &Path, keep_from: usize) -> Result<(), FitError> {
    let entries = std::fs::read_dir(root).map_err(|e| error(root, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let epoch = name
            .to_str()
            .and_then(|n| n.strip_prefix("epoch-"))
            .and_then(|n| n.split(['-', '.']).next())
            .and_then(|n| n.parse::<usize>().ok());
        if epoch.is_some_and(|e| e < keep_from) {
            std::fs::remove_dir_all(entry.path()).map_err(|e| error(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Every parameter and BatchNorm statistic under its layout name, f32, row-major.
pub fn write_weights<B: Backend<f32>>(
    path: &Path,
    trainer: &Trainer<f32, B>,
) -> Result<(), FitError> {
    let model = &trainer.model;
    let [values, state]: [Vec<f32>; 2] = model
        .backend()
        .download_together(&[In::all(model.values()), In::all(model.state())])?
        .try_into()
        .map_err(|_| error(path, "two buffers downloaded, another count came back"))?;
    write_tensors(
        path,
        &weight_tensors(trainer, &values, &state),
        trainer.step,
    )
}

/// The model's tensors by layout name, cut from its parameters and BatchNorm statistics on
/// the host.
fn weight_tensors<B: Backend<f32>>(
    trainer: &Trainer<f32, B>,
    values: &[f32],
    state: &[f32],
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let model = &trainer.model;
    [(&model.layout, values), (&model.state_layout, state)]
        .into_iter()
        .flat_map(|(layout, host)| {
            layout.slots().iter().map(|slot| {
                (
                    slot.name.clone(),
                    slot.shape.clone(),
                    host[slot.range.clone()].to_vec(),
                )
            })
        })
        .collect()
}

pub(crate) fn write_tensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    step: u64,
) -> Result<(), FitError> {
    let out = |e: &dyn std::fmt::Display| FitError::Output {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            TensorView::new(safetensors::Dtype::F32, shape.clone(), b).map(|v| (name.clone(), v))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| out(&e))?;
    let metadata = BTreeMap::from([
        ("format".to_string(), "tessera-vae".to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    // Written through std::fs, so the file takes the umask's mode like every other output
    // (serialize_to_file creates it 0600: a shared volume's readers could not load it).
    let bytes = crate::tensor_file::to_bytes(views, &metadata).map_err(|e| out(&e))?;
    std::fs::write(path, bytes).map_err(|e| out(&e))
}

/// Reads the checkpoint into `trainer` and returns the run state. Refuses a checkpoint of
/// another run (data, shapes or configuration other than `max_epochs`) or an inconsistent one.
pub fn load<B: Backend<f32>>(
    dir: &Path,
    run: &serde_json::Value,
    trainer: &mut Trainer<f32, B>,
) -> Result<FitState, FitError> {
    let dir = &whole(dir);
    if dir
        .extension()
        .is_some_and(|e| e == "partial" || e == "previous")
    {
        tracing::warn!(
            "the last checkpoint save was cut short: resuming from {}",
            dir.display()
        );
    }
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| {
        error(
            &state_path,
            format!("{e} (nothing to resume: train without --resume first)"),
        )
    })?;
    let state: FitState = serde_json::from_str(&text).map_err(|e| error(&state_path, e))?;
    if let Some(field) = first_difference(&state.run, run, "") {
        return Err(error(
            &state_path,
            format!(
                "belongs to another run: {field} differs (only train.max_epochs may change on resume)"
            ),
        ));
    }
    let model_file = read(&dir.join("model.safetensors"), state.step)?;
    let model_tensors =
        SafeTensors::deserialize(&model_file.1).map_err(|e| error(&model_file.0, e))?;
    let backend = trainer.model.backend().clone();
    *trainer.model.values_mut() = backend.upload(&gather(
        &model_tensors,
        &trainer.model.layout,
        &model_file.0,
    )?)?;
    *trainer.model.state_mut() = backend.upload(&gather(
        &model_tensors,
        &trainer.model.state_layout,
        &model_file.0,
    )?)?;
    let opt_file = read(&dir.join("optimizer.safetensors"), state.step)?;
    let opt_tensors = SafeTensors::deserialize(&opt_file.1).map_err(|e| error(&opt_file.0, e))?;
    let n = trainer.model.layout.len();
    trainer.m = backend.upload(&tensor(&opt_tensors, "adam.m", &[n], &opt_file.0)?)?;
    trainer.v = backend.upload(&tensor(&opt_tensors, "adam.v", &[n], &opt_file.0)?)?;
    trainer.step = state.step;
    trainer.set_lr(state.plateau.lr);
    Ok(state)
}

/// A safetensors file's bytes after checking its step matches the state's.
fn read(path: &Path, step: u64) -> Result<(std::path::PathBuf, Vec<u8>), FitError> {
    let bytes = std::fs::read(path).map_err(|e| error(path, e))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| error(path, e))?;
    let found = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .cloned()
        .unwrap_or_default();
    if found != step.to_string() {
        return Err(error(
            path,
            format!(
                "holds step {found:?} but state.json step {step}: the checkpoint was cut short; resume from an earlier copy or start again"
            ),
        ));
    }
    Ok((path.to_path_buf(), bytes))
}

fn tensor(
    file: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
    path: &Path,
) -> Result<Vec<f32>, FitError> {
    let t = file
        .tensor(name)
        .map_err(|e| error(path, format!("tensor {name:?}: {e}")))?;
    if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape {
        return Err(error(
            path,
            format!(
                "tensor {name:?} is {:?} {:?}, expected F32 {shape:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The flat buffer of `layout` from its named tensors.
fn gather(file: &SafeTensors<'_>, layout: &Layout, path: &Path) -> Result<Vec<f32>, FitError> {
    let mut flat = vec![0f32; layout.len()];
    for slot in layout.slots() {
        flat[slot.range.clone()].copy_from_slice(&tensor(file, &slot.name, &slot.shape, path)?);
    }
    Ok(flat)
}

/// The first key path where two resolved runs differ, ignoring the epoch count, TF32 (a
/// precision mode a resume may change), where the counts live and whether steps replay from
/// CUDA graphs (the same model either way); checkpoints from before the last three existed lack
/// their keys.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Option<String> {
    let may_change = |at: &str| {
        matches!(
            at,
            "train.max_epochs"
                | "epochs"
                | "train.tf32"
                | "train.resident_data"
                | "train.cuda_graphs"
        )
    };
    if may_change(at) {
        return None;
    }
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => first_difference(p, q, &path),
                    (Some(v), None) | (None, Some(v)) => {
                        (!may_change(&path) && !meant_before(&path, v)).then_some(path)
                    }
                    (None, None) => None,
                }
            })
        }
        _ => (a != b).then(|| at.to_string()),
    }
}

/// Whether `value` at `at` is what a checkpoint from before the key existed meant (its
/// default then): LayerNorm came later, off.
fn meant_before(at: &str, value: &serde_json::Value) -> bool {
    matches!(
        (at, value),
        ("model.layer_norm", serde_json::Value::Bool(false))
    )
}

#[cfg(test)]
mod tests {
    use super::first_difference;

    #[test]
    fn a_key_added_since_a_checkpoint_differs_only_where_its_value_is_not_the_old_meaning() {
        let saved = serde_json::json!({"model": {"batch_norm": true}});
        let off = serde_json::json!({"model": {"batch_norm": true, "layer_norm": false}});
        let on = serde_json::json!({"model": {"batch_norm": true, "layer_norm": true}});
        assert_eq!(first_difference(&saved, &off, ""), None);
        assert_eq!(
            first_difference(&saved, &on, ""),
            Some("model.layer_norm".into())
        );
    }

    #[test]
    fn a_resume_may_change_the_epochs_and_tf32_but_nothing_else() {
        let saved = serde_json::json!({"epochs": 5, "train": {"max_epochs": 5, "lr": 0.001}});
        let now = serde_json::json!({
            "epochs": 9,
            "train": {"max_epochs": 9, "lr": 0.001, "tf32": true}
        });
        assert_eq!(first_difference(&saved, &now, ""), None);
        let other = serde_json::json!({"epochs": 5, "train": {"max_epochs": 5, "lr": 0.01}});
        assert_eq!(
            first_difference(&saved, &other, ""),
            Some("train.lr".into())
        );
        let more =
            serde_json::json!({"epochs": 5, "train": {"max_epochs": 5, "lr": 0.001, "parts": 2}});
        assert_eq!(
            first_difference(&saved, &more, ""),
            Some("train.parts".into())
        );
    }
}
