//! DropKey (Li et al., CVPR 2023): dropout on attention scores before the softmax, the MC Dropout
//! of the LoRA-Ensemble paper's baselines. A dropped score gets no weight; the surviving keys of
//! the row share it, so no rescaling is needed. A row whose every key is dropped attends to all
//! keys alike, as DropKey's additive −1e12 does in f32, and carries a log-sum-exp of −∞ so that
//! the backward knows it (its scores then have no gradient).
//!
//! Which scores drop is a hash of (seed, member, item, head, query, key), not a stored mask: the
//! backward and a recomputed block draw the same mask again for free, and the CUDA kernels
//! (`kernels/attention.cu`, `drop_*`) compute the very same bits. An item is an image's place in
//! the whole prediction, not in its batch ([`DropKey::starting_at`]), so a prediction split into
//! batches of any size draws the masks one batch would.

use crate::error::{Error, Result};

/// A scaled score that loses to every real one: e^(it − max) is exactly 0 beside any kept key.
pub const DROPPED_SCORE: f32 = -1e30;

/// Dropout on attention scores, drawn per output group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropKey {
    /// A score drops when its 32-bit hash is below this: round(rate · 2³²).
    pub threshold: u32,
    /// The draw: a training step's, or a fixed one for predictions.
    pub seed: u64,
    /// The output groups: members, each drawing masks of its own, even where Q, K and V are
    /// shared (group 1) and so would otherwise give one group.
    pub members: usize,
    /// The item the batch's first row is: batch row b draws item `first_item + b`'s masks.
    pub first_item: u64,
}

impl DropKey {
    /// Drop each score with probability `rate` (in [0, 1)).
    pub fn new(rate: f32, seed: u64, members: usize) -> Result<DropKey> {
        if !(0.0..1.0).contains(&rate) {
            return Err(Error::invalid(
                "attention",
                format!("DropKey rate must be in [0, 1), got {rate}"),
            ));
        }
        if members == 0 {
            return Err(Error::invalid(
                "attention",
                "DropKey needs at least 1 member",
            ));
        }
        let threshold = (rate as f64 * 4_294_967_296.0).round().min(u32::MAX as f64) as u32;
        Ok(DropKey {
            threshold,
            seed,
            members,
            first_item: 0,
        })
    }

    /// The same draw for a batch whose first row is item `first_item` of a larger prediction.
    pub fn starting_at(self, first_item: u64) -> DropKey {
        DropKey { first_item, ..self }
    }

    /// The stream of one (member, batch row, head): every row's hash starts from it.
    pub fn head_stream(&self, g: usize, b: usize, h: usize) -> u32 {
        let item = self.first_item.wrapping_add(b as u64);
        let s = mix64(self.seed ^ mix64(g as u64 ^ 0x6D65_6D62_6572_0000));
        let s = mix64(s ^ mix64(item ^ 0x6261_7463_6800_0000));
        mix64(s ^ mix64(h as u64 ^ 0x6865_6164_0000_0000)) as u32
    }

    /// The hash of query row `i`, from its head's stream.
    pub fn row(stream: u32, i: usize) -> u32 {
        hash32(stream ^ (i as u32).wrapping_mul(0x9E37_79B9))
    }

    /// Whether key `j` is dropped from the row whose hash is `row`.
    #[inline]
    pub fn dropped(&self, row: u32, j: usize) -> bool {
        hash32(row ^ j as u32) < self.threshold
    }
}

/// splitmix64's finaliser.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A 32-bit finaliser with full avalanche (Wellons' lowbias32): cheap enough per score.
#[inline]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB_352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846C_A68B);
    x ^ (x >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_at_the_rate_asked_and_independently_per_member() {
        let dk = DropKey::new(0.2, 7, 2).unwrap();
        let (mut n, mut dropped, mut both) = (0u64, [0u64; 2], 0u64);
        for b in 0..8 {
            for h in 0..4 {
                let s = [dk.head_stream(0, b, h), dk.head_stream(1, b, h)];
                for i in 0..50 {
                    let r = s.map(|s| DropKey::row(s, i));
                    for j in 0..50 {
                        let d = r.map(|r| dk.dropped(r, j));
                        n += 1;
                        dropped[0] += d[0] as u64;
                        dropped[1] += d[1] as u64;
                        both += (d[0] && d[1]) as u64;
                    }
                }
            }
        }
        // 80,000 draws: the standard deviation of a rate is 0.0014.
        for d in dropped {
            let rate = d as f64 / n as f64;
            assert!((rate - 0.2).abs() < 0.01, "rate {rate}");
        }
        let joint = both as f64 / n as f64;
        assert!((joint - 0.04).abs() < 0.005, "joint rate {joint}");
    }

    #[test]
    fn a_batch_row_draws_the_masks_of_its_item() {
        let whole = DropKey::new(0.3, 11, 2).unwrap();
        let part = whole.starting_at(5);
        for (g, h) in [(0, 0), (1, 3)] {
            assert_eq!(part.head_stream(g, 0, h), whole.head_stream(g, 5, h));
            assert_eq!(part.head_stream(g, 2, h), whole.head_stream(g, 7, h));
        }
        assert_ne!(part.head_stream(0, 0, 0), whole.head_stream(0, 0, 0));
    }

    #[test]
    fn rate_zero_drops_nothing_and_bad_rates_are_refused() {
        let dk = DropKey::new(0.0, 1, 1).unwrap();
        let r = DropKey::row(dk.head_stream(0, 0, 0), 3);
        assert!((0..1000).all(|j| !dk.dropped(r, j)));
        for bad in [1.0, -0.1, f32::NAN] {
            assert!(DropKey::new(bad, 1, 1).is_err(), "{bad}");
        }
    }
}
