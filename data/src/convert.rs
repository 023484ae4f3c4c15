//! `tessera convert`: copy an AnnData/MuData hierarchy into a new Zarr store laid out for
//! streaming (our chunking and sharding, consolidated metadata).
//!
//! anndata and mudata write HDF5 and Zarr with the same layout (groups, arrays, `encoding-type`
//! attributes), so conversion is a faithful copy of the hierarchy from any [`Hierarchy`]
//! (a Zarr store of either version, or an `.h5ad`/`.h5mu` file): every group with its
//! attributes, every array in its element type, streamed in chunk-sized slices so memory stays
//! bounded whatever the size. Nothing is dropped: an element we cannot represent is an error
//! naming it.

use std::ops::Range;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{DataError, Result};
use crate::store::{Store, ZarrVersion};
use crate::write::{CHUNK, DENSE_SHARD_ROWS, Elem, StoreWriter, Stream1d};
use crate::zarr::{NodeKind, Values, read_rows};

/// What a source node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Group,
    Array { shape: Vec<u64> },
}

/// A readable AnnData/MuData hierarchy.
pub(crate) trait Hierarchy {
    /// The node at `path` ("" is the root) and its attributes.
    fn node(&self, path: &str) -> Result<(Node, Map<String, Value>)>;
    /// Child names of a group, in a stable order.
    fn children(&self, path: &str) -> Result<Vec<String>>;
    /// Rows `rows` of an array (all of a 0-d array for `0..1`).
    fn read(&self, path: &str, rows: Range<u64>) -> Result<Values>;
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConvertSummary {
    pub groups: usize,
    pub arrays: usize,
    /// Bytes of array elements copied (strings count one byte per character).
    pub bytes: u64,
}

/// Converts `input` (a Zarr store path/URL, or with the `h5ad` feature an `.h5ad`/`.h5mu`
/// file) into a new Zarr store at `output`. `progress` is told each array as it starts.
pub fn convert(
    input: &str,
    output: &str,
    version: ZarrVersion,
    mut progress: impl FnMut(&str),
) -> Result<ConvertSummary> {
    refuse_hdf5_name(output)?;
    let mut summary = ConvertSummary::default();
    if is_hdf5(input) {
        #[cfg(feature = "h5ad")]
        {
            let source = crate::h5ad::H5Source::open(std::path::Path::new(input))?;
            copy_checked(&source, input, output, version, &mut summary, &mut progress)?;
        }
        #[cfg(not(feature = "h5ad"))]
        return Err(DataError::Open {
            store: input.into(),
            reason: "HDF5 input needs tessera built with the `h5ad` feature".into(),
        });
    } else {
        let store = Store::open(input)?;
        let source_version = store.zarr_version()?.unwrap_or(ZarrVersion::V3);
        let source = ZarrSource {
            store,
            version: source_version,
        };
        copy_checked(&source, input, output, version, &mut summary, &mut progress)?;
    }
    Ok(summary)
}

/// Checks the source is AnnData/MuData, then creates the output and copies the whole hierarchy.
fn copy_checked(
    source: &dyn Hierarchy,
    input: &str,
    output: &str,
    version: ZarrVersion,
    summary: &mut ConvertSummary,
    progress: &mut impl FnMut(&str),
) -> Result<()> {
    check_anndata(source, input)?;
    let writer = StoreWriter::create(output, version)?;
    copy(source, &writer, "", summary, progress)?;
    writer.consolidate()
}

/// The output is a Zarr store: a name that promises HDF5 would give a directory anndata's
/// `read_h5ad` cannot open.
fn refuse_hdf5_name(output: &str) -> Result<()> {
    let lower = output.trim_end_matches('/').to_ascii_lowercase();
    match [".h5ad", ".h5mu", ".h5", ".hdf5"]
        .iter()
        .find(|ext| lower.ends_with(*ext))
    {
        Some(ext) => Err(DataError::Invalid {
            store: output.into(),
            path: "/".into(),
            problem: format!(
                "tessera writes Zarr stores, not HDF5 ({ext}): name the output .zarr \
                 (anndata.read_zarr(...).write_h5ad(...) makes an .h5ad from it)"
            ),
        }),
        None => Ok(()),
    }
}

/// The source's root is an AnnData (obs and var) or a MuData (mod and obs), by its
/// `encoding-type` or, for files older than anndata 0.8 that lack one, by its groups; checked
/// before anything is written.
fn check_anndata(source: &dyn Hierarchy, input: &str) -> Result<()> {
    let (_, attrs) = source.node("")?;
    let children = source.children("")?;
    // mudata writes "MuData" in .h5mu files and "mudata" in Zarr.
    let kind = attrs
        .get("encoding-type")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase);
    let needed: &[&str] = match kind.as_deref() {
        Some("mudata") => &["mod", "obs"],
        Some("anndata") | None => &["obs", "var"],
        Some(other) => {
            return Err(DataError::Invalid {
                store: input.into(),
                path: "/".into(),
                problem: format!("encoding-type {other:?}: expected an AnnData or MuData root"),
            });
        }
    };
    let missing: Vec<&str> = needed
        .iter()
        .filter(|n| !children.iter().any(|c| c == *n))
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(DataError::Invalid {
        store: input.into(),
        path: "/".into(),
        problem: format!(
            "not {} (the root lacks {}); nothing was written",
            if kind.as_deref() == Some("mudata") {
                "MuData"
            } else {
                "AnnData"
            },
            missing.join(" and ")
        ),
    })
}

/// HDF5 files start with a signature at offset 0 or, after a user block (mudata writes one),
/// at 512, 1024, ...; a local file (not a directory) that has it is HDF5.
fn is_hdf5(input: &str) -> bool {
    const SIGNATURE: &[u8] = b"\x89HDF\r\n\x1a\n";
    use std::io::Read;
    let mut bytes = Vec::new();
    let Ok(file) = std::fs::File::open(input) else {
        return false;
    };
    if file.take(1 << 17).read_to_end(&mut bytes).is_err() {
        return false;
    }
    std::iter::once(0)
        .chain((9..17).map(|k| 1usize << k))
        .any(|offset| bytes.get(offset..offset + 8) == Some(SIGNATURE))
}

fn copy(
    source: &dyn Hierarchy,
    writer: &StoreWriter,
    path: &str,
    summary: &mut ConvertSummary,
    progress: &mut impl FnMut(&str),
) -> Result<()> {
    let (node, attrs) = source.node(path)?;
    match node {
        Node::Group => {
            writer.group(path, Value::Object(attrs))?;
            summary.groups += 1;
            for child in source.children(path)? {
                let child = if path.is_empty() {
                    child
                } else {
                    format!("{path}/{child}")
                };
                copy(source, writer, &child, summary, progress)?;
            }
        }
        Node::Array { shape } => {
            progress(path);
            summary.bytes += copy_array(source, writer, path, &shape, Value::Object(attrs))?;
            summary.arrays += 1;
        }
    }
    Ok(())
}

/// A 1-D array being streamed, whatever its element type.
enum AnyStream<'w> {
    Bool(Stream1d<'w, bool>),
    I8(Stream1d<'w, i8>),
    I16(Stream1d<'w, i16>),
    I32(Stream1d<'w, i32>),
    I64(Stream1d<'w, i64>),
    U8(Stream1d<'w, u8>),
    U16(Stream1d<'w, u16>),
    U32(Stream1d<'w, u32>),
    U64(Stream1d<'w, u64>),
    F32(Stream1d<'w, f32>),
    F64(Stream1d<'w, f64>),
    Str(Stream1d<'w, String>),
}

/// Applies `$body` to the typed vector inside a `Values` and the matching stream/elem.
macro_rules! each_type {
    ($values:expr, |$v:ident, $variant:ident, $elem:ident| $body:expr) => {
        match $values {
            Values::Bool($v) => {
                let ($variant, $elem) = (AnyStream::Bool as fn(_) -> _, Elem::Bool);
                $body
            }
            Values::I8($v) => {
                let ($variant, $elem) = (AnyStream::I8 as fn(_) -> _, Elem::I8);
                $body
            }
            Values::I16($v) => {
                let ($variant, $elem) = (AnyStream::I16 as fn(_) -> _, Elem::I16);
                $body
            }
            Values::I32($v) => {
                let ($variant, $elem) = (AnyStream::I32 as fn(_) -> _, Elem::I32);
                $body
            }
            Values::I64($v) => {
                let ($variant, $elem) = (AnyStream::I64 as fn(_) -> _, Elem::I64);
                $body
            }
            Values::U8($v) => {
                let ($variant, $elem) = (AnyStream::U8 as fn(_) -> _, Elem::U8);
                $body
            }
            Values::U16($v) => {
                let ($variant, $elem) = (AnyStream::U16 as fn(_) -> _, Elem::U16);
                $body
            }
            Values::U32($v) => {
                let ($variant, $elem) = (AnyStream::U32 as fn(_) -> _, Elem::U32);
                $body
            }
            Values::U64($v) => {
                let ($variant, $elem) = (AnyStream::U64 as fn(_) -> _, Elem::U64);
                $body
            }
            Values::F32($v) => {
                let ($variant, $elem) = (AnyStream::F32 as fn(_) -> _, Elem::F32);
                $body
            }
            Values::F64($v) => {
                let ($variant, $elem) = (AnyStream::F64 as fn(_) -> _, Elem::F64);
                $body
            }
            Values::Str($v) => {
                let ($variant, $elem) = (AnyStream::Str as fn(_) -> _, Elem::Str);
                $body
            }
        }
    };
}

impl AnyStream<'_> {
    fn push(&mut self, values: Values, at: &str, store: &str) -> Result<()> {
        let mismatch = |found: &Values| DataError::DataType {
            store: store.into(),
            path: at.into(),
            found: found.type_name().into(),
            expected: "the type of the first slice".into(),
        };
        match (self, values) {
            (AnyStream::Bool(s), Values::Bool(v)) => s.push(&v),
            (AnyStream::I8(s), Values::I8(v)) => s.push(&v),
            (AnyStream::I16(s), Values::I16(v)) => s.push(&v),
            (AnyStream::I32(s), Values::I32(v)) => s.push(&v),
            (AnyStream::I64(s), Values::I64(v)) => s.push(&v),
            (AnyStream::U8(s), Values::U8(v)) => s.push(&v),
            (AnyStream::U16(s), Values::U16(v)) => s.push(&v),
            (AnyStream::U32(s), Values::U32(v)) => s.push(&v),
            (AnyStream::U64(s), Values::U64(v)) => s.push(&v),
            (AnyStream::F32(s), Values::F32(v)) => s.push(&v),
            (AnyStream::F64(s), Values::F64(v)) => s.push(&v),
            (AnyStream::Str(s), Values::Str(v)) => s.push(&v),
            (_, other) => Err(mismatch(&other)),
        }
    }

    fn finish(self) -> Result<u64> {
        match self {
            AnyStream::Bool(s) => s.finish(),
            AnyStream::I8(s) => s.finish(),
            AnyStream::I16(s) => s.finish(),
            AnyStream::I32(s) => s.finish(),
            AnyStream::I64(s) => s.finish(),
            AnyStream::U8(s) => s.finish(),
            AnyStream::U16(s) => s.finish(),
            AnyStream::U32(s) => s.finish(),
            AnyStream::U64(s) => s.finish(),
            AnyStream::F32(s) => s.finish(),
            AnyStream::F64(s) => s.finish(),
            AnyStream::Str(s) => s.finish(),
        }
    }
}

fn element_bytes(values: &Values) -> u64 {
    match values {
        Values::Str(v) => v.iter().map(|s| s.len() as u64).sum(),
        Values::Bool(v) => v.len() as u64,
        other => other.len() as u64 * other.element_size(),
    }
}

/// Copies one array in slices: 1-D by chunk, 2-D by shard-sized row blocks, 0-d whole.
fn copy_array(
    source: &dyn Hierarchy,
    writer: &StoreWriter,
    path: &str,
    shape: &[u64],
    attrs: Value,
) -> Result<u64> {
    let store = writer.store.name();
    let mut bytes = 0;
    match *shape {
        [] => {
            let values = source.read(path, 0..1)?;
            bytes += element_bytes(&values);
            each_type!(values, |v, _variant, elem| {
                let value = v.into_iter().next().ok_or_else(|| DataError::Invalid {
                    store: store.clone(),
                    path: path.into(),
                    problem: "empty scalar".into(),
                })?;
                writer.array_0d(path, elem, value, attrs)?
            });
        }
        [n] => {
            let mut stream: Option<AnyStream<'_>> = None;
            for start in (0..n.max(1)).step_by(CHUNK as usize) {
                let values = source.read(path, start..(start + CHUNK).min(n))?;
                bytes += element_bytes(&values);
                if stream.is_none() {
                    stream = Some(each_type!(&values, |_v, variant, elem| variant(
                        writer.stream_1d(path, elem, attrs.clone())?
                    )));
                }
                if let Some(s) = stream.as_mut() {
                    s.push(values, path, &store)?;
                }
            }
            if let Some(s) = stream {
                s.finish()?;
            }
        }
        [rows, cols] => {
            let mut array = None;
            for start in (0..rows.max(1)).step_by(DENSE_SHARD_ROWS as usize) {
                let end = (start + DENSE_SHARD_ROWS).min(rows);
                let values = source.read(path, start..end)?;
                bytes += element_bytes(&values);
                let subset = [start..end, 0..cols];
                each_type!(values, |v, _variant, elem| {
                    if array.is_none() {
                        array = Some(writer.dense_2d(path, elem, rows, cols, attrs.clone())?);
                    }
                    if let (Some(a), true) = (array.as_ref(), end > start && cols > 0) {
                        a.store_array_subset(&subset, v)
                            .map_err(|e| writer.store.at(path).write(e))?;
                    }
                });
            }
            if let Some(a) = array {
                a.store_metadata()
                    .map_err(|e| writer.store.at(path).write(e))?;
            }
        }
        _ => {
            return Err(DataError::Invalid {
                store,
                path: path.into(),
                problem: format!(
                    "{}-dimensional array; expected at most 2 dimensions",
                    shape.len()
                ),
            });
        }
    }
    Ok(bytes)
}

/// A Zarr store (v2 or v3) as a conversion source.
struct ZarrSource {
    store: Store,
    version: ZarrVersion,
}

impl Hierarchy for ZarrSource {
    fn node(&self, path: &str) -> Result<(Node, Map<String, Value>)> {
        let (kind, attrs) = self
            .store
            .node(self.version, path)?
            .ok_or_else(|| self.store.at(path).missing("node"))?;
        Ok(match kind {
            NodeKind::Group => (Node::Group, attrs),
            NodeKind::Array => {
                let array = self.store.array(path)?;
                // Copying walks the declared shape: one beyond the stored data would spin.
                self.store.check_declared_size(path, &array)?;
                let shape = array.shape().to_vec();
                (Node::Array { shape }, attrs)
            }
        })
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        self.store.children(path)
    }

    fn read(&self, path: &str, rows: Range<u64>) -> Result<Values> {
        let array = self.store.array(path)?;
        read_rows(&self.store, path, &array, rows)
    }
}
