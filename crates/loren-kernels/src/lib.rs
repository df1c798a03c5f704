//! loren's CUDA kernels: the sources in `kernels/*.cu`, built at run time with NVRTC for the
//! device's exact arch, cached in the process and on disk, and launched through typed launchers
//! on [`Gpu`].
//!
//! Nothing here needs CUDA at build time. cudarc loads `libcuda` and `libnvrtc` when they are
//! first used, and this crate checks they exist first, so a machine without CUDA gets a
//! [`KernelError`], never a panic.
//!
//! - [`cuda_available`]: whether a driver, a device and NVRTC are there, with a one-line reason.
//! - [`compile`] / [`compile_uncached`] / [`ptxas_resources`]: kernel source to PTX (no GPU).
//! - [`Gpu`]: a device, its one stream and every kernel module; the launchers are its methods,
//!   one module per kernel file under [`launch`].
//!
//! # Finding CUDA (see [`probe`])
//! - NVRTC: `LOREN_NVRTC_LIB` (path of a `libnvrtc.so*`), else the loader's search path
//!   (`LD_LIBRARY_PATH`, ld.so cache), else the pip wheels `scripts/cuda-wheels.sh` installs in
//!   `<repo>/.cache/cuda-wheels` (or `$LOREN_CUDA_WHEELS`; never the working directory's). A library
//!   found by path is preloaded with its `libnvrtc-builtins`, so no `LD_LIBRARY_PATH` is needed.
//! - Headers (`cuda_bf16.h`): `LOREN_CUDA_INCLUDE`, else the `include` folder beside that NVRTC,
//!   `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`, `/opt/cuda/include`,
//!   `/usr/include`, the wheels' `nvidia/cu13/include`.
//! - PTX cache: `$LOREN_CACHE_DIR`, else `$XDG_CACHE_HOME/loren/ptx`, else `~/.cache/loren/ptx`.
//!
//! # Kernels
//! | file | kernels |
//! |---|---|
//! | lora.cu | U/V projections, fused forward and dX GEMMs (per member and shared input), dA, dB |
//! | attention.cu | fused forward, backward dQ (+ DELTA), backward dK/dV; dh 16, 32, 64, 128 |
//! | norm.cu | LayerNorm forward, dx, dgamma/dbeta first stage |
//! | activation.cu | bias + GELU forward, dx, db first stage |
//! | embed.cu | patchify, token embedding forward and dpe, class token out and back |
//! | loss.cu | softmax cross-entropy rows (+ gradient), mean loss, softmax |
//! | optim.cu | multi-tensor AdamW and SGD, gradient sum of squares, clip coefficient, scaling |
//! | elementwise.cu | adds, accumulation, scaling, group and row sums, sums of squares, casts, fills |

// Shapes are written [G, B, T, D] throughout the docs, which rustdoc would take for links.
#![allow(rustdoc::broken_intra_doc_links)]

mod bfloat16;
mod compile;
mod error;
mod gpu;
pub mod launch;
pub mod probe;
pub mod provenance;
mod sources;
mod staging;

pub use compile::{
    Arch, ParamKind, Ptx, Resources, arch_for_device, cache_dir, compile, compile_uncached,
    nvrtc_version, options, ptxas_resources, supported_archs, warnings_only,
};
pub use error::{KernelError, Result};
pub use gpu::{Gpu, GpuMark};
pub use launch::activation::{BiasGeluDims, bias_gelu_db_workspace_len};
pub use launch::attention::{AttentionDims, AttentionDrop};
pub use launch::blas::{Gemm, GemmOut};
pub use launch::elementwise::{SumRowsDims, sum_rows_workspace_len, sum_squares_partials_len};
pub use launch::embed::{EmbedDims, Images};
pub use launch::lora::{
    AdapterGrads, GemmPath, GradsSplit, LoraDims, lora_grads_split, lora_grads_workspace_len,
};
pub use launch::norm::{NormDims, layernorm_params_workspace_len};
pub use launch::optim::{AdamW, OptimTable, Sgd, SlotSpec, optim_table_bytes};
pub use probe::{
    NvrtcInfo, cuda_available, cuda_include_dir, gpu_present, gpu_required, nvrtc, skip_without_gpu,
};
pub use sources::{COMMON_HEADER, Kernel, KernelSource, SOURCES, source};
pub use staging::{STAGING_MAX_BYTES, STAGING_MIN_BYTES, Staged};

pub use bfloat16::bf16;
/// Re-exported so callers name the same types the launchers take.
pub use cudarc::driver::sys::CUevent_flags;
pub use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DriverError, PinnedHostSlice,
};
