//! Launchers for `kernels/optim.cu`: multi-tensor AdamW and SGD over every trainable tensor in
//! one launch, and the global gradient norm for clipping.
//!
//! The tensors are listed once in an [`OptimTable`] on the device (one upload at set-up); a step
//! then uploads nothing: the hyper-parameters travel as kernel arguments.

use crate::bf16;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig};

use super::{BLOCK, positive};
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu};
use crate::sources::Kernel;

/// Elements per block, as `optim::CHUNK` in optim.cu.
pub const CHUNK: usize = 4096;

/// One trainable tensor as the kernels see it; the layout of `TensorSlot` in optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TensorSlot {
    param: u64,
    grad: u64,
    m: u64,
    v: u64,
    param_bf16: u64,
    numel: u64,
    block_start: u32,
    decay: u32,
}

// SAFETY: a plain #[repr(C)] struct of integers, the same layout as the CUDA struct.
unsafe impl DeviceRepr for TensorSlot {}

const _: () = assert!(std::mem::size_of::<TensorSlot>() == 56);

/// One trainable tensor for [`Gpu::optim_table`]: its f32 parameter and gradient, the optimizer
/// state (`m`: Adam's first moment or SGD's momentum buffer; `v`: Adam's second moment, `None`
/// for SGD), an optional bf16 copy to refresh after each update, and whether weight decay applies.
pub struct SlotSpec<'a> {
    pub param: &'a mut dyn DevicePtrMut<f32>,
    pub grad: &'a mut dyn DevicePtrMut<f32>,
    pub m: &'a mut dyn DevicePtrMut<f32>,
    pub v: Option<&'a mut dyn DevicePtrMut<f32>>,
    pub param_bf16: Option<&'a mut dyn DevicePtrMut<bf16>>,
    pub decay: bool,
}

/// The device-side list of trainable tensors.
#[derive(Debug)]
pub struct OptimTable {
    slots: CudaSlice<TensorSlot>,
    count: usize,
    blocks: usize,
    has_v: bool,
}

impl OptimTable {
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.count
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Blocks of one multi-tensor launch; also the length of the partials buffer of
    /// [`Gpu::grad_sum_squares`].
    pub fn blocks(&self) -> usize {
        self.blocks
    }
}

/// Device bytes of an [`OptimTable`] over tensors of `numels` elements (one slot each), with the
/// f64 scratch of its gradient norm: one partial per block for [`Gpu::grad_sum_squares`], and
/// their sum.
pub fn optim_table_bytes(numels: &[usize]) -> u64 {
    let blocks: usize = numels.iter().map(|n| n.div_ceil(CHUNK)).sum();
    (numels.len() * std::mem::size_of::<TensorSlot>() + 8 * (blocks.max(1) + 1)) as u64
}

/// AdamW hyper-parameters (PyTorch semantics, as the CPU twin's `AdamW`).
///
/// As in PyTorch, a gradient element above about 6e20 overflows its second moment to infinity,
/// after which that parameter never moves again; clipping the gradient's norm first (loren's
/// default, at 1) keeps that from happening.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// The 1-based step number, for bias correction.
    pub step: u64,
}

impl AdamW {
    /// The step's bias-corrected scales, lr/(1 − β1^step) and √(1 − β2^step): computed in f64,
    /// then rounded, for the CPU twin and the kernel alike. A step past 2^31 counts as 2^31 − 1:
    /// the powers are 0 to f64 long before, for any β of use.
    pub fn step_scales(&self) -> (f32, f32) {
        let step = i32::try_from(self.step).unwrap_or(i32::MAX);
        let c = |beta: f32| 1.0 - (beta as f64).powi(step);
        let step_size = (self.lr as f64 / c(self.beta1)) as f32;
        (step_size, c(self.beta2).sqrt() as f32)
    }
}

/// SGD hyper-parameters (momentum, no dampening, no Nesterov; L2 weight decay).
#[derive(Clone, Copy, Debug)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

impl Gpu {
    /// Upload the table of trainable tensors (one host-to-device copy; do it once).
    ///
    /// # Safety
    /// The table keeps raw device addresses. Every buffer in `specs` must stay allocated, and be
    /// used with no other launch in flight on another stream, for as long as the table is passed
    /// to a launcher. Dropping or reallocating a buffer invalidates the table.
    pub unsafe fn optim_table(&self, specs: &mut [SlotSpec<'_>]) -> Result<OptimTable> {
        const OP: &str = "optim_table";
        if specs.is_empty() {
            return Err(KernelError::invalid(OP, "no tensors"));
        }
        let has_v = specs[0].v.is_some();
        let mut host = Vec::with_capacity(specs.len());
        let mut block_start = 0usize;
        for (i, s) in specs.iter_mut().enumerate() {
            let numel = s.param.len();
            positive(OP, "tensor size", numel)?;
            if s.v.is_some() != has_v {
                return Err(KernelError::invalid(
                    OP,
                    "either every tensor has a second moment or none does",
                ));
            }
            let what = |name: &str| format!("tensor {i}: {name}");
            for (name, len) in [("grad", s.grad.len()), ("m", s.m.len())]
                .into_iter()
                .chain(s.v.as_ref().map(|v| ("v", v.len())))
                .chain(s.param_bf16.as_ref().map(|p| ("param_bf16", p.len())))
            {
                if len != numel {
                    return Err(KernelError::invalid(
                        OP,
                        format!("{} has {len} elements, the parameter {numel}", what(name)),
                    ));
                }
            }
            let param = self.output(OP, &what("param"), &mut *s.param, numel)?.ptr;
            let grad = self.output(OP, &what("grad"), &mut *s.grad, numel)?.ptr;
            let m = self.output(OP, &what("m"), &mut *s.m, numel)?.ptr;
            let v = match s.v.as_deref_mut() {
                Some(v) => self.output(OP, &what("v"), v, numel)?.ptr,
                None => 0,
            };
            let param_bf16 = match s.param_bf16.as_deref_mut() {
                Some(p) => self.output(OP, &what("param_bf16"), p, numel)?.ptr,
                None => 0,
            };
            host.push(TensorSlot {
                param,
                grad,
                m,
                v,
                param_bf16,
                numel: numel as u64,
                block_start: u32::try_from(block_start)
                    .map_err(|_| KernelError::invalid(OP, "more than 2^32 blocks"))?,
                decay: s.decay as u32,
            });
            block_start += numel.div_ceil(CHUNK);
        }
        if block_start > i32::MAX as usize {
            return Err(KernelError::invalid(OP, "too many elements for one launch"));
        }
        let slots = self
            .stream()
            .clone_htod(&host)
            .map_err(KernelError::driver("uploading the optimizer table"))?;
        Ok(OptimTable {
            slots,
            count: host.len(),
            blocks: block_start,
            has_v,
        })
    }

    fn table_cfg(t: &OptimTable) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (t.blocks as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// One AdamW step over every tensor of `table` (PyTorch's AdamW: decoupled weight decay,
    /// bias correction), refreshing the bf16 copies. `grad_scale` ([1] f32 on the device, e.g.
    /// from [`Gpu::clip_coef`]) multiplies every gradient when given. With `guard` ([1] f32 on the
    /// device, e.g. the step's loss) the kernel changes nothing unless that value is finite, so
    /// the host can queue the update before it knows the loss; a `grad_scale` that is not finite
    /// ([`Gpu::clip_coef`]'s over gradients that were not) changes nothing either.
    pub fn adamw_step(
        &self,
        table: &OptimTable,
        h: &AdamW,
        grad_scale: Option<&dyn DevicePtr<f32>>,
        guard: Option<&dyn DevicePtr<f32>>,
    ) -> Result<()> {
        const OP: &str = "adamw_step";
        if h.step == 0 {
            return Err(KernelError::invalid(OP, "steps count from 1"));
        }
        if !table.has_v {
            return Err(KernelError::invalid(
                OP,
                "AdamW needs a second moment for every tensor",
            ));
        }
        let scale = self.input_opt(OP, "grad_scale", grad_scale, 1)?;
        let guard = self.input_opt(OP, "guard", guard, 1)?;
        let (step_size, sqrt_c2) = h.step_scales();
        let n = table.count as i32;
        let slots = self.input(OP, "table", &table.slots, table.count)?;
        self.launch(
            Kernel::AdamwMulti,
            Self::table_cfg(table),
            &[
                slots.arg(),
                Arg::from(n),
                scale.arg(),
                guard.arg(),
                Arg::from(h.lr),
                Arg::from(h.beta1),
                Arg::from(h.beta2),
                Arg::from(h.eps),
                Arg::from(h.weight_decay),
                Arg::from(step_size),
                Arg::from(sqrt_c2),
            ],
        )
    }

    /// One SGD step (momentum buffer in the slots' `m`) over every tensor of `table`; `grad_scale`
    /// and `guard` as for [`Gpu::adamw_step`].
    pub fn sgd_step(
        &self,
        table: &OptimTable,
        h: &Sgd,
        grad_scale: Option<&dyn DevicePtr<f32>>,
        guard: Option<&dyn DevicePtr<f32>>,
    ) -> Result<()> {
        const OP: &str = "sgd_step";
        let scale = self.input_opt(OP, "grad_scale", grad_scale, 1)?;
        let guard = self.input_opt(OP, "guard", guard, 1)?;
        let n = table.count as i32;
        let slots = self.input(OP, "table", &table.slots, table.count)?;
        self.launch(
            Kernel::SgdMulti,
            Self::table_cfg(table),
            &[
                slots.arg(),
                Arg::from(n),
                scale.arg(),
                guard.arg(),
                Arg::from(h.lr),
                Arg::from(h.momentum),
                Arg::from(h.weight_decay),
            ],
        )
    }

    /// `out[0] = Σ grad²` over every tensor of `table`, in f64, deterministic: one partial per
    /// block into `partials` ([`OptimTable::blocks`] f64), then a fixed-order sum.
    pub fn grad_sum_squares(
        &self,
        table: &OptimTable,
        partials: &mut (impl DevicePtr<f64> + DevicePtrMut<f64>),
        out: &mut dyn DevicePtrMut<f64>,
    ) -> Result<()> {
        const OP: &str = "grad_sum_squares";
        {
            let part = self.output(OP, "partials", partials, table.blocks)?;
            let n = table.count as i32;
            let slots = self.input(OP, "table", &table.slots, table.count)?;
            self.launch(
                Kernel::GradSumsqMulti,
                Self::table_cfg(table),
                &[slots.arg(), Arg::from(n), part.arg()],
            )?;
        }
        self.sumsq_finish(OP, &*partials, table.blocks, out)
    }

    /// torch.nn.utils.clip_grad_norm_'s factor: `coef[0] = min(1, max_norm / (sqrt(sumsq) + 1e-6))`
    /// f32, and `norm[0] = sqrt(sumsq)` f64 when given. Feed `coef` to the step's `grad_scale`,
    /// or to [`Gpu::grad_scale`] to scale the gradients in place as the CPU does.
    ///
    /// Where the norm is not finite (a gradient holds a NaN or an infinity), `coef[0]` is NaN:
    /// [`Gpu::adamw_step`] and [`Gpu::sgd_step`] then change nothing, and [`Gpu::grad_scale`]
    /// leaves the gradients as they are. Such a step adds 1 to `skipped[0]` (a device counter, when
    /// given) unless `guard` ([1] f32, the step's loss, as the update takes it) is given and not
    /// finite: that step is the loss's to stop, not the gradients' to count. Nothing comes back to
    /// the host; read `skipped` when the count is wanted.
    pub fn clip_coef(
        &self,
        sumsq: &dyn DevicePtr<f64>,
        max_norm: f64,
        coef: &mut dyn DevicePtrMut<f32>,
        norm: Option<&mut dyn DevicePtrMut<f64>>,
        guard: Option<&dyn DevicePtr<f32>>,
        skipped: Option<&mut dyn DevicePtrMut<u64>>,
    ) -> Result<()> {
        const OP: &str = "clip_coef";
        let s = self.input(OP, "sumsq", sumsq, 1)?;
        let c = self.output(OP, "coef", coef, 1)?;
        let n = match norm {
            Some(n) => self.output(OP, "norm", n, 1)?,
            None => crate::gpu::Ptr::null(),
        };
        let guard = self.input_opt(OP, "guard", guard, 1)?;
        let skipped = match skipped {
            Some(k) => self.output(OP, "skipped", k, 1)?,
            None => crate::gpu::Ptr::null(),
        };
        // One thread: it alone reads the sum and owns the counter's increment.
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            Kernel::ClipCoef,
            cfg,
            &[
                s.arg(),
                Arg::from(max_norm),
                c.arg(),
                n.arg(),
                guard.arg(),
                skipped.arg(),
            ],
        )
    }

    /// `grad *= coef[0]` for every tensor of `table` (skipped on the device when coef is 1, or
    /// not finite: [`Gpu::clip_coef`]'s mark of a norm that was not).
    pub fn grad_scale(&self, table: &OptimTable, coef: &dyn DevicePtr<f32>) -> Result<()> {
        const OP: &str = "grad_scale";
        let c = self.input(OP, "coef", coef, 1)?;
        let n = table.count as i32;
        let slots = self.input(OP, "table", &table.slots, table.count)?;
        self.launch(
            Kernel::GradScaleMulti,
            Self::table_cfg(table),
            &[slots.arg(), Arg::from(n), c.arg()],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::AdamW;

    #[test]
    fn step_scales_stay_right_past_two_to_the_31_steps() {
        let at = |step| {
            AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                step,
            }
            .step_scales()
        };
        let first = (
            (1e-3f32 as f64 / (1.0 - 0.9f32 as f64)) as f32,
            (1.0 - 0.999f32 as f64).sqrt() as f32,
        );
        assert_eq!(at(1), first);
        // 2^32 + 1 read as an i32 is step 1 again: a first step's tenfold update.
        for step in [1 << 31, (1 << 32) + 1, u64::MAX] {
            assert_eq!(at(step), (1e-3, 1.0), "step {step}");
        }
    }
}
