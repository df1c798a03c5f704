//! loren: LoRA-Ensembles for Vision Transformers, on the CPU and on NVIDIA GPUs.
//!
//! A LoRA-Ensemble gives a ViT calibrated uncertainty at a fraction of a deep ensemble's cost:
//! M members share one frozen pretrained backbone, each trains low-rank adapters on the
//! attention projections plus its own head, and the prediction is the mean of the members'
//! softmax probabilities.
//!
//! The crates underneath: `loren_tensor` (tensors, devices, memory accounting, CPU ops),
//! `loren_autograd` (tape, optimizers, schedules), `loren_nn` (the ViT, ensembles, data,
//! metrics, checkpoints, training). This crate holds what the `loren` binary runs: training and
//! evaluating one method, comparing methods, pretraining the bundled backbone.

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
