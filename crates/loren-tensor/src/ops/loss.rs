//! Softmax cross-entropy over the ensemble's logits [M, B, C], with targets shared by the
//! members, and the logits' gradient computed in the same pass.
//!
//! The loss is the mean over members and samples, so each member's gradient is its own mean
//! cross-entropy gradient divided by M.

use rayon::prelude::*;

use super::expect_rank;
use crate::error::{Error, Result};
use crate::memory::MemTag;
use crate::tensor::Tensor;

const OP: &str = "softmax_cross_entropy";

#[derive(Debug)]
pub struct LossOutput {
    /// The mean loss, `[1]`.
    pub loss: Tensor,
    /// d loss / d logits, [M, B, C].
    pub dlogits: Tensor,
}

fn check(logits: &Tensor, targets: &[u32]) -> Result<(usize, usize, usize)> {
    expect_rank(OP, logits, 3, "logits [M, B, C]")?;
    let [m, b, c] = [logits.dims()[0], logits.dims()[1], logits.dims()[2]];
    if targets.len() != b {
        return Err(Error::invalid(
            OP,
            format!(
                "{} targets for a batch of {b} ({})",
                targets.len(),
                logits.shape()
            ),
        ));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= c) {
        return Err(Error::invalid(
            OP,
            format!("target {bad} is out of range for {c} classes"),
        ));
    }
    if m * b * c == 0 {
        return Err(Error::invalid(
            OP,
            format!("empty logits {}", logits.shape()),
        ));
    }
    Ok((m, b, c))
}

/// Write the softmax of `z` into `p` and return log Σ exp(z).
fn softmax_row(p: &mut [f32], z: &[f32]) -> f32 {
    let mx = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for (p, z) in p.iter_mut().zip(z) {
        *p = super::math::exp(z - mx);
        sum += *p;
    }
    p.iter_mut().for_each(|p| *p /= sum);
    mx + sum.ln()
}

pub fn softmax_cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<LossOutput> {
    let (m, b, c) = check(logits, targets)?;
    let dev = logits.device();
    if let Some(gpu) = dev.gpu() {
        // The targets are data: they come in from the host with the batch.
        let t = gpu
            .stream()
            .clone_htod(targets)
            .map_err(crate::tensor::cuda(OP))?;
        let mut dlogits = Tensor::empty([m, b, c], MemTag::Workspace, dev)?;
        let mut losses = Tensor::empty([m * b], MemTag::Workspace, dev)?;
        let mut loss = Tensor::empty([1], MemTag::Workspace, dev)?;
        gpu.softmax_cross_entropy(
            m,
            b,
            c,
            logits.cu_f32(OP)?,
            &t,
            losses.cu_f32_mut(OP)?,
            dlogits.cu_f32_mut(OP)?,
            loss.cu_f32_mut(OP)?,
        )?;
        return Ok(LossOutput { loss, dlogits });
    }
    let zs = logits.as_slice()?;
    let mut dlogits = Tensor::empty([m, b, c], MemTag::Workspace, dev)?;
    let inv = 1.0 / (m * b) as f32;
    let losses: Vec<f32> = dlogits
        .as_mut_slice()?
        .par_chunks_mut(c)
        .zip(zs.par_chunks(c))
        .enumerate()
        .map(|(i, (g, z))| {
            let y = targets[i % b] as usize;
            let lse = softmax_row(g, z);
            g.iter_mut().for_each(|g| *g *= inv);
            g[y] -= inv;
            lse - z[y]
        })
        .collect();
    // Summed in order, in f64: the loss is reproducible and exact to f32.
    let loss = losses.iter().map(|&l| l as f64).sum::<f64>() / (m * b) as f64;
    Ok(LossOutput {
        loss: Tensor::from_vec(vec![loss as f32], [1], MemTag::Workspace, dev)?,
        dlogits,
    })
}

/// Softmax over the last axis, for predictions.
pub fn softmax(logits: &Tensor) -> Result<Tensor> {
    let c = logits.shape().last();
    if c == 0 {
        return Err(Error::invalid(
            "softmax",
            format!("no classes in {}", logits.shape()),
        ));
    }
    if let Some(gpu) = logits.device().gpu() {
        let mut p = Tensor::empty(logits.shape().clone(), MemTag::Activations, logits.device())?;
        gpu.softmax(
            logits.numel() / c,
            c,
            logits.cu_f32("softmax")?,
            p.cu_f32_mut("softmax")?,
        )?;
        return Ok(p);
    }
    let mut p = Tensor::empty(logits.shape().clone(), MemTag::Activations, logits.device())?;
    p.as_mut_slice()?
        .par_chunks_mut(c)
        .zip(logits.as_slice()?.par_chunks(c))
        .for_each(|(p, z)| {
            softmax_row(p, z);
        });
    Ok(p)
}
