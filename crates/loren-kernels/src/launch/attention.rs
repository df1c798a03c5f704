//! Launchers for `kernels/attention.cu`: fused multi-head attention, forward and backward.
//!
//! Q, K, V [gq|gk|gv, B, T, D] bf16 (each with 1 or G groups), heads side by side in D = H·dh;
//! O, dO, dQ, dK, dV [G, B, T, D] bf16; LSE, DELTA [G, B, H, T] f32. Scale 1/sqrt(dh).

use crate::bf16;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::{GRID_X, GRID_YZ, grid_dim, groups_ok, int, positive, product};
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu};
use crate::sources::Kernel;

/// The head dims with a compiled kernel.
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
const TILE: usize = 64;
const THREADS: u32 = 128;

/// The kernels (forward, dQ, dK/dV) for head dim `dh`.
pub(crate) fn kernels(dh: usize) -> Option<[Kernel; 3]> {
    use Kernel::*;
    match dh {
        16 => Some([AttentionFwdD16, AttentionBwdDqD16, AttentionBwdDkvD16]),
        32 => Some([AttentionFwdD32, AttentionBwdDqD32, AttentionBwdDkvD32]),
        64 => Some([AttentionFwdD64, AttentionBwdDqD64, AttentionBwdDkvD64]),
        128 => Some([AttentionFwdD128, AttentionBwdDqD128, AttentionBwdDkvD128]),
        _ => None,
    }
}

// Dynamic shared memory, mirroring attn::Smem<DH> in attention.cu: tiles of 64 rows with a row
// stride of dh + 8 bf16, plus 64-float statistics arrays.
pub(crate) const fn fwd_smem(dh: usize) -> usize {
    3 * TILE * (dh + 8) * 2
}
pub(crate) const fn dq_smem(dh: usize) -> usize {
    4 * TILE * (dh + 8) * 2 + TILE * 4
}
pub(crate) const fn dkv_smem(dh: usize) -> usize {
    4 * TILE * (dh + 8) * 2 + 2 * TILE * 4
}

/// The shapes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    /// G, the output group count (members), the largest of the three below.
    pub groups: usize,
    pub q_groups: usize,
    pub k_groups: usize,
    pub v_groups: usize,
    pub batch: usize,
    /// T, the sequence length (designed for 1..=256; any length is correct, longer ones slower).
    pub seq: usize,
    pub heads: usize,
    /// dh: 16, 32, 64 or 128.
    pub head_dim: usize,
}

impl AttentionDims {
    fn check(&self, op: &'static str) -> Result<[Kernel; 3]> {
        positive(op, "groups", self.groups)?;
        positive(op, "batch", self.batch)?;
        positive(op, "seq", self.seq)?;
        positive(op, "heads", self.heads)?;
        groups_ok(op, "Q", self.q_groups, self.groups)?;
        groups_ok(op, "K", self.k_groups, self.groups)?;
        groups_ok(op, "V", self.v_groups, self.groups)?;
        if self.q_groups.max(self.k_groups).max(self.v_groups) != self.groups {
            return Err(KernelError::invalid(
                op,
                format!(
                    "{} output groups, but Q, K, V have {}, {}, {}",
                    self.groups, self.q_groups, self.k_groups, self.v_groups
                ),
            ));
        }
        int(
            op,
            "G·B·T·D",
            product(op, &[self.groups, self.batch, self.seq, self.width()])?,
        )?;
        kernels(self.head_dim).ok_or_else(|| {
            KernelError::invalid(
                op,
                format!("head dim {} has no kernel (16, 32, 64, 128)", self.head_dim),
            )
        })
    }

    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn len(&self, groups: usize) -> usize {
        groups * self.batch * self.seq * self.width()
    }
    fn stats_len(&self) -> usize {
        self.groups * self.batch * self.heads * self.seq
    }

    /// grid (row tiles of 64, heads, G·B), block 128.
    fn cfg(&self, op: &'static str, smem: usize) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (
                grid_dim(op, "row tiles", self.seq.div_ceil(TILE), GRID_X)?,
                grid_dim(op, "heads", self.heads, GRID_YZ)?,
                grid_dim(
                    op,
                    "groups·batch",
                    product(op, &[self.groups, self.batch])?,
                    GRID_YZ,
                )?,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }

    fn args(&self) -> (i32, i32, i32, i32, i32, i32, f32) {
        (
            self.batch as i32,
            self.seq as i32,
            self.heads as i32,
            self.q_groups as i32,
            self.k_groups as i32,
            self.v_groups as i32,
            (1.0 / (self.head_dim as f64).sqrt()) as f32,
        )
    }
}

fn aligned(op: &'static str, ok: bool, what: &str, bytes: u64) -> Result<()> {
    if !ok {
        return Err(KernelError::invalid(
            op,
            format!("{what} must start on a {bytes}-byte boundary"),
        ));
    }
    Ok(())
}

impl Gpu {
    /// `O = softmax(Q·Kᵀ/sqrt(dh))·V` per (group, batch item, head), and the log-sum-exp of each
    /// scaled score row, LSE [G, B, H, T] f32: the only thing the backward keeps besides O.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_forward(
        &self,
        d: &AttentionDims,
        q: &dyn DevicePtr<bf16>,
        k: &dyn DevicePtr<bf16>,
        v: &dyn DevicePtr<bf16>,
        o: &mut dyn DevicePtrMut<bf16>,
        lse: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "attention_forward";
        let [kernel, _, _] = d.check(OP)?;
        let q = self.input(OP, "Q", q, d.len(d.q_groups))?;
        let k = self.input(OP, "K", k, d.len(d.k_groups))?;
        let v = self.input(OP, "V", v, d.len(d.v_groups))?;
        let o = self.output(OP, "O", o, d.len(d.groups))?;
        let lse = self.output(OP, "LSE", lse, d.stats_len())?;
        aligned(
            OP,
            q.aligned(16) && k.aligned(16) && v.aligned(16),
            "Q, K, V",
            16,
        )?;
        aligned(OP, o.aligned(4), "O", 4)?;
        let cfg = d.cfg(OP, fwd_smem(d.head_dim))?;
        let (b, t, h, gq, gk, gv, scale) = d.args();
        self.launch(
            kernel,
            cfg,
            &[
                q.arg(),
                k.arg(),
                v.arg(),
                o.arg(),
                lse.arg(),
                Arg::from(b),
                Arg::from(t),
                Arg::from(h),
                Arg::from(gq),
                Arg::from(gk),
                Arg::from(gv),
                Arg::from(scale),
            ],
        )
    }

    /// The backward, two launches, deterministic: first dQ (which also writes
    /// DELTA = rowsum(dO∘O) into the workspace `delta`, [G, B, H, T] f32), then dK and dV, each
    /// recomputing P from LSE. dQ, dK, dV are written per output group ([G, B, T, D] bf16); for a
    /// broadcast input, reduce them with [`Gpu::sum_groups_bf16`].
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        d: &AttentionDims,
        d_o: &dyn DevicePtr<bf16>,
        q: &dyn DevicePtr<bf16>,
        k: &dyn DevicePtr<bf16>,
        v: &dyn DevicePtr<bf16>,
        o: &dyn DevicePtr<bf16>,
        lse: &dyn DevicePtr<f32>,
        delta: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        dq: &mut dyn DevicePtrMut<bf16>,
        dk: &mut dyn DevicePtrMut<bf16>,
        dv: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "attention_backward";
        let [_, k_dq, k_dkv] = d.check(OP)?;
        let full = d.len(d.groups);
        let d_o = self.input(OP, "dO", d_o, full)?;
        let q = self.input(OP, "Q", q, d.len(d.q_groups))?;
        let k = self.input(OP, "K", k, d.len(d.k_groups))?;
        let v = self.input(OP, "V", v, d.len(d.v_groups))?;
        let o = self.input(OP, "O", o, full)?;
        let lse = self.input(OP, "LSE", lse, d.stats_len())?;
        let dq = self.output(OP, "dQ", dq, full)?;
        let dk = self.output(OP, "dK", dk, full)?;
        let dv = self.output(OP, "dV", dv, full)?;
        aligned(
            OP,
            d_o.aligned(16) && q.aligned(16) && k.aligned(16) && v.aligned(16),
            "dO, Q, K, V",
            16,
        )?;
        aligned(
            OP,
            dq.aligned(4) && dk.aligned(4) && dv.aligned(4),
            "dQ, dK, dV",
            4,
        )?;
        let (b, t, h, gq, gk, gv, scale) = d.args();
        {
            let delta = self.output(OP, "DELTA", delta, d.stats_len())?;
            let cfg = d.cfg(OP, dq_smem(d.head_dim))?;
            self.launch(
                k_dq,
                cfg,
                &[
                    d_o.arg(),
                    q.arg(),
                    k.arg(),
                    v.arg(),
                    o.arg(),
                    lse.arg(),
                    delta.arg(),
                    dq.arg(),
                    Arg::from(b),
                    Arg::from(t),
                    Arg::from(h),
                    Arg::from(gq),
                    Arg::from(gk),
                    Arg::from(gv),
                    Arg::from(scale),
                ],
            )?;
        }
        let delta = self.input(OP, "DELTA", &*delta, d.stats_len())?;
        let cfg = d.cfg(OP, dkv_smem(d.head_dim))?;
        self.launch(
            k_dkv,
            cfg,
            &[
                d_o.arg(),
                q.arg(),
                k.arg(),
                v.arg(),
                lse.arg(),
                delta.arg(),
                dk.arg(),
                dv.arg(),
                Arg::from(b),
                Arg::from(t),
                Arg::from(h),
                Arg::from(gq),
                Arg::from(gk),
                Arg::from(gv),
                Arg::from(scale),
            ],
        )
    }
}
