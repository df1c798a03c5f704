//! The models and everything around them: the ViT, LoRA and explicit ensembles, data, metrics,
//! checkpoints and the training loop.

pub mod data;
pub mod metrics;
pub mod reliability;
