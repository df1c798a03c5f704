//! Image datasets held in memory: the bundled 8×8 digits, their fixed split, shifted and
//! out-of-distribution test sets, augmentation and batching.
//!
//! Every random choice here draws from [`Rng`] seeded by the caller, so a run is reproducible
//! from its seed, and a resumed run sees the same epochs and augmentations.

pub mod affine;
pub mod augment;
pub mod cifar;
pub mod digits;
pub mod error;
pub mod external;
pub mod folder;
pub mod ood;
pub mod orientation;
pub mod pixels;
pub mod prefetch;
pub mod resize;
pub mod shift;
pub mod split;

use loren_tensor::{Device, Rng, Staged};

pub use augment::Augment;
pub use digits::{bundled_digits, bundled_digits_path, load_digits};
pub use error::DataError;
pub use ood::ood_set;
pub use pixels::Pixels;
pub use shift::{ShiftKind, shift_suite, shifted};
pub use split::{SPLIT_SEED, SplitOptions, Splits, split_digits};

/// An image set in memory: images `[N, C, H, W]` with pixels in `[0, 1]`, and one label each.
///
/// Pixels are stored unnormalised so that shifts and augmentations work in pixel units;
/// [`Dataset::batch`] applies `(x - norm_mean[c]) / norm_std[c]` on the way out.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `[N, C, H, W]`, row-major, pixel values in `[0, 1]`: a byte each where the loader read
    /// bytes ([`Pixels`]).
    pub images: Pixels,
    /// `[N]`, each `< classes`.
    pub labels: Vec<u32>,
    pub classes: usize,
    pub class_names: Vec<String>,
    /// Per channel, applied when batching.
    pub norm_mean: Vec<f32>,
    pub norm_std: Vec<f32>,
    /// `[height, width]` that [`Dataset::batch`] resizes to after augmenting, when set
    /// ([`Dataset::resized_on_batch`]): images stay in memory at their own size.
    pub resize_to: Option<[usize; 2]>,
}

/// A batch ready for the model: normalised images `[B, C, H, W]` and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[B, C, H, W]`, normalised: `(x - mean) / std` per channel.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Batch {
    /// `[B, C, H, W]`.
    pub fn image_shape(&self) -> [usize; 4] {
        [self.batch, self.channels, self.height, self.width]
    }

    /// The images copied into the memory they go to `device` from ([`Staged`]): the host's one
    /// pass over them, made on the thread that makes the batches, so the thread that runs the
    /// model only queues their copy ([`loren_tensor::Tensor::from_staged`]).
    pub fn stage(&self, device: &Device) -> loren_tensor::Result<Staged> {
        stage_images(&self.images, self.image_shape(), device)
    }
}

/// Images [B, C, H, W] staged for `device` as the model's first op (patchify) takes them: bf16 on
/// a GPU, since the patches round to bf16 there anyway, so the copy up is half the bytes of f32
/// and the patches the same bits; f32 on the CPU.
pub fn stage_images(
    images: &[f32],
    shape: [usize; 4],
    device: &Device,
) -> loren_tensor::Result<Staged> {
    Staged::new_as(images, shape, device.compute_dtype(), device)
}

impl Dataset {
    /// A checked dataset with identity normalisation (mean 0, std 1); `classes` is
    /// `class_names.len()`. `shape` is `[channels, height, width]`; `images` are f32, or
    /// [`Pixels`] of either kind.
    pub fn new(
        name: impl Into<String>,
        shape: [usize; 3],
        images: impl Into<Pixels>,
        labels: Vec<u32>,
        class_names: Vec<String>,
    ) -> Result<Dataset, DataError> {
        let [channels, height, width] = shape;
        let dataset = Dataset {
            name: name.into(),
            channels,
            height,
            width,
            images: images.into(),
            labels,
            classes: class_names.len(),
            class_names,
            norm_mean: vec![0.0; channels],
            norm_std: vec![1.0; channels],
            resize_to: None,
        };
        dataset.validate()?;
        Ok(dataset)
    }

    /// The same dataset, normalised per channel by `mean` and `std` when batched.
    pub fn with_normalization(
        mut self,
        mean: Vec<f32>,
        std: Vec<f32>,
    ) -> Result<Dataset, DataError> {
        self.norm_mean = mean;
        self.norm_std = std;
        self.validate()?;
        Ok(self)
    }

    /// Checks every invariant the rest of the engine relies on, naming the first one broken.
    pub fn validate(&self) -> Result<(), DataError> {
        let name = || self.name.clone();
        if self.channels == 0 || self.height == 0 || self.width == 0 {
            return Err(DataError::EmptyShape {
                name: name(),
                shape: self.shape(),
            });
        }
        if error::pixel_count(self.labels.len(), self.shape()) != Some(self.images.len()) {
            return Err(DataError::ImageCount {
                name: name(),
                labels: self.labels.len(),
                shape: self.shape(),
                found: self.images.len(),
            });
        }
        if self.classes == 0 || self.class_names.len() != self.classes {
            return Err(DataError::ClassNames {
                name: name(),
                classes: self.classes,
                found: self.class_names.len(),
            });
        }
        if let Some(index) = self.labels.iter().position(|&l| l as usize >= self.classes) {
            return Err(DataError::LabelOutOfRange {
                name: name(),
                index,
                label: self.labels[index],
                classes: self.classes,
            });
        }
        if let Pixels::Steps { levels: 0, .. } = self.images {
            return Err(DataError::ZeroLevels { name: name() });
        }
        if let Some((index, value)) = self.images.first_out_of_range() {
            return Err(DataError::PixelOutOfRange {
                name: name(),
                index,
                value,
            });
        }
        self.validate_normalization()
    }

    fn validate_normalization(&self) -> Result<(), DataError> {
        let lengths_ok =
            self.norm_mean.len() == self.channels && self.norm_std.len() == self.channels;
        let values_ok = self.norm_mean.iter().all(|m| m.is_finite())
            && self.norm_std.iter().all(|s| s.is_finite() && *s > 0.0);
        if lengths_ok && values_ok {
            return Ok(());
        }
        Err(DataError::Normalization {
            name: self.name.clone(),
            channels: self.channels,
            mean: self.norm_mean.clone(),
            std: self.norm_std.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `[channels, height, width]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }

    /// Values in one image: `C·H·W`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Image `i`, `[C, H, W]`, unnormalised. Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> std::borrow::Cow<'_, [f32]> {
        let n = self.image_len();
        self.images.range(i * n, (i + 1) * n)
    }

    /// Image `i` written to `out` (`image_len()` values). Panics if `i >= len()`.
    pub fn read_image(&self, i: usize, out: &mut [f32]) {
        self.images.read(i * self.image_len(), out);
    }

    /// Number of images of each class, indexed by label. Panics on a label not below
    /// `classes`, which [`Dataset::validate`] refuses.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }

    /// The images at `indices`, in that order, keeping classes and normalisation.
    ///
    /// Panics if an index is out of range: indices come from the engine, never from a user.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.image_len();
        Dataset {
            images: self.images.gather(indices.iter().map(|&i| i * n), n),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            ..self.with_no_images()
        }
    }

    /// Same name, shape, classes and normalisation, and no images: the base for derived sets.
    pub(crate) fn with_no_images(&self) -> Dataset {
        Dataset {
            name: self.name.clone(),
            channels: self.channels,
            height: self.height,
            width: self.width,
            images: Pixels::F32(Vec::new()),
            labels: Vec::new(),
            classes: self.classes,
            class_names: self.class_names.clone(),
            norm_mean: self.norm_mean.clone(),
            norm_std: self.norm_std.clone(),
            resize_to: self.resize_to,
        }
    }

    /// The images at `indices`, each augmented when `aug` is given (drawing from its `Rng` in
    /// index order), resized when [`Dataset::resize_to`] is set, then normalised per channel.
    ///
    /// Panics if an index is out of range, or if the public fields disagree (see
    /// [`Dataset::validate`], which [`Trainer`](crate::train::Trainer) and
    /// [`predict`](crate::eval::predict) run first): a caller of its own checks its indices.
    pub fn batch(&self, indices: &[usize], mut aug: Option<(&Augment, &mut Rng)>) -> Batch {
        let [channels, height, width] = self.batch_shape();
        let (n, resampler) = (channels * height * width, self.batch_resampler());
        // Augmentation works at the stored size: into a staging image when resizing follows,
        // from a copy of the stored one (as f32) when augmenting.
        let m = self.image_len();
        let mut native = vec![0.0; resampler.as_ref().map_or(0, |_| m)];
        let mut source = vec![0.0; aug.as_ref().map_or(0, |_| m)];
        let mut images = vec![0.0; indices.len() * n];
        for (out, &i) in images.chunks_exact_mut(n).zip(indices) {
            let staged = match resampler {
                Some(_) => &mut native[..],
                None => &mut out[..],
            };
            match aug.as_mut() {
                Some((augment, rng)) => {
                    self.read_image(i, &mut source);
                    augment.apply(&source, self.shape(), rng, staged)
                }
                None => self.read_image(i, staged),
            }
            if let Some(r) = &resampler {
                r.apply(&native, out);
            }
            self.normalize_in_place(out);
        }
        Batch {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            batch: indices.len(),
            channels,
            height,
            width,
        }
    }

    fn normalize_in_place(&self, image: &mut [f32]) {
        let plane = image.len() / self.channels;
        normalize_planes(image, plane, &self.norm_mean, &self.norm_std);
    }
}

/// `(x - mean[c]) / std[c]` over images `[B, C, H, W]` of planes of `plane` values, C being
/// `mean.len()`: how training, evaluation and `loren::Ensemble` scale raw pixels. Panics
/// when `plane` is 0 or `mean` and `std` are not one value per channel, as
/// [`Dataset::validate`] and an ensemble's loading require them to be.
pub fn normalize_planes(images: &mut [f32], plane: usize, mean: &[f32], std: &[f32]) {
    assert!(
        plane > 0 && !mean.is_empty() && mean.len() == std.len(),
        "normalize_planes: planes of {plane} values, {} means and {} stds",
        mean.len(),
        std.len()
    );
    for (i, values) in images.chunks_mut(plane).enumerate() {
        let (mean, std) = (mean[i % mean.len()], std[i % std.len()]);
        // Divide rather than multiply by 1/std, so the result is the exact quotient.
        values.iter_mut().for_each(|x| *x = (*x - mean) / std);
    }
}

/// Labels that separate the uses of one seed, so that no two streams coincide.
pub(crate) mod stream {
    pub const EPOCH: u64 = 0x4550_4F43_4800_0001;
    pub const SHIFT: u64 = 0x5348_4946_5400_0002;
    pub const OOD: u64 = 0x4F4F_4400_0000_0003;
}

/// The visiting order for one epoch: a permutation of `0..len` that depends only on
/// `(seed, epoch)`, so a run resumed at epoch `e` sees exactly the order it would have seen.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed).fork(stream::EPOCH).fork(epoch);
    let mut order: Vec<usize> = (0..len).collect();
    rng.shuffle(&mut order);
    order
}

/// Chunks an epoch order into batches of `batch_size` indices.
///
/// The last batch keeps the remainder and may be smaller, so every image is seen once per
/// epoch; there are [`num_batches`]`(order.len(), batch_size)` of them.
pub fn batches(
    order: &[usize],
    batch_size: usize,
) -> Result<std::slice::Chunks<'_, usize>, DataError> {
    if batch_size == 0 {
        return Err(DataError::ZeroBatchSize);
    }
    Ok(order.chunks(batch_size))
}

/// Batches per epoch when the last, partial batch is kept: `ceil(len / batch_size)`.
pub fn num_batches(len: usize, batch_size: usize) -> Result<usize, DataError> {
    if batch_size == 0 {
        return Err(DataError::ZeroBatchSize);
    }
    Ok(len.div_ceil(batch_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        // Two 2-channel 2×2 images with distinct values, so any mix-up shows.
        let images: Vec<f32> = (0..16).map(|i| i as f32 / 16.0).collect();
        Dataset::new(
            "tiny",
            [2, 2, 2],
            images,
            vec![1, 0],
            vec!["a".into(), "b".into()],
        )
        .unwrap()
        .with_normalization(vec![0.25, 0.75], vec![0.5, 0.2])
        .unwrap()
    }

    #[test]
    fn data_constructor_rejects_each_broken_invariant() {
        let names = || vec!["a".to_string(), "b".to_string()];
        let err = |r: Result<Dataset, DataError>| r.unwrap_err().to_string();
        let e = err(Dataset::new(
            "x",
            [1, 2, 2],
            vec![0.0; 7],
            vec![0, 1],
            names(),
        ));
        assert!(
            e.contains("`x`") && e.contains("8") && e.contains("found 7"),
            "{e}"
        );
        let e = err(Dataset::new(
            "x",
            [1, 1, 1],
            vec![0.0; 2],
            vec![0, 2],
            names(),
        ));
        assert!(e.contains("label 2") && e.contains("index 1"), "{e}");
        let e = err(Dataset::new(
            "x",
            [1, 1, 1],
            vec![0.0, 1.5],
            vec![0, 1],
            names(),
        ));
        assert!(e.contains("1.5") && e.contains("[0, 1]"), "{e}");
        let e = err(Dataset::new("x", [0, 1, 1], vec![], vec![], names()));
        assert!(e.contains("0x1x1"), "{e}");
        let e = err(Dataset::new("x", [1, 1, 1], vec![0.0], vec![0], vec![]));
        assert!(e.contains("class"), "{e}");
        let e = err(Dataset::new(
            "x",
            [1, 1, 1],
            vec![f32::NAN],
            vec![0],
            names(),
        ));
        assert!(e.contains("NaN"), "{e}");
        let zero_levels = Pixels::Steps {
            bytes: vec![0],
            levels: 0,
        };
        let e = err(Dataset::new("x", [1, 1, 1], zero_levels, vec![0], names()));
        assert!(e.contains("0 levels"), "{e}");
        let ok = Dataset::new("x", [1, 1, 1], vec![0.5], vec![0], names()).unwrap();
        let e = err(ok.clone().with_normalization(vec![0.0], vec![0.0]));
        assert!(e.contains("norm"), "{e}");
        let e = err(ok.with_normalization(vec![0.0, 0.0], vec![1.0, 1.0]));
        assert!(e.contains("norm"), "{e}");
    }

    /// Each plane by its own channel's figures, through every image of a batch.
    #[test]
    fn data_normalize_planes_cycles_the_channels_through_the_images() {
        let (mean, std) = ([0.1f32, 0.2, 0.3], [0.5f32, 0.25, 2.0]);
        let raw: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32 / 24.0).collect();
        let mut got = raw.clone();
        normalize_planes(&mut got, 4, &mean, &std);
        for (i, (&x, &y)) in raw.iter().zip(&got).enumerate() {
            let c = i / 4 % 3;
            assert_eq!(y, (x - mean[c]) / std[c], "value {i}, channel {c}");
        }
    }

    #[test]
    fn data_batch_normalisation_is_exact() {
        let d = tiny();
        let b = d.batch(&[1, 0], None);
        assert_eq!((b.batch, b.channels, b.height, b.width), (2, 2, 2, 2));
        assert_eq!(b.labels, vec![0, 1]);
        for (slot, &i) in [1usize, 0].iter().enumerate() {
            for c in 0..2 {
                for p in 0..4 {
                    let raw = (i * 8 + c * 4 + p) as f32 / 16.0;
                    let want = (raw - d.norm_mean[c]) / d.norm_std[c];
                    assert_eq!(b.images[slot * 8 + c * 4 + p], want);
                }
            }
        }
        let none = d.batch(&[0], Some((&Augment::none(), &mut Rng::new(3))));
        assert_eq!(none.images, d.batch(&[0], None).images);
    }

    /// Bytes are a way of keeping the pixels, not other pixels: the same images kept as f32
    /// give the same batches, augmented and resized, bit for bit.
    #[test]
    fn data_bytes_and_f32_give_the_same_batches() {
        let bytes: Vec<u8> = (0..6 * 3 * 5 * 5).map(|i| (i * 37 % 256) as u8).collect();
        let labels = vec![0, 1, 2, 0, 1, 2];
        let names: Vec<String> = ["a", "b", "c"].map(String::from).into();
        let stepped = Dataset::new(
            "b",
            [3, 5, 5],
            Pixels::Steps { bytes, levels: 255 },
            labels.clone(),
            names.clone(),
        )
        .unwrap()
        .with_normalization(vec![0.4, 0.5, 0.6], vec![0.2, 0.25, 0.3])
        .unwrap()
        .resized_on_batch(7, 7);
        let floats = Dataset {
            images: Pixels::F32(stepped.images.to_f32().into_owned()),
            ..stepped.clone()
        };
        assert_eq!(
            stepped.images.memory_bytes() * 4,
            floats.images.memory_bytes()
        );
        let picks = [4, 0, 5, 5, 2];
        let (mut r1, mut r2) = (Rng::new(3), Rng::new(3));
        let aug = Augment::paper();
        let a = stepped
            .subset(&[5, 1, 2])
            .batch(&[2, 0, 2], Some((&aug, &mut r1)));
        let b = floats
            .subset(&[5, 1, 2])
            .batch(&[2, 0, 2], Some((&aug, &mut r2)));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.images), bits(&b.images));
        let (a, b) = (stepped.batch(&picks, None), floats.batch(&picks, None));
        assert_eq!(bits(&a.images), bits(&b.images));
        assert!(matches!(stepped.subset(&[1]).images, Pixels::Steps { .. }));
    }

    #[test]
    fn data_subset_and_image_pick_the_right_rows() {
        let d = tiny();
        let s = d.subset(&[1, 1, 0]);
        assert_eq!(s.len(), 3);
        assert_eq!(s.labels, vec![0, 0, 1]);
        assert_eq!(s.image(0), d.image(1));
        assert_eq!(s.image(2), d.image(0));
        assert_eq!((s.norm_mean.clone(), s.classes), (d.norm_mean.clone(), 2));
        assert!(d.subset(&[]).is_empty());
        s.validate().unwrap();
    }

    #[test]
    fn data_epoch_order_is_a_reproducible_permutation_that_changes_per_epoch() {
        let a = epoch_order(1000, 42, 3);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, 42, 3));
        assert_ne!(a, epoch_order(1000, 42, 4));
        assert_ne!(a, epoch_order(1000, 43, 3));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
        assert!(epoch_order(0, 1, 1).is_empty());
    }

    #[test]
    fn data_batches_keep_the_last_partial_batch() {
        let order = epoch_order(10, 1, 0);
        let chunks: Vec<&[usize]> = batches(&order, 4).unwrap().collect();
        assert_eq!(
            chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        assert_eq!(chunks.concat(), order);
        assert_eq!(num_batches(10, 4).unwrap(), 3);
        assert_eq!(num_batches(8, 4).unwrap(), 2);
        assert!(matches!(batches(&order, 0), Err(DataError::ZeroBatchSize)));
        assert!(num_batches(3, 0).is_err());
    }
}
