//! What a trained model keeps for mapping queries onto it (`<out>/reference.safetensors`): the
//! reference cells' latent means, their labels (codes into the label categories, −1 unlabelled)
//! and, in the file's metadata, every modality's feature names (to align a query's genes) and
//! the batch and label categories.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tessera_data::Dataset;

/// File name of the reference beside `model.safetensors`.
pub const REFERENCE_FILE: &str = "reference.safetensors";
const FORMAT: &str = "tessera-reference";

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error(transparent)]
    Data(#[from] tessera_data::DataError),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// Cells x `n_latent`, row-major.
    pub latent: Vec<f32>,
    pub n_latent: usize,
    /// One code per cell into `label_categories` (−1: unlabelled); empty without a label key.
    pub labels: Vec<i32>,
    pub label_key: Option<String>,
    pub label_categories: Vec<String>,
    pub batch_key: Option<String>,
    pub batch_categories: Vec<String>,
    /// Feature names of each modality the model was trained on, in the model's order.
    pub var_names: BTreeMap<String, Vec<String>>,
}

impl Reference {
    pub fn n_cells(&self) -> usize {
        self.latent.len() / self.n_latent.max(1)
    }

    pub fn write(&self, path: &Path) -> Result<(), ReferenceError> {
        let fail = |reason: String| ReferenceError::File {
            path: path.display().to_string(),
            reason,
        };
        let latent: Vec<u8> = self.latent.iter().flat_map(|v| v.to_le_bytes()).collect();
        let labels: Vec<u8> = self.labels.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut views = vec![(
            "latent".to_string(),
            TensorView::new(Dtype::F32, vec![self.n_cells(), self.n_latent], &latent)
                .map_err(|e| fail(e.to_string()))?,
        )];
        if !self.labels.is_empty() {
            views.push((
                "labels".to_string(),
                TensorView::new(Dtype::I32, vec![self.labels.len()], &labels)
                    .map_err(|e| fail(e.to_string()))?,
            ));
        }
        let json = |v: serde_json::Value| v.to_string();
        let metadata = BTreeMap::from([
            ("format".to_string(), FORMAT.to_string()),
            (
                "var_names".to_string(),
                json(serde_json::json!(self.var_names)),
            ),
            (
                "label_key".to_string(),
                json(serde_json::json!(self.label_key)),
            ),
            (
                "label_categories".to_string(),
                json(serde_json::json!(self.label_categories)),
            ),
            (
                "batch_key".to_string(),
                json(serde_json::json!(self.batch_key)),
            ),
            (
                "batch_categories".to_string(),
                json(serde_json::json!(self.batch_categories)),
            ),
        ]);
        // Through std::fs: the umask's mode, like every other output (see checkpoint.rs).
        let bytes =
            crate::tensor_file::to_bytes(views, &metadata).map_err(|e| fail(e.to_string()))?;
        std::fs::write(path, bytes).map_err(|e| fail(e.to_string()))
    }

    /// Reads a reference written by [`Reference::write`]; anything else is refused by name.
    pub fn read(path: &Path) -> Result<Reference, ReferenceError> {
        let bytes = std::fs::read(path).map_err(|e| ReferenceError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Reference::from_bytes(&bytes, &path.display().to_string())
    }

    /// A reference from the bytes of its file (`name` is the file's location, for messages).
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Reference, ReferenceError> {
        let fail = |reason: String| ReferenceError::File {
            path: name.to_string(),
            reason,
        };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| fail(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(fail(format!(
                "not a tessera reference (metadata format {:?}, expected {FORMAT:?})",
                meta.get("format")
            )));
        }
        fn field<T: serde::de::DeserializeOwned>(
            meta: &HashMap<String, String>,
            key: &str,
        ) -> Result<T, String> {
            let text = meta
                .get(key)
                .ok_or_else(|| format!("metadata has no {key:?}"))?;
            serde_json::from_str(text).map_err(|e| format!("metadata {key:?}: {e}"))
        }
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| fail(e.to_string()))?;
        let latent = tensors
            .tensor("latent")
            .map_err(|e| fail(format!("tensor \"latent\": {e}")))?;
        let (&[n, n_latent], Dtype::F32) = (latent.shape(), latent.dtype()) else {
            return Err(fail(format!(
                "tensor \"latent\" is {:?} {:?}, expected F32 [cells, latent]",
                latent.dtype(),
                latent.shape()
            )));
        };
        let labels = match tensors.tensor("labels") {
            Ok(t) if t.dtype() == Dtype::I32 && t.shape() == [n] => t
                .data()
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Ok(t) => {
                return Err(fail(format!(
                    "tensor \"labels\" is {:?} {:?}, expected I32 [{n}]",
                    t.dtype(),
                    t.shape()
                )));
            }
            Err(_) => Vec::new(),
        };
        let reference = Reference {
            latent: latent
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            n_latent,
            labels,
            label_key: field(&meta, "label_key").map_err(fail)?,
            label_categories: field(&meta, "label_categories").map_err(fail)?,
            batch_key: field(&meta, "batch_key").map_err(fail)?,
            batch_categories: field(&meta, "batch_categories").map_err(fail)?,
            var_names: field(&meta, "var_names").map_err(fail)?,
        };
        if let Some(bad) = reference
            .labels
            .iter()
            .find(|&&c| c < -1 || c >= reference.label_categories.len() as i32)
        {
            return Err(fail(format!(
                "label code {bad} outside the {} label categories",
                reference.label_categories.len()
            )));
        }
        Ok(reference)
    }
}

/// Feature names of `modality` (a MuData modality, or the AnnData itself for its only one).
pub fn var_names(dataset: &Dataset, modality: &str) -> Result<Vec<String>, ReferenceError> {
    let var = match dataset {
        Dataset::AnnData(a) => a.var()?,
        Dataset::MuData(m) => m.modality(modality)?.1.var()?,
    };
    Ok(var.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Reference {
        Reference {
            latent: vec![0.5, -1.0, 2.0, 0.25, 3.0, -0.5],
            n_latent: 2,
            labels: vec![1, -1, 0],
            label_key: Some("cell_type".into()),
            label_categories: vec!["B".into(), "T".into()],
            batch_key: Some("batch".into()),
            batch_categories: vec!["b0".into(), "b1".into()],
            var_names: BTreeMap::from([(
                "rna".to_string(),
                vec!["CD3E".to_string(), "MS4A1".to_string()],
            )]),
        }
    }

    #[test]
    fn a_reference_comes_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REFERENCE_FILE);
        example().write(&path).unwrap();
        assert_eq!(Reference::read(&path).unwrap(), example());
        let unlabelled = Reference {
            labels: Vec::new(),
            label_key: None,
            label_categories: Vec::new(),
            ..example()
        };
        unlabelled.write(&path).unwrap();
        assert_eq!(Reference::read(&path).unwrap(), unlabelled);
    }

    #[test]
    fn other_files_and_bad_codes_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let data = [0u8; 4];
        safetensors::tensor::serialize_to_file(
            [(
                "w".to_string(),
                TensorView::new(Dtype::F32, vec![1], &data).unwrap(),
            )],
            None,
            &path,
        )
        .unwrap();
        let e = Reference::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("not a tessera reference"),
            "{e}"
        );
        let bad = Reference {
            labels: vec![1, 2, 0],
            ..example()
        };
        bad.write(&path).unwrap();
        let e = Reference::read(&path).unwrap_err().to_string();
        assert!(
            e.contains("label code 2 outside the 2 label categories"),
            "{e}"
        );
        let e = Reference::read(&dir.path().join("none.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
    }
}
