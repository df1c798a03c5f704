//! Launchers for `kernels/elementwise.cu`: residual adds, accumulation, scaling, reductions over
//! groups and rows, sums of squares, conversions and fills. Every reduction is deterministic.

use crate::bf16;
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

use super::{
    BLOCK, CHUNK_ROWS, elementwise_cfg, grouped_cfg, groups_ok, int, positive, product, strip_cfg,
    vec_cfg, vec8,
};
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu, Ptr};
use crate::sources::Kernel;

/// Blocks of the first stage of [`Gpu::sum_squares_f32`] (fixed by n alone).
pub fn sum_squares_partials_len(n: usize) -> usize {
    n.div_ceil(BLOCK as usize).clamp(1, 1024)
}

/// A column sum over rows: `out[o][c] = Σ_{g → o} Σ_row src[(g·rows + row)·ld + c]`, c < n <= ld,
/// where g → o is g == o when `out_groups == groups` and every g when `out_groups == 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SumRowsDims {
    pub groups: usize,
    pub rows: usize,
    /// Columns summed (the first n of each row).
    pub n: usize,
    /// Row stride of src, >= n.
    pub ld: usize,
    /// 1 or `groups`.
    pub out_groups: usize,
}

impl SumRowsDims {
    fn check(&self, op: &'static str) -> Result<()> {
        positive(op, "groups", self.groups)?;
        positive(op, "rows", self.rows)?;
        positive(op, "n", self.n)?;
        groups_ok(op, "out", self.out_groups, self.groups)?;
        if self.ld < self.n {
            return Err(KernelError::invalid(
                op,
                format!("row stride {} is below the width {}", self.ld, self.n),
            ));
        }
        int(op, "rows", self.rows)?;
        int(op, "n", self.n)?;
        Ok(())
    }
    fn src_len(&self) -> usize {
        (self.groups * self.rows - 1) * self.ld + self.n
    }
    fn chunks(&self) -> usize {
        self.rows.div_ceil(CHUNK_ROWS)
    }
}

/// The workspace [`Gpu::sum_rows_bf16`] and [`Gpu::sum_rows_f32`] need, in f32 elements.
pub fn sum_rows_workspace_len(d: &SumRowsDims) -> usize {
    d.out_groups * d.chunks() * d.n
}

macro_rules! add_launcher {
    ($name:ident, $t:ty, $kernel:ident) => {
        /// `out[g] = a[ga(g)] + b[gb(g)]` over G groups of `per` elements each; a group-1 operand
        /// is read by every output group (the residual add where the stream turns per-member).
        #[allow(clippy::too_many_arguments)]
        pub fn $name(
            &self,
            per: usize,
            groups: usize,
            a_groups: usize,
            b_groups: usize,
            a: &dyn DevicePtr<$t>,
            b: &dyn DevicePtr<$t>,
            out: &mut dyn DevicePtrMut<$t>,
        ) -> Result<()> {
            const OP: &str = stringify!($name);
            positive(OP, "per", per)?;
            positive(OP, "groups", groups)?;
            groups_ok(OP, "a", a_groups, groups)?;
            groups_ok(OP, "b", b_groups, groups)?;
            let total = product(OP, &[per, groups])?;
            let a = self.input(OP, "a", a, a_groups * per)?;
            let b = self.input(OP, "b", b, b_groups * per)?;
            let out = self.output(OP, "out", out, total)?;
            let vec = vec8(&[per], &[&a, &b, &out]);
            let cfg = grouped_cfg(OP, groups, per, vec)?;
            let (per, ga, gb) = (per as u64, a_groups as i32, b_groups as i32);
            self.launch(
                Kernel::$kernel,
                cfg,
                &[
                    a.arg(),
                    b.arg(),
                    out.arg(),
                    Arg::from(per),
                    Arg::from(ga),
                    Arg::from(gb),
                    Arg::from(vec),
                ],
            )
        }
    };
}

macro_rules! bias_launcher {
    ($name:ident, $t:ty, $kernel:ident) => {
        /// `y[g][row][c] = src[gs(g)][row][c] + bias[gb(g)][c]` for y [groups, rows, n], `src`
        /// = (values, groups: 1 or `groups`) and an f32 `bias` = (values, groups). Without
        /// `src`, y is the source (in place: the bias of a cuBLAS product); without `bias`, y
        /// is `src` broadcast. A residual stream as `src` with the bias, then a GEMM with
        /// beta = 1 onto y, joins the stream without a pass of its own.
        pub fn $name(
            &self,
            groups: usize,
            rows: usize,
            n: usize,
            src: Option<(&dyn DevicePtr<$t>, usize)>,
            bias: Option<(&dyn DevicePtr<f32>, usize)>,
            y: &mut dyn DevicePtrMut<$t>,
        ) -> Result<()> {
            const OP: &str = stringify!($name);
            positive(OP, "groups", groups)?;
            positive(OP, "rows", rows)?;
            positive(OP, "n", n)?;
            if src.is_none() && bias.is_none() {
                return Err(KernelError::invalid(
                    OP,
                    "neither a source nor a bias: nothing to do",
                ));
            }
            let (src_groups, bias_groups) = (src.map_or(groups, |s| s.1), bias.map_or(1, |b| b.1));
            groups_ok(OP, "src", src_groups, groups)?;
            groups_ok(OP, "bias", bias_groups, groups)?;
            let total = product(OP, &[groups, rows, n])?;
            // The kernels index within a group in 32 bits.
            int(OP, "rows·n", rows * n)?;
            let src = self.input_opt(OP, "src", src.map(|s| s.0), src_groups * rows * n)?;
            let bias = self.input_opt(OP, "bias", bias.map(|b| b.0), bias_groups * n)?;
            let y = self.output(OP, "y", y, total)?;
            let vec = vec8(&[n], &[&src, &y, &bias]);
            // In place, the kernel reads y as its source.
            let x = if src.ptr == 0 { y.arg() } else { src.arg() };
            let args = [
                x,
                y.arg(),
                bias.arg(),
                Arg::from(int(OP, "rows", rows)?),
                Arg::from(int(OP, "n", n)?),
                Arg::from(src_groups as i32),
                Arg::from(bias_groups as i32),
                Arg::from(vec),
            ];
            self.launch(
                Kernel::$kernel,
                grouped_cfg(OP, groups, rows * n, vec)?,
                &args,
            )
        }
    };
}

macro_rules! add_assign_launcher {
    ($name:ident, $t:ty, $kernel:ident) => {
        /// `dst += src` over n elements: the add kernel with one group, writing over its first
        /// operand.
        pub fn $name(
            &self,
            n: usize,
            dst: &mut dyn DevicePtrMut<$t>,
            src: &dyn DevicePtr<$t>,
        ) -> Result<()> {
            const OP: &str = stringify!($name);
            let src = self.input(OP, "src", src, n)?;
            let dst = self.output(OP, "dst", dst, n)?;
            let vec = vec8(&[n], &[&dst, &src]);
            self.launch(
                Kernel::$kernel,
                grouped_cfg(OP, 1, n, vec)?,
                &[
                    dst.arg(),
                    src.arg(),
                    dst.arg(),
                    Arg::from(n as u64),
                    Arg::from(1i32),
                    Arg::from(1i32),
                    Arg::from(vec),
                ],
            )
        }
    };
}

macro_rules! scale_launcher {
    ($name:ident, $t:ty, $kernel:ident) => {
        /// `x *= alpha` over n elements, in place.
        pub fn $name(&self, n: usize, x: &mut dyn DevicePtrMut<$t>, alpha: f32) -> Result<()> {
            const OP: &str = stringify!($name);
            let x = self.output(OP, "x", x, n)?;
            let vec = vec8(&[n], &[&x]);
            self.launch(
                Kernel::$kernel,
                vec_cfg(n, vec),
                &[
                    x.arg(),
                    Arg::from(n as u64),
                    Arg::from(alpha),
                    Arg::from(vec),
                ],
            )
        }
    };
}

macro_rules! sum_groups_launcher {
    ($name:ident, $t:ty, $kernel:ident) => {
        /// `out[e] = Σ_g src[g·per + e]` over `groups` groups in order, accumulated in f32: the
        /// gradient of a broadcast (group-1) input.
        pub fn $name(
            &self,
            per: usize,
            groups: usize,
            src: &dyn DevicePtr<$t>,
            out: &mut dyn DevicePtrMut<$t>,
        ) -> Result<()> {
            const OP: &str = stringify!($name);
            positive(OP, "groups", groups)?;
            let src = self.input(OP, "src", src, product(OP, &[per, groups])?)?;
            let out = self.output(OP, "out", out, per)?;
            let (per64, g) = (per as u64, int(OP, "groups", groups)?);
            let vec = vec8(&[per], &[&src, &out]);
            self.launch(
                Kernel::$kernel,
                vec_cfg(per, vec),
                &[
                    src.arg(),
                    out.arg(),
                    Arg::from(per64),
                    Arg::from(g),
                    Arg::from(vec),
                ],
            )
        }
    };
}

macro_rules! sum_rows_launcher {
    ($name:ident, $t:ty, $kernel:ident) => {
        /// Column sums over rows ([`SumRowsDims`]), f32 out: bias gradients, dcls, dpos.
        /// Deterministic in two stages through `workspace` ([`sum_rows_workspace_len`] f32);
        /// `accumulate` adds to `out` instead of overwriting it.
        pub fn $name(
            &self,
            d: &SumRowsDims,
            src: &dyn DevicePtr<$t>,
            workspace: &mut (impl DevicePtr<f32> + DevicePtrMut<f32>),
            out: &mut dyn DevicePtrMut<f32>,
            accumulate: bool,
        ) -> Result<()> {
            const OP: &str = stringify!($name);
            d.check(OP)?;
            {
                let src = self.input(OP, "src", src, d.src_len())?;
                let part = self.output(OP, "workspace", workspace, sum_rows_workspace_len(d))?;
                let vec = vec8(&[d.n, d.ld], &[&src]);
                let cfg = strip_cfg(OP, d.n, d.chunks(), d.out_groups, vec)?;
                let (g, rows, n, ld, og, cr) = (
                    d.groups as i32,
                    d.rows as i32,
                    d.n as i32,
                    d.ld as u64,
                    d.out_groups as i32,
                    CHUNK_ROWS as i32,
                );
                self.launch(
                    Kernel::$kernel,
                    cfg,
                    &[
                        src.arg(),
                        part.arg(),
                        Arg::from(g),
                        Arg::from(rows),
                        Arg::from(n),
                        Arg::from(ld),
                        Arg::from(og),
                        Arg::from(cr),
                        Arg::from(vec),
                    ],
                )?;
            }
            self.reduce_partials(
                OP,
                &*workspace,
                0,
                out,
                d.out_groups,
                d.chunks(),
                d.n,
                accumulate,
            )
        }
    };
}

macro_rules! convert_launcher {
    ($name:ident, $from:ty, $to:ty, $kernel:ident, $doc:literal) => {
        #[doc = $doc]
        pub fn $name(
            &self,
            n: usize,
            src: &dyn DevicePtr<$from>,
            dst: &mut dyn DevicePtrMut<$to>,
        ) -> Result<()> {
            const OP: &str = stringify!($name);
            let src = self.input(OP, "src", src, n)?;
            let dst = self.output(OP, "dst", dst, n)?;
            let vec = vec8(&[n], &[&src, &dst]);
            self.launch(
                Kernel::$kernel,
                vec_cfg(n, vec),
                &[src.arg(), dst.arg(), Arg::from(n as u64), Arg::from(vec)],
            )
        }
    };
}

macro_rules! fill_launcher {
    ($name:ident, $t:ty, $kernel:ident) => {
        /// Set n elements to `value` (rounded to the element type).
        pub fn $name(&self, n: usize, dst: &mut dyn DevicePtrMut<$t>, value: f32) -> Result<()> {
            const OP: &str = stringify!($name);
            let dst = self.output(OP, "dst", dst, n)?;
            let vec = vec8(&[n], &[&dst]);
            self.launch(
                Kernel::$kernel,
                vec_cfg(n, vec),
                &[
                    dst.arg(),
                    Arg::from(n as u64),
                    Arg::from(value),
                    Arg::from(vec),
                ],
            )
        }
    };
}

impl Gpu {
    add_launcher!(add_bf16, bf16, AddBf16);
    bias_launcher!(add_bias_rows_bf16, bf16, AddBiasRowsBf16);
    bias_launcher!(add_bias_rows_f32, f32, AddBiasRowsF32);
    add_launcher!(add_f32, f32, AddF32);
    add_assign_launcher!(add_assign_bf16, bf16, AddBf16);
    add_assign_launcher!(add_assign_f32, f32, AddF32);
    scale_launcher!(scale_bf16, bf16, ScaleBf16);
    scale_launcher!(scale_f32, f32, ScaleF32);
    sum_groups_launcher!(sum_groups_bf16, bf16, SumGroupsBf16);
    sum_groups_launcher!(sum_groups_f32, f32, SumGroupsF32);
    sum_rows_launcher!(sum_rows_bf16, bf16, SumRowsPartialBf16);
    sum_rows_launcher!(sum_rows_f32, f32, SumRowsPartialF32);
    convert_launcher!(
        f32_to_bf16,
        f32,
        bf16,
        F32ToBf16,
        "`dst = bf16(src)`, round to nearest even."
    );
    convert_launcher!(
        bf16_to_f32,
        bf16,
        f32,
        Bf16ToF32,
        "`dst = f32(src)`, exact."
    );
    fill_launcher!(fill_f32, f32, FillF32);
    fill_launcher!(fill_bf16, bf16, FillBf16);

    /// `out[0] = Σ x²` over n f32 elements, in f64, deterministic: per-block partials into
    /// `partials` ([`sum_squares_partials_len`] f64), then one block adds them in order.
    pub fn sum_squares_f32(
        &self,
        n: usize,
        x: &dyn DevicePtr<f32>,
        partials: &mut (impl DevicePtr<f64> + DevicePtrMut<f64>),
        out: &mut dyn DevicePtrMut<f64>,
    ) -> Result<()> {
        const OP: &str = "sum_squares_f32";
        positive(OP, "n", n)?;
        let blocks = sum_squares_partials_len(n);
        {
            let x = self.input(OP, "x", x, n)?;
            let part = self.output(OP, "partials", partials, blocks)?;
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let n64 = n as u64;
            self.launch(
                Kernel::SumsqPartialF32,
                cfg,
                &[x.arg(), Arg::from(n64), part.arg()],
            )?;
        }
        self.sumsq_finish(OP, &*partials, blocks, out)
    }

    /// One block adds `n` f64 partials in a fixed order into `out[0]`.
    pub(crate) fn sumsq_finish(
        &self,
        op: &'static str,
        partials: &dyn DevicePtr<f64>,
        n: usize,
        out: &mut dyn DevicePtrMut<f64>,
    ) -> Result<()> {
        let part = self.input(op, "partials", partials, n)?;
        let out = self.output(op, "out", out, 1)?;
        let n = int(op, "partials", n)?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            Kernel::SumsqFinish,
            cfg,
            &[part.arg(), Arg::from(n), out.arg()],
        )
    }

    /// The second stage of the column sums: `out[o][c] (+)= Σ_k part[offset + (o·chunks + k)·n + c]`,
    /// chunks in order. One thread per output element.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn reduce_partials(
        &self,
        op: &'static str,
        part: &dyn DevicePtr<f32>,
        offset: usize,
        out: &mut dyn DevicePtrMut<f32>,
        outs: usize,
        chunks: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        let total = outs * n;
        let part = self.input(op, "workspace", part, offset + total * chunks)?;
        let out = self.output(op, "out", out, total)?;
        let base = part.ptr + (offset * std::mem::size_of::<f32>()) as u64;
        self.launch_reduce_partials(op, base, &out, outs, chunks, n, accumulate)
    }

    /// [`Gpu::reduce_partials`] on pointers already checked: `part` holds `outs·chunks·n` f32 from
    /// its address on, and `out` `outs·n`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_reduce_partials(
        &self,
        op: &'static str,
        part: u64,
        out: &Ptr<'_>,
        outs: usize,
        chunks: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        let total = outs * n;
        let (outs, chunks, n, acc) = (
            int(op, "outs", outs)?,
            int(op, "chunks", chunks)?,
            int(op, "n", n)?,
            accumulate as i32,
        );
        self.launch(
            Kernel::ReducePartials,
            elementwise_cfg(total),
            &[
                Arg::from(part),
                out.arg(),
                Arg::from(outs),
                Arg::from(chunks),
                Arg::from(n),
                Arg::from(acc),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_rows_lengths() {
        let d = SumRowsDims {
            groups: 3,
            rows: 5,
            n: 4,
            ld: 10,
            out_groups: 1,
        };
        assert_eq!(d.src_len(), 14 * 10 + 4);
        assert_eq!(sum_rows_workspace_len(&d), 4);
        assert_eq!(sum_squares_partials_len(1), 1);
        assert_eq!(sum_squares_partials_len(10_000_000), 1024);
    }
}
