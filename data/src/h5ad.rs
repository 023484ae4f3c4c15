//! `.h5ad` / `.h5mu` (HDF5) files as a conversion source: groups, datasets and attributes read
//! with the system HDF5 library, datasets in row slices.

use std::ops::Range;
use std::path::Path;

use hdf5::types::{FloatSize, IntSize, TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Dataset, H5Type};
use serde_json::{Map, Value, json};

use crate::convert::{Hierarchy, Node};
use crate::error::{DataError, Result};
use crate::zarr::Values;

pub(crate) struct H5Source {
    name: String,
    file: hdf5::File,
}

impl H5Source {
    pub(crate) fn open(input: &Path) -> Result<H5Source> {
        let name = input.display().to_string();
        let file = hdf5::File::open(input).map_err(|e| DataError::Open {
            store: name.clone(),
            reason: format!("not a readable HDF5 file: {e}"),
        })?;
        Ok(H5Source { name, file })
    }

    fn err(&self, path: &str, e: impl std::fmt::Display) -> DataError {
        DataError::Read {
            store: self.name.clone(),
            path: path.into(),
            reason: e.to_string(),
        }
    }

    fn location(&self, path: &str) -> Result<Location> {
        if path.is_empty() {
            return Ok(Location::Group(
                self.file.as_group().map_err(|e| self.err(path, e))?,
            ));
        }
        if let Ok(group) = self.file.group(path) {
            return Ok(Location::Group(group));
        }
        self.file
            .dataset(path)
            .map(Location::Dataset)
            .map_err(|e| self.err(path, e))
    }
}

enum Location {
    Group(hdf5::Group),
    Dataset(Dataset),
}

impl Hierarchy for H5Source {
    fn node(&self, path: &str) -> Result<(Node, Map<String, Value>)> {
        match self.location(path)? {
            Location::Group(g) => Ok((Node::Group, self.attributes(path, &g)?)),
            Location::Dataset(d) => Ok((
                Node::Array {
                    shape: d.shape().into_iter().map(|n| n as u64).collect(),
                },
                self.attributes(path, &d)?,
            )),
        }
    }

    fn children(&self, path: &str) -> Result<Vec<String>> {
        match self.location(path)? {
            Location::Group(g) => g.member_names().map_err(|e| self.err(path, e)),
            Location::Dataset(_) => Ok(Vec::new()),
        }
    }

    fn read(&self, path: &str, rows: Range<u64>) -> Result<Values> {
        let Location::Dataset(ds) = self.location(path)? else {
            return Err(self.err(path, "a group, not a dataset"));
        };
        let descriptor = ds
            .dtype()
            .and_then(|t| t.to_descriptor())
            .map_err(|e| self.err(path, e))?;
        let rows = rows.start as usize..rows.end as usize;
        macro_rules! read {
            ($t:ty, $variant:ident) => {
                read_rows::<$t>(&ds, rows)
                    .map(Values::$variant)
                    .map_err(|e| self.err(path, e))
            };
        }
        match descriptor {
            TypeDescriptor::Float(FloatSize::U4) => read!(f32, F32),
            TypeDescriptor::Float(FloatSize::U8) => read!(f64, F64),
            TypeDescriptor::Integer(IntSize::U1) => read!(i8, I8),
            TypeDescriptor::Integer(IntSize::U2) => read!(i16, I16),
            TypeDescriptor::Integer(IntSize::U4) => read!(i32, I32),
            TypeDescriptor::Integer(IntSize::U8) => read!(i64, I64),
            TypeDescriptor::Unsigned(IntSize::U1) => read!(u8, U8),
            TypeDescriptor::Unsigned(IntSize::U2) => read!(u16, U16),
            TypeDescriptor::Unsigned(IntSize::U4) => read!(u32, U32),
            TypeDescriptor::Unsigned(IntSize::U8) => read!(u64, U64),
            TypeDescriptor::Boolean => read!(bool, Bool),
            TypeDescriptor::VarLenUnicode => read_rows::<VarLenUnicode>(&ds, rows)
                .map(|v| Values::Str(v.into_iter().map(|s| s.as_str().to_string()).collect()))
                .map_err(|e| self.err(path, e)),
            TypeDescriptor::VarLenAscii => read_rows::<VarLenAscii>(&ds, rows)
                .map(|v| Values::Str(v.into_iter().map(|s| s.as_str().to_string()).collect()))
                .map_err(|e| self.err(path, e)),
            other => Err(DataError::DataType {
                store: self.name.clone(),
                path: path.into(),
                found: format!("HDF5 {other:?}"),
                expected: "numbers, booleans or variable-length strings".into(),
            }),
        }
    }
}

/// Rows of a 0-, 1- or 2-D dataset, row-major.
fn read_rows<T: H5Type>(ds: &Dataset, rows: Range<usize>) -> hdf5::Result<Vec<T>> {
    match ds.ndim() {
        0 => Ok(vec![ds.read_scalar::<T>()?]),
        1 => Ok(ds.read_slice_1d::<T, _>(rows)?.into_iter().collect()),
        _ => Ok(ds.read_slice_2d::<T, _>((rows, ..))?.into_iter().collect()),
    }
}

impl H5Source {
    /// An object's attributes as JSON, the way anndata writes them to Zarr.
    fn attributes(&self, path: &str, location: &hdf5::Location) -> Result<Map<String, Value>> {
        let mut out = Map::new();
        for name in location.attr_names().map_err(|e| self.err(path, e))? {
            let at = format!("{path}@{name}");
            let attr = location.attr(&name).map_err(|e| self.err(&at, e))?;
            let descriptor = attr
                .dtype()
                .and_then(|t| t.to_descriptor())
                .map_err(|e| self.err(&at, e))?;
            let scalar = attr.shape().is_empty();
            macro_rules! read {
                ($t:ty, $to:expr) => {{
                    if scalar {
                        $to(attr.read_scalar::<$t>().map_err(|e| self.err(&at, e))?)
                    } else {
                        Value::Array(
                            attr.read_raw::<$t>()
                                .map_err(|e| self.err(&at, e))?
                                .into_iter()
                                .map($to)
                                .collect(),
                        )
                    }
                }};
            }
            let value = match descriptor {
                TypeDescriptor::VarLenUnicode => {
                    read!(VarLenUnicode, |s: VarLenUnicode| json!(s.as_str()))
                }
                TypeDescriptor::VarLenAscii => {
                    read!(VarLenAscii, |s: VarLenAscii| json!(s.as_str()))
                }
                TypeDescriptor::Boolean => read!(bool, |b: bool| json!(b)),
                TypeDescriptor::Integer(_) => read!(i64, |x: i64| json!(x)),
                TypeDescriptor::Unsigned(_) => read!(u64, |x: u64| json!(x)),
                TypeDescriptor::Float(_) => read!(f64, |x: f64| json!(x)),
                other => {
                    return Err(DataError::DataType {
                        store: self.name.clone(),
                        path: at,
                        found: format!("HDF5 attribute {other:?}"),
                        expected: "a string, boolean or number (or an array of them)".into(),
                    });
                }
            };
            out.insert(name, value);
        }
        Ok(out)
    }
}
