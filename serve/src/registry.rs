//! The model registry: trained models' folders copied into one store (a directory or an
//! object-store URL) under their names, with an index of names and sources (`index.json`), and
//! an in-memory cache of the most recently used models, parsed and ready to encode.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::{Deserialize, Serialize};
use tessera_data::Store;
use tessera_worker::device::Device;
use tessera_worker::encode::EncoderPool;
use tessera_worker::query::{MODEL_FILES, ModelSummary, ReferenceModel};

use crate::ServeError;

const INDEX: &str = "index.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub source_url: String,
    /// What list and describe answer, kept at registration so they load no model.
    pub summary: ModelSummary,
}

/// A registered model, loaded: its parsed tensors and a pool of encoders.
#[derive(Debug)]
pub struct Loaded {
    pub name: String,
    pub pool: EncoderPool,
}

impl Loaded {
    pub fn model(&self) -> &ReferenceModel {
        &self.pool.model
    }
}

pub struct Registry {
    store: Store,
    location: String,
    /// Serialises changes of the index (register while another registers or lists).
    index: Mutex<()>,
    /// Most recently used last.
    cache: Mutex<Vec<Arc<Loaded>>>,
    cache_size: usize,
    /// Where loaded models encode and mapping jobs fine-tune.
    device: Device,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("location", &self.location)
            .field("cache_size", &self.cache_size)
            .finish_non_exhaustive()
    }
}

/// Names become keys in the registry's store: a closed alphabet keeps them from escaping it.
fn check_name(name: &str) -> Result<(), ServeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ServeError::Invalid(format!(
            "model name {name:?}: expected 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

impl Registry {
    /// The registry at `location` (created when missing), keeping up to `cache_size` models
    /// loaded.
    pub fn open(location: &str, cache_size: usize) -> Result<Registry, ServeError> {
        let store =
            Store::connect(location).map_err(|e| ServeError::Config(format!("registry: {e}")))?;
        Ok(Registry {
            store,
            location: location.to_string(),
            index: Mutex::new(()),
            cache: Mutex::new(Vec::new()),
            cache_size: cache_size.max(1),
            device: Device::Cpu,
        })
    }

    /// The registry with its models loaded onto `device`.
    pub fn on(self, device: Device) -> Registry {
        Registry { device, ..self }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn read_index(&self) -> Result<BTreeMap<String, Entry>, ServeError> {
        match self
            .store
            .get_bytes(INDEX)
            .map_err(|e| ServeError::Storage(e.to_string()))?
        {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| ServeError::Storage(format!("{}/{INDEX}: {e}", self.location))),
            None => Ok(BTreeMap::new()),
        }
    }

    /// Copies the model folder at `source` in as `name` after checking that it loads.
    pub fn register(
        &self,
        name: &str,
        source: &str,
        replace: bool,
    ) -> Result<ModelSummary, ServeError> {
        check_name(name)?;
        let _guard = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        let mut index = self.read_index()?;
        if index.contains_key(name) && !replace {
            return Err(ServeError::Exists(format!(
                "model {name:?} is already registered (from {}); set replace to overwrite it",
                index[name].source_url
            )));
        }
        let folder =
            Store::folder(source).map_err(|e| ServeError::Invalid(format!("source_url: {e}")))?;
        let mut files = Vec::with_capacity(MODEL_FILES.len());
        for file in MODEL_FILES {
            let bytes = folder
                .get_bytes(file)
                .map_err(|e| ServeError::Invalid(format!("source_url: {e}")))?;
            let missing = || {
                ServeError::Invalid(format!(
                    "source_url {source:?} has no {file} \
                     (expected the folder `tessera train --out` wrote)"
                ))
            };
            files.push(bytes.ok_or_else(missing)?);
        }
        let model = ReferenceModel::from_files(source, &files[0], &files[1], &files[2])
            .map_err(|e| ServeError::Invalid(e.to_string()))?;
        for (file, bytes) in MODEL_FILES.iter().zip(files) {
            self.store
                .set_bytes(&format!("{name}/{file}"), bytes)
                .map_err(|e| ServeError::Storage(e.to_string()))?;
        }
        let summary = model.summary();
        index.insert(
            name.to_string(),
            Entry {
                source_url: source.to_string(),
                summary: summary.clone(),
            },
        );
        let json =
            serde_json::to_vec_pretty(&index).map_err(|e| ServeError::Storage(e.to_string()))?;
        self.store
            .set_bytes(INDEX, json)
            .map_err(|e| ServeError::Storage(e.to_string()))?;
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|l| l.name != name);
        tracing::info!(name, source, "model registered");
        Ok(summary)
    }

    /// A registered model's entry; unknown names are NotFound.
    pub fn entry(&self, name: &str) -> Result<Entry, ServeError> {
        self.list()?
            .remove(name)
            .ok_or_else(|| ServeError::NotFound(format!("no model named {name:?} is registered")))
    }

    pub fn list(&self) -> Result<BTreeMap<String, Entry>, ServeError> {
        let _guard = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        self.read_index()
    }

    /// The model `name`, from the cache or read from the registry (then cached, the least
    /// recently used evicted).
    pub fn get(&self, name: &str) -> Result<Arc<Loaded>, ServeError> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(i) = cache.iter().position(|l| l.name == name) {
                let hit = cache.remove(i);
                cache.push(Arc::clone(&hit));
                return Ok(hit);
            }
        }
        check_name(name)?;
        self.entry(name)?;
        let model =
            ReferenceModel::open(&format!("{}/{name}", self.location.trim_end_matches('/')))
                .map_err(|e| ServeError::Storage(e.to_string()))?;
        let loaded = Arc::new(Loaded {
            name: name.to_string(),
            pool: EncoderPool::on(model, self.device)
                .map_err(|e| ServeError::Config(e.to_string()))?,
        });
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.retain(|l| l.name != name);
        cache.push(Arc::clone(&loaded));
        if cache.len() > self.cache_size {
            cache.remove(0);
        }
        tracing::info!(name, cached = cache.len(), "model loaded");
        Ok(loaded)
    }

    /// Names of the models in memory, least recently used first.
    pub fn cached(&self) -> Vec<String> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|l| l.name.clone())
            .collect()
    }
}
