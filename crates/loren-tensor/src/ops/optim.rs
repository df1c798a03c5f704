//! Fused optimizer updates over many parameter tensors at once (multi-tensor AdamW and SGD):
//! every element of every trainable tensor in one parallel pass.

use rayon::prelude::*;

use crate::error::{Error, Result};
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

#[derive(Clone, Copy, Debug)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

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
    let c1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
    let c2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
    let step_size = (h.lr as f64 / c1) as f32;
    let sqrt_c2 = c2.sqrt() as f32;
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
