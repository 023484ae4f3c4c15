//! Thin, typed access to Zarr nodes for both format versions: node metadata and attributes as
//! JSON, arrays opened through zarrs, and reads that dispatch on the stored data type so callers
//! get the numeric type they ask for (or an error naming the type that was found).

use std::ops::Range;

use serde_json::{Map, Value};
use zarrs::array::Array;
use zarrs::array::data_type as dt;
use zarrs::storage::ReadableWritableListableStorageTraits;

use crate::error::{At, DataError, Result};
use crate::store::{Store, ZarrVersion};

pub(crate) type ZArray = Array<dyn ReadableWritableListableStorageTraits>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NodeKind {
    Group,
    Array,
}

/// Values of a 1-D (or flattened) array, in the stored element type.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    Bool(Vec<bool>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Str(Vec<String>),
}

macro_rules! each_numeric {
    ($v:expr, $x:ident => $body:expr, $other:pat => $fallback:expr) => {
        match $v {
            Values::I8($x) => $body,
            Values::I16($x) => $body,
            Values::I32($x) => $body,
            Values::I64($x) => $body,
            Values::U8($x) => $body,
            Values::U16($x) => $body,
            Values::U32($x) => $body,
            Values::U64($x) => $body,
            Values::F32($x) => $body,
            Values::F64($x) => $body,
            $other => $fallback,
        }
    };
}

impl Values {
    pub fn len(&self) -> usize {
        match self {
            Values::Bool(v) => v.len(),
            Values::Str(v) => v.len(),
            other => each_numeric!(other, v => v.len(), _ => 0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Values::Bool(_) => "bool",
            Values::I8(_) => "int8",
            Values::I16(_) => "int16",
            Values::I32(_) => "int32",
            Values::I64(_) => "int64",
            Values::U8(_) => "uint8",
            Values::U16(_) => "uint16",
            Values::U32(_) => "uint32",
            Values::U64(_) => "uint64",
            Values::F32(_) => "float32",
            Values::F64(_) => "float64",
            Values::Str(_) => "string",
        }
    }

    /// Bytes per element of numeric types (1 for bool and string characters).
    pub fn element_size(&self) -> u64 {
        match self {
            Values::I16(_) | Values::U16(_) => 2,
            Values::I32(_) | Values::U32(_) | Values::F32(_) => 4,
            Values::I64(_) | Values::U64(_) | Values::F64(_) => 8,
            Values::Bool(_) | Values::I8(_) | Values::U8(_) | Values::Str(_) => 1,
        }
    }

    /// Integer values widened to i64; floats and strings are refused (an index array must be
    /// integral, a silent cast would hide a broken store).
    pub fn into_i64(self) -> std::result::Result<Vec<i64>, &'static str> {
        Ok(match self {
            Values::I8(v) => v.into_iter().map(i64::from).collect(),
            Values::I16(v) => v.into_iter().map(i64::from).collect(),
            Values::I32(v) => v.into_iter().map(i64::from).collect(),
            Values::I64(v) => v,
            Values::U8(v) => v.into_iter().map(i64::from).collect(),
            Values::U16(v) => v.into_iter().map(i64::from).collect(),
            Values::U32(v) => v.into_iter().map(i64::from).collect(),
            Values::U64(v) => v
                .into_iter()
                .map(|x| i64::try_from(x).unwrap_or(i64::MAX))
                .collect(),
            other => return Err(other.type_name()),
        })
    }

    /// Any numeric or boolean values as f32 (count matrices are stored as float32, float64 or
    /// integers; all are counts to us).
    /// Integer values as u32 indices, each checked to be in `0..bound`, in one pass (the hot
    /// path of sparse reads: no intermediate widening).
    pub fn into_indices(self, bound: u64) -> std::result::Result<Vec<u32>, String> {
        fn convert<T: Copy + TryInto<i64>>(
            v: Vec<T>,
            bound: u64,
        ) -> std::result::Result<Vec<u32>, String> {
            let mut out = Vec::with_capacity(v.len());
            let mut bad = None;
            for x in v {
                let i: i64 = x.try_into().unwrap_or(-1);
                if i < 0 || i as u64 >= bound {
                    bad.get_or_insert(i);
                }
                out.push(i as u32);
            }
            match bad {
                None => Ok(out),
                Some(i) => Err(format!(
                    "index {i} out of range, expected 0 <= index < {bound}"
                )),
            }
        }
        match self {
            Values::I32(v) => {
                // Common case: one pass for the check (the max of the values, as u32, catches
                // negatives too), then the same buffer reinterpreted, no copy.
                let max = v.iter().fold(0u32, |m, &i| m.max(i as u32));
                if v.is_empty() || u64::from(max) < bound {
                    Ok(bytemuck::allocation::cast_vec::<i32, u32>(v))
                } else {
                    convert(v, bound)
                }
            }
            Values::I64(v) => convert(v, bound),
            Values::U32(v) => convert(v, bound),
            Values::U64(v) => convert(
                v.into_iter()
                    .map(|x| i64::try_from(x).unwrap_or(-1))
                    .collect(),
                bound,
            ),
            Values::I16(v) => convert(v, bound),
            Values::U16(v) => convert(v, bound),
            Values::I8(v) => convert(v, bound),
            Values::U8(v) => convert(v, bound),
            other => Err(format!(
                "data type {}, expected an integer type",
                other.type_name()
            )),
        }
    }

    #[allow(clippy::unnecessary_cast)] // the macro arm also covers f32 itself
    pub fn into_f32(self) -> std::result::Result<Vec<f32>, &'static str> {
        match self {
            Values::F32(v) => Ok(v),
            Values::Bool(v) => Ok(v.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect()),
            Values::Str(_) => Err("string"),
            other => {
                each_numeric!(other, v => Ok(v.into_iter().map(|x| x as f32).collect()), _ => Err("string"))
            }
        }
    }

    #[allow(clippy::unnecessary_cast)] // the macro arm also covers f64 itself
    pub fn into_f64(self) -> std::result::Result<Vec<f64>, &'static str> {
        match self {
            Values::F64(v) => Ok(v),
            Values::Bool(v) => Ok(v.into_iter().map(|b| if b { 1.0 } else { 0.0 }).collect()),
            Values::Str(_) => Err("string"),
            other => {
                each_numeric!(other, v => Ok(v.into_iter().map(|x| x as f64).collect()), _ => Err("string"))
            }
        }
    }
}

impl Store {
    pub(crate) fn at<'a>(&'a self, path: &'a str) -> At<'a> {
        At {
            store: &self.display,
            path,
        }
    }

    /// The node at `path` ("" is the root): its kind and attributes, None if nothing is there.
    pub(crate) fn node(
        &self,
        version: ZarrVersion,
        path: &str,
    ) -> Result<Option<(NodeKind, Map<String, Value>)>> {
        let key = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}/{name}")
            }
        };
        match version {
            ZarrVersion::V3 => {
                let Some(meta) = self.json(&key("zarr.json"))? else {
                    return Ok(None);
                };
                let kind = match meta.get("node_type").and_then(Value::as_str) {
                    Some("group") => NodeKind::Group,
                    Some("array") => NodeKind::Array,
                    other => {
                        return Err(self.at(path).invalid(format!(
                            "zarr.json node_type is {other:?}, expected \"group\" or \"array\""
                        )));
                    }
                };
                let attrs = meta
                    .get("attributes")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                Ok(Some((kind, attrs)))
            }
            ZarrVersion::V2 => {
                let kind = if self.get_bytes(&key(".zgroup"))?.is_some() {
                    NodeKind::Group
                } else if self.get_bytes(&key(".zarray"))?.is_some() {
                    NodeKind::Array
                } else {
                    return Ok(None);
                };
                let attrs = self
                    .json(&key(".zattrs"))?
                    .and_then(|v| v.as_object().cloned())
                    .unwrap_or_default();
                Ok(Some((kind, attrs)))
            }
        }
    }

    pub(crate) fn json(&self, key: &str) -> Result<Option<Value>> {
        match self.get_bytes(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                self.at(key)
                    .invalid(format!("malformed JSON metadata: {e}"))
            }),
        }
    }

    /// Names of the child nodes of a group, sorted.
    pub(crate) fn children(&self, path: &str) -> Result<Vec<String>> {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let prefix = zarrs::storage::StorePrefix::new(prefix)
            .map_err(|e| self.at(path).invalid(format!("invalid group path: {e}")))?;
        let listing = self
            .storage
            .list_dir(&prefix)
            .map_err(|e| DataError::Storage {
                store: self.display.clone(),
                path: path.into(),
                reason: e.to_string(),
            })?;
        let mut names: Vec<String> = listing
            .prefixes()
            .iter()
            .filter_map(|p| {
                p.as_str()
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .map(str::to_string)
            })
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        Ok(names)
    }

    pub(crate) fn array(&self, path: &str) -> Result<ZArray> {
        Array::open(self.storage.clone(), &format!("/{path}")).map_err(|e| match e {
            zarrs::array::ArrayCreateError::MissingMetadata => self.at(path).missing("array"),
            other => self
                .at(path)
                .invalid(format!("not a readable Zarr array: {other}")),
        })
    }
}

/// The stored data type's name, for messages and `inspect`.
pub(crate) fn dtype_name(array: &ZArray) -> String {
    // zarrs displays "v3name / v2name" (e.g. "int32 / <i4"); the v3 name is the portable one.
    let full = array.data_type().to_string();
    full.split(" / ").next().unwrap_or(&full).to_string()
}

/// Reads elements `range` of a 1-D array, or whole rows `range` of a 2-D array (row-major).
pub(crate) fn read_rows(
    store: &Store,
    path: &str,
    array: &ZArray,
    range: Range<u64>,
) -> Result<Values> {
    // zarrs panics on some corrupt chunks (a length past the end of a vlen-utf8 chunk): a
    // panic while decoding is that array's read error, not the end of the process.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_rows(store, path, array, range)
    }))
    .unwrap_or_else(|_| {
        Err(store
            .at(path)
            .read("the chunk decoder failed on corrupt bytes"))
    })
}

fn decode_rows(store: &Store, path: &str, array: &ZArray, range: Range<u64>) -> Result<Values> {
    let shape = array.shape().to_vec();
    let at = store.at(path);
    // A 0-d array (a scalar) has no rows: it is read whole.
    let subset: Vec<Range<u64>> = match shape.split_first() {
        None => Vec::new(),
        Some((&end, rest)) => {
            if range.end > end || range.start > range.end {
                return Err(at.invalid(format!(
                    "rows {}..{} requested, array has {end}",
                    range.start, range.end
                )));
            }
            std::iter::once(range)
                .chain(rest.iter().map(|&n| 0..n))
                .collect()
        }
    };
    macro_rules! get {
        ($t:ty, $variant:ident) => {
            array
                .retrieve_array_subset::<Vec<$t>>(&subset)
                .map(Values::$variant)
                .map_err(|e| at.read(e))
        };
    }
    let d = array.data_type();
    if d.is::<dt::Float32DataType>() {
        get!(f32, F32)
    } else if d.is::<dt::Float64DataType>() {
        get!(f64, F64)
    } else if d.is::<dt::Int32DataType>() {
        get!(i32, I32)
    } else if d.is::<dt::Int64DataType>() {
        get!(i64, I64)
    } else if d.is::<dt::Int8DataType>() {
        get!(i8, I8)
    } else if d.is::<dt::Int16DataType>() {
        get!(i16, I16)
    } else if d.is::<dt::UInt8DataType>() {
        get!(u8, U8)
    } else if d.is::<dt::UInt16DataType>() {
        get!(u16, U16)
    } else if d.is::<dt::UInt32DataType>() {
        get!(u32, U32)
    } else if d.is::<dt::UInt64DataType>() {
        get!(u64, U64)
    } else if d.is::<dt::BoolDataType>() {
        get!(bool, Bool)
    } else if d.is::<dt::StringDataType>() {
        get!(String, Str)
    } else {
        Err(at.dtype(dtype_name(array), "a numeric, boolean or string type"))
    }
}

/// Reads a whole array.
pub(crate) fn read_all(store: &Store, path: &str) -> Result<Values> {
    let array = store.array(path)?;
    store.check_declared_size(path, &array)?;
    let n = array.shape().first().copied().unwrap_or(0);
    read_rows(store, path, &array, 0..n)
}

impl Store {
    /// Every chunk of `array` is stored: for arrays where a missing chunk is no fill value
    /// but lost data (a sparse matrix's `data` and `indices`, whose entries all hold
    /// something), which would otherwise be read as zeros and trained on.
    pub(crate) fn check_chunks_stored(&self, path: &str, array: &ZArray) -> Result<()> {
        let grid = array.chunk_grid_shape().to_vec();
        let chunks: u64 = grid.iter().product();
        if chunks == 0 {
            return Ok(());
        }
        let prefix = zarrs::storage::StorePrefix::new(format!("{path}/"))
            .map_err(|e| self.at(path).invalid(format!("invalid array path: {e}")))?;
        let stored: std::collections::HashSet<String> = self
            .storage
            .list_prefix(&prefix)
            .map_err(|e| DataError::Storage {
                store: self.display.clone(),
                path: path.into(),
                reason: e.to_string(),
            })?
            .into_iter()
            .map(|k| k.as_str().to_string())
            .collect();
        // Sparse arrays are 1-D: chunk i of the grid.
        let missing = (0..chunks).find(|&i| {
            let key = array.chunk_key(&[i]);
            !stored.contains(key.as_str())
        });
        match missing {
            None => Ok(()),
            Some(i) => Err(self.at(path).invalid(format!(
                "chunk {i} of {chunks} is not stored: its entries would read as zeros (a \
                 sparse matrix's data and indices hold every chunk; the store is incomplete)"
            ))),
        }
    }
}

/// Arrays declaring less than this are read without looking at what is stored.
const UNCHECKED_BYTES: u64 = 64 << 20;
/// How many decoded bytes a stored byte may stand for (compression, fill-value chunks left
/// unwritten) before a declared shape is taken for one beyond the data.
const MAX_EXPANSION: u64 = 1000;

impl Store {
    /// A whole-array read allocates what the metadata declares: beyond `UNCHECKED_BYTES`, the
    /// declared size must be within `MAX_EXPANSION` times the bytes stored under the array, so
    /// a hostile or corrupt shape (10^12 rows over one small chunk) fails here, naming the
    /// array, instead of asking for terabytes.
    pub(crate) fn check_declared_size(&self, path: &str, array: &ZArray) -> Result<()> {
        let elements = array
            .shape()
            .iter()
            .try_fold(1u64, |a, &n| a.checked_mul(n));
        // Strings: at least a length word per element once decoded.
        let width = array.data_type().fixed_size().unwrap_or(8) as u64;
        let declared = elements.and_then(|e| e.checked_mul(width));
        if declared.is_some_and(|d| d <= UNCHECKED_BYTES) {
            return Ok(());
        }
        let prefix = zarrs::storage::StorePrefix::new(format!("{path}/"))
            .map_err(|e| self.at(path).invalid(format!("invalid array path: {e}")))?;
        let stored = self
            .storage
            .size_prefix(&prefix)
            .map_err(|e| DataError::Storage {
                store: self.display.clone(),
                path: path.into(),
                reason: e.to_string(),
            })?;
        match declared {
            Some(d) if d <= stored.saturating_mul(MAX_EXPANSION) => Ok(()),
            _ => Err(self.at(path).invalid(format!(
                "declares shape {:?} ({} bytes decoded) over {stored} stored bytes: a shape \
                 beyond the data (corrupt or hostile metadata)",
                array.shape(),
                declared.map_or("more than 2^64".into(), |d| d.to_string())
            ))),
        }
    }
}

/// Reads a whole 1-D integer array widened to i64.
pub(crate) fn read_i64(store: &Store, path: &str) -> Result<Vec<i64>> {
    read_all(store, path)?
        .into_i64()
        .map_err(|found| store.at(path).dtype(found, "an integer type"))
}

pub(crate) fn encoding_type(attrs: &Map<String, Value>) -> Option<&str> {
    attrs.get("encoding-type").and_then(Value::as_str)
}
