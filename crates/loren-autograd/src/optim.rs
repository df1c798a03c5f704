//! Optimizers over the trainable parameters, with their state tagged as optimizer memory.
//! Every step is one fused pass over all parameters (`loren_tensor::ops::optim`).

use loren_tensor::ops::elementwise::scale_;
use loren_tensor::ops::optim::{AdamW, FusedTable, GpuSlot, Sgd, Slot, adamw_step, sgd_step};
use loren_tensor::{Error, MemTag, Result, Tensor};

use crate::params::{Grads, ParamId, Params};

/// Which update rule, with its hyperparameters (the learning rate comes per step).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    AdamW {
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
    },
    Sgd {
        momentum: f32,
        weight_decay: f32,
    },
}

impl OptimizerKind {
    /// PyTorch's AdamW defaults, with the given weight decay.
    pub fn adamw(weight_decay: f32) -> Self {
        OptimizerKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// The weight decay: AdamW's decoupled one, SGD's L2 penalty.
    pub fn weight_decay(&self) -> f32 {
        match *self {
            OptimizerKind::AdamW { weight_decay, .. } | OptimizerKind::Sgd { weight_decay, .. } => {
                weight_decay
            }
        }
    }

    /// What makes these settings unusable, if anything: a moment's or momentum's decay outside
    /// [0, 1) (β₂ = 1 divides by zero in Adam's bias correction), an eps that is not positive, a
    /// weight decay negative or not finite. NaN fails every comparison, hence the positive forms.
    pub fn check(&self) -> std::result::Result<(), String> {
        let unit = |name: &str, x: f32| match (0.0..1.0).contains(&x) {
            true => Ok(()),
            false => Err(format!("{name} {x} must be in [0, 1)")),
        };
        let decay = |x: f32| match x.is_finite() && x >= 0.0 {
            true => Ok(()),
            false => Err(format!("weight decay {x} must be finite and not negative")),
        };
        match *self {
            OptimizerKind::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(format!("eps {eps} must be positive and finite"));
                }
                decay(weight_decay)
            }
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => {
                unit("momentum", momentum)?;
                decay(weight_decay)
            }
        }
    }

    /// The state tensors kept per trainable tensor: Adam's two moments, SGD's momentum buffer.
    pub fn state_tensors(&self) -> u64 {
        match self {
            OptimizerKind::AdamW { .. } => 2,
            OptimizerKind::Sgd { .. } => 1,
        }
    }
}

/// Per-parameter state: Adam's two moments, or SGD's momentum buffer.
pub struct State {
    pub m: Tensor,
    pub v: Option<Tensor>,
}

pub struct Optimizer {
    kind: OptimizerKind,
    state: Vec<(ParamId, State)>,
    step: u64,
    /// The CPU's count of steps skipped for gradients that were not finite (the GPU's is on the
    /// device, in `fused`).
    skipped: u64,
    /// The GPU's device table of every trainable tensor, built at the first step.
    fused: Option<FusedTable>,
}

impl Optimizer {
    /// Zeroed state for every trainable parameter.
    pub fn new(kind: OptimizerKind, params: &Params) -> Result<Optimizer> {
        let adam = matches!(kind, OptimizerKind::AdamW { .. });
        let state = params
            .trainable_ids()
            .into_iter()
            .map(|id| {
                let p = params.get(id);
                let zeros = || Tensor::zeros(p.shape().clone(), MemTag::OptimizerState, p.device());
                Ok((
                    id,
                    State {
                        m: zeros()?,
                        v: adam.then(zeros).transpose()?,
                    },
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Optimizer {
            kind,
            state,
            step: 0,
            skipped: 0,
            fused: None,
        })
    }

    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    /// Steps taken so far, those skipped for gradients that were not finite included (see
    /// [`Optimizer::step`]).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Steps since this optimizer was made (a [`Optimizer::restore`] does not bring back an
    /// earlier run's) that changed nothing because, with clipping, the gradients' global norm was
    /// not finite while the guard was. On a GPU the count is kept on the device, so this waits for
    /// the steps queued so far: ask once in a while (the trainer asks at an epoch's end), not
    /// every step.
    pub fn skipped_steps(&self) -> Result<u64> {
        match &self.fused {
            Some(fused) => fused.skipped_steps(),
            None => Ok(self.skipped),
        }
    }

    /// Update every trainable parameter from its gradient with learning rate `lr`, after
    /// clipping the global gradient norm to `max_norm` when given. On a GPU this is two launches
    /// over all parameters (the norm, then the update), with nothing read back; on the CPU the
    /// gradients are scaled in place first, as torch.nn.utils.clip_grad_norm_ does.
    ///
    /// With `guard` (a one-element tensor: the step's loss) nothing is updated unless its value is
    /// finite. On a GPU the kernel reads it, so the update can be queued before the host knows the
    /// loss; the step is counted either way, and a caller that then finds the loss was not finite
    /// calls [`Optimizer::uncount_skipped_step`].
    ///
    /// With `max_norm`, a step whose gradients' global norm is not finite (a gradient holds a NaN
    /// or an infinity while the loss is finite: a diverging run) changes nothing either: no
    /// parameter, bf16 copy, moment or momentum buffer, and on the CPU no gradient. Clipping would
    /// otherwise scale by 1 (a NaN norm) or by 0 (inf · 0 = NaN) and write NaN everywhere. On a GPU
    /// the kernels decide it on the device, with nothing read back. Such a step is counted in
    /// [`Optimizer::steps`] all the same, on both devices, since the GPU's host cannot know at
    /// queue time (AdamW's next bias correction then counts one step more than it made, which
    /// only matters in the first few steps), and in [`Optimizer::skipped_steps`]. Without
    /// `max_norm` no norm is computed, and such gradients are applied as they are.
    pub fn step(
        &mut self,
        params: &mut Params,
        grads: &mut Grads,
        lr: f32,
        max_norm: Option<f64>,
        guard: Option<&Tensor>,
    ) -> Result<()> {
        self.step += 1;
        let dev = params.device().clone();
        if dev.is_cpu() {
            if let Some(g) = guard
                && !g.scalar()?.is_finite()
            {
                return Ok(());
            }
            if let Some(max) = max_norm
                && !clip_grad_norm(grads, max)?.is_finite()
            {
                self.skipped += 1;
                return Ok(());
            }
            return self.step_cpu(params, grads, lr);
        }
        let mut targets = params.trainable_mut()?;
        if targets.len() != self.state.len() {
            return Err(changed());
        }
        let mut grad_refs: Vec<(ParamId, &mut Tensor)> = grads.iter_mut().collect();
        let mut slots = Vec::with_capacity(self.state.len());
        for ((t, (sid, st)), (gid, g)) in targets
            .iter_mut()
            .zip(self.state.iter_mut())
            .zip(grad_refs.iter_mut())
        {
            if t.id != *sid || t.id != *gid {
                return Err(changed());
            }
            slots.push(GpuSlot {
                param: &mut *t.value,
                grad: g,
                m: &mut st.m,
                v: st.v.as_mut(),
                shadow: t.shadow.as_deref_mut(),
                decay: t.decay,
            });
        }
        let mut fused = FusedTable::refresh(self.fused.take(), &dev, &mut slots)?;
        let result = match self.kind {
            OptimizerKind::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => fused.step_adamw(
                &dev,
                &AdamW {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    step: self.step,
                },
                max_norm,
                guard,
            ),
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => fused.step_sgd(
                &dev,
                &Sgd {
                    lr,
                    momentum,
                    weight_decay,
                },
                max_norm,
                guard,
            ),
        };
        self.fused = Some(fused);
        result
    }

    /// Take back the count of the last [`Optimizer::step`], whose guard turned out not finite
    /// (so it updated nothing): the next step's bias correction follows the last update made.
    pub fn uncount_skipped_step(&mut self) {
        self.step = self.step.saturating_sub(1);
    }

    fn step_cpu(&mut self, params: &mut Params, grads: &Grads, lr: f32) -> Result<()> {
        let mut targets = params.trainable_mut()?;
        if targets.len() != self.state.len() {
            return Err(changed());
        }
        let mut slots = Vec::with_capacity(self.state.len());
        for (t, (sid, st)) in targets.iter_mut().zip(self.state.iter_mut()) {
            debug_assert_eq!(t.id, *sid);
            let grad = grads.get(t.id).ok_or_else(|| {
                Error::invalid(
                    "optimizer",
                    format!("no gradient for parameter #{}", t.id.0),
                )
            })?;
            slots.push(Slot {
                param: &mut *t.value,
                grad,
                m: &mut st.m,
                v: st.v.as_mut(),
                decay: t.decay,
            });
        }
        match self.kind {
            OptimizerKind::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => adamw_step(
                &mut slots,
                &AdamW {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    step: self.step,
                },
            ),
            OptimizerKind::Sgd {
                momentum,
                weight_decay,
            } => sgd_step(
                &mut slots,
                &Sgd {
                    lr,
                    momentum,
                    weight_decay,
                },
            ),
        }
    }

    /// The state, for checkpoints: (parameter, state) in parameter order.
    pub fn state(&self) -> &[(ParamId, State)] {
        &self.state
    }

    /// Restore the step count and the state tensors' values, for resuming.
    pub fn restore(
        &mut self,
        step: u64,
        values: impl Fn(ParamId, &str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        for (id, st) in &mut self.state {
            values(*id, "m", &mut st.m)?;
            if let Some(v) = &mut st.v {
                values(*id, "v", v)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

fn changed() -> Error {
    Error::invalid(
        "optimizer",
        "the trainable parameters changed since the optimizer was made",
    )
}

/// Scale all gradients so their global L2 norm is at most `max_norm`; returns the norm before.
///
/// A norm that is not finite leaves the gradients as they are (torch's rule would make them all
/// NaN or leave the NaN in), for the caller to skip the step on: [`Optimizer::step`] does, as the
/// GPU's clip_coef kernel does.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = grads.global_norm()?;
    if !norm.is_finite() {
        return Ok(norm);
    }
    // The same rule as torch.nn.utils.clip_grad_norm_.
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, g) in grads.iter_mut() {
            scale_(g, coef as f32)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use loren_tensor::{Device, MemTag, Tensor};

    use super::*;

    /// Gradients holding an infinity or a NaN: clip_grad_norm reports the norm and leaves every
    /// gradient as it was (torch's rule would scale by 1 or by 0 and make them NaN), for the
    /// optimizer to skip the step on.
    #[test]
    fn clipping_leaves_gradients_that_are_not_finite_alone() {
        let dev = Device::cpu();
        let mut params = Params::new(&dev);
        let shape = [2, 3];
        let t = Tensor::from_vec(vec![0.5; 6], shape, MemTag::Trainable, &dev).unwrap();
        params.add("w", t, true, true).unwrap();
        let mut grads = Grads::new(&params).unwrap();
        for bad in [f32::INFINITY, f32::NAN] {
            let g = [3.0, -4.0, bad, 1.0, 2.0, 0.25];
            let (_, buf) = grads.iter_mut().next().unwrap();
            buf.copy_from_host(&g).unwrap();
            let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
            assert!(!norm.is_finite(), "{bad}: norm {norm}");
            let (_, buf) = grads.iter().next().unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&buf.to_vec().unwrap()), bits(&g), "{bad}");
        }
    }
}
