//! The fixed, stratified split of a dataset into pretraining, fine-tuning, validation and test
//! parts, with optional held-out classes for out-of-distribution tests.

use loren_tensor::Rng;

use super::{DataError, Dataset};

/// The seed of every split. It is a constant, not the user's `--seed`, so all runs, whatever
/// their seed, train and are scored on the same images and stay comparable.
/// (The bytes spell "loren-sp".) Changing it changes every published number.
pub const SPLIT_SEED: u64 = 0x6c6f_7265_6e2d_7370;

/// How to split: the four fractions (positive, summing to 1) and the classes held out.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitOptions {
    pub pretrain: f64,
    pub train: f64,
    pub val: f64,
    pub test: f64,
    /// Classes removed from train, val and test; their test-part images become
    /// [`Splits::held_out`]. Pretraining keeps them, because the backbone is pretrained once,
    /// before any holdout is chosen.
    pub holdout_classes: Vec<u32>,
    /// Train on the validation part too ([`Splits::val`] is then `None`). The cut is the same,
    /// so test and pretraining keep their images.
    pub train_on_val: bool,
}

impl Default for SplitOptions {
    /// 40% pretraining, 30% fine-tuning, 10% validation, 20% test; nothing held out.
    fn default() -> SplitOptions {
        SplitOptions {
            pretrain: 0.40,
            train: 0.30,
            val: 0.10,
            test: 0.20,
            holdout_classes: Vec::new(),
            train_on_val: false,
        }
    }
}

impl SplitOptions {
    fn fractions(&self) -> [f64; 4] {
        [self.pretrain, self.train, self.val, self.test]
    }

    fn validate_fractions(&self) -> Result<[f64; 4], DataError> {
        let fractions = self.fractions();
        let bad = |reason| Err(DataError::BadFractions { fractions, reason });
        if !fractions.iter().all(|f| f.is_finite() && *f > 0.0) {
            return bad("must all be positive and finite");
        }
        if (fractions.iter().sum::<f64>() - 1.0).abs() > 1e-6 {
            return bad("must sum to 1");
        }
        Ok(fractions)
    }
}

/// The held-out classes sorted and deduplicated, after checking each exists and at least two
/// of the `classes` remain.
pub(super) fn checked_holdout(holdout: &[u32], classes: usize) -> Result<Vec<u32>, DataError> {
    let mut held = holdout.to_vec();
    held.sort_unstable();
    held.dedup();
    if let Some(&class) = held.iter().find(|&&c| c as usize >= classes) {
        return Err(DataError::UnknownHoldoutClass { class, classes });
    }
    if classes - held.len() < 2 {
        return Err(DataError::TooFewClassesLeft {
            held_out: held.len(),
            classes,
        });
    }
    Ok(held)
}

/// The four parts of a split. Train, val and test hold only the kept classes, relabelled
/// `0..C-k` in their original order; pretrain holds every class with its original label.
#[derive(Clone, Debug, PartialEq)]
pub struct Splits {
    pub pretrain: Dataset,
    pub train: Dataset,
    /// `None` when the run trains on it ([`SplitOptions::train_on_val`]).
    pub val: Option<Dataset>,
    pub test: Dataset,
    /// The held-out classes' test-part images, with their original labels and class names;
    /// `None` when nothing is held out.
    pub held_out: Option<Dataset>,
    /// Other datasets scored as out-of-distribution, at the model's size and scaling: none
    /// from a split; the caller adds them (`--ood-data`).
    pub ood_sets: Vec<Dataset>,
}

const PARTS: [&str; 4] = ["pretrain", "train", "val", "test"];

/// Splits `all` by class, with [`SPLIT_SEED`], into the parts `opts` asks for.
///
/// Each class is shuffled and cut by its own largest-remainder allocation, so every part's
/// count of each class is within one image of its fraction. The cut ignores the holdout, so
/// holding classes out leaves the other classes' images where they were.
pub fn split_digits(all: &Dataset, opts: &SplitOptions) -> Result<Splits, DataError> {
    let fractions = opts.validate_fractions()?;
    let held = checked_holdout(&opts.holdout_classes, all.classes)?;
    let mut parts = stratified_indices(all, &fractions);
    if opts.train_on_val {
        let val = std::mem::take(&mut parts[2]);
        parts[1] = merged(&parts[1], &val);
    }
    let named = |part: usize, indices: &[usize]| {
        let mut d = all.subset(indices);
        d.name = format!("{}/{}", all.name, PARTS[part]);
        d
    };
    let pretrain = named(0, &parts[0]);
    let [train, val, test] = [1, 2, 3].map(|p| {
        let kept: Vec<usize> = parts[p]
            .iter()
            .copied()
            .filter(|&i| held.binary_search(&all.labels[i]).is_err())
            .collect();
        relabel_without(named(p, &kept), &held)
    });
    let held_out = (!held.is_empty()).then(|| {
        let out: Vec<usize> = parts[3]
            .iter()
            .copied()
            .filter(|&i| held.binary_search(&all.labels[i]).is_ok())
            .collect();
        let mut d = named(3, &out);
        d.name = format!("{}/held-out", all.name);
        d
    });
    let splits = Splits {
        pretrain,
        train,
        val: (!opts.train_on_val).then_some(val),
        test,
        held_out,
        ood_sets: Vec::new(),
    };
    reject_empty(&splits, |part| {
        let held = if part == 0 { &[][..] } else { &held[..] };
        too_small_to_share(&class_sizes(all, held), fractions[part])
    })?;
    Ok(splits)
}

/// Two parts' indices (each ascending) as one ascending part: an image keeps its place in the
/// file's order, which an unshuffled run trains in.
pub(super) fn merged(a: &[usize], b: &[usize]) -> Vec<usize> {
    let mut all = [a, b].concat();
    all.sort_unstable();
    all
}

/// For each part, the indices of `all` that fall in it, ascending.
fn stratified_indices(all: &Dataset, fractions: &[f64; 4]) -> [Vec<usize>; 4] {
    let root = Rng::new(SPLIT_SEED);
    stratified(&all.labels, all.classes, &root, |n| allocate(n, fractions))
}

/// For each part, the indices of the items labelled `labels` (each below `classes`) that fall
/// in it, ascending: each class is shuffled by its own fork of `root`, then cut into
/// `counts(class size)` consecutive pieces. Only labels: the images need not be read yet.
pub(super) fn stratified<const P: usize>(
    labels: &[u32],
    classes: usize,
    root: &Rng,
    counts: impl Fn(usize) -> [usize; P],
) -> [Vec<usize>; P] {
    let mut parts: [Vec<usize>; P] = std::array::from_fn(|_| Vec::new());
    for class in 0..classes {
        let mut members: Vec<usize> = (0..labels.len())
            .filter(|&i| labels[i] as usize == class)
            .collect();
        root.fork(class as u64).shuffle(&mut members);
        let mut rest = members.as_slice();
        for (part, count) in parts.iter_mut().zip(counts(members.len())) {
            let (taken, left) = rest.split_at(count);
            part.extend_from_slice(taken);
            rest = left;
        }
    }
    parts.iter_mut().for_each(|p| p.sort_unstable());
    parts
}

/// Splits `n` items by `fractions` with the largest-remainder method: each count is the floor
/// or ceiling of its ideal share, and the counts sum to `n`. Ties go to the earlier part.
fn allocate(n: usize, fractions: &[f64; 4]) -> [usize; 4] {
    let total: f64 = fractions.iter().sum();
    let ideal = fractions.map(|f| f / total * n as f64);
    let mut counts = ideal.map(|x| (x.floor() as usize).min(n));
    let mut by_remainder = [0, 1, 2, 3];
    by_remainder.sort_by(|&a, &b| {
        let (ra, rb) = (ideal[a] - ideal[a].floor(), ideal[b] - ideal[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let assigned: usize = counts.iter().sum();
    for &p in by_remainder.iter().take(n.saturating_sub(assigned)) {
        counts[p] += 1;
    }
    counts
}

/// `d` with the `held` classes (none of which appear in its labels) dropped from its class
/// list, and labels renumbered to stay contiguous.
fn relabel_without(mut d: Dataset, held: &[u32]) -> Dataset {
    let kept: Vec<u32> = (0..d.classes as u32)
        .filter(|c| held.binary_search(c).is_err())
        .collect();
    let mut new_label = vec![u32::MAX; d.classes];
    for (new, &old) in kept.iter().enumerate() {
        new_label[old as usize] = new as u32;
    }
    d.labels
        .iter_mut()
        .for_each(|l| *l = new_label[*l as usize]);
    d.class_names = kept
        .iter()
        .map(|&c| d.class_names[c as usize].clone())
        .collect();
    d.classes = kept.len();
    d
}

/// The names and image counts of `d`'s classes, less those `held`, in label order.
pub(super) fn class_sizes<'a>(d: &'a Dataset, held: &[u32]) -> Vec<(&'a str, usize)> {
    let names = d.class_names.iter().map(String::as_str);
    (0..d.classes as u32)
        .zip(names.zip(d.class_counts()))
        .filter(|(c, _)| held.binary_search(c).is_err())
        .map(|(_, sized)| sized)
        .collect()
}

/// The largest of `sizes` (a class's name and image count), the first of equals.
pub(super) fn largest_class<'a>(sizes: &[(&'a str, usize)]) -> (&'a str, usize) {
    let mut largest = ("", 0);
    for &(name, n) in sizes {
        if n > largest.1 || largest.0.is_empty() {
            largest = (name, n);
        }
    }
    largest
}

/// Why a part with `fraction` of each class is empty. Its count of a class is that share
/// rounded by the largest remainder, which can fall as the class grows, so the true rule is
/// told of the largest class rather than as a least size.
fn too_small_to_share(sizes: &[(&str, usize)], fraction: f64) -> String {
    let (name, most) = largest_class(sizes);
    let percent = (fraction * 1e4).round() / 100.0;
    format!(
        "every class is too small to give it an image: the largest, `{name}`, has {most}, and \
         {percent}% of {most} rounds to none"
    )
}

/// The first part (in [`PARTS`] order) that is empty, as an error that `why(part index)`
/// explains.
fn reject_empty(s: &Splits, why: impl Fn(usize) -> String) -> Result<(), DataError> {
    let parts = [
        Some(&s.pretrain),
        Some(&s.train),
        s.val.as_ref(),
        Some(&s.test),
    ];
    let mut present = parts
        .into_iter()
        .enumerate()
        .filter_map(|(p, d)| Some((d?, p)));
    match present.find(|(d, _)| d.is_empty()) {
        Some((d, part)) => Err(DataError::EmptySplit {
            name: d.name.clone(),
            part: PARTS[part],
            reason: why(part),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::digits::bundled_digits;
    use super::*;

    fn digits() -> Dataset {
        bundled_digits().unwrap()
    }

    /// Identifies an image by its pixels, since parts are subsets with new indices.
    fn keys(d: &Dataset) -> Vec<Vec<u32>> {
        (0..d.len())
            .map(|i| d.image(i).iter().map(|x| x.to_bits()).collect())
            .collect()
    }

    #[test]
    fn data_split_is_disjoint_covering_stratified_and_fixed() {
        let all = digits();
        let opts = SplitOptions::default();
        let s = split_digits(&all, &opts).unwrap();
        assert!(s.held_out.is_none());
        let parts = [&s.pretrain, &s.train, s.val.as_ref().unwrap(), &s.test];
        assert_eq!(parts.iter().map(|d| d.len()).sum::<usize>(), all.len());
        assert_eq!(parts.map(|d| d.len()), [720, 539, 179, 359]);
        // Disjoint and covering, checked on the indices the parts were cut from.
        let indices = stratified_indices(&all, &opts.fractions());
        let mut seen: Vec<usize> = indices.concat();
        seen.sort_unstable();
        assert_eq!(seen, (0..all.len()).collect::<Vec<_>>());
        for (part, d) in indices.iter().zip(parts) {
            assert_eq!(&all.subset(part).images, &d.images);
        }
        let counts = all.class_counts();
        for (d, f) in parts.iter().zip(opts.fractions()) {
            for (c, (&got, &n)) in d.class_counts().iter().zip(&counts).enumerate() {
                let ideal = f * n as f64;
                assert!((got as f64 - ideal).abs() < 1.0, "{}: class {c}", d.name);
            }
        }
        assert_eq!(split_digits(&all, &opts).unwrap(), s);
        assert_eq!(s.test.name, "digits/test");
        assert_eq!(s.train.classes, 10);
    }

    #[test]
    fn data_split_parts_hold_exactly_the_file_images() {
        // Checked on pixels rather than indices, so a bug in `subset` would show too.
        let all = digits();
        let s = split_digits(&all, &SplitOptions::default()).unwrap();
        let mut file_keys = keys(&all);
        file_keys.sort();
        let mut part_keys: Vec<Vec<u32>> =
            [&s.pretrain, &s.train, s.val.as_ref().unwrap(), &s.test]
                .iter()
                .flat_map(|d| keys(d))
                .collect();
        part_keys.sort();
        assert_eq!(part_keys, file_keys);
    }

    /// FNV-1a over the parts' indices: the split is published, so any change must be on
    /// purpose (a new [`SPLIT_SEED`] or allocation rule) and update this pin.
    #[test]
    fn data_split_is_pinned() {
        let parts = stratified_indices(&digits(), &SplitOptions::default().fractions());
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for (p, part) in parts.iter().enumerate() {
            for &i in part {
                hash = (hash ^ (p * 10_000 + i) as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        assert_eq!(
            hash,
            2927299731688719473,
            "first test indices {:?}",
            &parts[3][..8]
        );
    }

    #[test]
    fn data_holdout_removes_and_remaps_classes() {
        let all = digits();
        let plain = split_digits(&all, &SplitOptions::default()).unwrap();
        let opts = SplitOptions {
            holdout_classes: vec![7, 3, 7],
            ..SplitOptions::default()
        };
        let s = split_digits(&all, &opts).unwrap();
        let names = ["0", "1", "2", "4", "5", "6", "8", "9"];
        for d in [&s.train, s.val.as_ref().unwrap(), &s.test] {
            assert_eq!(d.classes, 8);
            assert_eq!(d.class_names, names);
            d.validate().unwrap();
        }
        assert_eq!(s.pretrain, plain.pretrain);
        // The kept classes' test images are exactly those of the plain split, relabelled.
        let old_to_new = [0, 1, 2, u32::MAX, 3, 4, 5, u32::MAX, 6, 7];
        let kept: Vec<usize> = (0..plain.test.len())
            .filter(|&i| ![3, 7].contains(&plain.test.labels[i]))
            .collect();
        let expected = plain.test.subset(&kept);
        assert_eq!(s.test.images, expected.images);
        let relabelled: Vec<u32> = expected
            .labels
            .iter()
            .map(|&l| old_to_new[l as usize])
            .collect();
        assert_eq!(s.test.labels, relabelled);
        let held = s.held_out.unwrap();
        assert_eq!(held.len(), plain.test.len() - kept.len());
        assert!(held.labels.iter().all(|l| [3, 7].contains(l)));
        assert_eq!(held.classes, 10);
    }

    #[test]
    fn data_split_options_are_validated() {
        let all = digits();
        let with = |f: fn(&mut SplitOptions)| {
            let mut o = SplitOptions::default();
            f(&mut o);
            split_digits(&all, &o).unwrap_err().to_string()
        };
        assert!(with(|o| o.val = 0.0).contains("positive"));
        assert!(with(|o| o.val = f64::NAN).contains("positive"));
        assert!(with(|o| o.test = 0.3).contains("sum to 1"));
        assert!(with(|o| o.holdout_classes = vec![10]).contains("holdout class 10"));
        let e = with(|o| o.holdout_classes = (1..10).collect());
        assert!(e.contains("9 of 10"), "{e}");
        let tiny = SplitOptions {
            pretrain: 0.997,
            train: 0.001,
            val: 0.001,
            test: 0.001,
            holdout_classes: vec![],
            train_on_val: false,
        };
        let e = split_digits(&all, &tiny).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn data_training_on_val_moves_the_val_part_into_train_in_file_order() {
        let all = digits();
        let held = split_digits(&all, &SplitOptions::default()).unwrap();
        let opts = SplitOptions {
            train_on_val: true,
            ..SplitOptions::default()
        };
        let s = split_digits(&all, &opts).unwrap();
        assert!(s.val.is_none());
        assert_eq!((&s.pretrain, &s.test), (&held.pretrain, &held.test));
        let indices = stratified_indices(&all, &opts.fractions());
        let train = merged(&indices[1], &indices[2]);
        assert_eq!(train.len(), 539 + 179);
        assert!(train.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s.train.images, all.subset(&train).images);
        // An empty validation part is an error only when it is kept apart.
        let mut tiny = SplitOptions {
            pretrain: 0.4,
            train: 0.4999,
            val: 0.0001,
            test: 0.1,
            holdout_classes: vec![],
            train_on_val: false,
        };
        let e = split_digits(&all, &tiny).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        tiny.train_on_val = true;
        assert!(split_digits(&all, &tiny).is_ok());
    }

    #[test]
    fn data_allocate_rounds_within_one_and_sums() {
        let f = [0.4, 0.3, 0.1, 0.2];
        for n in 0..300 {
            let counts = allocate(n, &f);
            assert_eq!(counts.iter().sum::<usize>(), n);
            for (c, x) in counts.iter().zip(f) {
                assert!((*c as f64 - x * n as f64).abs() < 1.0, "n={n}: {counts:?}");
            }
        }
        assert_eq!(allocate(178, &f), [71, 53, 18, 36]);
    }

    /// An empty part said only "the dataset is too small to split"; it says why, of the
    /// largest class, whose share of the part rounds to no image.
    #[test]
    fn data_an_empty_part_names_the_largest_class_and_its_share() {
        let tiny = SplitOptions {
            pretrain: 0.997,
            train: 0.001,
            val: 0.001,
            test: 0.001,
            ..SplitOptions::default()
        };
        let e = split_digits(&digits(), &tiny).unwrap_err().to_string();
        assert_eq!(
            e,
            "the train part of the split would be empty (`digits/train`): every class is too small to \
             give it an image: the largest, `3`, has 183, and 0.1% of 183 rounds to none"
        );
        // Held-out classes are not counted among the part's.
        let opts = SplitOptions {
            holdout_classes: vec![3],
            ..tiny
        };
        let e = split_digits(&digits(), &opts).unwrap_err().to_string();
        assert!(e.contains("the largest, `1`, has 182"), "{e}");
    }
}
