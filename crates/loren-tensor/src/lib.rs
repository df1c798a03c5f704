//! Tensors for loren: shapes, devices, memory accounting by tag, and the ops.
//!
//! Every op lives in [`ops`], one module per family. Each op checks its shapes, allocates its
//! output with the right [`MemTag`], and runs the CPU code written beside it. That CPU code is the
//! reference each CUDA kernel is checked against.
//!
//! Layout conventions (see DESIGN.md): row-major, contiguous. Dimension 0 of every activation and
//! of every weight is its *group* axis: 1 when the tensor is shared by all ensemble members, M when
//! each member owns a slice. Ops broadcast a group of 1 against a group of M.

pub mod device;
pub mod dtype;
pub mod error;
pub mod memory;
pub mod ops;
pub mod readback;
pub mod rng;
pub mod shape;
pub mod tensor;

pub use device::{Device, DeviceKind, DeviceSpec, Mark};
pub use dtype::DType;
pub use error::{Error, Result};
pub use memory::{MemTag, MemoryReport, MemoryTracker};
pub use readback::ScalarReadback;
pub use rng::Rng;
pub use shape::Shape;
pub use tensor::{Staged, Tensor};
