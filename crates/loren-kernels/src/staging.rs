//! Host-to-device copies of data (a step's images) through page-locked staging buffers.
//!
//! A copy from pageable memory is staged by the driver itself, in pieces, and the call returns
//! only when the last piece has been handed over; on one stream those pieces queue behind every
//! kernel already enqueued, so a training step's images, uploaded while the previous step's
//! backward still runs, would hold the host until that backward is done and then leave the GPU
//! idle for the whole transfer at pageable speed. From page-locked memory the copy is one DMA
//! queued on the stream and the host returns at once.
//!
//! Filling a buffer ([`Gpu::stage`]) and queueing the copy out of it ([`Gpu::upload_staged`]) are
//! separate steps, so the fill (a step's images: 19 MB at ViT-B) can run on another thread, the
//! one that makes the batches, while this one issues the step before. The buffers come from a
//! small pool and go back to it once their copy is queued; before refilling one the host waits for
//! that copy (an event recorded after it), which in a training loop finished a step ago. Data
//! under [`STAGING_MIN_BYTES`] goes straight from pageable memory, as the driver copies that into
//! its own staging at once; data over [`STAGING_MAX_BYTES`] too, rather than pin that much host
//! memory for good. Weights, uploaded once at load, do not come this way.

use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::driver::sys::{self as cu, CUevent_flags};
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtrMut, DeviceRepr, result};

use crate::error::{KernelError, Result};
use crate::gpu::Gpu;

/// Staged data smaller than this many bytes is copied from pageable memory.
pub const STAGING_MIN_BYTES: usize = 1 << 20;
/// Staged data larger than this many bytes (an evaluation chunk of 256 images at 224 × 224 is
/// 154 MB) is copied from pageable memory.
pub const STAGING_MAX_BYTES: usize = 256 << 20;

/// How many page-locked buffers the pool keeps: the batches prefetched ahead, the one being
/// made, and the one being uploaded.
const POOL_KEEP: usize = 4;

/// The page-locked buffers not in use, each with the event recorded after the last copy out of it.
pub(crate) struct Staging {
    pool: Mutex<Vec<Pinned>>,
}

struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    copied: CudaEvent,
}

// SAFETY: `ptr` is page-locked host memory the struct alone owns; whoever holds the struct has
// it exclusively.
unsafe impl Send for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        // The last copy out of the buffer must be done before the memory goes back; an error
        // here has nowhere to go, and the free would be the wrong thing to skip.
        let _ = self.copied.synchronize();
        // SAFETY: `ptr` came from `malloc_host` and is freed once, here.
        let _ = unsafe { result::free_host(self.ptr as *mut c_void) };
    }
}

impl Staging {
    pub(crate) fn new() -> Staging {
        Staging {
            pool: Mutex::new(Vec::new()),
        }
    }

    fn take(&self, bytes: usize) -> Option<Pinned> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let best = (0..pool.len())
            .filter(|&i| pool[i].bytes >= bytes)
            .min_by_key(|&i| pool[i].bytes)?;
        Some(pool.swap_remove(best))
    }

    fn give_back(&self, p: Pinned) {
        let spare = {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.push(p);
            // Past the limit the smallest goes: the sizes that keep coming are the big ones.
            (pool.len() > POOL_KEEP).then(|| {
                let smallest = (0..pool.len()).min_by_key(|&i| pool[i].bytes).unwrap_or(0);
                pool.swap_remove(smallest)
            })
        };
        // Freed outside the lock: dropping waits for the buffer's last copy.
        drop(spare);
    }
}

/// `len` values of T filled on the host and ready to go up ([`Gpu::upload_staged`]): in a
/// page-locked buffer, or in a plain vector when the size is outside the staging range. It may
/// be made and handed over on any thread.
pub struct Staged<T> {
    len: usize,
    host: StagedHost<T>,
}

enum StagedHost<T> {
    Pinned(Pinned),
    Pageable(Vec<T>),
}

impl Gpu {
    /// `len` values written by `fill` (every element of the slice it gets) into host memory ready
    /// for [`Gpu::upload_staged`]: a page-locked buffer from the pool, after waiting for the copy
    /// that last read it, or a plain vector outside the staging range (module docs). Any thread.
    pub fn stage<T: DeviceRepr + Copy + Default>(
        &self,
        len: usize,
        fill: impl FnOnce(&mut [T]),
    ) -> Result<Staged<T>> {
        let bytes = len * std::mem::size_of::<T>();
        if !(STAGING_MIN_BYTES..=STAGING_MAX_BYTES).contains(&bytes) {
            let mut host = vec![T::default(); len];
            fill(&mut host);
            return Ok(Staged {
                len,
                host: StagedHost::Pageable(host),
            });
        }
        let pinned = match self.staging().take(bytes) {
            Some(p) => p,
            None => self.pin(bytes)?,
        };
        pinned
            .copied
            .synchronize()
            .map_err(KernelError::driver("waiting for a staging buffer"))?;
        // SAFETY: the buffer holds at least `bytes` bytes, page-aligned (so aligned for T), and
        // no copy reads it any more (the wait above); `fill` sees it as `len` plain values.
        fill(unsafe { std::slice::from_raw_parts_mut(pinned.ptr as *mut T, len) });
        Ok(Staged {
            len,
            host: StagedHost::Pinned(pinned),
        })
    }

    /// A new device buffer holding `staged`, its copy queued on the stream. From page-locked
    /// memory this returns at once and the buffer goes back to the pool, guarded by an event
    /// recorded after the copy.
    pub fn upload_staged<T: DeviceRepr + Copy + Default>(
        &self,
        staged: Staged<T>,
    ) -> Result<CudaSlice<T>> {
        let stream = self.stream();
        let pinned = match staged.host {
            StagedHost::Pageable(host) => {
                return stream
                    .clone_htod(&host)
                    .map_err(KernelError::driver("copying to the device"));
            }
            StagedHost::Pinned(p) => p,
        };
        let len = staged.len;
        // SAFETY: `alloc` leaves the memory unset; the copy below writes all of it.
        let mut dst = unsafe { stream.alloc::<T>(len) }
            .map_err(KernelError::driver("allocating device memory"))?;
        {
            let (dptr, _record) = dst.device_ptr_mut(stream);
            // SAFETY: `stage` filled `len` values of T at `ptr`. The DMA reads them after this
            // call returns; `copied`, recorded next, keeps the buffer from being refilled before.
            let host = unsafe { std::slice::from_raw_parts(pinned.ptr as *const T, len) };
            unsafe { result::memcpy_htod_async(dptr, host, stream.cu_stream()) }
                .map_err(KernelError::driver("copying to the device"))?;
        }
        pinned
            .copied
            .record(stream)
            .map_err(KernelError::driver("recording the staging event"))?;
        self.staging().give_back(pinned);
        Ok(dst)
    }

    /// `bytes` of write-combined page-locked host memory (the host only writes it, the device
    /// only reads it).
    fn pin(&self, bytes: usize) -> Result<Pinned> {
        let copied = self
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(KernelError::driver("creating the staging event"))?;
        // SAFETY: a plain allocation; the pointer is checked below and owned by `Pinned`.
        let ptr = unsafe { result::malloc_host(bytes, cu::CU_MEMHOSTALLOC_WRITECOMBINED) }
            .map_err(KernelError::driver("allocating page-locked staging memory"))?
            as *mut u8;
        if ptr.is_null() {
            return Err(KernelError::Unavailable(
                "the driver returned no page-locked staging memory".into(),
            ));
        }
        Ok(Pinned { ptr, bytes, copied })
    }
}
