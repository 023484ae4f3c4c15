//! Where a Zarr store lives: a local path or a `file://`, `s3://`, `gs://`, `az://` or `memory://`
//! URL. Every location goes through `object_store`, so local and remote stores share one code
//! path; zarrs sees a synchronous store (the async object store driven by a private runtime).
//!
//! The data layer is synchronous on purpose: decoding is CPU work spread with rayon. Async
//! callers (the coordinator, the query service) call it through `spawn_blocking`, because the
//! sync adapter must not be driven from inside an async task.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use object_store::ObjectStore;
use object_store::memory::InMemory;
use object_store::prefix::PrefixStore;
use zarrs::storage::storage_adapter::async_to_sync::{
    AsyncToSyncBlockOn, AsyncToSyncStorageAdapter,
};
use zarrs::storage::{ReadableWritableListableStorage, StoreKey};
use zarrs_object_store::AsyncObjectStore;

use crate::error::{DataError, Result};

/// A parsed store location, kept for messages and for deciding how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    Memory { name: String, prefix: String },
    Cloud(url::Url),
}

impl Location {
    /// Parses a local path or URL. Unknown schemes are an error, never a guess.
    pub fn parse(text: &str) -> Result<Self> {
        let unsupported = |reason: String| DataError::Location {
            location: text.to_string(),
            reason,
        };
        if !text.contains("://") {
            return Ok(Location::Local(PathBuf::from(text)));
        }
        let url = url::Url::parse(text).map_err(|e| unsupported(format!("not a URL: {e}")))?;
        match url.scheme() {
            "file" => url
                .to_file_path()
                .map(Location::Local)
                .map_err(|()| unsupported("file:// URL without an absolute path".into())),
            "memory" => Ok(Location::Memory {
                name: url.host_str().unwrap_or_default().to_string(),
                prefix: url.path().trim_matches('/').to_string(),
            }),
            "s3" | "s3a" | "gs" | "az" | "abfs" | "abfss" | "azure" => Ok(Location::Cloud(url)),
            other => Err(unsupported(format!(
                "scheme '{other}' is not supported; expected a path or file://, s3://, gs://, az:// or memory://"
            ))),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::Memory { name, prefix } => write!(f, "memory://{name}/{prefix}"),
            Location::Cloud(u) => write!(f, "{u}"),
        }
    }
}

/// The process-wide named in-memory stores behind `memory://NAME/...` URLs, so that one part
/// of a program (or a test) can write a store that another part opens by URL.
fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(Default::default)
}

fn memory_store(name: &str) -> Arc<InMemory> {
    let mut stores = memory_stores()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(InMemory::new()))
        .clone()
}

/// Drops the in-memory store behind `memory://NAME/...` and everything in it (a Python session
/// that trained on an in-memory AnnData frees its copy this way), with the matrices attached to
/// it (`host::attach_csr`). Returns whether it existed.
pub fn forget_memory_store(name: &str) -> bool {
    crate::host::detach_all(name);
    memory_stores()
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .remove(name)
        .is_some()
}

/// The runtime that drives object_store futures for the sync zarrs API. One per process:
/// object_store clients hold connection pools bound to the runtime that created them.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tessera-io")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the I/O runtime: {e}"))
    })
}

struct BlockOnRuntime;

impl AsyncToSyncBlockOn for BlockOnRuntime {
    fn block_on<F: core::future::Future>(&self, future: F) -> F::Output {
        runtime().block_on(future)
    }
}

/// An opened store: its location (for messages) and the storage zarrs reads and writes.
#[derive(Clone)]
pub struct Store {
    pub location: Location,
    pub storage: ReadableWritableListableStorage,
    /// The location as the user wrote it, for messages.
    pub(crate) display: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location)
            .finish()
    }
}

impl Store {
    /// Opens an existing store (its root metadata must exist) at a path or URL.
    pub fn open(text: &str) -> Result<Self> {
        let store = Self::connect_with(text, false)?;
        if store.zarr_version()?.is_none() {
            return Err(DataError::Open {
                store: store.name(),
                reason: "no Zarr root here (expected zarr.json for Zarr v3 or .zgroup for v2)"
                    .into(),
            });
        }
        Ok(store)
    }

    /// Connects to an existing folder of plain files (a model's folder), not a Zarr store.
    pub fn folder(text: &str) -> Result<Self> {
        Self::connect_with(text, false)
    }

    /// Connects to a location without requiring a store there yet (for writing); a missing
    /// local directory is created.
    pub fn connect(text: &str) -> Result<Self> {
        Self::connect_with(text, true)
    }

    fn connect_with(text: &str, create: bool) -> Result<Self> {
        let location = Location::parse(text)?;
        let object_store = object_store_for(&location, text, create)?;
        let storage = Arc::new(AsyncToSyncStorageAdapter::new(
            Arc::new(AsyncObjectStore::new(object_store)),
            BlockOnRuntime,
        ));
        Ok(Store {
            location,
            storage,
            display: text.to_string(),
        })
    }

    pub fn name(&self) -> String {
        self.display.clone()
    }

    /// 3 for a `zarr.json` root, 2 for `.zgroup`, None when neither exists.
    pub fn zarr_version(&self) -> Result<Option<ZarrVersion>> {
        if self.get_bytes("zarr.json")?.is_some() {
            Ok(Some(ZarrVersion::V3))
        } else if self.get_bytes(".zgroup")?.is_some() {
            Ok(Some(ZarrVersion::V2))
        } else {
            Ok(None)
        }
    }

    /// Raw bytes of one key, None when absent. Storage failures (unreachable URL, no access)
    /// become an error naming the store and key.
    pub fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let store_key = self.key(key)?;
        self.check_regular(key)?;
        self.storage
            .get(&store_key)
            .map(|b| b.map(|b| b.to_vec()))
            .map_err(|e| DataError::Storage {
                store: self.name(),
                path: key.into(),
                reason: e.to_string(),
            })
    }

    pub fn set_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let store_key = self.key(key)?;
        self.storage
            .set(&store_key, bytes.into())
            .map_err(|e| DataError::Storage {
                store: self.name(),
                path: key.into(),
                reason: e.to_string(),
            })
    }

    /// A local key that is there must be a plain file: reading a FIFO (or a device) put in
    /// place of metadata would block, or never end.
    fn check_regular(&self, key: &str) -> Result<()> {
        let Location::Local(root) = &self.location else {
            return Ok(());
        };
        match std::fs::metadata(root.join(key)) {
            Ok(m) if !m.is_file() && !m.is_dir() => Err(DataError::Storage {
                store: self.name(),
                path: key.into(),
                reason: "not a regular file (a FIFO, socket or device): refused".into(),
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn key(&self, key: &str) -> Result<StoreKey> {
        StoreKey::new(key).map_err(|e| DataError::Storage {
            store: self.name(),
            path: key.into(),
            reason: format!("invalid key: {e}"),
        })
    }
}

/// The Zarr format version of a store; writes into an existing store keep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ZarrVersion {
    V2,
    V3,
}

impl ZarrVersion {
    pub fn number(self) -> u8 {
        match self {
            ZarrVersion::V2 => 2,
            ZarrVersion::V3 => 3,
        }
    }
}

fn object_store_for(location: &Location, text: &str, create: bool) -> Result<Arc<dyn ObjectStore>> {
    let failed = |reason: String| DataError::Location {
        location: text.to_string(),
        reason,
    };
    match location {
        Location::Local(path) => {
            let absolute = absolute(path).map_err(|e| failed(e.to_string()))?;
            if !absolute.is_dir() {
                if !create {
                    return Err(DataError::Open {
                        store: text.to_string(),
                        reason: "no such directory".into(),
                    });
                }
                std::fs::create_dir_all(&absolute)
                    .map_err(|e| failed(format!("cannot create directory: {e}")))?;
            }
            let local = object_store::local::LocalFileSystem::new_with_prefix(&absolute)
                .map_err(|e| failed(e.to_string()))?;
            Ok(Arc::new(local))
        }
        Location::Memory { name, prefix } => {
            let store: Arc<dyn ObjectStore> = memory_store(name);
            Ok(Arc::new(PrefixStore::new(store, prefix.as_str())))
        }
        Location::Cloud(url) => {
            // Bounded retries: an unreachable endpoint should fail in seconds, not minutes.
            let retry = object_store::RetryConfig {
                max_retries: 3,
                retry_timeout: std::time::Duration::from_secs(20),
                ..Default::default()
            };
            // Builders from_env() pick up the usual credential variables (AWS_*, GOOGLE_*,
            // AZURE_*); the URL supplies bucket/container and the path becomes a prefix.
            let (scheme, path) =
                object_store::ObjectStoreScheme::parse(url).map_err(|e| failed(e.to_string()))?;
            let store: Arc<dyn ObjectStore> = match scheme {
                object_store::ObjectStoreScheme::AmazonS3 => Arc::new(
                    object_store::aws::AmazonS3Builder::from_env()
                        .with_url(url.as_str())
                        .with_retry(retry.clone())
                        .build()
                        .map_err(|e| failed(e.to_string()))?,
                ),
                object_store::ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                    object_store::gcp::GoogleCloudStorageBuilder::from_env()
                        .with_url(url.as_str())
                        .with_retry(retry.clone())
                        .build()
                        .map_err(|e| failed(e.to_string()))?,
                ),
                object_store::ObjectStoreScheme::MicrosoftAzure => Arc::new(
                    object_store::azure::MicrosoftAzureBuilder::from_env()
                        .with_url(url.as_str())
                        .with_retry(retry.clone())
                        .build()
                        .map_err(|e| failed(e.to_string()))?,
                ),
                other => return Err(failed(format!("scheme {other:?} is not supported"))),
            };
            Ok(Arc::new(PrefixStore::new(store, path)))
        }
    }
}

fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_location() {
        assert_eq!(
            Location::parse("a/b.zarr").unwrap(),
            Location::Local("a/b.zarr".into())
        );
        assert_eq!(
            Location::parse("file:///x/y.zarr").unwrap(),
            Location::Local("/x/y.zarr".into())
        );
        assert_eq!(
            Location::parse("memory://t1/p/q.zarr").unwrap(),
            Location::Memory {
                name: "t1".into(),
                prefix: "p/q.zarr".into()
            }
        );
        for url in [
            "s3://bucket/x.zarr",
            "gs://bucket/x.zarr",
            "az://container/x.zarr",
        ] {
            assert!(
                matches!(Location::parse(url).unwrap(), Location::Cloud(_)),
                "{url}"
            );
        }
    }

    #[test]
    fn unknown_scheme_is_named() {
        let err = Location::parse("ftp://host/x.zarr")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("ftp://host/x.zarr") && err.contains("'ftp'"),
            "{err}"
        );
    }

    #[test]
    fn missing_local_store_is_an_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nothing.zarr");
        let err = Store::open(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(
            err.contains("nothing.zarr") && err.contains("no such directory"),
            "{err}"
        );
        assert!(!path.exists(), "opening must not create the store");
        std::fs::create_dir(&path).unwrap();
        let err = Store::open(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(err.contains("no Zarr root"), "{err}");
    }

    #[test]
    fn memory_stores_are_shared_by_name() {
        let a = Store::connect("memory://shared-test/s.zarr").unwrap();
        a.set_bytes(
            "zarr.json",
            br#"{"zarr_format":3,"node_type":"group"}"#.to_vec(),
        )
        .unwrap();
        let b = Store::open("memory://shared-test/s.zarr").unwrap();
        assert_eq!(b.zarr_version().unwrap(), Some(ZarrVersion::V3));
    }
}
