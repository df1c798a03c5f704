//! The out-of-distribution set: inputs a digits model should be unsure about.

use loren_tensor::Rng;

use super::{DataError, Dataset, stream};

/// Out-of-distribution images, in this order:
/// 1. every image of `test` inverted (`1 - x`): the same strokes, unnatural contrast;
/// 2. as many images of independent uniform `[0, 1)` noise, drawn from `seed`;
/// 3. the held-out classes' images, when given: natural digits of unseen classes.
///
/// Its labels are meaningless and all 0 (classes and class names are `test`'s, so the set is a
/// valid [`Dataset`]); it is scored only for OOD detection, never for accuracy. The fixed order
/// lets a caller score each source separately by slicing.
///
/// Errors if `held_out` images differ in shape from `test`'s.
pub fn ood_set(
    test: &Dataset,
    held_out: Option<&Dataset>,
    seed: u64,
) -> Result<Dataset, DataError> {
    if let Some(h) = held_out.filter(|h| h.shape() != test.shape()) {
        return Err(DataError::ShapeMismatch {
            op: "ood_set",
            name: h.name.clone(),
            expected: test.shape(),
            found: h.shape(),
        });
    }
    let mut images: Vec<f32> = test.images.to_f32().iter().map(|x| 1.0 - x).collect();
    let mut rng = Rng::new(seed).fork(stream::OOD);
    images.extend((0..test.images.len()).map(|_| rng.next_f32()));
    if let Some(h) = held_out {
        images.extend_from_slice(&h.images.to_f32());
    }
    let count = images.len() / test.image_len();
    Ok(Dataset {
        name: format!("{}/ood", test.name),
        images: images.into(),
        labels: vec![0; count],
        ..test.with_no_images()
    })
}

#[cfg(test)]
mod tests {
    use super::super::digits::bundled_digits;
    use super::super::split::{SplitOptions, split_digits};
    use super::*;

    #[test]
    fn data_ood_set_holds_inverted_noise_and_held_out_images() {
        let opts = SplitOptions {
            holdout_classes: vec![8, 9],
            ..SplitOptions::default()
        };
        let s = split_digits(&bundled_digits().unwrap(), &opts).unwrap();
        let held = s.held_out.as_ref().unwrap();
        let ood = ood_set(&s.test, Some(held), 1).unwrap();
        let n = s.test.len();
        assert_eq!(ood.len(), 2 * n + held.len());
        ood.validate().unwrap();
        assert!(ood.labels.iter().all(|&l| l == 0));
        for i in [0, n / 2, n - 1] {
            let inverted: Vec<f32> = s.test.image(i).iter().map(|x| 1.0 - x).collect();
            assert_eq!(ood.image(i), inverted.as_slice());
        }
        let noise = ood.images.range(n * 64, 2 * n * 64);
        let mean = noise.iter().map(|&x| x as f64).sum::<f64>() / noise.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "noise mean {mean}");
        assert_eq!(ood.image(2 * n), held.image(0));
        assert_eq!(ood, ood_set(&s.test, Some(held), 1).unwrap());
        assert_ne!(ood, ood_set(&s.test, Some(held), 2).unwrap());
        assert_eq!(ood_set(&s.test, None, 1).unwrap().len(), 2 * n);
    }

    #[test]
    fn data_ood_set_rejects_mismatched_held_out_shape() {
        let test = Dataset::new("t", [1, 2, 2], vec![0.5; 4], vec![0], vec!["a".into()]).unwrap();
        let other = Dataset::new("o", [1, 4, 1], vec![0.5; 4], vec![0], vec!["a".into()]).unwrap();
        let e = ood_set(&test, Some(&other), 0).unwrap_err().to_string();
        assert!(
            e.contains("ood_set") && e.contains("[1, 2, 2]") && e.contains("[1, 4, 1]"),
            "{e}"
        );
    }
}
