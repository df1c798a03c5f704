//! The ViT's input side: images cut into patch vectors, then the class token and the learned
//! positional embedding put around the embedded patches; and, at the end, the class token taken
//! back out for the head.

use rayon::prelude::*;

use super::elementwise::{reduce_to_groups, sum_rows};
use super::{broadcast_groups, expect_rank, group_index, same_device};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::tensor::Tensor;

/// Cut images [B, C, H, W] into non-overlapping `p×p` patches: [1, B, P, C·p·p], patches in
/// row-major grid order and each patch's features in (channel, row, column) order, so a
/// convolution weight [D, C, p, p] flattens to the matching [D, C·p·p].
pub fn patchify(images: &Tensor, p: usize) -> Result<Tensor> {
    const OP: &str = "patchify";
    expect_rank(OP, images, 4, "images [B, C, H, W]")?;
    let [b, c, h, w] = [
        images.dims()[0],
        images.dims()[1],
        images.dims()[2],
        images.dims()[3],
    ];
    if p == 0 || h % p != 0 || w % p != 0 {
        return Err(Error::invalid(
            OP,
            format!("patch size {p} does not tile {h}×{w} images"),
        ));
    }
    let (gh, gw) = (h / p, w / p);
    let feat = c * p * p;
    let dev = images.device();
    let mut out = Tensor::empty_as(
        [1, b, gh * gw, feat],
        dev.compute_dtype(),
        MemTag::Activations,
        dev,
    )?;
    if let Some(gpu) = dev.gpu() {
        let images = match images.dtype() {
            DType::F32 => loren_kernels::Images::F32(images.cu_f32(OP)?),
            DType::BF16 => loren_kernels::Images::Bf16(images.cu_bf16(OP)?),
        };
        gpu.patchify(b, c, h, w, p, images, out.cu_bf16_mut(OP)?)?;
        return Ok(out);
    }
    let src = images.as_slice()?;
    out.as_mut_slice()?
        .par_chunks_mut(feat)
        .enumerate()
        .for_each(|(bp, o)| {
            let (bi, patch) = (bp / (gh * gw), bp % (gh * gw));
            let (py, px) = (patch / gw, patch % gw);
            for ch in 0..c {
                for i in 0..p {
                    let row = &src[((bi * c + ch) * h + py * p + i) * w + px * p..][..p];
                    o[(ch * p + i) * p..][..p].copy_from_slice(row);
                }
            }
        });
    Ok(out)
}

const TOKENS: &str = "embed_tokens";

struct TokenDims {
    groups: usize,
    ge: usize,
    gc: usize,
    gp: usize,
    batch: usize,
    patches: usize,
    d: usize,
}

fn check_tokens(pe: &Tensor, cls: &Tensor, pos: &Tensor) -> Result<TokenDims> {
    expect_rank(TOKENS, pe, 4, "patch embeddings [G, B, P, D]")?;
    expect_rank(TOKENS, cls, 2, "class token [G, D]")?;
    expect_rank(TOKENS, pos, 3, "positional embedding [G, T, D]")?;
    let [_, batch, patches, d] = [pe.dims()[0], pe.dims()[1], pe.dims()[2], pe.dims()[3]];
    if cls.dims()[1] != d {
        return Err(Error::shape(TOKENS, pe.shape(), cls.shape()));
    }
    if pos.dims()[1..] != [patches + 1, d] {
        return Err(Error::shape(TOKENS, pe.shape(), pos.shape()));
    }
    same_device(TOKENS, &[pe, cls, pos])?;
    Ok(TokenDims {
        groups: broadcast_groups(TOKENS, &[pe.shape(), cls.shape(), pos.shape()])?,
        ge: pe.dims()[0],
        gc: cls.dims()[0],
        gp: pos.dims()[0],
        batch,
        patches,
        d,
    })
}

/// `x[g, b, 0] = cls[g] + pos[g, 0]` and `x[g, b, 1 + p] = pe[g, b, p] + pos[g, 1 + p]`.
pub fn embed_tokens_forward(pe: &Tensor, cls: &Tensor, pos: &Tensor) -> Result<Tensor> {
    let dm = check_tokens(pe, cls, pos)?;
    let (t, d) = (dm.patches + 1, dm.d);
    let dev = pe.device();
    let mut x = Tensor::empty_as(
        [dm.groups, dm.batch, t, d],
        dev.compute_dtype(),
        MemTag::Activations,
        dev,
    )?;
    if let Some(gpu) = dev.gpu() {
        let (peb, cf, pf) = (
            pe.cu_bf16(TOKENS)?,
            cls.cu_f32(TOKENS)?,
            pos.cu_f32(TOKENS)?,
        );
        gpu.embed_tokens_forward(&cuda_dims(&dm), peb, cf, pf, x.cu_bf16_mut(TOKENS)?)?;
        return Ok(x);
    }
    let (pes, cs, ps) = (pe.as_slice()?, cls.as_slice()?, pos.as_slice()?);
    x.as_mut_slice()?
        .par_chunks_mut(t * d)
        .enumerate()
        .for_each(|(gb, xo)| {
            let (g, b) = (gb / dm.batch, gb % dm.batch);
            let posg = &ps[group_index(g, dm.gp) * t * d..][..t * d];
            let clsg = &cs[group_index(g, dm.gc) * d..][..d];
            let peg =
                &pes[(group_index(g, dm.ge) * dm.batch + b) * dm.patches * d..][..dm.patches * d];
            for ((o, p), c) in xo[..d].iter_mut().zip(&posg[..d]).zip(clsg) {
                *o = c + p;
            }
            for ((o, p), e) in xo[d..].iter_mut().zip(&posg[d..]).zip(peg) {
                *o = e + p;
            }
        });
    Ok(x)
}

#[derive(Debug, Default)]
pub struct TokenGrads {
    pub dpe: Option<Tensor>,
    pub dcls: Option<Tensor>,
    pub dpos: Option<Tensor>,
}

/// Gradients of [`embed_tokens_forward`]; each is reduced to its input's group count.
pub fn embed_tokens_backward(
    dx: &Tensor,
    pe: &Tensor,
    cls: &Tensor,
    pos: &Tensor,
    need: [bool; 3],
) -> Result<TokenGrads> {
    let dm = check_tokens(pe, cls, pos)?;
    let (t, d, batch) = (dm.patches + 1, dm.d, dm.batch);
    if dx.dims() != [dm.groups, batch, t, d] {
        return Err(Error::shape(
            "embed_tokens_backward",
            dx.shape(),
            pe.shape(),
        ));
    }
    let dev = dx.device();
    if dev.gpu().is_some() {
        return embed_tokens_backward_cuda(&dm, dx, cls, pos, need);
    }
    let dxs = dx.as_slice()?;
    let mut out = TokenGrads::default();
    if need[0] {
        let mut dpe = Tensor::empty([dm.groups, batch, dm.patches, d], MemTag::Workspace, dev)?;
        dpe.as_mut_slice()?
            .par_chunks_mut(dm.patches * d)
            .zip(dxs.par_chunks(t * d))
            .for_each(|(o, x)| o.copy_from_slice(&x[d..]));
        out.dpe = Some(reduce_to_groups(dpe, dm.ge)?);
    }
    if need[1] {
        let first: Vec<f32> = dxs.chunks(t * d).flat_map(|x| &x[..d]).copied().collect();
        let sums = sum_rows(&first, dm.groups, batch, d, dm.gc);
        out.dcls = Some(Tensor::from_vec(
            sums,
            cls.shape().clone(),
            MemTag::Workspace,
            dev,
        )?);
    }
    if need[2] {
        let sums = sum_rows(dxs, dm.groups, batch, t * d, dm.gp);
        out.dpos = Some(Tensor::from_vec(
            sums,
            pos.shape().clone(),
            MemTag::Workspace,
            dev,
        )?);
    }
    Ok(out)
}

/// The class token of every sequence: [G, B, T, D] → [G, B, D].
pub fn class_token_forward(x: &Tensor) -> Result<Tensor> {
    expect_rank("class_token", x, 4, "tokens [G, B, T, D]")?;
    let [g, b, t, d] = [x.dims()[0], x.dims()[1], x.dims()[2], x.dims()[3]];
    if t == 0 || d == 0 {
        return Err(Error::invalid(
            "class_token",
            format!("no class token in {}", x.shape()),
        ));
    }
    let dev = x.device();
    if let Some(gpu) = dev.gpu() {
        let mut y = Tensor::empty_as([g, b, d], dev.compute_dtype(), MemTag::Activations, dev)?;
        gpu.class_token_forward(
            g * b,
            t,
            d,
            x.cu_bf16("class_token")?,
            y.cu_bf16_mut("class_token")?,
        )?;
        return Ok(y);
    }
    let xs = x.as_slice()?;
    let data: Vec<f32> = xs.chunks(t * d).flat_map(|s| &s[..d]).copied().collect();
    Tensor::from_vec(data, [g, b, d], MemTag::Activations, dev)
}

/// The gradient of [`class_token_forward`]: `dy` [G, B, D] placed at token 0 of zeros [G, B, T, D].
pub fn class_token_backward(dy: &Tensor, tokens: usize) -> Result<Tensor> {
    expect_rank("class_token_backward", dy, 3, "gradient [G, B, D]")?;
    let [g, b, d] = [dy.dims()[0], dy.dims()[1], dy.dims()[2]];
    let dev = dy.device();
    if let Some(gpu) = dev.gpu() {
        let mut dx = Tensor::empty_as([g, b, tokens, d], DType::BF16, MemTag::Workspace, dev)?;
        const OP: &str = "class_token_backward";
        gpu.class_token_backward(g * b, tokens, d, dy.cu_bf16(OP)?, dx.cu_bf16_mut(OP)?)?;
        return Ok(dx);
    }
    let mut dx = Tensor::zeros([g, b, tokens, d], MemTag::Workspace, dev)?;
    let dys = dy.as_slice()?;
    dx.as_mut_slice()?
        .par_chunks_mut(tokens * d)
        .zip(dys.par_chunks(d))
        .for_each(|(o, g)| o[..d].copy_from_slice(g));
    Ok(dx)
}

fn cuda_dims(dm: &TokenDims) -> loren_kernels::EmbedDims {
    loren_kernels::EmbedDims {
        groups: dm.groups,
        pe_groups: dm.ge,
        cls_groups: dm.gc,
        pos_groups: dm.gp,
        batch: dm.batch,
        patches: dm.patches,
        dim: dm.d,
    }
}

/// The GPU backward: dpe by a kernel summing over groups for a shared pe; dcls and dpos as
/// deterministic column sums of dx's rows.
fn embed_tokens_backward_cuda(
    dm: &TokenDims,
    dx: &Tensor,
    cls: &Tensor,
    pos: &Tensor,
    need: [bool; 3],
) -> Result<TokenGrads> {
    let dev = dx.device();
    let gpu = dev.require_gpu(TOKENS)?;
    let d = cuda_dims(dm);
    let dxb = dx.cu_bf16(TOKENS)?;
    let column_sums =
        |rows: loren_kernels::SumRowsDims, shape: &crate::shape::Shape| -> Result<Tensor> {
            let mut out = Tensor::empty(shape.clone(), MemTag::Workspace, dev)?;
            let mut ws = Tensor::empty(
                [loren_kernels::sum_rows_workspace_len(&rows)],
                MemTag::Workspace,
                dev,
            )?;
            gpu.sum_rows_bf16(
                &rows,
                dxb,
                ws.cu_f32_mut(TOKENS)?,
                out.cu_f32_mut(TOKENS)?,
                false,
            )?;
            Ok(out)
        };
    let mut out = TokenGrads::default();
    if need[0] {
        let mut dpe = Tensor::empty_as(
            [dm.ge, dm.batch, dm.patches, dm.d],
            DType::BF16,
            MemTag::Workspace,
            dev,
        )?;
        gpu.embed_tokens_backward_patches(&d, dxb, dpe.cu_bf16_mut(TOKENS)?)?;
        out.dpe = Some(dpe);
    }
    if need[1] {
        out.dcls = Some(column_sums(d.dcls_rows(), cls.shape())?);
    }
    if need[2] {
        out.dpos = Some(column_sums(d.dpos_rows(), pos.shape())?);
    }
    Ok(out)
}
