//! `tessera._tessera`: the few entry points the Python package (`python/tessera/`) calls. Each
//! converts its arguments, calls the library function the CLI calls (`worker::fit_until`,
//! `worker::encode::EncoderPool`, the data layer's writer) and converts the result back; the
//! scvi-tools-shaped API (setup, keywords, history tables, save/load) is Python around them.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use tessera_data::{Column, Csr, Dataset, HostCsr, ModalityLayout, StoreWriter, ZarrVersion};

mod host;
use host::{NumpyArrays, PyReader};
use tessera_kernels::ops::affinity::feature_affinity;
use tessera_models::LikelihoodKind;
use tessera_network::{SnfParams, View};
use tessera_worker::device::Device;
use tessera_worker::encode::EncoderPool;
use tessera_worker::fit::{PREDICTION_KEY, Progress};
use tessera_worker::network::{Distance, NetworkJobError, NetworkRequest, network_store};
use tessera_worker::query::{
    Cells, CellsModality, QueryError, QueryRequest, ReferenceModel, Unfreeze,
};
use tessera_worker::{CovariateKeys, Denoised, FitConfig, FitError, FitOptions};

/// A count matrix handed over from scipy/numpy: CSR in tessera's integer widths.
struct CsrArgs<'py> {
    indptr: PyReadonlyArray1<'py, i64>,
    indices: PyReadonlyArray1<'py, i32>,
    data: PyReadonlyArray1<'py, f32>,
    n_vars: usize,
}

impl CsrArgs<'_> {
    /// The matrix checked (row pointers, column indices, values) over the arrays themselves
    /// (only the row pointers are copied); `name` names it in errors ("X", "mod/rna/X").
    fn host(&self, name: &str) -> PyResult<HostCsr> {
        let invalid = |what: String| PyValueError::new_err(format!("{name}: {what}"));
        let indptr = self
            .indptr
            .as_slice()
            .map_err(|e| invalid(e.to_string()))?
            .to_vec();
        let arrays = NumpyArrays::new(&self.indices, &self.data).map_err(invalid)?;
        let host = HostCsr::new(indptr, self.n_vars as u64, Arc::new(arrays)).map_err(invalid)?;
        host.check_entries().map_err(invalid)?;
        Ok(host)
    }

    /// The matrix checked and copied.
    fn to_csr(&self, name: &str) -> PyResult<Csr> {
        let host = self.host(name)?;
        host.rows(0..host.n_rows())
            .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
    }

    /// `host`, attached as element `path` of the in-memory store at `location`, read in place
    /// by training: the index and value arrays must be read-only (Python marks them so for as
    /// long as they are attached).
    fn attach(&self, location: &str, path: &str, host: HostCsr) -> PyResult<()> {
        for (array, what) in [
            (self.indices.as_any(), "indices"),
            (self.data.as_any(), "data"),
        ] {
            let writeable: bool = array.getattr("flags")?.getattr("writeable")?.extract()?;
            if writeable {
                return Err(PyValueError::new_err(format!(
                    "{path}: {what} must be read-only while attached (flags.writeable = False)"
                )));
            }
        }
        tessera_data::attach_csr(location, path, host).map_err(data_error)
    }
}

/// X as Python hands it to `attach_anndata`: an in-memory scipy CSR matrix's arrays (indptr,
/// indices, data), or a backed file's row pointers, number of entries and
/// `read(start, stop) -> (indices, data)` (`host::PyReader`).
#[derive(FromPyObject)]
enum MatrixArgs<'py> {
    Arrays(
        PyReadonlyArray1<'py, i64>,
        PyReadonlyArray1<'py, i32>,
        PyReadonlyArray1<'py, f32>,
    ),
    Reader(PyReadonlyArray1<'py, i64>, usize, Bound<'py, PyAny>),
}

impl MatrixArgs<'_> {
    /// The matrix checked (all of it when in memory, its row pointers when read from a file),
    /// then attached as `path` of the in-memory store at `location` once `n_rows` agrees.
    fn attach(self, location: &str, path: &str, n_vars: usize, n_rows: usize) -> PyResult<()> {
        let same_rows = |host: &HostCsr| {
            if host.n_rows() as usize == n_rows {
                Ok(())
            } else {
                Err(PyValueError::new_err(format!(
                    "{path} has {} rows for {n_rows} cells (obs_names)",
                    host.n_rows()
                )))
            }
        };
        match self {
            MatrixArgs::Arrays(indptr, indices, data) => {
                let x = CsrArgs {
                    indptr,
                    indices,
                    data,
                    n_vars,
                };
                let host = x.host(path)?;
                same_rows(&host)?;
                x.attach(location, path, host)
            }
            MatrixArgs::Reader(indptr, nnz, read) => {
                let invalid = |what: String| PyValueError::new_err(format!("{path}: {what}"));
                let indptr = indptr.as_slice().map_err(|e| invalid(e.to_string()))?;
                let reader = Arc::new(PyReader::new(read, nnz));
                let host = HostCsr::new(indptr.to_vec(), n_vars as u64, reader).map_err(invalid)?;
                same_rows(&host)?;
                tessera_data::attach_csr(location, path, host).map_err(data_error)
            }
        }
    }
}

fn data_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A new in-memory AnnData store at `location` (`memory://NAME/...`): the obs names and
/// columns and the var names written, X attached (`MatrixArgs`: an in-memory matrix read in
/// place, or a backed file's read through its reader; no copy either way). `categoricals`:
/// (name, codes, categories) with -1 for missing; `floats`: (name, values). Nothing is
/// created when the matrix or the names are malformed.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // one flat call from Python, the fields of an AnnData
fn attach_anndata(
    py: Python<'_>,
    location: &str,
    x: MatrixArgs<'_>,
    n_vars: usize,
    obs_names: Vec<String>,
    var_names: Vec<String>,
    categoricals: Vec<(String, Vec<i32>, Vec<String>)>,
    floats: Vec<(String, Vec<f64>)>,
) -> PyResult<()> {
    if n_vars != var_names.len() {
        return Err(PyValueError::new_err(format!(
            "X has {n_vars} columns but var_names {} entries",
            var_names.len()
        )));
    }
    x.attach(location, "X", n_vars, obs_names.len())?;
    let columns = obs_columns(categoricals, floats);
    py.detach(|| {
        let writer = StoreWriter::create(location, ZarrVersion::V3)?;
        writer.anndata("", &obs_names, &columns, &var_names)?;
        writer.consolidate()
    })
    .map_err(data_error)
}

/// obs columns from Python: categoricals as (name, codes with -1 missing, categories), numbers
/// as (name, values).
fn obs_columns(
    categoricals: Vec<(String, Vec<i32>, Vec<String>)>,
    floats: Vec<(String, Vec<f64>)>,
) -> Vec<(String, Column)> {
    let mut columns: Vec<(String, Column)> = categoricals
        .into_iter()
        .map(|(name, codes, categories)| {
            let column = Column::Categorical {
                codes,
                categories,
                ordered: false,
            };
            (name, column)
        })
        .collect();
    columns.extend(floats.into_iter().map(|(n, v)| (n, Column::Float(v))));
    columns
}

/// One modality handed over for `attach_mudata`: name, CSR counts of the cells that measured
/// it (indptr, indices, data), feature names, and which of the MuData's cells those are
/// (None: all).
type ModalityArgs<'py> = (
    String,
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArray1<'py, i32>,
    PyReadonlyArray1<'py, f32>,
    Vec<String>,
    Option<Vec<bool>>,
);

/// A new in-memory MuData store at `location` (`memory://NAME/...`): the cells' names and obs
/// columns (as `attach_anndata`), per modality its layout written and its counts over the
/// cells that measured it (in the MuData's cell order) attached in place.
#[pyfunction]
fn attach_mudata(
    py: Python<'_>,
    location: &str,
    obs_names: Vec<String>,
    categoricals: Vec<(String, Vec<i32>, Vec<String>)>,
    floats: Vec<(String, Vec<f64>)>,
    modalities: Vec<ModalityArgs<'_>>,
) -> PyResult<()> {
    let mut layouts = Vec::with_capacity(modalities.len());
    let mut matrices = Vec::with_capacity(modalities.len());
    for (name, indptr, indices, data, var_names, present) in modalities {
        let path = format!("mod/{name}/X");
        let x = CsrArgs {
            indptr,
            indices,
            data,
            n_vars: var_names.len(),
        };
        let host = x.host(&path)?;
        let rows = host.n_rows() as usize;
        let cells = present
            .as_ref()
            .map_or(obs_names.len(), |p| p.iter().filter(|&&c| c).count());
        if rows != cells {
            return Err(PyValueError::new_err(format!(
                "{path} has {rows} rows for the {cells} cells that measured it"
            )));
        }
        matrices.push((path, x, host));
        layouts.push(ModalityLayout {
            name,
            present,
            var_names,
        });
    }
    for (path, x, host) in matrices {
        x.attach(location, &path, host)?;
    }
    let columns = obs_columns(categoricals, floats);
    py.detach(|| {
        let writer = StoreWriter::create(location, ZarrVersion::V3)?;
        writer.mudata(&obs_names, &columns, &layouts)?;
        writer.consolidate()
    })
    .map_err(data_error)
}

/// Frees the in-memory store `memory://NAME/...`; returns whether it existed.
#[pyfunction]
fn forget_memory_store(name: &str) -> bool {
    tessera_data::forget_memory_store(name)
}

/// The `[model]`/`[train]` tables as JSON, parsed and checked as `tessera train` checks its
/// TOML: an unknown key is a TypeError naming it (as an unknown keyword is in Python), a bad
/// value a ValueError.
fn parse_config(config_json: &str) -> PyResult<FitConfig> {
    let mut json = serde_json::Deserializer::from_str(config_json);
    // The path names the keyword: "model.joint: unknown variant `sum`, expected ...".
    let config: FitConfig = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let message = format!("model/train keywords: {e}");
        if e.inner().to_string().starts_with("unknown field") {
            PyTypeError::new_err(message)
        } else {
            PyValueError::new_err(message)
        }
    })?;
    config
        .model
        .validate()
        .map_err(|e| PyValueError::new_err(format!("model keywords: {}", e.0)))?;
    Ok(config)
}

/// Checks a configuration before anything trains (see `parse_config`).
#[pyfunction]
fn check_config(config_json: &str) -> PyResult<()> {
    parse_config(config_json).map(drop)
}

/// What the training thread sends the Python thread.
enum Message {
    Start { epochs: usize, cells: u64 },
    Epoch(String),
    Done(Box<Result<tessera_worker::FitReport, FitError>>),
}

/// Trains like `tessera train` on the store at `data` (its `layers/<layer>`, or X) with
/// `config_json` (the `[model]` and `[train]` tables as JSON) and writes the model into the
/// folder `out`; the store is only read (the embedding is returned). The GIL is released
/// while training; `progress(kind, value)` is called from this thread with ("start", (epochs,
/// cells)) and ("epoch", record as JSON). Ctrl-C (or an exception from `progress`) stops after
/// the running step and is raised once training has stopped. Returns (embedding, report JSON).
#[pyfunction]
#[pyo3(signature = (data, layer, config_json, out, modalities, batch_key, label_key, unlabeled_category, categorical_covariate_keys, continuous_covariate_keys, embedding_key, denoised_library_size, init_from, device, progress))]
#[allow(clippy::too_many_arguments)] // the options of `tessera train`, flat
fn fit<'py>(
    py: Python<'py>,
    data: String,
    layer: Option<String>,
    config_json: &str,
    out: String,
    modalities: Vec<String>,
    batch_key: Option<String>,
    label_key: Option<String>,
    unlabeled_category: Option<String>,
    categorical_covariate_keys: Vec<String>,
    continuous_covariate_keys: Vec<String>,
    embedding_key: String,
    denoised_library_size: Option<f64>,
    init_from: Option<String>,
    device: &str,
    progress: Bound<'py, PyAny>,
) -> PyResult<Fitted<'py>> {
    let config = parse_config(config_json)?;
    let config_model = config.model.clone();
    let device: Device = device.parse().map_err(data_error)?;
    let opts = FitOptions {
        data,
        modalities,
        batch_key,
        label_key,
        unlabeled_category,
        covariates: CovariateKeys {
            categorical: categorical_covariate_keys,
            continuous: continuous_covariate_keys,
        },
        config,
        out: out.into(),
        embedding_key,
        prediction_key: PREDICTION_KEY.into(),
        overwrite: true,
        store_outputs: false,
        resume: false,
        denoised: denoised_library_size.map(|library_size| Denoised {
            key: "tessera_denoised".into(),
            library_size,
        }),
        cache_bytes: tessera_worker::DEFAULT_CACHE_MIB << 20,
        device,
        init_from,
        layer,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::unbounded();
    let trainer = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("tessera-fit".into())
            .spawn(move || {
                let send = |m| {
                    // The Python side outlives training: a closed channel only drops progress.
                    let _ = tx.send(m);
                };
                let report = tessera_worker::fit_until(&opts, stop, |p| match p {
                    Progress::Start {
                        epochs,
                        cells_per_epoch,
                    } => send(Message::Start {
                        epochs,
                        cells: cells_per_epoch,
                    }),
                    Progress::Epoch(record) => send(Message::Epoch(
                        serde_json::to_string(record).unwrap_or_default(),
                    )),
                    Progress::Batch { .. } => {}
                });
                send(Message::Done(Box::new(report)));
            })
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start training: {e}")))?
    };
    let mut interrupted: Option<PyErr> = None;
    let report = loop {
        let message = py.detach(|| rx.recv_timeout(Duration::from_millis(100)));
        let handled = match message {
            Ok(Message::Done(report)) => break *report,
            Ok(Message::Start { epochs, cells }) => {
                progress.call1(("start", (epochs, cells))).map(drop)
            }
            Ok(Message::Epoch(record)) => progress.call1(("epoch", record)).map(drop),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => py.check_signals(),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                break Err(FitError::Output {
                    path: "training thread".into(),
                    reason: "ended without a result".into(),
                });
            }
        };
        if let Err(e) = handled {
            stop.store(true, Ordering::Relaxed);
            interrupted.get_or_insert(e);
        }
    };
    // The thread has sent its last message; joining only reaps it.
    let _ = trainer.join();
    if let Some(e) = interrupted {
        return Err(e);
    }
    let report = report.map_err(|e| match e {
        FitError::Stopped { .. } => PyKeyboardInterrupt::new_err(e.to_string()),
        FitError::Config { .. } | FitError::Input { .. } => PyValueError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    })?;
    let json = serde_json::to_string(&report).map_err(data_error)?;
    let n_obs = report.embedding.len() / report.n_latent.max(1);
    let mut denoised = Vec::with_capacity(report.denoised.len());
    for ((name, g), values) in report.modalities.iter().zip(report.denoised) {
        // Only the count likelihoods' expression scales with the library size.
        let kind = config_model.modality(name, *g).likelihood;
        let scales = matches!(
            kind,
            LikelihoodKind::Nb | LikelihoodKind::Zinb | LikelihoodKind::Poisson
        );
        denoised.push((name.clone(), scales, matrix(py, values, n_obs)?));
    }
    Ok((matrix(py, report.embedding, n_obs)?, json, denoised))
}

/// What `fit` returns: the embedding, the report as JSON and, when asked for, each modality's
/// denoised expression with whether it scales with the library size.
type Fitted<'py> = (
    Bound<'py, PyAny>,
    String,
    Vec<(String, bool, Bound<'py, PyAny>)>,
);

/// A row-major `rows x (values / rows)` matrix as a 2-D numpy array.
fn matrix(py: Python<'_>, values: Vec<f32>, rows: usize) -> PyResult<Bound<'_, PyAny>> {
    let cols = values.len() / rows.max(1);
    Ok(PyArray1::from_vec(py, values)
        .reshape([rows, cols])?
        .into_any())
}

/// A trained model (the folder `tessera train --out` or `fit` wrote), loaded once, that
/// embeds, decodes and classifies cells given as a CSR count matrix of its one modality with
/// the matrix's `var_names` (aligned to the model's by name) and each cell's batch, which the
/// model must know (empty for a model without batches).
#[pyclass(frozen)]
struct Model {
    pool: EncoderPool,
    /// The model's first modality, the one `CellsArgs` counts are of.
    modality: String,
}

impl Model {
    /// `run` on the cells of `given` with the GIL released; each cells x k buffer it returns
    /// as a numpy matrix.
    fn matrices<'py>(
        &self,
        py: Python<'py>,
        given: CellsArgs<'py>,
        run: impl FnOnce(&EncoderPool, &Cells) -> Result<Vec<Vec<f32>>, QueryError> + Send,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let cells = self.cells(given)?;
        let values = py.detach(|| run(&self.pool, &cells)).map_err(data_error)?;
        let rows = cells.modalities[0].counts.n_rows;
        values.into_iter().map(|v| matrix(py, v, rows)).collect()
    }

    fn cells(&self, given: CellsArgs<'_>) -> PyResult<Cells> {
        let CellsArgs(given, batches, categorical, continuous) = given;
        let mut modalities = Vec::with_capacity(given.len());
        for (name, indptr, indices, data, var_names, present) in given {
            let name = if name.is_empty() {
                self.modality.clone()
            } else {
                name
            };
            let counts = CsrArgs {
                indptr,
                indices,
                data,
                n_vars: var_names.len(),
            }
            .to_csr(&name)?;
            modalities.push(CellsModality {
                name,
                counts,
                var_names,
                present: present.unwrap_or_default(),
            });
        }
        if modalities.is_empty() {
            return Err(PyValueError::new_err("no modality's counts given"));
        }
        Ok(Cells {
            modalities,
            batches,
            categorical,
            continuous,
        })
    }
}

/// Cells as Python hands them to `Model`: the counts of one or more of the model's modalities
/// (a `ModalityArgs` each, but with a row for every cell, empty where the cell lacks the
/// modality; the name "" is the model's first modality), each cell's batch, and per covariate of the model each cell's category (categorical) or value
/// (continuous).
#[derive(FromPyObject)]
struct CellsArgs<'py>(
    Vec<ModalityArgs<'py>>,
    Vec<String>,
    Vec<Vec<String>>,
    Vec<Vec<f64>>,
);

#[pymethods]
impl Model {
    #[new]
    fn new(model_dir: &str, device: &str) -> PyResult<Model> {
        let device: Device = device.parse().map_err(data_error)?;
        let model = ReferenceModel::open(model_dir).map_err(data_error)?;
        let modality = model.summary().modalities.first().map(|m| m.0.clone());
        let pool = EncoderPool::on(model, device).map_err(data_error)?;
        Ok(Model {
            pool,
            modality: modality.unwrap_or_default(),
        })
    }

    /// Every tensor of the model as (name, shape, float32 values), in name order.
    fn tensors<'py>(
        &self,
        py: Python<'py>,
    ) -> Vec<(String, Vec<usize>, Bound<'py, PyArray1<f32>>)> {
        (self.pool.model.named_tensors().into_iter())
            .map(|(name, shape, values)| {
                (
                    name.to_string(),
                    shape.to_vec(),
                    PyArray1::from_slice(py, values),
                )
            })
            .collect()
    }

    /// The label classifier's classes (empty without one).
    #[getter]
    fn label_categories(&self) -> Vec<String> {
        self.pool.model.reference.label_categories.clone()
    }

    /// Latent means (cells x n_latent).
    fn latent<'py>(&self, py: Python<'py>, cells: CellsArgs<'py>) -> PyResult<Bound<'py, PyAny>> {
        let cells = self.cells(cells)?;
        let z = py.detach(|| self.pool.latent(&cells)).map_err(data_error)?;
        matrix(py, z, cells.modalities[0].counts.n_rows)
    }

    /// Each decoder's expression at each cell's latent mean (count likelihoods scaled to
    /// `library_size` counts): one cells x features matrix per modality of the model, in its
    /// order, imputed for cells that lack the modality.
    fn expression<'py>(
        &self,
        py: Python<'py>,
        cells: CellsArgs<'py>,
        library_size: f64,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.matrices(py, cells, |pool, c| {
            pool.expression(c, library_size).map(|(_, e)| e)
        })
    }

    /// `n_samples` draws from each cell's posterior (each cells x n_latent), seeded.
    fn posterior_samples<'py>(
        &self,
        py: Python<'py>,
        cells: CellsArgs<'py>,
        n_samples: usize,
        seed: u64,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.matrices(py, cells, |pool, c| {
            pool.posterior_samples(c, n_samples, seed)
        })
    }

    /// Each modality's expression (as `expression`) at `n_samples` seeded draws from each
    /// cell's posterior: averaged (`mean`), else every draw's rows one draw after another
    /// ((n_samples * cells) x features).
    fn expression_sampled<'py>(
        &self,
        py: Python<'py>,
        cells: CellsArgs<'py>,
        library_size: f64,
        n_samples: usize,
        seed: u64,
        mean: bool,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        self.matrices(py, cells, |pool, c| {
            pool.expression_sampled(c, library_size, n_samples, seed, mean)
        })
    }

    /// The label classifier's class probabilities (cells x `label_categories`); None without
    /// a classifier.
    fn probabilities<'py>(
        &self,
        py: Python<'py>,
        cells: CellsArgs<'py>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let cells = self.cells(cells)?;
        let p = py
            .detach(|| self.pool.probabilities(&cells))
            .map_err(data_error)?;
        let rows = cells.modalities[0].counts.n_rows;
        p.map(|p| matrix(py, p, rows)).transpose()
    }
}

/// Writes a model from another tool's weights into `folder` (`worker::imported::write_model`):
/// `record_json` is its `config.json`, `tensors` every tensor as (name, shape, float32 values)
/// under this engine's names, and the reference has each modality's feature names, the batch
/// and label keys and the label categories but no cells yet ([`set_reference_latent`]).
#[pyfunction]
fn write_imported_model(
    folder: &str,
    record_json: &str,
    tensors: Vec<(String, Vec<usize>, PyReadonlyArray1<'_, f32>)>,
    var_names: std::collections::BTreeMap<String, Vec<String>>,
    keys: (Option<String>, Option<String>),
    label_categories: Vec<String>,
) -> PyResult<()> {
    let record: serde_json::Value = serde_json::from_str(record_json).map_err(data_error)?;
    let n_latent = record["model"]["n_latent"].as_u64().unwrap_or(0) as usize;
    let batch_categories = record["batch_categories"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let tensors: Vec<tessera_worker::imported::NamedTensor> = tensors
        .into_iter()
        .map(|(name, shape, values)| Ok((name, shape, values.as_slice()?.to_vec())))
        .collect::<PyResult<_>>()?;
    let reference = tessera_worker::reference::Reference {
        latent: Vec::new(),
        n_latent,
        labels: Vec::new(),
        label_key: keys.1,
        label_categories,
        batch_key: keys.0,
        batch_categories,
        var_names,
    };
    tessera_worker::imported::write_model(
        std::path::Path::new(folder),
        &record,
        &tensors,
        &reference,
    )
    .map_err(data_error)
}

/// The reference cells of the model in `folder`: latent means (cells x latent) and label codes
/// (-1 unlabelled; empty without labels).
#[pyfunction]
fn set_reference_latent(
    folder: &str,
    latent: PyReadonlyArray2<'_, f32>,
    labels: Vec<i32>,
) -> PyResult<()> {
    let latent = latent.as_array().iter().copied().collect();
    tessera_worker::imported::set_reference_latent(std::path::Path::new(folder), latent, labels)
        .map_err(data_error)
}

/// Maps the query store at `data` onto the model saved in `model_dir` as `tessera map` does
/// (architecture surgery for new batches, `epochs` of fine-tuning the new rows and the layers
/// `unfreeze` opens, the latent means of every query cell, kNN label transfer when the
/// reference has labels) and writes nothing into the store; the fine-tuned query model goes to
/// the folder `model_out` when given. Returns (embedding, transferred labels,
/// their uncertainties, the classifier's labels, report JSON); the label lists are empty when
/// the model has no labels or no classifier.
#[pyfunction]
#[pyo3(signature = (model_dir, data, layer, batch_key, epochs, encoder_input, decoder_input, neighbours, seed, device, model_out))]
#[allow(clippy::too_many_arguments)] // the options of `tessera map`, flat
fn map_query<'py>(
    py: Python<'py>,
    model_dir: &str,
    data: String,
    layer: Option<String>,
    batch_key: Option<String>,
    epochs: usize,
    encoder_input: bool,
    decoder_input: bool,
    neighbours: usize,
    seed: u64,
    device: &str,
    model_out: Option<String>,
) -> PyResult<MappedQuery<'py>> {
    let request = QueryRequest {
        data,
        layer,
        batch_key,
        epochs,
        unfreeze: Unfreeze {
            encoder_input,
            decoder_input,
        },
        neighbours,
        write: None,
        seed,
        device: device.parse().map_err(data_error)?,
        model_out,
    };
    let model = ReferenceModel::open(model_dir).map_err(data_error)?;
    let output = py
        .detach(|| {
            tessera_worker::query::map_query(&model, &request, |_| ControlFlow::Continue(()))
        })
        .map_err(data_error)?;
    let name = |code: i32| {
        usize::try_from(code)
            .ok()
            .and_then(|c| output.label_categories.get(c))
            .cloned()
            .unwrap_or_default()
    };
    let transferred = output.labels.iter().map(|t| name(t.label)).collect();
    let uncertainty = output.labels.iter().map(|t| t.uncertainty).collect();
    let classifier = output.classifier_labels.iter().map(|&c| name(c)).collect();
    let report = serde_json::to_string(&output.report).map_err(data_error)?;
    let rows = output.report.n_cells;
    Ok((
        matrix(py, output.embedding, rows)?,
        transferred,
        uncertainty,
        classifier,
        report,
    ))
}

/// What `map_query` returns to Python.
type MappedQuery<'py> = (
    Bound<'py, PyAny>,
    Vec<String>,
    Vec<f64>,
    Vec<String>,
    String,
);

/// scIB metrics of an embedding (cells x dims, float32, C order) with each cell's label and
/// batch codes, as `tessera eval` computes them: (name, kind, value or None) in scib-metrics'
/// Benchmarker order.
#[pyfunction]
fn scib(
    py: Python<'_>,
    embedding: PyReadonlyArray2<'_, f32>,
    labels: Vec<u32>,
    batches: Vec<u32>,
) -> PyResult<Vec<(String, String, Option<f64>)>> {
    let [n, d] = [embedding.shape()[0], embedding.shape()[1]];
    let x = embedding
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("embedding: {e}")))?;
    let scores = py
        .detach(|| tessera_metrics::evaluate(x, n, d, &labels, &batches, &Default::default()))
        .map_err(data_error)?;
    Ok(tessera_metrics::METRIC_NAMES
        .iter()
        .zip(scores.values())
        .map(|((name, kind), v)| (name.to_string(), kind.to_string(), v))
        .collect())
}

/// A 2-D UMAP of an embedding (cells x dims, float32, C order), as `tessera plot` lays it
/// out: umap-learn's algorithm with the given settings, seeded, on one thread (n x 2, f32).
#[pyfunction]
#[pyo3(signature = (embedding, n_neighbors, min_dist, spread, n_epochs, negative_sample_rate, seed))]
#[allow(clippy::too_many_arguments)] // umap-learn's settings, flat
fn umap<'py>(
    py: Python<'py>,
    embedding: PyReadonlyArray2<'py, f32>,
    n_neighbors: usize,
    min_dist: f64,
    spread: f64,
    n_epochs: Option<usize>,
    negative_sample_rate: usize,
    seed: u64,
) -> PyResult<Bound<'py, PyAny>> {
    let [n, d] = [embedding.shape()[0], embedding.shape()[1]];
    let x = embedding
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("embedding: {e}")))?;
    let options = tessera_metrics::umap::UmapOptions {
        n_neighbors,
        min_dist,
        spread,
        n_epochs,
        negative_sample_rate,
        seed,
    };
    let layout = py
        .detach(|| tessera_metrics::umap::umap(x, n, d, &options))
        .map_err(data_error)?;
    let flat: Vec<f32> = layout.into_iter().flatten().collect();
    Ok(PyArray1::from_vec(py, flat).reshape([n, 2])?.into_any())
}

/// A row-major n x n f64 matrix from numpy (C order), or a ValueError naming `what`.
fn square(matrix: &PyReadonlyArray2<'_, f64>, what: &str) -> PyResult<(Vec<f64>, usize)> {
    let [rows, cols] = [matrix.shape()[0], matrix.shape()[1]];
    if rows != cols {
        return Err(PyValueError::new_err(format!(
            "{what} is {rows} x {cols} (expected a square affinity matrix)"
        )));
    }
    let values = matrix
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    Ok((values.to_vec(), rows))
}

/// snfpy's `make_affinity` for one view: z-scored columns, `metric` distances, the scaled
/// exponential kernel with `k` neighbours and `mu` (n x n, f64).
#[pyfunction]
fn affinity<'py>(
    py: Python<'py>,
    data: PyReadonlyArray2<'py, f64>,
    metric: &str,
    k: usize,
    mu: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let distance: Distance = serde_json::from_value(serde_json::Value::from(metric))
        .map_err(|e| PyValueError::new_err(format!("metric {metric:?}: {e}")))?;
    let [n, d] = [data.shape()[0], data.shape()[1]];
    if k == 0 || k >= n {
        return Err(PyValueError::new_err(format!(
            "K={k}: expected 1..{n} (the samples)"
        )));
    }
    let mut x = data
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("data: {e}")))?
        .to_vec();
    if let Some(bad) = x.iter().position(|v| !v.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "data holds {} at sample {}, feature {} (expected finite values)",
            x[bad],
            bad / d.max(1),
            bad % d.max(1)
        )));
    }
    let w = py.detach(|| feature_affinity(&mut x, n, d, distance.into(), k, mu));
    Ok(PyArray1::from_vec(py, w).reshape([n, n])?.into_any())
}

/// Similarity network fusion of complete views' affinities (snfpy's `snf`).
#[pyfunction]
fn snf<'py>(
    py: Python<'py>,
    affinities: Vec<PyReadonlyArray2<'py, f64>>,
    k: usize,
    t: usize,
    alpha: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let mut views = Vec::with_capacity(affinities.len());
    let mut n = 0;
    for (i, a) in affinities.iter().enumerate() {
        let (w, size) = square(a, &format!("affinity {i}"))?;
        if i > 0 && size != n {
            return Err(PyValueError::new_err(format!(
                "affinity {i} is {size} x {size}, affinity 0 {n} x {n} (expected the same samples)"
            )));
        }
        n = size;
        views.push(View::complete(w));
    }
    let params = SnfParams { k, t, alpha };
    let fused = py
        .detach(|| tessera_network::snf(views, n, params))
        .map_err(data_error)?;
    Ok(PyArray1::from_vec(py, fused).reshape([n, n])?.into_any())
}

/// Spectral clustering of a network into `n_clusters` (labels 0..n_clusters).
/// The fused network and clusters `network` returns: the network as CSR arrays (indptr,
/// indices, data; its top-k rows, or every entry of the dense one), each cell's cluster and
/// the report as JSON.
type Network<'py> = (
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<f32>>,
    Vec<i32>,
    String,
);

/// Runs `tessera snf`'s job (`worker::network::network_store`: views of the store's count
/// matrices, cells without a view left out of it, SNF/NEMO, in memory or out of core,
/// spectral clustering) described by `request_json` (a `NetworkRequest`) with the GIL
/// released, and reads back what it wrote into the (in-memory) store.
#[pyfunction]
fn network<'py>(py: Python<'py>, request_json: &str) -> PyResult<Network<'py>> {
    let mut json = serde_json::Deserializer::from_str(request_json);
    let request: NetworkRequest = serde_path_to_error::deserialize(&mut json)
        .map_err(|e| PyValueError::new_err(format!("network options: {e}")))?;
    let read = py.detach(|| {
        let report = network_store(&request, |_| {})?;
        let root = match Dataset::open(&request.data)? {
            Dataset::AnnData(a) => a,
            Dataset::MuData(m) => m.root(),
        };
        let graph = root.matrix(&format!("obsp/{}", request.key))?;
        let graph = graph.read_rows(&root.store, 0..graph.n_rows())?;
        let clusters = root.obs_column(&format!("{}_clusters", request.key))?;
        Ok::<_, NetworkJobError>((graph, clusters.codes(), report))
    });
    let (graph, codes, report) = read.map_err(|e| match e {
        NetworkJobError::Input { .. } => PyValueError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    })?;
    let (labels, _) = codes.ok_or_else(|| PyRuntimeError::new_err("clusters not categorical"))?;
    let report = serde_json::to_string(&report).map_err(data_error)?;
    Ok((
        PyArray1::from_vec(py, graph.indptr),
        PyArray1::from_vec(py, graph.indices),
        PyArray1::from_vec(py, graph.data),
        labels,
        report,
    ))
}

#[pyfunction]
fn spectral_clustering(
    py: Python<'_>,
    network: PyReadonlyArray2<'_, f64>,
    n_clusters: usize,
    seed: u64,
) -> PyResult<Vec<u32>> {
    let (w, n) = square(&network, "network")?;
    py.detach(|| tessera_network::spectral_clustering(&w, n, n_clusters, seed))
        .map_err(data_error)
}

/// The candidate cluster counts ranked by the eigengap of the network's normalised Laplacian
/// (best first), each with its gap.
#[pyfunction]
fn eigengap(
    py: Python<'_>,
    network: PyReadonlyArray2<'_, f64>,
    candidates: Vec<usize>,
) -> PyResult<Vec<(usize, f64)>> {
    let (w, n) = square(&network, "network")?;
    let most = candidates.iter().copied().max().unwrap_or(0);
    if most == 0 || most >= n {
        return Err(PyValueError::new_err(format!(
            "n_clusters up to {most}: expected 1..{n} (the samples)"
        )));
    }
    let eigenvalues = py.detach(|| tessera_network::laplacian_eigenvalues(&w, n, most + 1));
    Ok(tessera_network::rank_by_eigengap(&eigenvalues, &candidates))
}

#[pymodule]
fn _tessera(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attach_anndata, m)?)?;
    m.add_function(wrap_pyfunction!(attach_mudata, m)?)?;
    m.add_function(wrap_pyfunction!(forget_memory_store, m)?)?;
    m.add_function(wrap_pyfunction!(check_config, m)?)?;
    m.add_function(wrap_pyfunction!(fit, m)?)?;
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(scib, m)?)?;
    m.add_function(wrap_pyfunction!(umap, m)?)?;
    m.add_function(wrap_pyfunction!(map_query, m)?)?;
    m.add_function(wrap_pyfunction!(write_imported_model, m)?)?;
    m.add_function(wrap_pyfunction!(set_reference_latent, m)?)?;
    m.add_function(wrap_pyfunction!(affinity, m)?)?;
    m.add_function(wrap_pyfunction!(snf, m)?)?;
    m.add_function(wrap_pyfunction!(network, m)?)?;
    m.add_function(wrap_pyfunction!(spectral_clustering, m)?)?;
    m.add_function(wrap_pyfunction!(eigengap, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
