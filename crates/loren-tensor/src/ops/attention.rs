//! Multi-head attention core: `O = softmax(Q·Kᵀ/√dh)·V` for every group (member), batch item and
//! head. Q, K and V are [G, B, T, D] with the heads side by side in D.
//!
//! The forward keeps only the log-sum-exp of each score row; the backward recomputes the
//! probabilities from it. The CUDA kernel does the same, so this is its exact twin.
//!
//! With a [`DropKey`], scores drop before the softmax (MC Dropout), and there are as many output
//! groups as the DropKey has members, each with masks of its own.

use rayon::prelude::*;

use super::dropkey::{DROPPED_SCORE, DropKey};
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

fn check(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, drop: Option<&DropKey>) -> Result<Dims> {
    expect_rank(OP, q, 4, "Q")?;
    for (t, name) in [(k, "K"), (v, "V")] {
        expect_rank(OP, t, 4, name)?;
        if t.dims()[1..] != q.dims()[1..] {
            return Err(Error::shape(OP, q.shape(), t.shape()));
        }
    }
    same_device(OP, &[q, k, v])?;
    let mut groups = broadcast_groups(OP, &[q.shape(), k.shape(), v.shape()])?;
    if let Some(dk) = drop {
        if groups != 1 && groups != dk.members {
            return Err(Error::invalid(
                OP,
                format!(
                    "Q, K, V have {groups} groups, but DropKey draws for {} members",
                    dk.members
                ),
            ));
        }
        groups = dk.members;
    }
    let [_, batch, t, d] = [q.dims()[0], q.dims()[1], q.dims()[2], q.dims()[3]];
    if let Some(items) = drop.and_then(|dk| dk.items.as_ref()) {
        if items.keys().len() != batch {
            return Err(Error::invalid(
                OP,
                format!("{} item keys for a batch of {batch}", items.keys().len()),
            ));
        }
        if !items.device().same(q.device()) {
            return Err(Error::invalid(
                OP,
                "the item keys are on another device than Q, K, V",
            ));
        }
    }
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

/// A matrix read as rows of a reduction: element (r, k) at `r·row_stride + k·k_stride`. One
/// head's rows of Q or dO (k along a row), or the columns of P and dS (k down a column).
#[derive(Clone, Copy)]
struct Lhs<'a> {
    data: &'a [f32],
    rows: usize,
    len: usize,
    row_stride: usize,
    k_stride: usize,
}

impl<'a> Lhs<'a> {
    /// `rows` rows of `len` elements, `ld` apart.
    fn rows(data: &'a [f32], rows: usize, len: usize, ld: usize) -> Self {
        Lhs {
            data,
            rows,
            len,
            row_stride: ld,
            k_stride: 1,
        }
    }

    /// The first `cols` columns of a matrix with `rows` rows `ld` apart, each column read as a
    /// row: the transpose.
    fn columns(data: &'a [f32], cols: usize, rows: usize, ld: usize) -> Self {
        Lhs {
            data,
            rows: cols,
            len: rows,
            row_stride: 1,
            k_stride: ld,
        }
    }

    fn at(&self, r: usize, k: usize) -> f32 {
        self.data[r * self.row_stride + k * self.k_stride]
    }
}

/// `out[r·ldo + c] = scale · Σ_k lhs(r, k) · rhs[k·ld + c]` for every row r of `lhs` and c < n.
///
/// The products are tiny (17 tokens, head width 16 in `tiny`), far too small for a GEMM call,
/// so they are tiled here: up to 4 rows by 3 blocks of W columns, the 12 sums in registers for
/// the whole reduction, each loaded piece of `rhs` used by 4 rows and 12 independent chains of
/// adds in flight. Every sum runs over k in order, one element at a time.
fn mat_times_rows(
    out: &mut [f32],
    ldo: usize,
    n: usize,
    lhs: Lhs<'_>,
    rhs: &[f32],
    ld: usize,
    scale: f32,
) {
    let mut r0 = 0;
    while r0 < lhs.rows {
        let rows = (lhs.rows - r0).min(4);
        match rows {
            1 => row_block::<1>(out, ldo, n, lhs, r0, rhs, ld, scale),
            2 => row_block::<2>(out, ldo, n, lhs, r0, rhs, ld, scale),
            3 => row_block::<3>(out, ldo, n, lhs, r0, rhs, ld, scale),
            _ => row_block::<4>(out, ldo, n, lhs, r0, rhs, ld, scale),
        }
        r0 += rows;
    }
}

/// Rows `r0..r0 + R` of [`mat_times_rows`]: whole W-blocks of columns in tiles, the rest one
/// by one.
#[allow(clippy::too_many_arguments)]
fn row_block<const R: usize>(
    out: &mut [f32],
    ldo: usize,
    n: usize,
    lhs: Lhs<'_>,
    r0: usize,
    rhs: &[f32],
    ld: usize,
    scale: f32,
) {
    let mut c0 = 0;
    while c0 + W <= n {
        let blocks = ((n - c0) / W).min(3);
        match blocks {
            1 => tile::<R, 1>(out, ldo, lhs, r0, rhs, ld, scale, c0),
            2 => tile::<R, 2>(out, ldo, lhs, r0, rhs, ld, scale, c0),
            _ => tile::<R, 3>(out, ldo, lhs, r0, rhs, ld, scale, c0),
        }
        c0 += blocks * W;
    }
    for r in r0..r0 + R {
        for c in c0..n {
            let sum = (0..lhs.len)
                .map(|k| lhs.at(r, k) * rhs[k * ld + c])
                .sum::<f32>();
            out[r * ldo + c] = scale * sum;
        }
    }
}

/// One R-row by B-block tile of [`mat_times_rows`], from row `r0` and column `c0`.
#[allow(clippy::too_many_arguments)]
fn tile<const R: usize, const B: usize>(
    out: &mut [f32],
    ldo: usize,
    lhs: Lhs<'_>,
    r0: usize,
    rhs: &[f32],
    ld: usize,
    scale: f32,
    c0: usize,
) {
    let mut acc = [[[0.0f32; W]; B]; R];
    for k in 0..lhs.len {
        let row = &rhs[k * ld + c0..][..B * W];
        let a: [f32; R] = std::array::from_fn(|i| lhs.at(r0 + i, k));
        for (acc, &a) in acc.iter_mut().zip(&a) {
            for (acc, piece) in acc.iter_mut().zip(row.chunks_exact(W)) {
                for (x, &v) in acc.iter_mut().zip(piece) {
                    *x += a * v;
                }
            }
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let o = &mut out[(r0 + i) * ldo + c0..][..B * W];
        for (o, acc) in o.chunks_exact_mut(W).zip(acc) {
            for (o, x) in o.iter_mut().zip(acc) {
                *o = scale * x;
            }
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

/// One head of one sequence, gathered for [`mat_times_rows`]: K and V transposed to [dh, T'],
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

    /// Transpose head `h`'s slice of `src` ([T, D]) into `dst` ([dh, T']). Each row of `dst`
    /// is written in one contiguous run from a strided column of `src`: strided loads are
    /// cheaper than strided stores, and the iterators need no bounds checks.
    fn gather(&self, dst: &mut [f32], src: &[f32], dm: &Dims, h: usize) {
        let head = &src[h * dm.dh..];
        for (d, row) in dst.chunks_exact_mut(self.tp).take(dm.dh).enumerate() {
            let column = head[d..].iter().step_by(dm.d);
            for (x, &v) in row[..dm.t].iter_mut().zip(column) {
                *x = v;
            }
        }
    }
}

/// Turn scaled scores into probabilities in place (the padding becomes 0); returns the row's
/// log-sum-exp, −∞ for a row whose every key was dropped (it attends to all alike).
fn softmax_row(s: &mut [f32], t: usize) -> f32 {
    let mx = lanes(&s[..t], f32::NEG_INFINITY, f32::max);
    // f32::max passes over NaN, so a row whose kept scores are NaN has the dropped keys' maximum
    // too: it goes on, to NaN, as the GPU's does, and is not averaged into a finite output.
    if mx == DROPPED_SCORE && s[..t].iter().all(|&x| x == DROPPED_SCORE) {
        s[..t].fill(1.0 / t as f32);
        s[t..].fill(0.0);
        return f32::NEG_INFINITY;
    }
    s[..t].iter_mut().for_each(|x| *x = exp(*x - mx));
    s[t..].fill(0.0);
    let sum = lanes(s, 0.0, |a, b| a + b);
    s.iter_mut().for_each(|x| *x /= sum);
    mx + sum.ln()
}

/// Overwrite the dropped scores of head `h` of (group g, batch b): `p` is [T, T'].
fn drop_scores(
    p: &mut [f32],
    tp: usize,
    t: usize,
    drop: Option<&DropKey>,
    g: usize,
    b: usize,
    h: usize,
) {
    let Some(dk) = drop.filter(|dk| dk.threshold > 0) else {
        return;
    };
    let stream = dk.head_stream(g, b, h);
    for (i, pi) in p.chunks_exact_mut(tp).enumerate() {
        let row = DropKey::row(stream, i);
        for (j, x) in pi[..t].iter_mut().enumerate() {
            if dk.dropped(row, j) {
                *x = DROPPED_SCORE;
            }
        }
    }
}

pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    drop: Option<&DropKey>,
) -> Result<AttentionOutput> {
    let dm = check(q, k, v, heads, drop)?;
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
            &cuda_dims(&dm, heads, drop),
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
            let tp = head.tp;
            let mut kt = std::mem::take(&mut head.kt);
            // Scores, then probabilities, of one head: [T, T'].
            let mut p = vec![0.0f32; t * tp];
            for h in 0..heads {
                head.gather(&mut kt, kg, &dm, h);
                let qh = Lhs::rows(&qg[h * dh..], t, dh, d);
                mat_times_rows(&mut p, tp, tp, qh, &kt, tp, dm.scale());
                drop_scores(&mut p, tp, t, drop, g, b, h);
                for (i, pi) in p.chunks_exact_mut(tp).enumerate() {
                    lse[h * t + i] = softmax_row(pi, t);
                }
                // O_h = P · V_h: V's rows for head h are D apart, starting at h·dh.
                let ph = Lhs::rows(&p, t, t, tp);
                mat_times_rows(&mut o[h * dh..], d, dh, ph, &vg[h * dh..], d, 1.0);
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
    drop: Option<&DropKey>,
) -> Result<AttentionGrads> {
    let dm = check(q, k, v, heads, drop)?;
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
        return backward_cuda(&dm, heads, drop, d_o, q, k, v, o, lse);
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
            // Per head, [T, T'] each: P, dP and dS, whose columns dK and dV read.
            let mut p = vec![0.0f32; t * tp];
            let mut dp = vec![0.0f32; t * tp];
            let mut ds = vec![0.0f32; t * tp];
            for h in 0..heads {
                head.gather(&mut kt, kg, &dm, h);
                head.gather(&mut vt, vg, &dm, h);
                let (qh, doh) = (
                    Lhs::rows(&qg[h * dh..], t, dh, d),
                    Lhs::rows(&dog[h * dh..], t, dh, d),
                );
                mat_times_rows(&mut p, tp, tp, qh, &kt, tp, scale);
                mat_times_rows(&mut dp, tp, tp, doh, &vt, tp, 1.0);
                drop_scores(&mut p, tp, t, drop, g, b, h);
                for i in 0..t {
                    let l = lg[h * t + i];
                    let pi = &mut p[i * tp..][..tp];
                    let dsi = &mut ds[i * tp..][..tp];
                    if l == f32::NEG_INFINITY {
                        // Every key dropped: the row averages V, and its scores are constants.
                        pi[..t].fill(1.0 / t as f32);
                        pi[t..].fill(0.0);
                        dsi.fill(0.0);
                        continue;
                    }
                    // A dropped score is a constant: no weight and no gradient (e^(−1e30 − l) = 0).
                    pi[..t].iter_mut().for_each(|x| *x = exp(*x - l));
                    pi[t..].fill(0.0);
                    let (doi, oi) = (&dog[i * d + h * dh..][..dh], &og[i * d + h * dh..][..dh]);
                    let delta: f32 = doi.iter().zip(oi).map(|(g, o)| g * o).sum();
                    let dpi = &dp[i * tp..][..tp];
                    for ((s, &pj), &dpj) in dsi.iter_mut().zip(&*pi).zip(dpi) {
                        *s = pj * (dpj - delta) * scale;
                    }
                }
                // dQ_h = dS · K_h, dK_h = dSᵀ · Q_h and dV_h = Pᵀ · dO_h.
                let ds_rows = Lhs::rows(&ds, t, t, tp);
                mat_times_rows(&mut dq[h * dh..], d, dh, ds_rows, &kg[h * dh..], d, 1.0);
                let ds_cols = Lhs::columns(&ds, t, t, tp);
                mat_times_rows(&mut dk[h * dh..], d, dh, ds_cols, &qg[h * dh..], d, 1.0);
                let p_cols = Lhs::columns(&p, t, t, tp);
                mat_times_rows(&mut dv[h * dh..], d, dh, p_cols, &dog[h * dh..], d, 1.0);
            }
        });
    use super::elementwise::reduce_to_groups;
    Ok(AttentionGrads {
        dq: Some(reduce_to_groups(dq, dm.gq)?),
        dk: Some(reduce_to_groups(dk, dm.gk)?),
        dv: Some(reduce_to_groups(dv, dm.gv)?),
    })
}

fn cuda_dims<'a>(
    dm: &Dims,
    heads: usize,
    drop: Option<&'a DropKey>,
) -> loren_kernels::AttentionDims<'a> {
    loren_kernels::AttentionDims {
        drop: drop.map(|dk| loren_kernels::AttentionDrop {
            threshold: dk.threshold,
            seed: dk.seed,
            items: dk.items.as_ref().and_then(|k| k.cuda()),
        }),
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
    drop: Option<&DropKey>,
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
        &cuda_dims(dm, heads, drop),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::ops::dropkey::ItemKeys;
    use crate::rng::Rng;

    /// Row-major [G, B, T, D] values, and the same as a tensor.
    fn random(rng: &mut Rng, dims: [usize; 4], dev: &Device) -> (Vec<f32>, Tensor) {
        let v: Vec<f32> = (0..dims.iter().product()).map(|_| rng.normal()).collect();
        let t = Tensor::from_vec(v.clone(), dims, MemTag::Workspace, dev).unwrap();
        (v, t)
    }

    /// softmax(Q·Kᵀ/√dh)·V and its gradients, in f64 straight from the definitions, for one
    /// group: returns O, lse, dQ, dK, dV. With `drop` (the DropKey and this output group), a
    /// dropped score has no weight and no gradient, and a row with every key dropped averages V
    /// with an LSE of −∞.
    #[allow(clippy::type_complexity)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d_o: &[f32],
        (b, t, d, heads): (usize, usize, usize, usize),
        drop: Option<(&DropKey, usize)>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let dh = d / heads;
        let scale = 1.0 / (dh as f64).sqrt();
        let n = b * t * d;
        let (mut o, mut lse) = (vec![0.0; n], vec![0.0; b * heads * t]);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let at = |bi: usize, i: usize, h: usize, c: usize| (bi * t + i) * d + h * dh + c;
        for bi in 0..b {
            for h in 0..heads {
                let dot = |x: &[f32], i: usize, y: &[f32], j: usize| -> f64 {
                    (0..dh)
                        .map(|c| x[at(bi, i, h, c)] as f64 * y[at(bi, j, h, c)] as f64)
                        .sum()
                };
                let mut p = vec![vec![0.0f64; t]; t];
                let mut kept = vec![vec![true; t]; t];
                if let Some((dk, g)) = drop {
                    let stream = dk.head_stream(g, bi, h);
                    for (i, kept) in kept.iter_mut().enumerate() {
                        let row = DropKey::row(stream, i);
                        for (j, kept) in kept.iter_mut().enumerate() {
                            *kept = !dk.dropped(row, j);
                        }
                    }
                }
                for i in 0..t {
                    let s: Vec<f64> = (0..t).map(|j| dot(q, i, k, j) * scale).collect();
                    let live = |j: usize| kept[i][j];
                    let mx = (0..t)
                        .filter(|&j| live(j))
                        .map(|j| s[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = (0..t).filter(|&j| live(j)).map(|j| (s[j] - mx).exp()).sum();
                    let none = !(0..t).any(live);
                    lse[(bi * heads + h) * t + i] = if none {
                        f64::NEG_INFINITY
                    } else {
                        mx + sum.ln()
                    };
                    for j in 0..t {
                        p[i][j] = match (none, live(j)) {
                            (true, _) => 1.0 / t as f64,
                            (false, true) => (s[j] - mx).exp() / sum,
                            (false, false) => 0.0,
                        };
                        for c in 0..dh {
                            o[at(bi, i, h, c)] += p[i][j] * v[at(bi, j, h, c)] as f64;
                        }
                    }
                }
                for i in 0..t {
                    let dp: Vec<f64> = (0..t).map(|j| dot(d_o, i, v, j)).collect();
                    let delta: f64 = (0..t).map(|j| p[i][j] * dp[j]).sum();
                    let none = !kept[i].contains(&true);
                    for j in 0..t {
                        let ds = match none || !kept[i][j] {
                            true => 0.0,
                            false => p[i][j] * (dp[j] - delta) * scale,
                        };
                        for c in 0..dh {
                            dq[at(bi, i, h, c)] += ds * k[at(bi, j, h, c)] as f64;
                            dk[at(bi, j, h, c)] += ds * q[at(bi, i, h, c)] as f64;
                            dv[at(bi, j, h, c)] += p[i][j] * d_o[at(bi, i, h, c)] as f64;
                        }
                    }
                }
            }
        }
        (o, lse, dq, dk, dv)
    }

    fn assert_close(what: &str, got: &Tensor, want: &[f64]) {
        let got = got.to_vec().unwrap();
        assert_eq!(got.len(), want.len(), "{what}: length");
        // −∞ (an LSE with every key dropped) must be matched exactly; the rest by the norm.
        let gone = |i: &usize| want[*i] == f64::NEG_INFINITY;
        let rows: Vec<usize> = (0..want.len()).filter(gone).collect();
        for &i in &rows {
            assert_eq!(got[i], f32::NEG_INFINITY, "{what}: element {i}");
        }
        let (got, want): (Vec<f32>, Vec<f64>) = got
            .iter()
            .zip(want)
            .filter(|(_, w)| w.is_finite())
            .map(|(g, w)| (*g, *w))
            .unzip();
        let err: f64 = got
            .iter()
            .zip(&want)
            .map(|(&g, w)| (g as f64 - w).powi(2))
            .sum();
        let norm: f64 = want.iter().map(|w| w * w).sum();
        // One token has no gradient for Q: the reference is exactly zero, and so must we be.
        let rel = if norm == 0.0 {
            err.sqrt()
        } else {
            (err / norm).sqrt()
        };
        assert!(rel < 1e-5, "{what}: relative error {rel:e}");
    }

    /// Head widths of one to three whole column blocks (8, 16, 24, 32), blocks and a tail (20)
    /// and the tail alone (4); lengths that leave 0 to 3 rows after the 4-row tiles, below, at
    /// and across the vector width.
    #[test]
    fn forward_and_backward_match_the_definition() {
        let (mut rng, dev) = (Rng::new(5), Device::cpu());
        for &(b, t, d, heads) in &[
            (2, 17, 64, 4),
            (1, 5, 64, 2),
            (2, 33, 40, 2),
            (1, 8, 8, 2),
            (1, 7, 48, 3),
            (2, 6, 24, 1),
            (1, 10, 24, 3),
            (1, 1, 16, 1),
        ] {
            let dims = [1, b, t, d];
            let (qv, q) = random(&mut rng, dims, &dev);
            let (kv, k) = random(&mut rng, dims, &dev);
            let (vv, v) = random(&mut rng, dims, &dev);
            let (dov, d_o) = random(&mut rng, dims, &dev);
            let (o, lse, dq, dk, dv) = naive(&qv, &kv, &vv, &dov, (b, t, d, heads), None);
            let what = format!("B={b} T={t} D={d} heads={heads}");
            let fwd = attention_forward(&q, &k, &v, heads, None).unwrap();
            assert_close(&format!("{what} O"), &fwd.o, &o);
            assert_close(&format!("{what} lse"), &fwd.lse, &lse);
            let g = attention_backward(&d_o, &q, &k, &v, &fwd.o, &fwd.lse, heads, None).unwrap();
            assert_close(&format!("{what} dQ"), g.dq.as_ref().unwrap(), &dq);
            assert_close(&format!("{what} dK"), g.dk.as_ref().unwrap(), &dk);
            assert_close(&format!("{what} dV"), g.dv.as_ref().unwrap(), &dv);
        }
    }

    /// MC Dropout: 3 members drawing masks from shared Q, K, V (gradients summed over them), at
    /// rates that leave rows with every key dropped and rates that drop little.
    #[test]
    fn dropkey_matches_the_definition_per_member() {
        let (mut rng, dev) = (Rng::new(8), Device::cpu());
        let members = 3;
        let mut emptied = 0;
        for &(b, t, d, heads, rate) in &[
            (2, 6, 24, 2, 0.6),
            (1, 17, 64, 4, 0.2),
            (2, 9, 16, 1, 0.9),
            (1, 33, 40, 2, 0.5),
        ] {
            let dims = [1, b, t, d];
            let (qv, q) = random(&mut rng, dims, &dev);
            let (kv, k) = random(&mut rng, dims, &dev);
            let (vv, v) = random(&mut rng, dims, &dev);
            let (dov, d_o) = random(&mut rng, [members, b, t, d], &dev);
            let keys = (0..b as u64).map(|i| 3 * t as u64 + i).collect();
            let dk = DropKey::new(rate, 40 + t as u64, members)
                .unwrap()
                .with_items(ItemKeys::new(keys, &dev).unwrap());
            let n = b * t * d;
            let (mut o, mut lse) = (Vec::new(), Vec::new());
            let (mut dq, mut dkk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            for g in 0..members {
                let dog = &dov[g * n..][..n];
                let r = naive(&qv, &kv, &vv, dog, (b, t, d, heads), Some((&dk, g)));
                o.extend(r.0);
                emptied += r.1.iter().filter(|x| x.is_infinite()).count();
                lse.extend(r.1);
                for (sum, part) in [(&mut dq, r.2), (&mut dkk, r.3), (&mut dv, r.4)] {
                    sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
                }
            }
            let what = format!("B={b} T={t} D={d} heads={heads} rate {rate}");
            let fwd = attention_forward(&q, &k, &v, heads, Some(&dk)).unwrap();
            assert_eq!(
                fwd.o.dims(),
                [members, b, t, d],
                "{what}: a group per member"
            );
            assert_close(&format!("{what} O"), &fwd.o, &o);
            assert_close(&format!("{what} lse"), &fwd.lse, &lse);
            let g =
                attention_backward(&d_o, &q, &k, &v, &fwd.o, &fwd.lse, heads, Some(&dk)).unwrap();
            assert_close(&format!("{what} dQ"), g.dq.as_ref().unwrap(), &dq);
            assert_close(&format!("{what} dK"), g.dk.as_ref().unwrap(), &dkk);
            assert_close(&format!("{what} dV"), g.dv.as_ref().unwrap(), &dv);
        }
        assert!(emptied > 0, "some rows must lose every key");
    }

    /// A query gone NaN, with keys dropped: every row that keeps a key gives NaN (it once
    /// averaged V, finite, since its maximum was the dropped keys' score), and only the rows
    /// whose every key was dropped average V.
    #[test]
    fn dropkey_lets_a_nan_score_through() {
        let (mut rng, dev) = (Rng::new(11), Device::cpu());
        let (b, t, d, heads, members) = (2, 9, 16, 2, 2);
        let dims = [1, b, t, d];
        let q = Tensor::from_vec(vec![f32::NAN; b * t * d], dims, MemTag::Workspace, &dev);
        let (k, v) = (
            random(&mut rng, dims, &dev).1,
            random(&mut rng, dims, &dev).1,
        );
        let keys = (0..b as u64).map(|i| 5 + i).collect();
        let dk = DropKey::new(0.6, 21, members)
            .unwrap()
            .with_items(ItemKeys::new(keys, &dev).unwrap());
        let fwd = attention_forward(&q.unwrap(), &k, &v, heads, Some(&dk)).unwrap();
        let o = fwd.o.to_vec().unwrap();
        let (dh, mut partly_dropped, mut emptied) = (d / heads, 0, 0);
        for (g, bi, h) in (0..members)
            .flat_map(|g| (0..b).flat_map(move |bi| (0..heads).map(move |h| (g, bi, h))))
        {
            let stream = dk.head_stream(g, bi, h);
            for i in 0..t {
                let row = DropKey::row(stream, i);
                let kept = (0..t).filter(|&j| !dk.dropped(row, j)).count();
                let out = &o[((g * b + bi) * t + i) * d + h * dh..][..dh];
                let at = format!("member {g}, item {bi}, head {h}, row {i}, {kept} keys kept");
                match kept {
                    0 => assert!(out.iter().all(|x| x.is_finite()), "{at}: {out:?}"),
                    _ => assert!(out.iter().all(|x| x.is_nan()), "{at}: {out:?}"),
                }
                emptied += usize::from(kept == 0);
                partly_dropped += usize::from(kept > 0 && kept < t);
            }
        }
        assert!(
            emptied > 0 && partly_dropped > 0,
            "{emptied} {partly_dropped}"
        );
    }

    /// A row's masks are its item's: the rows of a batch, taken in another order into a smaller
    /// batch with their keys, draw what they drew in the whole batch.
    #[test]
    fn a_row_draws_its_items_masks_in_any_batch() {
        let (mut rng, dev) = (Rng::new(9), Device::cpu());
        let (b, t, d, heads, members) = (5, 11, 32, 2, 2);
        let inputs = [0; 3].map(|_| random(&mut rng, [1, b, t, d], &dev).0);
        let keys: Vec<u64> = (0..b as u64).map(|i| 1000 + 17 * i).collect();
        let dk = DropKey::new(0.5, 77, members).unwrap();
        let run = |rows: &[usize], dk: DropKey| {
            let [q, k, v] = [0, 1, 2].map(|i| {
                let picked: Vec<f32> = rows
                    .iter()
                    .flat_map(|&r| &inputs[i][r * t * d..][..t * d])
                    .copied()
                    .collect();
                Tensor::from_vec(picked, [1, rows.len(), t, d], MemTag::Workspace, &dev).unwrap()
            });
            attention_forward(&q, &k, &v, heads, Some(&dk))
                .unwrap()
                .o
                .to_vec()
                .unwrap()
        };
        let keyed = |rows: &[usize]| {
            let k = rows.iter().map(|&r| keys[r]).collect();
            dk.clone().with_items(ItemKeys::new(k, &dev).unwrap())
        };
        let whole: Vec<usize> = (0..b).collect();
        let all = run(&whole, keyed(&whole));
        let part = [3, 0];
        let got = run(&part, keyed(&part));
        let n = t * d;
        for g in 0..members {
            for (i, &r) in part.iter().enumerate() {
                assert_eq!(
                    &got[(g * part.len() + i) * n..][..n],
                    &all[(g * b + r) * n..][..n],
                    "member {g}, row {r}"
                );
            }
        }
        assert_ne!(
            run(&part, dk),
            got,
            "rows drawing their row numbers' masks must differ"
        );
    }
}
