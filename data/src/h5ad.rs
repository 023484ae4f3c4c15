//! `.h5ad` / `.h5mu` (HDF5) to Zarr. anndata and mudata lay out HDF5 and Zarr the same way
//! (groups, datasets, `encoding-type` attributes), so conversion is a faithful copy of the
//! hierarchy: every group with its attributes, every dataset in its element type, streamed in
//! chunk-sized slices so memory stays bounded whatever the file size. Nothing is dropped: an
//! element we cannot represent is an error naming it.

use std::path::Path;

use hdf5::types::{FloatSize, IntSize, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Dataset, Group, H5Type};
use serde::Serialize;
use serde_json::{Map, Value, json};
use zarrs::array::Element;

use crate::error::{DataError, Result};
use crate::store::ZarrVersion;
use crate::write::{CHUNK, DENSE_SHARD_ROWS, Elem, StoreWriter};

#[derive(Debug, Clone, Serialize)]
pub struct ConvertSummary {
    pub groups: usize,
    pub arrays: usize,
    pub bytes: u64,
}

/// Converts an HDF5 AnnData/MuData file into a new Zarr store at `output`.
pub fn convert_h5(input: &Path, output: &str, version: ZarrVersion, mut progress: impl FnMut(&str)) -> Result<ConvertSummary> {
    let name = input.display().to_string();
    let file = hdf5::File::open(input).map_err(|e| DataError::Open { store: name.clone(), reason: format!("not a readable HDF5 file: {e}") })?;
    let writer = StoreWriter::create(output, version)?;
    let mut summary = ConvertSummary { groups: 0, arrays: 0, bytes: 0 };
    let root: &Group = &file;
    copy_group(&name, root, &writer, "", &mut summary, &mut progress)?;
    writer.consolidate()?;
    Ok(summary)
}

fn h5_err(file: &str, path: &str, e: impl std::fmt::Display) -> DataError {
    DataError::Read { store: file.into(), path: path.into(), reason: e.to_string() }
}

fn copy_group(file: &str, group: &Group, writer: &StoreWriter, path: &str, summary: &mut ConvertSummary, progress: &mut impl FnMut(&str)) -> Result<()> {
    writer.group(path, Value::Object(attributes(file, path, group)?))?;
    summary.groups += 1;
    let members = group.member_names().map_err(|e| h5_err(file, path, e))?;
    for member in members {
        let child = if path.is_empty() { member.clone() } else { format!("{path}/{member}") };
        if let Ok(sub) = group.group(&member) {
            copy_group(file, &sub, writer, &child, summary, progress)?;
        } else {
            let dataset = group.dataset(&member).map_err(|e| h5_err(file, &child, e))?;
            progress(&child);
            summary.bytes += copy_dataset(file, &dataset, writer, &child)?;
            summary.arrays += 1;
        }
    }
    Ok(())
}

/// Copies one dataset; returns the bytes of its elements.
fn copy_dataset(file: &str, ds: &Dataset, writer: &StoreWriter, path: &str) -> Result<u64> {
    let attrs = Value::Object(attributes(file, path, ds)?);
    let descriptor = ds.dtype().and_then(|t| t.to_descriptor()).map_err(|e| h5_err(file, path, e))?;
    let shape = ds.shape();
    macro_rules! copy {
        ($t:ty, $elem:expr) => {
            copy_typed::<$t, $t>(file, ds, writer, path, &shape, $elem, attrs, |v| v)
        };
    }
    match descriptor {
        TypeDescriptor::Float(FloatSize::U4) => copy!(f32, Elem::F32),
        TypeDescriptor::Float(FloatSize::U8) => copy!(f64, Elem::F64),
        TypeDescriptor::Integer(IntSize::U1) => copy!(i8, Elem::I8),
        TypeDescriptor::Integer(IntSize::U2) => copy!(i16, Elem::I16),
        TypeDescriptor::Integer(IntSize::U4) => copy!(i32, Elem::I32),
        TypeDescriptor::Integer(IntSize::U8) => copy!(i64, Elem::I64),
        TypeDescriptor::Unsigned(IntSize::U1) => copy!(u8, Elem::U8),
        TypeDescriptor::Unsigned(IntSize::U2) => copy!(u16, Elem::U16),
        TypeDescriptor::Unsigned(IntSize::U4) => copy!(u32, Elem::U32),
        TypeDescriptor::Unsigned(IntSize::U8) => copy!(u64, Elem::U64),
        TypeDescriptor::Boolean => copy!(bool, Elem::Bool),
        TypeDescriptor::VarLenUnicode => copy_typed::<VarLenUnicode, String>(file, ds, writer, path, &shape, Elem::Str, attrs, |s| s.as_str().to_string()),
        TypeDescriptor::VarLenAscii => copy_typed::<VarLenAscii, String>(file, ds, writer, path, &shape, Elem::Str, attrs, |s| s.as_str().to_string()),
        other => Err(DataError::DataType { store: file.into(), path: path.into(), found: format!("HDF5 {other:?}"), expected: "numbers, booleans or variable-length strings".into() }),
    }
}

/// Streams a 0-, 1- or 2-D dataset of HDF5 type `H` into a Zarr array of `Z`, converting
/// elements with `conv`: 1-D in chunk-sized slices, 2-D in shard-sized row blocks.
#[allow(clippy::too_many_arguments)]
fn copy_typed<H: H5Type + Clone, Z: Element + Clone + Default + Send>(file: &str, ds: &Dataset, writer: &StoreWriter, path: &str, shape: &[usize], elem: Elem, attrs: Value, conv: impl Fn(H) -> Z) -> Result<u64> {
    let err = |e: hdf5::Error| h5_err(file, path, e);
    let size = std::mem::size_of::<H>() as u64;
    match *shape {
        [] => {
            let value = conv(ds.read_scalar::<H>().map_err(err)?);
            writer.array_0d(path, elem, value, attrs)?;
            Ok(size)
        }
        [n] => {
            let mut stream = writer.stream_1d::<Z>(path, elem, attrs)?;
            let step = CHUNK as usize;
            for start in (0..n).step_by(step) {
                let part = ds.read_slice_1d::<H, _>(start..(start + step).min(n)).map_err(err)?;
                stream.push(&part.into_iter().map(&conv).collect::<Vec<Z>>())?;
            }
            stream.finish()?;
            Ok(n as u64 * size)
        }
        [rows, cols] => {
            let array = writer.dense_2d(path, elem, rows as u64, cols as u64, attrs)?;
            let step = DENSE_SHARD_ROWS as usize;
            for start in (0..rows).step_by(step) {
                let end = (start + step).min(rows);
                let part = ds.read_slice_2d::<H, _>((start..end, ..)).map_err(err)?;
                let values: Vec<Z> = part.into_iter().map(&conv).collect();
                array
                    .store_array_subset(&[start as u64..end as u64, 0..cols as u64], values)
                    .map_err(|e| writer.store.at(path).write(e))?;
            }
            array.store_metadata().map_err(|e| writer.store.at(path).write(e))?;
            Ok((rows * cols) as u64 * size)
        }
        _ => Err(DataError::Invalid { store: file.into(), path: path.into(), problem: format!("{}-dimensional dataset; expected at most 2 dimensions", shape.len()) }),
    }
}

/// An object's attributes as JSON, the way anndata writes them to Zarr.
fn attributes(file: &str, path: &str, location: &hdf5::Location) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    let names = location.attr_names().map_err(|e| h5_err(file, path, e))?;
    for name in names {
        let at = format!("{path}@{name}");
        let attr = location.attr(&name).map_err(|e| h5_err(file, &at, e))?;
        let descriptor = attr.dtype().and_then(|t| t.to_descriptor()).map_err(|e| h5_err(file, &at, e))?;
        let scalar = attr.shape().is_empty();
        macro_rules! read {
            ($t:ty, $to:expr) => {{
                if scalar {
                    $to(attr.read_scalar::<$t>().map_err(|e| h5_err(file, &at, e))?)
                } else {
                    Value::Array(attr.read_raw::<$t>().map_err(|e| h5_err(file, &at, e))?.into_iter().map($to).collect())
                }
            }};
        }
        let value = match descriptor {
            TypeDescriptor::VarLenUnicode => read!(VarLenUnicode, |s: VarLenUnicode| json!(s.as_str())),
            TypeDescriptor::VarLenAscii => read!(VarLenAscii, |s: VarLenAscii| json!(s.as_str())),
            TypeDescriptor::Boolean => read!(bool, |b: bool| json!(b)),
            TypeDescriptor::Integer(_) => read!(i64, |x: i64| json!(x)),
            TypeDescriptor::Unsigned(_) => read!(u64, |x: u64| json!(x)),
            TypeDescriptor::Float(_) => read!(f64, |x: f64| json!(x)),
            other => return Err(DataError::DataType { store: file.into(), path: at, found: format!("HDF5 attribute {other:?}"), expected: "a string, boolean or number (or an array of them)".into() }),
        };
        out.insert(name, value);
    }
    Ok(out)
}
