//! A trained ensemble as one self-contained safetensors file, and the API that predicts with it.
//!
//! [`export`] (the `loren export` command) turns a training checkpoint and its backbone into a
//! file another program can read without loren:
//!
//! - **Shared weights once.** For `lora`, `single-lora`, `single` and `mc-dropout`, every backbone tensor is
//!   stored once, without a member axis, under loren's names: `patch_embed.weight`
//!   `[D, C·p·p]` (the patch convolution flattened in `(c, i, j)` order), `patch_embed.bias`,
//!   `cls_token` `[D]`, `pos_embed` `[T, D]`, `blocks.N.norm1.{weight,bias}`,
//!   `blocks.N.attn.{q,k,v,o}.{weight,bias}` (`[D, D]`, `[D]`), `blocks.N.norm2.*`,
//!   `blocks.N.mlp.fc1.*` `[mlp, D]`, `blocks.N.mlp.fc2.*` `[D, mlp]`, `norm.{weight,bias}`.
//!   For `explicit`, each of these is stacked over the members: `[M, ...]`.
//! - **Stacked adapters and heads.** `blocks.N.attn.P.lora_a` `[M, r, D]` and `.lora_b`
//!   `[M, D, r]` for each adapted projection P, so member m's projection is
//!   `y = x·Wᵀ + b + s·(x·A_mᵀ)·B_mᵀ`; `head.weight` `[M, C, D]` and `head.bias` `[M, C]`.
//! - **Metadata** (strings): `format` = `loren-ensemble-v1`; `vit` and `ensemble`, the configs as
//!   JSON (width, depth, heads, LayerNorm eps; method, members, rank, scale, targets, drop_key);
//!   `layout` = `shared` or `stacked`; `norm_mean` and `norm_std`, JSON arrays, the per-channel
//!   normalisation the inputs need; `class_names`, a JSON array; `data`, `holdout_classes`,
//!   `normalize`, `train_on_val` and `backbone`, the data and weights it came from, as `loren
//!   eval` rebuilds them; `train`, the training settings as JSON, and `training_images` and
//!   `split_images`, the training part's and every part's count and labels (from checkpoints
//!   that record them).
//!
//! The forward pass is a pre-norm ViT: tokens = [class token; patches·Wᵀ + b] + pos_embed, then
//! per block `x += o(attn(norm1(x)))`, `x += fc2(gelu(fc1(norm2(x))))` (exact erf GELU), then
//! `norm` on the class token and each member's head; the prediction is the mean of the
//! members' softmax probabilities. Under `mc-dropout` each member is one pass of the shared
//! network with DropKey masks of its own on every attention score (rate `drop_key` in the
//! ensemble JSON): the masks are hashes, `loren_tensor::ops::dropkey`, drawn for predictions
//! from one fixed seed and a hash of the image's values, so an image draws the same masks in any
//! input, at any place, in chunks of any size: its prediction is a function of the image.
//!
//! [`Ensemble`] reads such a file back (or the training checkpoint itself, with its backbone;
//! or takes a model trained in the same program, [`Ensemble::from_trained`]) and predicts with
//! loren's own engine, giving the same probabilities, bit for bit, as
//! `loren eval` computes from the checkpoint. `loren predict` is that API on image files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use loren_nn::NnError;
use loren_nn::checkpoint::{self, TensorFile};
use loren_nn::config::{EnsembleConfig, Method, VitConfig};
use loren_nn::data::folder::{decode, to_shape};
use loren_nn::data::prefetch::{DEPTH, prefetch};
use loren_nn::data::{DataError, Dataset, Pixels, normalize_planes};
use loren_nn::metrics::{Predictions, argmax, scores};
use loren_nn::train::{INPUT_KEYS, check_format, load_trained};
use loren_nn::vit::Vit;
use loren_tensor::{Device, DeviceSpec, MemTag, Tensor};

use crate::backbone::checkpoint_backbone;
use crate::dataset::{
    DataSource, Normalize, SPLIT_IMAGES_KEY, TRAIN_ON_VAL_KEY, TRAINING_IMAGES_KEY,
    recorded_train_on_val,
};
use crate::files::FileKind;
use crate::outputs::same_file;

/// Marks a file written by [`export`].
pub const FORMAT: &str = "loren-ensemble-v1";

/// Images per forward pass when [`Ensemble::predict`] splits its input: `loren eval`'s default
/// `--eval-batch-size`, so that the same images give bit-for-bit the same probabilities.
pub const DEFAULT_BATCH: usize = 256;

/// A trained ensemble loaded for prediction.
///
/// ```no_run
/// use loren::Ensemble;
/// use loren::tensor::DeviceSpec;
///
/// # fn main() -> Result<(), loren::EnsembleError> {
/// let ens = Ensemble::load("runs/train/ensemble.safetensors", DeviceSpec::Auto)?;
/// let [c, h, w] = ens.image_shape();
/// // Two images with pixels in [0, 1], [B, C, H, W] row-major.
/// let pixels = vec![0.5f32; 2 * c * h * w];
/// let p = ens.predict_pixels(&pixels, 2)?;
/// for b in 0..p.batch {
///     let class = p.predicted(b);
///     println!(
///         "image {b}: {} ({:.1}%), entropy {:.3}, mutual information {:.3}",
///         ens.class_names()[class],
///         100.0 * p.mean(b)[class],
///         p.entropy[b],
///         p.mutual_information[b],
///     );
/// }
/// # Ok(())
/// # }
/// ```
pub struct Ensemble {
    model: Vit,
    norm_mean: Vec<f32>,
    norm_std: Vec<f32>,
    class_names: Vec<String>,
    batch_size: usize,
    metadata: HashMap<String, String>,
}

/// What it is and where it runs; the weights are left out.
impl std::fmt::Debug for Ensemble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ensemble")
            .field("vit", &self.model.config.name)
            .field("method", &self.model.ensemble.method)
            .field("members", &self.members())
            .field("classes", &self.class_names)
            .field("image_shape", &self.image_shape())
            .field("device", &self.device_name())
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

/// What an ensemble predicts for a batch of B images.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// M, the members that predicted (1 for the single-network methods).
    pub members: usize,
    /// B, the images predicted, in the order given.
    pub batch: usize,
    /// C, the classes each probability vector has.
    pub classes: usize,
    /// Every member's softmax probabilities, `[M, B, C]`, member-major.
    pub probs: Vec<f32>,
    /// The ensemble's prediction, the members' mean, `[B, C]`.
    pub mean: Vec<f32>,
    /// Entropy of the mean prediction per image, in nats: the total uncertainty.
    pub entropy: Vec<f64>,
    /// Mutual information between prediction and member per image, in nats: the part of the
    /// entropy that comes from the members disagreeing (0 for one member).
    pub mutual_information: Vec<f64>,
}

impl Prediction {
    /// Member `m`'s probabilities for image `b`, `[C]`. Panics when `m` or `b` is out of range,
    /// as a slice index does.
    pub fn member(&self, m: usize, b: usize) -> &[f32] {
        // A `b` past the batch would index another member's row, not past the slice.
        assert!(
            m < self.members && b < self.batch,
            "member {m}, image {b} of a prediction of {} members and {} images",
            self.members,
            self.batch
        );
        &self.probs[(m * self.batch + b) * self.classes..][..self.classes]
    }

    /// The mean prediction for image `b`, `[C]`. Panics when `b` is out of range.
    pub fn mean(&self, b: usize) -> &[f32] {
        &self.mean[b * self.classes..][..self.classes]
    }

    /// The members' probabilities as `loren::nn::metrics` scores them (its images are the
    /// samples): calibration, NLL, OOD detection or accuracy by ensemble size, given labels.
    pub fn predictions(&self) -> Predictions {
        Predictions {
            members: self.members,
            samples: self.batch,
            classes: self.classes,
            probs: self.probs.clone(),
        }
    }

    /// The most probable class of image `b` under the mean (the lowest index on ties).
    pub fn predicted(&self, b: usize) -> usize {
        argmax(self.mean(b))
    }
}

/// What can go wrong loading an [`Ensemble`], predicting with it, or [`export`]ing one, by
/// where the fault lies: a server answers [`EnsembleError::Input`] as its client's bad request,
/// may fall back to the CPU on [`EnsembleError::Device`], and reports the rest as its own.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnsembleError {
    /// The images given to [`Ensemble::predict`], [`Ensemble::predict_pixels`] or
    /// [`Ensemble::predict_encoded`].
    #[error(transparent)]
    Input(#[from] InputError),
    /// The device asked for cannot be used: no GPU, no driver, or no GPU of that number.
    #[error(transparent)]
    Device(loren_tensor::Error),
    /// A file that cannot be read, or holds no ensemble loren can use: the ensemble or
    /// checkpoint named, or the backbone it records or was given. The message names the file.
    #[error("{message}")]
    File {
        path: PathBuf,
        message: String,
        /// Where the file could not be read, the I/O error's kind (`NotFound`, say, for a
        /// server to answer as a missing model); None where it was read and is not usable.
        io: Option<std::io::ErrorKind>,
    },
    /// Where [`export`] was to write: a file it must not replace, or one it could not write.
    #[error("{message}")]
    Output { path: PathBuf, message: String },
    /// The engine failed while computing or placing weights: device memory ran out, or a CUDA
    /// call failed.
    #[error(transparent)]
    Engine(#[from] NnError),
    /// A model and the data given with it to [`Ensemble::from_trained`] that do not go
    /// together, as [`Vit::check_data`] finds: other channels, image size or classes, or data
    /// that breaks its own invariants.
    #[error(transparent)]
    Mismatch(DataError),
}

impl EnsembleError {
    /// A failure reading `path` into a model: the engine's own CUDA failures (device memory
    /// running out as the weights are placed) as such, anything else as the file's.
    fn loading(path: &Path, error: anyhow::Error) -> Self {
        if error.chain().any(is_cuda_failure) {
            return match error.downcast::<NnError>() {
                Ok(e) => EnsembleError::Engine(e),
                Err(error) => match error.downcast::<loren_tensor::Error>() {
                    Ok(e) => EnsembleError::Engine(e.into()),
                    Err(error) => EnsembleError::file(path, error),
                },
            };
        }
        EnsembleError::file(path, error)
    }

    /// `error` about `path`, its message naming the file where the chain does not already.
    fn file(path: &Path, error: impl Into<anyhow::Error>) -> Self {
        let error: anyhow::Error = error.into();
        let (shown, message) = (path.display().to_string(), format!("{error:#}"));
        EnsembleError::File {
            io: error.chain().find_map(io_kind),
            path: path.to_path_buf(),
            message: match message.contains(&shown) {
                true => message,
                false => format!("{shown}: {message}"),
            },
        }
    }

    fn output(path: &Path, message: impl Into<String>) -> Self {
        EnsembleError::Output {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// What [`Ensemble::from_trained`] returns for data that does not go with the model: the
/// [`EnsembleError::Mismatch`], and the model it was given, back.
pub struct FromTrainedError {
    error: EnsembleError,
    model: Box<Vit>,
}

impl FromTrainedError {
    /// The [`EnsembleError::Mismatch`] that says what does not fit.
    pub fn error(&self) -> &EnsembleError {
        &self.error
    }

    /// The model [`Ensemble::from_trained`] was given, as it was.
    pub fn into_model(self) -> Vit {
        *self.model
    }
}

/// The error alone: the model is not shown.
impl std::fmt::Debug for FromTrainedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FromTrainedError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for FromTrainedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for FromTrainedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl From<FromTrainedError> for EnsembleError {
    fn from(e: FromTrainedError) -> Self {
        e.error
    }
}

/// The kind of the I/O error `e` is or holds, as loren's errors keep it.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    match (
        e.downcast_ref::<std::io::Error>(),
        e.downcast_ref::<NnError>(),
    ) {
        (Some(io), _) => Some(io.kind()),
        (_, Some(NnError::Io { reason, .. })) => Some(reason.kind()),
        _ => None,
    }
}

fn is_cuda_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    matches!(
        e.downcast_ref::<loren_tensor::Error>(),
        Some(loren_tensor::Error::Cuda(_))
    ) || matches!(
        e.downcast_ref::<NnError>(),
        Some(NnError::Tensor(loren_tensor::Error::Cuda(_)))
    )
}

/// What is wrong with the images given to [`Ensemble::predict`],
/// [`Ensemble::predict_pixels`] or [`Ensemble::predict_encoded`]: the caller's input, not the
/// ensemble or the machine, held by [`EnsembleError::Input`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum InputError {
    /// Not the `batch` images of the model's `[C, H, W]` the caller said it gave.
    #[error(
        "{batch} images of [{}, {}, {}] are {} values, got {len}: the images must be [B, {0}, \
         {1}, {2}] at the model's size",
        shape[0], shape[1], shape[2], *batch as u128 * shape.iter().product::<usize>() as u128
    )]
    Length {
        batch: usize,
        shape: [usize; 3],
        len: usize,
    },
    /// A batch of no images.
    #[error("a batch of 0 images: give at least one")]
    NoImages,
    /// A value that is NaN or infinite, at `[channel, row, column]` of image `image`.
    #[error(
        "image {image}: its value at channel {}, row {}, column {} is {value}; inputs must be \
         finite",
        at[0], at[1], at[2]
    )]
    NotFinite {
        image: usize,
        at: [usize; 3],
        value: f32,
    },
    /// A raw pixel of [`Ensemble::predict_pixels`] well outside `[0, 1]` (past
    /// [`PIXEL_RANGE`]), at `[channel, row, column]` of image `image`: most often pixels of
    /// 0..=255 not divided by 255, or images already normalised.
    #[error(
        "image {image}: its pixel at channel {}, row {}, column {} is {value}, where raw pixels \
         are in [0, 1] (values of 0..=255 are to be divided by 255 first; images already \
         normalised go to Ensemble::predict)",
        at[0], at[1], at[2]
    )]
    PixelRange {
        image: usize,
        at: [usize; 3],
        value: f32,
    },
    /// Bytes given to [`Ensemble::predict_encoded`] as image `image` that are not a PNG or
    /// JPEG image loren reads.
    #[error("image {image}: {reason}")]
    Undecodable { image: usize, reason: String },
}

/// What [`Ensemble::predict_pixels`] takes: `[0, 1]`, and a quarter past either end, as a
/// sharpening resampling filter (bicubic, Lanczos) overshoots the range at edges.
pub const PIXEL_RANGE: std::ops::RangeInclusive<f32> = -0.25..=1.25;

impl Ensemble {
    /// Read a file written by [`export`] (`loren export`), or a training checkpoint (the file
    /// `loren train` writes, or the folder it wrote it into; with the backbone it recorded),
    /// onto `device`.
    ///
    /// Opening the device is part of the call: the first GPU a process opens compiles every
    /// kernel (seconds, then cached on disk), and [`DeviceSpec::Auto`] takes the CPU without a
    /// word where no GPU can be used; [`Ensemble::device_name`] says which it took. See
    /// [`DeviceSpec`] for this and the environment variables it reads, and for bounding the CPU
    /// threads. A device that cannot be opened is [`EnsembleError::Device`]; a file that cannot
    /// be read or holds no usable ensemble, [`EnsembleError::File`].
    pub fn load(path: impl AsRef<Path>, device: DeviceSpec) -> Result<Ensemble, EnsembleError> {
        Ensemble::open(path, None, device)
    }

    /// [`Ensemble::load`], with a training checkpoint's backbone read from `backbone` when
    /// given (an exported file holds its own, so it takes none). Opens `device` as
    /// [`Ensemble::load`] does (see [`DeviceSpec`] for what that costs a process).
    pub fn open(
        path: impl AsRef<Path>,
        backbone: Option<&Path>,
        device: DeviceSpec,
    ) -> Result<Ensemble, EnsembleError> {
        let device = device.open().map_err(EnsembleError::Device)?;
        Ensemble::open_on(path, backbone, &device)
    }

    /// [`Ensemble::open`] onto a device the program already has open: one whose failure to
    /// open it has told apart itself ([`DeviceSpec::open_explained`]), or whose memory it
    /// shares with its own models (the same accounting by tag).
    pub fn open_on(
        path: impl AsRef<Path>,
        backbone: Option<&Path>,
        device: &Device,
    ) -> Result<Ensemble, EnsembleError> {
        let path = &crate::run::checkpoint_in(path.as_ref());
        if path.is_dir() {
            return Err(EnsembleError::file(
                path,
                anyhow::anyhow!(
                    "a folder with no checkpoint.safetensors in it (name the run's folder, its \
                     checkpoint, or a file loren export wrote)"
                ),
            ));
        }
        let file = TensorFile::read(path).map_err(|e| EnsembleError::file(path, e))?;
        Ensemble::from_file(&file, backbone, device)
    }

    /// The ensemble a program trained itself, predicting as it is, with no file between: `model`
    /// as its `Trainer` left it, and `data`, what it trained on, for the per-channel scaling and
    /// class names its inputs have ([`Ensemble::predict_pixels`] scales them alike). After `fit`
    /// returned, it predicts what [`Ensemble::load`] of the checkpoint `fit` wrote would on the
    /// same device, bit for bit (a fit cut short by Ctrl-C or a non-finite loss leaves the model
    /// part of an epoch past its checkpoint). Its
    /// [`Ensemble::metadata`] holds the model's keys alone (`format`, `vit`, `ensemble`, `layout`,
    /// `norm_mean`, `norm_std`, `class_names`): nothing recorded the run's.
    ///
    /// Data that does not go with the model is an error that hands the model back
    /// ([`FromTrainedError::into_model`]), so a refusal loses no training. The error holds the
    /// model, device memory and all, until it is dropped or the model taken back; `?` into an
    /// [`EnsembleError`] drops it.
    pub fn from_trained(model: Vit, data: &Dataset) -> Result<Ensemble, FromTrainedError> {
        if let Err(e) = model.check_data(data) {
            return Err(FromTrainedError {
                error: EnsembleError::Mismatch(e),
                model: Box::new(model),
            });
        }
        let inputs = [
            json(&data.norm_mean),
            json(&data.norm_std),
            json(&data.class_names),
        ];
        let metadata = model_metadata(&model, inputs);
        Ok(Ensemble {
            model,
            norm_mean: data.norm_mean.clone(),
            norm_std: data.norm_std.clone(),
            class_names: data.class_names.clone(),
            batch_size: DEFAULT_BATCH,
            metadata,
        })
    }

    /// The model it predicts with: for `loren::nn::eval` on a whole `Dataset`, or
    /// [`Vit::predict`] on images already on its device.
    pub fn model(&self) -> &Vit {
        &self.model
    }

    /// The model it predicts with, to train on or to keep as a program's own.
    pub fn into_model(self) -> Vit {
        self.model
    }

    /// The ensemble `file` holds, on `device`: an export as it is, or a training checkpoint
    /// with its backbone and the metadata [`export`] would give it, checked alike.
    fn from_file(
        file: &TensorFile,
        backbone: Option<&Path>,
        device: &Device,
    ) -> Result<Ensemble, EnsembleError> {
        let model = load_network(file, backbone, device)?;
        let metadata = match is_export(file) {
            true => Ok(file.metadata().clone()),
            false => export_metadata(file, &model),
        };
        metadata
            .and_then(|m| Ensemble::assemble(model, m, file.path()))
            .map_err(|e| EnsembleError::loading(file.path(), e))
    }

    fn assemble(
        model: Vit,
        metadata: HashMap<String, String>,
        path: &Path,
    ) -> anyhow::Result<Ensemble> {
        let ensemble = Ensemble {
            norm_mean: meta_json(&metadata, "norm_mean", path)?,
            norm_std: meta_json(&metadata, "norm_std", path)?,
            class_names: meta_json(&metadata, "class_names", path)?,
            model,
            batch_size: DEFAULT_BATCH,
            metadata,
        };
        ensemble.check_metadata(path)?;
        Ok(ensemble)
    }

    fn check_metadata(&self, path: &Path) -> anyhow::Result<()> {
        let (c, classes) = (self.model.config.channels, self.classes());
        ensure!(
            self.norm_mean.len() == c
                && self.norm_std.len() == c
                && self.norm_mean.iter().all(|m| m.is_finite())
                && self.norm_std.iter().all(|s| s.is_finite() && *s > 0.0),
            "{}: norm_mean and norm_std need {c} finite values each, std positive (got {:?} and \
             {:?})",
            path.display(),
            self.norm_mean,
            self.norm_std
        );
        ensure!(
            self.class_names.len() == classes,
            "{}: {} class names for {classes} classes",
            path.display(),
            self.class_names.len()
        );
        Ok(())
    }

    /// Predict in chunks of `n` images (default [`DEFAULT_BATCH`]): smaller needs less memory.
    /// Chunked as `loren eval --eval-batch-size n` chunks, the probabilities are bit-for-bit
    /// eval's; other chunkings may differ in the last bits (about 1e-7), because the CPU
    /// matrix kernels block small batches differently.
    pub fn set_batch_size(&mut self, n: usize) {
        self.batch_size = n.max(1);
    }

    /// Where it runs, as `cpu` or `cuda:N`.
    pub fn device_name(&self) -> String {
        self.model.device().to_string()
    }

    /// The device's live and peak bytes by tag (frozen weights, trainable parameters,
    /// activations, workspace, ...): the ensemble's weights once loaded, and the most predicting
    /// has used since it was loaded, or since [`Ensemble::reset_memory_peaks`].
    pub fn memory(&self) -> loren_tensor::MemoryReport {
        self.model.device().memory().report()
    }

    /// Start the peaks of [`Ensemble::memory`] again from what is live now.
    pub fn reset_memory_peaks(&self) {
        self.model.device().memory().reset_peaks();
    }

    /// The network's shape: image size, channels, patch, width, depth, heads, MLP width.
    pub fn vit(&self) -> &VitConfig {
        &self.model.config
    }

    /// The ensemble: its method, members, classes and adapters.
    pub fn config(&self) -> &EnsembleConfig {
        &self.model.ensemble
    }

    /// M, the members each prediction has ([`Prediction::members`]).
    pub fn members(&self) -> usize {
        self.model.members()
    }

    /// C, the classes each prediction scores ([`Prediction::classes`]).
    pub fn classes(&self) -> usize {
        self.model.ensemble.classes
    }

    /// The classes' names, one per class, in the order of a prediction's probabilities
    /// (index `c` names class `c`).
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// The file's metadata (of an ensemble [`Ensemble::from_trained`] made, the model's keys
    /// alone): the keys the module docs list, e.g. `data` (the `--data` it was
    /// trained on; empty when its trainer recorded none, as `Trainer::fit` on a program's own
    /// arrays does) and `holdout_classes`.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// `[channels, height, width]` of one input image.
    pub fn image_shape(&self) -> [usize; 3] {
        let v = &self.model.config;
        [v.channels, v.image_size, v.image_size]
    }

    /// Per-channel mean and std the inputs of [`Ensemble::predict`] are normalised by.
    pub fn normalization(&self) -> (&[f32], &[f32]) {
        (&self.norm_mean, &self.norm_std)
    }

    /// `batch` images of raw pixels in `[0, 1]`, `[B, C, H, W]` at the model's size,
    /// normalised as the model expects: `(x - mean[c]) / std[c]`, exactly as training and
    /// `loren eval` normalise.
    pub fn normalize(&self, pixels: &[f32], batch: usize) -> Result<Vec<f32>, InputError> {
        self.check_length(pixels, batch)?;
        let [_, h, w] = self.image_shape();
        let mut out = pixels.to_vec();
        normalize_planes(&mut out, h * w, &self.norm_mean, &self.norm_std);
        Ok(out)
    }

    /// Image files' bytes (PNG or JPEG, as a server receives them), each decoded and brought to
    /// the model's size as `loren predict` and an image folder bring a file (the centre crop of
    /// the model's aspect ratio, resized, each pixel rounded to 8 bits; colour made grey or grey
    /// repeated as the model's channels ask), then [`Ensemble::predict_pixels`]. Bytes that do not decode are an
    /// [`InputError::Undecodable`] naming the image.
    pub fn predict_encoded<B: AsRef<[u8]>>(
        &self,
        images: &[B],
    ) -> Result<Prediction, EnsembleError> {
        let shape = self.image_shape();
        let mut pixels = Vec::with_capacity(images.len() * shape.iter().product::<usize>());
        for (image, bytes) in images.iter().enumerate() {
            let undecodable = |e: DataError| InputError::Undecodable {
                image,
                reason: e.to_string(),
            };
            let decoded = decode(bytes.as_ref()).map_err(undecodable)?;
            let resized = to_shape(&decoded, shape).map_err(undecodable)?;
            // Rounded to 8 bits as an image folder keeps a resized image (read_images).
            let steps = Pixels::Steps {
                bytes: Pixels::quantized(&resized, 255),
                levels: 255,
            };
            pixels.extend_from_slice(&steps.to_f32());
        }
        self.predict_pixels(&pixels, images.len())
    }

    /// Whether `images` holds `batch` of the model's images, and some: a length alone cannot
    /// tell images of another size, whose values may make a whole number of the model's.
    fn check_length(&self, images: &[f32], batch: usize) -> Result<(), InputError> {
        let shape = self.image_shape();
        let per_image: usize = shape.iter().product();
        if batch == 0 {
            return Err(InputError::NoImages);
        }
        if batch.checked_mul(per_image) == Some(images.len()) {
            return Ok(());
        }
        Err(InputError::Length {
            batch,
            shape,
            len: images.len(),
        })
    }

    /// The image, and `[channel, row, column]` in it, of value `i` of a batch of images.
    fn place(&self, i: usize) -> (usize, [usize; 3]) {
        let [c, h, w] = self.image_shape();
        let (image, at) = (i / (c * h * w), i % (c * h * w));
        (image, [at / (h * w), at % (h * w) / w, at % w])
    }

    /// [`Ensemble::predict`] on `batch` images of raw pixels in `[0, 1]` at the model's size. A
    /// pixel past [`PIXEL_RANGE`] is an [`InputError::PixelRange`].
    pub fn predict_pixels(
        &self,
        pixels: &[f32],
        batch: usize,
    ) -> Result<Prediction, EnsembleError> {
        self.check_length(pixels, batch)?;
        if let Some((i, &value)) = pixels
            .iter()
            .enumerate()
            .find(|(_, v)| !PIXEL_RANGE.contains(v))
        {
            let (image, at) = self.place(i);
            return Err(if value.is_finite() {
                InputError::PixelRange { image, at, value }
            } else {
                InputError::NotFinite { image, at, value }
            }
            .into());
        }
        self.predict(&self.normalize(pixels, batch)?, batch)
    }

    /// Every member's probabilities, their mean, and the entropy and mutual information of each
    /// image, for `batch` normalised images `[B, C, H, W]` (row-major; B = `batch`, any positive
    /// number, split into forward passes of [`Ensemble::set_batch_size`] images). See [`Ensemble::normalize`] for raw pixels. MC Dropout draws
    /// an image's masks from its values, so it draws the same ones in any batch, at any place
    /// (other methods draw none); the probabilities then move only in the last bits, as for
    /// every method, with a row's place in the CPU's matrix kernels.
    pub fn predict(&self, images: &[f32], batch: usize) -> Result<Prediction, EnsembleError> {
        self.check_length(images, batch)?;
        // Named here, by image and place: one NaN would otherwise show only as a NaN
        // probability of its image, failing the whole call.
        if let Some((i, &value)) = images.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let (image, at) = self.place(i);
            return Err(InputError::NotFinite { image, at, value }.into());
        }
        let [c, h, w] = self.image_shape();
        let per_image = c * h * w;
        let (m, n, k) = (self.members(), batch, self.classes());
        let mut probs = vec![0.0f32; m * n * k];
        // Saturating: a batch size past the whole input is one chunk of it all.
        let chunk = self.batch_size.saturating_mul(per_image);
        let chunks: Vec<&[f32]> = images.chunks(chunk).collect();
        std::thread::scope(|scope| -> Result<(), NnError> {
            // Each chunk is keyed and staged (copied where it goes to the device from) on a
            // background thread while the model runs on the one before.
            let stage = |i: usize| {
                let chunk = chunks[i];
                let shape = [chunk.len() / per_image, c, h, w];
                self.model.stage_for_prediction(chunk, shape)
            };
            let staged = prefetch(scope, chunks.len(), DEPTH, stage);
            for (made, start) in staged.zip((0..n).step_by(self.batch_size)) {
                let (x, keys) = made?;
                let x = Tensor::from_staged(x, MemTag::Workspace)?;
                let b = x.dims()[0];
                let p = self.model.predict(&x, &keys)?.to_vec()?;
                loren_nn::eval::check_numbers(&p, b, k, start)?;
                for member in 0..m {
                    let src = &p[member * b * k..][..b * k];
                    probs[(member * n + start) * k..][..b * k].copy_from_slice(src);
                }
            }
            Ok(())
        })?;
        let preds = Predictions::new(m, n, k, probs).map_err(NnError::from)?;
        let s = scores(&preds).map_err(NnError::from)?;
        Ok(Prediction {
            members: m,
            batch: n,
            classes: k,
            mean: preds.mean(),
            probs: preds.probs,
            entropy: s.entropy,
            mutual_information: s.mutual_information,
        })
    }
}

/// Whether `file` is an ensemble [`export`] wrote (rather than a training checkpoint).
pub fn is_export(file: &TensorFile) -> bool {
    FileKind::of(file.metadata()) == FileKind::Export
}

/// The network `file` holds, on `device`: an ensemble [`export`] wrote, or a training
/// checkpoint with its backbone (`backbone`, or the path the checkpoint recorded). What
/// [`Ensemble::open`] predicts with, and what `loren eval` scores.
pub fn load_network(
    file: &TensorFile,
    backbone: Option<&Path>,
    device: &Device,
) -> Result<Vit, EnsembleError> {
    let read = match is_export(file) {
        true => network_of_export(file, backbone, device),
        false => network_of_checkpoint(file, backbone, device),
    };
    read.map_err(|e| EnsembleError::loading(file.path(), e))
}

fn network_of_export(
    file: &TensorFile,
    backbone: Option<&Path>,
    device: &Device,
) -> anyhow::Result<Vit> {
    let path = file.path();
    if let Some(b) = backbone {
        bail!(
            "{} is an exported ensemble, which holds its own backbone, but another was given \
             ({}): give none",
            path.display(),
            b.display()
        );
    }
    let vit: VitConfig = file.meta_json("vit")?;
    let ens: EnsembleConfig = file.meta_json("ensemble")?;
    loren_nn::train::check_described_model(&vit, &ens, file, file.values())?;
    let mut model = Vit::new(&vit, &ens, device, 0)?;
    model.set_prediction_seed(loren_nn::train::recorded_seed(file)?);
    match file.meta("layout")? {
        "shared" => model.load_shared_weights(file)?,
        "stacked" => model.load_tensors(file, |name, _| Vit::is_backbone(name))?,
        other => bail!("{}: unknown layout '{other}'", path.display()),
    }
    model.load_tensors(file, |name, _| !Vit::is_backbone(name))?;
    Ok(model)
}

fn network_of_checkpoint(
    file: &TensorFile,
    backbone: Option<&Path>,
    device: &Device,
) -> anyhow::Result<Vit> {
    if check_format(file).is_err() {
        bail!(
            "{}: neither an ensemble written by loren export nor a training checkpoint",
            file.path().display()
        );
    }
    let vit: VitConfig = file.meta_json("vit")?;
    let frozen = checkpoint_backbone(file, backbone, &vit)?;
    Ok(load_trained(file, frozen.as_ref(), device)?)
}

/// What [`export`] wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    /// The file written: `out`, as [`export`] was given it.
    pub path: PathBuf,
    /// The method of the ensemble exported.
    pub method: Method,
    /// Its members, M.
    pub members: usize,
    /// Its classes, C.
    pub classes: usize,
    /// How many tensors the file holds: the backbone's, adapters and heads.
    pub tensors: usize,
    /// The file's size on disk, in bytes (0 where it could not be read back after writing).
    pub bytes: u64,
}

/// Write the ensemble a training checkpoint holds as one self-contained file (see the module
/// docs). `checkpoint` is the file or the run's folder holding it, as for [`Ensemble::open`].
/// Its backbone is `backbone`, or the path the checkpoint recorded; its class names and
/// normalisation come from the data the checkpoint recorded.
pub fn export(
    checkpoint: &Path,
    backbone: Option<&Path>,
    out: &Path,
) -> Result<ExportSummary, EnsembleError> {
    let checkpoint = &crate::run::checkpoint_in(checkpoint);
    // The export must not replace what it is made from.
    if same_file(checkpoint, out) {
        return Err(EnsembleError::output(
            out,
            format!(
                "{} is the checkpoint itself: the export would replace the training checkpoint \
                 it is made from; write it elsewhere",
                out.display()
            ),
        ));
    }
    // Nor any file but an earlier export: another run's checkpoint (which its `train --resume`
    // and `eval` read), a backbone (which checkpoints name by fingerprint), a report.
    if out.exists() {
        let what = match FileKind::at(out) {
            FileKind::Export => None,
            FileKind::Checkpoint => {
                Some("a training checkpoint (loren train --resume and eval read it)")
            }
            FileKind::Backbone => Some("a backbone (training checkpoints name it by fingerprint)"),
            FileKind::Other => Some("not an ensemble loren exported"),
        };
        if let Some(what) = what {
            return Err(EnsembleError::output(
                out,
                format!(
                    "{} is {what}: the export would replace it; write it elsewhere (an earlier \
                     export is replaced)",
                    out.display()
                ),
            ));
        }
    }
    let file = crate::run::read_checkpoint(checkpoint, "--checkpoint")
        .map_err(|e| EnsembleError::file(checkpoint, e))?;
    let recorded = file.metadata().get("backbone").map(Path::new);
    if let Some(b) = backbone.or(recorded)
        && same_file(b, out)
    {
        return Err(EnsembleError::output(
            out,
            format!(
                "{} is the backbone the export is made from; write it elsewhere",
                out.display()
            ),
        ));
    }
    let ens = Ensemble::from_file(&file, backbone, &Device::cpu())?;
    let model = &ens.model;
    let mut tensors = if is_stacked(model) {
        model.tensors(|name, _| Vit::is_backbone(name))?
    } else {
        model.backbone_tensors()?
    };
    tensors.extend(model.tensors(|name, _| !Vit::is_backbone(name))?);
    checkpoint::write(out, &tensors, ens.metadata.clone())
        .map_err(|e| EnsembleError::output(out, e.to_string()))?;
    Ok(ExportSummary {
        path: out.to_path_buf(),
        method: model.ensemble.method,
        members: model.members(),
        classes: model.ensemble.classes,
        tensors: tensors.len(),
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
    })
}

/// Whether the backbone is stored per member (`[M, ...]`): the explicit ensemble's, which
/// fine-tunes one per member.
fn is_stacked(model: &Vit) -> bool {
    model.ensemble.method == Method::Explicit
}

fn export_metadata(file: &TensorFile, model: &Vit) -> anyhow::Result<HashMap<String, String>> {
    let meta = file.metadata();
    let normalize = Normalize::recorded(meta)?;
    let [mean, std, names] = match INPUT_KEYS.map(|k| meta.get(k)) {
        // What `Trainer::fit` recorded of the data it trained on, as it is: read back and
        // checked as the export's own (JSON has no infinity, so a value read and written again
        // would turn a broken one into a null).
        [Some(mean), Some(std), Some(names)] => [mean.clone(), std.clone(), names.clone()],
        _ => {
            let (mean, std, names) = inputs_of_recorded_data(file, model, normalize)?;
            [json(&mean), json(&std), json(&names)]
        }
    };
    let recorded = |key: &str| meta.get(key).cloned().unwrap_or_default();
    let mut metadata = model_metadata(model, [mean, std, names]);
    metadata.extend([
        ("data".to_string(), recorded("data")),
        (Normalize::KEY.to_string(), normalize.to_string()),
        (
            TRAIN_ON_VAL_KEY.to_string(),
            recorded_train_on_val(meta)?.to_string(),
        ),
        ("holdout_classes".to_string(), recorded("holdout_classes")),
        ("backbone".to_string(), recorded("backbone")),
    ]);
    // How it was trained, for `loren eval`'s record of what it scored, and on which images,
    // for its warning when the data has changed since.
    for key in ["train", TRAINING_IMAGES_KEY, SPLIT_IMAGES_KEY] {
        if let Some(value) = meta.get(key) {
            metadata.insert(key.to_string(), value.clone());
        }
    }
    Ok(metadata)
}

/// The keys that describe the model and its inputs, as JSON where not plain strings: an
/// export's, and all an ensemble trained in memory has.
fn model_metadata(model: &Vit, [mean, std, names]: [String; 3]) -> HashMap<String, String> {
    let layout = if is_stacked(model) {
        "stacked"
    } else {
        "shared"
    };
    HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("vit".to_string(), json(&model.config)),
        ("ensemble".to_string(), json(&model.ensemble)),
        ("layout".to_string(), layout.to_string()),
        ("norm_mean".to_string(), mean),
        ("norm_std".to_string(), std),
        ("class_names".to_string(), names),
    ])
}

/// The normalisation and class names of a checkpoint that predates their record (or was written
/// by `Trainer::save` alone), from the `data` it names, as the CLI records it.
fn inputs_of_recorded_data(
    file: &TensorFile,
    model: &Vit,
    normalize: Normalize,
) -> anyhow::Result<(Vec<f32>, Vec<f32>, Vec<String>)> {
    let meta = file.metadata();
    let Some(data) = meta.get("data") else {
        bail!(
            "{}: records neither the normalisation its inputs need nor the data it was trained \
             on (metadata {} or data): Trainer::fit records them; to a checkpoint written by \
             Trainer::save alone, add them to its metadata",
            file.path().display(),
            INPUT_KEYS.join(", ")
        );
    };
    let source: DataSource = data.parse()?;
    let holdout: Vec<u32> = meta
        .get("holdout_classes")
        .filter(|h| !h.is_empty())
        .map(|h| h.split(',').map(str::parse).collect::<Result<_, _>>())
        .transpose()
        .context("checkpoint metadata holdout_classes")?
        .unwrap_or_default();
    let classes = model.ensemble.classes;
    // The names need the dataset's meta file or folder; numbers stand in when it has moved.
    let names = source
        .class_names(&holdout)
        .ok()
        .filter(|n| n.len() == classes)
        .unwrap_or_else(|| (0..classes).map(|c| c.to_string()).collect());
    let (mean, std) = source.normalization(model.config.channels, normalize);
    Ok((mean, std, names))
}

/// A metadata value holding JSON, parsed.
fn meta_json<T: serde::de::DeserializeOwned>(
    metadata: &HashMap<String, String>,
    key: &str,
    path: &Path,
) -> anyhow::Result<T> {
    let value = metadata
        .get(key)
        .with_context(|| format!("{}: metadata '{key}' is missing", path.display()))?;
    serde_json::from_str(value)
        .with_context(|| format!("{}: metadata '{key}' is unreadable", path.display()))
}

/// A config or list as JSON, for the metadata.
fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("configs and lists always serialize")
}
