//! Host-to-device uploads through one page-locked staging buffer.
//!
//! A copy from pageable memory is staged by the driver itself, in pieces, and the call returns
//! only when the last piece has been handed over; on one stream those pieces queue behind every
//! kernel already enqueued, so a training step's images, uploaded while the previous step's
//! backward still runs, would hold the host until that backward is done and then leave the GPU
//! idle for the whole transfer at pageable speed. From page-locked memory the copy is one DMA
//! queued on the stream and the host returns at once.
//!
//! The buffer is reused: before writing into it the host waits for the copy that last read it (an
//! event recorded after that copy), which in a training loop finished a step ago. Uploads under
//! [`STAGING_MIN_BYTES`] go straight from pageable memory, as the driver copies those into its
//! own staging at once; waiting for an earlier staged copy that is still queued behind the
//! previous step's kernels would stall the host for them. Uploads over [`STAGING_MAX_BYTES`] (the
//! weights of a big explicit ensemble at load time, once) go the same way rather than pin that
//! much host memory for good.

use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::driver::sys::{self as cu, CUevent_flags};
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtrMut, DeviceRepr, result};

use crate::error::{KernelError, Result};
use crate::gpu::Gpu;

/// Uploads smaller than this many bytes are copied from pageable memory.
pub const STAGING_MIN_BYTES: usize = 1 << 20;
/// Uploads larger than this many bytes are copied from pageable memory.
pub const STAGING_MAX_BYTES: usize = 64 << 20;

/// The page-locked buffer and the event recorded after the last copy out of it.
pub(crate) struct Staging {
    buf: Mutex<Option<Pinned>>,
}

struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    copied: CudaEvent,
}

// SAFETY: `ptr` is page-locked host memory this struct alone owns; it is only touched under
// `Staging`'s mutex.
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
            buf: Mutex::new(None),
        }
    }
}

impl Gpu {
    /// A new device buffer of `len` elements, filled on the host by `fill` and copied up on the
    /// stream. `fill` writes every element of the slice it gets (page-locked staging memory, or a
    /// fresh host vector for small and very large uploads; see the module docs). Returns once the
    /// copy is queued; the host waits only for the previous staged copy, when it is still queued.
    pub fn upload<T: DeviceRepr + Copy + Default>(
        &self,
        len: usize,
        fill: impl FnOnce(&mut [T]),
    ) -> Result<CudaSlice<T>> {
        let bytes = len * std::mem::size_of::<T>();
        let stream = self.stream();
        if !(STAGING_MIN_BYTES..=STAGING_MAX_BYTES).contains(&bytes) {
            let mut host = vec![T::default(); len];
            fill(&mut host);
            return stream
                .clone_htod(&host)
                .map_err(KernelError::driver("copying to the device"));
        }
        let mut guard = self.staging().buf.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|p| p.bytes < bytes) {
            // Grow by doubling up to the cap, so a few sizes in turn settle on one buffer.
            let want = bytes.next_power_of_two().clamp(bytes, STAGING_MAX_BYTES);
            *guard = None; // the old buffer, freed once its last copy is done
            *guard = Some(self.pin(want)?);
        }
        let pinned = guard.as_mut().expect("a staging buffer was just made");
        pinned
            .copied
            .synchronize()
            .map_err(KernelError::driver("waiting for the staging buffer"))?;
        // SAFETY: the buffer holds at least `bytes` bytes, page-aligned (so aligned for T), and
        // no copy reads it any more (the wait above); `fill` sees it as `len` plain values.
        let host = unsafe { std::slice::from_raw_parts_mut(pinned.ptr as *mut T, len) };
        fill(host);
        // SAFETY: `alloc` leaves the memory unset; the copy below writes all of it.
        let mut dst = unsafe { stream.alloc::<T>(len) }
            .map_err(KernelError::driver("allocating device memory"))?;
        {
            let (dptr, _record) = dst.device_ptr_mut(stream);
            // SAFETY: `dptr` holds `len` elements of T, the source `len` staged ones; the DMA reads
            // the staging buffer after the call returns, and `copied`, recorded next, guards it.
            unsafe { result::memcpy_htod_async(dptr, &host[..], stream.cu_stream()) }
                .map_err(KernelError::driver("copying to the device"))?;
        }
        pinned
            .copied
            .record(stream)
            .map_err(KernelError::driver("recording the staging event"))?;
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
