//! The CUDA backend's plumbing: device discovery (libraries are loaded dynamically, so every
//! build runs where there is no CUDA), NVRTC compilation of our `.cu` sources at first use
//! (cached per device), the allocator, cuBLAS, transfers and launch shapes. The ops' GPU entry
//! points live beside their CPU references (`ops/*/gpu.rs`) and take views ([`View`],
//! [`ViewMut`]), so a tensor can be a range of a model's one flat buffer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::cuda_cache::{BufCache, CacheCounts, DeviceBuf};
use crate::cuda_cell::DeviceCell;
use crate::cuda_readback::{Readback, Readbacks};
use crate::ops::linear::MatmulPrecision;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, CudaView, CudaViewMut, DeviceRepr,
    LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA device: {0}")]
    Unavailable(String),
    #[error("NVRTC could not compile {module}.cu: {log}")]
    Compile { module: String, log: String },
    #[error("CUDA driver error in {context}: {reason}")]
    Driver { context: String, reason: String },
    #[error("CUDA graph capture: {0}")]
    Capture(String),
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// A read-only range of f32 on the device: what the launchers read.
pub type View<'a> = CudaView<'a, f32>;
/// A writable range of f32 on the device: what the launchers write.
pub type ViewMut<'a> = CudaViewMut<'a, f32>;

/// Maps a driver error to ours, naming what was being done.
pub(crate) fn driver(context: &str) -> impl FnOnce(cudarc::driver::DriverError) -> CudaError + '_ {
    move |e| CudaError::Driver {
        context: context.into(),
        reason: e.to_string(),
    }
}

/// Whether the NVRTC library can be loaded (it panics inside cudarc when it cannot).
#[allow(unsafe_code)]
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes for the shared library; no NVRTC function is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version (major, minor), where the library loads.
#[allow(unsafe_code)]
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; both out-pointers are valid locals.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .ok()
        .map(|()| (major, minor))
}

/// Compiles every CUDA source we ship (what `tessera devices --compile` checks on a host):
/// NVRTC's version and the number of modules, or the first failure.
pub fn compile_all() -> Result<((i32, i32), usize)> {
    let version = nvrtc_version().ok_or_else(|| {
        CudaError::Unavailable("libnvrtc not found (see TESSERA_CUDA_LIBS)".into())
    })?;
    let sources = sources();
    for (name, source) in sources {
        compile(name, source)?;
    }
    Ok((version, sources.len()))
}

/// Compiles one of our CUDA sources to PTX (portable across architectures; the driver JITs it
/// for the device). Needs only NVRTC, no GPU.
pub fn compile(module: &str, source: &str) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(CudaError::Unavailable(
            "libnvrtc not found (set LD_LIBRARY_PATH)".into(),
        ));
    }
    let options = CompileOptions {
        use_fast_math: Some(false),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(source, options).map_err(|e| CudaError::Compile {
        module: module.into(),
        log: e.to_string(),
    })
}

/// One GPU: its context, the stream our ops run on, and the modules compiled for it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<Loaded>,
    /// cuBLAS's handle and its workspace.
    blas: std::sync::OnceLock<(cudarc::cublas::CudaBlas, cudarc::driver::CudaSlice<u8>)>,
    /// The compute stream's buffers, kept for reuse when dropped.
    cache: Arc<BufCache>,
    /// The copy stream and its buffers, made at the first staged upload.
    staging: std::sync::OnceLock<Arc<crate::cuda_staging::Staging>>,
    /// Page-locked buffers for values read back without waiting.
    readbacks: Readbacks,
    /// Values fixed by a model's configuration, kept by their bits ([`Gpu::constant`]).
    constants: Mutex<HashMap<Vec<u32>, Arc<cudarc::driver::CudaSlice<f32>>>>,
    matmul: MatmulPrecision,
    /// The step the draw kernels read the high bits of their streams from.
    draws: DeviceCell,
    /// The KL weight (f64 bits) a step's KL weights are filled from.
    kl_weight: DeviceCell,
}

/// The modules compiled for one GPU and the kernels looked up in them.
#[derive(Default)]
struct Loaded {
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: HashMap<(&'static str, &'static str), CudaFunction>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({})", self.ctx.ordinal())
    }
}

impl Gpu {
    /// Opens device `ordinal`, or says why there is none (no driver library, no device).
    #[allow(unsafe_code)]
    pub fn new(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only probes for the shared library. CudaContext::new panics without it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::Unavailable(
                "libcuda not found (no NVIDIA driver)".into(),
            ));
        }
        let count =
            CudaContext::device_count().map_err(|e| CudaError::Unavailable(e.to_string()))?;
        if ordinal as i32 >= count {
            return Err(CudaError::Unavailable(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("creating the context"))?;
        // SAFETY: nothing is allocated yet. Our ops share one stream and the copy stream is
        // ordered by explicit events (`cuda_staging`), so cudarc's per-buffer events (two made
        // with every allocation, recorded at every launch once a second stream exists) would
        // only cost time.
        unsafe { ctx.disable_event_tracking() };
        if let Err(e) = keep_freed_memory(&ctx) {
            // Still correct, only slower: freed blocks go back to the driver at each sync.
            tracing::warn!("device {ordinal}: the memory pool keeps no freed memory: {e}");
        }
        // A stream of our own, not the legacy default one: that one cannot be captured in a
        // CUDA graph, and it would wait for (and hold up) every other blocking stream's work.
        let stream = ctx.new_stream().map_err(driver("the compute stream"))?;
        Ok(Gpu {
            readbacks: Readbacks::new(&ctx),
            constants: Mutex::new(HashMap::new()),
            ctx,
            cache: BufCache::new(
                Arc::clone(&stream),
                crate::cuda_cache::KEEP_BYTES,
                std::env::var("TESSERA_CUDA_POISON").is_ok_and(|v| v == "1"),
            ),
            stream,
            modules: Mutex::new(Loaded::default()),
            blas: std::sync::OnceLock::new(),
            staging: std::sync::OnceLock::new(),
            matmul: MatmulPrecision::Highest,
            draws: DeviceCell::new("the draws' step", |step| step.to_string()),
            kl_weight: DeviceCell::new("the KL weight", |bits| f64::from_bits(bits).to_string()),
        })
    }

    /// How cuBLAS runs f32 GEMMs: in f32 (the default), or on the tensor cores with TF32 or
    /// bf16 inputs and f32 accumulation (several times the f32 rate; each input rounded to
    /// within 5e-4 or 4e-3 of itself).
    pub fn with_matmul(mut self, precision: MatmulPrecision) -> Gpu {
        self.matmul = precision;
        self
    }

    pub fn matmul(&self) -> MatmulPrecision {
        self.matmul
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// Name, compute capability and memory (free of total), for logs and `tessera devices`.
    pub fn describe(&self) -> Result<String> {
        let name = self.ctx.name().map_err(driver("the device name"))?;
        let (major, minor) = self
            .ctx
            .compute_capability()
            .map_err(driver("the compute capability"))?;
        let (free, total) = self.ctx.mem_get_info().map_err(driver("the memory"))?;
        let gib = |b: usize| b as f64 / f64::from(1u32 << 30);
        Ok(format!(
            "{name}, compute {major}.{minor}, {:.1} GiB free of {:.1} GiB",
            gib(free),
            gib(total)
        ))
    }

    /// Bytes of device memory free now.
    pub fn free_memory(&self) -> Result<u64> {
        let (free, _) = self.ctx.mem_get_info().map_err(driver("the memory"))?;
        Ok(free as u64)
    }

    /// GPUs the driver reports (0 without a driver).
    #[allow(unsafe_code)]
    pub fn count() -> usize {
        // SAFETY: only probes for the shared library. CudaContext::device_count panics without it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return 0;
        }
        CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
    }

    /// Makes this GPU's context current on the calling thread: cudarc does it before its own
    /// calls, cuBLAS calls need it done for them (a model may run on any thread).
    pub fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("binding the context"))
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A kernel of one of our modules, compiling the module on first use. Looked up in the
    /// driver once: a launch then costs a map lookup, not a name search and an allocation.
    pub fn function(
        &self,
        module: &'static str,
        source: &str,
        kernel: &'static str,
    ) -> Result<CudaFunction> {
        let mut loaded = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = loaded.functions.get(&(module, kernel)) {
            return Ok(f.clone());
        }
        let m = match loaded.modules.get(module) {
            Some(m) => m.clone(),
            None => {
                let m = self
                    .ctx
                    .load_module(compile(module, source)?)
                    .map_err(driver(module))?;
                loaded.modules.insert(module, m.clone());
                m
            }
        };
        let f = m.load_function(kernel).map_err(driver(kernel))?;
        loaded.functions.insert((module, kernel), f.clone());
        Ok(f)
    }

    /// The cuBLAS handle on our stream, created at first use, with a workspace of its own (so
    /// that a GEMM in a captured graph allocates nothing: [`crate::cuda_graph`]).
    #[allow(unsafe_code)]
    pub fn blas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        if let Some((b, _)) = self.blas.get() {
            return Ok(b);
        }
        let failed = |e: cudarc::cublas::result::CublasError| CudaError::Driver {
            context: "cuBLAS".into(),
            reason: e.to_string(),
        };
        let handle = cudarc::cublas::CudaBlas::new(self.stream.clone()).map_err(failed)?;
        // SAFETY: scratch memory only cuBLAS writes and reads.
        let mut workspace = unsafe { self.stream.alloc::<u8>(BLAS_WORKSPACE) }
            .map_err(driver("cuBLAS's workspace"))?;
        let (ptr, record) =
            cudarc::driver::DevicePtrMut::device_ptr_mut(&mut workspace, &self.stream);
        // SAFETY: the handle is live and the workspace outlives it (kept beside it).
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *handle.handle(),
                ptr as *mut _,
                BLAS_WORKSPACE,
            )
        }
        .result()
        .map_err(failed)?;
        drop(record);
        Ok(&self.blas.get_or_init(|| (handle, workspace)).0)
    }

    /// The copy stream for uploads queued from another thread ([`crate::cuda_staging`]).
    pub fn staging(&self) -> Result<&Arc<crate::cuda_staging::Staging>> {
        if let Some(s) = self.staging.get() {
            return Ok(s);
        }
        let made = Arc::new(crate::cuda_staging::Staging::new(&self.ctx)?);
        // A racing call made another; either serves.
        Ok(self.staging.get_or_init(|| made))
    }

    /// Host values (f32, or indices, masks, f64 operands) into a kept device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<DeviceBuf<T>> {
        let mut buf = self.cache.take::<T>(host.len())?;
        self.write(host, &mut buf.slice_mut(..))?;
        Ok(buf)
    }

    /// Host values into `y`, of their length, on the compute stream.
    pub fn write<T: DeviceRepr>(
        &self,
        host: &[T],
        y: &mut cudarc::driver::CudaViewMut<'_, T>,
    ) -> Result<()> {
        self.outside_capture("a copy from host memory")?;
        self.stream.memcpy_htod(host, y).map_err(driver("upload"))
    }

    /// `values` on the device, uploaded at their first use and kept for the GPU's life: for
    /// values a model's configuration fixes (an MMD's bandwidths), never a batch's, so that a
    /// step captured as a CUDA graph reads the same kept copy at each replay (inside a capture
    /// only values kept before are found).
    pub fn constant(&self, values: &[f32]) -> Result<Arc<cudarc::driver::CudaSlice<f32>>> {
        let key: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        let mut kept = self.constants.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(found) = kept.get(&key) {
            return Ok(Arc::clone(found));
        }
        self.outside_capture("a new constant")?;
        let made = Arc::new(
            self.stream
                .clone_htod(values)
                .map_err(driver("a constant"))?,
        );
        kept.insert(key, Arc::clone(&made));
        Ok(made)
    }

    /// Refuses `what` inside a capture, whatever the driver would do: a graph's copy from or to
    /// host memory replays with the host address it was captured with (memory its caller has
    /// since given back, or a read-back buffer other reads reuse), and CUDA may capture one.
    fn outside_capture(&self, what: &str) -> Result<()> {
        if self.cache.capturing() {
            return Err(CudaError::Capture(format!(
                "{what} inside a capture (a replay would copy at the captured host address)"
            )));
        }
        Ok(())
    }

    /// `n` values on the compute stream whose contents are whatever the memory held: for
    /// outputs a kernel, copy or GEMM writes whole before anything reads them
    /// (`Backend::output_buf`).
    pub fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<DeviceBuf<T>> {
        self.cache.take::<T>(n)
    }

    /// A copy of `x` made on the compute stream, in a buffer of it.
    pub fn copy_of<T: DeviceRepr>(
        &self,
        x: &cudarc::driver::CudaView<'_, T>,
    ) -> Result<DeviceBuf<T>> {
        // The copy writes every value before any op reads them.
        let mut out = self.alloc::<T>(x.len())?;
        self.copy_into(x, &mut out.slice_mut(..))?;
        Ok(out)
    }

    /// `x` copied on the compute stream into `y`, of its length.
    pub fn copy_into<T: DeviceRepr>(
        &self,
        x: &cudarc::driver::CudaView<'_, T>,
        y: &mut cudarc::driver::CudaViewMut<'_, T>,
    ) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtod(x, y)
            .map_err(driver("a device copy"))
    }

    /// `n` zeros on the compute stream.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<DeviceBuf<T>> {
        let mut buf = self.cache.take::<T>(n)?;
        self.stream
            .memset_zeros(&mut buf)
            .map_err(driver("zeroing"))?;
        Ok(buf)
    }

    /// `n` f32 zeros.
    pub fn zeros(&self, n: usize) -> Result<DeviceBuf> {
        self.alloc_zeros::<f32>(n)
    }

    /// `value` into every entry of `y`: one memset of its 32 bits on the compute stream.
    #[allow(unsafe_code)]
    pub fn fill(&self, y: &mut ViewMut<'_>, value: f32) -> Result<()> {
        if y.is_empty() {
            return Ok(());
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver("binding the context"))?;
        let n = y.len();
        let (ptr, _record) = cudarc::driver::DevicePtrMut::device_ptr_mut(y, &self.stream);
        // SAFETY: `ptr` is `y`'s memory, `n` 4-byte values, on this stream.
        unsafe {
            cudarc::driver::sys::cuMemsetD32Async(ptr, value.to_bits(), n, self.stream.cu_stream())
        }
        .result()
        .map_err(driver("fill"))
    }

    pub(crate) fn cache(&self) -> &Arc<BufCache> {
        &self.cache
    }

    /// The device cell the draw kernels read a stream's high bits from (a training step, as
    /// models number the streams), holding `high`. A captured step's draws read the cell at
    /// each replay, so the step is set before the capture and before each launch
    /// ([`Gpu::set_draw_step`]); a change inside a capture is an error.
    pub fn draw_cell(&self, high: u64) -> Result<&cudarc::driver::CudaSlice<u64>> {
        self.draws
            .holding(&self.stream, self.cache.capturing(), high)
    }

    /// Sets the step the draw kernels read (the high bits of their streams) ahead of a graph's
    /// launch or capture: [`Gpu::draw_cell`].
    pub fn set_draw_step(&self, high: u64) -> Result<()> {
        self.draw_cell(high).map(|_| ())
    }

    /// The device cell holding `kl_weight` (as f64 bits), which a step's KL weights are filled
    /// from (`ops::elementwise::fill_scaled`): a captured step serves every KL weight of a
    /// warm-up, set before the capture and before each launch ([`Gpu::set_kl_weight`]).
    pub fn kl_weight_cell(&self, kl_weight: f64) -> Result<&cudarc::driver::CudaSlice<u64>> {
        self.kl_weight
            .holding(&self.stream, self.cache.capturing(), kl_weight.to_bits())
    }

    /// Sets the KL weight a step reads ahead of a graph's launch or capture:
    /// [`Gpu::kl_weight_cell`].
    pub fn set_kl_weight(&self, kl_weight: f64) -> Result<()> {
        self.kl_weight_cell(kl_weight).map(|_| ())
    }

    /// How many buffers were reused and how many allocated since the GPU was opened.
    pub fn cache_counts(&self) -> CacheCounts {
        self.cache.counts()
    }

    /// A buffer or a view back to the host.
    pub fn download(&self, device: &impl cudarc::driver::DevicePtr<f32>) -> Result<Vec<f32>> {
        self.outside_capture("a read back")?;
        self.stream.clone_dtoh(device).map_err(driver("download"))
    }

    /// Starts copying `x` to the host after what is queued now, without waiting:
    /// [`Gpu::finish_download`] waits for it (and only for it).
    pub fn start_download(&self, x: &View<'_>) -> Result<Readback> {
        self.outside_capture("a read back")?;
        self.readbacks.start(&self.stream, x)
    }

    /// The values of [`Gpu::start_download`], once copied.
    pub fn finish_download(&self, read: Readback) -> Result<Vec<f32>> {
        self.readbacks.finish(read)
    }
}

/// cuBLAS's workspace: what NVIDIA recommends for Hopper (32 MiB; 4 MiB serves older GPUs).
const BLAS_WORKSPACE: usize = 32 << 20;

/// Makes the device's default memory pool (which cudarc's stream-ordered allocations draw
/// from) keep freed memory instead of returning it to the driver at each synchronisation: the
/// per-batch activations of a training step are then reused, not re-mapped, every step.
#[allow(unsafe_code)]
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the context is current (just created) and both out-pointers are valid locals.
    unsafe {
        ctx.bind_to_thread()
            .map_err(driver("binding the context"))?;
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(driver("the default memory pool"))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&raw mut threshold).cast(),
        )
        .result()
        .map_err(driver("the memory pool's release threshold"))?;
    }
    Ok(())
}

/// Launches a prepared kernel call over `threads` threads (grid-stride kernels loop beyond).
#[allow(unsafe_code)]
pub(crate) fn launch(
    mut call: cudarc::driver::LaunchArgs<'_>,
    threads: usize,
    kernel: &'static str,
) -> Result<()> {
    // SAFETY: every caller asserts the sizes of the buffers its kernel touches and pushes the
    // arguments in the kernel's order.
    unsafe { call.launch(grid(threads)) }
        .map(|_| ())
        .map_err(driver(kernel))
}

/// A grid-stride launch over `n` elements: enough blocks to fill the device, not one per
/// element (the kernels loop).
pub(crate) fn grid(n: usize) -> LaunchConfig {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Every CUDA source we ship, by module name: what NVRTC compiles in CI and on devices.
pub fn sources() -> [(&'static str, &'static str); 9] {
    [
        ("affinity", crate::ops::affinity::CUDA_SOURCE),
        ("dropout", crate::ops::dropout::CUDA_SOURCE),
        ("elementwise", crate::ops::elementwise::CUDA_SOURCE),
        ("gaussian", crate::ops::gaussian::CUDA_SOURCE),
        ("norm", crate::ops::norm::CUDA_SOURCE),
        ("likelihood", crate::ops::likelihood::CUDA_SOURCE),
        ("linear", crate::ops::linear::CUDA_SOURCE),
        ("losses", crate::ops::losses::CUDA_SOURCE),
        ("optim", crate::ops::optim::CUDA_SOURCE),
    ]
}
