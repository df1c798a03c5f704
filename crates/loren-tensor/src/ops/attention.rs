//! Multi-head attention core: `O = softmax(Q·Kᵀ/√dh)·V` for every group (member), batch item and
//! head. Q, K and V are [G, B, T, D] with the heads side by side in D.
//!
//! The forward keeps only the log-sum-exp of each score row; the backward recomputes the
//! probabilities from it. The CUDA kernel does the same, so this is its exact twin.

use rayon::prelude::*;

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

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Scaled scores of query row `i` against every key of one head, into `s`.
fn scores(s: &mut [f32], qi: &[f32], k: &[f32], dm: &Dims, h: usize) {
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = dm.scale() * dot(qi, &k[j * dm.d + h * dm.dh..][..dm.dh]);
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
    let mut lse = Tensor::zeros([dm.groups, dm.batch, heads, t], MemTag::Activations, dev)?;
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
            let mut s = vec![0.0f32; t];
            for h in 0..heads {
                for i in 0..t {
                    scores(&mut s, &qg[i * d + h * dh..][..dh], kg, &dm, h);
                    let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f32 = s.iter().map(|x| (x - mx).exp()).sum();
                    let l = mx + sum.ln();
                    lse[h * t + i] = l;
                    let oi = &mut o[i * d + h * dh..][..dh];
                    for (j, sj) in s.iter().enumerate() {
                        let p = (sj - l).exp();
                        let vj = &vg[j * d + h * dh..][..dh];
                        oi.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
                    }
                }
            }
        });
    Ok(AttentionOutput { o, lse })
}

/// Gradients of Q, K and V, each reduced to its own group count.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    d_o: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
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
    let dev = q.device();
    let mut dq = Tensor::zeros(full, MemTag::Workspace, dev)?;
    let mut dk = Tensor::zeros(full, MemTag::Workspace, dev)?;
    let mut dv = Tensor::zeros(full, MemTag::Workspace, dev)?;
    let (dos, qs, ks, vs, ls) = (
        d_o.as_slice()?,
        q.as_slice()?,
        k.as_slice()?,
        v.as_slice()?,
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
            let lg = &ls[gb * heads * t..][..heads * t];
            let mut p = vec![0.0f32; t];
            let mut dp = vec![0.0f32; t];
            for h in 0..heads {
                let at = |i: usize| i * d + h * dh;
                for i in 0..t {
                    let qi = &qg[at(i)..][..dh];
                    let doi = &dog[at(i)..][..dh];
                    scores(&mut p, qi, kg, &dm, h);
                    for j in 0..t {
                        p[j] = (p[j] - lg[h * t + i]).exp();
                        dp[j] = dot(doi, &vg[at(j)..][..dh]);
                    }
                    // Δ_i = Σ_j P_ij·dP_ij equals dO_i·O_i, without keeping O.
                    let delta: f32 = p.iter().zip(&dp).map(|(p, dp)| p * dp).sum();
                    for j in 0..t {
                        let ds = p[j] * (dp[j] - delta) * scale;
                        let kj = &kg[at(j)..][..dh];
                        dq[at(i)..][..dh]
                            .iter_mut()
                            .zip(kj)
                            .for_each(|(o, k)| *o += ds * k);
                        dk[at(j)..][..dh]
                            .iter_mut()
                            .zip(qi)
                            .for_each(|(o, q)| *o += ds * q);
                        dv[at(j)..][..dh]
                            .iter_mut()
                            .zip(doi)
                            .for_each(|(o, g)| *o += p[j] * g);
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
