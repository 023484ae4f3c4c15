//! AnnData dataframes (`obs`, `var`): the `_index`, `column-order`, and columns encoded as
//! categorical, (nullable) string, nullable integer/boolean or plain numeric arrays.

use serde_json::Value;

use crate::error::Result;
use crate::store::{Store, ZarrVersion};
use crate::zarr::{NodeKind, Values, encoding_type, read_all};

/// One dataframe column, with missing values kept as missing.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// Codes index into `categories`; -1 marks a missing value (pandas NaN).
    Categorical {
        codes: Vec<i32>,
        categories: Vec<String>,
        ordered: bool,
    },
    Strings(Vec<Option<String>>),
    /// Floating-point values; NaN is pandas' missing value.
    Float(Vec<f64>),
    Int(Vec<Option<i64>>),
    Bool(Vec<Option<bool>>),
}

impl Column {
    pub fn len(&self) -> usize {
        match self {
            Column::Categorical { codes, .. } => codes.len(),
            Column::Strings(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::Int(v) => v.len(),
            Column::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Column::Categorical { .. } => "categorical",
            Column::Strings(_) => "string",
            Column::Float(_) => "float",
            Column::Int(_) => "int",
            Column::Bool(_) => "bool",
        }
    }

    pub fn missing(&self) -> usize {
        match self {
            Column::Categorical { codes, .. } => codes.iter().filter(|&&c| c < 0).count(),
            Column::Strings(v) => v.iter().filter(|x| x.is_none()).count(),
            Column::Float(v) => v.iter().filter(|x| x.is_nan()).count(),
            Column::Int(v) => v.iter().filter(|x| x.is_none()).count(),
            Column::Bool(v) => v.iter().filter(|x| x.is_none()).count(),
        }
    }

    /// The values as numbers (booleans as 0/1), missing values NaN; None for categorical and
    /// string columns.
    pub fn numbers(&self) -> Option<Vec<f64>> {
        match self {
            Column::Float(v) => Some(v.clone()),
            Column::Int(v) => Some(v.iter().map(|x| x.map_or(f64::NAN, |x| x as f64)).collect()),
            Column::Bool(v) => Some(
                v.iter()
                    .map(|x| x.map_or(f64::NAN, |x| if x { 1.0 } else { 0.0 }))
                    .collect(),
            ),
            Column::Categorical { .. } | Column::Strings(_) => None,
        }
    }

    /// Category (or distinct value) counts, in category order for categoricals and first-seen
    /// order otherwise; missing values are not counted. None for numeric columns.
    pub fn value_counts(&self) -> Option<Vec<(String, usize)>> {
        match self {
            Column::Categorical {
                codes, categories, ..
            } => {
                let mut counts = vec![0usize; categories.len()];
                for &c in codes {
                    if let Some(slot) = usize::try_from(c).ok().and_then(|c| counts.get_mut(c)) {
                        *slot += 1;
                    }
                }
                Some(categories.iter().cloned().zip(counts).collect())
            }
            Column::Strings(v) => {
                let mut seen: Vec<(String, usize)> = Vec::new();
                let mut index = std::collections::HashMap::new();
                for s in v.iter().flatten() {
                    let slot = *index.entry(s.clone()).or_insert_with(|| {
                        seen.push((s.clone(), 0));
                        seen.len() - 1
                    });
                    seen[slot].1 += 1;
                }
                Some(seen)
            }
            Column::Bool(v) => {
                let t = v.iter().filter(|x| **x == Some(true)).count();
                let f = v.iter().filter(|x| **x == Some(false)).count();
                Some(vec![("False".into(), f), ("True".into(), t)])
            }
            Column::Float(_) | Column::Int(_) => None,
        }
    }

    /// Integer codes for a categorical-like column (categoricals as stored; strings and bools
    /// by first appearance; integers in ascending order, as pandas' `astype("category")` orders
    /// them) with -1 for missing, and the category names. Used for batch and label covariates.
    pub fn codes(&self) -> Option<(Vec<i32>, Vec<String>)> {
        match self {
            Column::Categorical {
                codes, categories, ..
            } => Some((codes.clone(), categories.clone())),
            Column::Int(v) => {
                let mut values: Vec<i64> = v.iter().flatten().copied().collect();
                values.sort_unstable();
                values.dedup();
                let codes = v
                    .iter()
                    .map(|x| x.map_or(-1, |x| values.binary_search(&x).map_or(-1, |i| i as i32)))
                    .collect();
                Some((codes, values.iter().map(i64::to_string).collect()))
            }
            Column::Strings(_) | Column::Bool(_) => {
                let names: Vec<String> = self.value_counts()?.into_iter().map(|(n, _)| n).collect();
                let lookup: std::collections::HashMap<&str, i32> = names
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.as_str(), i as i32))
                    .collect();
                let codes = (0..self.len())
                    .map(|i| {
                        self.label(i)
                            .and_then(|s| lookup.get(s.as_str()).copied())
                            .unwrap_or(-1)
                    })
                    .collect();
                Some((codes, names))
            }
            Column::Float(_) => None,
        }
    }

    /// The column at other rows: `rows[i]` is the 1-based row of entry i, 0 for a missing
    /// value (a MuData obsmap).
    pub fn gather(&self, rows: &[u32]) -> Column {
        fn take<T: Clone>(v: &[T], rows: &[u32], missing: T) -> Vec<T> {
            rows.iter()
                .map(|&r| match r {
                    0 => missing.clone(),
                    r => v[r as usize - 1].clone(),
                })
                .collect()
        }
        match self {
            Column::Categorical {
                codes,
                categories,
                ordered,
            } => Column::Categorical {
                codes: take(codes, rows, -1),
                categories: categories.clone(),
                ordered: *ordered,
            },
            Column::Strings(v) => Column::Strings(take(v, rows, None)),
            Column::Float(v) => Column::Float(take(v, rows, f64::NAN)),
            Column::Int(v) => Column::Int(take(v, rows, None)),
            Column::Bool(v) => Column::Bool(take(v, rows, None)),
        }
    }

    fn label(&self, i: usize) -> Option<String> {
        match self {
            Column::Strings(v) => v[i].clone(),
            Column::Bool(v) => v[i].map(|b| if b { "True".into() } else { "False".into() }),
            _ => None,
        }
    }
}

/// A dataframe read from a store: the row index and the columns in `column-order`.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFrame {
    pub index: Vec<String>,
    pub columns: Vec<(String, Column)>,
}

impl DataFrame {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }
}

fn dataframe_attrs(
    store: &Store,
    version: ZarrVersion,
    path: &str,
) -> Result<serde_json::Map<String, Value>> {
    let at = store.at(path);
    let Some((kind, attrs)) = store.node(version, path)? else {
        return Err(at.missing("dataframe group"));
    };
    match (kind, encoding_type(&attrs)) {
        (NodeKind::Group, Some("dataframe")) => Ok(attrs),
        (_, found) => Err(at.encoding(found.unwrap_or("<none>"), "'dataframe' (a group)")),
    }
}

fn index_of(
    store: &Store,
    version: ZarrVersion,
    path: &str,
    attrs: &serde_json::Map<String, Value>,
) -> Result<Vec<String>> {
    let index_name = attrs
        .get("_index")
        .and_then(Value::as_str)
        .unwrap_or("_index");
    Ok(
        match read_column(store, version, &format!("{path}/{index_name}"))? {
            Column::Strings(v) => v.into_iter().map(Option::unwrap_or_default).collect(),
            Column::Categorical {
                codes, categories, ..
            } => codes
                .into_iter()
                .map(|c| {
                    usize::try_from(c)
                        .ok()
                        .and_then(|c| categories.get(c).cloned())
                        .unwrap_or_default()
                })
                .collect(),
            other => (0..other.len()).map(|i| i.to_string()).collect(),
        },
    )
}

/// Reads only a dataframe's index (one array): the obs or var names.
pub(crate) fn read_index(store: &Store, version: ZarrVersion, path: &str) -> Result<Vec<String>> {
    let attrs = dataframe_attrs(store, version, path)?;
    index_of(store, version, path, &attrs)
}

/// Reads the dataframe group at `path` (e.g. "obs", "mod/rna/var").
pub(crate) fn read_dataframe(store: &Store, version: ZarrVersion, path: &str) -> Result<DataFrame> {
    let at = store.at(path);
    let attrs = dataframe_attrs(store, version, path)?;
    let index = index_of(store, version, path, &attrs)?;
    let order: Vec<String> = match attrs.get("column-order") {
        None => Vec::new(),
        Some(Value::Array(names)) => names
            .iter()
            .map(|n| {
                n.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| at.invalid("column-order must list strings"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(at.invalid("column-order must be a list of column names")),
    };
    let mut columns = Vec::with_capacity(order.len());
    for name in order {
        let column_path = format!("{path}/{name}");
        let column = read_column(store, version, &column_path)?;
        if column.len() != index.len() {
            return Err(store.at(&column_path).invalid(format!(
                "column has {} values, the dataframe index has {}",
                column.len(),
                index.len()
            )));
        }
        columns.push((name, column));
    }
    Ok(DataFrame { index, columns })
}

/// The column encodings `read_column` understands, for its error.
const COLUMN_ENCODINGS: &str = "one of 'array', 'string-array', 'categorical', \
     'nullable-string-array', 'nullable-integer', 'nullable-boolean'";

/// Reads one column element: an array or an encoded group.
pub(crate) fn read_column(store: &Store, version: ZarrVersion, path: &str) -> Result<Column> {
    let at = store.at(path);
    let Some((kind, attrs)) = store.node(version, path)? else {
        return Err(at.missing("dataframe column"));
    };
    let encoding = encoding_type(&attrs).unwrap_or("<none>");
    match (kind, encoding) {
        (NodeKind::Array, "string-array") => match read_all(store, path)? {
            Values::Str(v) => Ok(Column::Strings(v.into_iter().map(Some).collect())),
            other => Err(at.dtype(other.type_name(), "string")),
        },
        (NodeKind::Array, "array") => Ok(match read_all(store, path)? {
            Values::Str(v) => Column::Strings(v.into_iter().map(Some).collect()),
            Values::Bool(v) => Column::Bool(v.into_iter().map(Some).collect()),
            Values::F32(v) => Column::Float(v.into_iter().map(f64::from).collect()),
            Values::F64(v) => Column::Float(v),
            other => Column::Int(
                other
                    .into_i64()
                    .map_err(|t| at.dtype(t, "numeric"))?
                    .into_iter()
                    .map(Some)
                    .collect(),
            ),
        }),
        (NodeKind::Group, "categorical") => {
            let codes = read_all(store, &format!("{path}/codes"))?
                .into_i64()
                .map_err(|t| {
                    store
                        .at(&format!("{path}/codes"))
                        .dtype(t, "an integer type")
                })?;
            let categories_path = format!("{path}/categories");
            let categories = match read_column(store, version, &categories_path)? {
                Column::Strings(v) => v
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect::<Vec<_>>(),
                Column::Int(v) => v
                    .into_iter()
                    .map(|x| x.map(|x| x.to_string()).unwrap_or_default())
                    .collect(),
                Column::Float(v) => v.into_iter().map(|x| x.to_string()).collect(),
                Column::Bool(v) => v
                    .into_iter()
                    .map(|x| format!("{}", x.unwrap_or_default()))
                    .collect(),
                Column::Categorical { .. } => {
                    return Err(store.at(&categories_path).invalid("nested categorical"));
                }
            };
            let n = categories.len() as i64;
            if let Some(bad) = codes.iter().find(|&&c| c < -1 || c >= n) {
                return Err(store.at(&format!("{path}/codes")).invalid(format!(
                    "code {bad} out of range for {n} categories (expected -1..{n})"
                )));
            }
            let ordered = attrs
                .get("ordered")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            Ok(Column::Categorical {
                codes: codes.into_iter().map(|c| c as i32).collect(),
                categories,
                ordered,
            })
        }
        (NodeKind::Group, "nullable-string-array" | "nullable-integer" | "nullable-boolean") => {
            let values_path = format!("{path}/values");
            let mask = match read_all(store, &format!("{path}/mask"))? {
                Values::Bool(m) => m,
                other => {
                    return Err(store
                        .at(&format!("{path}/mask"))
                        .dtype(other.type_name(), "bool"));
                }
            };
            let values = read_all(store, &values_path)?;
            if values.len() != mask.len() {
                return Err(at.invalid(format!(
                    "values has {} entries, mask has {}",
                    values.len(),
                    mask.len()
                )));
            }
            let keep = |i: usize| !mask[i];
            Ok(match (encoding, values) {
                ("nullable-string-array", Values::Str(v)) => Column::Strings(
                    v.into_iter()
                        .enumerate()
                        .map(|(i, s)| keep(i).then_some(s))
                        .collect(),
                ),
                ("nullable-boolean", Values::Bool(v)) => Column::Bool(
                    v.into_iter()
                        .enumerate()
                        .map(|(i, b)| keep(i).then_some(b))
                        .collect(),
                ),
                ("nullable-integer", v) => {
                    let found = v.type_name();
                    let ints = v
                        .into_i64()
                        .map_err(|_| store.at(&values_path).dtype(found, "an integer type"))?;
                    Column::Int(
                        ints.into_iter()
                            .enumerate()
                            .map(|(i, x)| keep(i).then_some(x))
                            .collect(),
                    )
                }
                (_, v) => {
                    return Err(store
                        .at(&values_path)
                        .dtype(v.type_name(), format!("the type {encoding} holds")));
                }
            })
        }
        (_, found) => Err(at.encoding(found, COLUMN_ENCODINGS)),
    }
}
