//! The differentiable ops: each runs its forward from `loren_tensor::ops` and records a backward
//! that keeps only what that backward reads.

mod elementwise;
mod linear;

pub use elementwise::add;
pub use linear::{linear, lora_linear};
