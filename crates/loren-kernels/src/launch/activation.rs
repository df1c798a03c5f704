//! Launchers for `kernels/activation.cu`: bias + exact-erf GELU.
//!
//! x [gx, rows, N] bf16, b [gb, N] f32, y/dy [G, rows, N] bf16, dx [gx, rows, N] bf16,
//! db [gb, N] f32.

use crate::bf16;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{CHUNK_ROWS, grouped_cfg, groups_ok, int, positive, product, strip_cfg, vec8};
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu, Ptr};
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
        // The kernels index within a group in 32 bits.
        int(op, "rows·N", product(op, &[self.rows, self.n])?)?;
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
        let per = d.rows * d.n;
        let x = self.input(OP, "x", x, d.x_groups * per)?;
        let b = self.input(OP, "bias", b, d.b_groups * d.n)?;
        let y = self.output(OP, "y", y, d.groups * per)?;
        let vec = vec8(&[d.n], &[&x, &b, &y]);
        let (gx, gb, _, rows, n) = d.ints();
        self.launch(
            Kernel::BiasGeluFwd,
            grouped_cfg(OP, d.groups, per, vec)?,
            &[
                x.arg(),
                b.arg(),
                y.arg(),
                Arg::from(gx),
                Arg::from(gb),
                Arg::from(rows),
                Arg::from(n),
                Arg::from(vec),
            ],
        )
    }

    /// `dx = Σ_g dy[g]·gelu'(x + b[gb(g)])` over the output groups reading each x element, from
    /// the pre-activation input (x + b is recomputed, not stored). When db is wanted too and x is
    /// not shared, [`Gpu::bias_gelu_backward_db`] writes dx in the same pass.
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
        let per = d.rows * d.n;
        let dy = self.input(OP, "dy", dy, d.groups * per)?;
        let x = self.input(OP, "x", x, d.x_groups * per)?;
        let b = self.input(OP, "bias", b, d.b_groups * d.n)?;
        let dx = self.output(OP, "dx", dx, d.x_groups * per)?;
        let vec = vec8(&[d.n], &[&dy, &x, &b, &dx]);
        let (gx, gb, g, rows, n) = d.ints();
        self.launch(
            Kernel::BiasGeluBwdDx,
            grouped_cfg(OP, d.x_groups, per, vec)?,
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
                Arg::from(vec),
            ],
        )
    }

    /// `db = Σ_rows dy·gelu'(x + b)` per bias row, the product recomputed in f32; deterministic in
    /// two stages through `workspace` ([`bias_gelu_db_workspace_len`] f32). `accumulate` adds to db.
    /// With `dx`, the same pass also writes `dx = dy·gelu'(x + b)` (bf16), reading dy and x once
    /// for both gradients; that needs x unshared (`x_groups == groups`).
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
        dx: Option<&mut dyn DevicePtrMut<bf16>>,
    ) -> Result<()> {
        const OP: &str = "bias_gelu_backward_db";
        d.check(OP)?;
        if dx.is_some() && d.x_groups != d.groups {
            return Err(KernelError::invalid(
                OP,
                format!(
                    "dx in the same pass needs x unshared; x has {} groups of {}",
                    d.x_groups, d.groups
                ),
            ));
        }
        {
            let per = d.rows * d.n;
            let dy = self.input(OP, "dy", dy, d.groups * per)?;
            let x = self.input(OP, "x", x, d.x_groups * per)?;
            let b = self.input(OP, "bias", b, d.b_groups * d.n)?;
            let dx = match dx {
                Some(dx) => self.output(OP, "dx", dx, d.x_groups * per)?,
                None => Ptr::null(),
            };
            let part = self.output(OP, "workspace", workspace, bias_gelu_db_workspace_len(d))?;
            let vec = vec8(&[d.n], &[&dy, &x, &b, &dx]);
            let cfg = strip_cfg(OP, d.n, d.chunks(), d.b_groups, vec)?;
            let (gx, gb, g, rows, n) = d.ints();
            let chunk_rows = CHUNK_ROWS as i32;
            self.launch(
                Kernel::BiasGeluBwd,
                cfg,
                &[
                    dy.arg(),
                    x.arg(),
                    b.arg(),
                    dx.arg(),
                    part.arg(),
                    Arg::from(gx),
                    Arg::from(gb),
                    Arg::from(g),
                    Arg::from(rows),
                    Arg::from(n),
                    Arg::from(chunk_rows),
                    Arg::from(vec),
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
