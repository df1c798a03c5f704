//! Launchers for `kernels/activation.cu`: bias + exact-erf GELU.
//!
//! x [gx, rows, N] bf16, b [gb, N] f32, y/dy [G, rows, N] bf16, dx [gx, rows, N] bf16,
//! db [gb, N] f32.

use crate::bf16;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::{
    BLOCK, CHUNK_ROWS, GRID_X, GRID_YZ, elementwise_cfg, grid_dim, groups_ok, int, positive,
    product,
};
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu};
use crate::sources::Kernel;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BiasGeluDims {
    /// G, the output groups (the larger of x_groups and b_groups).
    pub groups: usize,
    pub x_groups: usize,
    pub b_groups: usize,
    pub rows: usize,
    /// N, the width.
    pub n: usize,
}

impl BiasGeluDims {
    fn check(&self, op: &'static str) -> Result<()> {
        positive(op, "groups", self.groups)?;
        positive(op, "rows", self.rows)?;
        positive(op, "n", self.n)?;
        groups_ok(op, "x", self.x_groups, self.groups)?;
        groups_ok(op, "bias", self.b_groups, self.groups)?;
        if self.x_groups.max(self.b_groups) != self.groups {
            return Err(KernelError::invalid(
                op,
                format!(
                    "{} output groups from x with {} and bias with {}",
                    self.groups, self.x_groups, self.b_groups
                ),
            ));
        }
        int(op, "G·rows", product(op, &[self.groups, self.rows])?)?;
        int(op, "N", self.n)?;
        Ok(())
    }

    fn chunks(&self) -> usize {
        self.rows.div_ceil(CHUNK_ROWS)
    }

    fn ints(&self) -> (i32, i32, i32, i32, i32) {
        (
            self.x_groups as i32,
            self.b_groups as i32,
            self.groups as i32,
            self.rows as i32,
            self.n as i32,
        )
    }
}

/// The workspace [`Gpu::bias_gelu_backward_db`] needs, in f32 elements.
pub fn bias_gelu_db_workspace_len(d: &BiasGeluDims) -> usize {
    d.b_groups * d.chunks() * d.n
}

impl Gpu {
    /// `y[g] = gelu(x[gx(g)] + b[gb(g)])`, gelu(z) = z·Φ(z) with the exact erf.
    pub fn bias_gelu_forward(
        &self,
        d: &BiasGeluDims,
        x: &dyn DevicePtr<bf16>,
        b: &dyn DevicePtr<f32>,
        y: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "bias_gelu_forward";
        d.check(OP)?;
        let x = self.input(OP, "x", x, d.x_groups * d.rows * d.n)?;
        let b = self.input(OP, "bias", b, d.b_groups * d.n)?;
        let total = d.groups * d.rows * d.n;
        let y = self.output(OP, "y", y, total)?;
        let (gx, gb, g, rows, n) = d.ints();
        self.launch(
            Kernel::BiasGeluFwd,
            elementwise_cfg(total),
            &[
                x.arg(),
                b.arg(),
                y.arg(),
                Arg::from(gx),
                Arg::from(gb),
                Arg::from(g),
                Arg::from(rows),
                Arg::from(n),
            ],
        )
    }

    /// `dx = Σ_g dy[g]·gelu'(x + b[gb(g)])` over the output groups reading each x element, from
    /// the pre-activation input (x + b is recomputed, not stored).
    pub fn bias_gelu_backward_dx(
        &self,
        d: &BiasGeluDims,
        dy: &dyn DevicePtr<bf16>,
        x: &dyn DevicePtr<bf16>,
        b: &dyn DevicePtr<f32>,
        dx: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "bias_gelu_backward_dx";
        d.check(OP)?;
        let dy = self.input(OP, "dy", dy, d.groups * d.rows * d.n)?;
        let xlen = d.x_groups * d.rows * d.n;
        let x = self.input(OP, "x", x, xlen)?;
        let b = self.input(OP, "bias", b, d.b_groups * d.n)?;
        let dx = self.output(OP, "dx", dx, xlen)?;
        let (gx, gb, g, rows, n) = d.ints();
        self.launch(
            Kernel::BiasGeluBwdDx,
            elementwise_cfg(xlen),
            &[
                dy.arg(),
                x.arg(),
                b.arg(),
                dx.arg(),
                Arg::from(gx),
                Arg::from(gb),
                Arg::from(g),
                Arg::from(rows),
                Arg::from(n),
            ],
        )
    }

    /// `db = Σ_rows dy·gelu'(x + b)` per bias row, the product recomputed in f32; deterministic in
    /// two stages through `workspace` ([`bias_gelu_db_workspace_len`] f32). `accumulate` adds to db.
    #[allow(clippy::too_many_arguments)]
    pub fn bias_gelu_backward_db(
        &self,
        d: &BiasGeluDims,
        dy: &dyn DevicePtr<bf16>,
        x: &dyn DevicePtr<bf16>,
        b: &dyn DevicePtr<f32>,
        workspace: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        db: &mut dyn DevicePtrMut<f32>,
        accumulate: bool,
    ) -> Result<()> {
        const OP: &str = "bias_gelu_backward_db";
        d.check(OP)?;
        {
            let dy = self.input(OP, "dy", dy, d.groups * d.rows * d.n)?;
            let x = self.input(OP, "x", x, d.x_groups * d.rows * d.n)?;
            let b = self.input(OP, "bias", b, d.b_groups * d.n)?;
            let part = self.output(OP, "workspace", workspace, bias_gelu_db_workspace_len(d))?;
            // Block (32 columns, 256-row chunk, bias row): lanes = columns, warps = rows.
            let cfg = LaunchConfig {
                grid_dim: (
                    grid_dim(OP, "column strips", d.n.div_ceil(32), GRID_X)?,
                    grid_dim(OP, "row chunks", d.chunks(), GRID_YZ)?,
                    grid_dim(OP, "bias groups", d.b_groups, GRID_YZ)?,
                ),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let (gx, gb, g, rows, n) = d.ints();
            let chunk_rows = CHUNK_ROWS as i32;
            self.launch(
                Kernel::BiasGeluBwdDbPartial,
                cfg,
                &[
                    dy.arg(),
                    x.arg(),
                    b.arg(),
                    part.arg(),
                    Arg::from(gx),
                    Arg::from(gb),
                    Arg::from(g),
                    Arg::from(rows),
                    Arg::from(n),
                    Arg::from(chunk_rows),
                ],
            )?;
        }
        self.reduce_partials(
            OP,
            &*workspace,
            0,
            db,
            d.b_groups,
            d.chunks(),
            d.n,
            accumulate,
        )
    }
}
