//! Splits of datasets that come from outside (CIFAR, image folders): the backbone is imported,
//! never pretrained here, so these splits have no pretraining part.
//!
//! Like the digits' split, the cut is stratified by class and seeded with [`SPLIT_SEED`], not
//! the user's seed, so every run trains and is scored on the same images.

use loren_tensor::Rng;

use super::split::{self, SPLIT_SEED};
use super::{DataError, Dataset, Splits};

/// The share of an official training part held out for validation.
pub const VAL_FRACTION: f64 = 0.1;
/// The shares of a dataset with no official test part (an image folder): train, val, test.
pub const FOLDER_FRACTIONS: [f64; 3] = [0.7, 0.1, 0.2];

/// Train and validation cut from `train_all` (90% / 10% of each class); test is the official
/// `test`. With `train_on_val` the validation images train too, and train is all of
/// `train_all` in its order. Classes in `holdout` leave train, val and test, and their test
/// images become [`Splits::held_out`]. The pretraining part is empty.
pub fn split_official(
    train_all: &Dataset,
    test: &Dataset,
    holdout: &[u32],
    train_on_val: bool,
) -> Result<Splits, DataError> {
    let [train, val] = stratified(train_all, &[1.0 - VAL_FRACTION, VAL_FRACTION]);
    let named = |indices: &[usize], part: &str| {
        let mut d = train_all.subset(indices);
        d.name = format!("{}/{part}", base_name(&train_all.name));
        d
    };
    let (train, val) = with_val(train, val, train_on_val);
    assemble(
        named(&train, "train"),
        val.map(|v| named(&v, "val")),
        test.clone(),
        holdout,
        |part, held| match part {
            TEST if held.is_empty() => "the test data holds no images".into(),
            TEST => "the test data holds no images of the classes not held out".into(),
            _ => too_few_per_class(
                &split::class_sizes(train_all, held),
                &[1.0 - VAL_FRACTION, VAL_FRACTION],
                part,
            ),
        },
    )
}

/// Train, validation and test cut from `all` by [`FOLDER_FRACTIONS`] within each class; with
/// `train_on_val` the validation images train too.
pub fn split_seeded(
    all: &Dataset,
    holdout: &[u32],
    train_on_val: bool,
) -> Result<Splits, DataError> {
    let [train, val, test] = stratified(all, &FOLDER_FRACTIONS);
    let named = |indices: &[usize], part: &str| {
        let mut d = all.subset(indices);
        d.name = format!("{}/{part}", all.name);
        d
    };
    let (train, val) = with_val(train, val, train_on_val);
    assemble(
        named(&train, "train"),
        val.map(|v| named(&v, "val")),
        named(&test, "test"),
        holdout,
        |part, held| too_few_per_class(&split::class_sizes(all, held), &FOLDER_FRACTIONS, part),
    )
}

/// The train part's indices and the validation part's, or, to train on it, their union.
fn with_val(
    train: Vec<usize>,
    val: Vec<usize>,
    train_on_val: bool,
) -> (Vec<usize>, Option<Vec<usize>>) {
    if train_on_val {
        (split::merged(&train, &val), None)
    } else {
        (train, Some(val))
    }
}

/// "cifar10/train-all" → "cifar10".
fn base_name(name: &str) -> &str {
    name.split('/').next().unwrap_or(name)
}

/// For each fraction, the indices of `all` that fall in it, ascending. Within each class the
/// order is shuffled with [`SPLIT_SEED`] and cut by [`class_counts`].
fn stratified<const P: usize>(all: &Dataset, fractions: &[f64; P]) -> [Vec<usize>; P] {
    stratified_labels(&all.labels, all.classes, fractions)
}

/// [`stratified`] from the labels alone.
fn stratified_labels<const P: usize>(
    labels: &[u32],
    classes: usize,
    fractions: &[f64; P],
) -> [Vec<usize>; P] {
    let root = Rng::new(SPLIT_SEED).fork(0x4558_5400_0000_0005);
    split::stratified(labels, classes, &root, |n| class_counts(n, fractions))
}

/// The indices, ascending, of the images of a folder labelled `labels` that its split
/// ([`split_seeded`]) puts in the test part: known before any image is decoded.
pub fn folder_test_indices(labels: &[u32], classes: usize) -> Vec<usize> {
    let [_, _, test] = stratified_labels(labels, classes, &FOLDER_FRACTIONS);
    test
}

/// [`folder_test_indices`], or an error naming the dataset `name` when no class of the folder
/// (its `class_names`) is large enough to give the test part an image.
pub fn folder_test_part(
    labels: &[u32],
    class_names: &[String],
    name: &str,
) -> Result<Vec<usize>, DataError> {
    let test = folder_test_indices(labels, class_names.len());
    if !test.is_empty() {
        return Ok(test);
    }
    let mut counts = vec![0; class_names.len()];
    labels.iter().for_each(|&l| counts[l as usize] += 1);
    let sizes: Vec<(&str, usize)> = class_names.iter().map(String::as_str).zip(counts).collect();
    Err(DataError::EmptySplit {
        name: name.into(),
        part: "test",
        reason: too_few_per_class(&sizes, &FOLDER_FRACTIONS, TEST),
    })
}

/// Why part `part` of a cut by [`class_counts`] with `fractions` is empty: no class of
/// `sizes` (each class's name and image count) is large enough to give it an image.
fn too_few_per_class<const P: usize>(
    sizes: &[(&str, usize)],
    fractions: &[f64; P],
    part: usize,
) -> String {
    // A later part's count is its rounded share, which only grows with the class, and the first
    // part's is the rest, which a class of one has: the first size that gives it an image is
    // the least that does. The fractions are positive, so one does.
    let need = (1..)
        .find(|&n| class_counts(n, fractions)[part] > 0)
        .unwrap_or(usize::MAX);
    let (name, most) = split::largest_class(sizes);
    format!(
        "every class is too small to give it an image: a class needs at least {need}, and the \
         largest, `{name}`, has {most}"
    )
}

/// `n` items cut by `fractions`: every part after the first gets its rounded share (so a
/// class of 5 still gives validation one image), the first part the rest.
fn class_counts<const P: usize>(n: usize, fractions: &[f64; P]) -> [usize; P] {
    let mut counts = [0; P];
    let mut left = n;
    for p in 1..P {
        counts[p] = ((fractions[p] * n as f64).round() as usize).min(left);
        left -= counts[p];
    }
    counts[0] = left;
    counts
}

/// The place of the test part among a split's train, validation and test parts.
const TEST: usize = 2;

/// The splits with `holdout` applied, after checking no part is empty: `why_empty(part, held
/// classes)` says why one is, the part counted as train 0, val 1, test 2.
fn assemble(
    train: Dataset,
    val: Option<Dataset>,
    test: Dataset,
    holdout: &[u32],
    why_empty: impl Fn(usize, &[u32]) -> String,
) -> Result<Splits, DataError> {
    let held = split::checked_holdout(holdout, train.classes)?;
    let held_out = (!held.is_empty()).then(|| {
        let idx = indices_where(&test, |l| held.binary_search(&l).is_ok());
        let mut d = test.subset(&idx);
        d.name = format!("{}/held-out", base_name(&test.name));
        d
    });
    let keep = |d: Dataset| without_classes(d, &held);
    let splits = Splits {
        pretrain: Dataset {
            name: format!("{}/pretrain", base_name(&train.name)),
            ..train.with_no_images()
        },
        train: keep(train),
        val: val.map(keep),
        test: keep(test),
        held_out,
        ood_sets: Vec::new(),
    };
    let parts = [Some(&splits.train), splits.val.as_ref(), Some(&splits.test)];
    for (index, (d, part)) in parts.into_iter().zip(["train", "val", "test"]).enumerate() {
        if let Some(d) = d.filter(|d| d.is_empty()) {
            return Err(DataError::EmptySplit {
                name: d.name.clone(),
                part,
                reason: why_empty(index, &held),
            });
        }
    }
    Ok(splits)
}

fn indices_where(d: &Dataset, keep: impl Fn(u32) -> bool) -> Vec<usize> {
    (0..d.len()).filter(|&i| keep(d.labels[i])).collect()
}

/// `d` without the `held` classes' images, the rest relabelled `0..C-k` in their order.
fn without_classes(d: Dataset, held: &[u32]) -> Dataset {
    if held.is_empty() {
        return d;
    }
    let kept: Vec<u32> = (0..d.classes as u32)
        .filter(|c| held.binary_search(c).is_err())
        .collect();
    let mut new_label = vec![u32::MAX; d.classes];
    for (new, &old) in kept.iter().enumerate() {
        new_label[old as usize] = new as u32;
    }
    let mut out = d.subset(&indices_where(&d, |l| held.binary_search(&l).is_err()));
    out.labels
        .iter_mut()
        .for_each(|l| *l = new_label[*l as usize]);
    out.class_names = kept
        .iter()
        .map(|&c| d.class_names[c as usize].clone())
        .collect();
    out.classes = kept.len();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` one-pixel images per class, the pixel encoding the index so images can be traced.
    fn dataset(name: &str, classes: usize, n: usize) -> Dataset {
        let total = classes * n;
        let images: Vec<f32> = (0..total).map(|i| i as f32 / total as f32).collect();
        let labels = (0..total).map(|i| (i % classes) as u32).collect();
        let names = (0..classes).map(|c| format!("c{c}")).collect();
        Dataset::new(name, [1, 1, 1], images, labels, names).unwrap()
    }

    fn pixels(d: &Dataset) -> Vec<u32> {
        d.images.to_f32().iter().map(|x| x.to_bits()).collect()
    }

    /// The official parts' validation split and a folder's test part, pinned as the digits'
    /// split is: a change of stream would move every CIFAR and folder figure published.
    #[test]
    fn data_external_splits_are_pinned() {
        let labels: Vec<u32> = (0..40).map(|i| i % 4).collect();
        let [train, val] = stratified_labels(&labels, 4, &[1.0 - VAL_FRACTION, VAL_FRACTION]);
        assert_eq!(train.len() + val.len(), 40);
        assert_eq!(
            val,
            [13, 15, 16, 34],
            "the official parts' validation split moved"
        );
        let test = folder_test_indices(&labels, 4);
        assert_eq!(
            test,
            [10, 12, 13, 15, 16, 17, 31, 34],
            "a folder's split moved"
        );
    }

    #[test]
    fn data_official_split_is_stratified_disjoint_and_fixed() {
        let all = dataset("cifar10/train-all", 4, 50);
        let test = dataset("cifar10/test", 4, 5);
        let s = split_official(&all, &test, &[], false).unwrap();
        let val = s.val.as_ref().unwrap();
        assert_eq!((s.train.len(), val.len(), s.test.len()), (180, 20, 20));
        assert!(s.pretrain.is_empty() && s.held_out.is_none());
        assert_eq!(val.class_counts(), vec![5; 4]);
        assert_eq!(s.test, test);
        let mut seen = [pixels(&s.train), pixels(val)].concat();
        seen.sort_unstable();
        let mut want = pixels(&all);
        want.sort_unstable();
        assert_eq!(seen, want);
        assert_eq!(split_official(&all, &test, &[], false).unwrap(), s);
        assert_eq!(
            (s.train.name.as_str(), val.name.as_str()),
            ("cifar10/train", "cifar10/val")
        );
    }

    #[test]
    fn data_training_on_val_trains_on_every_official_image_in_file_order() {
        let all = dataset("cifar10/train-all", 4, 50);
        let test = dataset("cifar10/test", 4, 5);
        let s = split_official(&all, &test, &[2], true).unwrap();
        assert!(s.val.is_none());
        let kept = split_official(&all, &test, &[2], false).unwrap();
        assert_eq!(
            (s.test.clone(), s.held_out.clone()),
            (kept.test, kept.held_out)
        );
        // Class 2 held out: the other 150 images, in the file's order, relabelled.
        let order: Vec<usize> = (0..all.len()).filter(|i| i % 4 != 2).collect();
        assert_eq!(s.train.images, all.subset(&order).images);
        assert_eq!(&s.train.labels[..4], &[0, 1, 2, 0]);
        assert_eq!(s.train.name, "cifar10/train");
    }

    #[test]
    fn data_training_on_val_keeps_a_folders_test_part() {
        let all = dataset("flowers", 3, 10);
        let (held, trained) = (
            split_seeded(&all, &[], false).unwrap(),
            split_seeded(&all, &[], true).unwrap(),
        );
        assert_eq!(trained.test, held.test);
        assert!(trained.val.is_none());
        let mut train = pixels(&trained.train);
        train.sort_unstable();
        let mut want = [pixels(&held.train), pixels(held.val.as_ref().unwrap())].concat();
        want.sort_unstable();
        assert_eq!(train, want);
        let ascending = |d: &Dataset| d.images.to_f32().windows(2).all(|w| w[0] < w[1]);
        assert!(ascending(&trained.train), "file order");
    }

    #[test]
    fn data_small_classes_still_give_every_part_its_share() {
        assert_eq!(class_counts(5, &[0.9, 0.1]), [4, 1]);
        assert_eq!(class_counts(10, &FOLDER_FRACTIONS), [7, 1, 2]);
        assert_eq!(class_counts(5000, &[0.9, 0.1]), [4500, 500]);
        assert_eq!(class_counts(1, &FOLDER_FRACTIONS), [1, 0, 0]);
    }

    #[test]
    fn data_folder_split_and_holdout() {
        let all = dataset("flowers", 3, 10);
        let s = split_seeded(&all, &[], false).unwrap();
        let val = s.val.as_ref().unwrap();
        assert_eq!((s.train.len(), val.len(), s.test.len()), (21, 3, 6));
        let s = split_seeded(&all, &[1], false).unwrap();
        assert_eq!(s.train.classes, 2);
        assert_eq!(s.train.class_names, vec!["c0", "c2"]);
        assert!(s.train.labels.iter().all(|&l| l < 2));
        let held = s.held_out.unwrap();
        assert_eq!(held.len(), 2);
        assert!(held.labels.iter().all(|&l| l == 1));
        let e = split_seeded(&all, &[3], false).unwrap_err().to_string();
        assert!(e.contains("holdout class 3"), "{e}");
        let e = split_seeded(&all, &[0, 1], false).unwrap_err().to_string();
        assert!(e.contains("2 of 3"), "{e}");
        let e = split_seeded(&dataset("tiny", 2, 1), &[], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty"), "{e}");
    }

    /// 200 classes of 3 images said "the dataset is too small to split"; the cause is the
    /// size of each class, which the message now gives with the rule the cut follows.
    #[test]
    fn data_an_empty_part_says_how_large_a_class_must_be() {
        let e = split_seeded(&dataset("many", 200, 3), &[], false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "the val part of the split would be empty (`many/val`): every class is too small to give it \
             an image: a class needs at least 5, and the largest, `c0`, has 3"
        );
        // The stated least size is the true one: a class of that size gives the part an image.
        let mut labels: Vec<u32> = (0..2 * 3).map(|i| i % 2).collect();
        labels.extend([1, 1]);
        let five = Dataset::new(
            "five",
            [1, 1, 1],
            vec![0.5; labels.len()],
            labels,
            vec!["small".into(), "big".into()],
        )
        .unwrap();
        assert_eq!(
            split_seeded(&five, &[], false).unwrap().val.unwrap().len(),
            1
        );
        // Without a validation part, the test part is the first empty one: it needs classes of 3.
        let e = split_seeded(&dataset("pairs", 3, 2), &[], true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the test part of the split")
                && e.ends_with("needs at least 3, and the largest, `c0`, has 2"),
            "{e}"
        );
        let all = dataset("cifar10/train-all", 3, 4);
        let test = dataset("cifar10/test", 3, 2);
        let e = split_official(&all, &test, &[], false)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("a class needs at least 5, and the largest, `c0`, has 4"),
            "{e}"
        );
        let e = folder_test_part(&[0, 1, 1], &["a".into(), "b".into()], "tiny")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("the test part of the split would be empty (`tiny`)"),
            "{e}"
        );
        assert!(
            e.ends_with("needs at least 3, and the largest, `b`, has 2"),
            "{e}"
        );
    }
}
