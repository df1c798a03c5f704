//! Multi-head attention core: `O = softmax(Q·Kᵀ/√dh)·V` for every group (member), batch item and
//! head. Q, K and V are [G, B, T, D] with the heads side by side in D.
//!
//! The forward keeps only the log-sum-exp of each score row; the backward recomputes the
//! probabilities from it. The CUDA kernel does the same, so this is its exact twin.

use rayon::prelude::*;

use super::math::exp;
use super::{broadcast_groups, expect_rank, group_index, same_device};
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::tensor::Tensor;

const OP: &str = "attention";

#[derive(Debug)]
pub struct AttentionOutput {
    pub o: Tensor,
    /// Log-sum-exp of each row of scaled scores, [G, B, H, T].
    pub lse: Tensor,
}

#[derive(Debug, Default)]
pub struct AttentionGrads {
    pub dq: Option<Tensor>,
    pub dk: Option<Tensor>,
    pub dv: Option<Tensor>,
}

#[derive(Clone, Copy)]
struct Dims {
    groups: usize,
    gq: usize,
    gk: usize,
    gv: usize,
    batch: usize,
    t: usize,
    d: usize,
    dh: usize,
}

impl Dims {
    /// Offset of (group g, batch b) in a tensor with `gt` groups.
    fn base(&self, g: usize, gt: usize, b: usize) -> usize {
        (group_index(g, gt) * self.batch + b) * self.t * self.d
    }

    fn scale(&self) -> f32 {
        1.0 / (self.dh as f32).sqrt()
    }
}

fn check(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Dims> {
    expect_rank(OP, q, 4, "Q")?;
    for (t, name) in [(k, "K"), (v, "V")] {
        expect_rank(OP, t, 4, name)?;
        if t.dims()[1..] != q.dims()[1..] {
            return Err(Error::shape(OP, q.shape(), t.shape()));
        }
    }
    same_device(OP, &[q, k, v])?;
    let groups = broadcast_groups(OP, &[q.shape(), k.shape(), v.shape()])?;
    let [_, batch, t, d] = [q.dims()[0], q.dims()[1], q.dims()[2], q.dims()[3]];
    if heads == 0 || d % heads != 0 {
        return Err(Error::invalid(
            OP,
            format!("{heads} heads do not divide the width {d}"),
        ));
    }
    Ok(Dims {
        groups,
        gq: q.dims()[0],
        gk: k.dims()[0],
        gv: v.dims()[0],
        batch,
        t,
        d,
        dh: d / heads,
    })
}

/// One head of one sequence, gathered so every inner loop is a contiguous axpy the compiler
/// vectorises: K and V transposed to [dh, T'] for the row-times-matrix products, T' being T
/// rounded up to the vector width (the padding columns stay zero).
struct Head {
    tp: usize,
    kt: Vec<f32>,
    vt: Vec<f32>,
}

impl Head {
    fn new(t: usize, dh: usize) -> Head {
        let tp = t.next_multiple_of(8);
        Head {
            tp,
            kt: vec![0.0; dh * tp],
            vt: vec![0.0; dh * tp],
        }
    }

    /// Transpose head `h`'s slice of `src` ([T, D]) into `dst` ([dh, T']).
    fn gather(&self, dst: &mut [f32], src: &[f32], dm: &Dims, h: usize) {
        for j in 0..dm.t {
            for (d, &v) in src[j * dm.d + h * dm.dh..][..dm.dh].iter().enumerate() {
                dst[d * self.tp + j] = v;
            }
        }
    }
}

/// `out[j] = scale · Σ_d row[d]·mt[d, j]` for a row [dh] and a matrix [dh, T'].
fn row_times(out: &mut [f32], row: &[f32], mt: &[f32], scale: f32) {
    out.fill(0.0);
    let t = out.len();
    for (&r, m) in row.iter().zip(mt.chunks_exact(t)) {
        let c = r * scale;
        for (o, &m) in out.iter_mut().zip(m) {
            *o += c * m;
        }
    }
}

/// `e^(s − shift)` over the first `t` scores, 0 over the padding.
fn exp_row(s: &mut [f32], t: usize, shift: f32) {
    let (real, pad) = s.split_at_mut(t);
    real.iter_mut().for_each(|x| *x = exp(*x - shift));
    pad.fill(0.0);
}

/// `y += a·x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<AttentionOutput> {
    let dm = check(q, k, v, heads)?;
    let (t, d, dh) = (dm.t, dm.d, dm.dh);
    let dev = q.device();
    let mut o = Tensor::zeros([dm.groups, dm.batch, t, d], MemTag::Activations, dev)?;
    let mut lse = Tensor::empty([dm.groups, dm.batch, heads, t], MemTag::Activations, dev)?;
    let (qs, ks, vs) = (q.as_slice()?, k.as_slice()?, v.as_slice()?);
    o.as_mut_slice()?
        .par_chunks_mut(t * d)
        .zip(lse.as_mut_slice()?.par_chunks_mut(heads * t))
        .enumerate()
        .for_each(|(gb, (o, lse))| {
            let (g, b) = (gb / dm.batch, gb % dm.batch);
            let qg = &qs[dm.base(g, dm.gq, b)..][..t * d];
            let kg = &ks[dm.base(g, dm.gk, b)..][..t * d];
            let vg = &vs[dm.base(g, dm.gv, b)..][..t * d];
            let mut head = Head::new(t, dh);
            let mut kt = std::mem::take(&mut head.kt);
            let mut s = vec![0.0f32; head.tp];
            for h in 0..heads {
                head.gather(&mut kt, kg, &dm, h);
                for i in 0..t {
                    row_times(&mut s, &qg[i * d + h * dh..][..dh], &kt, dm.scale());
                    let mx = s[..t].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    exp_row(&mut s, t, mx);
                    let sum: f32 = s.iter().sum();
                    lse[h * t + i] = mx + sum.ln();
                    let oi = &mut o[i * d + h * dh..][..dh];
                    for (vj, &e) in vg.chunks_exact(d).zip(&s[..t]) {
                        axpy(oi, e / sum, &vj[h * dh..][..dh]);
                    }
                }
            }
        });
    Ok(AttentionOutput { o, lse })
}

/// Gradients of Q, K and V, each reduced to its own group count. `o` is the forward's output:
/// Δ_i = Σ_j P_ij·dP_ij is read as dO_i·O_i.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    d_o: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    heads: usize,
) -> Result<AttentionGrads> {
    let dm = check(q, k, v, heads)?;
    let (t, d, dh) = (dm.t, dm.d, dm.dh);
    let full = [dm.groups, dm.batch, t, d];
    if d_o.dims() != full {
        return Err(Error::shape(
            "attention_backward",
            d_o.shape(),
            &full.into(),
        ));
    }
    if lse.dims() != [dm.groups, dm.batch, heads, t] {
        return Err(Error::shape("attention_backward", lse.shape(), d_o.shape()));
    }
    if o.dims() != full {
        return Err(Error::shape("attention_backward", o.shape(), d_o.shape()));
    }
    let dev = q.device();
    if dev.gpu().is_some() {
        return backward_cuda(&dm, heads, d_o, q, k, v, o, lse);
    }
    let mut dq = Tensor::zeros(full, MemTag::Workspace, dev)?;
    let mut dk = Tensor::zeros(full, MemTag::Workspace, dev)?;
    let mut dv = Tensor::zeros(full, MemTag::Workspace, dev)?;
    let (dos, qs, ks, vs, os, ls) = (
        d_o.as_slice()?,
        q.as_slice()?,
        k.as_slice()?,
        v.as_slice()?,
        o.as_slice()?,
        lse.as_slice()?,
    );
    let scale = dm.scale();
    dq.as_mut_slice()?
        .par_chunks_mut(t * d)
        .zip(dk.as_mut_slice()?.par_chunks_mut(t * d))
        .zip(dv.as_mut_slice()?.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(gb, ((dq, dk), dv))| {
            let (g, b) = (gb / dm.batch, gb % dm.batch);
            let qg = &qs[dm.base(g, dm.gq, b)..][..t * d];
            let kg = &ks[dm.base(g, dm.gk, b)..][..t * d];
            let vg = &vs[dm.base(g, dm.gv, b)..][..t * d];
            let dog = &dos[gb * t * d..][..t * d];
            let og = &os[gb * t * d..][..t * d];
            let lg = &ls[gb * heads * t..][..heads * t];
            let mut head = Head::new(t, dh);
            let (mut kt, mut vt) = (std::mem::take(&mut head.kt), std::mem::take(&mut head.vt));
            let (mut p, mut dp) = (vec![0.0f32; head.tp], vec![0.0f32; head.tp]);
            for h in 0..heads {
                let at = |i: usize| i * d + h * dh;
                head.gather(&mut kt, kg, &dm, h);
                head.gather(&mut vt, vg, &dm, h);
                for i in 0..t {
                    let (qi, doi) = (&qg[at(i)..][..dh], &dog[at(i)..][..dh]);
                    row_times(&mut p, qi, &kt, scale);
                    exp_row(&mut p, t, lg[h * t + i]);
                    row_times(&mut dp, doi, &vt, 1.0);
                    let delta: f32 = doi.iter().zip(&og[at(i)..][..dh]).map(|(g, o)| g * o).sum();
                    for j in 0..t {
                        let ds = p[j] * (dp[j] - delta) * scale;
                        axpy(&mut dq[at(i)..][..dh], ds, &kg[at(j)..][..dh]);
                        axpy(&mut dk[at(j)..][..dh], ds, qi);
                        axpy(&mut dv[at(j)..][..dh], p[j], doi);
                    }
                }
            }
        });
    use super::elementwise::reduce_to_groups;
    Ok(AttentionGrads {
        dq: Some(reduce_to_groups(dq, dm.gq)?),
        dk: Some(reduce_to_groups(dk, dm.gk)?),
        dv: Some(reduce_to_groups(dv, dm.gv)?),
    })
}

fn cuda_dims(dm: &Dims, heads: usize) -> loren_kernels::AttentionDims {
    loren_kernels::AttentionDims {
        groups: dm.groups,
        q_groups: dm.gq,
        k_groups: dm.gk,
        v_groups: dm.gv,
        batch: dm.batch,
        seq: dm.t,
        heads,
        head_dim: dm.dh,
    }
}

/// The GPU backward: the fused dQ and dK/dV kernels write per output group; an input shared by
/// the groups then gets the sum.
#[allow(clippy::too_many_arguments)]
fn backward_cuda(
    dm: &Dims,
    heads: usize,
    d_o: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
) -> Result<AttentionGrads> {
    use super::elementwise::reduce_to_groups;
    let dev = q.device();
    let gpu = dev.require_gpu(OP)?;
    let full = [dm.groups, dm.batch, dm.t, dm.d];
    let bf = crate::dtype::DType::BF16;
    let mut dq = Tensor::empty_as(full, bf, MemTag::Workspace, dev)?;
    let mut dk = Tensor::empty_as(full, bf, MemTag::Workspace, dev)?;
    let mut dv = Tensor::empty_as(full, bf, MemTag::Workspace, dev)?;
    let mut delta = Tensor::empty(lse.shape().clone(), MemTag::Workspace, dev)?;
    gpu.attention_backward(
        &cuda_dims(dm, heads),
        d_o.cu_bf16(OP)?,
        q.cu_bf16(OP)?,
        k.cu_bf16(OP)?,
        v.cu_bf16(OP)?,
        o.cu_bf16(OP)?,
        lse.cu_f32(OP)?,
        delta.cu_f32_mut(OP)?,
        dq.cu_bf16_mut(OP)?,
        dk.cu_bf16_mut(OP)?,
        dv.cu_bf16_mut(OP)?,
    )?;
    Ok(AttentionGrads {
        dq: Some(reduce_to_groups(dq, dm.gq)?),
        dk: Some(reduce_to_groups(dk, dm.gk)?),
        dv: Some(reduce_to_groups(dv, dm.gv)?),
    })
}
