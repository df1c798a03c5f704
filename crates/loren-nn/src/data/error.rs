use std::path::PathBuf;

use thiserror::Error;

/// What went wrong reading, building, splitting or transforming a dataset.
///
/// File errors name the file and, where it applies, the 1-based line and field.
#[derive(Debug, Error)]
pub enum DataError {
    // `reason`, not `source`: the message holds it, and a source would print it twice.
    #[error("{}: cannot read: {reason}", path.display())]
    Io {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{}: the file is empty", path.display())]
    EmptyFile { path: PathBuf },
    #[error(
        "{}: not a gzip file (it does not start with the gzip magic bytes 1f 8b); the digits \
         format is gzipped CSV, and `gzip -k FILE` compresses a plain one",
        path.display()
    )]
    NotGzip { path: PathBuf },
    #[error("{}: corrupt gzip data: {reason}", path.display())]
    CorruptGzip {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error("{}: decompresses to more than {limit} bytes; refusing to read further", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{}: no images: the data holds no rows", path.display())]
    NoRows { path: PathBuf },
    #[error("{}: line {line}: not valid UTF-8 text", path.display())]
    NotText { path: PathBuf, line: usize },
    #[error(
        "{}: line {line}: expected {expected} comma-separated fields (the pixels, then the label), found {found}",
        path.display()
    )]
    FieldCount {
        path: PathBuf,
        line: usize,
        expected: usize,
        found: usize,
    },
    #[error(
        "{}: line {line} is a header (`{value}`): the digits format has none, its first line is \
         an image's; remove the line",
        path.display()
    )]
    HeaderLine {
        path: PathBuf,
        line: usize,
        value: String,
    },
    #[error("{}: line {line}, field {field}: `{value}` is not a whole number", path.display())]
    NotNumeric {
        path: PathBuf,
        line: usize,
        field: usize,
        value: String,
    },
    /// `value` as the file writes it: it may be too large for any integer type.
    #[error("{}: line {line}, field {field}: pixel value {value} is outside 0..=16", path.display())]
    PixelRange {
        path: PathBuf,
        line: usize,
        field: usize,
        value: String,
    },
    /// `value` as the file writes it: it may be too large for any integer type.
    #[error("{}: line {line}: label {value} is outside 0..=9", path.display())]
    LabelRange {
        path: PathBuf,
        line: usize,
        value: String,
    },
    /// A file of an external dataset (CIFAR binaries, an image folder) that cannot be used:
    /// truncated, an unknown label, an undecodable image, a folder with no images.
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    /// Image files that cannot be read, two or more, each named with its reason: a folder's
    /// every bad file in one error, not one a run.
    #[error("{} image files cannot be read:{}", .0.len(), listed(.0))]
    Unreadable(Vec<DataError>),
    /// Bytes given to [`decode`](super::folder::decode) that are not a PNG or JPEG image it
    /// reads.
    #[error("cannot decode the image: {reason}")]
    Undecodable { reason: String },

    /// Images cannot be brought to this shape: a channel count other than 1 or 3, or more
    /// pixels than memory holds.
    #[error("images of {}x{}x{} (channels, height, width): {reason}", shape[0], shape[1], shape[2])]
    ImageShape { shape: [usize; 3], reason: String },
    #[error("dataset `{name}`: channels, height and width must be positive, got {}x{}x{}", shape[0], shape[1], shape[2])]
    EmptyShape { name: String, shape: [usize; 3] },
    #[error(
        "dataset `{name}`: {labels} labels of {}x{}x{} images need {} pixel values, found {found}",
        shape[0], shape[1], shape[2],
        pixel_count(*labels, *shape).map_or("more than usize::MAX".into(), |n| n.to_string())
    )]
    ImageCount {
        name: String,
        labels: usize,
        shape: [usize; 3],
        found: usize,
    },
    #[error(
        "dataset `{name}`: needs at least one class and one name per class: {classes} classes, {found} class names"
    )]
    ClassNames {
        name: String,
        classes: usize,
        found: usize,
    },
    #[error(
        "dataset `{name}`: label {label} at index {index} is not below the class count {classes}"
    )]
    LabelOutOfRange {
        name: String,
        index: usize,
        label: u32,
        classes: usize,
    },
    #[error("dataset `{name}`: pixel value {value} at flat index {index} is outside [0, 1]")]
    PixelOutOfRange {
        name: String,
        index: usize,
        value: f32,
    },
    /// [`Pixels::Steps`](super::Pixels::Steps) with `levels: 0`, whose every byte would read
    /// as 0/0.
    #[error(
        "dataset `{name}`: pixel bytes of 0 levels (byte b is b / levels: 255 for 8-bit images)"
    )]
    ZeroLevels { name: String },
    #[error(
        "dataset `{name}`: norm_mean and norm_std need {channels} finite values each (one per channel), std > 0; got mean {mean:?}, std {std:?}"
    )]
    Normalization {
        name: String,
        channels: usize,
        mean: Vec<f32>,
        std: Vec<f32>,
    },
    /// Data given to a model that takes other images: [`Dataset::with_channels`](super::Dataset::with_channels)
    /// converts them.
    #[error(
        "dataset `{name}`: images of {found} channels, and model '{model}' takes {expected} \
         (Dataset::with_channels converts them)"
    )]
    ModelChannels {
        name: String,
        model: String,
        expected: usize,
        found: usize,
    },
    /// Data whose batches are not the model's image size:
    /// [`Dataset::resized_on_batch`](super::Dataset::resized_on_batch) makes them so.
    #[error(
        "dataset `{name}`: batches of {}x{} images, and model '{model}' takes {}x{} \
         (Dataset::resized_on_batch resizes them)",
        found[0], found[1], expected[0], expected[1]
    )]
    ModelImageSize {
        name: String,
        model: String,
        expected: [usize; 2],
        found: [usize; 2],
    },
    /// Data of other classes than the model's heads give.
    #[error("dataset `{name}`: {found} classes, and the heads of model '{model}' have {expected}")]
    ModelClasses {
        name: String,
        model: String,
        expected: usize,
        found: usize,
    },
    #[error("{op}: image shapes differ: expected {expected:?}, found {found:?} (in `{name}`)")]
    ShapeMismatch {
        op: &'static str,
        name: String,
        expected: [usize; 3],
        found: [usize; 3],
    },

    #[error("split fractions {fractions:?} (pretrain, train, val, test) {reason}")]
    BadFractions {
        fractions: [f64; 4],
        reason: &'static str,
    },
    #[error(
        "holdout class {class} does not exist: the dataset's {classes} classes are 0 to {}",
        .classes.saturating_sub(1)
    )]
    UnknownHoldoutClass { class: u32, classes: usize },
    #[error("holding out {held_out} of {classes} classes leaves fewer than 2 to classify")]
    TooFewClassesLeft { held_out: usize, classes: usize },
    /// `reason` says which classes are too small, and how large one must be.
    #[error("the {part} part of the split would be empty (`{name}`): {reason}")]
    EmptySplit {
        name: String,
        part: &'static str,
        reason: String,
    },

    #[error("shift severity {severity} is outside 1..=5")]
    BadSeverity { severity: u8 },
    #[error("augmentation {field} = {value} must be finite and non-negative")]
    BadAugment { field: &'static str, value: f32 },
    #[error("batch size must be positive, got 0")]
    ZeroBatchSize,
}

/// Each error on a line of its own, the first [`LISTED`], then how many more.
fn listed(errors: &[DataError]) -> String {
    let mut out: String = errors
        .iter()
        .take(LISTED)
        .map(|e| format!("\n  {e}"))
        .collect();
    if errors.len() > LISTED {
        out += &format!("\n  and {} more", errors.len() - LISTED);
    }
    out
}

/// How many unreadable files an error lists.
const LISTED: usize = 20;

/// `n · C · H · W`, or `None` if it overflows.
pub(crate) fn pixel_count(n: usize, shape: [usize; 3]) -> Option<usize> {
    shape.iter().try_fold(n, |acc, &d| acc.checked_mul(d))
}
