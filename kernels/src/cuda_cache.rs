//! Device buffers kept for reuse, by size in bytes. A training step allocates its ~70
//! activations, gradients, uploads and temporaries in the same sizes and order every step;
//! handed back here when dropped and handed out again at the next request of that size, a step
//! after the first of its shape asks the driver for nothing (no `cuMemAllocAsync` or
//! `cuMemFreeAsync`, each a driver call of about a microsecond on the host); which kept buffer
//! a request gets can change from step to step. Some sizes change from
//! step to step (a batch's non-zeros by a few percent, the rows of each batch in a batch-MMD
//! penalty by more), so the driver allocates a size class ([`size_class`]: 512-byte multiples up
//! to 4 KiB, then at most 1/8 above the request) and a request takes the smallest kept buffer of
//! its class or up to 1/8 larger (the rest unused): sizes that vary stop allocating once their
//! classes have been seen.
//!
//! Sound because every buffer here belongs to the GPU's one compute stream: a buffer comes back
//! after its last use was queued on that stream, and whatever writes it next is queued on the
//! same stream after that use (the rule of the driver's own stream-ordered free).
//!
//! `TESSERA_CUDA_POISON=1` (read by `Gpu::new`) checks the ops' use of their buffers: it fills
//! every reused buffer with 0xff bytes (NaN in every float) before handing it out, as the
//! emulated driver fills fresh memory, so an op reading what it did not write fails the parity
//! tests instead of reading a previous step's values; and the driver allocates the exact size
//! asked for, so a kernel writing past a fresh buffer fails under the emulator's
//! AddressSanitizer (past a reused one, within its class, it would not).
//!
//! A CUDA graph replays its ops on the buffers they were captured with, so those must serve
//! nothing else while the graph lives: while a capture runs ([`BufCache::begin_capture`]) every
//! buffer handed out is the graph's, kept apart when dropped and handed out again only to the
//! same graph's capture, and back in the cache when the graph is released. A capture allocates
//! nothing (an allocation in a captured stream would be the graph's memory node, freed or
//! not at each replay): what it needs must have been kept by running the same work before.
#![allow(unsafe_code)] // a kept allocation changes element type: see `retype`

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr};

use crate::cuda::{CudaError, Result, driver};

/// Bytes a GPU's cache keeps at most: far above a step's working set (a Census-size step, 8,000 genes at batch
/// 1,024, uses ~0.3 GB), far below a GPU's memory. Past it the cache is emptied into the
/// driver's pool (which keeps freed memory as well, for requests of any size) and starts over
/// with the buffer coming back, so sizes no longer asked for do not hold it full.
pub const KEEP_BYTES: usize = 4 << 30;

/// Allocations this large are made at their size: data kept on the GPU (hundreds of MB to GBs,
/// made once) would waste up to an eighth of itself in a class; a step's buffers are smaller
/// (a Census-size step's largest, 1,024 cells x 8,000 genes in f32, is 32 MB).
pub const EXACT_FROM: usize = 256 << 20;

/// The kept buffers of one GPU's compute stream.
pub struct BufCache {
    stream: Arc<CudaStream>,
    kept: Mutex<Kept>,
    keep_bytes: usize,
    checked: bool,
}

#[derive(Default)]
struct Kept {
    /// Allocations by their size in bytes.
    by_bytes: BTreeMap<usize, Vec<CudaSlice<u8>>>,
    bytes: usize,
    counts: CacheCounts,
    /// The graph being captured, if any.
    capturing: Option<u64>,
    /// Graphs made so far (each one's number).
    graphs_made: u64,
    /// Buffers handed out to a graph's capture, by address: the graph's number.
    owner: HashMap<u64, u64>,
    /// Each graph's buffers that are not in use outside it, by size in bytes.
    graph_kept: HashMap<u64, BTreeMap<usize, Vec<CudaSlice<u8>>>>,
}

/// The smallest allocation of `wanted` to `largest` bytes in `by_bytes`, taken out.
fn take_within(
    by_bytes: &mut BTreeMap<usize, Vec<CudaSlice<u8>>>,
    wanted: usize,
    largest: usize,
) -> Option<(CudaSlice<u8>, usize)> {
    by_bytes
        .range_mut(wanted..=largest)
        .find_map(|(&bytes, all)| all.pop().map(|s| (s, bytes)))
}

/// Requests served from the cache and by the driver since it was made: what shows that a
/// steady step allocates nothing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheCounts {
    pub reused: u64,
    pub allocated: u64,
}

impl std::fmt::Debug for BufCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BufCache({} bytes kept)", self.kept().bytes)
    }
}

/// The bytes a request of `wanted` bytes is allocated with: a multiple of 512 up to 4 KiB, then
/// a multiple of 1/8 of the power of two at or below it (at most 1/8 more than asked; every
/// class a multiple of 8 bytes, so any kept type divides it); past [`EXACT_FROM`] the size asked.
pub fn size_class(wanted: usize) -> usize {
    const SMALL: usize = 4096;
    if wanted <= SMALL {
        return wanted.div_ceil(512).max(1) * 512;
    }
    if wanted >= EXACT_FROM {
        return wanted;
    }
    let step = 1usize << (wanted.ilog2() - 3);
    wanted.div_ceil(step) * step
}

/// The same allocation as a slice of `n` values of `U`.
///
/// SAFETY: the caller makes `n * size_of::<U>()` the allocation's size in bytes; the values are
/// whatever the memory held (any bit pattern is valid for the `DeviceRepr` types we keep: floats
/// and integers).
unsafe fn retype<T, U>(slice: CudaSlice<T>, n: usize) -> CudaSlice<U> {
    let stream = Arc::clone(slice.stream());
    let ptr = slice.leak();
    // SAFETY: `ptr` was allocated on `stream` and is owned by nothing else after `leak`.
    unsafe { stream.upgrade_device_ptr::<U>(ptr, n) }
}

impl BufCache {
    /// A cache for `stream` keeping at most `keep_bytes`; `checked`: reused buffers are filled
    /// with 0xff bytes and new ones have the exact size asked for (no size class).
    pub fn new(stream: Arc<CudaStream>, keep_bytes: usize, checked: bool) -> Arc<BufCache> {
        Arc::new(BufCache {
            stream,
            kept: Mutex::new(Kept::default()),
            keep_bytes,
            checked,
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` values whose contents are whatever the memory held (a kept buffer's old values).
    pub fn take<T: DeviceRepr>(self: &Arc<Self>, n: usize) -> Result<DeviceBuf<T>> {
        let wanted = n * std::mem::size_of::<T>();
        let (kept, bytes) = match self.kept_of(wanted)? {
            Some(found) => found,
            None => {
                let bytes = if self.checked {
                    wanted
                } else {
                    size_class(wanted)
                };
                // SAFETY: the values are written before they are read (the callers' contract).
                let fresh = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(driver("alloc"))?;
                (fresh, bytes)
            }
        };
        // SAFETY: an allocation of at least `wanted` bytes.
        let mut slice = unsafe { retype::<u8, T>(kept, n) };
        if self.checked {
            self.stream
                .context()
                .bind_to_thread()
                .map_err(driver("binding the context"))?;
            let (ptr, _record) = slice.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` is `slice`'s own allocation of at least `wanted` bytes on this stream.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xff, wanted, self.stream.cu_stream())
            }
            .map_err(driver("poisoning a reused buffer"))?;
        }
        Ok(DeviceBuf {
            slice: Some(slice),
            bytes,
            cache: Arc::clone(self),
        })
    }

    /// The smallest kept allocation of `wanted` bytes up to its size class or 1/8 more,
    /// whichever is larger, and its size; counted. While a graph is captured: the graph's own
    /// first, then one of the cache's, made the graph's; none is an error (nothing is
    /// allocated in a capture).
    fn kept_of(&self, wanted: usize) -> Result<Option<(CudaSlice<u8>, usize)>> {
        let largest = size_class(wanted).max(wanted + wanted / 8);
        let mut guard = self.kept();
        let k = &mut *guard;
        if let Some(graph) = k.capturing {
            let own = k.graph_kept.entry(graph).or_default();
            if let Some(found) = take_within(own, wanted, largest) {
                k.counts.reused += 1;
                return Ok(Some(found));
            }
        }
        let found = take_within(&mut k.by_bytes, wanted, largest);
        match (&found, k.capturing) {
            (Some((slice, bytes)), graph) => {
                k.bytes -= bytes;
                k.counts.reused += 1;
                if let Some(graph) = graph {
                    k.owner.insert(self.address(slice), graph);
                }
            }
            (None, Some(_)) => {
                return Err(CudaError::Capture(format!(
                    "a buffer of {wanted} bytes was asked for that no run before the capture kept"
                )));
            }
            (None, None) => k.counts.allocated += 1,
        }
        Ok(found)
    }

    fn address(&self, slice: &CudaSlice<u8>) -> u64 {
        slice.device_ptr(&self.stream).0
    }

    /// Starts handing out buffers to a graph being captured; its number.
    pub fn begin_capture(&self) -> u64 {
        let mut k = self.kept();
        k.graphs_made += 1;
        let graph = k.graphs_made;
        k.capturing = Some(graph);
        graph
    }

    /// Whether a capture is running.
    pub fn capturing(&self) -> bool {
        self.kept().capturing.is_some()
    }

    /// Ends the capture: buffers are handed out to anyone again (the graph's stay its own).
    pub fn end_capture(&self) {
        self.kept().capturing = None;
    }

    /// The graph's buffers back in the cache (its last replay queued): those it kept now, and
    /// those in use elsewhere when they are dropped.
    pub fn release(&self, graph: u64) {
        let mut k = self.kept();
        k.owner.retain(|_, g| *g != graph);
        let own = k.graph_kept.remove(&graph).unwrap_or_default();
        drop(k);
        for (bytes, slices) in own {
            for slice in slices {
                self.put(slice, bytes);
            }
        }
    }

    /// Keeps an allocation of `bytes` bytes whose last use has been queued (a graph's apart).
    fn put<T>(&self, slice: CudaSlice<T>, bytes: usize) {
        // SAFETY: `bytes` is the allocation's size.
        let slice = unsafe { retype::<T, u8>(slice, bytes) };
        let mut k = self.kept();
        // Most of the time no graph owns anything: no address to look up.
        let owner = (!k.owner.is_empty())
            .then(|| k.owner.get(&self.address(&slice)).copied())
            .flatten();
        if let Some(graph) = owner {
            let own = k.graph_kept.entry(graph).or_default();
            own.entry(bytes).or_default().push(slice);
            return;
        }
        if bytes > self.keep_bytes {
            return; // freed, in stream order
        }
        // Nothing is freed while a capture runs (a free in a captured stream is refused).
        if k.bytes + bytes > self.keep_bytes && k.capturing.is_none() {
            // Dropped here: back to the driver's pool, freed in stream order.
            k.by_bytes.clear();
            k.bytes = 0;
        }
        k.bytes += bytes;
        k.by_bytes.entry(bytes).or_default().push(slice);
    }

    pub fn counts(&self) -> CacheCounts {
        self.kept().counts
    }
}

/// A buffer on the compute stream that returns to its [`BufCache`] when dropped. Derefs to the
/// `CudaSlice` it holds, so views and launches take it as they take a slice (`&*buf`).
pub struct DeviceBuf<T = f32> {
    /// Always `Some` until dropped.
    slice: Option<CudaSlice<T>>,
    /// The allocation's size: at least the slice's.
    bytes: usize,
    cache: Arc<BufCache>,
}

impl<T> std::fmt::Debug for DeviceBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceBuf({})", self.len())
    }
}

impl<T> std::ops::Deref for DeviceBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        self.slice
            .as_ref()
            .expect("a DeviceBuf holds its slice until dropped")
    }
}

impl<T> std::ops::DerefMut for DeviceBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        self.slice
            .as_mut()
            .expect("a DeviceBuf holds its slice until dropped")
    }
}

impl<T> Drop for DeviceBuf<T> {
    fn drop(&mut self) {
        if let Some(slice) = self.slice.take() {
            self.cache.put(slice, self.bytes);
        }
    }
}

// SAFETY (both): the argument is the slice's, pushed by cudarc's own impl for the slice.
unsafe impl<'a, 'b: 'a, T> cudarc::driver::PushKernelArg<&'b DeviceBuf<T>>
    for cudarc::driver::LaunchArgs<'a>
{
    fn arg(&mut self, arg: &'b DeviceBuf<T>) -> &mut Self {
        self.arg(&**arg)
    }
}

unsafe impl<'a, 'b: 'a, T> cudarc::driver::PushKernelArg<&'b mut DeviceBuf<T>>
    for cudarc::driver::LaunchArgs<'a>
{
    fn arg(&mut self, arg: &'b mut DeviceBuf<T>) -> &mut Self {
        self.arg(&mut **arg)
    }
}

impl<T> cudarc::driver::DeviceSlice<T> for DeviceBuf<T> {
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
    fn stream(&self) -> &Arc<CudaStream> {
        CudaSlice::stream(self)
    }
}

impl<T> cudarc::driver::DevicePtr<T> for DeviceBuf<T> {
    fn device_ptr<'a>(
        &'a self,
        stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (**self).device_ptr(stream)
    }
}

impl<T> DevicePtrMut<T> for DeviceBuf<T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> (
        cudarc::driver::sys::CUdeviceptr,
        cudarc::driver::SyncOnDrop<'a>,
    ) {
        (**self).device_ptr_mut(stream)
    }
}

#[cfg(test)]
mod tests {
    use cudarc::driver::DevicePtr;

    use super::*;

    fn address<T>(buf: &DeviceBuf<T>) -> u64 {
        buf.device_ptr(buf.stream()).0
    }

    #[test]
    fn sizes_are_classes_of_at_most_an_eighth_more() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(4096), 4096);
        // Past 4 KiB: steps of 1/8 of the power of two below.
        assert_eq!(size_class(4097), 4608);
        assert_eq!(size_class(8192), 8192);
        assert_eq!(size_class(8193), 9216);
        assert_eq!(size_class(10_000), 10_240);
        assert_eq!(size_class(EXACT_FROM + 1), EXACT_FROM + 1);
        for wanted in (4097..1 << 20).step_by(97) {
            let class = size_class(wanted);
            assert!(class >= wanted && class <= wanted + wanted / 8, "{wanted}");
            assert_eq!(class % 8, 0, "{wanted}");
            assert_eq!(
                size_class(class),
                class,
                "{wanted}: a class is its own class"
            );
        }
    }

    #[test]
    fn a_dropped_buffer_serves_the_next_request_of_its_class() {
        let Some(gpu) = crate::testing::gpu_or_skip("the buffer cache") else {
            return;
        };
        let cache = BufCache::new(Arc::clone(gpu.stream()), 1 << 20, false);
        let first = cache.take::<f32>(256).unwrap();
        let small = address(&first);
        drop(first);
        let as_u32 = cache.take::<u32>(200).unwrap();
        assert_eq!(
            address(&as_u32),
            small,
            "1 KiB kept, served as 800 bytes of u32"
        );
        let other = cache.take::<u64>(1250).unwrap();
        let large = address(&other);
        assert_ne!(large, small, "10,000 bytes are another class");
        drop(other);
        // 9,300 bytes are in the class of 10,000 (10,240): the kept buffer, as 2,325 values.
        let within = cache.take::<f32>(2325).unwrap();
        assert_eq!((within.len(), address(&within)), (2325, large));
        drop(within);
        let whole = cache.take::<u8>(10_240).unwrap();
        assert_eq!(address(&whole), large);
        drop(whole);
        // 10,500 bytes: the next class (11,264).
        let beyond = cache.take::<f32>(2625).unwrap();
        assert_ne!(address(&beyond), large);
        assert_eq!(
            cache.counts(),
            CacheCounts {
                reused: 3,
                allocated: 3
            }
        );
    }

    /// Checked (`TESSERA_CUDA_POISON=1`), the driver allocates the size asked for.
    #[test]
    fn a_checked_cache_allocates_exact_sizes() {
        let Some(gpu) = crate::testing::gpu_or_skip("the buffer cache") else {
            return;
        };
        for (checked, kept) in [(false, 2048), (true, 1760)] {
            let cache = BufCache::new(Arc::clone(gpu.stream()), 1 << 20, checked);
            drop(cache.take::<f32>(440).unwrap());
            assert_eq!(cache.kept().bytes, kept, "checked: {checked}");
        }
    }

    #[test]
    fn a_poisoned_reuse_reads_nan_and_a_full_cache_starts_over() {
        let Some(gpu) = crate::testing::gpu_or_skip("the buffer cache") else {
            return;
        };
        let cache = BufCache::new(Arc::clone(gpu.stream()), 3000, true);
        let mut written = cache.take::<f32>(500).unwrap();
        gpu.stream()
            .memcpy_htod(&[1.0f32; 500], &mut written)
            .unwrap();
        drop(written);
        let reused = cache.take::<f32>(500).unwrap();
        let values = gpu.download(&reused).unwrap();
        assert!(values.iter().all(|v| v.is_nan()), "{:?}", &values[..4]);
        // 2,000 bytes kept, then 1,600 more would pass 3,000: the cache starts over with them.
        let smaller = cache.take::<f32>(400).unwrap();
        drop(reused);
        drop(smaller);
        let _fresh = cache.take::<f32>(500).unwrap();
        let _kept = cache.take::<f32>(400).unwrap();
        // Larger than the whole cache: freed, never kept.
        drop(cache.take::<f32>(1000).unwrap());
        drop(cache.take::<f32>(1000).unwrap());
        assert_eq!(
            cache.counts(),
            CacheCounts {
                reused: 2,
                allocated: 5
            }
        );
    }
}
