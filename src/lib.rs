//! loren: LoRA-Ensembles for Vision Transformers, on the CPU and on NVIDIA GPUs.
//!
//! A LoRA-Ensemble gives a ViT calibrated uncertainty at a fraction of a deep ensemble's cost:
//! M members share one frozen pretrained backbone, each trains low-rank adapters on the
//! attention projections plus its own head, and the prediction is the mean of the members'
//! softmax probabilities.
//!
//! # Embedding loren
//!
//! A program has two ways in:
//!
//! - **Predicting: [`Ensemble`].** [`Ensemble::load`] reads a file `loren export` wrote, or a
//!   training checkpoint with the backbone it recorded ([`Ensemble::open`] names another), onto
//!   a [`DeviceSpec`](tensor::DeviceSpec); [`Ensemble::open_on`] onto a
//!   [`Device`](tensor::Device) the program opened itself; [`Ensemble::from_trained`] takes a
//!   model trained in the same process. [`Ensemble::predict`] (normalised images),
//!   [`Ensemble::predict_pixels`] (raw pixels in `[0, 1]`) and [`Ensemble::predict_encoded`]
//!   (PNG or JPEG bytes) give a [`Prediction`]: every member's probabilities, their mean, and
//!   each image's entropy and mutual information. Errors are an [`EnsembleError`], by whose
//!   fault: [`EnsembleError::Input`] holds the [`InputError`] of the images a caller gave.
//!   Example: `examples/predict.rs`; the README's "Predicting from another program".
//! - **Training: [`Trainer`](nn::train::Trainer)** in `loren::nn::train`. Make a
//!   [`Dataset`](nn::data::Dataset) from your arrays ([`Dataset::new`](nn::data::Dataset::new)),
//!   a model ([`Vit::new`](nn::vit::Vit::new), then
//!   [`Vit::load_backbone`](nn::vit::Vit::load_backbone)), describe the run in a
//!   [`TrainConfig`](nn::train::TrainConfig), and call [`Trainer::fit`](nn::train::Trainer::fit)
//!   with a [`CheckpointSpec`](nn::train::CheckpointSpec) and an
//!   [`Observer`](nn::train::Observer) that sees each step and epoch. Example:
//!   `examples/train_loop.rs`; the README's "Training from another program".
//!
//! What a process should know before it opens a device (the first GPU open compiles every
//! kernel, `DeviceSpec::Auto` falls back to the CPU silently, CPU work runs on rayon's current
//! thread pool) is on [`DeviceSpec`](tensor::DeviceSpec).
//!
//! # Modules
//!
//! For embedders: [`ensemble`] (the API above, and [`export`](ensemble::export)); [`backbone`]
//! ([`read_backbone`](backbone::read_backbone) reads a pretrained ViT under timm, torchvision
//! or Hugging Face names); [`dataset`] (the built-in data sources and the normalisation a
//! checkpoint records); and the crates underneath, re-exported: [`tensor`] (`loren_tensor`:
//! tensors, devices, memory accounting, CPU ops), [`autograd`] (`loren_autograd`: tape,
//! optimizers, schedules) and [`nn`] (`loren_nn`: the ViT, ensembles, data, metrics,
//! checkpoints, training).
//!
//! The rest is the `loren` command line's machinery, public for its binary and tests: [`run`]
//! (one method trained and evaluated end to end, and comparisons), [`bench`](mod@bench),
//! [`memprofile`], [`report`], [`rates`], [`curves`], [`plot`], [`progress`], [`interrupt`]
//! (Ctrl-C), [`outputs`] and [`files`] (what a command may write where), [`open_device`] and
//! [`note!`].

/// A line on stderr, as `eprintln!` writes it, that never stops the program: notes and progress
/// are for whoever watches, and a run whose stderr was closed (`loren 2>&1 | head -1`) goes on to
/// write its results (`eprintln!` panics on a closed pipe).
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod backbone;
pub mod bench;
pub mod curves;
pub mod dataset;
pub mod ensemble;
pub mod files;
pub mod interrupt;
pub mod memprofile;
pub mod outputs;
pub mod plot;
pub mod progress;
pub mod rates;
pub mod report;
pub mod run;

/// `spec` opened as the `loren` commands open it: where `auto` takes the CPU beside a GPU it
/// cannot use, a warning says why, once a process (a comparison opens its device for every run),
/// even under --quiet: the run is many times slower than its user expects.
pub fn open_device(spec: tensor::DeviceSpec) -> tensor::Result<tensor::Device> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let (device, why) = spec.open_explained()?;
    if let Some(why) = why {
        SAID.call_once(|| {
            note!(
                "warning: --device auto: running on the CPU, as the GPU here cannot be used: {why}"
            )
        });
    }
    Ok(device)
}

pub use ensemble::{
    Ensemble, EnsembleError, FromTrainedError, InputError, PIXEL_RANGE, Prediction,
};
pub use loren_autograd as autograd;
pub use loren_nn as nn;
pub use loren_tensor as tensor;
