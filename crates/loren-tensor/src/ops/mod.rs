//! The ops, one module per family. Each public function checks shapes and devices, allocates its
//! outputs and runs the CPU code beside it, which is the reference for the matching CUDA kernel.
//!
//! Group broadcasting: dimension 0 is the group axis. An op given tensors whose groups are 1 and
//! M computes M output groups, reading the group-1 tensor for every one of them. In backward the
//! gradient of a group-1 input is the sum over the M groups.

pub mod activation;
pub mod attention;
pub mod dropkey;
pub mod elementwise;
pub mod embed;
pub mod gemm;
pub mod linear;
pub mod lora;
pub mod loss;
pub mod math;
pub mod norm;
pub mod optim;

use crate::error::{Error, Result};
use crate::shape::Shape;
use crate::tensor::Tensor;

/// The output group count of tensors with the given groups: each must be 1 or the largest.
pub(crate) fn broadcast_groups(op: &'static str, shapes: &[&Shape]) -> Result<usize> {
    let g = shapes.iter().map(|s| s.groups()).max().unwrap_or(1);
    for s in shapes {
        if s.groups() != 1 && s.groups() != g {
            let other = shapes.iter().find(|t| t.groups() == g).unwrap_or(s);
            return Err(Error::shape(op, s, other));
        }
    }
    Ok(g)
}

/// Which slice of a tensor with `groups` groups output group `g` reads.
#[inline]
pub(crate) fn group_index(g: usize, groups: usize) -> usize {
    if groups == 1 { 0 } else { g }
}

/// Require that the tensors all live on one device.
pub(crate) fn same_device(op: &'static str, tensors: &[&Tensor]) -> Result<()> {
    if let Some((first, rest)) = tensors.split_first() {
        for t in rest {
            first.same_device(t, op)?;
        }
    }
    Ok(())
}

/// Require that the tensors share one dtype, and return it.
pub(crate) fn same_dtype(op: &'static str, tensors: &[&Tensor]) -> Result<crate::dtype::DType> {
    let d = tensors
        .first()
        .map(|t| t.dtype())
        .unwrap_or(crate::dtype::DType::F32);
    match tensors.iter().find(|t| t.dtype() != d) {
        Some(t) => Err(Error::invalid(
            op,
            format!("mixed dtypes: {} and {}", d.name(), t.dtype().name()),
        )),
        None => Ok(d),
    }
}

/// Require an exact rank.
/// Check a residual an op adds to its output of shape `out`: the output's shape with 1 group (a
/// stream the members share) or the output's, on x's device; and on a GPU the output's dtype.
pub(crate) fn check_residual(
    op: &'static str,
    residual: Option<&Tensor>,
    x: &Tensor,
    out: &Shape,
    out_dtype: crate::dtype::DType,
) -> Result<()> {
    let Some(res) = residual else { return Ok(()) };
    let g = res.shape().groups();
    if (g != 1 && g != out.groups()) || &res.shape().with_groups(out.groups()) != out {
        return Err(Error::shape(op, res.shape(), out));
    }
    same_device(op, &[x, res])?;
    if x.device().gpu().is_some() && res.dtype() != out_dtype {
        return Err(Error::invalid(
            op,
            "the residual must have the output's dtype",
        ));
    }
    Ok(())
}

/// Check a gradient a backward adds into the dx it forms: dx must be wanted, and the gradient
/// have x's shape and device.
pub(crate) fn check_dx_plus(
    op: &'static str,
    dx_plus: Option<&Tensor>,
    need_dx: bool,
    x_shape: &Shape,
    on: &Tensor,
) -> Result<()> {
    let Some(p) = dx_plus else { return Ok(()) };
    if !need_dx {
        return Err(Error::invalid(
            op,
            "a gradient to add into dx, but no dx wanted",
        ));
    }
    if p.shape() != x_shape {
        return Err(Error::shape(op, p.shape(), x_shape));
    }
    same_device(op, &[on, p])
}

pub(crate) fn expect_rank(op: &'static str, t: &Tensor, rank: usize, what: &str) -> Result<()> {
    if t.shape().rank() != rank {
        return Err(Error::invalid(
            op,
            format!("{what} must have rank {rank}, got shape {}", t.shape()),
        ));
    }
    Ok(())
}
