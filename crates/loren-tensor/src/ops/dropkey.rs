//! DropKey (Li et al., CVPR 2023): dropout on attention scores before the softmax, the MC Dropout
//! of the LoRA-Ensemble paper's baselines. A dropped score gets no weight; the surviving keys of
//! the row share it, so no rescaling is needed. A row whose every key is dropped attends to all
//! keys alike, as DropKey's additive −1e12 does in f32, and carries a log-sum-exp of −∞ so that
//! the backward knows it (its scores then have no gradient).
//!
//! Which scores drop is a hash of (seed, member, item, head, query, key), not a stored mask: the
//! backward and a recomputed block draw the same mask again for free, and the CUDA kernels
//! (`kernels/attention.cu`, `drop_*`) compute the very same bits. A batch row's item is its row
//! number, or, with [`ItemKeys`], a key the caller gives it: a prediction keys each image by its
//! content ([`image_key`]), so an image draws the same masks in any batch, at any place and in
//! any order.

use std::sync::Arc;

use loren_kernels::CudaSlice;
use rayon::prelude::*;

use crate::device::{Booked, Device};
use crate::error::{Error, Result};
use crate::memory::MemTag;

/// A scaled score that loses to every real one: e^(it − max) is exactly 0 beside any kept key.
pub const DROPPED_SCORE: f32 = -1e30;

/// Dropout on attention scores, drawn per output group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropKey {
    /// A score drops when its 32-bit hash is below this: round(rate · 2³²).
    pub threshold: u32,
    /// The draw: a training step's, or a fixed one for predictions.
    pub seed: u64,
    /// The output groups: members, each drawing masks of its own, even where Q, K and V are
    /// shared (group 1) and so would otherwise give one group.
    pub members: usize,
    /// Each batch row's item; without them, row b is item b.
    pub items: Option<ItemKeys>,
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
            items: None,
        })
    }

    /// The same draw with batch row b drawing the masks of item `items[b]`.
    pub fn with_items(self, items: ItemKeys) -> DropKey {
        DropKey {
            items: Some(items),
            ..self
        }
    }

    /// The item batch row `b` draws the masks of.
    pub fn item(&self, b: usize) -> u64 {
        self.items.as_ref().map_or(b as u64, |k| k.keys()[b])
    }

    /// The stream of one (member, batch row, head): every row's hash starts from it.
    pub fn head_stream(&self, g: usize, b: usize, h: usize) -> u32 {
        let item = self.item(b);
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

/// One u64 per batch row naming the item whose masks the row draws, on the host and, on a GPU,
/// on the device: copied there once, when made at the start of a pass, and read by every
/// attention kernel of the pass. Clones share the one copy; its device bytes are counted as
/// workspace while any clone lives.
#[derive(Clone)]
pub struct ItemKeys(Arc<Keys>);

struct Keys {
    host: Vec<u64>,
    /// The device copy, booked as workspace.
    cuda: Option<(CudaSlice<u64>, Booked)>,
    device: Device,
}

impl ItemKeys {
    pub fn new(keys: Vec<u64>, device: &Device) -> Result<ItemKeys> {
        let cuda = match device.gpu() {
            None => None,
            Some(gpu) => {
                let slice = gpu
                    .stream()
                    .clone_htod(&keys)
                    .map_err(crate::tensor::cuda("item keys"))?;
                let booked = Booked::new(device, MemTag::Workspace, bytes(&keys));
                Some((slice, booked))
            }
        };
        Ok(ItemKeys(Arc::new(Keys {
            host: keys,
            cuda,
            device: device.clone(),
        })))
    }

    pub fn keys(&self) -> &[u64] {
        &self.0.host
    }

    pub fn device(&self) -> &Device {
        &self.0.device
    }

    /// The device copy (on a GPU).
    pub(crate) fn cuda(&self) -> Option<&CudaSlice<u64>> {
        self.0.cuda.as_ref().map(|(slice, _)| slice)
    }
}

fn bytes(keys: &[u64]) -> u64 {
    std::mem::size_of_val(keys) as u64
}

impl PartialEq for ItemKeys {
    fn eq(&self, other: &ItemKeys) -> bool {
        self.keys() == other.keys()
    }
}
impl Eq for ItemKeys {}

impl std::fmt::Debug for ItemKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ItemKeys").field(&self.keys()).finish()
    }
}

/// The key of an image, from its values alone (a zero's sign aside, so equal values give equal
/// keys): the item [`ItemKeys`] names for its masks.
pub fn image_key(values: &[f32]) -> u64 {
    let word = |x: f32| if x == 0.0 { 0 } else { x.to_bits() as u64 };
    let mut h = mix64(values.len() as u64 ^ 0x696D_6167_6500_0000);
    for pair in values.chunks(2) {
        let w = word(pair[0]) | pair.get(1).map_or(0, |&x| word(x) << 32);
        h = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    mix64(h)
}

/// [`image_key`] of each image in `images`, `per_image` values each.
pub fn image_keys(images: &[f32], per_image: usize) -> Vec<u64> {
    images.par_chunks(per_image.max(1)).map(image_key).collect()
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
        let rows = DropKey::new(0.3, 11, 2).unwrap();
        let keys = ItemKeys::new(vec![5, 7, 5], &Device::cpu()).unwrap();
        let keyed = rows.clone().with_items(keys);
        for (g, h) in [(0, 0), (1, 3)] {
            assert_eq!(keyed.head_stream(g, 0, h), rows.head_stream(g, 5, h));
            assert_eq!(keyed.head_stream(g, 1, h), rows.head_stream(g, 7, h));
            assert_eq!(keyed.head_stream(g, 2, h), keyed.head_stream(g, 0, h));
        }
        assert_ne!(keyed.head_stream(0, 0, 0), rows.head_stream(0, 0, 0));
    }

    #[test]
    fn an_image_key_follows_the_values_alone() {
        let a: Vec<f32> = (0..3 * 7 * 5).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut b = a.clone();
        assert_eq!(image_key(&a), image_key(&b));
        b[100] = f32::from_bits(b[100].to_bits() + 1);
        assert_ne!(image_key(&a), image_key(&b), "one ulp of one value");
        let (zero, minus_zero) = (vec![0.0f32, 1.0, 0.0], vec![-0.0f32, 1.0, 0.0]);
        assert_eq!(image_key(&zero), image_key(&minus_zero));
        // The odd value pairs with a zero: only the length tells these apart.
        assert_ne!(image_key(&[1.0]), image_key(&[1.0, 0.0]));
        let two = [a.clone(), b].concat();
        assert_eq!(
            image_keys(&two, a.len()),
            [image_key(&two[..a.len()]), image_key(&two[a.len()..])]
        );
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
