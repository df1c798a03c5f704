//! Launchers for `kernels/lora.cu`: the LoRA-Ensemble projection over all members at once.
//!
//! Shapes (row-major; M members, gx = 1 for the shared-input prefix or M):
//! X [gx, rows, K] bf16, W [N, K] bf16, bias [N] bf16, A [M, r, K] f32, B [M, N, r] f32,
//! Y, dY [M, rows, N] bf16, U, V [M, rows, r] f32, dX [gx, rows, K] bf16, dA, dB like A, B.

use crate::bf16;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::{GRID_X, GRID_YZ, grid_dim, groups_ok, int, positive, product, vec8};
use crate::compile::Arch;
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu, Ptr};
use crate::sources::Kernel;

/// Dynamic shared memory of the fused GEMMs: 3 stages × (128×40 + 128×40) bf16. Mirrors
/// `MmaSync::SMEM_BYTES` in lora.cu (a static_assert there pins the number).
pub const GEMM_SMEM: usize = 61440;
/// Dynamic shared memory of the wgmma GEMMs: 3 stages × (128×64 + 128×64) bf16, and 1024 bytes
/// to align them. Mirrors `Wgmma::SMEM_BYTES` in lora.cu.
pub const WGMMA_SMEM: usize = 99328;

const GEMM_TILE: usize = 128;
const GEMM_THREADS: u32 = 256;

/// The largest adapter rank the launchers accept.
pub const MAX_RANK: usize = 1024;

/// The shapes of one LoRA projection call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraDims {
    /// M, the ensemble size.
    pub members: usize,
    /// Groups of X and dX: 1 (one input shared by all members) or M.
    pub x_groups: usize,
    /// Rows per member (B·T).
    pub rows: usize,
    /// Input features K (d_in).
    pub k: usize,
    /// Output features N (d_out).
    pub n: usize,
    /// Adapter rank r.
    pub rank: usize,
}

impl LoraDims {
    fn check(&self, op: &'static str) -> Result<()> {
        positive(op, "members", self.members)?;
        positive(op, "rows", self.rows)?;
        positive(op, "K", self.k)?;
        positive(op, "N", self.n)?;
        positive(op, "rank", self.rank)?;
        if self.rank > MAX_RANK {
            return Err(KernelError::invalid(
                op,
                format!("rank {} exceeds {MAX_RANK}", self.rank),
            ));
        }
        groups_ok(op, "X", self.x_groups, self.members)?;
        // Every index the kernels form in `int` stays below these.
        int(op, "members·rows", product(op, &[self.members, self.rows])?)?;
        int(op, "rank·K", product(op, &[self.rank, self.k])?)?;
        int(op, "N·rank", product(op, &[self.n, self.rank])?)?;
        Ok(())
    }

    fn x_len(&self) -> usize {
        self.x_groups * self.rows * self.k
    }
    fn y_len(&self) -> usize {
        self.members * self.rows * self.n
    }
    fn u_len(&self) -> usize {
        self.members * self.rows * self.rank
    }
    fn a_len(&self) -> usize {
        self.members * self.rank * self.k
    }
    fn b_len(&self) -> usize {
        self.members * self.n * self.rank
    }
    fn prefix(&self) -> bool {
        self.x_groups == 1 && self.members > 1
    }
    fn row_tiles(&self) -> usize {
        self.rows.div_ceil(GEMM_TILE)
    }
}

/// Where [`Gpu::lora_grads`] writes: dA and dB, and the partial sums of its row ranges.
pub struct AdapterGrads<'a> {
    /// [M, r, K] f32.
    pub da: &'a mut dyn DevicePtrMut<f32>,
    /// [M, N, r] f32.
    pub db: &'a mut dyn DevicePtrMut<f32>,
    /// [`lora_grads_workspace_len`] f32; needed only where that is not 0.
    pub workspace: Option<&'a mut dyn DevicePtrMut<f32>>,
}

/// Blocks that fill an H100 or H200 (132 SMs) about twice, where dA and dB give that many.
const GRADS_TARGET_BLOCKS: usize = 264;
/// The fewest rows a range of dA and dB's reduction sums: shorter ones would spend more on their
/// partial sums than they save.
const GRADS_MIN_RANGE: usize = 128;
/// The reduction's slab (lowrank::BK in lora.cu): ranges are whole slabs.
const GRADS_SLAB: usize = 32;

/// How [`Gpu::lora_grads`] cuts the rows it sums over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradsSplit {
    /// Row ranges, each summed by its own blocks (1: no partial sums).
    pub splits: usize,
    /// Rows per range (the last may have fewer), a multiple of 32.
    pub rows: usize,
}

impl GradsSplit {
    fn workspace_len(&self, d: &LoraDims) -> usize {
        match self.splits {
            1 => 0,
            s => s * (d.a_len() + d.b_len()),
        }
    }
}

/// The row ranges of dA and dB's sums: few members give few output tiles (24 blocks at M = 1 for
/// a 768-wide projection, on a GPU of 132 SMs), so the rows are cut until the blocks fill the
/// GPU, in ranges of at least 128 rows. The cut depends on the shapes alone, so every device
/// forms the same sums.
pub fn lora_grads_split(d: &LoraDims) -> GradsSplit {
    let tiles = grads_tiles(d) * d.rank.div_ceil(32) * d.members;
    let wanted = GRADS_TARGET_BLOCKS.div_ceil(tiles.max(1));
    let splits = wanted.min(d.rows / GRADS_MIN_RANGE).max(1);
    let rows = d.rows.div_ceil(splits).next_multiple_of(GRADS_SLAB);
    GradsSplit {
        splits: d.rows.div_ceil(rows).max(1),
        rows,
    }
}

/// dA's and dB's output tiles of 64 (lowrank::BI in lora.cu) for one member and 32 ranks: the
/// launch grid's x extent per member and range.
fn grads_tiles(d: &LoraDims) -> usize {
    d.k.div_ceil(64) + d.n.div_ceil(64)
}

/// The f32 workspace [`Gpu::lora_grads`] needs for its partial sums (0: none).
pub fn lora_grads_workspace_len(d: &LoraDims) -> usize {
    lora_grads_split(d).workspace_len(d)
}

/// The tensor-core path of the fused GEMMs (the forward's Y and the backward's dX). Both compute
/// the same products in the same precision (bf16 operands, f32 accumulators) with the same tiles,
/// grid and arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPath {
    /// `mma.sync` m16n8k16 fed by `ldmatrix`: every arch from sm_80.
    MmaSync,
    /// Hopper's `wgmma` m64n128k16 on 128-byte-swizzled shared memory: sm_90a builds only.
    Wgmma,
}

impl GemmPath {
    /// The path for a build for `arch`: wgmma where the build has it and `LOREN_WGMMA=1` asks for
    /// it. It stays opt-in until the wgmma kernels have passed their parity tests on a Hopper GPU
    /// (they pass on the CPU emulator); `LOREN_WGMMA=0` or unset keeps mma.sync.
    pub fn choose(arch: Arch) -> GemmPath {
        let asked = std::env::var("LOREN_WGMMA").is_ok_and(|v| v == "1");
        if asked && Kernel::LoraFwdWgmma.built_for(arch) {
            GemmPath::Wgmma
        } else {
            GemmPath::MmaSync
        }
    }

    /// The forward kernel and its dynamic shared memory, for a per-member or a shared input.
    fn forward(self, prefix: bool) -> (Kernel, usize) {
        match (self, prefix) {
            (GemmPath::MmaSync, false) => (Kernel::LoraFwdGemm, GEMM_SMEM),
            (GemmPath::MmaSync, true) => (Kernel::LoraFwdGemmPrefix, GEMM_SMEM),
            (GemmPath::Wgmma, false) => (Kernel::LoraFwdWgmma, WGMMA_SMEM),
            (GemmPath::Wgmma, true) => (Kernel::LoraFwdWgmmaPrefix, WGMMA_SMEM),
        }
    }

    /// The backward's dX kernel and its dynamic shared memory.
    fn backward_dx(self, prefix: bool) -> (Kernel, usize) {
        match (self, prefix) {
            (GemmPath::MmaSync, false) => (Kernel::LoraBwdDxGemm, GEMM_SMEM),
            (GemmPath::MmaSync, true) => (Kernel::LoraBwdDxGemmPrefix, GEMM_SMEM),
            (GemmPath::Wgmma, false) => (Kernel::LoraBwdDxWgmma, WGMMA_SMEM),
            (GemmPath::Wgmma, true) => (Kernel::LoraBwdDxWgmmaPrefix, WGMMA_SMEM),
        }
    }
}

/// The launch of U and V: a block of 128 threads per 64 of the `outs` rows × 32 ranks of one
/// member.
fn lowrank_cfg(op: &'static str, d: &LoraDims, outs: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            grid_dim(op, "output tiles", outs.div_ceil(64), GRID_X)?,
            grid_dim(op, "rank tiles", d.rank.div_ceil(32), GRID_YZ)?,
            grid_dim(op, "members", d.members, GRID_YZ)?,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The launch of a fused GEMM with `out_cols` output columns: tiles of 128×128, per member unless
/// the prefix variant covers all members in one tile; `smem` bytes of dynamic shared memory.
fn gemm_cfg(
    op: &'static str,
    d: &LoraDims,
    out_cols: usize,
    prefix: bool,
    smem: usize,
) -> Result<LaunchConfig> {
    let tiles = if prefix {
        d.row_tiles()
    } else {
        product(op, &[d.members, d.row_tiles()])?
    };
    Ok(LaunchConfig {
        grid_dim: (
            grid_dim(op, "column tiles", out_cols.div_ceil(GEMM_TILE), GRID_X)?,
            grid_dim(op, "row tiles", tiles, GRID_YZ)?,
            1,
        ),
        block_dim: (GEMM_THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    })
}

impl Gpu {
    /// `U[m] = X[g(m)]·A_mᵀ` for every member: U [M, rows, r] f32, exact f32 products of the bf16
    /// input (U feeds dB). g(m) = m, or 0 for a shared X.
    pub fn lora_project_u(
        &self,
        d: &LoraDims,
        x: &dyn DevicePtr<bf16>,
        a: &dyn DevicePtr<f32>,
        u: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "lora_project_u";
        d.check(OP)?;
        let x = self.input(OP, "X", x, d.x_len())?;
        let a = self.input(OP, "A", a, d.a_len())?;
        let u = self.output(OP, "U", u, d.u_len())?;
        let cfg = lowrank_cfg(OP, d, d.rows)?;
        let vec = vec8(&[d.k], &[&x]);
        let (xg, rows, k, r) = (d.x_groups as i32, d.rows as i32, d.k as i32, d.rank as i32);
        self.launch(
            Kernel::LoraU,
            cfg,
            &[
                x.arg(),
                Arg::from(xg),
                a.arg(),
                u.arg(),
                Arg::from(rows),
                Arg::from(k),
                Arg::from(r),
                Arg::from(vec),
            ],
        )
    }

    /// The fused GEMM of the forward: `Y[m] = X[g(m)]·Wᵀ + bias + s·U[m]·B_mᵀ`, the low-rank term
    /// an extra K-segment of the tensor-core GEMM over all M·rows rows, on `path`. With a shared
    /// X (x_groups = 1, M > 1) the X·Wᵀ tile is computed once and each member's segment is added
    /// to a copy of it. Needs U from [`Gpu::lora_project_u`]. With `residual` = (R, its groups:
    /// 1 shared or M), `Y[m] += R[m]` in the same store: the residual stream the output joins.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_forward_gemm(
        &self,
        path: GemmPath,
        d: &LoraDims,
        x: &dyn DevicePtr<bf16>,
        w: &dyn DevicePtr<bf16>,
        bias: Option<&dyn DevicePtr<bf16>>,
        u: &dyn DevicePtr<f32>,
        b: &dyn DevicePtr<f32>,
        scale: f32,
        residual: Option<(&dyn DevicePtr<bf16>, usize)>,
        y: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "lora_forward_gemm";
        d.check(OP)?;
        let per = d.rows * d.n;
        let r_groups = residual.map_or(1, |(_, g)| g);
        if r_groups != 1 && r_groups != d.members {
            return Err(KernelError::invalid(
                OP,
                format!("a residual of {r_groups} groups for {} members", d.members),
            ));
        }
        let x = self.input(OP, "X", x, d.x_len())?;
        let w = self.input(OP, "W", w, d.n * d.k)?;
        let bias = self.input_opt(OP, "bias", bias, d.n)?;
        let u = self.input(OP, "U", u, d.u_len())?;
        let bm = self.input(OP, "B", b, d.b_len())?;
        let res = self.input_opt(OP, "residual", residual.map(|(r, _)| r), r_groups * per)?;
        let r_step = if r_groups == 1 { 0 } else { per as u64 };
        let y = self.output(OP, "Y", y, d.y_len())?;
        // 16-byte cp.async needs 16-byte aligned rows: K and N multiples of 8, aligned bases.
        let vec = (d.k.is_multiple_of(8)
            && d.n.is_multiple_of(8)
            && x.aligned(16)
            && w.aligned(16)
            && res.aligned(16)
            && y.aligned(16)) as i32;
        let prefix = d.prefix();
        let (kernel, smem) = path.forward(prefix);
        let cfg = gemm_cfg(OP, d, d.n, prefix, smem)?;
        let (mm, rows, n, k, r) = (
            d.members as i32,
            d.rows as i32,
            d.n as i32,
            d.k as i32,
            d.rank as i32,
        );
        // The shared-input variant takes the member count before the sizes.
        let mut args = vec![
            x.arg(),
            w.arg(),
            bias.arg(),
            u.arg(),
            bm.arg(),
            res.arg(),
            Arg::from(r_step),
            y.arg(),
        ];
        if prefix {
            args.push(Arg::from(mm));
        }
        args.extend([rows, n, k, r].map(Arg::from));
        args.extend([Arg::from(scale), Arg::from(vec)]);
        self.launch(kernel, cfg, &args)
    }

    /// The whole forward, two launches: [`Gpu::lora_project_u`] then [`Gpu::lora_forward_gemm`]
    /// on [`Gpu::gemm_path`] (`residual` as there).
    /// Writes Y [M, rows, N] bf16 and U [M, rows, r] f32 (kept for the backward).
    #[allow(clippy::too_many_arguments)]
    pub fn lora_forward(
        &self,
        d: &LoraDims,
        x: &dyn DevicePtr<bf16>,
        w: &dyn DevicePtr<bf16>,
        bias: Option<&dyn DevicePtr<bf16>>,
        a: &dyn DevicePtr<f32>,
        b: &dyn DevicePtr<f32>,
        scale: f32,
        residual: Option<(&dyn DevicePtr<bf16>, usize)>,
        y: &mut dyn DevicePtrMut<bf16>,
        u: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
    ) -> Result<()> {
        self.lora_project_u(d, x, a, u)?;
        let path = self.gemm_path();
        self.lora_forward_gemm(path, d, x, w, bias, &*u, b, scale, residual, y)
    }

    /// `V[m] = s·dY[m]·B_m`: V [M, rows, r] f32, the gradient reaching U, shared by dA and dX.
    pub fn lora_project_v(
        &self,
        d: &LoraDims,
        dy: &dyn DevicePtr<bf16>,
        b: &dyn DevicePtr<f32>,
        scale: f32,
        v: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "lora_project_v";
        d.check(OP)?;
        let dy = self.input(OP, "dY", dy, d.y_len())?;
        let bm = self.input(OP, "B", b, d.b_len())?;
        let v = self.output(OP, "V", v, d.u_len())?;
        let cfg = lowrank_cfg(OP, d, d.rows)?;
        let vec = vec8(&[d.n], &[&dy]);
        let (rows, n, r) = (d.rows as i32, d.n as i32, d.rank as i32);
        self.launch(
            Kernel::LoraV,
            cfg,
            &[
                dy.arg(),
                bm.arg(),
                v.arg(),
                Arg::from(rows),
                Arg::from(n),
                Arg::from(r),
                Arg::from(scale),
                Arg::from(vec),
            ],
        )
    }

    /// The fused GEMM of the backward, on `path`: `dX[m] = dY[m]·W + V[m]·A_m` (W read [N, K] as
    /// the reduction-major operand), or with a shared X, `dX = (Σ_m dY[m])·W + Σ_m V[m]·A_m` with
    /// the member sum of dY taken while loading tiles, so the big product runs once. dX is bf16.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward_dx_gemm(
        &self,
        path: GemmPath,
        d: &LoraDims,
        dy: &dyn DevicePtr<bf16>,
        w: &dyn DevicePtr<bf16>,
        v: &dyn DevicePtr<f32>,
        a: &dyn DevicePtr<f32>,
        dx_plus: Option<&dyn DevicePtr<bf16>>,
        dx: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "lora_backward_dx_gemm";
        d.check(OP)?;
        let dy = self.input(OP, "dY", dy, d.y_len())?;
        let w = self.input(OP, "W", w, d.n * d.k)?;
        let v = self.input(OP, "V", v, d.u_len())?;
        let am = self.input(OP, "A", a, d.a_len())?;
        let dx_plus = self.input_opt(OP, "dX_plus", dx_plus, d.x_len())?;
        let dx = self.output(OP, "dX", dx, d.x_len())?;
        let vec = (d.k.is_multiple_of(8)
            && d.n.is_multiple_of(8)
            && dy.aligned(16)
            && w.aligned(16)
            && dx_plus.aligned(16)
            && dx.aligned(16)) as i32;
        let prefix = d.prefix();
        let (kernel, smem) = path.backward_dx(prefix);
        let cfg = gemm_cfg(OP, d, d.k, prefix, smem)?;
        let (mm, rows, n, k, r) = (
            d.members as i32,
            d.rows as i32,
            d.n as i32,
            d.k as i32,
            d.rank as i32,
        );
        let mut args = vec![
            dy.arg(),
            w.arg(),
            v.arg(),
            am.arg(),
            dx_plus.arg(),
            dx.arg(),
        ];
        if prefix {
            args.push(Arg::from(mm));
        }
        args.extend([rows, n, k, r, vec].map(Arg::from));
        self.launch(kernel, cfg, &args)
    }

    /// `dA[m] = V[m]ᵀ·X[g(m)]` (dA [M, r, K] f32) and `dB[m] = s·dY[m]ᵀ·U[m]` (dB [M, N, r] f32) in
    /// one launch, each summed over rows in a fixed order (no atomics). Where
    /// [`lora_grads_split`] cuts the rows, the ranges' partial sums go through `grads.workspace`
    /// and are added in order by a second launch for each of dA and dB.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_grads(
        &self,
        d: &LoraDims,
        v: &dyn DevicePtr<f32>,
        x: &dyn DevicePtr<bf16>,
        dy: &dyn DevicePtr<bf16>,
        u: &dyn DevicePtr<f32>,
        scale: f32,
        grads: AdapterGrads<'_>,
    ) -> Result<()> {
        const OP: &str = "lora_grads";
        d.check(OP)?;
        let split = lora_grads_split(d);
        let v = self.input(OP, "V", v, d.u_len())?;
        let x = self.input(OP, "X", x, d.x_len())?;
        let dy = self.input(OP, "dY", dy, d.y_len())?;
        let u = self.input(OP, "U", u, d.u_len())?;
        let da = self.output(OP, "dA", grads.da, d.a_len())?;
        let db = self.output(OP, "dB", grads.db, d.b_len())?;
        let part = match grads.workspace {
            Some(w) if split.splits > 1 => {
                self.output(OP, "workspace", w, split.workspace_len(d))?
            }
            None if split.splits > 1 => {
                return Err(KernelError::invalid(
                    OP,
                    format!(
                        "no workspace for the partial sums of {} row ranges",
                        split.splits
                    ),
                ));
            }
            _ => Ptr::null(),
        };
        let blocks = product(OP, &[grads_tiles(d), d.members, split.splits])?;
        let cfg = LaunchConfig {
            grid_dim: (
                grid_dim(OP, "output tiles", blocks, GRID_X)?,
                grid_dim(OP, "rank tiles", d.rank.div_ceil(32), GRID_YZ)?,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (vec_x, vec_dy) = (vec8(&[d.k], &[&x]), vec8(&[d.n], &[&dy]));
        self.launch(
            Kernel::LoraGrads,
            cfg,
            &[
                v.arg(),
                x.arg(),
                Arg::from(d.x_groups as i32),
                dy.arg(),
                u.arg(),
                Arg::from(scale),
                da.arg(),
                db.arg(),
                part.arg(),
                Arg::from(d.members as i32),
                Arg::from(d.rows as i32),
                Arg::from(d.k as i32),
                Arg::from(d.n as i32),
                Arg::from(d.rank as i32),
                Arg::from(split.rows as i32),
                Arg::from(split.splits as i32),
                Arg::from(vec_x),
                Arg::from(vec_dy),
            ],
        )?;
        if split.splits > 1 {
            let (s, a_len, b_len) = (split.splits, d.a_len(), d.b_len());
            let b_part = part.ptr + (s * a_len * std::mem::size_of::<f32>()) as u64;
            self.launch_reduce_partials(OP, part.ptr, &da, 1, s, a_len, false)?;
            self.launch_reduce_partials(OP, b_part, &db, 1, s, b_len, false)?;
        }
        Ok(())
    }

    /// The whole backward: V (into the workspace `v`, [M, rows, r] f32), then dA and dB when
    /// `grads` is given, then dX when `dx` is given, on [`Gpu::gemm_path`]. No gradient for the
    /// frozen W and bias. With `dx_plus` (X's shape), dX comes back with it added in the GEMM's
    /// store: a gradient X already had from its other readers.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_backward(
        &self,
        d: &LoraDims,
        dy: &dyn DevicePtr<bf16>,
        x: &dyn DevicePtr<bf16>,
        w: &dyn DevicePtr<bf16>,
        a: &dyn DevicePtr<f32>,
        b: &dyn DevicePtr<f32>,
        u: &dyn DevicePtr<f32>,
        scale: f32,
        v: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        grads: Option<AdapterGrads<'_>>,
        dx_plus: Option<&dyn DevicePtr<bf16>>,
        dx: Option<&mut dyn DevicePtrMut<bf16>>,
    ) -> Result<()> {
        const OP: &str = "lora_backward";
        if dx_plus.is_some() && dx.is_none() {
            return Err(KernelError::invalid(
                OP,
                "a gradient to add into dX, but no dX",
            ));
        }
        self.lora_project_v(d, dy, b, scale, v)?;
        if let Some(grads) = grads {
            self.lora_grads(d, &*v, x, dy, u, scale, grads)?;
        }
        if let Some(dx) = dx {
            self.lora_backward_dx_gemm(self.gemm_path(), d, dy, w, &*v, a, dx_plus, dx)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(members: usize, rows: usize, k: usize, n: usize, rank: usize) -> LoraDims {
        LoraDims {
            members,
            x_groups: members,
            rows,
            k,
            n,
            rank,
        }
    }

    #[test]
    fn grads_split_covers_every_row_once_in_whole_slabs() {
        for d in [
            dims(1, 32 * 50, 768, 768, 8),
            dims(1, 32 * 197, 768, 768, 8),
            dims(3, 1000, 50, 30, 40),
            dims(2, 129, 64, 64, 4),
            dims(1, 1, 8, 8, 1),
        ] {
            let s = lora_grads_split(&d);
            assert_eq!(s.rows % GRADS_SLAB, 0, "{d:?} {s:?}");
            // The ranges cover the rows, and the last one is not empty.
            assert!(s.splits * s.rows >= d.rows, "{d:?} {s:?}");
            assert!((s.splits - 1) * s.rows < d.rows, "{d:?} {s:?}");
            if s.splits > 1 {
                assert!(s.rows >= GRADS_MIN_RANGE, "{d:?} {s:?}");
            }
        }
    }

    #[test]
    fn grads_split_cuts_only_where_blocks_are_few() {
        // ViT-B/32 at M = 1: 24 output tiles, cut into ranges until about 264 blocks.
        let one = lora_grads_split(&dims(1, 32 * 50, 768, 768, 8));
        assert_eq!(
            one,
            GradsSplit {
                splits: 10,
                rows: 160
            }
        );
        assert_eq!(
            lora_grads_workspace_len(&dims(1, 32 * 50, 768, 768, 8)),
            10 * 2 * 768 * 8
        );
        // At M = 16 the 384 tiles fill the GPU already.
        let sixteen = dims(16, 32 * 50, 768, 768, 8);
        assert_eq!(lora_grads_split(&sixteen).splits, 1);
        assert_eq!(lora_grads_workspace_len(&sixteen), 0);
        // Too few rows to cut.
        assert_eq!(lora_grads_split(&dims(1, 200, 64, 64, 8)).splits, 1);
    }
}
