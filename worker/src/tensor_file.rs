//! safetensors files whose bytes depend only on what they hold.

use std::collections::{BTreeMap, HashMap};

use safetensors::SafeTensorError;
use safetensors::tensor::TensorView;

/// The safetensors bytes of `views` and `metadata`, the metadata in key order. The crate writes
/// its metadata map in hash order, which changes from run to run, so two identical models
/// would differ in bytes (and checksums, and what a pipeline's cache sees).
pub(crate) fn to_bytes(
    views: Vec<(String, TensorView<'_>)>,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>, SafeTensorError> {
    let hashed: HashMap<String, String> = metadata.clone().into_iter().collect();
    let mut bytes = safetensors::tensor::serialize(views, Some(hashed))?;
    // The header opens with the metadata (`{"__metadata__":{...},`); the same entries in key
    // order take the same bytes, so they are put in its place. Checked: a header laid out
    // otherwise is left as the crate wrote it (valid, only not canonical).
    let sorted = serde_json::to_string(metadata)?;
    let at = 8 + br#"{"__metadata__":"#.len();
    let opens = bytes.get(8..at) == Some(&br#"{"__metadata__":"#[..]);
    if let Some(slot) = bytes.get_mut(at..at + sorted.len())
        && opens
        && serde_json::from_slice::<BTreeMap<String, String>>(slot)
            .ok()
            .as_ref()
            == Some(metadata)
    {
        slot.copy_from_slice(sorted.as_bytes());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use safetensors::{Dtype, SafeTensors};

    use super::*;

    /// Each write hashes its metadata with a new random seed: without the sorting, eight keys
    /// come out in the same order twice with probability 1/8!.
    #[test]
    fn the_same_tensors_and_metadata_give_the_same_bytes() {
        let data: Vec<u8> = [1.5f32, -2.0, 0.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let metadata: BTreeMap<String, String> = (0..8)
            .map(|i| (format!("key{i}"), format!("value \"{i}\"")))
            .collect();
        let write = || {
            let views = vec![
                (
                    "b".to_string(),
                    TensorView::new(Dtype::F32, vec![3], &data).unwrap(),
                ),
                (
                    "a".to_string(),
                    TensorView::new(Dtype::F32, vec![1, 3], &data).unwrap(),
                ),
            ];
            to_bytes(views, &metadata).unwrap()
        };
        let first = write();
        for _ in 0..4 {
            assert_eq!(write(), first);
        }
        let header_len = u64::from_le_bytes(first[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&first[8..8 + header_len]).unwrap();
        assert!(
            header.starts_with(r#"{"__metadata__":{"key0":"value \"0\"","key1""#),
            "{header}"
        );
        let (_, read) = SafeTensors::read_metadata(&first).unwrap();
        let read: BTreeMap<String, String> = read.metadata().clone().unwrap().into_iter().collect();
        assert_eq!(read, metadata);
        let file = SafeTensors::deserialize(&first).unwrap();
        assert_eq!(file.tensor("a").unwrap().shape(), [1, 3]);
        assert_eq!(file.tensor("b").unwrap().data(), &data[..]);
    }
}
