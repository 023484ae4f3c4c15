//! scArches' architecture surgery (Lotfollahi et al. 2022; scvi-tools' `load_query_data`): a
//! query model is the reference model with the query's new batches appended to the batch
//! one-hot. The reference's tensors are copied by name; the new batches get new rows in every
//! covariate weight (zero, so the reference's cells are mapped exactly as before) and in every
//! batch-indexed table (gene-batch dispersion, totalVI's background: the reference batches' mean).
//! Fine-tuning then trains only the new rows, optionally the input layers too.

use std::ops::Range;

use tessera_kernels::Real;
use tessera_kernels::params::Layout;

/// The query's batch one-hot: the reference's `reference_batches` columns, then `added` new ones;
/// the other covariates follow unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchExtension {
    pub reference_batches: usize,
    pub added: usize,
}

/// What fine-tuning on the query may change besides the new batch rows (scArches' default:
/// nothing else).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Unfreeze {
    /// The first encoder layer of every modality (weights, bias, BatchNorm affine).
    pub encoder_input: bool,
    /// The first decoder layer of every modality.
    pub decoder_input: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SurgeryError {
    #[error(
        "the reference model has no tensor {0:?} that the query model needs (another architecture?)"
    )]
    Missing(String),
    #[error(
        "tensor {name:?}: the reference's shape {reference:?} cannot become the query model's {query:?} by adding {added} batches"
    )]
    Shape {
        name: String,
        reference: Vec<usize>,
        query: Vec<usize>,
        added: usize,
    },
}

/// Tables with one row per batch.
fn batch_indexed(name: &str) -> bool {
    name.ends_with("log_theta") || name.ends_with("log_background")
}

/// Fills `values` (laid out by the query model's `layout`) from the reference's tensors
/// (`reference(name)` = shape and row-major values) and returns the ranges of `values` that the
/// surgery added (the new batch rows), in layout order.
pub fn transfer<T: Real>(
    layout: &Layout,
    values: &mut [T],
    reference: impl Fn(&str) -> Option<(Vec<usize>, Vec<T>)>,
    ext: BatchExtension,
) -> Result<Vec<Range<usize>>, SurgeryError> {
    let mut added = Vec::new();
    for slot in layout.slots() {
        let (shape, source) =
            reference(&slot.name).ok_or_else(|| SurgeryError::Missing(slot.name.clone()))?;
        let target = &mut values[slot.range.clone()];
        if shape == slot.shape && source.len() == target.len() {
            target.copy_from_slice(&source);
            continue;
        }
        let mismatch = || SurgeryError::Shape {
            name: slot.name.clone(),
            reference: shape.clone(),
            query: slot.shape.clone(),
            added: ext.added,
        };
        let [rows, cols] = shape[..] else {
            return Err(mismatch());
        };
        let grows = slot.shape.len() == 2
            && slot.shape[1] == cols
            && slot.shape[0] == rows + ext.added
            && source.len() == rows * cols
            && ext.reference_batches <= rows;
        let b = ext.reference_batches;
        let new_rows = (
            b * cols..(b + ext.added) * cols,
            slot.range.start + b * cols..slot.range.start + (b + ext.added) * cols,
        );
        if grows && slot.name.ends_with(".wc") {
            // Reference batch rows, zero rows for the new batches, then the other covariates.
            target[..b * cols].copy_from_slice(&source[..b * cols]);
            target[new_rows.0.clone()]
                .iter_mut()
                .for_each(|v| *v = T::zero());
            target[(b + ext.added) * cols..].copy_from_slice(&source[b * cols..]);
        } else if grows && batch_indexed(&slot.name) && rows == b && b > 0 {
            target[..b * cols].copy_from_slice(&source);
            for c in 0..cols {
                let mean = (0..b).map(|r| source[r * cols + c].f64()).sum::<f64>() / b as f64;
                (b..b + ext.added).for_each(|r| target[r * cols + c] = T::of(mean));
            }
        } else {
            return Err(mismatch());
        }
        added.push(new_rows.1);
    }
    Ok(added)
}

/// Starts `values` (laid out by `layout`) from another model's tensors of the same names and
/// shapes, as scvi-tools' `SCANVI.from_scvi_model` starts from a trained SCVI: every tensor
/// must be there with its shape, except the heads (`heads.*`), which a model may add and which
/// keep their initial values. Returns how many values were copied.
pub fn warm_start<T: Real>(
    layout: &Layout,
    values: &mut [T],
    source: impl Fn(&str) -> Option<(Vec<usize>, Vec<T>)>,
) -> Result<usize, SurgeryError> {
    let mut copied = 0;
    for slot in layout.slots() {
        let Some((shape, from)) = source(&slot.name) else {
            if slot.name.starts_with("heads.") {
                continue;
            }
            return Err(SurgeryError::Missing(slot.name.clone()));
        };
        let target = &mut values[slot.range.clone()];
        if shape != slot.shape || from.len() != target.len() {
            return Err(SurgeryError::Shape {
                name: slot.name.clone(),
                reference: shape,
                query: slot.shape.clone(),
                added: 0,
            });
        }
        target.copy_from_slice(&from);
        copied += target.len();
    }
    Ok(copied)
}

/// The ranges of the input layers `unfreeze` opens (`{modality.}encoder.0.*`,
/// `{modality.}decoder.0.*`; the covariate weights' new rows are added by [`transfer`]).
pub fn unfrozen_ranges(layout: &Layout, unfreeze: Unfreeze) -> Vec<Range<usize>> {
    let opened = |name: &str| {
        let layer = name.rsplit_once('.').map_or(name, |(layer, _)| layer);
        (unfreeze.encoder_input && layer.ends_with("encoder.0"))
            || (unfreeze.decoder_input && layer.ends_with("decoder.0"))
    };
    layout
        .slots()
        .iter()
        .filter(|s| opened(&s.name))
        .map(|s| s.range.clone())
        .collect()
}

/// The ranges of every encoder tensor of `layout` (`{modality.}encoder.*`): in the state
/// layout, the running statistics scArches keeps frozen.
pub fn encoder_ranges(layout: &Layout) -> Vec<Range<usize>> {
    layout
        .slots()
        .iter()
        .filter(|s| s.name.starts_with("encoder.") || s.name.contains(".encoder."))
        .map(|s| s.range.clone())
        .collect()
}

/// Sorted, merged ranges (what the optimiser walks).
pub fn merge_ranges(mut ranges: Vec<Range<usize>>) -> Vec<Range<usize>> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(ranges.len());
    for r in ranges.into_iter().filter(|r| !r.is_empty()) {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn reference() -> HashMap<String, (Vec<usize>, Vec<f64>)> {
        HashMap::from([
            // 2 batches + 1 other covariate, 3 outputs.
            (
                "decoder.0.wc".to_string(),
                (
                    vec![3, 3],
                    vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
                ),
            ),
            ("decoder.0.w".to_string(), (vec![2, 3], vec![0.5; 6])),
            (
                "log_theta".to_string(),
                (vec![2, 2], vec![1.0, 3.0, 2.0, 5.0]),
            ),
        ])
    }

    #[test]
    fn a_warm_start_copies_every_tensor_and_leaves_new_heads_alone() {
        let mut layout = Layout::default();
        layout.add("decoder.0.w", &[2, 3]);
        layout.add("heads.classifier.0.w", &[2, 2]);
        layout.add("log_theta", &[2, 2]);
        let mut values = vec![-7.0f64; layout.len()];
        let r = reference();
        let copied = warm_start(&layout, &mut values, |n| r.get(n).cloned()).unwrap();
        assert_eq!(copied, 10);
        assert_eq!(&values[..6], &[0.5; 6]);
        assert_eq!(&values[6..10], &[-7.0; 4]); // the new head keeps its initial values
        assert_eq!(&values[10..], &[1.0, 3.0, 2.0, 5.0]);

        let mut other = Layout::default();
        other.add("encoder.0.w", &[2, 3]);
        assert_eq!(
            warm_start(&other, &mut [0.0; 6], |n| r.get(n).cloned()),
            Err(SurgeryError::Missing("encoder.0.w".into()))
        );
        let mut wider = Layout::default();
        wider.add("decoder.0.w", &[2, 4]);
        let err = warm_start(&wider, &mut [0.0; 8], |n| r.get(n).cloned()).unwrap_err();
        assert!(err.to_string().contains("decoder.0.w"), "{err}");
    }

    #[test]
    fn new_batches_get_zero_covariate_rows_and_mean_dispersion() {
        let mut layout = Layout::default();
        layout.add("decoder.0.wc", &[5, 3]);
        layout.add("decoder.0.w", &[2, 3]);
        layout.add("log_theta", &[4, 2]);
        let mut values = vec![f64::NAN; layout.len()];
        let r = reference();
        let added = transfer(
            &layout,
            &mut values,
            |name| r.get(name).cloned(),
            BatchExtension {
                reference_batches: 2,
                added: 2,
            },
        )
        .unwrap();
        assert_eq!(
            values[..15],
            [
                1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 7.0, 8.0, 9.0
            ]
        );
        assert_eq!(values[15..21], [0.5; 6]);
        assert_eq!(values[21..], [1.0, 3.0, 2.0, 5.0, 1.5, 4.0, 1.5, 4.0]);
        assert_eq!(added, vec![6..12, 25..29]);
        // Unchanged batches: a plain copy, nothing new.
        let mut same = Layout::default();
        same.add("decoder.0.wc", &[3, 3]);
        let mut v = vec![0.0; 9];
        assert_eq!(
            transfer(
                &same,
                &mut v,
                |name| r.get(name).cloned(),
                BatchExtension {
                    reference_batches: 2,
                    added: 0
                }
            ),
            Ok(vec![])
        );
        assert_eq!(v, r["decoder.0.wc"].1);
    }

    #[test]
    fn other_architectures_are_refused_by_tensor() {
        let r = reference();
        let mut missing = Layout::default();
        missing.add("encoder.0.w", &[2, 3]);
        let mut v = vec![0.0; 6];
        assert_eq!(
            transfer(
                &missing,
                &mut v,
                |name| r.get(name).cloned(),
                BatchExtension {
                    reference_batches: 2,
                    added: 1
                }
            ),
            Err(SurgeryError::Missing("encoder.0.w".into()))
        );
        let mut wider = Layout::default();
        wider.add("decoder.0.w", &[3, 3]);
        let mut v = vec![0.0; 9];
        let extension = BatchExtension {
            reference_batches: 2,
            added: 1,
        };
        let result = transfer(&wider, &mut v, |name| r.get(name).cloned(), extension);
        assert!(matches!(result, Err(SurgeryError::Shape { name, .. }) if name == "decoder.0.w"));
    }

    #[test]
    fn input_layers_open_on_request_and_ranges_merge() {
        let mut layout = Layout::default();
        layout.add("rna.encoder.0.w", &[4, 2]);
        layout.add("rna.encoder.0.b", &[2]);
        layout.add("rna.encoder.1.w", &[2, 2]);
        layout.add("rna.decoder.0.wc", &[3, 2]);
        layout.add("rna.decoder.main.w", &[2, 4]);
        assert!(unfrozen_ranges(&layout, Unfreeze::default()).is_empty());
        assert_eq!(
            unfrozen_ranges(
                &layout,
                Unfreeze {
                    encoder_input: true,
                    decoder_input: false
                }
            ),
            vec![0..8, 8..10]
        );
        assert_eq!(
            unfrozen_ranges(
                &layout,
                Unfreeze {
                    encoder_input: false,
                    decoder_input: true
                }
            ),
            vec![14..20]
        );
        assert_eq!(
            merge_ranges(vec![8..10, 0..8, 16..18, 14..17, 3..3]),
            vec![0..10, 14..18]
        );
    }
}
