//! The crate's one error type.

use cudarc::driver::DriverError;

pub type Result<T, E = KernelError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No usable CUDA: no driver library, no device, or no NVRTC. The reason is one line.
    #[error("CUDA is not available: {0}")]
    Unavailable(String),

    /// `cuda_bf16.h` was in none of the places searched.
    #[error(
        "CUDA headers not found: no cuda_bf16.h in {searched}. Run scripts/cuda-wheels.sh, or \
         set LOREN_CUDA_INCLUDE (or CUDA_HOME) to a CUDA include folder"
    )]
    HeadersMissing { searched: String },

    /// NVRTC rejected a kernel source. `log` is NVRTC's full compile log.
    #[error("NVRTC could not compile {file} for {arch} ({status}):\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        status: String,
        log: String,
    },

    /// A launcher was given dimensions or buffers that do not fit the kernel.
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },

    /// A CUDA driver call failed.
    /// The driver's reason is in the message, not a `source`: printed as a chain it would show
    /// twice.
    #[error("CUDA driver error during {what}: {reason}")]
    Driver { what: String, reason: DriverError },

    /// A cuBLAS call failed.
    #[error("cuBLAS error during {what}: {msg}")]
    Blas { what: &'static str, msg: String },

    /// A module is missing a kernel a launcher needs (a renamed or deleted entry point).
    #[error("kernel {name} is not an entry point of {file}")]
    MissingEntry {
        file: &'static str,
        name: &'static str,
    },
}

impl KernelError {
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        KernelError::Invalid {
            op,
            msg: msg.into(),
        }
    }

    pub(crate) fn driver(what: impl Into<String>) -> impl FnOnce(DriverError) -> Self {
        let what = what.into();
        move |reason| KernelError::Driver { what, reason }
    }
}
