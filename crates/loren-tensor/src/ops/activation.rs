//! `y = gelu(x + b)`: the bias and activation after the MLP's first product, fused.
//!
//! GELU is the exact (erf) form PyTorch's ViTs use, not the tanh approximation.

use rayon::prelude::*;

use super::elementwise::{reduce_to_groups, sum_rows};
use super::{broadcast_groups, expect_rank, group_index, same_device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::tensor::Tensor;

const OP: &str = "bias_gelu";

use super::math::{erf, exp, wide};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
pub fn gelu(z: f32) -> f32 {
    0.5 * z * (1.0 + erf(z * FRAC_1_SQRT_2))
}

/// d gelu / dz = Φ(z) + z·φ(z).
#[inline(always)]
pub fn gelu_grad(z: f32) -> f32 {
    0.5 * (1.0 + erf(z * FRAC_1_SQRT_2)) + z * INV_SQRT_2PI * exp(-0.5 * z * z)
}

struct Dims {
    groups: usize,
    gx: usize,
    gb: usize,
    rows: usize,
    n: usize,
}

fn check(x: &Tensor, b: &Tensor) -> Result<Dims> {
    if x.shape().rank() < 2 {
        return Err(Error::invalid(
            OP,
            format!("input must be [groups, ..., features], got {}", x.shape()),
        ));
    }
    expect_rank(OP, b, 2, "bias")?;
    if b.dims()[1] != x.shape().last() {
        return Err(Error::shape(OP, x.shape(), b.shape()));
    }
    same_device(OP, &[x, b])?;
    Ok(Dims {
        groups: broadcast_groups(OP, &[x.shape(), b.shape()])?,
        gx: x.shape().groups(),
        gb: b.dims()[0],
        rows: x.shape().rows_per_group(),
        n: x.shape().last(),
    })
}

/// `f(i, out_row, x_row, b_row)` for every row `i` of the broadcast output.
fn map_rows<F>(out: &mut [f32], xs: &[f32], bs: &[f32], dm: &Dims, f: F)
where
    F: Fn(usize, &mut [f32], &[f32], &[f32]) + Sync,
{
    let (rows, n) = (dm.rows, dm.n);
    out.par_chunks_mut(n).enumerate().for_each(|(i, o)| {
        let (g, row) = (i / rows, i % rows);
        let xr = &xs[(group_index(g, dm.gx) * rows + row) * n..][..n];
        let br = &bs[group_index(g, dm.gb) * n..][..n];
        f(i, o, xr, br);
    });
}

pub fn bias_gelu_forward(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dm = check(x, b)?;
    let dev = x.device();
    let mut y = Tensor::empty_as(
        x.shape().with_groups(dm.groups),
        dev.compute_dtype(),
        MemTag::Activations,
        dev,
    )?;
    if let Some(gpu) = dev.gpu() {
        gpu.bias_gelu_forward(
            &cuda_dims(&dm),
            x.cu_bf16(OP)?,
            b.cu_f32(OP)?,
            y.cu_bf16_mut(OP)?,
        )?;
        return Ok(y);
    }
    map_rows(
        y.as_mut_slice()?,
        x.as_slice()?,
        b.as_slice()?,
        &dm,
        |_, o, x, b| {
            wide(
                #[inline(always)]
                || {
                    for ((o, &x), &b) in o.iter_mut().zip(x).zip(b) {
                        *o = gelu(x + b);
                    }
                },
            )
        },
    );
    Ok(y)
}

#[derive(Debug, Default)]
pub struct BiasGeluGrads {
    pub dx: Option<Tensor>,
    pub db: Option<Tensor>,
}

/// Gradients from the pre-activation input `x` (recomputing `x + b`), not from the output.
pub fn bias_gelu_backward(
    dy: &Tensor,
    x: &Tensor,
    b: &Tensor,
    need_x: bool,
    need_b: bool,
) -> Result<BiasGeluGrads> {
    let dm = check(x, b)?;
    let want = x.shape().with_groups(dm.groups);
    if dy.shape() != &want {
        return Err(Error::shape("bias_gelu_backward", dy.shape(), &want));
    }
    let dev = x.device();
    if let Some(gpu) = dev.gpu() {
        let d = cuda_dims(&dm);
        let (dyb, xb, bf) = (dy.cu_bf16(OP)?, x.cu_bf16(OP)?, b.cu_f32(OP)?);
        let mut dx = need_x
            .then(|| Tensor::empty_as(x.shape().clone(), DType::BF16, MemTag::Workspace, dev))
            .transpose()?;
        // One pass for both gradients where x is not shared (the explicit ensemble's MLPs).
        let fused = dx.is_some() && need_b && dm.gx == dm.groups;
        if let Some(dx) = dx.as_mut().filter(|_| !fused) {
            gpu.bias_gelu_backward_dx(&d, dyb, xb, bf, dx.cu_bf16_mut(OP)?)?;
        }
        let db = need_b
            .then(|| -> Result<Tensor> {
                let mut db = Tensor::empty(b.shape().clone(), MemTag::Workspace, dev)?;
                let mut ws = Tensor::empty(
                    [loren_kernels::bias_gelu_db_workspace_len(&d)],
                    MemTag::Workspace,
                    dev,
                )?;
                let dx = match dx.as_mut().filter(|_| fused) {
                    Some(dx) => Some(dx.cu_bf16_mut(OP)?),
                    None => None,
                };
                gpu.bias_gelu_backward_db(
                    &d,
                    dyb,
                    xb,
                    bf,
                    ws.cu_f32_mut(OP)?,
                    db.cu_f32_mut(OP)?,
                    false,
                    dx.map(|p| p as _),
                )?;
                Ok(db)
            })
            .transpose()?;
        return Ok(BiasGeluGrads { dx, db });
    }
    let dys = dy.as_slice()?;
    let mut dz = Tensor::empty(want, MemTag::Workspace, dev)?;
    let n = dm.n;
    map_rows(
        dz.as_mut_slice()?,
        x.as_slice()?,
        b.as_slice()?,
        &dm,
        |i, o, x, b| {
            let dy = &dys[i * n..][..n];
            wide(
                #[inline(always)]
                || {
                    for (((o, &x), &b), &dy) in o.iter_mut().zip(x).zip(b).zip(dy) {
                        *o = dy * gelu_grad(x + b);
                    }
                },
            )
        },
    );
    let db = need_b
        .then(|| {
            let sums = sum_rows(dz.as_slice()?, dm.groups, dm.rows, dm.n, dm.gb);
            Tensor::from_vec(sums, b.shape().clone(), MemTag::Workspace, dev)
        })
        .transpose()?;
    let dx = need_x.then(|| reduce_to_groups(dz, dm.gx)).transpose()?;
    Ok(BiasGeluGrads { dx, db })
}

fn cuda_dims(dm: &Dims) -> loren_kernels::BiasGeluDims {
    loren_kernels::BiasGeluDims {
        groups: dm.groups,
        x_groups: dm.gx,
        b_groups: dm.gb,
        rows: dm.rows,
        n: dm.n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_grad_is_the_derivative() {
        for z in [-3.0f32, -1.0, -0.2, 0.0, 0.7, 2.5] {
            let h = 1e-2f32;
            let num = (gelu(z + h) as f64 - gelu(z - h) as f64) / (2.0 * h as f64);
            assert!((gelu_grad(z) as f64 - num).abs() < 1e-4, "z={z}");
        }
    }
}
