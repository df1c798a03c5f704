//! Launchers for `kernels/norm.cu`: LayerNorm with group broadcasting.
//!
//! x [gx, rows, D] bf16, gamma/beta [gw, D] f32, y/dy [G, rows, D] bf16,
//! mean/rstd [gx, rows] f32, dx [gx, rows, D] bf16, dgamma/dbeta [gw, D] f32.

use crate::bf16;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::{
    BLOCK, CHUNK_ROWS, GRID_X, grid_dim, groups_ok, int, positive, product, strip_cfg, vec8,
};
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu};
use crate::sources::Kernel;

/// Rows (warps) per block of the row kernels.
const ROWS_PER_BLOCK: usize = 8;
/// The largest G the backward accepts when x is shared (per-warp scratch in the kernel).
pub const MAX_GROUPS: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormDims {
    /// G, the output groups (the larger of x_groups and w_groups).
    pub groups: usize,
    pub x_groups: usize,
    /// Groups of gamma and beta.
    pub w_groups: usize,
    pub rows: usize,
    /// D, the normalised width.
    pub dim: usize,
}

impl NormDims {
    fn check(&self, op: &'static str) -> Result<()> {
        positive(op, "groups", self.groups)?;
        positive(op, "rows", self.rows)?;
        positive(op, "dim", self.dim)?;
        groups_ok(op, "x", self.x_groups, self.groups)?;
        groups_ok(op, "gamma", self.w_groups, self.groups)?;
        if self.x_groups.max(self.w_groups) != self.groups {
            return Err(KernelError::invalid(
                op,
                format!(
                    "{} output groups from x with {} and gamma with {}",
                    self.groups, self.x_groups, self.w_groups
                ),
            ));
        }
        int(op, "G·rows", product(op, &[self.groups, self.rows])?)?;
        Ok(())
    }

    fn row_cfg(&self, op: &'static str) -> Result<LaunchConfig> {
        Ok(LaunchConfig {
            grid_dim: (
                grid_dim(
                    op,
                    "row blocks",
                    (self.x_groups * self.rows).div_ceil(ROWS_PER_BLOCK),
                    GRID_X,
                )?,
                1,
                1,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })
    }

    fn chunks(&self) -> usize {
        self.rows.div_ceil(CHUNK_ROWS)
    }

    fn ints(&self) -> (i32, i32, i32, i32, i32) {
        (
            self.x_groups as i32,
            self.w_groups as i32,
            self.groups as i32,
            self.rows as i32,
            self.dim as i32,
        )
    }
}

/// The workspace [`Gpu::layernorm_backward_params`] needs, in f32 elements.
pub fn layernorm_params_workspace_len(d: &NormDims) -> usize {
    2 * d.w_groups * d.chunks() * d.dim
}

impl Gpu {
    /// `y[g] = (x[gx(g)] − mean)·rstd·gamma[gw(g)] + beta[gw(g)]`, statistics per x row in f32:
    /// mean and rstd = 1/sqrt(var + eps) saved for the backward.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward(
        &self,
        d: &NormDims,
        x: &dyn DevicePtr<bf16>,
        gamma: &dyn DevicePtr<f32>,
        beta: &dyn DevicePtr<f32>,
        eps: f32,
        y: &mut dyn DevicePtrMut<bf16>,
        mean: &mut dyn DevicePtrMut<f32>,
        rstd: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "layernorm_forward";
        d.check(OP)?;
        let x = self.input(OP, "x", x, d.x_groups * d.rows * d.dim)?;
        let gamma = self.input(OP, "gamma", gamma, d.w_groups * d.dim)?;
        let beta = self.input(OP, "beta", beta, d.w_groups * d.dim)?;
        let y = self.output(OP, "y", y, d.groups * d.rows * d.dim)?;
        let mean = self.output(OP, "mean", mean, d.x_groups * d.rows)?;
        let rstd = self.output(OP, "rstd", rstd, d.x_groups * d.rows)?;
        let cfg = d.row_cfg(OP)?;
        let vec = vec8(&[d.dim], &[&x, &gamma, &beta, &y]);
        let (gx, gw, g, rows, dim) = d.ints();
        self.launch(
            Kernel::LayernormFwd,
            cfg,
            &[
                x.arg(),
                gamma.arg(),
                beta.arg(),
                y.arg(),
                mean.arg(),
                rstd.arg(),
                Arg::from(gx),
                Arg::from(gw),
                Arg::from(g),
                Arg::from(rows),
                Arg::from(dim),
                Arg::from(eps),
                Arg::from(vec),
            ],
        )
    }

    /// `dx = rstd·(dŷ − mean(dŷ) − x̂·mean(dŷ·x̂))` with dŷ = dy·gamma, summed over the output
    /// groups reading each x row (a shared x gets the sum; at most 64 groups then). With
    /// `dx_plus` (x's shape), dx comes back with it added: a gradient x already had, joined in
    /// the same pass.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward_dx(
        &self,
        d: &NormDims,
        dy: &dyn DevicePtr<bf16>,
        x: &dyn DevicePtr<bf16>,
        gamma: &dyn DevicePtr<f32>,
        mean: &dyn DevicePtr<f32>,
        rstd: &dyn DevicePtr<f32>,
        dx_plus: Option<&dyn DevicePtr<bf16>>,
        dx: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "layernorm_backward_dx";
        d.check(OP)?;
        if d.x_groups == 1 && d.groups > MAX_GROUPS {
            return Err(KernelError::invalid(
                OP,
                format!("a shared x with {} groups; at most {MAX_GROUPS}", d.groups),
            ));
        }
        let dy = self.input(OP, "dy", dy, d.groups * d.rows * d.dim)?;
        let x = self.input(OP, "x", x, d.x_groups * d.rows * d.dim)?;
        let gamma = self.input(OP, "gamma", gamma, d.w_groups * d.dim)?;
        let mean = self.input(OP, "mean", mean, d.x_groups * d.rows)?;
        let rstd = self.input(OP, "rstd", rstd, d.x_groups * d.rows)?;
        let dx_plus = self.input_opt(OP, "dx_plus", dx_plus, d.x_groups * d.rows * d.dim)?;
        let dx = self.output(OP, "dx", dx, d.x_groups * d.rows * d.dim)?;
        let cfg = d.row_cfg(OP)?;
        let vec = vec8(&[d.dim], &[&dy, &x, &gamma, &dx_plus, &dx]);
        let (gx, gw, g, rows, dim) = d.ints();
        self.launch(
            Kernel::LayernormBwdDx,
            cfg,
            &[
                dy.arg(),
                x.arg(),
                gamma.arg(),
                mean.arg(),
                rstd.arg(),
                dx_plus.arg(),
                dx.arg(),
                Arg::from(gx),
                Arg::from(gw),
                Arg::from(g),
                Arg::from(rows),
                Arg::from(dim),
                Arg::from(vec),
            ],
        )
    }

    /// `dgamma = Σ dy·x̂`, `dbeta = Σ dy` over the rows using each affine row, deterministic in
    /// two stages through `workspace` ([`layernorm_params_workspace_len`] f32). With `accumulate`
    /// the sums are added to dgamma and dbeta instead of overwriting them.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward_params(
        &self,
        d: &NormDims,
        dy: &dyn DevicePtr<bf16>,
        x: &dyn DevicePtr<bf16>,
        mean: &dyn DevicePtr<f32>,
        rstd: &dyn DevicePtr<f32>,
        workspace: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        dgamma: &mut dyn DevicePtrMut<f32>,
        dbeta: &mut dyn DevicePtrMut<f32>,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "layernorm_backward_params";
        d.check(OP)?;
        let ws_len = layernorm_params_workspace_len(d);
        {
            let dy = self.input(OP, "dy", dy, d.groups * d.rows * d.dim)?;
            let x = self.input(OP, "x", x, d.x_groups * d.rows * d.dim)?;
            let mean = self.input(OP, "mean", mean, d.x_groups * d.rows)?;
            let rstd = self.input(OP, "rstd", rstd, d.x_groups * d.rows)?;
            let part = self.output(OP, "workspace", workspace, ws_len)?;
            let vec = vec8(&[d.dim], &[&dy, &x]);
            let cfg = strip_cfg(OP, d.dim, d.chunks(), d.w_groups, vec)?;
            let (gx, gw, g, rows, dim) = d.ints();
            let chunk_rows = CHUNK_ROWS as i32;
            self.launch(
                Kernel::LayernormBwdParamsPartial,
                cfg,
                &[
                    dy.arg(),
                    x.arg(),
                    mean.arg(),
                    rstd.arg(),
                    part.arg(),
                    Arg::from(gx),
                    Arg::from(gw),
                    Arg::from(g),
                    Arg::from(rows),
                    Arg::from(dim),
                    Arg::from(chunk_rows),
                    Arg::from(vec),
                ],
            )?;
        }
        let half = d.w_groups * d.chunks() * d.dim;
        self.reduce_partials(
            OP,
            &*workspace,
            0,
            dgamma,
            d.w_groups,
            d.chunks(),
            d.dim,
            accumulate,
        )?;
        self.reduce_partials(
            OP,
            &*workspace,
            half,
            dbeta,
            d.w_groups,
            d.chunks(),
            d.dim,
            accumulate,
        )
    }
}
