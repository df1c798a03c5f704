//! The differentiable ops: each runs its forward from `loren_tensor::ops` and records a backward
//! that keeps only what that backward reads.

mod activation;
mod attention;
mod elementwise;
mod embed;
mod linear;
mod loss;
mod norm;
mod recompute;

pub use activation::bias_gelu;
pub use attention::attention;
pub use elementwise::add;
pub use embed::{class_token, embed_tokens};
pub use linear::{linear, logits, lora_linear};
pub use loss::softmax_cross_entropy;
pub use norm::layernorm;
pub use recompute::{Recomputed, recompute};
