//! Per-image training augmentation, applied inside [`Dataset::batch`](super::Dataset::batch).

use loren_tensor::Rng;

use super::DataError;
use super::affine::{Motion, Sampling, flip_horizontal, flip_vertical, warp};

/// Random flips, rotation and translation, drawn afresh for each image.
///
/// Flips happen with probability 1/2 each when enabled; the angle is uniform in
/// `±max_rotation_deg` and each translation component uniform in `±max_translate_px`. The
/// geometric part uses the same zero-fill sampler as the Rotation shift.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    pub hflip: bool,
    pub vflip: bool,
    pub max_rotation_deg: f32,
    pub max_translate_px: f32,
    /// Checkpoints from before the choice was recorded augmented bilinearly.
    #[serde(default)]
    pub sampling: Sampling,
}

impl Augment {
    /// No augmentation: images pass through untouched.
    pub fn none() -> Augment {
        Augment {
            hflip: false,
            vflip: false,
            max_rotation_deg: 0.0,
            max_translate_px: 0.0,
            sampling: Sampling::Bilinear,
        }
    }

    /// For the 8×8 digits: no flips, since a mirrored 2 or 7 is not a 2 or 7; small rotations
    /// (±10°) and translations (±1 px), which keep digits legible at this resolution.
    pub fn digits() -> Augment {
        Augment {
            hflip: false,
            vflip: false,
            max_rotation_deg: 10.0,
            max_translate_px: 1.0,
            sampling: Sampling::Bilinear,
        }
    }

    /// The LoRA-Ensemble paper's CIFAR setup, as its released code has it
    /// (`RandomHorizontalFlip`, `RandomVerticalFlip`, then `RandomRotation(degrees=(0, 180))`,
    /// on the 32×32 images before the resize): flips, and rotation ±90°. With both flips, which
    /// between them turn the image by 180° a quarter of the time, ±90° and the code's 0° to 180°
    /// give the same distribution: a mirror image half the time, at an angle uniform over the
    /// whole turn. Like the code's rotation, it takes the nearest pixel.
    pub fn paper() -> Augment {
        Augment {
            hflip: true,
            vflip: true,
            max_rotation_deg: 90.0,
            max_translate_px: 0.0,
            sampling: Sampling::Nearest,
        }
    }

    /// Rejects negative or non-finite ranges, which would otherwise silently produce NaN images.
    pub fn validate(&self) -> Result<(), DataError> {
        let ranges = [
            ("max_rotation_deg", self.max_rotation_deg),
            ("max_translate_px", self.max_translate_px),
        ];
        match ranges.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            Some(&(field, value)) => Err(DataError::BadAugment { field, value }),
            None => Ok(()),
        }
    }

    /// Writes an augmented copy of `image` (`[C, H, W]`) into `out`.
    ///
    /// Draws from `rng` only for the enabled parts, so [`Augment::none`] leaves it untouched.
    pub fn apply(&self, image: &[f32], shape: [usize; 3], rng: &mut Rng, out: &mut [f32]) {
        let motion = self.draw_motion(rng);
        warp(image, shape, motion, self.sampling, out);
        if self.hflip && rng.next_f32() < 0.5 {
            flip_horizontal(out, shape);
        }
        if self.vflip && rng.next_f32() < 0.5 {
            flip_vertical(out, shape);
        }
    }

    fn draw_motion(&self, rng: &mut Rng) -> Motion {
        let symmetric = |rng: &mut Rng, max: f32| {
            if max > 0.0 {
                rng.uniform(-max, max)
            } else {
                0.0
            }
        };
        let angle_deg = symmetric(rng, self.max_rotation_deg);
        let tx = symmetric(rng, self.max_translate_px);
        let ty = symmetric(rng, self.max_translate_px);
        Motion { angle_deg, tx, ty }
    }
}

/// What a run's summary says of it: `no augmentation`, or the parts drawn (`rotation ±10°,
/// translation ±1 px`; `flips, rotation ±90° (nearest pixel)`).
impl std::fmt::Display for Augment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        match (self.hflip, self.vflip) {
            (true, true) => parts.push("flips".to_string()),
            (true, false) => parts.push("horizontal flips".to_string()),
            (false, true) => parts.push("vertical flips".to_string()),
            (false, false) => {}
        }
        let (rotation, translation) = (self.max_rotation_deg, self.max_translate_px);
        if rotation > 0.0 {
            parts.push(format!("rotation ±{rotation}°"));
        }
        if translation > 0.0 {
            parts.push(format!("translation ±{translation} px"));
        }
        if parts.is_empty() {
            return f.write_str("no augmentation");
        }
        // Only what moves pixels samples: flips alone copy them.
        let sampled = rotation > 0.0 || translation > 0.0;
        let nearest = sampled && self.sampling == Sampling::Nearest;
        write!(
            f,
            "{}{}",
            parts.join(", "),
            if nearest { " (nearest pixel)" } else { "" }
        )
    }
}

impl Default for Augment {
    fn default() -> Augment {
        Augment::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_preset_says_what_it_draws() {
        let said = [Augment::none(), Augment::digits(), Augment::paper()].map(|a| a.to_string());
        assert_eq!(
            said,
            [
                "no augmentation",
                "rotation ±10°, translation ±1 px",
                "flips, rotation ±90° (nearest pixel)",
            ]
        );
        let flips = Augment {
            hflip: true,
            sampling: Sampling::Nearest,
            ..Augment::none()
        };
        assert_eq!(flips.to_string(), "horizontal flips");
    }

    fn image() -> Vec<f32> {
        (0..64).map(|i| i as f32 / 64.0).collect()
    }

    fn augmented(aug: &Augment, rng: &mut Rng) -> Vec<f32> {
        let mut out = vec![0.0; 64];
        aug.apply(&image(), [1, 8, 8], rng, &mut out);
        out
    }

    #[test]
    fn data_augment_none_is_identity_and_draws_nothing() {
        let mut rng = Rng::new(5);
        assert_eq!(augmented(&Augment::none(), &mut rng), image());
        assert_eq!(rng, Rng::new(5));
    }

    #[test]
    fn data_augment_is_deterministic_per_rng_and_varies_per_image() {
        for aug in [Augment::digits(), Augment::paper()] {
            let (mut a, mut b) = (Rng::new(9), Rng::new(9));
            let first = augmented(&aug, &mut a);
            assert_eq!(first, augmented(&aug, &mut b));
            assert_ne!(first, image());
            assert_ne!(first, augmented(&aug, &mut a));
            assert!(first.iter().all(|x| (0.0..=1.0).contains(x)));
        }
    }

    #[test]
    fn data_flip_only_augment_gives_both_orientations() {
        let aug = Augment {
            hflip: true,
            ..Augment::none()
        };
        let mut mirrored = image();
        flip_horizontal(&mut mirrored, [1, 8, 8]);
        let mut rng = Rng::new(1);
        let (mut plain, mut flipped) = (0, 0);
        for _ in 0..200 {
            let out = augmented(&aug, &mut rng);
            if out == image() {
                plain += 1;
            } else {
                assert_eq!(out, mirrored);
                flipped += 1;
            }
        }
        assert!(
            plain > 70 && flipped > 70,
            "{plain} plain, {flipped} flipped"
        );
    }

    /// Each image's shift is (tx, ty), drawn in that order, each uniform in the range: not one
    /// draw for both, which would move every image along the diagonal.
    #[test]
    fn data_translation_draws_x_and_y_apart() {
        let aug = Augment {
            max_translate_px: 2.0,
            sampling: Sampling::Nearest,
            ..Augment::none()
        };
        let mut rng = Rng::new(3);
        let mut apart = 0;
        for _ in 0..50 {
            let mut twin = rng.clone();
            let (tx, ty) = (twin.uniform(-2.0, 2.0), twin.uniform(-2.0, 2.0));
            let motion = Motion {
                angle_deg: 0.0,
                tx,
                ty,
            };
            let mut want = vec![0.0; 64];
            warp(&image(), [1, 8, 8], motion, Sampling::Nearest, &mut want);
            assert_eq!(augmented(&aug, &mut rng), want);
            assert_eq!(rng, twin, "one draw for each of tx and ty, and no other");
            apart += usize::from((tx - ty).abs() > 0.5);
        }
        assert!(apart > 10, "{apart} of 50 shifts off the diagonal");
    }

    #[test]
    fn data_augment_validation_rejects_bad_ranges() {
        assert!(Augment::digits().validate().is_ok());
        assert!(Augment::paper().validate().is_ok());
        let bad = Augment {
            max_rotation_deg: f32::NAN,
            ..Augment::none()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("max_rotation_deg")
        );
        let bad = Augment {
            max_translate_px: -1.0,
            ..Augment::none()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("max_translate_px")
        );
    }
}
