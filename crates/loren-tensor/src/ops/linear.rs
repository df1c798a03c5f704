//! `y = x·Wᵀ + b` with group broadcasting: a shared W (group 1) over all members' rows in one
//! product, or a per-member W (the explicit ensemble, the heads), possibly on a shared input.

use rayon::prelude::*;

use super::elementwise::sum_rows;
use super::gemm::{Trans, matmul, pool_threads};
use super::{broadcast_groups, expect_rank, group_index, same_device};
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::shape::Shape;
use crate::tensor::Tensor;

const OP: &str = "linear";

/// Which gradients a backward pass must produce.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    pub dx: bool,
    pub dw: bool,
    pub db: bool,
}

/// Gradients of a linear layer's inputs; `None` where not asked for.
#[derive(Debug, Default)]
pub struct LinearGrads {
    pub dx: Option<Tensor>,
    pub dw: Option<Tensor>,
    pub db: Option<Tensor>,
}

struct Dims {
    groups: usize,
    gx: usize,
    gw: usize,
    rows: usize,
    k: usize,
    n: usize,
}

fn check(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Dims> {
    match bias {
        Some(b) => same_device(OP, &[x, w, b])?,
        None => same_device(OP, &[x, w])?,
    }
    dims(x.shape(), w, bias)
}

/// The product's dimensions from the input's shape alone, so a backward that kept no input
/// (a frozen weight needs none) can still check its shapes.
fn dims(x: &Shape, w: &Tensor, bias: Option<&Tensor>) -> Result<Dims> {
    if x.rank() < 2 {
        return Err(Error::invalid(
            OP,
            format!("input must be [groups, ..., features], got {x}"),
        ));
    }
    expect_rank(OP, w, 3, "weight")?;
    let (gw, n, k) = (w.dims()[0], w.dims()[1], w.dims()[2]);
    if x.last() != k {
        return Err(Error::shape(OP, x, w.shape()));
    }
    if let Some(b) = bias.filter(|b| b.dims() != [gw, n]) {
        return Err(Error::shape(OP, b.shape(), w.shape()));
    }
    Ok(Dims {
        groups: broadcast_groups(OP, &[x, w.shape()])?,
        gx: x.groups(),
        gw,
        rows: x.rows_per_group(),
        k,
        n,
    })
}

/// Run `f(g, chunk, threads)` over the `groups` equal chunks of `out`: in parallel across groups
/// when there are enough of them to occupy the pool, else one at a time with a threaded product.
pub(crate) fn for_each_group<F>(out: &mut [f32], groups: usize, f: F)
where
    F: Fn(usize, &mut [f32], usize) + Sync + Send,
{
    if groups == 0 || out.is_empty() {
        return;
    }
    let chunk = out.len() / groups;
    let threads = pool_threads();
    if groups >= 2 * threads {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(g, c)| f(g, c, 1));
    } else {
        out.chunks_mut(chunk)
            .enumerate()
            .for_each(|(g, c)| f(g, c, threads));
    }
}

/// Fill each row of `y` (rows × n) with `bias`.
pub(crate) fn fill_rows(y: &mut [f32], bias: &[f32]) {
    for row in y.chunks_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// `y[g] = x[g]·W[g]ᵀ + b[g]`, broadcasting groups of 1.
pub fn linear_forward(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let d = check(x, w, bias)?;
    let out_shape = x.shape().with_groups(d.groups).with_last(d.n);
    let mut y = Tensor::empty(out_shape, MemTag::Activations, x.device())?;
    let xs = x.as_slice()?;
    let ws = w.as_slice()?;
    let bs = bias.map(|b| b.as_slice()).transpose()?;
    let ys = y.as_mut_slice()?;
    let (rows, k, n) = (d.rows, d.k, d.n);
    if d.gw == 1 {
        // One product over every group's rows: the shared-W GEMM of DESIGN.md.
        if let Some(b) = bs {
            fill_rows(ys, b);
        }
        // With a group-1 weight the input's groups are the output's.
        let total = d.groups * rows;
        matmul(
            ys,
            xs,
            Trans::N,
            ws,
            Trans::T,
            total,
            n,
            k,
            1.0,
            bs.is_some(),
            pool_threads(),
        );
    } else {
        for_each_group(ys, d.groups, |g, yg, threads| {
            let xg = &xs[group_index(g, d.gx) * rows * k..][..rows * k];
            let wg = &ws[g * n * k..][..n * k];
            if let Some(b) = bs {
                fill_rows(yg, &b[g * n..][..n]);
            }
            matmul(
                yg,
                xg,
                Trans::N,
                wg,
                Trans::T,
                rows,
                n,
                k,
                1.0,
                bs.is_some(),
                threads,
            );
        });
    }
    Ok(y)
}

/// Gradients of [`linear_forward`] given the output gradient `dy`. The input `x` (of shape
/// `x_shape`) is read only for dW, so a frozen weight's backward passes `None`.
pub fn linear_backward(
    dy: &Tensor,
    x_shape: &Shape,
    x: Option<&Tensor>,
    w: &Tensor,
    has_bias: bool,
    needs: Needs,
) -> Result<LinearGrads> {
    const BWD: &str = "linear_backward";
    same_device(BWD, &[dy, w])?;
    let d = dims(x_shape, w, None)?;
    let want = x_shape.with_groups(d.groups).with_last(d.n);
    if dy.shape() != &want {
        return Err(Error::shape(BWD, dy.shape(), &want));
    }
    let (rows, k, n, groups) = (d.rows, d.k, d.n, d.groups);
    let dys = dy.as_slice()?;
    let ws = w.as_slice()?;
    let dev = dy.device();
    let mut out = LinearGrads::default();

    if needs.dx {
        let mut dx = Tensor::empty(x_shape.clone(), MemTag::Workspace, dev)?;
        let dxs = dx.as_mut_slice()?;
        if d.gw == 1 {
            matmul(
                dxs,
                dys,
                Trans::N,
                ws,
                Trans::N,
                groups * rows,
                k,
                n,
                1.0,
                false,
                pool_threads(),
            );
        } else if d.gx == groups {
            for_each_group(dxs, groups, |g, dxg, threads| {
                let dyg = &dys[g * rows * n..][..rows * n];
                let wg = &ws[g * n * k..][..n * k];
                matmul(
                    dxg,
                    dyg,
                    Trans::N,
                    wg,
                    Trans::N,
                    rows,
                    k,
                    n,
                    1.0,
                    false,
                    threads,
                );
            });
        } else {
            // A shared input feeds every member: its gradient is the sum over members.
            for g in 0..groups {
                let dyg = &dys[g * rows * n..][..rows * n];
                let wg = &ws[g * n * k..][..n * k];
                matmul(
                    dxs,
                    dyg,
                    Trans::N,
                    wg,
                    Trans::N,
                    rows,
                    k,
                    n,
                    1.0,
                    g > 0,
                    pool_threads(),
                );
            }
        }
        out.dx = Some(dx);
    }

    if needs.dw {
        let x = x.ok_or_else(|| {
            Error::invalid(
                BWD,
                "the weight's gradient needs the input, which was not kept",
            )
        })?;
        if x.shape() != x_shape {
            return Err(Error::shape(BWD, x.shape(), x_shape));
        }
        same_device(BWD, &[x, w])?;
        let xs = x.as_slice()?;
        let mut dw = Tensor::empty(w.shape().clone(), MemTag::Workspace, dev)?;
        let dws = dw.as_mut_slice()?;
        if d.gw == 1 {
            // Every group's rows contribute to the one shared weight: one product over all rows.
            matmul(
                dws,
                dys,
                Trans::T,
                xs,
                Trans::N,
                n,
                k,
                groups * rows,
                1.0,
                false,
                pool_threads(),
            );
        } else {
            for_each_group(dws, groups, |g, dwg, threads| {
                let dyg = &dys[g * rows * n..][..rows * n];
                let xg = &xs[group_index(g, d.gx) * rows * k..][..rows * k];
                matmul(
                    dwg,
                    dyg,
                    Trans::T,
                    xg,
                    Trans::N,
                    n,
                    k,
                    rows,
                    1.0,
                    false,
                    threads,
                );
            });
        }
        out.dw = Some(dw);
    }

    if needs.db && has_bias {
        let sums = sum_rows(dys, groups, rows, n, d.gw);
        out.db = Some(Tensor::from_vec(sums, [d.gw, n], MemTag::Workspace, dev)?);
    }
    Ok(out)
}
