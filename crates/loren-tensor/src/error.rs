use crate::shape::Shape;

/// Errors from tensor construction and ops. Each names the op it came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch between {lhs} and {rhs}")]
    ShapeMismatch {
        op: &'static str,
        lhs: Shape,
        rhs: Shape,
    },
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error(
        "{op}: tensors are on different devices ({lhs} and {rhs}){}",
        if lhs == rhs { TWO_OPENED } else { "" }
    )]
    DeviceMismatch {
        op: &'static str,
        lhs: String,
        rhs: String,
    },
    #[error("{op} is not available on {device}")]
    Unsupported { op: &'static str, device: String },
    #[error("device: {0}")]
    Device(String),
    /// A CUDA failure, or CUDA missing: the kernels crate's one-line reason.
    #[error(transparent)]
    Cuda(#[from] loren_kernels::KernelError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            msg: msg.into(),
        }
    }

    pub fn shape(op: &'static str, lhs: &Shape, rhs: &Shape) -> Self {
        Error::ShapeMismatch {
            op,
            lhs: lhs.clone(),
            rhs: rhs.clone(),
        }
    }
}

/// Why two devices of one name differ: each `Device::cpu()` or `DeviceSpec::open()` is a device
/// of its own, with its own memory accounting.
const TWO_OPENED: &str = ": two devices opened apart, each keeping its own memory accounting; \
                          make an op's tensors on one of them (a model's `device()`)";
