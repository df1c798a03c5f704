//! Launchers for `kernels/loss.cu`: softmax cross-entropy with its gradient, and softmax.

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::{BLOCK, GRID_X, grid_dim, int, positive, product};
use crate::error::Result;
use crate::gpu::{Arg, Gpu};
use crate::sources::Kernel;

/// Rows (warps) per block of the row kernels.
const ROWS_PER_BLOCK: usize = 8;

fn rows_cfg(op: &'static str, rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (
            grid_dim(op, "row blocks", rows.div_ceil(ROWS_PER_BLOCK), GRID_X)?,
            1,
            1,
        ),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Gpu {
    /// Softmax cross-entropy of the ensemble's logits [M, B, C] f32 against targets [B] u32
    /// shared by the members. Writes the per-row losses [M·B] f32 (`losses`, also a workspace),
    /// `dlogits = (softmax − onehot)/(M·B)` [M, B, C] f32 in the same pass, and the mean loss
    /// `loss[0]` f32, summed in f64 in a fixed order. A target >= C makes its row NaN (the host
    /// is expected to have checked targets when it uploaded them).
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_cross_entropy(
        &self,
        members: usize,
        batch: usize,
        classes: usize,
        logits: &dyn DevicePtr<f32>,
        targets: &dyn DevicePtr<u32>,
        losses: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
        dlogits: &mut dyn DevicePtrMut<f32>,
        loss: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "softmax_cross_entropy";
        positive(OP, "members", members)?;
        positive(OP, "batch", batch)?;
        positive(OP, "classes", classes)?;
        let rows = product(OP, &[members, batch])?;
        let total = product(OP, &[rows, classes])?;
        let rows_i = int(OP, "M·B", rows)?;
        int(OP, "M·B·C", total)?;
        {
            let z = self.input(OP, "logits", logits, total)?;
            let t = self.input(OP, "targets", targets, batch)?;
            let l = self.output(OP, "losses", losses, rows)?;
            let g = self.output(OP, "dlogits", dlogits, total)?;
            let (b, c) = (batch as i32, classes as i32);
            let inv = 1.0f32 / rows as f32; // as the CPU twin computes it
            self.launch(
                Kernel::SoftmaxXentRows,
                rows_cfg(OP, rows)?,
                &[
                    z.arg(),
                    t.arg(),
                    l.arg(),
                    g.arg(),
                    Arg::from(rows_i),
                    Arg::from(b),
                    Arg::from(c),
                    Arg::from(inv),
                ],
            )?;
        }
        let l = self.input(OP, "losses", &*losses, rows)?;
        let out = self.output(OP, "loss", loss, 1)?;
        // One block of 256 threads: a fixed summation order for any M·B.
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            Kernel::SoftmaxXentMean,
            cfg,
            &[l.arg(), out.arg(), Arg::from(rows_i)],
        )
    }

    /// `probs = softmax(logits)` over the last axis: [rows, C] f32 both.
    pub fn softmax(
        &self,
        rows: usize,
        classes: usize,
        logits: &dyn DevicePtr<f32>,
        probs: &mut dyn DevicePtrMut<f32>,
    ) -> Result<()> {
        const OP: &str = "softmax";
        positive(OP, "rows", rows)?;
        positive(OP, "classes", classes)?;
        let total = product(OP, &[rows, classes])?;
        int(OP, "rows·C", total)?;
        let z = self.input(OP, "logits", logits, total)?;
        let p = self.output(OP, "probs", probs, total)?;
        let (r, c) = (rows as i32, classes as i32);
        self.launch(
            Kernel::SoftmaxRows,
            rows_cfg(OP, rows)?,
            &[z.arg(), p.arg(), Arg::from(r), Arg::from(c)],
        )
    }
}
