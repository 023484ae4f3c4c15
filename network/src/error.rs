//! The crate's one error type, shared by every method and the views they read.

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NetworkError {
    #[error("view {view}: {found} values for {n} x {n} samples")]
    Shape { view: usize, n: usize, found: usize },
    #[error("SNF needs at least 2 views, got {0}")]
    TooFewViews(usize),
    #[error("view {view}: entry ({row}, {col}) is {value}: affinities must be finite and >= 0")]
    BadValue {
        view: usize,
        row: usize,
        col: usize,
        value: f64,
    },
    #[error("k = {k}: expected 1 <= k < {n} samples")]
    BadK { k: usize, n: usize },
    #[error("rank {rank}: {problem}")]
    Exchange { rank: usize, problem: String },
    #[error("view {view}: {problem}")]
    Samples { view: usize, problem: String },
    #[error("{0} views with missing samples: at most 64 are supported")]
    TooManyViews(usize),
    #[error("tile store: {0}")]
    Store(String),
    #[error("{k} clusters: expected 1 <= clusters <= {n} samples")]
    BadClusters { k: usize, n: usize },
}
