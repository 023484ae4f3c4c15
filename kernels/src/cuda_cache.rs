//! Device buffers kept for reuse, by size in bytes. A training step allocates its ~70
//! activations, gradients, uploads and temporaries in the same sizes and order every step;
//! handed back here when dropped and handed out again at the next request of that size, a step
//! after the first of its shape asks the driver for nothing (no `cuMemAllocAsync` or
//! `cuMemFreeAsync`, each a driver call of about a microsecond on the host) and sees the same
//! addresses every step, which capturing the step in a CUDA graph needs. A batch's non-zeros
//! differ by a few percent from step to step, so a request with no kept buffer of its size takes
//! the smallest kept one up to 1/8 larger (the rest unused); the driver allocates the exact
//! size, so a kernel writing past its buffer still fails under the emulator's AddressSanitizer
//! unless the buffer it overran was one of those.
//!
//! Sound because every buffer here belongs to the GPU's one compute stream: a buffer comes back
//! after its last use was queued on that stream, and whatever writes it next is queued on the
//! same stream after that use (the rule of the driver's own stream-ordered free).
//!
//! `TESSERA_CUDA_POISON=1` (read by `Gpu::new`) fills every reused buffer with 0xff bytes (NaN in every float)
//! before handing it out, as the emulated driver fills fresh memory: an op reading what it did
//! not write then fails the parity tests instead of reading a previous step's values.
#![allow(unsafe_code)] // a kept allocation changes element type: see `retype`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr};

use crate::cuda::{Result, driver};

/// Bytes a GPU's cache keeps at most: far above a step's working set (a Census-size step, 8,000 genes at batch
/// 1,024, uses ~0.3 GB), far below a GPU's memory. Past it the cache is emptied into the
/// driver's pool (which keeps freed memory as well, for requests of any size) and starts over
/// with the buffer coming back, so sizes no longer asked for do not hold it full.
pub const KEEP_BYTES: usize = 4 << 30;

/// The kept buffers of one GPU's compute stream.
pub struct BufCache {
    stream: Arc<CudaStream>,
    kept: Mutex<Kept>,
    keep_bytes: usize,
    poison: bool,
}

#[derive(Default)]
struct Kept {
    /// Allocations by their size in bytes.
    by_bytes: BTreeMap<usize, Vec<CudaSlice<u8>>>,
    bytes: usize,
    counts: CacheCounts,
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
    /// A cache for `stream` keeping at most `keep_bytes`; `poison`: reused buffers are filled
    /// with 0xff bytes.
    pub fn new(stream: Arc<CudaStream>, keep_bytes: usize, poison: bool) -> Arc<BufCache> {
        Arc::new(BufCache {
            stream,
            kept: Mutex::new(Kept::default()),
            keep_bytes,
            poison,
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `n` values whose contents are whatever the memory held (a kept buffer's old values).
    pub fn take<T: DeviceRepr>(self: &Arc<Self>, n: usize) -> Result<DeviceBuf<T>> {
        let wanted = n * std::mem::size_of::<T>();
        let (mut slice, bytes) = match self.kept_of(wanted) {
            // SAFETY: a kept allocation of at least `wanted` bytes.
            Some(s) => (unsafe { retype::<u8, T>(s.0, n) }, s.1),
            // SAFETY: the values are written before they are read (the callers' contract).
            None => (
                unsafe { self.stream.alloc::<T>(n) }.map_err(driver("alloc"))?,
                wanted,
            ),
        };
        if self.poison {
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

    /// The smallest kept allocation of `wanted` bytes up to 1/8 more, and its size; counted.
    fn kept_of(&self, wanted: usize) -> Option<(CudaSlice<u8>, usize)> {
        let mut k = self.kept();
        let found = k
            .by_bytes
            .range_mut(wanted..=wanted + wanted / 8)
            .find_map(|(&bytes, all)| all.pop().map(|s| (s, bytes)));
        match &found {
            Some((_, bytes)) => {
                k.bytes -= bytes;
                k.counts.reused += 1;
            }
            None => k.counts.allocated += 1,
        }
        found
    }

    /// Keeps an allocation of `bytes` bytes whose last use has been queued.
    fn put<T>(&self, slice: CudaSlice<T>, bytes: usize) {
        if bytes > self.keep_bytes {
            return; // freed, in stream order
        }
        // SAFETY: `bytes` is the allocation's size.
        let slice = unsafe { retype::<T, u8>(slice, bytes) };
        let mut k = self.kept();
        if k.bytes + bytes > self.keep_bytes {
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
    use crate::cuda::Gpu;

    fn gpu_or_skip(what: &str) -> Option<Gpu> {
        match Gpu::new(0) {
            Ok(gpu) => Some(gpu),
            Err(e) => {
                let why = format!("{what} needs a CUDA device: {e}");
                crate::testing::skip("TESSERA_REQUIRE_DEVICE", &why);
                None
            }
        }
    }

    fn address<T>(buf: &DeviceBuf<T>) -> u64 {
        buf.device_ptr(buf.stream()).0
    }

    #[test]
    fn a_dropped_buffer_serves_the_next_request_of_its_size_or_up_to_an_eighth_less() {
        let Some(gpu) = gpu_or_skip("the buffer cache") else {
            return;
        };
        let cache = BufCache::new(Arc::clone(gpu.stream()), 1 << 20, false);
        let first = cache.take::<f32>(256).unwrap();
        let small = address(&first);
        drop(first);
        let as_u32 = cache.take::<u32>(256).unwrap();
        assert_eq!(address(&as_u32), small, "1 KiB kept, served as u32");
        let other = cache.take::<u64>(256).unwrap();
        let large = address(&other);
        assert_ne!(large, small, "2 KiB is another size");
        drop(other);
        // 1,840 bytes take the kept 2,048 (as 460 values); they return as 2,048.
        let within = cache.take::<f32>(460).unwrap();
        assert_eq!((within.len(), address(&within)), (460, large));
        drop(within);
        let whole = cache.take::<u64>(256).unwrap();
        assert_eq!(address(&whole), large);
        drop(whole);
        // 1,760 bytes: 2,048 is more than an eighth more.
        let beyond = cache.take::<f32>(440).unwrap();
        assert_ne!(address(&beyond), large);
        assert_eq!(
            cache.counts(),
            CacheCounts {
                reused: 3,
                allocated: 3
            }
        );
    }

    #[test]
    fn a_poisoned_reuse_reads_nan_and_a_full_cache_starts_over() {
        let Some(gpu) = gpu_or_skip("the buffer cache") else {
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
