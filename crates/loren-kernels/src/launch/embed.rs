//! Launchers for `kernels/embed.cu`: patchify, token embedding, class token.

use crate::bf16;
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::elementwise::SumRowsDims;
use super::{elementwise_cfg, groups_ok, int, positive, product};
use crate::error::{KernelError, Result};
use crate::gpu::{Arg, Gpu};
use crate::sources::Kernel;

/// The shapes of the token embedding: x[g, b] = [cls[g] ; pe[g, b]] + pos[g].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmbedDims {
    /// G, the output groups (the largest of the three below).
    pub groups: usize,
    /// Groups of the patch embeddings pe [ge, B, P, D] bf16.
    pub pe_groups: usize,
    /// Groups of the class token cls [gc, D] f32.
    pub cls_groups: usize,
    /// Groups of the positional embedding pos [gp, P + 1, D] f32.
    pub pos_groups: usize,
    pub batch: usize,
    /// P, patches per image (T = P + 1 tokens).
    pub patches: usize,
    pub dim: usize,
}

impl EmbedDims {
    fn check(&self, op: &'static str) -> Result<()> {
        positive(op, "groups", self.groups)?;
        positive(op, "batch", self.batch)?;
        positive(op, "patches", self.patches)?;
        positive(op, "dim", self.dim)?;
        groups_ok(op, "pe", self.pe_groups, self.groups)?;
        groups_ok(op, "cls", self.cls_groups, self.groups)?;
        groups_ok(op, "pos", self.pos_groups, self.groups)?;
        if self.pe_groups.max(self.cls_groups).max(self.pos_groups) != self.groups {
            return Err(KernelError::invalid(
                op,
                "no input has the output's group count",
            ));
        }
        int(
            op,
            "G·B·T·D",
            product(op, &[self.groups, self.batch, self.tokens(), self.dim])?,
        )?;
        Ok(())
    }
    /// The class-token rows of dx summed over batch items (and over groups for a shared cls):
    /// the [`SumRowsDims`] for [`Gpu::sum_rows_bf16`] giving dcls [gc, D] f32.
    pub fn dcls_rows(&self) -> SumRowsDims {
        SumRowsDims {
            groups: self.groups,
            rows: self.batch,
            n: self.dim,
            ld: self.tokens() * self.dim,
            out_groups: self.cls_groups,
        }
    }

    /// dx summed over batch items (and groups for a shared pos): the [`SumRowsDims`] for
    /// [`Gpu::sum_rows_bf16`] giving dpos [gp, T, D] f32.
    pub fn dpos_rows(&self) -> SumRowsDims {
        SumRowsDims {
            groups: self.groups,
            rows: self.batch,
            n: self.tokens() * self.dim,
            ld: self.tokens() * self.dim,
            out_groups: self.pos_groups,
        }
    }

    fn tokens(&self) -> usize {
        self.patches + 1
    }
    fn x_len(&self) -> usize {
        self.groups * self.batch * self.tokens() * self.dim
    }
    fn pe_len(&self) -> usize {
        self.pe_groups * self.batch * self.patches * self.dim
    }
}

/// Images on the device: f32, or bf16 as a GPU batch is staged (the patches round to bf16 anyway,
/// so rounding on the host halves the copy and gives the same patches).
pub enum Images<'a> {
    F32(&'a dyn DevicePtr<f32>),
    Bf16(&'a dyn DevicePtr<bf16>),
}

impl Gpu {
    /// Cut images [B, C, H, W] (f32 or bf16) into p×p patches: out [1, B, P, C·p·p] bf16, patches in
    /// row-major grid order, features in (channel, row, column) order, so a convolution weight
    /// [D, C, p, p] flattens to the matching [D, C·p·p].
    #[allow(clippy::too_many_arguments)]
    pub fn patchify(
        &self,
        batch: usize,
        channels: usize,
        height: usize,
        width: usize,
        patch: usize,
        images: Images<'_>,
        out: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "patchify";
        for (what, v) in [("batch", batch), ("channels", channels), ("patch", patch)] {
            positive(OP, what, v)?;
        }
        if !height.is_multiple_of(patch)
            || !width.is_multiple_of(patch)
            || height == 0
            || width == 0
        {
            return Err(KernelError::invalid(
                OP,
                format!("patch size {patch} does not tile {height}×{width} images"),
            ));
        }
        let total = product(OP, &[batch, channels, height, width])?;
        int(OP, "B·C·H·W", total)?;
        let (kernel, images) = match images {
            Images::F32(i) => (Kernel::Patchify, self.input(OP, "images", i, total)?),
            Images::Bf16(i) => (Kernel::PatchifyBf16, self.input(OP, "images", i, total)?),
        };
        let out = self.output(OP, "patches", out, total)?;
        let (b, c, h, w, p) = (
            batch as i32,
            channels as i32,
            height as i32,
            width as i32,
            patch as i32,
        );
        self.launch(
            kernel,
            elementwise_cfg(total),
            &[
                images.arg(),
                out.arg(),
                Arg::from(b),
                Arg::from(c),
                Arg::from(h),
                Arg::from(w),
                Arg::from(p),
            ],
        )
    }

    /// `x[g, b, 0] = cls[g] + pos[g, 0]`, `x[g, b, 1 + p] = pe[g, b, p] + pos[g, 1 + p]` (group
    /// indices broadcast), summed in f32: x [G, B, P + 1, D] bf16.
    pub fn embed_tokens_forward(
        &self,
        d: &EmbedDims,
        pe: &dyn DevicePtr<bf16>,
        cls: &dyn DevicePtr<f32>,
        pos: &dyn DevicePtr<f32>,
        x: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "embed_tokens_forward";
        d.check(OP)?;
        let pe = self.input(OP, "pe", pe, d.pe_len())?;
        let cls = self.input(OP, "cls", cls, d.cls_groups * d.dim)?;
        let pos = self.input(OP, "pos", pos, d.pos_groups * d.tokens() * d.dim)?;
        let x = self.output(OP, "x", x, d.x_len())?;
        let (ge, gc, gp, g, b, p, dim) = (
            d.pe_groups as i32,
            d.cls_groups as i32,
            d.pos_groups as i32,
            d.groups as i32,
            d.batch as i32,
            d.patches as i32,
            d.dim as i32,
        );
        self.launch(
            Kernel::EmbedTokensFwd,
            elementwise_cfg(d.x_len()),
            &[
                pe.arg(),
                cls.arg(),
                pos.arg(),
                x.arg(),
                Arg::from(ge),
                Arg::from(gc),
                Arg::from(gp),
                Arg::from(g),
                Arg::from(b),
                Arg::from(p),
                Arg::from(dim),
            ],
        )
    }

    /// `dpe[e, b, p] = Σ_{g → e} dx[g, b, 1 + p]`: dpe [ge, B, P, D] bf16.
    pub fn embed_tokens_backward_patches(
        &self,
        d: &EmbedDims,
        dx: &dyn DevicePtr<bf16>,
        dpe: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "embed_tokens_backward_patches";
        d.check(OP)?;
        let dx = self.input(OP, "dx", dx, d.x_len())?;
        let dpe = self.output(OP, "dpe", dpe, d.pe_len())?;
        let (ge, g, b, p, dim) = (
            d.pe_groups as i32,
            d.groups as i32,
            d.batch as i32,
            d.patches as i32,
            d.dim as i32,
        );
        self.launch(
            Kernel::EmbedTokensBwdPatches,
            elementwise_cfg(d.pe_len()),
            &[
                dx.arg(),
                dpe.arg(),
                Arg::from(ge),
                Arg::from(g),
                Arg::from(b),
                Arg::from(p),
                Arg::from(dim),
            ],
        )
    }

    /// `y[s] = x[s, 0]` for the `sequences` (= G·B) sequences: x [G·B, T, D] → y [G·B, D], bf16.
    pub fn class_token_forward(
        &self,
        sequences: usize,
        tokens: usize,
        dim: usize,
        x: &dyn DevicePtr<bf16>,
        y: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "class_token_forward";
        for (what, v) in [("sequences", sequences), ("tokens", tokens), ("dim", dim)] {
            positive(OP, what, v)?;
        }
        int(OP, "G·B·T·D", product(OP, &[sequences, tokens, dim])?)?;
        let x = self.input(OP, "x", x, sequences * tokens * dim)?;
        let y = self.output(OP, "y", y, sequences * dim)?;
        let (s, t, dm) = (sequences as i32, tokens as i32, dim as i32);
        self.launch(
            Kernel::ClassTokenFwd,
            elementwise_cfg(sequences * dim),
            &[x.arg(), y.arg(), Arg::from(s), Arg::from(t), Arg::from(dm)],
        )
    }

    /// `dx[s, 0] = dy[s]`, `dx[s, t > 0] = 0` (every element written): dx [G·B, T, D] bf16.
    pub fn class_token_backward(
        &self,
        sequences: usize,
        tokens: usize,
        dim: usize,
        dy: &dyn DevicePtr<bf16>,
        dx: &mut dyn DevicePtrMut<bf16>,
    ) -> Result<()> {
        const OP: &str = "class_token_backward";
        for (what, v) in [("sequences", sequences), ("tokens", tokens), ("dim", dim)] {
            positive(OP, what, v)?;
        }
        let total = product(OP, &[sequences, tokens, dim])?;
        int(OP, "G·B·T·D", total)?;
        let dy = self.input(OP, "dy", dy, sequences * dim)?;
        let dx = self.output(OP, "dx", dx, total)?;
        let (s, t, dm) = (sequences as i32, tokens as i32, dim as i32);
        self.launch(
            Kernel::ClassTokenBwd,
            elementwise_cfg(total),
            &[
                dy.arg(),
                dx.arg(),
                Arg::from(s),
                Arg::from(t),
                Arg::from(dm),
            ],
        )
    }
}
