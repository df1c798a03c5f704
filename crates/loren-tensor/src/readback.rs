//! A one-element tensor's value on its way to the host, read later than it is made.
//!
//! Reading a GPU value waits for everything queued before it. The training step's loss is made at
//! the end of the forward; read there, the host would wait for the forward and only then queue
//! the backward, leaving the GPU idle while the first backward kernels are launched, and every
//! kernel after them launched just in time rather than ahead. So the step queues the loss's copy
//! into page-locked memory where the loss is made, queues the backward and the update behind it
//! (the update guarded on the device by the loss being finite), and reads the copy last.

use loren_kernels::{CUevent_flags, CudaEvent, PinnedHostSlice};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const OP: &str = "scalar_readback";

/// One f32 for [`ScalarReadback::queue`] and [`ScalarReadback::wait`], reused from step to step.
pub struct ScalarReadback {
    device: Device,
    slot: Slot,
    queued: bool,
}

enum Slot {
    Cpu(f32),
    /// Not write-combined: the host reads it. The event is recorded after each copy into it:
    /// cudarc records the slice's own only with its cross-stream tracking, which `Gpu` turns off.
    Gpu {
        host: PinnedHostSlice<f32>,
        copied: CudaEvent,
    },
}

impl Drop for ScalarReadback {
    fn drop(&mut self) {
        // A step that failed between `queue` and `wait` may leave the copy running: the page-
        // locked memory must outlive it. An error here has nowhere to go.
        if let Slot::Gpu { copied, .. } = &self.slot {
            let _ = copied.synchronize();
        }
    }
}

impl std::fmt::Debug for ScalarReadback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScalarReadback")
            .field("device", &self.device)
            .field("queued", &self.queued)
            .finish()
    }
}

impl ScalarReadback {
    /// A readback for values on `device`: on a GPU, one page-locked f32 made here, once.
    pub fn new(device: &Device) -> Result<ScalarReadback> {
        let slot = match device.gpu() {
            None => Slot::Cpu(f32::NAN),
            Some(gpu) => {
                // SAFETY: the memory starts unset; `wait` reads it only after a copy into it.
                let host = unsafe { gpu.context().alloc_pinned_with_flags::<f32>(1, 0) }
                    .map_err(crate::tensor::cuda(OP))?;
                let copied = gpu
                    .context()
                    .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                    .map_err(crate::tensor::cuda(OP))?;
                Slot::Gpu { host, copied }
            }
        };
        Ok(ScalarReadback {
            device: device.clone(),
            slot,
            queued: false,
        })
    }

    /// Queue the copy of `t`'s one value (an f32 tensor on this readback's device) and return: on
    /// a GPU the copy runs after the work queued so far, on the CPU the value is taken now.
    pub fn queue(&mut self, t: &Tensor) -> Result<()> {
        if t.numel() != 1 {
            return Err(Error::invalid(
                OP,
                format!("reads one value, got {}", t.shape()),
            ));
        }
        if !t.device().same(&self.device) {
            return Err(Error::DeviceMismatch {
                op: OP,
                lhs: t.device().to_string(),
                rhs: self.device.to_string(),
            });
        }
        match &mut self.slot {
            Slot::Cpu(v) => *v = t.as_slice()?[0],
            Slot::Gpu { host, copied } => {
                let stream = self.device.require_gpu(OP)?.stream();
                stream
                    .memcpy_dtoh(t.cu_f32(OP)?, host)
                    .map_err(crate::tensor::cuda(OP))?;
                copied.record(stream).map_err(crate::tensor::cuda(OP))?;
            }
        }
        self.queued = true;
        Ok(())
    }

    /// The value queued last, once its copy is done: the host waits for that copy and what was
    /// queued before it, not for what was queued after.
    pub fn wait(&mut self) -> Result<f32> {
        if !std::mem::take(&mut self.queued) {
            return Err(Error::invalid(OP, "nothing was queued to read"));
        }
        match &self.slot {
            Slot::Cpu(v) => Ok(*v),
            Slot::Gpu { host, copied } => {
                copied.synchronize().map_err(crate::tensor::cuda(OP))?;
                // SAFETY: the copy into the one f32 has finished (the event after it), and no
                // other copy into it is queued until the next `queue`, which takes `&mut self`.
                Ok(unsafe { *host.as_ptr().map_err(crate::tensor::cuda(OP))? })
            }
        }
    }
}
