use std::path::Path;

use crate::data::DataError;

/// Everything that can go wrong building, training, evaluating or saving a model.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error(transparent)]
    Tensor(#[from] loren_tensor::Error),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("{0}")]
    Config(String),
    /// A tensor file (a checkpoint, a backbone) that cannot be read or used, naming the file
    /// (and the tensor, when one); what kind of file it was meant to be is the caller's context.
    #[error("{file}: {msg}")]
    Checkpoint { file: String, msg: String },
    /// The reason is in the message, not a `source`: printed as a chain it would show twice.
    #[error("{file}: {reason}")]
    Io {
        file: String,
        reason: std::io::Error,
    },
    /// The loss stopped being a number. `step` counts from 0, as the trainer's steps do; the
    /// message counts from 1, as the progress lines do.
    #[error(
        "training stopped: the loss is {loss} at step {}, in epoch {epoch}{}",
        .step + 1,
        and_kept(.kept)
    )]
    NonFinite {
        step: u64,
        /// From 1.
        epoch: usize,
        loss: f32,
        kept: String,
    },
    /// At an epoch's end, the weights, the optimizer's state or the predictions on the
    /// validation part held a value that is not a number (`what` says which): training stopped
    /// before that epoch's checkpoint was written.
    #[error("training stopped: after epoch {epoch} (step {step}), {what}{}", and_kept(.kept))]
    Diverged {
        epoch: usize,
        /// Steps taken, from 1.
        step: u64,
        what: String,
        kept: String,
    },
    /// A member's prediction is not a number: its weights have diverged (in training at too high
    /// a learning rate, say), though each is finite, or the run would have stopped.
    #[error(
        "member {member}'s probabilities for image {image} are not numbers ({value}): its \
         weights have diverged"
    )]
    NotANumber {
        member: usize,
        /// From 0, in the order the images were given.
        image: usize,
        value: f32,
    },
    /// The checkpoint at an epoch's end could not be written (a full disk): training stopped,
    /// the file at its path left as it was.
    #[error("{error}{}", and_kept(.kept))]
    NotSaved { error: Box<NnError>, kept: String },
    /// The observer asked training to stop (Ctrl-C): it stopped after a whole step.
    #[error("training interrupted after step {step}{}", and_kept(.kept))]
    Interrupted { step: u64, kept: String },
    /// Scoring was asked to stop (Ctrl-C): it stopped after a whole batch.
    #[error("evaluation interrupted{}", and_kept(.kept))]
    EvalInterrupted { kept: String },
}

pub type Result<T, E = NnError> = std::result::Result<T, E>;

/// What a stopped run kept, after the reason, when there is something to say (a lone step,
/// as bench and memprofile take, has no checkpoint to speak of).
fn and_kept(kept: &str) -> String {
    match kept {
        "" => String::new(),
        k => format!("; {k}"),
    }
}

impl NnError {
    pub fn checkpoint(file: &Path, msg: impl Into<String>) -> Self {
        NnError::Checkpoint {
            file: file.display().to_string(),
            msg: msg.into(),
        }
    }

    /// [`NnError::Diverged`] saying what the stopped run `kept`; any other error as it is.
    pub(crate) fn keeping(self, kept: String) -> Self {
        match self {
            NnError::Diverged {
                epoch, step, what, ..
            } => NnError::Diverged {
                epoch,
                step,
                what,
                kept,
            },
            e => e,
        }
    }

    pub fn io(file: &Path, source: std::io::Error) -> Self {
        NnError::Io {
            file: file.display().to_string(),
            reason: source,
        }
    }
}
