//! Which data a run uses, as the user names it on the command line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use loren_nn::config::VitConfig;
use loren_nn::data::cifar::{Cifar, cifar_class_names, load_cifar, load_cifar_test};
use loren_nn::data::external::{split_official, split_seeded};
use loren_nn::data::folder::{
    folder_class_names, has_classes, imagenet_normalization, load_folder, load_folder_test,
    load_unlabelled,
};
use loren_nn::data::{
    DataError, Dataset, SplitOptions, Splits, bundled_digits, load_digits, split_digits,
};

/// What can go wrong naming or reading a run's data.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// A dataset named in none of the forms [`DataSource`] reads.
    #[error(
        "unknown dataset '{given}': {}{EXPECTED}{}",
        if *.empty_path { "the path is empty; " } else { "" },
        .guess.as_ref().map_or(String::new(), |g| format!("; did you mean {g}?"))
    )]
    UnknownSource {
        given: String,
        empty_path: bool,
        /// The form that reads what is at `given`'s path, when there is something there.
        guess: Option<String>,
    },
    /// A normalisation other than `dataset` or `none`.
    #[error("unknown normalisation '{0}': expected dataset or none")]
    UnknownNormalize(String),
    /// A checkpoint's metadata holding a data setting that cannot be read.
    #[error("checkpoint metadata {key} '{value}': {expected}")]
    Metadata {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A model of a channel count the images cannot be brought to.
    #[error(
        "model '{model}' takes {channels} channels: the data is made as grey (1) or colour (3) \
         images"
    )]
    Channels { model: String, channels: usize },
    /// Reading, splitting or scaling the data.
    #[error(transparent)]
    Data(#[from] DataError),
}

type Result<T, E = DatasetError> = std::result::Result<T, E>;

/// How the images are scaled on their way into the model, a setting of the trained model that
/// its checkpoint records ([`Normalize::KEY`]) for `eval` and `export` to repeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Normalize {
    /// `(x − mean) / std` per channel, with the dataset's statistics
    /// ([`DataSource::normalization`]).
    #[default]
    Dataset,
    /// Pixels on the 0..=1 scale and nothing more: what the LoRA-Ensemble paper's code feeds its
    /// ViT (its transform divides by 255 and never applies the statistics it lists).
    None,
}

impl Normalize {
    /// The checkpoint metadata key. Checkpoints from before the setting lack it, and read as
    /// the default they were trained with.
    pub const KEY: &'static str = "normalize";

    /// What `meta` (a checkpoint's metadata) recorded.
    pub fn recorded(meta: &std::collections::HashMap<String, String>) -> Result<Normalize> {
        meta.get(Self::KEY).map_or(Ok(Normalize::Dataset), |n| {
            n.parse().map_err(|_| DatasetError::Metadata {
                key: Self::KEY,
                value: n.clone(),
                expected: "expected dataset or none",
            })
        })
    }
}

impl FromStr for Normalize {
    type Err = DatasetError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dataset" => Ok(Normalize::Dataset),
            "none" => Ok(Normalize::None),
            other => Err(DatasetError::UnknownNormalize(other.to_string())),
        }
    }
}

impl fmt::Display for Normalize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Normalize::Dataset => "dataset",
            Normalize::None => "none",
        })
    }
}

/// The checkpoint metadata key that records whether a run trained on the validation part too
/// (`--train-on-val`): "true" or "false".
pub const TRAIN_ON_VAL_KEY: &str = "train_on_val";

/// Whether the run whose checkpoint metadata is `meta` trained on its validation part.
/// Checkpoints from before the setting lack the key, and kept the part apart.
pub fn recorded_train_on_val(meta: &std::collections::HashMap<String, String>) -> Result<bool> {
    meta.get(TRAIN_ON_VAL_KEY).map_or(Ok(false), |v| {
        v.parse().map_err(|_| DatasetError::Metadata {
            key: TRAIN_ON_VAL_KEY,
            value: v.clone(),
            expected: "expected true or false",
        })
    })
}

/// The checkpoint metadata key that records the training split's size and labels
/// ([`training_images`]), so that a run resumed on data at another path trains on the same
/// images. Checkpoints from before it lack the key, and resume on the source's word alone.
pub const TRAINING_IMAGES_KEY: &str = "training_images";

/// The checkpoint metadata key that records every part of the split ([`split_images`]), so that
/// `eval` can tell data changed since training: one image added to a class shuffles the class's
/// split anew, and may move images between parts while the training part's count and labels
/// stay as they were. Checkpoints from before it lack the key.
pub const SPLIT_IMAGES_KEY: &str = "split_images";

/// What [`SPLIT_IMAGES_KEY`] records: the number of images in all parts, and an FNV-1a hash of
/// each part's length and labels in order (pretraining, training, validation, test, held out).
pub fn split_images(s: &Splits) -> String {
    let parts = [
        Some(&s.pretrain),
        Some(&s.train),
        s.val.as_ref(),
        Some(&s.test),
        s.held_out.as_ref(),
    ];
    let words = parts.iter().flat_map(|p| {
        let labels = p.map_or(&[][..], |d| &d.labels[..]);
        std::iter::once(labels.len() as u64).chain(labels.iter().map(|&l| u64::from(l)))
    });
    let hash = fnv1a(words.flat_map(u64::to_le_bytes));
    let total: usize = parts.iter().flatten().map(|d| d.len()).sum();
    format!("{total} images, parts {hash:016x}")
}

/// What [`TRAINING_IMAGES_KEY`] records: the number of training images and an FNV-1a hash of
/// their labels in order. The pixels are left out: a JPEG decoder may round differently on
/// another machine, and a resumed run must not be refused for that.
pub fn training_images(train: &loren_nn::data::Dataset) -> String {
    let hash = fnv1a(train.labels.iter().flat_map(|l| l.to_le_bytes()));
    format!("{} images, labels {hash:016x}", train.len())
}

/// The 64-bit FNV-1a hash of `bytes`: the data's records need no more than telling a change.
fn fnv1a(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A dataset: `digits` (the bundled 8×8 digits), `digits:PATH` (the same format from a file),
/// `cifar10:DIR` and `cifar100:DIR` (the official binary version), or `folder:DIR` (one
/// subfolder of PNG or JPEG images per class).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataSource {
    Digits(Option<PathBuf>),
    Cifar(Cifar, PathBuf),
    Folder(PathBuf),
}

const EXPECTED: &str = "expected digits, digits:PATH (a gzipped CSV like the bundled one), \
    cifar10:DIR, cifar100:DIR (the binary version) or folder:DIR (a subfolder of images per class)";

impl FromStr for DataSource {
    type Err = DatasetError;

    fn from_str(s: &str) -> Result<Self> {
        let path = |p: &str| PathBuf::from(p);
        let unknown = |empty_path| DatasetError::UnknownSource {
            given: s.to_string(),
            empty_path,
            guess: guess_source(Path::new(s)),
        };
        match s.split_once(':') {
            None if s == "digits" => Ok(DataSource::Digits(None)),
            Some((_, "")) => Err(unknown(true)),
            Some(("digits", p)) => Ok(DataSource::Digits(Some(path(p)))),
            Some(("cifar10", p)) => Ok(DataSource::Cifar(Cifar::Ten, path(p))),
            Some(("cifar100", p)) => Ok(DataSource::Cifar(Cifar::Hundred, path(p))),
            Some(("folder", p)) => Ok(DataSource::Folder(path(p))),
            _ => Err(unknown(false)),
        }
    }
}

/// The `--data` form that reads what is at `path`, given without one: a CIFAR folder by its
/// first training file, any other folder as an image folder, a `.gz` file as digits.
fn guess_source(path: &Path) -> Option<String> {
    let shown = path.display();
    if path.is_dir() {
        let form = Cifar::detect(path).map_or("folder", Cifar::name);
        return Some(format!("{form}:{shown}"));
    }
    let gz = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gz"));
    (path.is_file() && gz).then(|| format!("digits:{shown}"))
}

impl fmt::Display for DataSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSource::Digits(None) => f.write_str("digits"),
            DataSource::Digits(Some(p)) => write!(f, "digits:{}", p.display()),
            DataSource::Cifar(kind, p) => write!(f, "{}:{}", kind.name(), p.display()),
            DataSource::Folder(p) => write!(f, "folder:{}", p.display()),
        }
    }
}

impl DataSource {
    /// The same source with its path made absolute where it exists, for a checkpoint to record:
    /// `eval` may run from another directory.
    pub fn absolute(&self) -> DataSource {
        let abs = |p: &PathBuf| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone());
        match self {
            DataSource::Digits(p) => DataSource::Digits(p.as_ref().map(abs)),
            DataSource::Cifar(kind, p) => DataSource::Cifar(*kind, abs(p)),
            DataSource::Folder(p) => DataSource::Folder(abs(p)),
        }
    }

    /// Load and split for a model of config `vit`.
    ///
    /// - digits: the fixed, seeded pretrain / train / validation / test split;
    /// - CIFAR: train and validation (90% / 10%, stratified, seeded) from the official training
    ///   files, the official test files as test;
    /// - a folder: train / validation / test (70% / 10% / 20%, stratified, seeded).
    ///
    /// CIFAR and folders have no pretraining part: their backbone comes from `--backbone`.
    /// With `train_on_val` the validation images join the training part (in the files' order)
    /// and there is no validation part; the other parts stay as they were.
    /// Images are brought to the model's channels (grey repeated into RGB, or RGB to grey), and
    /// to its size: folders when read, the others as each batch is made; then normalised as
    /// `normalize` says.
    pub fn splits(
        &self,
        holdout_classes: &[u32],
        vit: &VitConfig,
        normalize: Normalize,
        train_on_val: bool,
    ) -> Result<Splits> {
        // Images are made grey or colour (convert_channels); a model of other channels (from a
        // damaged checkpoint, say) is refused here rather than met there.
        if ![1, 3].contains(&vit.channels) {
            return Err(DatasetError::Channels {
                model: vit.name.clone(),
                channels: vit.channels,
            });
        }
        let splits = match self {
            DataSource::Digits(source) => {
                let all = match source {
                    None => bundled_digits()?,
                    Some(path) => load_digits(path)?,
                };
                let opts = SplitOptions {
                    holdout_classes: holdout_classes.to_vec(),
                    train_on_val,
                    ..SplitOptions::default()
                };
                split_digits(&all, &opts)?
            }
            DataSource::Cifar(kind, dir) => {
                let parts = load_cifar(dir, *kind)?;
                split_official(&parts.train, &parts.test, holdout_classes, train_on_val)?
            }
            DataSource::Folder(dir) => {
                let shape = [vit.channels, vit.image_size, vit.image_size];
                split_seeded(&load_folder(dir, shape)?, holdout_classes, train_on_val)?
            }
        };
        // The loaders normalise with the dataset's statistics already.
        let unit =
            (normalize == Normalize::None).then(|| self.normalization(vit.channels, normalize));
        fit_to_model(splits, vit, unit)
    }

    /// The file or folder it is read from; none for the bundled digits.
    pub fn place(&self) -> Option<&Path> {
        match self {
            DataSource::Digits(p) => p.as_deref(),
            DataSource::Cifar(_, p) | DataSource::Folder(p) => Some(p),
        }
    }

    /// Whether `other` names the same data: the same kind at the same place, however the path
    /// is written.
    pub fn same_as(&self, other: &DataSource) -> bool {
        let place = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        match (self, other) {
            (DataSource::Digits(Some(a)), DataSource::Digits(Some(b)))
            | (DataSource::Folder(a), DataSource::Folder(b)) => place(a) == place(b),
            (DataSource::Cifar(x, a), DataSource::Cifar(y, b)) => x == y && place(a) == place(b),
            (a, b) => a == b,
        }
    }

    /// This source's test part (digits and folders of classes: their seeded test part; CIFAR:
    /// the official test file; a folder of images without classes: all of them), for scoring a model trained on other data at telling it apart:
    /// brought to the model's channels and size, and scaled as `like` (the model's own data) is,
    /// since the model is fed every image the one way. Its labels mean nothing to that model.
    pub fn ood_set(&self, vit: &VitConfig, like: &Dataset) -> Result<Dataset> {
        // The test part alone: the other parts would be read only to be dropped.
        let test = match self {
            DataSource::Cifar(kind, dir) => load_cifar_test(dir, *kind)?,
            // A folder of classes, by its test part; one of images alone, every one of them.
            DataSource::Folder(dir) => {
                let shape = [vit.channels, vit.image_size, vit.image_size];
                match has_classes(dir) {
                    true => load_folder_test(dir, shape)?,
                    false => load_unlabelled(dir, shape)?,
                }
            }
            // The digits are small and compiled in: split as always.
            DataSource::Digits(_) => self.splits(&[], vit, Normalize::None, true)?.test,
        };
        fed_as(test, vit, like)
    }

    /// The names of the classes a model trained on this data predicts, in label order: the
    /// dataset's classes less `holdout_classes`. Reads only names, never images.
    pub fn class_names(&self, holdout_classes: &[u32]) -> Result<Vec<String>> {
        let all = match self {
            DataSource::Digits(_) => (0..10).map(|c| c.to_string()).collect(),
            DataSource::Cifar(kind, dir) => cifar_class_names(dir, *kind)?,
            DataSource::Folder(dir) => folder_class_names(dir)?,
        };
        Ok(all
            .into_iter()
            .enumerate()
            .filter(|(c, _)| !holdout_classes.contains(&(*c as u32)))
            .map(|(_, name)| name)
            .collect())
    }

    /// Per-channel mean and std the images are normalised with, for `channels` channels. With
    /// [`Normalize::Dataset`]: digits 0.5 and 0.5; CIFAR its training images' statistics (those
    /// the LoRA-Ensemble paper's configuration lists); folders ImageNet's. With
    /// [`Normalize::None`], 0 and 1. Known without reading the data.
    pub fn normalization(&self, channels: usize, normalize: Normalize) -> (Vec<f32>, Vec<f32>) {
        if normalize == Normalize::None {
            return (vec![0.0; channels], vec![1.0; channels]);
        }
        let (mean, std) = match self {
            DataSource::Digits(_) => (vec![0.5], vec![0.5]),
            DataSource::Cifar(kind, _) => kind.normalization(),
            DataSource::Folder(_) => imagenet_normalization(3),
        };
        let fit = |v: Vec<f32>| match (v.len(), channels) {
            (a, b) if a == b => v,
            (1, n) => vec![v[0]; n],
            (a, n) => vec![v.iter().sum::<f32>() / a as f32; n],
        };
        (fit(mean), fit(std))
    }
}

/// Every image of the folder at `dir`, as one test set for a model of config `vit`, scaled as
/// `like` (the model's own data) is: a test set held apart from training, scored whole.
pub fn every_image(dir: &Path, vit: &VitConfig, like: &Dataset) -> Result<Dataset> {
    let shape = [vit.channels, vit.image_size, vit.image_size];
    let mut all = load_folder(dir, shape)?;
    all.name = format!("every image of {}", all.name);
    fed_as(all, vit, like)
}

/// `d` with the model's channels, resized to its image size as batches are made, and scaled as
/// `like` (the model's own data) is, since the model is fed every image the one way.
fn fed_as(d: Dataset, vit: &VitConfig, like: &Dataset) -> Result<Dataset> {
    let d = fit_dataset(d, vit);
    Ok(d.with_normalization(like.norm_mean.clone(), like.norm_std.clone())?)
}

/// Every part with the model's channels, resized to its image size as batches are made, and
/// normalised by `normalization` (mean, std) when given rather than by the loader's statistics.
fn fit_to_model(
    s: Splits,
    vit: &VitConfig,
    normalization: Option<(Vec<f32>, Vec<f32>)>,
) -> Result<Splits> {
    let fit = |d: Dataset| {
        let d = fit_dataset(d, vit);
        match &normalization {
            Some((mean, std)) => d.with_normalization(mean.clone(), std.clone()),
            None => Ok(d),
        }
    };
    Ok(Splits {
        pretrain: fit(s.pretrain)?,
        train: fit(s.train)?,
        val: s.val.map(fit).transpose()?,
        test: fit(s.test)?,
        held_out: s.held_out.map(fit).transpose()?,
        ood_sets: s.ood_sets.into_iter().map(fit).collect::<Result<_, _>>()?,
    })
}

/// `d` with the model's channels, resized to its image size as batches are made.
fn fit_dataset(d: Dataset, vit: &VitConfig) -> Dataset {
    d.with_channels(vit.channels)
        .resized_on_batch(vit.image_size, vit.image_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_of_neither_one_nor_three_channels_is_refused_before_any_image() {
        let vit = VitConfig {
            channels: 2,
            ..VitConfig::tiny()
        };
        let e = DataSource::Digits(None)
            .splits(&[], &vit, Normalize::Dataset, false)
            .unwrap_err();
        assert!(e.to_string().contains("takes 2 channels"), "{e}");
        assert!(
            DataSource::Digits(None)
                .splits(&[], &VitConfig::tiny(), Normalize::Dataset, false)
                .is_ok()
        );
    }

    /// Two sources are the same data (an --ood-data set that is the data scored in
    /// distribution, noted as such) when they are of one kind at one place, however the path is
    /// written: through a link or a `..`; CIFAR-10 and CIFAR-100 unpacked into one folder are
    /// two sets.
    #[cfg(unix)]
    #[test]
    fn the_same_data_is_the_same_kind_at_the_same_place() {
        let dir = std::env::temp_dir().join(format!("loren-same-as-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("photos/cats")).unwrap();
        std::os::unix::fs::symlink("photos", dir.join("alias")).unwrap();
        let d = dir.display();
        let source = |s: String| s.parse::<DataSource>().unwrap();
        let photos = source(format!("folder:{d}/photos"));
        for same in [
            format!("folder:{d}/alias"),
            format!("folder:{d}/photos/cats/.."),
            format!("folder:{d}/photos"),
        ] {
            assert!(photos.same_as(&source(same.clone())), "{same}");
        }
        for other in [
            format!("folder:{d}/photos/cats"),
            format!("cifar10:{d}/photos"),
            format!("digits:{d}/photos"),
            "digits".to_string(),
        ] {
            assert!(!photos.same_as(&source(other.clone())), "{other}");
        }
        let cifar = |kind: &str| source(format!("{kind}:{d}/alias"));
        assert!(cifar("cifar10").same_as(&source(format!("cifar10:{d}/photos"))));
        assert!(!cifar("cifar10").same_as(&cifar("cifar100")));
        assert!(source("digits".into()).same_as(&source("digits".into())));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unnormalised_splits_batch_pixels_on_the_unit_scale() {
        let vit = VitConfig::tiny();
        let plain = DataSource::Digits(None)
            .splits(&[], &vit, Normalize::None, false)
            .unwrap();
        for d in [
            &plain.train,
            plain.val.as_ref().unwrap(),
            &plain.test,
            &plain.pretrain,
        ] {
            assert_eq!(
                (&d.norm_mean[..], &d.norm_std[..]),
                (&[0.0][..], &[1.0][..])
            );
        }
        let raw = plain.test.image(0).to_vec();
        assert_eq!(plain.test.batch(&[0], None).images, raw);
        let scaled = DataSource::Digits(None)
            .splits(&[], &vit, Normalize::Dataset, false)
            .unwrap();
        let want: Vec<f32> = raw.iter().map(|x| (x - 0.5) / 0.5).collect();
        assert_eq!(scaled.test.batch(&[0], None).images, want);
        assert_eq!("none".parse::<Normalize>().unwrap(), Normalize::None);
        assert_eq!(Normalize::None.to_string(), "none");
        let e = "imagenet".parse::<Normalize>().unwrap_err().to_string();
        assert!(e.contains("expected dataset or none"), "{e}");
    }

    /// A path given without its form is answered with the form that reads it.
    #[test]
    fn a_bare_path_is_answered_with_its_form() {
        let dir = std::env::temp_dir().join(format!("loren-guess-{}", std::process::id()));
        let cifar = dir.join("c10");
        std::fs::create_dir_all(cifar.join("cifar-10-batches-bin")).unwrap();
        std::fs::write(cifar.join("cifar-10-batches-bin/data_batch_1.bin"), b"").unwrap();
        std::fs::create_dir_all(dir.join("c100")).unwrap();
        std::fs::write(dir.join("c100/train.bin"), b"").unwrap();
        std::fs::write(dir.join("d.csv.gz"), b"").unwrap();
        let guess = |p: &str| match dir.join(p).to_str().unwrap().parse::<DataSource>() {
            Err(DatasetError::UnknownSource { guess, .. }) => guess,
            other => panic!("{p}: {other:?}"),
        };
        let at = |form: &str, p: &str| Some(format!("{form}:{}", dir.join(p).display()));
        assert_eq!(guess("c10"), at("cifar10", "c10"));
        assert_eq!(guess("c100"), at("cifar100", "c100"));
        assert_eq!(guess(""), at("folder", ""));
        assert_eq!(guess("d.csv.gz"), at("digits", "d.csv.gz"));
        assert_eq!(guess("nothing"), None);
        let e = dir.join("c100").to_str().unwrap().parse::<DataSource>();
        let e = e.unwrap_err().to_string();
        assert!(
            e.ends_with(&format!(
                "; did you mean cifar100:{}?",
                dir.join("c100").display()
            )),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A program embedding loren tells its user's mistakes from a damaged checkpoint and from
    /// missing data by the variant, not by the message.
    #[test]
    fn errors_say_what_went_wrong_by_their_variant() {
        assert!(matches!(
            "mnist:/x".parse::<DataSource>(),
            Err(DatasetError::UnknownSource {
                empty_path: false,
                ..
            })
        ));
        assert!(matches!(
            "folder:".parse::<DataSource>(),
            Err(DatasetError::UnknownSource {
                empty_path: true,
                ..
            })
        ));
        assert!(matches!(
            "z".parse::<Normalize>(),
            Err(DatasetError::UnknownNormalize(n)) if n == "z"
        ));
        let meta = |k: &str, v: &str| std::collections::HashMap::from([(k.into(), v.into())]);
        assert!(matches!(
            recorded_train_on_val(&meta(TRAIN_ON_VAL_KEY, "yes")),
            Err(DatasetError::Metadata { key: TRAIN_ON_VAL_KEY, value, .. }) if value == "yes"
        ));
        assert!(matches!(
            Normalize::recorded(&meta(Normalize::KEY, "imagenet")),
            Err(DatasetError::Metadata {
                key: Normalize::KEY,
                ..
            })
        ));
        let missing = DataSource::Folder("/nonexistent/loren-dataset".into());
        assert!(matches!(
            missing.splits(&[], &VitConfig::tiny(), Normalize::Dataset, false),
            Err(DatasetError::Data(_))
        ));
    }

    #[test]
    fn parses_and_prints_sources() {
        for s in [
            "digits",
            "digits:/tmp/x.csv.gz",
            "cifar10:/data/cifar-10-batches-bin",
            "cifar100:/data/c100",
            "folder:/data/flowers",
        ] {
            assert_eq!(s.parse::<DataSource>().unwrap().to_string(), s);
        }
        for bad in ["", "digits:", "cifar", "mnist:/x", "cifar10:", "folder"] {
            let e = bad.parse::<DataSource>().unwrap_err().to_string();
            assert!(
                e.contains("unknown dataset") && e.contains("cifar100:DIR"),
                "{e}"
            );
        }
    }

    #[test]
    fn digits_for_a_larger_model_are_converted_and_resized_per_batch() {
        let vit = VitConfig {
            image_size: 16,
            channels: 3,
            ..VitConfig::tiny()
        };
        let s = DataSource::Digits(None)
            .splits(&[], &vit, Normalize::Dataset, false)
            .unwrap();
        assert_eq!(s.train.shape(), [3, 8, 8]);
        assert_eq!(s.train.batch_shape(), [3, 16, 16]);
        let b = s.test.batch(&[0, 1], None);
        assert_eq!((b.channels, b.height, b.width), (3, 16, 16));
        let plain = DataSource::Digits(None)
            .splits(&[], &VitConfig::tiny(), Normalize::Dataset, false)
            .unwrap();
        assert_eq!(plain.train.resize_to, None);
        assert_eq!(
            DataSource::Digits(None).normalization(3, Normalize::Dataset),
            (vec![0.5; 3], vec![0.5; 3])
        );
    }
}
