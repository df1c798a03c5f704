//! The typed launchers, one `impl Gpu` block per kernel file. Each launcher states the exact
//! semantics, validates dimensions and buffer lengths (returning [`KernelError::Invalid`] instead
//! of launching out of bounds), computes the launch shape beside the call, and enqueues without
//! synchronising.
//!
//! Buffers are passed as `&dyn DevicePtr<T>` (read) and `&mut dyn DevicePtrMut<T>` (written), so a
//! `CudaSlice<T>`, a `CudaView<T>` or a `CudaViewMut<T>` all work. Lengths must be at least what
//! the shapes need. Element types: `bf16` (this crate's, the bits of `half::bf16`) for activations and frozen weights, `f32` for
//! trainable parameters, gradients, optimizer state and statistics.

pub mod activation;
pub mod attention;
pub mod blas;
pub mod elementwise;
pub mod embed;
pub mod lora;
pub mod loss;
pub mod norm;
pub mod optim;

use cudarc::driver::LaunchConfig;

use crate::error::{KernelError, Result};
use crate::gpu::Ptr;
use crate::sources::Kernel;

/// Threads per block of the elementwise and row kernels. Their block reductions are written for
/// exactly this many (`part[256]` trees, `red[8]` warp rows, `__launch_bounds__(256)`).
pub(crate) const BLOCK: u32 = 256;

/// Rows per first-stage chunk of the two-stage column sums (bias, LayerNorm and embedding
/// gradients). A constant, so the summation order depends on the shapes alone.
pub const CHUNK_ROWS: usize = 256;

/// `v` as the kernels' `int`.
pub(crate) fn int(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| KernelError::invalid(op, format!("{what} = {v} exceeds i32")))
}

/// Require `v >= 1`.
pub(crate) fn positive(op: &'static str, what: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(KernelError::invalid(
            op,
            format!("{what} must be at least 1"),
        ));
    }
    Ok(())
}

/// Require a group count of 1 or `groups`.
pub(crate) fn groups_ok(op: &'static str, what: &str, g: usize, groups: usize) -> Result<()> {
    if g != 1 && g != groups {
        return Err(KernelError::invalid(
            op,
            format!("{what} has {g} groups; must be 1 or {groups}"),
        ));
    }
    Ok(())
}

/// `a · b · ...` with overflow reported as an error.
pub(crate) fn product(op: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| KernelError::invalid(op, format!("{dims:?} overflows")))
}

/// A grid dimension, checked against the hardware limit (`y` and `z` are at most 65535).
pub(crate) fn grid_dim(op: &'static str, what: &str, v: usize, limit: usize) -> Result<u32> {
    if v == 0 || v > limit {
        return Err(KernelError::invalid(
            op,
            format!("{what} needs {v} blocks; the limit is {limit}"),
        ));
    }
    Ok(v as u32)
}

pub(crate) const GRID_X: usize = i32::MAX as usize;
pub(crate) const GRID_YZ: usize = 65535;

/// The widths and pointers a memory-bound kernel may move in 16-byte vectors of 8 elements (its
/// `vec` argument): every row width a multiple of 8 and every pointer 16-byte aligned.
pub(crate) fn vec8(widths: &[usize], ptrs: &[&Ptr]) -> i32 {
    (widths.iter().all(|w| w.is_multiple_of(8)) && ptrs.iter().all(|p| p.aligned(16))) as i32
}

/// A grid-stride launch over `groups` groups of `per` elements each, `vec` elements per thread:
/// blockIdx.y is the group (the kernels need no division to find it), x strides within it. At
/// most 65536 blocks in all, so the kernels loop.
pub(crate) fn grouped_cfg(
    op: &'static str,
    groups: usize,
    per: usize,
    vec: i32,
) -> Result<LaunchConfig> {
    let mut cfg = vec_cfg(per, vec);
    cfg.grid_dim.0 = cfg.grid_dim.0.min(((1usize << 16) / groups).max(1) as u32);
    cfg.grid_dim.1 = grid_dim(op, "groups", groups, GRID_YZ)?;
    Ok(cfg)
}

/// The first stage of a two-stage column sum over `cols` columns: block (column strip, row chunk,
/// output group), lanes = columns (8 each when `vec` is 1, so a strip is 256 columns; else 32),
/// warps = rows.
pub(crate) fn strip_cfg(
    op: &'static str,
    cols: usize,
    chunks: usize,
    groups: usize,
    vec: i32,
) -> Result<LaunchConfig> {
    let strip = if vec == 1 { 32 * 8 } else { 32 };
    Ok(LaunchConfig {
        grid_dim: (
            grid_dim(op, "column strips", cols.div_ceil(strip), GRID_X)?,
            grid_dim(op, "row chunks", chunks, GRID_YZ)?,
            grid_dim(op, "output groups", groups, GRID_YZ)?,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// A 1-D grid-stride launch over `n` elements, 8 per thread when `vec` is 1.
pub(crate) fn vec_cfg(n: usize, vec: i32) -> LaunchConfig {
    elementwise_cfg(if vec == 1 { n.div_ceil(8) } else { n })
}

/// A 1-D grid-stride launch over `n` elements (at most 65536 blocks; the kernels loop).
pub(crate) fn elementwise_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Every kernel that takes dynamic shared memory, and the most it asks for; `Gpu::new` raises
/// each kernel's limit to this (past the default 48 KiB where needed).
pub(crate) fn dynamic_smem() -> Vec<(Kernel, usize)> {
    let mut v: Vec<(Kernel, usize)> = [
        Kernel::LoraFwdGemm,
        Kernel::LoraFwdGemmPrefix,
        Kernel::LoraBwdDxGemm,
        Kernel::LoraBwdDxGemmPrefix,
    ]
    .into_iter()
    .map(|k| (k, lora::GEMM_SMEM))
    .collect();
    for k in [
        Kernel::LoraFwdWgmma,
        Kernel::LoraFwdWgmmaPrefix,
        Kernel::LoraBwdDxWgmma,
        Kernel::LoraBwdDxWgmmaPrefix,
    ] {
        v.push((k, lora::WGMMA_SMEM));
    }
    for dh in attention::HEAD_DIMS {
        for drop in [false, true] {
            let [fwd, dq, dkv] = attention::kernels(dh, drop).expect("a supported head dim");
            v.push((fwd, attention::fwd_smem(dh)));
            v.push((dq, attention::dq_smem(dh)));
            v.push((dkv, attention::dkv_smem(dh)));
        }
    }
    v
}
