//! Corrupted copies of a test set, for scoring accuracy and calibration under distribution
//! shift. Each kind has five severities forming a graded ladder of difficulty.

use std::fmt;

use loren_tensor::Rng;

use super::affine::{Motion, Sampling, warp};
use super::{DataError, Dataset, stream};

/// A kind of corruption; its strength is set by a severity `1..=5`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShiftKind {
    /// Additive Gaussian noise, clamped back to `[0, 1]`.
    GaussianNoise,
    /// A rotation about the centre by exactly the severity's angle, with random sign.
    Rotation,
    /// A fraction of pixel positions set to 0 in every channel.
    PixelDropout,
}

/// The ladders: evenly spaced, so each step adds a like amount of corruption, from barely
/// visible at severity 1 to heavy at 5 (noise std 0.40 of the pixel range, 40°, half the
/// pixels gone) on 8×8 digits.
const NOISE_STD: [f32; 5] = [0.08, 0.16, 0.24, 0.32, 0.40];
const ROTATION_DEG: [f32; 5] = [8.0, 16.0, 24.0, 32.0, 40.0];
const DROPOUT_P: [f32; 5] = [0.1, 0.2, 0.3, 0.4, 0.5];

impl ShiftKind {
    pub const ALL: [ShiftKind; 3] = [
        ShiftKind::GaussianNoise,
        ShiftKind::Rotation,
        ShiftKind::PixelDropout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ShiftKind::GaussianNoise => "gaussian-noise",
            ShiftKind::Rotation => "rotation",
            ShiftKind::PixelDropout => "pixel-dropout",
        }
    }

    /// The strength at `severity` (`1..=5`): noise std in `[0, 1]` pixel units, degrees, or
    /// the dropped fraction.
    pub fn level(self, severity: u8) -> Result<f32, DataError> {
        match severity {
            1..=5 => Ok(self.ladder()[severity as usize - 1]),
            _ => Err(DataError::BadSeverity { severity }),
        }
    }

    fn ladder(self) -> &'static [f32; 5] {
        match self {
            ShiftKind::GaussianNoise => &NOISE_STD,
            ShiftKind::Rotation => &ROTATION_DEG,
            ShiftKind::PixelDropout => &DROPOUT_P,
        }
    }

    fn stream(self) -> u64 {
        self as u64 + 1
    }
}

impl fmt::Display for ShiftKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `test` corrupted by `kind` at `severity` (`1..=5`), named `<test>+<kind>-<severity>`.
///
/// The random draws depend on `(seed, kind, image index)` but not on the severity, so the
/// severities of one kind corrupt each image the same way, only more strongly: the same noise
/// pattern scaled up, the same rotation direction, a growing set of dropped pixels.
pub fn shifted(
    test: &Dataset,
    kind: ShiftKind,
    severity: u8,
    seed: u64,
) -> Result<Dataset, DataError> {
    let level = kind.level(severity)?;
    Ok(shifted_at(test, kind, severity, level, seed))
}

fn shifted_at(test: &Dataset, kind: ShiftKind, severity: u8, level: f32, seed: u64) -> Dataset {
    let streams = Rng::new(seed).fork(stream::SHIFT).fork(kind.stream());
    let n = test.image_len();
    let mut images = vec![0.0; test.images.len()];
    for (i, out) in images.chunks_exact_mut(n).enumerate() {
        let mut rng = streams.fork(i as u64);
        corrupt(&test.image(i), test.shape(), kind, level, &mut rng, out);
    }
    Dataset {
        name: format!("{}+{kind}-{severity}", test.name),
        images: images.into(),
        labels: test.labels.clone(),
        ..test.with_no_images()
    }
}

fn corrupt(
    src: &[f32],
    shape: [usize; 3],
    kind: ShiftKind,
    level: f32,
    rng: &mut Rng,
    out: &mut [f32],
) {
    match kind {
        ShiftKind::GaussianNoise => {
            for (o, &x) in out.iter_mut().zip(src) {
                *o = (x + level * rng.normal()).clamp(0.0, 1.0);
            }
        }
        ShiftKind::Rotation => {
            let sign = if rng.next_f32() < 0.5 { -1.0 } else { 1.0 };
            warp(
                src,
                shape,
                Motion::rotation(sign * level),
                Sampling::Bilinear,
                out,
            );
            // Bilinear weights can round a hair past 1; the dataset promises [0, 1].
            out.iter_mut().for_each(|x| *x = x.clamp(0.0, 1.0));
        }
        ShiftKind::PixelDropout => {
            out.copy_from_slice(src);
            let plane = shape[1] * shape[2];
            for p in 0..plane {
                if rng.next_f32() < level {
                    out.iter_mut().skip(p).step_by(plane).for_each(|x| *x = 0.0);
                }
            }
        }
    }
}

/// Every kind at every severity: 15 shifted copies of `test`, kind by kind, severity 1 to 5.
pub fn shift_suite(test: &Dataset, seed: u64) -> Vec<(ShiftKind, u8, Dataset)> {
    let mut suite = Vec::with_capacity(15);
    for kind in ShiftKind::ALL {
        for (severity, &level) in (1..).zip(kind.ladder()) {
            suite.push((
                kind,
                severity,
                shifted_at(test, kind, severity, level, seed),
            ));
        }
    }
    suite
}

#[cfg(test)]
mod tests {
    use super::super::digits::bundled_digits;
    use super::super::split::{SplitOptions, split_digits};
    use super::*;

    fn test_set() -> Dataset {
        split_digits(&bundled_digits().unwrap(), &SplitOptions::default())
            .unwrap()
            .test
    }

    /// A dropped pixel is dropped in every channel: on colour images, not the red plane alone.
    #[test]
    fn data_dropout_drops_a_pixel_in_every_channel() {
        let images: Vec<f32> = (0..2 * 3 * 16)
            .map(|i| 0.1 + (i % 7) as f32 * 0.1)
            .collect();
        let names = vec!["a".to_string()];
        let test = Dataset::new("rgb", [3, 4, 4], images, vec![0, 0], names).unwrap();
        let d = shifted(&test, ShiftKind::PixelDropout, 5, 1).unwrap();
        let mut dropped = 0;
        for i in 0..d.len() {
            let image = d.image(i);
            for p in 0..16 {
                let zeros = (0..3).filter(|&c| image[c * 16 + p] == 0.0).count();
                assert!(
                    zeros == 0 || zeros == 3,
                    "image {i}, pixel {p}: {zeros} of 3"
                );
                dropped += usize::from(zeros == 3);
            }
        }
        // Half of the 32 at severity 5.
        assert!((8..=24).contains(&dropped), "{dropped} of 32 dropped");
    }

    fn mean_abs_change(a: &Dataset, b: &Dataset) -> f64 {
        let total: f64 = a
            .images
            .to_f32()
            .iter()
            .zip(b.images.to_f32().iter())
            .map(|(x, y)| (x - y).abs() as f64)
            .sum();
        total / a.images.len() as f64
    }

    #[test]
    fn data_shift_severities_grow_monotonically() {
        let test = test_set();
        for kind in ShiftKind::ALL {
            let changes: Vec<f64> = (1..=5)
                .map(|s| mean_abs_change(&test, &shifted(&test, kind, s, 7).unwrap()))
                .collect();
            assert!(changes[0] > 0.01, "{kind}: {changes:?}");
            for w in changes.windows(2) {
                assert!(w[1] > w[0] * 1.1, "{kind}: {changes:?}");
            }
        }
    }

    #[test]
    fn data_shifts_are_deterministic_per_seed_and_valid() {
        let test = test_set();
        let suite = shift_suite(&test, 3);
        assert_eq!(suite.len(), 15);
        for (kind, severity, d) in &suite {
            d.validate().unwrap();
            assert_eq!(d.labels, test.labels);
            assert_eq!(d.name, format!("digits/test+{kind}-{severity}"));
            assert_eq!(d, &shifted(&test, *kind, *severity, 3).unwrap());
            assert_ne!(d, &shifted(&test, *kind, *severity, 4).unwrap());
        }
    }

    #[test]
    fn data_shift_rejects_bad_severity() {
        let test = test_set();
        for s in [0, 6, 255] {
            let e = shifted(&test, ShiftKind::Rotation, s, 1).unwrap_err();
            assert!(e.to_string().contains(&format!("severity {s}")), "{e}");
        }
    }

    #[test]
    fn data_rotation_shift_turns_by_exactly_the_severity_angle() {
        let test = test_set().subset(&[0, 1, 2, 3, 4, 5, 6, 7]);
        let rotated = shifted(&test, ShiftKind::Rotation, 3, 5).unwrap();
        let mut signs = Vec::new();
        for i in 0..test.len() {
            let turned = |deg: f32| {
                let mut out = vec![0.0; 64];
                warp(
                    &test.image(i),
                    test.shape(),
                    Motion::rotation(deg),
                    Sampling::Bilinear,
                    &mut out,
                );
                out.iter().map(|x| x.clamp(0.0, 1.0)).collect::<Vec<f32>>()
            };
            let got = rotated.image(i).to_vec();
            let sign = if got == turned(24.0) { 1 } else { -1 };
            assert_eq!(got, turned(sign as f32 * 24.0), "image {i}");
            signs.push(sign);
        }
        assert!(signs.contains(&1) && signs.contains(&-1), "{signs:?}");
    }

    #[test]
    fn data_dropout_masks_are_nested_across_severities() {
        let test = test_set();
        let low = shifted(&test, ShiftKind::PixelDropout, 2, 9).unwrap();
        let high = shifted(&test, ShiftKind::PixelDropout, 4, 9).unwrap();
        let (mut dropped_low, mut total) = (0usize, 0usize);
        let (test, low, high) = (
            test.images.to_f32(),
            low.images.to_f32(),
            high.images.to_f32(),
        );
        for ((&x, &l), &h) in test.iter().zip(low.iter()).zip(high.iter()) {
            assert!(l == x || l == 0.0);
            if l == 0.0 && x != 0.0 {
                assert_eq!(h, 0.0, "a pixel dropped at severity 2 survived severity 4");
                dropped_low += 1;
            }
            total += usize::from(x != 0.0);
        }
        let rate = dropped_low as f64 / total as f64;
        assert!((rate - 0.2).abs() < 0.02, "dropout rate {rate}");
    }
}
