//! Residual adds, gradient accumulation and reductions over the group axis.

use rayon::prelude::*;

use super::{broadcast_groups, same_device, same_dtype};
use crate::device::Booked;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::tensor::Tensor;

const PAR_MIN: usize = 1 << 14;

/// `a + b`, broadcasting a group of 1 (the residual add where the stream turns per-member).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    const OP: &str = "add";
    same_device(OP, &[a, b])?;
    let groups = broadcast_groups(OP, &[a.shape(), b.shape()])?;
    if a.dims()[1..] != b.dims()[1..] {
        return Err(Error::shape(OP, a.shape(), b.shape()));
    }
    let dtype = same_dtype(OP, &[a, b])?;
    let per = a.numel() / a.shape().groups().max(1);
    let mut out = Tensor::empty_as(
        a.shape().with_groups(groups),
        dtype,
        MemTag::Activations,
        a.device(),
    )?;
    let (ga, gb) = (a.shape().groups(), b.shape().groups());
    if let Some(gpu) = a.device().gpu() {
        match dtype {
            DType::BF16 => gpu.add_bf16(
                per,
                groups,
                ga,
                gb,
                a.cu_bf16(OP)?,
                b.cu_bf16(OP)?,
                out.cu_bf16_mut(OP)?,
            )?,
            DType::F32 => gpu.add_f32(
                per,
                groups,
                ga,
                gb,
                a.cu_f32(OP)?,
                b.cu_f32(OP)?,
                out.cu_f32_mut(OP)?,
            )?,
        }
        return Ok(out);
    }
    let (av, bv) = (a.as_slice()?, b.as_slice()?);
    out.as_mut_slice()?
        .par_chunks_mut(per)
        .enumerate()
        .for_each(|(g, o)| {
            let x = &av[super::group_index(g, ga) * per..][..per];
            let y = &bv[super::group_index(g, gb) * per..][..per];
            for ((o, x), y) in o.iter_mut().zip(x).zip(y) {
                *o = x + y;
            }
        });
    Ok(out)
}

/// `dst += src`, same shapes.
pub fn add_assign(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    const OP: &str = "add_assign";
    if dst.shape() != src.shape() {
        return Err(Error::shape(OP, dst.shape(), src.shape()));
    }
    same_device(OP, &[dst, src])?;
    let n = dst.numel();
    if let Some(gpu) = src.device().gpu() {
        match same_dtype(OP, &[dst, src])? {
            DType::BF16 => gpu.add_assign_bf16(n, dst.cu_bf16_mut(OP)?, src.cu_bf16(OP)?)?,
            DType::F32 => gpu.add_assign_f32(n, dst.cu_f32_mut(OP)?, src.cu_f32(OP)?)?,
        }
        return Ok(());
    }
    let s = src.as_slice()?;
    let d = dst.as_mut_slice()?;
    if d.len() >= PAR_MIN {
        d.par_chunks_mut(PAR_MIN)
            .zip(s.par_chunks(PAR_MIN))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
    } else {
        d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    }
    Ok(())
}

/// `t *= alpha`, in place.
pub fn scale_(t: &mut Tensor, alpha: f32) -> Result<()> {
    const OP: &str = "scale";
    if let Some(gpu) = t.device().gpu().cloned() {
        let n = t.numel();
        match t.dtype() {
            DType::BF16 => gpu.scale_bf16(n, t.cu_bf16_mut(OP)?, alpha)?,
            DType::F32 => gpu.scale_f32(n, t.cu_f32_mut(OP)?, alpha)?,
        }
        return Ok(());
    }
    t.as_mut_slice()?.par_iter_mut().for_each(|v| *v *= alpha);
    Ok(())
}

/// Sum over the group axis, keeping it with size 1: the gradient of a broadcast input.
pub fn sum_groups(t: &Tensor) -> Result<Tensor> {
    const OP: &str = "sum_groups";
    let g = t.shape().groups();
    let per = t.numel() / g.max(1);
    if let Some(gpu) = t.device().gpu() {
        let mut out = Tensor::empty_as(
            t.shape().with_groups(1),
            t.dtype(),
            MemTag::Workspace,
            t.device(),
        )?;
        match t.dtype() {
            DType::BF16 => gpu.sum_groups_bf16(per, g, t.cu_bf16(OP)?, out.cu_bf16_mut(OP)?)?,
            DType::F32 => gpu.sum_groups_f32(per, g, t.cu_f32(OP)?, out.cu_f32_mut(OP)?)?,
        }
        return Ok(out);
    }
    let mut out = Tensor::zeros(t.shape().with_groups(1), MemTag::Workspace, t.device())?;
    let src = t.as_slice()?;
    let o = out.as_mut_slice()?;
    // Fixed order over groups, so the result does not depend on the thread count.
    o.par_chunks_mut(4096).enumerate().for_each(|(c, oc)| {
        let start = c * 4096;
        for gi in 0..g {
            let s = &src[gi * per + start..][..oc.len()];
            oc.iter_mut().zip(s).for_each(|(o, s)| *o += s);
        }
    });
    Ok(out)
}

/// Reduce a gradient to the group count of the input it belongs to.
pub fn reduce_to_groups(t: Tensor, groups: usize) -> Result<Tensor> {
    if t.shape().groups() == groups {
        Ok(t)
    } else {
        sum_to_groups(&t, groups)
    }
}

/// A gradient of more groups summed to `groups`: over all of them, into the one group of an
/// input the members shared.
pub fn sum_to_groups(t: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        sum_groups(t)
    } else {
        Err(Error::invalid(
            "reduce_to_groups",
            format!("cannot reduce {} to {groups} groups", t.shape()),
        ))
    }
}

/// Sum of squares of all elements, in f64 (read back from a GPU: it waits).
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    const OP: &str = "sum_squares";
    if let Some(gpu) = t.device().gpu() {
        let x = t.copy_as(DType::F32, MemTag::Workspace)?;
        let n = t.numel();
        let stream = gpu.stream();
        let len = loren_kernels::sum_squares_partials_len(n);
        let mut partials = stream
            .alloc_zeros::<f64>(len)
            .map_err(crate::tensor::cuda(OP))?;
        let mut out = stream
            .alloc_zeros::<f64>(1)
            .map_err(crate::tensor::cuda(OP))?;
        let _booked = Booked::new(t.device(), MemTag::Workspace, 8 * (len as u64 + 1));
        gpu.sum_squares_f32(n, x.cu_f32(OP)?, &mut partials, &mut out)?;
        return Ok(stream.clone_dtoh(&out).map_err(crate::tensor::cuda(OP))?[0]);
    }
    Ok(t.as_slice()?
        .par_chunks(4096)
        .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .collect::<Vec<_>>()
        .iter()
        .sum())
}

/// Whether every element is finite (read back from a GPU).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if t.device().gpu().is_some() {
        return Ok(t.to_vec()?.iter().all(|v| v.is_finite()));
    }
    Ok(t.as_slice()?.par_iter().all(|v| v.is_finite()))
}

/// Rows per partial sum in [`sum_rows`].
const ROW_BLOCK: usize = 256;

/// Sum the rows of `src`, laid out [groups, rows, n], into [out_groups, n]: per group when
/// `out_groups == groups`, over every group's rows when `out_groups == 1`.
///
/// Rows are summed in fixed blocks that are then added in order, so the result does not depend on
/// the thread count: training resumes bit-exactly.
pub(crate) fn sum_rows(
    src: &[f32],
    groups: usize,
    rows: usize,
    n: usize,
    out_groups: usize,
) -> Vec<f32> {
    sum_rows_by(groups, rows, n, out_groups, |i, acc| {
        acc.iter_mut()
            .zip(&src[i * n..][..n])
            .for_each(|(a, v)| *a += v)
    })
}

/// [`sum_rows`] of rows that are made as they are summed: `add_row(i, acc)` adds row `i` (of
/// all `groups · rows`) into `acc`, element by element. The additions come in `sum_rows`'s
/// order, so a row made as `add_row` adds it sums to the same bits as one read from memory,
/// without a buffer of them all.
pub(crate) fn sum_rows_by(
    groups: usize,
    rows: usize,
    n: usize,
    out_groups: usize,
    add_row: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    debug_assert!(out_groups == groups || out_groups == 1);
    let per_out = if out_groups == 1 { groups * rows } else { rows };
    let mut out = vec![0.0f32; out_groups * n];
    for (og, o) in out.chunks_mut(n).enumerate() {
        let first = og * per_out;
        let blocks: Vec<usize> = (first..first + per_out).step_by(ROW_BLOCK).collect();
        let partials: Vec<Vec<f32>> = blocks
            .par_iter()
            .map(|&start| {
                let mut acc = vec![0.0f32; n];
                for i in start..(start + ROW_BLOCK).min(first + per_out) {
                    add_row(i, &mut acc);
                }
                acc
            })
            .collect();
        for p in &partials {
            o.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
    }
    out
}
