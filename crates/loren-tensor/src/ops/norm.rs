//! LayerNorm over the feature axis, with group broadcasting: a shared input normalised by each
//! member's own affine (the explicit ensemble), or every member's rows by one shared affine.

use rayon::prelude::*;

use super::elementwise::{add_assign, reduce_to_groups, sum_rows, sum_rows_by};
use super::{broadcast_groups, check_dx_plus, expect_rank, group_index, same_device};
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::tensor::Tensor;

const OP: &str = "layernorm";

/// The forward's outputs: `y` and the per-row statistics the backward reads.
#[derive(Debug)]
pub struct NormOutput {
    pub y: Tensor,
    /// Mean of each input row, [Gx, rows].
    pub mean: Tensor,
    /// 1/sqrt(var + eps) of each input row, [Gx, rows].
    pub rstd: Tensor,
}

#[derive(Debug, Default)]
pub struct NormGrads {
    pub dx: Option<Tensor>,
    pub dgamma: Option<Tensor>,
    pub dbeta: Option<Tensor>,
}

struct Dims {
    groups: usize,
    gx: usize,
    gw: usize,
    rows: usize,
    d: usize,
}

fn check(x: &Tensor, gamma: &Tensor, beta: &Tensor) -> Result<Dims> {
    if x.shape().rank() < 2 {
        return Err(Error::invalid(
            OP,
            format!("input must be [groups, ..., features], got {}", x.shape()),
        ));
    }
    expect_rank(OP, gamma, 2, "gamma")?;
    if beta.shape() != gamma.shape() {
        return Err(Error::shape(OP, beta.shape(), gamma.shape()));
    }
    let d = x.shape().last();
    if gamma.dims()[1] != d {
        return Err(Error::shape(OP, x.shape(), gamma.shape()));
    }
    same_device(OP, &[x, gamma, beta])?;
    Ok(Dims {
        groups: broadcast_groups(OP, &[x.shape(), gamma.shape()])?,
        gx: x.shape().groups(),
        gw: gamma.dims()[0],
        rows: x.shape().rows_per_group(),
        d,
    })
}

/// Rows whose statistics one task computes at once: their f64 sums run side by side, each row's
/// in its own order exactly as alone, so the adds' latency overlaps instead of adding up.
const LOCKSTEP: usize = 4;

/// Mean and 1/sqrt(var + eps) of each row of `x` (rows of d, at most [`LOCKSTEP`] of them),
/// computed in f64 so the statistics are exact to f32.
///
/// The forward and backward then subtract the f32 mean in f32, as PyTorch does, so a row whose
/// mean is far larger than its spread loses digits there: about |mean|/σ · 6e-8 of y (1.7e-3 at
/// 1e3 + N(0, 0.01)). A ViT's residual stream is nowhere near that.
fn row_stats(x: &[f32], d: usize, eps: f32, mean: &mut [f32], rstd: &mut [f32]) {
    match mean.len() {
        1 => stats_in_lockstep::<1>(x, d, eps, mean, rstd),
        2 => stats_in_lockstep::<2>(x, d, eps, mean, rstd),
        3 => stats_in_lockstep::<3>(x, d, eps, mean, rstd),
        _ => stats_in_lockstep::<LOCKSTEP>(x, d, eps, mean, rstd),
    }
}

/// [`row_stats`] of R rows.
#[inline(always)]
fn stats_in_lockstep<const R: usize>(
    x: &[f32],
    d: usize,
    eps: f32,
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &x[r * d..][..d]);
    let n = d as f64;
    // −0.0 starts each sum, as `Iterator::sum` does for floats.
    let mut sum = [-0.0f64; R];
    for j in 0..d {
        for (s, row) in sum.iter_mut().zip(&rows) {
            *s += row[j] as f64;
        }
    }
    let mu = sum.map(|s| s / n);
    let mut sq = [-0.0f64; R];
    for j in 0..d {
        for ((s, row), m) in sq.iter_mut().zip(&rows).zip(&mu) {
            let c = row[j] as f64 - m;
            *s += c * c;
        }
    }
    for r in 0..R {
        mean[r] = mu[r] as f32;
        rstd[r] = (1.0 / (sq[r] / n + eps as f64).sqrt()) as f32;
    }
}

/// `y = (x − mean)·rstd·gamma + beta` per row.
pub fn layernorm_forward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<NormOutput> {
    let dm = check(x, gamma, beta)?;
    let (rows, d) = (dm.rows, dm.d);
    let dev = x.device();
    let mut mean = Tensor::empty([dm.gx, rows], MemTag::Activations, dev)?;
    let mut rstd = Tensor::empty([dm.gx, rows], MemTag::Activations, dev)?;
    if let Some(gpu) = dev.gpu() {
        let mut y = Tensor::empty_as(
            x.shape().with_groups(dm.groups),
            dev.compute_dtype(),
            MemTag::Activations,
            dev,
        )?;
        gpu.layernorm_forward(
            &cuda_dims(&dm),
            x.cu_bf16(OP)?,
            gamma.cu_f32(OP)?,
            beta.cu_f32(OP)?,
            eps,
            y.cu_bf16_mut(OP)?,
            mean.cu_f32_mut(OP)?,
            rstd.cu_f32_mut(OP)?,
        )?;
        return Ok(NormOutput { y, mean, rstd });
    }
    let xs = x.as_slice()?;
    mean.as_mut_slice()?
        .par_chunks_mut(LOCKSTEP)
        .zip(rstd.as_mut_slice()?.par_chunks_mut(LOCKSTEP))
        .zip(xs.par_chunks(LOCKSTEP * d))
        .for_each(|((m, r), x)| row_stats(x, d, eps, m, r));

    let mut y = Tensor::empty(x.shape().with_groups(dm.groups), MemTag::Activations, dev)?;
    let (ms, rs, gs, bs) = (
        mean.as_slice()?,
        rstd.as_slice()?,
        gamma.as_slice()?,
        beta.as_slice()?,
    );
    y.as_mut_slice()?
        .par_chunks_mut(d)
        .enumerate()
        .for_each(|(i, out)| {
            let (g, row) = (i / rows, i % rows);
            let src = group_index(g, dm.gx) * rows + row;
            let w = group_index(g, dm.gw) * d;
            let (m, r) = (ms[src], rs[src]);
            let xr = &xs[src * d..][..d];
            for j in 0..d {
                out[j] = (xr[j] - m) * r * gs[w + j] + bs[w + j];
            }
        });
    Ok(NormOutput { y, mean, rstd })
}

/// Gradients of [`layernorm_forward`]: `need_x` for dx, `need_affine` for dgamma and dbeta.
///
/// `dx_plus` is a gradient x already has from its other readers (the residual stream's, for a
/// pre-norm block's input): dx comes back with it added, in the pass that forms dx rather than
/// a pass of its own after. It needs `need_x`, and x's shape.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    need_x: bool,
    need_affine: bool,
    dx_plus: Option<&Tensor>,
) -> Result<NormGrads> {
    const OP: &str = "layernorm_backward";
    let dm = check(x, gamma, beta)?;
    let (groups, rows, d) = (dm.groups, dm.rows, dm.d);
    let want = x.shape().with_groups(groups);
    if dy.shape() != &want {
        return Err(Error::shape(OP, dy.shape(), &want));
    }
    check_dx_plus(OP, dx_plus, need_x, x.shape(), x)?;
    let dev = x.device();
    if dev.gpu().is_some() {
        return backward_cuda(&dm, dy, x, gamma, mean, rstd, need_x, need_affine, dx_plus);
    }
    let (dys, xs, gs, ms, rs) = (
        dy.as_slice()?,
        x.as_slice()?,
        gamma.as_slice()?,
        mean.as_slice()?,
        rstd.as_slice()?,
    );
    let mut out = NormGrads::default();

    if need_x {
        // Each output group's contribution, then a sum over groups when x is shared; dx_plus
        // joins each row as it is formed, or the sum.
        let fold = match dx_plus {
            Some(p) if dm.gx == groups => Some(p.as_slice()?),
            _ => None,
        };
        let mut dx_all = Tensor::empty(want.clone(), MemTag::Workspace, dev)?;
        dx_all
            .as_mut_slice()?
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(i, dxr)| {
                let (g, row) = (i / rows, i % rows);
                let src = group_index(g, dm.gx) * rows + row;
                let w = &gs[group_index(g, dm.gw) * d..][..d];
                let (m, r) = (ms[src], rs[src]);
                let xr = &xs[src * d..][..d];
                let dyr = &dys[i * d..][..d];
                let (mut s1, mut s2) = (0.0f64, 0.0f64);
                for j in 0..d {
                    let dxhat = (dyr[j] * w[j]) as f64;
                    s1 += dxhat;
                    s2 += dxhat * ((xr[j] - m) * r) as f64;
                }
                let (c1, c2) = ((s1 / d as f64) as f32, (s2 / d as f64) as f32);
                for j in 0..d {
                    let xhat = (xr[j] - m) * r;
                    dxr[j] = r * (dyr[j] * w[j] - c1 - xhat * c2);
                }
                if let Some(p) = fold {
                    dxr.iter_mut()
                        .zip(&p[i * d..][..d])
                        .for_each(|(o, p)| *o += p);
                }
            });
        let mut dx = reduce_to_groups(dx_all, dm.gx)?;
        if let (Some(p), None) = (dx_plus, fold) {
            add_assign(&mut dx, p)?;
        }
        out.dx = Some(dx);
    }

    if need_affine {
        // dgamma sums dy·x̂ over the rows that used each affine row, each row made as it is
        // added (a buffer of them all would be as large as dy, and no tensor); dbeta sums dy.
        let dgamma = sum_rows_by(groups, rows, d, dm.gw, |i, acc| {
            let (g, row) = (i / rows, i % rows);
            let src = group_index(g, dm.gx) * rows + row;
            let (m, r) = (ms[src], rs[src]);
            let xr = &xs[src * d..][..d];
            let dyr = &dys[i * d..][..d];
            for j in 0..d {
                acc[j] += dyr[j] * (xr[j] - m) * r;
            }
        });
        let dbeta = sum_rows(dys, groups, rows, d, dm.gw);
        out.dgamma = Some(Tensor::from_vec(
            dgamma,
            gamma.shape().clone(),
            MemTag::Workspace,
            dev,
        )?);
        out.dbeta = Some(Tensor::from_vec(
            dbeta,
            gamma.shape().clone(),
            MemTag::Workspace,
            dev,
        )?);
    }
    Ok(out)
}

fn cuda_dims(dm: &Dims) -> loren_kernels::NormDims {
    loren_kernels::NormDims {
        groups: dm.groups,
        x_groups: dm.gx,
        w_groups: dm.gw,
        rows: dm.rows,
        dim: dm.d,
    }
}

/// The GPU backward: dx in one kernel (summing over groups for a shared input), dgamma and
/// dbeta by a deterministic two-stage column sum.
#[allow(clippy::too_many_arguments)]
fn backward_cuda(
    dm: &Dims,
    dy: &Tensor,
    x: &Tensor,
    gamma: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    need_x: bool,
    need_affine: bool,
    dx_plus: Option<&Tensor>,
) -> Result<NormGrads> {
    let dev = x.device();
    let gpu = dev.require_gpu(OP)?;
    let d = cuda_dims(dm);
    let mut out = NormGrads::default();
    if need_x {
        let mut dx = Tensor::empty_as(
            x.shape().clone(),
            crate::dtype::DType::BF16,
            MemTag::Workspace,
            dev,
        )?;
        let (m, r) = (mean.cu_f32(OP)?, rstd.cu_f32(OP)?);
        gpu.layernorm_backward_dx(
            &d,
            dy.cu_bf16(OP)?,
            x.cu_bf16(OP)?,
            gamma.cu_f32(OP)?,
            m,
            r,
            match dx_plus {
                Some(p) => Some(p.cu_bf16(OP)? as &dyn loren_kernels::DevicePtr<_>),
                None => None,
            },
            dx.cu_bf16_mut(OP)?,
        )?;
        out.dx = Some(dx);
    }
    if need_affine {
        let mut dgamma = Tensor::empty(gamma.shape().clone(), MemTag::Workspace, dev)?;
        let mut dbeta = Tensor::empty(gamma.shape().clone(), MemTag::Workspace, dev)?;
        let ws_len = loren_kernels::layernorm_params_workspace_len(&d);
        let mut ws = Tensor::empty([ws_len], MemTag::Workspace, dev)?;
        gpu.layernorm_backward_params(
            &d,
            dy.cu_bf16(OP)?,
            x.cu_bf16(OP)?,
            mean.cu_f32(OP)?,
            rstd.cu_f32(OP)?,
            ws.cu_f32_mut(OP)?,
            dgamma.cu_f32_mut(OP)?,
            dbeta.cu_f32_mut(OP)?,
            false,
        )?;
        out.dgamma = Some(dgamma);
        out.dbeta = Some(dbeta);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::{Device, Shape};

    /// One row alone, as the statistics were defined before rows ran in lockstep.
    fn alone(x: &[f32], eps: f32) -> (f32, f32) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
    }

    /// dgamma, whose rows dy·x̂ are made as they are summed, is the sum of those rows written
    /// out first, bit for bit: per member and shared, with a shared input, over more rows than
    /// one block of the sum.
    #[test]
    fn dgamma_made_row_by_row_is_the_sum_of_the_rows_written_out() {
        let dev = Device::cpu();
        let mut rng = Rng::new(5);
        let mut normal = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.normal()).collect() };
        for (gx, gw, rows, d) in [
            (3, 3, 300, 24),
            (1, 3, 300, 24),
            (3, 1, 200, 40),
            (1, 1, 513, 8),
        ] {
            let groups = gx.max(gw);
            let tensor = |v: Vec<f32>, dims: &[usize]| {
                Tensor::from_vec(v, Shape::new(dims), MemTag::Workspace, &dev).unwrap()
            };
            let x = tensor(normal(gx * rows * d), &[gx, rows, d]);
            let gamma = tensor(normal(gw * d), &[gw, d]);
            let beta = tensor(normal(gw * d), &[gw, d]);
            let dy = tensor(normal(groups * rows * d), &[groups, rows, d]);
            let f = layernorm_forward(&x, &gamma, &beta, 1e-6).unwrap();
            let b = layernorm_backward(&dy, &x, &gamma, &beta, &f.mean, &f.rstd, false, true, None)
                .unwrap();
            let (xs, dys) = (x.as_slice().unwrap(), dy.as_slice().unwrap());
            let (ms, rs) = (f.mean.as_slice().unwrap(), f.rstd.as_slice().unwrap());
            let mut rows_out = vec![0.0f32; dys.len()];
            for (i, out) in rows_out.chunks_mut(d).enumerate() {
                let src = group_index(i / rows, gx) * rows + i % rows;
                for j in 0..d {
                    out[j] = dys[i * d + j] * (xs[src * d + j] - ms[src]) * rs[src];
                }
            }
            let want = sum_rows(&rows_out, groups, rows, d, gw);
            let got = b.dgamma.unwrap().to_vec().unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "gx={gx} gw={gw} rows={rows}");
        }
    }

    #[test]
    fn rows_in_lockstep_have_the_statistics_of_each_row_alone_bit_for_bit() {
        let d = 37;
        let mut rng = Rng::new(11);
        let mut x: Vec<f32> = (0..LOCKSTEP * d)
            .map(|_| 3.0 * rng.normal() + 0.5)
            .collect();
        // A row of negative zeros (its mean keeps the sign) and a constant row (zero variance).
        x[..d].fill(-0.0);
        x[2 * d..3 * d].fill(7.25);
        for rows in 1..=LOCKSTEP {
            let (mut m, mut r) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
            let x = &x[..rows * d];
            row_stats(x, d, 1e-6, &mut m, &mut r);
            for (i, row) in x.chunks_exact(d).enumerate() {
                let (want_m, want_r) = alone(row, 1e-6);
                assert_eq!(
                    (m[i].to_bits(), r[i].to_bits()),
                    (want_m.to_bits(), want_r.to_bits()),
                    "row {i} of {rows}: got ({}, {}), alone ({want_m}, {want_r})",
                    m[i],
                    r[i]
                );
            }
        }
    }
}
