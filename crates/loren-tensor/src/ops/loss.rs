//! Softmax cross-entropy over the ensemble's logits [M, B, C], with targets shared by the
//! members, and the logits' gradient computed in the same pass.
//!
//! The loss is the mean over members and samples, so each member's gradient is its own mean
//! cross-entropy gradient divided by M.

use rayon::prelude::*;

use super::expect_rank;
use crate::device::Booked;
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

/// Write the softmax of `z` into `p` and return log Σ exp(z) in two parts, max z and
/// ln Σ exp(z − max z): added in f32 for logits of 1e4 and more, the second would be lost to the
/// first's rounding.
///
/// The sum is in f64: in f32, one element at a time, its error grows with the class count (the
/// probabilities summed to 1 ± 3e-3 at 10^5 classes, and to 2 at 2^25).
fn softmax_row(p: &mut [f32], z: &[f32]) -> (f32, f32) {
    let mx = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for (p, z) in p.iter_mut().zip(z) {
        *p = super::math::exp(z - mx);
        sum += *p as f64;
    }
    let s = sum as f32;
    p.iter_mut().for_each(|p| *p /= s);
    (mx, sum.ln() as f32)
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
        let _t_booked = Booked::new(dev, MemTag::Workspace, size_of_val(targets) as u64);
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
            let (mx, ln_sum) = softmax_row(g, z);
            g.iter_mut().for_each(|g| *g *= inv);
            g[y] -= inv;
            (mx - z[y]) + ln_sum
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    /// Each row's loss in f64, from the f32 logits.
    fn losses_f64(z: &[f32], c: usize, targets: &[u32]) -> Vec<f64> {
        z.chunks(c)
            .enumerate()
            .map(|(i, z)| {
                let z: Vec<f64> = z.iter().map(|&v| v as f64).collect();
                let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = z.iter().map(|v| (v - mx).exp()).sum();
                mx - z[targets[i % targets.len()] as usize] + sum.ln()
            })
            .collect()
    }

    /// Many classes, where an f32 sum drifts, and logits of 1e6 and 3e38, where max + ln(sum)
    /// loses ln(sum) to the rounding: the loss and probabilities as f64 makes them.
    #[test]
    fn the_loss_is_accurate_at_many_classes_and_large_logits() {
        let dev = Device::cpu();
        let many: Vec<f32> = (0..100_000)
            .map(|i| if i == 0 { 12.0 } else { (i % 7) as f32 * 0.01 })
            .collect();
        for (z, c) in [
            (many, 100_000),
            (vec![1e6, 1e6 - 5.0], 2),
            (vec![3e38, 3e38, -3e38, -3e38], 2),
            (vec![1e4, 1e4 - 10.0, 1e4 - 20.0], 3),
        ] {
            let rows = z.len() / c;
            let targets = vec![0u32; rows];
            let logits = Tensor::from_vec(z.clone(), [1, rows, c], MemTag::Workspace, &dev);
            let out = softmax_cross_entropy(&logits.unwrap(), &targets).unwrap();
            let want = losses_f64(&z, c, &targets);
            let want = want.iter().sum::<f64>() / rows as f64;
            let got = out.loss.to_vec().unwrap()[0] as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "C={c}, z[0]={}: loss {got:e} against {want:e}",
                z[0]
            );
            let p = softmax(&Tensor::from_vec(z, [rows, c], MemTag::Workspace, &dev).unwrap())
                .unwrap()
                .to_vec()
                .unwrap();
            for row in p.chunks(c) {
                let sum: f64 = row.iter().map(|&v| v as f64).sum();
                assert!(
                    (sum - 1.0).abs() < 1e-5,
                    "C={c}: probabilities sum to {sum}"
                );
            }
        }
    }
}
