//! `y = x·Wᵀ + b` with group broadcasting: a shared W (group 1) over all members' rows in one
//! product, or a per-member W (the explicit ensemble, the heads), possibly on a shared input.

use rayon::prelude::*;

use super::elementwise::add_assign;
use super::elementwise::sum_rows;
use super::gemm::{Trans, matmul, pool_threads};
use super::{
    broadcast_groups, check_dx_plus, check_residual, expect_rank, group_index, same_device,
};
use crate::dtype::DType;
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

/// `y[g] = x[g]·W[g]ᵀ + b[g]`, broadcasting groups of 1. The output is stored as `out`
/// (bf16 activations, or f32 for logits; always f32 on the CPU).
///
/// With `residual` (the stream a pre-norm block's sublayer joins; its groups 1 or the
/// output's), `y[g] += residual[g]`: on a GPU the residual and bias are written first and the
/// product accumulates onto them, so the stream costs no pass of its own.
pub fn linear_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    out: DType,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let d = check(x, w, bias)?;
    let out_shape = x.shape().with_groups(d.groups).with_last(d.n);
    check_residual(OP, residual, x, &out_shape, out)?;
    let mut y = Tensor::empty_as(out_shape, out, MemTag::Activations, x.device())?;
    if x.device().gpu().is_some() {
        cuda::forward(&d, x, w, bias, residual, &mut y)?;
        return Ok(y);
    }
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
    if let Some(res) = residual {
        let (rs, per, gr) = (res.as_slice()?, rows * n, res.shape().groups());
        ys.par_chunks_mut(per).enumerate().for_each(|(g, yg)| {
            let rg = &rs[group_index(g, gr) * per..][..per];
            yg.iter_mut().zip(rg).for_each(|(y, r)| *y += r);
        });
    }
    Ok(y)
}

/// Gradients of [`linear_forward`] given the output gradient `dy`. The input `x` (of shape
/// `x_shape`) is read only for dW, so a frozen weight's backward passes `None`.
///
/// `dx_plus` is a gradient x already has from its other readers (the explicit ensemble's q, k
/// and v projections read one input): dx comes back as `dx_plus + dy·W`, in `dx_plus`'s memory.
/// On a GPU the product accumulates onto it in the GEMM (beta = 1), so it costs no pass of its
/// own; on the CPU it is added after the product, as a separate sum would be.
pub fn linear_backward(
    dy: &Tensor,
    x_shape: &Shape,
    x: Option<&Tensor>,
    w: &Tensor,
    has_bias: bool,
    needs: Needs,
    dx_plus: Option<Tensor>,
) -> Result<LinearGrads> {
    const BWD: &str = "linear_backward";
    same_device(BWD, &[dy, w])?;
    let d = dims(x_shape, w, None)?;
    let want = x_shape.with_groups(d.groups).with_last(d.n);
    if dy.shape() != &want {
        return Err(Error::shape(BWD, dy.shape(), &want));
    }
    check_dx_plus(BWD, dx_plus.as_ref(), needs.dx, x_shape, dy)?;
    if dy.device().gpu().is_some() {
        return cuda::backward(&d, dy, x_shape, x, w, has_bias, needs, dx_plus);
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
        out.dx = Some(match dx_plus {
            Some(mut plus) => {
                add_assign(&mut plus, &dx)?;
                plus
            }
            None => dx,
        });
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

/// The GPU path: cuBLAS bf16 products with f32 accumulation (the frozen MLP, the explicit
/// ensemble's per-member weights, the heads), the bias added by a row kernel.
mod cuda {
    use loren_kernels::{Gemm, GemmOut, SumRowsDims, sum_rows_workspace_len};

    use super::{Dims, LinearGrads, Needs};
    use crate::dtype::DType;
    use crate::error::{Error, Result};
    use crate::memory::MemTag;
    use crate::ops::elementwise::add_assign;
    use crate::shape::Shape;
    use crate::tensor::Tensor;

    const OP: &str = "linear";

    fn gemm(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) -> Gemm {
        Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// `count` products a stride apart (0 reads one operand for all).
    fn batched(g: Gemm, count: usize, sa: usize, sb: usize, sc: usize) -> Gemm {
        Gemm {
            batch: count,
            stride_a: sa,
            stride_b: sb,
            stride_c: sc,
            ..g
        }
    }

    /// A bf16 copy of an f32 operand (the logits' gradient), for cuBLAS; None when it is bf16.
    fn bf16_copy(t: &Tensor) -> Result<Option<Tensor>> {
        (t.dtype() == DType::F32)
            .then(|| t.copy_as(DType::BF16, MemTag::Workspace))
            .transpose()
    }

    /// `y = src + bias` in y's dtype (`src` None: y itself, in place).
    fn bias_rows(
        gpu: &loren_kernels::Gpu,
        d: &Dims,
        src: Option<&Tensor>,
        bias: Option<(&dyn loren_kernels::DevicePtr<f32>, usize)>,
        y: &mut Tensor,
    ) -> Result<()> {
        let (groups, rows, n) = (d.groups, d.rows, d.n);
        match y.dtype() {
            DType::BF16 => {
                let src = match src {
                    Some(s) => Some((
                        s.cu_bf16(OP)? as &dyn loren_kernels::DevicePtr<_>,
                        s.shape().groups(),
                    )),
                    None => None,
                };
                gpu.add_bias_rows_bf16(groups, rows, n, src, bias, y.cu_bf16_mut(OP)?)?
            }
            DType::F32 => {
                let src = match src {
                    Some(s) => Some((
                        s.cu_f32(OP)? as &dyn loren_kernels::DevicePtr<_>,
                        s.shape().groups(),
                    )),
                    None => None,
                };
                gpu.add_bias_rows_f32(groups, rows, n, src, bias, y.cu_f32_mut(OP)?)?
            }
        }
        Ok(())
    }

    pub(super) fn forward(
        d: &Dims,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        y: &mut Tensor,
    ) -> Result<()> {
        let gpu = x.device().require_gpu(OP)?;
        let (rows, k, n) = (d.rows, d.k, d.n);
        let mut g = if d.gw == 1 {
            // One product over every group's rows: the shared-W GEMM of DESIGN.md.
            gemm(d.groups * rows, n, k, false, true)
        } else {
            let sx = if d.gx == 1 { 0 } else { rows * k };
            batched(gemm(rows, n, k, false, true), d.groups, sx, n * k, rows * n)
        };
        let bias = match bias {
            Some(b) => Some((b.cu_f32(OP)? as &dyn loren_kernels::DevicePtr<f32>, d.gw)),
            None => None,
        };
        // y = residual + bias first and the product accumulated onto it; else the bias after.
        if residual.is_some() {
            g.beta = 1.0;
            bias_rows(gpu, d, residual, bias, y)?;
        }
        let (xb, wb) = (x.cu_bf16(OP)?, w.cu_bf16(OP)?);
        match y.dtype() {
            DType::BF16 => gpu.gemm_bf16(&g, xb, wb, GemmOut::Bf16(y.cu_bf16_mut(OP)?))?,
            DType::F32 => gpu.gemm_bf16(&g, xb, wb, GemmOut::F32(y.cu_f32_mut(OP)?))?,
        }
        if residual.is_none() && bias.is_some() {
            bias_rows(gpu, d, None, bias, y)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        d: &Dims,
        dy: &Tensor,
        x_shape: &Shape,
        x: Option<&Tensor>,
        w: &Tensor,
        has_bias: bool,
        needs: Needs,
        dx_plus: Option<Tensor>,
    ) -> Result<LinearGrads> {
        let gpu = dy.device().require_gpu(OP)?;
        let dev = dy.device();
        let (rows, k, n, groups) = (d.rows, d.k, d.n, d.groups);
        let cast = bf16_copy(dy)?;
        let dyb = cast.as_ref().unwrap_or(dy).cu_bf16(OP)?;
        let mut out = LinearGrads::default();

        if needs.dx {
            let wb = w.cu_bf16(OP)?;
            let shared_input = d.gw != 1 && d.gx != groups;
            // The gradient x already has becomes the GEMM's C, accumulated onto (beta = 1),
            // where the product is one GEMM into x's shape and that gradient is bf16.
            let (mut dx, beta, add_after) = match dx_plus {
                Some(p) if !shared_input && p.dtype() == DType::BF16 => (p, 1.0, None),
                other => {
                    let dx =
                        Tensor::empty_as(x_shape.clone(), DType::BF16, MemTag::Workspace, dev)?;
                    (dx, 0.0, other)
                }
            };
            if d.gw == 1 {
                let g = Gemm {
                    beta,
                    ..gemm(groups * rows, k, n, false, false)
                };
                gpu.gemm_bf16(&g, dyb, wb, GemmOut::Bf16(dx.cu_bf16_mut(OP)?))?;
            } else {
                let g = batched(
                    Gemm {
                        beta,
                        ..gemm(rows, k, n, false, false)
                    },
                    groups,
                    rows * n,
                    n * k,
                    rows * k,
                );
                if !shared_input {
                    gpu.gemm_bf16(&g, dyb, wb, GemmOut::Bf16(dx.cu_bf16_mut(OP)?))?;
                } else {
                    // A shared input feeds every member: its gradient is the sum over members.
                    let per = x_shape.with_groups(groups);
                    let mut each = Tensor::empty_as(per, DType::BF16, MemTag::Workspace, dev)?;
                    gpu.gemm_bf16(&g, dyb, wb, GemmOut::Bf16(each.cu_bf16_mut(OP)?))?;
                    gpu.sum_groups_bf16(rows * k, groups, each.cu_bf16(OP)?, dx.cu_bf16_mut(OP)?)?;
                }
            }
            if let Some(p) = add_after {
                let mut p = match p.dtype() {
                    DType::BF16 => p,
                    _ => p.copy_as(DType::BF16, p.tag())?,
                };
                add_assign(&mut p, &dx)?;
                dx = p;
            }
            out.dx = Some(dx);
        }

        if needs.dw {
            let x = x.ok_or_else(|| {
                Error::invalid(
                    OP,
                    "the weight's gradient needs the input, which was not kept",
                )
            })?;
            let xb = x.cu_bf16(OP)?;
            let mut dw = Tensor::empty_as(w.shape().clone(), DType::F32, MemTag::Workspace, dev)?;
            let g = if d.gw == 1 {
                // Every group's rows contribute to the one shared weight: one product over all.
                gemm(n, k, groups * rows, true, false)
            } else {
                let sx = if d.gx == 1 { 0 } else { rows * k };
                batched(gemm(n, k, rows, true, false), groups, rows * n, sx, n * k)
            };
            gpu.gemm_bf16(&g, dyb, xb, GemmOut::F32(dw.cu_f32_mut(OP)?))?;
            out.dw = Some(dw);
        }

        if needs.db && has_bias {
            let dims = SumRowsDims {
                groups,
                rows,
                n,
                ld: n,
                out_groups: d.gw,
            };
            let mut db = Tensor::empty_as([d.gw, n], DType::F32, MemTag::Workspace, dev)?;
            let mut ws = Tensor::empty_as(
                [sum_rows_workspace_len(&dims)],
                DType::F32,
                MemTag::Workspace,
                dev,
            )?;
            match dy.dtype() {
                DType::BF16 => {
                    gpu.sum_rows_bf16(&dims, dyb, ws.cu_f32_mut(OP)?, db.cu_f32_mut(OP)?, false)?
                }
                DType::F32 => gpu.sum_rows_f32(
                    &dims,
                    dy.cu_f32(OP)?,
                    ws.cu_f32_mut(OP)?,
                    db.cu_f32_mut(OP)?,
                    false,
                )?,
            }
            out.db = Some(db);
        }
        Ok(out)
    }
}
