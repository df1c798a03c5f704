//! Fused optimizer updates over many parameter tensors at once (multi-tensor AdamW and SGD):
//! every element of every trainable tensor in one parallel pass.

use rayon::prelude::*;

use loren_kernels::{CudaSlice, OptimTable, SlotSpec, optim_table_bytes};

use crate::device::{Booked, Device};
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::tensor::Tensor;

/// One trainable tensor, its gradient and its optimizer state.
pub struct Slot<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a Tensor,
    /// Adam's first moment, or SGD's momentum buffer.
    pub m: &'a mut Tensor,
    /// Adam's second moment; unused by SGD.
    pub v: Option<&'a mut Tensor>,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// The hyper-parameters are the kernels' own: one definition for the CPU twin and the kernel.
pub use loren_kernels::{AdamW, Sgd};

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

fn check(slots: &[Slot<'_>], adam: bool) -> Result<()> {
    const OP: &str = "optimizer_step";
    for s in slots {
        for other in [Some(s.grad), Some(&*s.m), s.v.as_deref()]
            .into_iter()
            .flatten()
        {
            if other.shape() != s.param.shape() {
                return Err(Error::shape(OP, s.param.shape(), other.shape()));
            }
            s.param.same_device(other, OP)?;
        }
        if adam && s.v.is_none() {
            return Err(Error::invalid(
                OP,
                "AdamW needs a second-moment buffer for every tensor",
            ));
        }
    }
    Ok(())
}

/// The work items: equal chunks of each tensor, with its state, flattened across tensors.
type Chunk<'a> = (
    &'a mut [f32],
    &'a [f32],
    &'a mut [f32],
    Option<&'a mut [f32]>,
    bool,
);

fn chunks<'a>(slots: &'a mut [Slot<'_>]) -> Result<Vec<Chunk<'a>>> {
    let mut out = Vec::new();
    for s in slots.iter_mut() {
        let decay = s.decay;
        let p = s.param.as_mut_slice()?.chunks_mut(CHUNK);
        let g = s.grad.as_slice()?.chunks(CHUNK);
        let m = s.m.as_mut_slice()?.chunks_mut(CHUNK);
        match s.v.as_deref_mut() {
            Some(v) => {
                for (((p, g), m), v) in p.zip(g).zip(m).zip(v.as_mut_slice()?.chunks_mut(CHUNK)) {
                    out.push((p, g, m, Some(v), decay));
                }
            }
            None => out.extend(p.zip(g).zip(m).map(|((p, g), m)| (p, g, m, None, decay))),
        }
    }
    Ok(out)
}

/// Decoupled weight decay, then Adam with bias correction, as PyTorch's AdamW.
pub fn adamw_step(slots: &mut [Slot<'_>], h: &AdamW) -> Result<()> {
    check(slots, true)?;
    if h.step == 0 {
        return Err(Error::invalid("adamw_step", "steps count from 1"));
    }
    let (step_size, sqrt_c2) = h.step_scales();
    chunks(slots)?
        .into_par_iter()
        .for_each(|(p, g, m, v, decay)| {
            let v = v.expect("checked: AdamW slots carry v");
            let shrink = if decay {
                1.0 - h.lr * h.weight_decay
            } else {
                1.0
            };
            for i in 0..p.len() {
                m[i] = h.beta1 * m[i] + (1.0 - h.beta1) * g[i];
                v[i] = h.beta2 * v[i] + (1.0 - h.beta2) * g[i] * g[i];
                let denom = v[i].sqrt() / sqrt_c2 + h.eps;
                p[i] = p[i] * shrink - step_size * m[i] / denom;
            }
        });
    Ok(())
}

/// SGD with momentum and L2 weight decay, as PyTorch's SGD (no dampening, no Nesterov).
pub fn sgd_step(slots: &mut [Slot<'_>], h: &Sgd) -> Result<()> {
    check(slots, false)?;
    chunks(slots)?
        .into_par_iter()
        .for_each(|(p, g, buf, _, decay)| {
            let wd = if decay { h.weight_decay } else { 0.0 };
            for i in 0..p.len() {
                let d = g[i] + wd * p[i];
                buf[i] = h.momentum * buf[i] + d;
                p[i] -= h.lr * buf[i];
            }
        });
    Ok(())
}

/// One trainable tensor of a GPU model for the fused kernels: its f32 master, gradient and
/// state, and the bf16 copy the GEMMs read, which every step refreshes.
pub struct GpuSlot<'a> {
    pub param: &'a mut Tensor,
    pub grad: &'a mut Tensor,
    pub m: &'a mut Tensor,
    pub v: Option<&'a mut Tensor>,
    pub shadow: Option<&'a mut Tensor>,
    pub decay: bool,
}

impl GpuSlot<'_> {
    /// The device addresses the table stores for this slot.
    fn addresses(&self) -> Vec<u64> {
        let opt = |t: &Option<&mut Tensor>| t.as_ref().and_then(|t| t.device_address());
        [
            self.param.device_address(),
            self.grad.device_address(),
            self.m.device_address(),
            opt(&self.v),
            opt(&self.shadow),
        ]
        .into_iter()
        .map(|a| a.unwrap_or(0))
        .collect()
    }
}

/// Every trainable tensor of a GPU model as one device table, so an optimizer step (and the
/// gradient norm for clipping) is one launch however many tensors there are.
///
/// The table holds raw device addresses. [`FusedTable::step_adamw`] and friends take the slots
/// again and rebuild the table whenever any address changed, so a table never points at memory
/// its tensors no longer own.
pub struct FusedTable {
    table: OptimTable,
    addresses: Vec<u64>,
    /// f64 scratch of the gradient norm: one partial per block, then the sum.
    scratch: F64Scratch,
    /// The clipping factor; NaN where the gradients' norm was not finite.
    coef: Tensor,
    skipped: SkipCounter,
    /// The table and the scratch, accounted as optimizer state while they live.
    _booked: Booked,
}

/// The device's count of steps whose gradients were not finite, which the one-thread clip_coef
/// kernel adds to. It outlives a rebuilt table: the count is the optimizer's, not the table's.
struct SkipCounter {
    count: CudaSlice<u64>,
    _booked: Booked,
}

impl SkipCounter {
    fn new(dev: &Device) -> Result<SkipCounter> {
        const OP: &str = "optimizer_step";
        let count = dev
            .require_gpu(OP)?
            .stream()
            .alloc_zeros::<u64>(1)
            .map_err(crate::tensor::cuda(OP))?;
        Ok(SkipCounter {
            count,
            _booked: Booked::new(dev, MemTag::OptimizerState, SKIP_COUNTER_BYTES),
        })
    }
}

const SKIP_COUNTER_BYTES: u64 = std::mem::size_of::<u64>() as u64;

/// Device f64 buffers of the gradient norm.
struct F64Scratch {
    partials: CudaSlice<f64>,
    sumsq: CudaSlice<f64>,
}

impl F64Scratch {
    fn new(dev: &Device, blocks: usize) -> Result<F64Scratch> {
        let stream = dev.require_gpu("optimizer_step")?.stream();
        let partials = stream
            .alloc_zeros::<f64>(blocks.max(1))
            .map_err(crate::tensor::cuda("optimizer_step"))?;
        let sumsq = stream
            .alloc_zeros::<f64>(1)
            .map_err(crate::tensor::cuda("optimizer_step"))?;
        Ok(F64Scratch { partials, sumsq })
    }
}

/// Device bytes a [`FusedTable`] over tensors of `numels` elements keeps beside them, all
/// optimizer state: the table and the gradient norm's scratch, the f32 clipping factor and the
/// u64 count of skipped steps.
pub fn fused_table_bytes(numels: &[usize]) -> u64 {
    optim_table_bytes(numels) + std::mem::size_of::<f32>() as u64 + SKIP_COUNTER_BYTES
}

impl FusedTable {
    fn addresses(slots: &[GpuSlot<'_>]) -> Vec<u64> {
        slots.iter().flat_map(GpuSlot::addresses).collect()
    }

    /// The table for `slots`, kept when `current` already describes them.
    pub fn refresh(
        current: Option<FusedTable>,
        dev: &Device,
        slots: &mut [GpuSlot<'_>],
    ) -> Result<FusedTable> {
        const OP: &str = "optimizer_step";
        let addresses = FusedTable::addresses(slots);
        let skipped = match current {
            Some(t) if t.addresses == addresses => return Ok(t),
            // The old table goes (its bytes with it) before the new one is made, as before.
            Some(t) => t.skipped,
            None => SkipCounter::new(dev)?,
        };
        let gpu = dev.require_gpu(OP)?;
        let mut specs = Vec::with_capacity(slots.len());
        for s in slots.iter_mut() {
            specs.push(SlotSpec {
                param: s.param.cu_f32_mut(OP)?,
                grad: s.grad.cu_f32_mut(OP)?,
                m: s.m.cu_f32_mut(OP)?,
                v: match s.v.as_deref_mut() {
                    Some(v) => Some(v.cu_f32_mut(OP)?),
                    None => None,
                },
                param_bf16: match s.shadow.as_deref_mut() {
                    Some(t) => Some(t.cu_bf16_mut(OP)?),
                    None => None,
                },
                decay: s.decay,
            });
        }
        // SAFETY: the table is used only through the methods below, which take the slots again
        // and rebuild it when any of their addresses differ from the ones recorded here; every
        // launch is on the one stream of this device.
        let table = unsafe { gpu.optim_table(&mut specs)? };
        let numels: Vec<usize> = slots.iter().map(|s| s.param.numel()).collect();
        Ok(FusedTable {
            addresses,
            scratch: F64Scratch::new(dev, table.blocks())?,
            coef: Tensor::zeros([1], MemTag::OptimizerState, dev)?,
            skipped,
            _booked: Booked::new(dev, MemTag::OptimizerState, optim_table_bytes(&numels)),
            table,
        })
    }

    /// The clipping factor on the device, when clipping: Σ grad² over every tensor, then
    /// min(1, max_norm / (norm + 1e-6)), torch.nn.utils.clip_grad_norm_'s rule; NaN where the
    /// norm is not finite, which makes the update change nothing, and adds the step to the skip
    /// count unless `guard` (the loss) is not finite either.
    fn clip(
        &mut self,
        dev: &Device,
        max_norm: Option<f64>,
        guard: Option<&dyn loren_kernels::DevicePtr<f32>>,
    ) -> Result<bool> {
        const OP: &str = "clip_grad_norm";
        let Some(max_norm) = max_norm else {
            return Ok(false);
        };
        let gpu = dev.require_gpu(OP)?;
        let s = &mut self.scratch;
        gpu.grad_sum_squares(&self.table, &mut s.partials, &mut s.sumsq)?;
        gpu.clip_coef(
            &s.sumsq,
            max_norm,
            self.coef.cu_f32_mut(OP)?,
            None,
            guard,
            Some(&mut self.skipped.count),
        )?;
        Ok(true)
    }

    /// The clipping factor a step scales its gradients by, when [`FusedTable::clip`] made one.
    fn scale(
        &self,
        op: &'static str,
        clipped: bool,
    ) -> Result<Option<&dyn loren_kernels::DevicePtr<f32>>> {
        Ok(match clipped {
            true => Some(self.coef.cu_f32(op)? as &dyn loren_kernels::DevicePtr<f32>),
            false => None,
        })
    }

    /// One AdamW step over every slot, clipping the global gradient norm first when asked. No
    /// value comes back to the host. With `guard` (a one-element f32 tensor on this device: the
    /// step's loss) nothing changes unless its value is finite, which the kernel reads. When
    /// clipping, nothing changes either where the gradients' norm is not finite, and the step is
    /// counted ([`FusedTable::skipped_steps`]); without clipping no norm is computed, and such
    /// gradients go into the update.
    pub fn step_adamw(
        &mut self,
        dev: &Device,
        h: &AdamW,
        max_norm: Option<f64>,
        guard: Option<&Tensor>,
    ) -> Result<()> {
        let guard = guard_ptr("adamw_step", guard)?;
        let clipped = self.clip(dev, max_norm, guard)?;
        let gpu = dev.require_gpu("adamw_step")?;
        let scale = self.scale("adamw_step", clipped)?;
        Ok(gpu.adamw_step(&self.table, h, scale, guard)?)
    }

    /// One SGD step, clipping first when asked; `guard` as for [`FusedTable::step_adamw`].
    pub fn step_sgd(
        &mut self,
        dev: &Device,
        h: &Sgd,
        max_norm: Option<f64>,
        guard: Option<&Tensor>,
    ) -> Result<()> {
        let guard = guard_ptr("sgd_step", guard)?;
        let clipped = self.clip(dev, max_norm, guard)?;
        let gpu = dev.require_gpu("sgd_step")?;
        let scale = self.scale("sgd_step", clipped)?;
        Ok(gpu.sgd_step(&self.table, h, scale, guard)?)
    }

    /// Steps this table (and any it replaced) left alone because, with clipping, their
    /// gradients' norm was not finite while their guard was. Waits for the steps queued so far.
    pub fn skipped_steps(&self) -> Result<u64> {
        let on_device = &self.skipped.count;
        let host = on_device
            .stream()
            .clone_dtoh(on_device)
            .map_err(crate::tensor::cuda("skipped_steps"))?;
        Ok(host[0])
    }
}

/// The device value a guarded step reads: one f32 element.
fn guard_ptr<'a>(
    op: &'static str,
    guard: Option<&'a Tensor>,
) -> Result<Option<&'a dyn loren_kernels::DevicePtr<f32>>> {
    let Some(t) = guard else { return Ok(None) };
    if t.numel() != 1 {
        return Err(Error::invalid(
            op,
            format!("the guard is one value, got {}", t.shape()),
        ));
    }
    Ok(Some(t.cu_f32(op)? as &dyn loren_kernels::DevicePtr<f32>))
}
