//! One error type for the data layer. Every variant names the store and the element path, so
//! a user can find the broken thing without a debugger.

pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{location}: unsupported location: {reason}")]
    Location { location: String, reason: String },

    #[error("{store}: cannot open store: {reason}")]
    Open { store: String, reason: String },

    #[error("{store}: {path}: storage error: {reason}")]
    Storage {
        store: String,
        path: String,
        reason: String,
    },

    #[error("{store}: {path}: missing {expected}")]
    Missing {
        store: String,
        path: String,
        expected: String,
    },

    #[error("{store}: {path}: unknown encoding-type '{found}', expected {expected}")]
    Encoding {
        store: String,
        path: String,
        found: String,
        expected: String,
    },

    #[error("{store}: {path}: data type {found}, expected {expected}")]
    DataType {
        store: String,
        path: String,
        found: String,
        expected: String,
    },

    #[error("{store}: {path}: {problem}")]
    Invalid {
        store: String,
        path: String,
        problem: String,
    },

    #[error("{store}: {path}: cannot read array (truncated or corrupt chunk?): {reason}")]
    Read {
        store: String,
        path: String,
        reason: String,
    },

    #[error("{store}: {path}: cannot write: {reason}")]
    Write {
        store: String,
        path: String,
        reason: String,
    },

    #[error("{store}: {path}: already exists; pass --overwrite (overwrite=true) to replace it")]
    Exists { store: String, path: String },

    /// A new store was to be written where something already is (no flag replaces it).
    #[error(
        "{store}: already exists (a store or other files); write to a new location or remove it first"
    )]
    Occupied { store: String },

    #[error("{context}: {reason}")]
    Io { context: String, reason: String },

    /// Another process is writing into the store (its lock file names it).
    #[error(
        "{store}: another tessera (pid {pid}) is writing into this store; waited {waited_s} s \
         (rerun when it is done, or remove {lock} if that process is gone)"
    )]
    Locked {
        store: String,
        pid: u32,
        waited_s: u64,
        lock: String,
    },
}

/// Builds errors for one element of one store.
#[derive(Debug, Clone)]
pub(crate) struct At<'a> {
    pub store: &'a str,
    pub path: &'a str,
}

impl At<'_> {
    pub fn missing(&self, expected: impl Into<String>) -> DataError {
        DataError::Missing {
            store: self.store.into(),
            path: self.path.into(),
            expected: expected.into(),
        }
    }
    pub fn encoding(&self, found: impl Into<String>, expected: impl Into<String>) -> DataError {
        DataError::Encoding {
            store: self.store.into(),
            path: self.path.into(),
            found: found.into(),
            expected: expected.into(),
        }
    }
    pub fn dtype(&self, found: impl Into<String>, expected: impl Into<String>) -> DataError {
        DataError::DataType {
            store: self.store.into(),
            path: self.path.into(),
            found: found.into(),
            expected: expected.into(),
        }
    }
    pub fn invalid(&self, problem: impl Into<String>) -> DataError {
        DataError::Invalid {
            store: self.store.into(),
            path: self.path.into(),
            problem: problem.into(),
        }
    }
    pub fn read(&self, reason: impl ToString) -> DataError {
        DataError::Read {
            store: self.store.into(),
            path: self.path.into(),
            reason: reason.to_string(),
        }
    }
    pub fn write(&self, reason: impl ToString) -> DataError {
        DataError::Write {
            store: self.store.into(),
            path: self.path.into(),
            reason: reason.to_string(),
        }
    }
}
