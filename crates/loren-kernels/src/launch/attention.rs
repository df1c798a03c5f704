//! Launchers for `kernels/attention.cu`: fused multi-head attention, forward and backward.
//!
//! Q, K, V [gq|gk|gv, B, T, D] bf16 (each with 1 or G groups), heads side by side in D = H·dh;
//! O, dO, dQ, dK, dV [G, B, T, D] bf16; LSE, DELTA [G, B, H, T] f32. Scale 1/sqrt(dh).
//! With an [`AttentionDrop`], scores drop before the softmax (DropKey), drawn per output group:
//! see `loren_tensor::ops::dropkey`, whose hashes the kernels compute bit for bit.

use crate::bf16;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

use super::{GRID_X, GRID_YZ, grid_dim, groups_ok, int, positive, product};
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu, Ptr};
use crate::sources::Kernel;

/// The head dims with a compiled kernel.
pub const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];
const TILE: usize = 64;
const THREADS: u32 = 128;

/// The kernels (forward, dQ, dK/dV) for head dim `dh`, with DropKey or without.
pub(crate) fn kernels(dh: usize, drop: bool) -> Option<[Kernel; 3]> {
    use Kernel::*;
    Some(match (dh, drop) {
        (16, false) => [AttentionFwdD16, AttentionBwdDqD16, AttentionBwdDkvD16],
        (32, false) => [AttentionFwdD32, AttentionBwdDqD32, AttentionBwdDkvD32],
        (64, false) => [AttentionFwdD64, AttentionBwdDqD64, AttentionBwdDkvD64],
        (128, false) => [AttentionFwdD128, AttentionBwdDqD128, AttentionBwdDkvD128],
        (16, true) => [
            AttentionFwdDropkeyD16,
            AttentionBwdDqDropkeyD16,
            AttentionBwdDkvDropkeyD16,
        ],
        (32, true) => [
            AttentionFwdDropkeyD32,
            AttentionBwdDqDropkeyD32,
            AttentionBwdDkvDropkeyD32,
        ],
        (64, true) => [
            AttentionFwdDropkeyD64,
            AttentionBwdDqDropkeyD64,
            AttentionBwdDkvDropkeyD64,
        ],
        (128, true) => [
            AttentionFwdDropkeyD128,
            AttentionBwdDqDropkeyD128,
            AttentionBwdDkvDropkeyD128,
        ],
        _ => return None,
    })
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
    4 * TILE * (dh + 8) * 2 + 3 * TILE * 4
}

/// DropKey's draw: a score drops when its hash is below `threshold` (0: none drops).
#[derive(Clone, Copy, Debug)]
pub struct AttentionDrop<'a> {
    pub threshold: u32,
    pub seed: u64,
    /// Each batch row's item, [B] (row b draws item `items[b]`'s masks); without them row b is
    /// item b.
    pub items: Option<&'a CudaSlice<u64>>,
}

/// The shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims<'a> {
    /// G, the output group count (members): the largest of the three below, or with `drop`,
    /// the members drawing masks, whatever the inputs' groups.
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
    pub drop: Option<AttentionDrop<'a>>,
}

impl AttentionDims<'_> {
    fn check(&self, op: &'static str) -> Result<[Kernel; 3]> {
        positive(op, "groups", self.groups)?;
        positive(op, "batch", self.batch)?;
        positive(op, "seq", self.seq)?;
        positive(op, "heads", self.heads)?;
        groups_ok(op, "Q", self.q_groups, self.groups)?;
        groups_ok(op, "K", self.k_groups, self.groups)?;
        groups_ok(op, "V", self.v_groups, self.groups)?;
        let inputs = self.q_groups.max(self.k_groups).max(self.v_groups);
        if inputs != self.groups && !(self.drop.is_some() && inputs == 1) {
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
        kernels(self.head_dim, self.drop.is_some()).ok_or_else(|| {
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

    /// The launches of one kernel, each with the first sequence (g·B + b) it takes: grid (row
    /// tiles of 64, heads, sequences), block 128. G·B may pass the 65535 sequences grid z holds
    /// (256 members scoring a batch of 256), so they go 65535 to a launch.
    fn launches(&self, op: &'static str, smem: usize) -> Result<Vec<(LaunchConfig, i32)>> {
        let (tiles, heads) = (
            grid_dim(op, "row tiles", self.seq.div_ceil(TILE), GRID_X)?,
            grid_dim(op, "heads", self.heads, GRID_YZ)?,
        );
        let sequences = product(op, &[self.groups, self.batch])?;
        Ok((0..sequences)
            .step_by(GRID_YZ)
            .map(|gb0| {
                let cfg = LaunchConfig {
                    grid_dim: (tiles, heads, (sequences - gb0).min(GRID_YZ) as u32),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                (cfg, gb0 as i32)
            })
            .collect())
    }

    /// The item keys' pointer for DropKey's kernels (null without keys), checked against B.
    fn items<'s>(&'s self, gpu: &'s Gpu, op: &'static str) -> Result<Ptr<'s>> {
        let items = self.drop.and_then(|d| d.items);
        gpu.input_opt(op, "item keys", items.map(|k| k as _), self.batch)
    }

    /// The scalar arguments every attention kernel ends with, for the launch whose first sequence
    /// is `gb0`: DropKey's threshold, seed and item keys last, for its kernels.
    fn args(&self, items: &Ptr, gb0: i32) -> Vec<Arg> {
        let mut args = vec![
            Arg::from(self.batch as i32),
            Arg::from(self.seq as i32),
            Arg::from(self.heads as i32),
            Arg::from(self.q_groups as i32),
            Arg::from(self.k_groups as i32),
            Arg::from(self.v_groups as i32),
            Arg::from(gb0),
            Arg::from((1.0 / (self.head_dim as f64).sqrt()) as f32),
        ];
        if let Some(drop) = self.drop {
            args.extend([Arg::from(drop.threshold), Arg::from(drop.seed), items.arg()]);
        }
        args
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
        let items = d.items(self, OP)?;
        let ptrs = [q.arg(), k.arg(), v.arg(), o.arg(), lse.arg()];
        for (cfg, gb0) in d.launches(OP, fwd_smem(d.head_dim))? {
            self.launch(kernel, cfg, &[&ptrs[..], &d.args(&items, gb0)].concat())?;
        }
        Ok(())
    }

    /// The backward, two kernels, deterministic: first dQ (which also writes
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
        let items = d.items(self, OP)?;
        {
            let delta = self.output(OP, "DELTA", delta, d.stats_len())?;
            let ptrs = [
                d_o.arg(),
                q.arg(),
                k.arg(),
                v.arg(),
                o.arg(),
                lse.arg(),
                delta.arg(),
                dq.arg(),
            ];
            for (cfg, gb0) in d.launches(OP, dq_smem(d.head_dim))? {
                self.launch(k_dq, cfg, &[&ptrs[..], &d.args(&items, gb0)].concat())?;
            }
        }
        let delta = self.input(OP, "DELTA", &*delta, d.stats_len())?;
        let ptrs = [
            d_o.arg(),
            q.arg(),
            k.arg(),
            v.arg(),
            lse.arg(),
            delta.arg(),
            dk.arg(),
            dv.arg(),
        ];
        for (cfg, gb0) in d.launches(OP, dkv_smem(d.head_dim))? {
            self.launch(k_dkv, cfg, &[&ptrs[..], &d.args(&items, gb0)].concat())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(groups: usize, batch: usize, seq: usize, heads: usize) -> AttentionDims<'static> {
        AttentionDims {
            groups,
            q_groups: groups,
            k_groups: groups,
            v_groups: groups,
            batch,
            seq,
            heads,
            head_dim: 16,
            drop: None,
        }
    }

    fn grids(d: &AttentionDims) -> Vec<((u32, u32, u32), i32)> {
        let launches = d.launches("test", 0).expect("launches");
        launches.iter().map(|(c, gb0)| (c.grid_dim, *gb0)).collect()
    }

    /// 256 members scoring a batch of 256 (the default --eval-batch-size) are 65536 sequences,
    /// one past what grid z holds: two launches, the second from sequence 65535.
    #[test]
    fn sequences_past_65535_take_a_second_launch() {
        assert_eq!(grids(&dims(3, 2, 130, 5)), [((3, 5, 6), 0)]);
        assert_eq!(
            grids(&dims(256, 256, 17, 4)),
            [((1, 4, 65535), 0), ((1, 4, 1), 65535)]
        );
        assert_eq!(
            grids(&dims(3, 65535, 197, 2)),
            [
                ((4, 2, 65535), 0),
                ((4, 2, 65535), 65535),
                ((4, 2, 65535), 131070)
            ]
        );
    }

    /// Each launch's kernels are told the first sequence it takes (`gb0`, after gv, before the
    /// scale, as attention.cu's entries take it), else the second launch would redo the
    /// first's sequences and leave the rest unwritten; only a GPU test at 65536 sequences would
    /// see it, and the emulator skips that one.
    #[test]
    fn each_launch_passes_its_first_sequence_to_the_kernels() {
        let d = dims(256, 256, 17, 4);
        let (b, t, h, g) = (Arg::I32(256), Arg::I32(17), Arg::I32(4), Arg::I32(256));
        let scale = Arg::F32(0.25);
        let null = Ptr::null();
        let args: Vec<Vec<Arg>> = d
            .launches("test", 0)
            .unwrap()
            .iter()
            .map(|&(_, gb0)| d.args(&null, gb0))
            .collect();
        assert_eq!(
            args,
            [
                [b, t, h, g, g, g, Arg::I32(0), scale],
                [b, t, h, g, g, g, Arg::I32(65535), scale]
            ]
        );
        // DropKey's threshold, seed and item keys follow.
        let drop = AttentionDims {
            q_groups: 1,
            drop: Some(AttentionDrop {
                threshold: 9,
                seed: 5,
                items: None,
            }),
            ..d
        };
        assert_eq!(
            drop.args(&null, 65535),
            [
                b,
                t,
                h,
                Arg::I32(1),
                g,
                g,
                Arg::I32(65535),
                scale,
                Arg::U32(9),
                Arg::U64(5),
                Arg::U64(0)
            ]
        );
    }
}
