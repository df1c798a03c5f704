//! The LoRA-Ensemble projection: `y[m] = x[m]·Wᵀ + b + s·(x[m]·A[m]ᵀ)·B[m]ᵀ` for every member m.
//!
//! W [1, N, K] and b [1, N] are shared and frozen; A [M, r, K] and B [M, N, r] are each member's
//! adapters. The input is either per member, x [M, ..., K], or shared, x [1, ..., K] (the
//! identical-input prefix), in which case the shared product is computed once.

use rayon::prelude::*;

use super::elementwise::add_assign;
use super::gemm::{Trans, matmul, pool_threads};
use super::linear::{fill_rows, for_each_group};
use super::{check_dx_plus, check_residual, expect_rank, group_index, same_device};
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::tensor::Tensor;

const OP: &str = "lora_linear";

/// The forward's outputs: `y`, and `u = x·Aᵀ` [M, ..., r], which the backward needs.
#[derive(Debug)]
pub struct LoraOutput {
    pub y: Tensor,
    pub u: Tensor,
}

/// Gradients of the input and of the adapters.
#[derive(Debug, Default)]
pub struct LoraGrads {
    pub dx: Option<Tensor>,
    pub da: Option<Tensor>,
    pub db: Option<Tensor>,
}

struct Dims {
    members: usize,
    gx: usize,
    rows: usize,
    k: usize,
    n: usize,
    r: usize,
}

fn check(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, a: &Tensor, b: &Tensor) -> Result<Dims> {
    if x.shape().rank() < 2 {
        return Err(Error::invalid(
            OP,
            format!("input must be [groups, ..., features], got {}", x.shape()),
        ));
    }
    expect_rank(OP, w, 3, "shared weight W")?;
    expect_rank(OP, a, 3, "adapter A")?;
    expect_rank(OP, b, 3, "adapter B")?;
    let (n, k) = (w.dims()[1], w.dims()[2]);
    if w.dims()[0] != 1 {
        return Err(Error::invalid(
            OP,
            format!("the shared weight must have one group, got {}", w.shape()),
        ));
    }
    let (members, r) = (a.dims()[0], a.dims()[1]);
    if x.shape().last() != k {
        return Err(Error::shape(OP, x.shape(), w.shape()));
    }
    if a.dims()[2] != k {
        return Err(Error::shape(OP, a.shape(), w.shape()));
    }
    if b.dims() != [members, n, r] {
        return Err(Error::shape(OP, b.shape(), a.shape()));
    }
    let gx = x.shape().groups();
    if gx != 1 && gx != members {
        return Err(Error::shape(OP, x.shape(), a.shape()));
    }
    if let Some(bias) = bias {
        if bias.dims() != [1, n] {
            return Err(Error::shape(OP, bias.shape(), w.shape()));
        }
        same_device(OP, &[x, w, a, b, bias])?;
    } else {
        same_device(OP, &[x, w, a, b])?;
    }
    if r == 0 {
        return Err(Error::invalid(OP, "rank must be at least 1"));
    }
    Ok(Dims {
        members,
        gx,
        rows: x.shape().rows_per_group(),
        k,
        n,
        r,
    })
}

/// The forward pass. `scale` is s.
///
/// With `residual` ([1 or M, ..., N]: the stream a pre-norm block's projection joins), y comes
/// back with it added, on a GPU in the GEMM's store rather than a pass of its own.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f32,
    residual: Option<&Tensor>,
) -> Result<LoraOutput> {
    let d = check(x, w, bias, a, b)?;
    let (m, rows, k, n, r) = (d.members, d.rows, d.k, d.n, d.r);
    let dev = x.device();
    let y_shape = x.shape().with_groups(m).with_last(n);
    check_residual(OP, residual, x, &y_shape, dev.compute_dtype())?;
    let mut y = Tensor::empty_as(y_shape, dev.compute_dtype(), MemTag::Activations, dev)?;
    let mut u = Tensor::empty(
        x.shape().with_groups(m).with_last(r),
        MemTag::Activations,
        dev,
    )?;
    if dev.gpu().is_some() {
        cuda::forward(&d, x, w, bias, a, b, scale, residual, &mut y, &mut u)?;
        return Ok(LoraOutput { y, u });
    }
    let residual = residual.map(|t| t.as_slice().map(|s| (s, t.shape().groups())));
    let residual = residual.transpose()?;
    let (xs, ws, as_, bs) = (x.as_slice()?, w.as_slice()?, a.as_slice()?, b.as_slice()?);
    let bias = bias.map(|t| t.as_slice()).transpose()?;
    let ys = y.as_mut_slice()?;

    // Member by member, while its rows are in cache: y = b + x·Wᵀ, u = x·Aᵀ, then y += s·u·Bᵀ.
    // A shared input (the prefix) gets its shared product once, copied to every member.
    if d.gx == 1 {
        let (first, rest) = ys.split_at_mut(rows * n);
        shared_product(first, xs, ws, bias, rows, n, k, pool_threads());
        rest.par_chunks_mut(rows * n)
            .for_each(|c| c.copy_from_slice(first));
    }
    let us = u.as_mut_slice()?;
    let member = |g: usize, yg: &mut [f32], ug: &mut [f32], threads: usize| {
        let xg = &xs[group_index(g, d.gx) * rows * k..][..rows * k];
        if d.gx != 1 {
            shared_product(yg, xg, ws, bias, rows, n, k, threads);
        }
        let ag = &as_[g * r * k..][..r * k];
        matmul(
            ug,
            xg,
            Trans::N,
            ag,
            Trans::T,
            rows,
            r,
            k,
            1.0,
            false,
            threads,
        );
        let bg = &bs[g * n * r..][..n * r];
        matmul(
            yg,
            ug,
            Trans::N,
            bg,
            Trans::T,
            rows,
            n,
            r,
            scale,
            true,
            threads,
        );
        if let Some((res, groups)) = residual {
            let rg = &res[group_index(g, groups) * rows * n..][..rows * n];
            yg.iter_mut().zip(rg).for_each(|(y, r)| *y += r);
        }
    };
    // Members in parallel when there are enough of them, else each product on every thread.
    let threads = pool_threads();
    if m >= 2 * threads {
        ys.par_chunks_mut(rows * n)
            .zip(us.par_chunks_mut(rows * r))
            .enumerate()
            .for_each(|(g, (yg, ug))| member(g, yg, ug, 1));
    } else {
        ys.chunks_mut(rows * n)
            .zip(us.chunks_mut(rows * r))
            .enumerate()
            .for_each(|(g, (yg, ug))| member(g, yg, ug, threads));
    }
    Ok(LoraOutput { y, u })
}

/// `y = b + x·Wᵀ` over `rows` rows (W is [n, k]).
#[allow(clippy::too_many_arguments)]
fn shared_product(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    n: usize,
    k: usize,
    threads: usize,
) {
    if let Some(bv) = bias {
        fill_rows(y, bv);
    }
    matmul(
        y,
        x,
        Trans::N,
        w,
        Trans::T,
        rows,
        n,
        k,
        1.0,
        bias.is_some(),
        threads,
    );
}

/// The backward pass. No gradient is formed for the frozen W and bias.
///
/// `dx_plus` is a gradient x already has from its other readers (the q, k and v projections
/// read one input): dx comes back with it added, on a GPU in the GEMM's store rather than a
/// pass of its own. It needs `need_dx`, and x's shape.
#[allow(clippy::too_many_arguments)]
pub fn lora_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    u: &Tensor,
    scale: f32,
    need_dx: bool,
    need_adapters: bool,
    dx_plus: Option<&Tensor>,
) -> Result<LoraGrads> {
    const OP: &str = "lora_backward";
    let d = check(x, w, None, a, b)?;
    let (m, rows, k, n, r) = (d.members, d.rows, d.k, d.n, d.r);
    let y_shape = x.shape().with_groups(m).with_last(n);
    if dy.shape() != &y_shape {
        return Err(Error::shape(OP, dy.shape(), &y_shape));
    }
    let u_shape = x.shape().with_groups(m).with_last(r);
    if u.shape() != &u_shape {
        return Err(Error::shape(OP, u.shape(), &u_shape));
    }
    check_dx_plus(OP, dx_plus, need_dx, x.shape(), x)?;
    let dev = x.device();
    if dev.gpu().is_some() {
        return cuda::backward(
            &d,
            dy,
            x,
            w,
            a,
            b,
            u,
            scale,
            need_dx,
            need_adapters,
            dx_plus,
        );
    }
    let (dys, xs, ws, as_, bs, us) = (
        dy.as_slice()?,
        x.as_slice()?,
        w.as_slice()?,
        a.as_slice()?,
        b.as_slice()?,
        u.as_slice()?,
    );
    let mut out = LoraGrads::default();

    // v = s·dy·B: the gradient reaching u, shared by dA and dx.
    let mut v = Tensor::empty(u_shape, MemTag::Workspace, dev)?;
    let vs = v.as_mut_slice()?;
    for_each_group(vs, m, |g, vg, threads| {
        let dyg = &dys[g * rows * n..][..rows * n];
        matmul(
            vg,
            dyg,
            Trans::N,
            &bs[g * n * r..][..n * r],
            Trans::N,
            rows,
            r,
            n,
            scale,
            false,
            threads,
        );
    });
    let vs = v.as_slice()?;

    if need_adapters {
        let mut db = Tensor::empty(b.shape().clone(), MemTag::Workspace, dev)?;
        for_each_group(db.as_mut_slice()?, m, |g, dbg, threads| {
            let dyg = &dys[g * rows * n..][..rows * n];
            let ug = &us[g * rows * r..][..rows * r];
            matmul(
                dbg,
                dyg,
                Trans::T,
                ug,
                Trans::N,
                n,
                r,
                rows,
                scale,
                false,
                threads,
            );
        });
        let mut da = Tensor::empty(a.shape().clone(), MemTag::Workspace, dev)?;
        for_each_group(da.as_mut_slice()?, m, |g, dag, threads| {
            let vg = &vs[g * rows * r..][..rows * r];
            let xg = &xs[group_index(g, d.gx) * rows * k..][..rows * k];
            matmul(
                dag,
                vg,
                Trans::T,
                xg,
                Trans::N,
                r,
                k,
                rows,
                1.0,
                false,
                threads,
            );
        });
        out.da = Some(da);
        out.db = Some(db);
    }

    if need_dx {
        let mut dx = Tensor::empty(x.shape().clone(), MemTag::Workspace, dev)?;
        let dxs = dx.as_mut_slice()?;
        if d.gx == m {
            matmul(
                dxs,
                dys,
                Trans::N,
                ws,
                Trans::N,
                m * rows,
                k,
                n,
                1.0,
                false,
                pool_threads(),
            );
            for_each_group(dxs, m, |g, dxg, threads| {
                let vg = &vs[g * rows * r..][..rows * r];
                matmul(
                    dxg,
                    vg,
                    Trans::N,
                    &as_[g * r * k..][..r * k],
                    Trans::N,
                    rows,
                    k,
                    r,
                    1.0,
                    true,
                    threads,
                );
            });
        } else {
            // A shared input: dx = (Σ_m dy[m])·W + Σ_m v[m]·A[m], summing dy before the big product.
            let mut dy_sum = Tensor::zeros([rows, n], MemTag::Workspace, dev)?;
            let dy_sum = dy_sum.as_mut_slice()?;
            for g in 0..m {
                for (s, v) in dy_sum.iter_mut().zip(&dys[g * rows * n..][..rows * n]) {
                    *s += v;
                }
            }
            matmul(
                dxs,
                dy_sum,
                Trans::N,
                ws,
                Trans::N,
                rows,
                k,
                n,
                1.0,
                false,
                pool_threads(),
            );
            for g in 0..m {
                let vg = &vs[g * rows * r..][..rows * r];
                matmul(
                    dxs,
                    vg,
                    Trans::N,
                    &as_[g * r * k..][..r * k],
                    Trans::N,
                    rows,
                    k,
                    r,
                    1.0,
                    true,
                    pool_threads(),
                );
            }
        }
        if let Some(p) = dx_plus {
            add_assign(&mut dx, p)?;
        }
        out.dx = Some(dx);
    }
    Ok(out)
}

/// The GPU path: the fused tensor-core kernels of `kernels/lora.cu`, every member in one launch.
mod cuda {
    use loren_kernels::LoraDims;

    use super::{Dims, LoraGrads, OP};
    use crate::dtype::DType;
    use crate::error::Result;
    use crate::memory::MemTag;
    use crate::tensor::Tensor;

    fn dims(d: &Dims) -> LoraDims {
        LoraDims {
            members: d.members,
            x_groups: d.gx,
            rows: d.rows,
            k: d.k,
            n: d.n,
            rank: d.r,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward(
        d: &Dims,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        scale: f32,
        residual: Option<&Tensor>,
        y: &mut Tensor,
        u: &mut Tensor,
    ) -> Result<()> {
        let gpu = x.device().require_gpu(OP)?;
        // The kernel reads a bf16 bias; biases are kept in f32, so this N-element cast is the cost.
        let bias = bias
            .map(|t| t.copy_as(DType::BF16, MemTag::Workspace))
            .transpose()?;
        let bias = bias.as_ref().map(|t| t.cu_bf16(OP)).transpose()?;
        gpu.lora_forward(
            &dims(d),
            x.cu_bf16(OP)?,
            w.cu_bf16(OP)?,
            bias.map(|b| b as &dyn loren_kernels::DevicePtr<loren_kernels::bf16>),
            a.cu_f32(OP)?,
            b.cu_f32(OP)?,
            scale,
            match residual {
                Some(t) => Some((
                    t.cu_bf16(OP)? as &dyn loren_kernels::DevicePtr<_>,
                    t.shape().groups(),
                )),
                None => None,
            },
            y.cu_bf16_mut(OP)?,
            u.cu_f32_mut(OP)?,
        )?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        d: &Dims,
        dy: &Tensor,
        x: &Tensor,
        w: &Tensor,
        a: &Tensor,
        b: &Tensor,
        u: &Tensor,
        scale: f32,
        need_dx: bool,
        need_adapters: bool,
        dx_plus: Option<&Tensor>,
    ) -> Result<LoraGrads> {
        let dev = x.device();
        let gpu = dev.require_gpu(OP)?;
        let mut v = Tensor::empty(u.shape().clone(), MemTag::Workspace, dev)?;
        let mut da = need_adapters
            .then(|| Tensor::empty(a.shape().clone(), MemTag::Workspace, dev))
            .transpose()?;
        let mut db = need_adapters
            .then(|| Tensor::empty(b.shape().clone(), MemTag::Workspace, dev))
            .transpose()?;
        let mut dx = need_dx
            .then(|| Tensor::empty_as(x.shape().clone(), DType::BF16, MemTag::Workspace, dev))
            .transpose()?;
        // dA and dB's partial sums, where few members leave their rows cut into ranges.
        let ws_len = loren_kernels::lora_grads_workspace_len(&dims(d));
        let mut grads_ws = (need_adapters && ws_len > 0)
            .then(|| Tensor::empty([ws_len], MemTag::Workspace, dev))
            .transpose()?;
        let grads = match (&mut da, &mut db) {
            (Some(da), Some(db)) => Some(loren_kernels::AdapterGrads {
                da: da.cu_f32_mut(OP)?,
                db: db.cu_f32_mut(OP)?,
                workspace: match &mut grads_ws {
                    Some(w) => Some(w.cu_f32_mut(OP)?),
                    None => None,
                },
            }),
            _ => None,
        };
        let dxb = dx
            .as_mut()
            .map(|t| {
                t.cu_bf16_mut(OP)
                    .map(|s| s as &mut dyn loren_kernels::DevicePtrMut<loren_kernels::bf16>)
            })
            .transpose()?;
        gpu.lora_backward(
            &dims(d),
            dy.cu_bf16(OP)?,
            x.cu_bf16(OP)?,
            w.cu_bf16(OP)?,
            a.cu_f32(OP)?,
            b.cu_f32(OP)?,
            u.cu_f32(OP)?,
            scale,
            v.cu_f32_mut(OP)?,
            grads,
            match dx_plus {
                Some(p) => Some(p.cu_bf16(OP)? as &dyn loren_kernels::DevicePtr<_>),
                None => None,
            },
            dxb,
        )?;
        Ok(LoraGrads { dx, da, db })
    }
}
