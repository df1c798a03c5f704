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

/// Vector width the CPU loops are blocked by (8 f32 lanes of AVX2).
const W: usize = 8;

/// `out[c] = scale · Σ_k a[k] · rows[k·ld + c]` for every c < out.len(): a row vector (its
/// elements `a.stride` apart) times a matrix whose rows are `ld` apart. Columns go in blocks of W, up to four blocks per pass over
/// k, each block's sums in a fixed-size accumulator: the sums stay in registers for the whole
/// reduction, and the blocks' independent chains of FMAs overlap.
fn vec_times_rows(out: &mut [f32], a: Strided<'_>, rows: &[f32], ld: usize, scale: f32) {
    let n = out.len();
    let mut c0 = 0;
    while c0 + W <= n {
        match (n - c0) / W {
            1 => blocks::<1>(out, a, rows, ld, scale, c0),
            2 => blocks::<2>(out, a, rows, ld, scale, c0),
            3 => blocks::<3>(out, a, rows, ld, scale, c0),
            _ => blocks::<4>(out, a, rows, ld, scale, c0),
        }
        c0 += W * ((n - c0) / W).min(4);
    }
    for (c, o) in out.iter_mut().enumerate().skip(c0) {
        *o = scale
            * a.iter()
                .enumerate()
                .map(|(k, ak)| ak * rows[k * ld + c])
                .sum::<f32>();
    }
}

/// A vector read with a stride: a row of a matrix (stride 1) or one of its columns.
#[derive(Clone, Copy)]
struct Strided<'a> {
    data: &'a [f32],
    len: usize,
    stride: usize,
}

impl<'a> Strided<'a> {
    fn row(data: &'a [f32]) -> Self {
        Strided {
            data,
            len: data.len(),
            stride: 1,
        }
    }

    /// Column `j` of a matrix of `rows` rows, `ld` apart.
    fn column(data: &'a [f32], j: usize, rows: usize, ld: usize) -> Self {
        Strided {
            data: &data[j..],
            len: rows,
            stride: ld,
        }
    }

    fn iter(self) -> impl Iterator<Item = f32> + 'a {
        self.data
            .iter()
            .step_by(self.stride)
            .take(self.len)
            .copied()
    }
}

/// B blocks of W columns of [`vec_times_rows`], from column `c0`.
fn blocks<const B: usize>(
    out: &mut [f32],
    a: Strided<'_>,
    rows: &[f32],
    ld: usize,
    scale: f32,
    c0: usize,
) {
    let mut acc = [[0.0f32; W]; B];
    for (k, ak) in a.iter().enumerate() {
        let r = &rows[k * ld + c0..][..B * W];
        for (acc, r) in acc.iter_mut().zip(r.chunks_exact(W)) {
            for (x, &rv) in acc.iter_mut().zip(r) {
                *x += ak * rv;
            }
        }
    }
    for (o, acc) in out[c0..c0 + B * W].chunks_exact_mut(W).zip(acc) {
        for (o, x) in o.iter_mut().zip(acc) {
            *o = scale * x;
        }
    }
}

/// Max and sum over a slice in W-wide lanes (lane-wise, then across lanes): the order is fixed,
/// so results do not depend on threads.
fn lanes<F: Fn(f32, f32) -> f32>(x: &[f32], init: f32, f: F) -> f32 {
    let mut acc = [init; W];
    let mut chunks = x.chunks_exact(W);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    let tail = chunks.remainder().iter().fold(init, |a, &v| f(a, v));
    acc.iter().fold(tail, |a, &v| f(a, v))
}

/// One head of one sequence, gathered for [`vec_times_rows`]: K and V transposed to [dh, T'],
/// T' being T rounded up to W (the padding columns stay zero).
struct Head {
    tp: usize,
    kt: Vec<f32>,
    vt: Vec<f32>,
}

impl Head {
    fn new(t: usize, dh: usize) -> Head {
        let tp = t.next_multiple_of(W);
        Head {
            tp,
            kt: vec![0.0; dh * tp],
            vt: vec![0.0; dh * tp],
        }
    }

    /// Transpose head `h`'s slice of `src` ([T, D]) into `dst` ([dh, T']).
    fn gather(&self, dst: &mut [f32], src: &[f32], dm: &Dims, h: usize) {
        for (j, row) in src.chunks_exact(dm.d).enumerate() {
            for (d, &v) in row[h * dm.dh..][..dm.dh].iter().enumerate() {
                dst[d * self.tp + j] = v;
            }
        }
    }
}

/// Turn scaled scores into probabilities in place (the padding becomes 0); returns the row's
/// log-sum-exp.
fn softmax_row(s: &mut [f32], t: usize) -> f32 {
    let mx = lanes(&s[..t], f32::NEG_INFINITY, f32::max);
    s[..t].iter_mut().for_each(|x| *x = exp(*x - mx));
    s[t..].fill(0.0);
    let sum = lanes(s, 0.0, |a, b| a + b);
    s.iter_mut().for_each(|x| *x /= sum);
    mx + sum.ln()
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
    if let Some(gpu) = dev.gpu() {
        let mut o = Tensor::empty_as(
            [dm.groups, dm.batch, t, d],
            dev.compute_dtype(),
            MemTag::Activations,
            dev,
        )?;
        let mut lse = Tensor::empty([dm.groups, dm.batch, heads, t], MemTag::Activations, dev)?;
        let (qb, kb, vb) = (q.cu_bf16(OP)?, k.cu_bf16(OP)?, v.cu_bf16(OP)?);
        gpu.attention_forward(
            &cuda_dims(&dm, heads),
            qb,
            kb,
            vb,
            o.cu_bf16_mut(OP)?,
            lse.cu_f32_mut(OP)?,
        )?;
        return Ok(AttentionOutput { o, lse });
    }
    let mut o = Tensor::empty([dm.groups, dm.batch, t, d], MemTag::Activations, dev)?;
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
                    vec_times_rows(
                        &mut s,
                        Strided::row(&qg[i * d + h * dh..][..dh]),
                        &kt,
                        head.tp,
                        dm.scale(),
                    );
                    lse[h * t + i] = softmax_row(&mut s, t);
                    // O_i = P_i · V_h: V's rows for head h are D apart, starting at h·dh.
                    vec_times_rows(
                        &mut o[i * d + h * dh..][..dh],
                        Strided::row(&s[..t]),
                        &vg[h * dh..],
                        d,
                        1.0,
                    );
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
    let mut dq = Tensor::empty(full, MemTag::Workspace, dev)?;
    let mut dk = Tensor::empty(full, MemTag::Workspace, dev)?;
    let mut dv = Tensor::empty(full, MemTag::Workspace, dev)?;
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
            let tp = head.tp;
            let (mut kt, mut vt) = (std::mem::take(&mut head.kt), std::mem::take(&mut head.vt));
            // Per head: P and dS, [i][T'], whose columns dK and dV read.
            let (mut p, mut dp) = (vec![0.0f32; t * tp], vec![0.0f32; tp]);
            let mut ds = vec![0.0f32; t * tp];
            for h in 0..heads {
                let at = |i: usize| i * d + h * dh;
                head.gather(&mut kt, kg, &dm, h);
                head.gather(&mut vt, vg, &dm, h);
                for i in 0..t {
                    let (qi, doi, oi) =
                        (&qg[at(i)..][..dh], &dog[at(i)..][..dh], &og[at(i)..][..dh]);
                    let pi = &mut p[i * tp..][..tp];
                    vec_times_rows(pi, Strided::row(qi), &kt, tp, scale);
                    let l = lg[h * t + i];
                    pi[..t].iter_mut().for_each(|x| *x = exp(*x - l));
                    pi[t..].fill(0.0);
                    vec_times_rows(&mut dp, Strided::row(doi), &vt, tp, 1.0);
                    let delta: f32 = doi.iter().zip(oi).map(|(g, o)| g * o).sum();
                    let dsi = &mut ds[i * tp..][..tp];
                    for ((s, &pj), &dpj) in dsi.iter_mut().zip(pi.iter()).zip(&dp) {
                        *s = pj * (dpj - delta) * scale;
                    }
                    // dQ_i = dS_i · K_h.
                    vec_times_rows(
                        &mut dq[at(i)..][..dh],
                        Strided::row(&dsi[..t]),
                        &kg[h * dh..],
                        d,
                        1.0,
                    );
                }
                for j in 0..t {
                    // dK_j = dS[:, j] · Q_h and dV_j = P[:, j] · dO_h.
                    let (dsj, pj) = (
                        Strided::column(&ds, j, t, tp),
                        Strided::column(&p, j, t, tp),
                    );
                    vec_times_rows(&mut dk[at(j)..][..dh], dsj, &qg[h * dh..], d, 1.0);
                    vec_times_rows(&mut dv[at(j)..][..dh], pj, &dog[h * dh..], d, 1.0);
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
