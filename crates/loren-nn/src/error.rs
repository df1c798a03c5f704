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
    /// The loss stopped being a number.
    #[error("training stopped: the loss is {loss} at step {step}{}", and_kept(.kept))]
    NonFinite { step: u64, loss: f32, kept: String },
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

    pub fn io(file: &Path, source: std::io::Error) -> Self {
        NnError::Io {
            file: file.display().to_string(),
            reason: source,
        }
    }
}
