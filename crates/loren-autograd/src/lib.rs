//! Reverse-mode autodiff over coarse ops.
//!
//! A [`Tape`] records each op's backward as the forward runs. Ops are the fused units the kernels
//! implement (lora_linear, attention, layernorm, ...), never scalar arithmetic. Each op keeps what
//! its backward needs and releases it as soon as that backward has run.
//!
//! Parameters live in [`Params`]; frozen ones get no gradient buffer. [`Tape::backward`]
//! accumulates into [`Grads`], and an [`optim`] optimizer updates the parameters in place.

pub mod gradcheck;
pub mod ops;
pub mod optim;
pub mod params;
pub mod schedule;
pub mod tape;
pub mod timing;

pub use loren_tensor::{Error, Result};
pub use params::{Grads, ParamId, Params, TrainableMut};
pub use tape::{Backward, GradSink, NodeId, Tape, Var, unshare};
pub use timing::{Phase, Span, StepTimer, Total};
