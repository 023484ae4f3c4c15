//! Square f64 matrices in a scratch Zarr v3 store, chunked in square tiles: written by row
//! blocks and read by row or column blocks, for computations whose n x n matrices do not fit
//! in memory (out-of-core SNF). Tiles are stored uncompressed: the values are dense doubles
//! that do not compress, and every byte is read many times.

use std::ops::Range;

use serde_json::json;
use zarrs::array::Array;
use zarrs::metadata::ArrayMetadata;
use zarrs::storage::StorePrefix;

use crate::error::{DataError, Result};
use crate::store::{Location, Store, ZarrVersion};
use crate::write::StoreWriter;
use crate::zarr::ZArray;

/// `count` n x n f64 matrices (arrays `0`, `1`, ...) in tiles of `block` x `block`.
pub struct TileMatrices {
    store: Store,
    arrays: Vec<ZArray>,
    n: usize,
    block: usize,
}

impl std::fmt::Debug for TileMatrices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TileMatrices")
            .field("store", &self.store.name())
            .field("n", &self.n)
            .field("block", &self.block)
            .field("count", &self.arrays.len())
            .finish()
    }
}

impl TileMatrices {
    /// A new store at `location` (an existing Zarr store there is refused) with `count`
    /// zero-filled n x n matrices; no tile is written until its rows are.
    pub fn create(location: &str, n: usize, block: usize, count: usize) -> Result<TileMatrices> {
        let writer = StoreWriter::create(location, ZarrVersion::V3)?;
        // `remove` deletes everything under the location, so it must start empty.
        let listing = writer
            .store
            .storage
            .list_dir(&StorePrefix::root())
            .map_err(|e| writer.store.at("/").read(e))?;
        if !listing.keys().is_empty() || !listing.prefixes().is_empty() {
            return Err(DataError::Occupied {
                store: writer.store.name(),
            });
        }
        let block = block.clamp(1, n.max(1));
        writer.group(
            "",
            json!({"tessera": "scratch tiles", "n": n, "block": block, "matrices": count}),
        )?;
        let store = writer.store;
        let arrays = (0..count)
            .map(|index| {
                let path = index.to_string();
                let at = store.at(&path);
                let meta = json!({
                    "zarr_format": 3,
                    "node_type": "array",
                    "shape": [n, n],
                    "data_type": "float64",
                    "chunk_grid": {
                        "name": "regular",
                        "configuration": {"chunk_shape": [block, block]},
                    },
                    "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
                    "fill_value": 0.0,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                    "attributes": {},
                });
                let meta: ArrayMetadata = serde_json::from_value(meta)
                    .map_err(|e| at.write(format!("array metadata: {e}")))?;
                let array =
                    Array::new_with_metadata(store.storage.clone(), &format!("/{path}"), meta)
                        .map_err(|e| at.write(e))?;
                array.store_metadata().map_err(|e| at.write(e))?;
                Ok(array)
            })
            .collect::<Result<Vec<ZArray>>>()?;
        Ok(TileMatrices {
            store,
            arrays,
            n,
            block,
        })
    }

    pub fn block(&self) -> usize {
        self.block
    }

    pub fn name(&self) -> String {
        self.store.name()
    }

    fn array(&self, matrix: usize) -> Result<&ZArray> {
        self.arrays.get(matrix).ok_or_else(|| {
            self.store.at("/").invalid(format!(
                "no matrix {matrix}: the store holds {}",
                self.arrays.len()
            ))
        })
    }

    fn check(&self, matrix: usize, range: &Range<usize>, what: &str) -> Result<()> {
        if range.start > range.end || range.end > self.n {
            return Err(self.store.at(&matrix.to_string()).invalid(format!(
                "{what} {}..{} requested of {}",
                range.start, range.end, self.n
            )));
        }
        Ok(())
    }

    /// Stores rows `rows` (`rows.len()` x n, row-major) of matrix `matrix`.
    pub fn write_rows(&self, matrix: usize, rows: Range<usize>, values: &[f64]) -> Result<()> {
        self.check(matrix, &rows, "rows")?;
        let (array, path) = (self.array(matrix)?, matrix.to_string());
        if values.len() != rows.len() * self.n {
            return Err(self.store.at(&path).invalid(format!(
                "{} values for rows {}..{} of {} columns",
                values.len(),
                rows.start,
                rows.end,
                self.n
            )));
        }
        let subset = vec![rows.start as u64..rows.end as u64, 0..self.n as u64];
        array
            .store_array_subset(&subset, values.to_vec())
            .map_err(|e| self.store.at(&path).write(e))
    }

    fn read(&self, matrix: usize, subset: Vec<Range<u64>>) -> Result<Vec<f64>> {
        let (array, path) = (self.array(matrix)?, matrix.to_string());
        array
            .retrieve_array_subset::<Vec<f64>>(&subset)
            .map_err(|e| self.store.at(&path).read(e))
    }

    /// Rows `rows` of matrix `matrix`, `rows.len()` x n.
    pub fn read_rows(&self, matrix: usize, rows: Range<usize>) -> Result<Vec<f64>> {
        self.check(matrix, &rows, "rows")?;
        self.read(
            matrix,
            vec![rows.start as u64..rows.end as u64, 0..self.n as u64],
        )
    }

    /// Columns `cols` of matrix `matrix`, n x `cols.len()`.
    pub fn read_columns(&self, matrix: usize, cols: Range<usize>) -> Result<Vec<f64>> {
        self.check(matrix, &cols, "columns")?;
        self.read(
            matrix,
            vec![0..self.n as u64, cols.start as u64..cols.end as u64],
        )
    }

    /// Deletes the whole store (it is scratch: created here, by [`TileMatrices::create`]).
    pub fn remove(self) -> Result<()> {
        let at = self.store.at("/");
        self.store
            .storage
            .erase_prefix(&StorePrefix::root())
            .map_err(|e| at.write(e))?;
        if let Location::Local(root) = &self.store.location
            && root.is_dir()
        {
            std::fs::remove_dir_all(root).map_err(|e| at.write(e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_written_come_back_by_rows_and_columns() {
        let dir = tempfile::tempdir().unwrap();
        let location = dir.path().join("tiles.zarr");
        let location = location.to_str().unwrap();
        let n = 11;
        let tiles = TileMatrices::create(location, n, 4, 2).unwrap();
        let x: Vec<f64> = (0..n * n).map(|e| e as f64 * 0.5 - 3.0).collect();
        for rows in [0..4, 4..8, 8..11] {
            tiles
                .write_rows(1, rows.clone(), &x[rows.start * n..rows.end * n])
                .unwrap();
        }
        assert_eq!(tiles.read_rows(1, 3..9).unwrap(), x[3 * n..9 * n].to_vec());
        let columns: Vec<f64> = x.chunks(n).flat_map(|row| row[4..8].to_vec()).collect();
        assert_eq!(tiles.read_columns(1, 4..8).unwrap(), columns);
        // Untouched matrices read as zeros.
        assert_eq!(tiles.read_rows(0, 0..2).unwrap(), vec![0.0; 2 * n]);
        // A second store in the same place is refused, and so is a folder that holds anything
        // (removing the scratch store removes everything under it).
        assert!(matches!(
            TileMatrices::create(location, n, 4, 2),
            Err(DataError::Occupied { .. })
        ));
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        assert!(matches!(
            TileMatrices::create(dir.path().to_str().unwrap(), n, 4, 2),
            Err(DataError::Occupied { .. })
        ));
        assert!(dir.path().join("notes.txt").exists());
        // Bad requests name the store, the matrix and the problem.
        let message = tiles
            .write_rows(1, 0..2, &[1.0; 5])
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("tiles.zarr")
                && message.contains("5 values for rows 0..2 of 11 columns"),
            "{message}"
        );
        let message = tiles.read_columns(0, 9..12).unwrap_err().to_string();
        assert!(
            message.contains("columns 9..12 requested of 11"),
            "{message}"
        );
        let message = tiles.read_rows(2, 0..1).unwrap_err().to_string();
        assert!(
            message.contains("no matrix 2: the store holds 2"),
            "{message}"
        );
        tiles.remove().unwrap();
        assert!(!std::path::Path::new(location).exists());
    }

    #[test]
    fn a_corrupt_tile_is_an_error_naming_the_matrix() {
        let dir = tempfile::tempdir().unwrap();
        let location = dir.path().join("tiles.zarr");
        let tiles = TileMatrices::create(location.to_str().unwrap(), 6, 3, 1).unwrap();
        tiles.write_rows(0, 0..3, &[1.0; 18]).unwrap();
        std::fs::write(location.join("0/c/0/1"), b"short").unwrap();
        let message = tiles.read_rows(0, 0..3).unwrap_err().to_string();
        assert!(
            message.contains("tiles.zarr") && message.contains(": 0: cannot read"),
            "{message}"
        );
    }
}
