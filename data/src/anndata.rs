//! AnnData and MuData stores as anndata (0.10-0.13) and mudata write them, Zarr v2 or v3.
//! Opening reads metadata and the obs/var indices only; matrices and columns are read on demand.

use crate::dataframe::{
    Column, DataFrame, read_column, read_dataframe, read_index as read_dataframe_index,
};
use crate::error::{DataError, Result};
use crate::matrix::Matrix;
use crate::store::{Store, ZarrVersion};
use crate::zarr::{NodeKind, Values, encoding_type, read_all, read_rows};

/// The largest count float32 holds exactly (2^24): a larger value is no UMI count (1e30 is a
/// corrupt or transformed matrix), and would lose its integer part anyway.
pub const MAX_EXACT_COUNT: f32 = 16_777_216.0;

/// One AnnData object: a whole store, or a modality group `mod/<name>` of a MuData store.
#[derive(Debug, Clone)]
pub struct AnnData {
    pub store: Store,
    pub version: ZarrVersion,
    /// Group path inside the store, "" for the root.
    pub path: String,
    pub obs_names: Vec<String>,
    pub var_names: Vec<String>,
}

impl AnnData {
    /// Opens the AnnData at the root of a store.
    pub fn open(location: &str) -> Result<AnnData> {
        let store = Store::open(location)?;
        let version = store.zarr_version()?.unwrap_or(ZarrVersion::V3);
        AnnData::open_group(store, version, "")
    }

    pub(crate) fn open_group(store: Store, version: ZarrVersion, path: &str) -> Result<AnnData> {
        let at = store.at(if path.is_empty() { "/" } else { path });
        let Some((kind, attrs)) = store.node(version, path)? else {
            return Err(at.missing("AnnData group"));
        };
        match (kind, encoding_type(&attrs)) {
            (NodeKind::Group, Some("anndata")) => {}
            (_, found) => return Err(at.encoding(found.unwrap_or("<none>"), "'anndata' (a group)")),
        }
        let obs_names = read_dataframe_index(&store, version, &join(path, "obs"))?;
        let var_names = read_dataframe_index(&store, version, &join(path, "var"))?;
        let adata = AnnData {
            store,
            version,
            path: path.to_string(),
            obs_names,
            var_names,
        };
        adata.matrix_if_present("X", adata.n_vars())?;
        Ok(adata)
    }

    pub fn n_obs(&self) -> u64 {
        self.obs_names.len() as u64
    }

    pub fn n_vars(&self) -> u64 {
        self.var_names.len() as u64
    }

    /// Element path inside the store, e.g. "X" -> "mod/rna/X".
    pub fn element(&self, name: &str) -> String {
        join(&self.path, name)
    }

    pub fn x(&self) -> Result<Matrix> {
        self.matrix_if_present("X", self.n_vars())?
            .ok_or_else(|| self.store.at(&self.element("X")).missing("X matrix"))
    }

    /// Whether the element `name` (relative to this AnnData: "obsm/X_tessera") exists.
    pub fn has_element(&self, name: &str) -> Result<bool> {
        Ok(self
            .store
            .node(self.version, &self.element(name))?
            .is_some())
    }

    /// `uns/<key>` as strings, when it is a 1-D array of strings (None when absent).
    pub fn uns_strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        let path = self.element(&format!("uns/{key}"));
        if self.store.node(self.version, &path)?.is_none() {
            return Ok(None);
        }
        match read_all(&self.store, &path)? {
            Values::Str(v) => Ok(Some(v)),
            _ => Err(self.store.at(&path).invalid("expected an array of strings")),
        }
    }

    /// The first value of `matrix`'s (X, layers/<name>) first `rows` cells that is not a count
    /// (negative, not an integer, or beyond `MAX_EXACT_COUNT`), with its cell and gene: count likelihoods expect raw counts, and scvi-tools
    /// warns on the same check. None when every value read is a count.
    pub fn first_non_count(
        &self,
        matrix: &str,
        rows: u64,
    ) -> Result<Option<(String, String, f32)>> {
        let x = self.matrix(matrix)?;
        let csr = x.read_rows(&self.store, 0..rows.min(x.shape.0))?;
        let found = (0..csr.n_rows).find_map(|r| {
            let (genes, values) = csr.row(r);
            genes
                .iter()
                .zip(values)
                .find(|(_, v)| **v < 0.0 || v.fract() != 0.0 || **v > MAX_EXACT_COUNT)
                .map(|(&g, &v)| (r, g as usize, v))
        });
        Ok(found.map(|(r, g, v)| {
            let name = |names: &[String], i: usize| names.get(i).cloned().unwrap_or_default();
            (name(&self.obs_names, r), name(&self.var_names, g), v)
        }))
    }

    /// A layer (`layers/<name>`) with the shape of X.
    pub fn layer(&self, name: &str) -> Result<Matrix> {
        let path = format!("layers/{name}");
        let m = self
            .matrix_if_present(&path, self.n_vars())?
            .ok_or_else(|| self.store.at(&self.element(&path)).missing("layer"))?;
        Ok(m)
    }

    /// `raw/X` with its own variables (`raw/var`).
    pub fn raw_x(&self) -> Result<Option<(Matrix, Vec<String>)>> {
        if !self.has_element("raw/X")? {
            return Ok(None);
        }
        let raw_vars = read_dataframe_index(&self.store, self.version, &self.element("raw/var"))?;
        let m = self.matrix_if_present("raw/X", raw_vars.len() as u64)?;
        Ok(m.map(|m| (m, raw_vars)))
    }

    /// A matrix by its user-facing name: "X", "raw/X", "layers/<name>" or the cell-cell
    /// "obsp/<name>".
    pub fn matrix(&self, name: &str) -> Result<Matrix> {
        match name {
            "X" => self.x(),
            "raw/X" => self.raw_x()?.map(|(m, _)| m).ok_or_else(|| {
                self.store
                    .at(&self.element("raw/X"))
                    .missing("raw/X matrix")
            }),
            other if other.starts_with("obsp/") => {
                let m = self
                    .matrix_if_present(other, self.n_obs())?
                    .ok_or_else(|| self.store.at(&self.element(other)).missing("obsp matrix"))?;
                Ok(m)
            }
            other => match other.strip_prefix("layers/") {
                Some(layer) => self.layer(layer),
                None => Err(self
                    .store
                    .at(&self.element(other))
                    .invalid("expected X, raw/X, layers/<name> or obsp/<name>")),
            },
        }
    }

    /// The matrix `name` when present, its declared shape checked against n_obs x `n_cols`
    /// before anything of it is read.
    fn matrix_if_present(&self, name: &str, n_cols: u64) -> Result<Option<Matrix>> {
        let path = self.element(name);
        if self.store.node(self.version, &path)?.is_none() && !self.store.has_attached(&path) {
            return Ok(None);
        }
        Matrix::open(&self.store, self.version, &path, (self.n_obs(), n_cols)).map(Some)
    }

    pub fn obs(&self) -> Result<DataFrame> {
        read_dataframe(&self.store, self.version, &self.element("obs"))
    }

    pub fn var(&self) -> Result<DataFrame> {
        read_dataframe(&self.store, self.version, &self.element("var"))
    }

    /// Whether obs has a column `name` (from the metadata: a column that is there but broken
    /// is reported when read, never taken for absent).
    pub fn has_obs_column(&self, name: &str) -> Result<bool> {
        self.has_element(&format!("obs/{name}"))
    }

    /// An obs column, which must hold a value per cell.
    pub fn obs_column(&self, name: &str) -> Result<Column> {
        let path = self.element(&format!("obs/{name}"));
        column_of_length(&self.store, self.version, &path, self.n_obs())
    }

    /// Keys of a mapping group (`obsm`, `layers`, `varm`, ...), empty when the group is absent.
    pub fn keys(&self, group: &str) -> Result<Vec<String>> {
        let path = self.element(group);
        if self.store.node(self.version, &path)?.is_none() {
            return Ok(Vec::new());
        }
        self.store.children(&path)
    }

    /// Shape of a dense `obsm` entry; None for other encodings (dataframes, sparse).
    pub fn obsm_shape(&self, key: &str) -> Result<Option<(u64, usize)>> {
        let path = self.element(&format!("obsm/{key}"));
        let at = self.store.at(&path);
        match self.store.node(self.version, &path)? {
            None => Err(at.missing("obsm entry")),
            Some((NodeKind::Array, attrs))
                if matches!(encoding_type(&attrs), Some("array") | None) =>
            {
                match self.store.array(&path)?.shape() {
                    &[r, c] => Ok(Some((r, c as usize))),
                    &[r] => Ok(Some((r, 1))),
                    other => Err(at.invalid(format!("shape {other:?}, expected (n_obs, k)"))),
                }
            }
            Some(_) => Ok(None),
        }
    }

    /// A dense `obsm` entry as row-major f32 with its column count.
    pub fn obsm(&self, key: &str) -> Result<(Vec<f32>, usize)> {
        let path = self.element(&format!("obsm/{key}"));
        let at = self.store.at(&path);
        let Some((rows, cols)) = self.obsm_shape(key)? else {
            let (_, attrs) = self
                .store
                .node(self.version, &path)?
                .unwrap_or((NodeKind::Group, Default::default()));
            return Err(at.encoding(encoding_type(&attrs).unwrap_or("<none>"), "'array' (dense)"));
        };
        if rows != self.n_obs() {
            return Err(at.invalid(format!(
                "has {rows} rows, expected n_obs = {}",
                self.n_obs()
            )));
        }
        let array = self.store.array(&path)?;
        let values = read_rows(&self.store, &path, &array, 0..rows)?
            .into_f32()
            .map_err(|t| at.dtype(t, "numeric"))?;
        Ok((values, cols))
    }
}

/// A MuData store: modalities under `mod/`, the global `obs`, and `obsmap/<mod>` (1-based row
/// of each global cell in the modality, 0 = the cell has no data for it).
#[derive(Debug, Clone)]
pub struct MuData {
    pub store: Store,
    pub version: ZarrVersion,
    pub obs_names: Vec<String>,
    pub modalities: Vec<(String, AnnData)>,
    /// Per modality, the 1-based obsmap in global cell order.
    pub obsmap: Vec<Vec<u32>>,
}

impl MuData {
    pub fn open(location: &str) -> Result<MuData> {
        let store = Store::open(location)?;
        let version = store.zarr_version()?.unwrap_or(ZarrVersion::V3);
        MuData::open_store(store, version)
    }

    fn open_store(store: Store, version: ZarrVersion) -> Result<MuData> {
        let Some((_, attrs)) = store.node(version, "")? else {
            return Err(store.at("/").missing("root group"));
        };
        if encoding_type(&attrs) != Some("MuData") {
            return Err(store
                .at("/")
                .encoding(encoding_type(&attrs).unwrap_or("<none>"), "'MuData'"));
        }
        let obs_names = read_dataframe_index(&store, version, "obs")?;
        let Some((_, mod_attrs)) = store.node(version, "mod")? else {
            return Err(store.at("mod").missing("modality group"));
        };
        let names: Vec<String> = match mod_attrs.get("mod-order").and_then(|v| v.as_array()) {
            Some(order) => order
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            None => store.children("mod")?,
        };
        let mut modalities = Vec::with_capacity(names.len());
        let mut obsmap = Vec::with_capacity(names.len());
        for name in names {
            let adata = AnnData::open_group(store.clone(), version, &format!("mod/{name}"))?;
            let map_path = format!("obsmap/{name}");
            let map = read_all(&store, &map_path)?
                .into_i64()
                .map_err(|t| store.at(&map_path).dtype(t, "an integer type"))?;
            if map.len() != obs_names.len() {
                return Err(store.at(&map_path).invalid(format!(
                    "has {} entries, expected n_obs = {}",
                    map.len(),
                    obs_names.len()
                )));
            }
            let n_mod = adata.n_obs() as i64;
            if let Some(bad) = map.iter().find(|&&m| m < 0 || m > n_mod) {
                return Err(store.at(&map_path).invalid(format!(
                    "entry {bad} out of range, expected 0..={n_mod} (1-based rows, 0 = absent)"
                )));
            }
            check_obsmap(&store, &map_path, &map, &obs_names, &adata)?;
            obsmap.push(map.into_iter().map(|m| m as u32).collect());
            modalities.push((name, adata));
        }
        Ok(MuData {
            store,
            version,
            obs_names,
            modalities,
            obsmap,
        })
    }

    pub fn n_obs(&self) -> u64 {
        self.obs_names.len() as u64
    }

    pub fn modality(&self, name: &str) -> Result<(usize, &AnnData)> {
        self.modalities
            .iter()
            .enumerate()
            .find(|(_, (n, _))| n == name)
            .map(|(i, (_, a))| (i, a))
            .ok_or_else(|| {
                let known: Vec<&str> = self.modalities.iter().map(|(n, _)| n.as_str()).collect();
                DataError::Missing {
                    store: self.store.name(),
                    path: format!("mod/{name}"),
                    expected: format!("modality (the store has: {})", known.join(", ")),
                }
            })
    }

    /// An obs column over every cell: the root's, else that of the first modality whose obs has
    /// it, mapped to the global cells through the obsmap (missing where a cell lacks that
    /// modality). mudata copies modality columns to the root only on `update()`; stores written
    /// without it keep them in the modality alone.
    pub fn obs_column(&self, key: &str) -> Result<Column> {
        match column_of_length(
            &self.store,
            self.version,
            &format!("obs/{key}"),
            self.n_obs(),
        ) {
            Err(DataError::Missing { .. }) => {}
            found => return found,
        }
        for (i, (_, adata)) in self.modalities.iter().enumerate() {
            match adata.obs_column(key) {
                Err(DataError::Missing { .. }) => {}
                found => return found.map(|c| c.gather(&self.obsmap[i])),
            }
        }
        let names: Vec<&str> = self.modalities.iter().map(|(n, _)| n.as_str()).collect();
        Err(DataError::Missing {
            store: self.store.name(),
            path: format!("obs/{key}"),
            expected: format!(
                "dataframe column (looked in obs and in mod/{{{}}}/obs)",
                names.join(",")
            ),
        })
    }

    /// The root's global `obs` and `obsm` as an AnnData handle (no X, no var): where a joint
    /// embedding of every cell is read and written.
    pub fn root(&self) -> AnnData {
        AnnData {
            store: self.store.clone(),
            version: self.version,
            path: String::new(),
            obs_names: self.obs_names.clone(),
            var_names: Vec::new(),
        }
    }

    /// Which global cells have data for modality `i`.
    pub fn presence(&self, i: usize) -> Vec<bool> {
        self.obsmap[i].iter().map(|&m| m > 0).collect()
    }
}

/// A store of either kind, detected from the root's encoding-type.
#[derive(Debug, Clone)]
pub enum Dataset {
    AnnData(AnnData),
    MuData(MuData),
}

impl Dataset {
    pub fn open(location: &str) -> Result<Dataset> {
        let store = Store::open(location)?;
        let version = store.zarr_version()?.unwrap_or(ZarrVersion::V3);
        let Some((_, attrs)) = store.node(version, "")? else {
            return Err(store.at("/").missing("root group"));
        };
        match encoding_type(&attrs) {
            Some("anndata") => AnnData::open_group(store, version, "").map(Dataset::AnnData),
            Some("MuData") => MuData::open_store(store, version).map(Dataset::MuData),
            found => Err(store
                .at("/")
                .encoding(found.unwrap_or("<none>"), "'anndata' or 'MuData'")),
        }
    }

    pub fn store(&self) -> &Store {
        match self {
            Dataset::AnnData(a) => &a.store,
            Dataset::MuData(m) => &m.store,
        }
    }

    pub fn n_obs(&self) -> u64 {
        match self {
            Dataset::AnnData(a) => a.n_obs(),
            Dataset::MuData(m) => m.n_obs(),
        }
    }

    /// Whether the obs column `name` exists where `obs_column` would read it (a MuData's root
    /// obs or a modality's).
    pub fn has_obs_column(&self, name: &str) -> Result<bool> {
        match self {
            Dataset::AnnData(a) => a.has_obs_column(name),
            Dataset::MuData(m) => {
                let root = format!("obs/{name}");
                if m.store.node(m.version, &root)?.is_some() {
                    return Ok(true);
                }
                for (_, modality) in &m.modalities {
                    if modality.has_obs_column(name)? {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        }
    }
}

/// An obsmap (1-based modality row per cell, 0 = absent, already in range) must map each of
/// the modality's cells from exactly one cell of the same name: a row mapped twice would train
/// one cell's counts as two, a row never mapped is a cell outside the MuData's obs.
fn check_obsmap(
    store: &Store,
    path: &str,
    map: &[i64],
    obs_names: &[String],
    modality: &AnnData,
) -> Result<()> {
    let mut mapped_from: Vec<Option<usize>> = vec![None; modality.obs_names.len()];
    for (cell, &m) in map.iter().enumerate().filter(|(_, m)| **m > 0) {
        let row = (m - 1) as usize;
        if let Some(first) = mapped_from[row] {
            return Err(store.at(path).invalid(format!(
                "cells {first} and {cell} both map to row {row} of the modality (one cell each)"
            )));
        }
        if modality.obs_names[row] != obs_names[cell] {
            return Err(store.at(path).invalid(format!(
                "cell {cell} ({:?}) maps to row {row}, which is {:?}",
                obs_names[cell], modality.obs_names[row]
            )));
        }
        mapped_from[row] = Some(cell);
    }
    if let Some(row) = mapped_from.iter().position(Option::is_none) {
        return Err(store.at(path).invalid(format!(
            "the modality's cell {:?} (row {row}) is not in the MuData's obs",
            modality.obs_names[row]
        )));
    }
    Ok(())
}

/// The column at `path`, refused unless it holds `n` values (a short one would be indexed past
/// its end by every cell it lacks).
fn column_of_length(store: &Store, version: ZarrVersion, path: &str, n: u64) -> Result<Column> {
    let column = read_column(store, version, path)?;
    if column.len() as u64 != n {
        return Err(store.at(path).invalid(format!(
            "column has {} values, expected one per cell (n_obs = {n})",
            column.len()
        )));
    }
    Ok(column)
}

fn join(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_string()
    } else {
        format!("{base}/{name}")
    }
}
