//! The models and everything around them: the ViT, LoRA and explicit ensembles, data, metrics,
//! checkpoints and the training loop.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod import;
pub mod memory_model;
pub mod metrics;
pub mod reliability;
pub mod train;
pub mod vit;

pub use config::{Activations, EnsembleConfig, LoraConfig, Method, Targets, VitConfig};
pub use error::{NnError, Result};
pub use vit::Vit;
