//! The analytic model of one training step (and one inference pass): bytes per memory tag and
//! counted FLOPs, from the configs alone, without allocating a tensor.
//!
//! # How it works
//! The parameters, their gradients and the optimizer state are closed forms (see
//! [`ParamCounts`]). Activations and workspace depend on *when* each buffer is freed, so the model
//! replays the step on symbolic tensors: the same forward as [`crate::vit::Vit::forward`], the same
//! tape rules as `loren_autograd::ops` (what each op keeps for its backward, which inputs need a
//! gradient), the same backward order and the same temporaries as the CPU ops in
//! `loren_tensor::ops`. Each symbolic tensor books its bytes under its tag when made and gives
//! them back when its last holder drops it (an `Rc`, as the tape holds an `Arc`), so the peaks
//! per tag and of the total are those the device's accounting records. On the CPU that
//! accounting is deterministic and the model is exact; a change to the forward, the tape or an
//! op's temporaries must be mirrored here (the tests compare both at several sizes).
//!
//! What the tape keeps when the forward ends (per member, R = B·T rows, width D, MLP width Dm,
//! H heads, rank r, C classes, L blocks, P patches of F features):
//! - LoRA-Ensemble, per block after the first: LayerNorm 1 input (R·D) and statistics (2R);
//!   the normalised input shared by the q, k, v adapters (R·D) and their U = x·Aᵀ (3·R·r);
//!   q, k, v (3·R·D) and the log-sum-exp (H·R); the attention output, kept by attention (for
//!   Δ = rowsum(dO∘O)) and by the o adapter (R·D), and its U (R·r); LayerNorm 2 input and
//!   statistics (R·D + 2R); the pre-activation of bias+GELU (R·Dm). The frozen fc1 and fc2 keep
//!   no input. Total R·(7D + Dm + 4r + H + 4) elements. In the first block LayerNorm 1 is not
//!   recorded and its output is shared by the members, kept once (R·D in all), so that block
//!   keeps R·(5D + Dm + 4r + H + 2) per member. The end: the class tokens before and after the
//!   final LayerNorm, its statistics and the logits, B·(2D + 2 + C). Altogether
//!   M·R·((L−1)·(7D + Dm + 4r + H + 4) + 5D + Dm + 4r + H + 2) + R·D + M·B·(2D + 2 + C).
//! - Explicit ensemble: per block R·(8D + 2Dm + H + 4) (no U; the inputs of fc1, R·D, and fc2,
//!   R·Dm, which its trainable weights need); the patches (once, B·P·F) and the patch
//!   embeddings (B·P·D per member) for the trainable patch embedding; the same end. Altogether
//!   M·R·L·(8D + 2Dm + H + 4) + B·P·F + M·B·(P·D + 2D + 2 + C).
//! - With [`Activations::Recompute`] each block keeps only its input (R·D per member; the first
//!   LoRA block's input is shared, R·D in all), and the backward runs one block's forward again
//!   at a time, so the peak holds the blocks' inputs plus one block's activations as above.
//!   Kept: LoRA-Ensemble R·D + M·R·D·(L−1) + M·B·(2D + 2 + C); explicit M·R·D·L + B·P·F +
//!   M·B·(P·D + 2D + 2 + C).
//!
//! During the backward the kept activations are freed op by op while gradient temporaries
//! (workspace) come and go; the parameter gradients an op forms stay in the tape's sink until the
//! backward ends (one trainable-sized set of workspace) and are then added into the gradient
//! buffers. The replay finds the exact high-water marks of all of this.
//!
//! # Element sizes, and the GPU's ops
//! [`Precision::CPU`] is f32 everywhere. [`Precision::GPU_BF16`] is the CUDA backend's layout:
//! weight matrices (frozen ones, and a shadow copy beside the f32 master of each trainable
//! one), activations and activation gradients in bf16; trainable parameters, frozen biases,
//! norms and embeddings, gradients, optimizer state, statistics, logits and LoRA's rank-r
//! intermediates in f32. The GPU's ops also make temporaries of their own
//! ([`Precision::gpu_ops`]), and the replay follows them there: the column-sum workspaces of
//! bias, LayerNorm, class and position gradients (two-stage sums, deterministic), attention's Δ,
//! dA and dB's partial sums where few members leave rows to split, a bf16 copy of the LoRA
//! projection's bias and of the logits' gradient, the loss's targets and per-sample losses, and
//! MC Dropout's item keys in a prediction (8 bytes an image); LayerNorm, bias+GELU and the
//! patch embedding write a shared input's gradient in its own groups with no per-member buffer,
//! a cuBLAS dX accumulates onto the gradient its input already has, and LoRA's dX sums the
//! members' dY as it loads them. The optimizer keeps a device table of its tensors, with the
//! gradient norm's scratch, the clipping factor and the count of skipped steps. The replay is exact on either device: the
//! tests hold each op's bytes by tag, forward and backward, against the device's (on the CPU,
//! and on a GPU or its emulator), and whole steps' peaks by tag against measured ones.
//!
//! # FLOPs
//! Matrix products only, 2·m·n·k each, counted as the engine executes them (see [`Flops`]):
//! elementwise work (LayerNorm, GELU, softmax, residual adds, AdamW) is not counted, which is the
//! usual convention for model FLOP utilisation.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use loren_kernels::{
    BiasGeluDims, EmbedDims, LoraDims, NormDims, SumRowsDims, bias_gelu_db_workspace_len,
    layernorm_params_workspace_len, lora_grads_workspace_len, sum_rows_workspace_len,
};
use loren_tensor::MemTag;
use loren_tensor::ops::optim::fused_table_bytes;
use serde::Serialize;

use crate::config::{Activations, EnsembleConfig, Method, Proj, VitConfig};
use crate::error::{NnError, Result};

/// What a buffer holds, which sets its element size on a device (see [`Precision`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Frozen weight matrices, which the GEMMs read.
    Matrix,
    /// The low-precision copy of a trainable weight matrix that the GEMMs read, kept beside its
    /// f32 master and refreshed by every optimizer step (on a GPU; none on the CPU).
    Shadow,
    /// Every other weight (trainable ones, frozen biases, norms and embeddings), the gradient
    /// buffers and the optimizer state.
    Param,
    /// Forward activations.
    Activation,
    /// f32 on every device: row statistics (LayerNorm mean and rstd, attention's log-sum-exp),
    /// the logits, their gradient and probabilities, the loss.
    Stat,
    /// LoRA's rank-r intermediates: U = x·Aᵀ and V = s·dY·B.
    LowRank,
    /// Gradients of activations.
    ActGrad,
    /// Parameter gradients as an op forms them, before they are added into the buffers.
    ParamGrad,
    /// The input images: bf16 on a GPU, staged as the first op rounds them.
    Input,
}

/// Bytes per element of each [`Kind`] on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Precision {
    pub name: &'static str,
    pub matrix: u64,
    /// 0: trainable weight matrices have no separate copy.
    pub shadow: u64,
    pub param: u64,
    pub activation: u64,
    pub stat: u64,
    pub low_rank: u64,
    pub act_grad: u64,
    pub param_grad: u64,
    pub input: u64,
    /// Whether the step runs the GPU's ops, whose temporaries are not the CPU's (see the module
    /// documentation), and its one-launch optimizer, which keeps its tensors in a device table
    /// with the gradient norm's f64 scratch, an f32 clipping factor and a u64 count of skipped
    /// steps ([`fused_table_bytes`], optimizer state).
    pub gpu_ops: bool,
}

impl Precision {
    /// The CPU: f32 everywhere.
    pub const CPU: Precision = Precision {
        name: "f32",
        matrix: 4,
        shadow: 0,
        param: 4,
        activation: 4,
        stat: 4,
        low_rank: 4,
        act_grad: 4,
        param_grad: 4,
        input: 4,
        gpu_ops: false,
    };

    /// The GPU: bf16 weight matrices, activations and input images; f32 masters of trainable
    /// weights (with a bf16 shadow of each trainable matrix), gradients, optimizer state,
    /// statistics and logits.
    pub const GPU_BF16: Precision = Precision {
        name: "bf16 weight matrices and activations, f32 trainable state",
        matrix: 2,
        shadow: 2,
        param: 4,
        activation: 2,
        stat: 4,
        low_rank: 4,
        act_grad: 2,
        param_grad: 4,
        input: 2,
        gpu_ops: true,
    };

    pub fn bytes(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Matrix => self.matrix,
            Kind::Shadow => self.shadow,
            Kind::Param => self.param,
            Kind::Activation => self.activation,
            Kind::Stat => self.stat,
            Kind::LowRank => self.low_rank,
            Kind::ActGrad => self.act_grad,
            Kind::ParamGrad => self.param_grad,
            Kind::Input => self.input,
        }
    }
}

/// Bytes per memory tag, in [`MemTag::ALL`] order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TagBytes(pub [u64; 6]);

impl TagBytes {
    pub fn get(&self, tag: MemTag) -> u64 {
        self.0[tag_index(tag)]
    }

    pub fn sum(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl Serialize for TagBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(6))?;
        for tag in MemTag::ALL {
            map.serialize_entry(tag.name(), &self.get(tag))?;
        }
        map.end()
    }
}

fn tag_index(tag: MemTag) -> usize {
    MemTag::ALL
        .iter()
        .position(|t| *t == tag)
        .expect("every tag is in MemTag::ALL")
}

/// Predicted memory over a window that starts with only the persistent buffers live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MemoryPrediction {
    /// Live at the start: weights, gradient buffers and optimizer state.
    pub start: TagBytes,
    /// The high-water mark of each tag.
    pub peak: TagBytes,
    /// The high-water mark of all tags together (not the sum of the per-tag peaks).
    pub total_peak: u64,
    /// Activations live when the forward returns: what the tape keeps for the backward, and the
    /// logits.
    pub kept_activations: u64,
}

/// Matrix-product FLOPs (2·m·n·k per product) of a forward and a backward, as executed.
///
/// Closed form for the LoRA-Ensemble with adapters on q, k, v and o (M members, batch B, T
/// tokens, P = T − 1 patches of F features, width D, MLP width Dm, L blocks, C classes, rank r,
/// R = B·T):
/// - forward: 2·B·P·F·D (patch embedding, once for all members)
///   + 3·(2·R·D² + 4·M·R·D·r) (first block's q, k, v on the shared input: one shared product)
///   + 3·(L−1)·(2·M·R·D² + 4·M·R·D·r) (other q, k, v) + L·(2·M·R·D² + 4·M·R·D·r) (o)
///   + L·4·M·B·T²·D (attention: Q·Kᵀ and P·V) + L·4·M·R·D·Dm (MLP) + 2·M·B·D·C (heads);
/// - backward: first block's q, k, v: 3·6·M·R·D·r (V = dY·B, dA, dB; no dX: the input needs no
///   gradient); other q, k, v and every o: 2·M·R·D² + 8·M·R·D·r each (dX through W and A, V, dA,
///   dB); attention 10·M·B·T²·D per block (P recomputed, dP, dQ, dK, dV); MLP 4·M·R·D·Dm per
///   block (dX only: the frozen dW is skipped); heads 4·M·B·D·C. The patch embedding has none.
///
/// The explicit ensemble runs every product per member: forward 2·M·(B·P·F·D + L·(4·R·D² +
/// 2·R·D·Dm + 2·B·T²·D) + B·D·C); backward twice each linear layer's forward (dX and dW; the
/// patch embedding dW only) plus 10·M·B·T²·D per block for attention.
///
/// With [`Activations::Recompute`] the backward also runs each block's forward again: those
/// products are counted apart, in `recomputed`, so `total` stays the model's FLOPs (what model
/// FLOP utilisation divides by) and `executed` is what the device ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Flops {
    pub forward: f64,
    pub backward: f64,
    pub recomputed: f64,
}

impl Flops {
    pub fn total(&self) -> f64 {
        self.forward + self.backward
    }

    pub fn executed(&self) -> f64 {
        self.total() + self.recomputed
    }
}

/// Parameter counts, from the configs (the same shapes as [`crate::vit::Vit::new`] builds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// One copy of the backbone: everything but adapters and heads.
    pub backbone: usize,
    /// One member's adapters: 2·r·D per adapted projection and block.
    pub adapters_per_member: usize,
    /// One member's head: C·D + C.
    pub head_per_member: usize,
    /// Frozen parameters in the model.
    pub frozen: usize,
    /// Trainable parameters in the model.
    pub trainable: usize,
    /// What one more member adds to the trainable parameters.
    pub trainable_per_member: usize,
}

/// [`ParamCounts`] as floating-point numbers, for any sizes at all: never overflowing, exact up
/// to 2^53, so a configuration too large to count in integers can be refused from them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamEstimate {
    pub backbone: f64,
    pub adapters_per_member: f64,
    pub head_per_member: f64,
    pub frozen: f64,
    pub trainable: f64,
    pub trainable_per_member: f64,
}

impl ParamEstimate {
    pub fn total(&self) -> f64 {
        self.frozen + self.trainable
    }
}

impl ParamCounts {
    /// The counts of a configuration that passed [`EnsembleConfig::validate`] (at most
    /// [`crate::config::MAX_PARAMS`] in all, so exact).
    pub fn new(vit: &VitConfig, ens: &EnsembleConfig) -> ParamCounts {
        let e = ParamCounts::estimate(vit, ens);
        ParamCounts {
            backbone: e.backbone as usize,
            adapters_per_member: e.adapters_per_member as usize,
            head_per_member: e.head_per_member as usize,
            frozen: e.frozen as usize,
            trainable: e.trainable as usize,
            trainable_per_member: e.trainable_per_member as usize,
        }
    }

    pub fn estimate(vit: &VitConfig, ens: &EnsembleConfig) -> ParamEstimate {
        let f = |n: usize| n as f64;
        let (d, dm, l) = (f(vit.dim), f(vit.mlp_dim), f(vit.depth));
        let t = f(vit.image_size / vit.patch.max(1)).powi(2) + 1.0;
        let block = 2.0 * d + 4.0 * (d * d + d) + 2.0 * d + (dm * d + dm) + (d * dm + d);
        let patch_features = f(vit.channels) * f(vit.patch).powi(2);
        let backbone = d * patch_features + d + d + t * d + l * block + 2.0 * d;
        let targets = Proj::ALL
            .iter()
            .filter(|p| ens.lora.targets.contains(**p))
            .count();
        let adapters = if ens.method.uses_lora() {
            l * f(targets) * 2.0 * f(ens.lora.rank) * d
        } else {
            0.0
        };
        let head = f(ens.classes) * d + f(ens.classes);
        let m = f(ens.members);
        let (frozen, trainable, per_member) = match ens.method {
            Method::Lora | Method::SingleLora => (backbone, m * (adapters + head), adapters + head),
            Method::Explicit => (0.0, m * (backbone + head), backbone + head),
            Method::Single => (0.0, backbone + head, backbone + head),
            Method::McDropout => (0.0, backbone + m * head, head),
        };
        ParamEstimate {
            backbone,
            adapters_per_member: adapters,
            head_per_member: head,
            frozen,
            trainable,
            trainable_per_member: per_member,
        }
    }
}

/// Everything the model predicts for one configuration.
#[derive(Clone, Debug, Serialize)]
pub struct StepModel {
    pub config: String,
    pub method: Method,
    pub members: usize,
    pub batch: usize,
    pub precision: Precision,
    pub params: ParamCounts,
    /// One training step (forward, loss, backward, clipping, optimizer update), from a window
    /// that starts after the gradient buffers and optimizer state exist.
    pub train: MemoryPrediction,
    /// One inference pass ([`crate::vit::Vit::predict`] on an input batch), with only the
    /// weights live at the start.
    pub inference: MemoryPrediction,
    pub train_flops: Flops,
    pub inference_flops: f64,
}

/// The most activation values [`predict`] counts in a step: 4 PiB of f32, beyond any device,
/// and far enough below 2^64 that the byte counts of its tensors and their sums cannot overflow.
pub const MAX_STEP_VALUES: f64 = (1u64 << 50) as f64;

/// Roughly how many activation values a training step holds (a bound for refusing sizes, not
/// the prediction): the images, and every member's patches and rows through every block, with
/// the attention's scores.
fn step_values(vit: &VitConfig, ens: &EnsembleConfig, batch: usize) -> f64 {
    let f = |n: usize| n as f64;
    let t = f(vit.image_size / vit.patch).powi(2) + 1.0;
    let per_token = 12.0 * f(vit.dim) + 2.0 * f(vit.mlp_dim) + f(vit.heads) * t;
    // The images, and each member's patches of them (the explicit ensemble embeds its own).
    let pixels = f(vit.channels) * f(vit.image_size).powi(2);
    f(batch) * (f(ens.members) * (t * f(vit.depth) * per_token + pixels) + pixels)
}

/// Predict a training step and an inference pass of `ens` on `vit` with batch `batch`.
/// `moments` is the optimizer's state tensors per parameter: 2 for AdamW, 1 for SGD.
pub fn predict(
    vit: &VitConfig,
    ens: &EnsembleConfig,
    batch: usize,
    moments: u64,
    precision: Precision,
    activations: Activations,
) -> Result<StepModel> {
    ens.validate(vit)?;
    if batch == 0 {
        return Err(NnError::Config("the batch size must be at least 1".into()));
    }
    let values = step_values(vit, ens, batch);
    if values > MAX_STEP_VALUES {
        return Err(NnError::Config(format!(
            "{} (M = {}) on {} at batch {batch} would hold about {values:.2e} \
             activation values in a training step, more than loren counts (at most \
             {MAX_STEP_VALUES:.2e}): a smaller batch size or fewer members",
            ens.method, ens.members, vit.name
        )));
    }
    let params = ParamCounts::new(vit, ens);
    let (train, train_flops) = replay(vit, ens, batch, moments, precision, Some(activations));
    let (inference, inference_flops) = replay(vit, ens, batch, moments, precision, None);
    Ok(StepModel {
        config: vit.name.clone(),
        method: ens.method,
        members: ens.members,
        batch,
        precision,
        params,
        train,
        inference,
        train_flops,
        inference_flops: inference_flops.forward,
    })
}

// ---------------------------------------------------------------------------------------------
// The replay: symbolic tensors that book their bytes while they live.

#[derive(Clone, Default)]
struct Ledger {
    live: [u64; 6],
    peak: [u64; 6],
    total_live: u64,
    total_peak: u64,
}

impl Ledger {
    fn alloc(&mut self, tag: MemTag, bytes: u64) {
        let i = tag_index(tag);
        self.live[i] += bytes;
        self.peak[i] = self.peak[i].max(self.live[i]);
        self.total_live += bytes;
        self.total_peak = self.total_peak.max(self.total_live);
    }

    fn free(&mut self, tag: MemTag, bytes: u64) {
        let i = tag_index(tag);
        self.live[i] -= bytes;
        self.total_live -= bytes;
    }

    fn reset_peaks(&mut self) {
        self.peak = self.live;
        self.total_peak = self.total_live;
    }
}

struct Core {
    ledger: RefCell<Ledger>,
    precision: Precision,
    flops: Cell<f64>,
    /// The products of forwards run again in the backward.
    recomputed: Cell<f64>,
}

impl Core {
    fn tensor(self: &Rc<Self>, dims: Vec<usize>, tag: MemTag, kind: Kind) -> Buf {
        let bytes = dims.iter().product::<usize>() as u64 * self.precision.bytes(kind);
        self.ledger.borrow_mut().alloc(tag, bytes);
        Buf {
            core: Rc::clone(self),
            tag: Cell::new(tag),
            kind,
            bytes,
            dims,
        }
    }

    /// Whether the replay follows the GPU's ops ([`Precision::gpu_ops`]).
    fn gpu(&self) -> bool {
        self.precision.gpu_ops
    }

    /// A GPU op's f32 scratch of `elems` elements (a two-stage column sum's partial sums),
    /// workspace until dropped.
    fn scratch(self: &Rc<Self>, elems: usize) -> Buf {
        self.tensor(vec![elems], MemTag::Workspace, Kind::Stat)
    }

    /// `bytes` of device memory that hold no tensor (a batch's targets, MC Dropout's item
    /// keys), booked under `tag` until dropped.
    fn raw(self: &Rc<Self>, tag: MemTag, bytes: u64) -> Buf {
        self.ledger.borrow_mut().alloc(tag, bytes);
        Buf {
            core: Rc::clone(self),
            tag: Cell::new(tag),
            kind: Kind::Stat,
            bytes,
            dims: Vec::new(),
        }
    }

    /// Count a product of `m×k` by `k×n`, `times` over.
    fn gemm(&self, times: usize, m: usize, n: usize, k: usize) {
        self.flops
            .set(self.flops.get() + 2.0 * times as f64 * m as f64 * n as f64 * k as f64);
    }

    fn add_flops(&self, f: f64) {
        self.flops.set(self.flops.get() + f);
    }
}

/// A symbolic tensor: its shape, and its bytes booked under its tag until it is dropped.
struct Buf {
    core: Rc<Core>,
    tag: Cell<MemTag>,
    kind: Kind,
    bytes: u64,
    dims: Vec<usize>,
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.core
            .ledger
            .borrow_mut()
            .free(self.tag.get(), self.bytes);
    }
}

impl Buf {
    fn groups(&self) -> usize {
        groups(&self.dims)
    }

    fn set_tag(&self, tag: MemTag) {
        let mut l = self.core.ledger.borrow_mut();
        l.free(self.tag.get(), self.bytes);
        l.alloc(tag, self.bytes);
        self.tag.set(tag);
    }
}

fn groups(d: &[usize]) -> usize {
    d.first().copied().unwrap_or(1)
}

fn rows_per_group(d: &[usize]) -> usize {
    match d.len() {
        0 | 1 => 1,
        n => d[1..n - 1].iter().product(),
    }
}

fn with_groups(d: &[usize], g: usize) -> Vec<usize> {
    let mut v = d.to_vec();
    if let Some(f) = v.first_mut() {
        *f = g;
    }
    v
}

fn with_last(d: &[usize], n: usize) -> Vec<usize> {
    let mut v = d.to_vec();
    if let Some(l) = v.last_mut() {
        *l = n;
    }
    v
}

fn broadcast(gs: &[usize]) -> usize {
    gs.iter().copied().max().unwrap_or(1)
}

/// A value in the replayed forward, as `loren_autograd::Var`.
#[derive(Clone)]
struct Var {
    val: Rc<Buf>,
    node: Option<usize>,
}

impl Var {
    fn constant(b: Buf) -> Var {
        Var {
            val: Rc::new(b),
            node: None,
        }
    }

    fn dims(&self) -> &[usize] {
        &self.val.dims
    }
}

/// A weight: its buffer lives as long as the replay.
struct P {
    val: Rc<Buf>,
    trainable: bool,
}

/// What an op keeps for its backward, as the ops in `loren_autograd::ops` keep it.
enum Rec {
    Linear {
        x: Option<Rc<Buf>>,
        x_dims: Vec<usize>,
        w_dims: Vec<usize>,
        x_node: Option<usize>,
        w_node: Option<usize>,
        b_node: Option<usize>,
        has_bias: bool,
        /// The residual added in the product: its node and groups.
        residual: Option<(Option<usize>, usize)>,
    },
    Lora {
        x: Rc<Buf>,
        u: Buf,
        a_dims: Vec<usize>,
        b_dims: Vec<usize>,
        nodes: [Option<usize>; 3],
        /// The residual added in the store: its node and groups.
        residual: Option<(Option<usize>, usize)>,
    },
    Attention {
        q: Rc<Buf>,
        k: Rc<Buf>,
        v: Rc<Buf>,
        o: Rc<Buf>,
        lse: Buf,
        nodes: [Option<usize>; 3],
    },
    LayerNorm {
        x: Rc<Buf>,
        gamma_dims: Vec<usize>,
        mean: Buf,
        rstd: Buf,
        nodes: [Option<usize>; 3],
    },
    BiasGelu {
        x: Rc<Buf>,
        b_dims: Vec<usize>,
        nodes: [Option<usize>; 2],
    },
    Embed {
        pe: Rc<Buf>,
        cls_dims: Vec<usize>,
        pos_dims: Vec<usize>,
        nodes: [Option<usize>; 3],
    },
    ClassToken {
        tokens: usize,
        node: Option<usize>,
    },
    Loss {
        dlogits: Buf,
        node: Option<usize>,
    },
    /// As `ops::recompute` over a block: its input, and the nodes of its trainable parameters
    /// on the caller's tape.
    Recompute {
        x: Rc<Buf>,
        x_node: Option<usize>,
        params: Vec<usize>,
        block: Rc<Block>,
        heads: usize,
    },
}

struct Tape {
    recording: bool,
    nodes: Cell<usize>,
    records: RefCell<Vec<(usize, Rec)>>,
    leaves: RefCell<Vec<usize>>,
}

impl Tape {
    fn new(recording: bool) -> Tape {
        Tape {
            recording,
            nodes: Cell::new(0),
            records: RefCell::default(),
            leaves: RefCell::default(),
        }
    }

    fn new_node(&self) -> usize {
        self.nodes.set(self.nodes.get() + 1);
        self.nodes.get() - 1
    }

    fn param(&self, p: &P) -> Var {
        let node = (self.recording && p.trainable).then(|| {
            let n = self.new_node();
            self.leaves.borrow_mut().push(n);
            n
        });
        Var {
            val: Rc::clone(&p.val),
            node,
        }
    }

    /// As `Tape::record_with`: for an op whose backward keeps its own output.
    fn record_with(&self, out: Buf, needs_grad: bool, rec: impl FnOnce(&Rc<Buf>) -> Rec) -> Var {
        let val = Rc::new(out);
        let node = (self.recording && needs_grad).then(|| {
            let n = self.new_node();
            let r = rec(&val);
            self.records.borrow_mut().push((n, r));
            n
        });
        Var { val, node }
    }

    fn needs_grad(&self, inputs: &[Option<&Var>]) -> bool {
        self.recording && inputs.iter().flatten().any(|v| v.node.is_some())
    }

    /// As `Tape::record`: keep the backward when it is needed, else drop what it holds.
    fn record(&self, out: Buf, needs_grad: bool, rec: Rec) -> Var {
        let node = if self.recording && needs_grad {
            let n = self.new_node();
            self.records.borrow_mut().push((n, rec));
            Some(n)
        } else {
            drop(rec);
            None
        };
        Var {
            val: Rc::new(out),
            node,
        }
    }
}

// The forward ops: outputs, FLOPs and what each keeps, as loren_tensor::ops and
// loren_autograd::ops do it.

fn linear(
    core: &Rc<Core>,
    tape: &Tape,
    x: &Var,
    w: &Var,
    b: Option<&Var>,
    residual: Option<&Var>,
) -> Var {
    product(core, tape, x, w, b, Kind::Activation, residual)
}

/// As `ops::logits`: the head's product, f32 on every device.
fn logits(core: &Rc<Core>, tape: &Tape, x: &Var, l: &Lin) -> Var {
    let b = l.b.as_ref().map(|b| tape.param(b));
    product(
        core,
        tape,
        x,
        &tape.param(&l.w),
        b.as_ref(),
        Kind::Stat,
        None,
    )
}

fn product(
    core: &Rc<Core>,
    tape: &Tape,
    x: &Var,
    w: &Var,
    b: Option<&Var>,
    out: Kind,
    residual: Option<&Var>,
) -> Var {
    let (gw, n, k) = (w.dims()[0], w.dims()[1], w.dims()[2]);
    let g = broadcast(&[groups(x.dims()), gw]);
    let rows = rows_per_group(x.dims());
    core.gemm(g, rows, n, k);
    let y = core.tensor(
        with_last(&with_groups(x.dims(), g), n),
        MemTag::Activations,
        out,
    );
    let needs = tape.needs_grad(&[Some(x), Some(w), b, residual]);
    tape.record(
        y,
        needs,
        Rec::Linear {
            x: w.node.map(|_| Rc::clone(&x.val)),
            x_dims: x.dims().to_vec(),
            w_dims: w.dims().to_vec(),
            x_node: x.node,
            w_node: w.node,
            b_node: b.and_then(|b| b.node),
            has_bias: b.is_some(),
            residual: residual.map(|r| (r.node, groups(r.dims()))),
        },
    )
}

fn lora_linear(
    core: &Rc<Core>,
    tape: &Tape,
    x: &Var,
    (w, bias): (&Var, Option<&Var>),
    (a, b): (&Var, &Var),
    residual: Option<&Var>,
) -> Var {
    let (n, k) = (w.dims()[1], w.dims()[2]);
    let (m, r) = (a.dims()[0], a.dims()[1]);
    let gx = groups(x.dims());
    let rows = rows_per_group(x.dims());
    core.gemm(if gx == 1 { 1 } else { m }, rows, n, k);
    core.gemm(m, rows, r, k);
    core.gemm(m, rows, n, r);
    let y = core.tensor(
        with_last(&with_groups(x.dims(), m), n),
        MemTag::Activations,
        Kind::Activation,
    );
    let u = core.tensor(
        with_last(&with_groups(x.dims(), m), r),
        MemTag::Activations,
        Kind::LowRank,
    );
    if let Some(bias) = bias.filter(|_| core.gpu()) {
        // The GPU kernel reads a bf16 copy of the f32 bias.
        drop(core.tensor(bias.dims().to_vec(), MemTag::Workspace, Kind::Matrix));
    }
    let needs = tape.needs_grad(&[Some(x), Some(a), Some(b), residual]);
    tape.record(
        y,
        needs,
        Rec::Lora {
            x: Rc::clone(&x.val),
            u,
            a_dims: a.dims().to_vec(),
            b_dims: b.dims().to_vec(),
            nodes: [x.node, a.node, b.node],
            residual: residual.map(|r| (r.node, groups(r.dims()))),
        },
    )
}

fn attention(
    core: &Rc<Core>,
    tape: &Tape,
    [q, k, v]: [&Var; 3],
    heads: usize,
    drop_members: Option<usize>,
) -> Var {
    let g = broadcast(&[groups(q.dims()), groups(k.dims()), groups(v.dims())]);
    let g = drop_members.unwrap_or(g);
    let (b, t, d) = (q.dims()[1], q.dims()[2], q.dims()[3]);
    // Per (group, item, head): S = Q·Kᵀ and O = P·V, each 2·T²·dh.
    core.add_flops(4.0 * (g * b) as f64 * (t * t) as f64 * d as f64);
    let o = core.tensor(vec![g, b, t, d], MemTag::Activations, Kind::Activation);
    let lse = core.tensor(vec![g, b, heads, t], MemTag::Activations, Kind::Stat);
    let needs = tape.needs_grad(&[Some(q), Some(k), Some(v)]);
    // The backward keeps O too (Δ = rowsum(dO∘O)).
    tape.record_with(o, needs, |o| Rec::Attention {
        q: Rc::clone(&q.val),
        k: Rc::clone(&k.val),
        v: Rc::clone(&v.val),
        o: Rc::clone(o),
        lse,
        nodes: [q.node, k.node, v.node],
    })
}

fn layernorm(core: &Rc<Core>, tape: &Tape, x: &Var, gamma: &Var, beta: &Var) -> Var {
    let gx = groups(x.dims());
    let g = broadcast(&[gx, gamma.dims()[0]]);
    let rows = rows_per_group(x.dims());
    let mean = core.tensor(vec![gx, rows], MemTag::Activations, Kind::Stat);
    let rstd = core.tensor(vec![gx, rows], MemTag::Activations, Kind::Stat);
    let y = core.tensor(
        with_groups(x.dims(), g),
        MemTag::Activations,
        Kind::Activation,
    );
    let needs = tape.needs_grad(&[Some(x), Some(gamma), Some(beta)]);
    tape.record(
        y,
        needs,
        Rec::LayerNorm {
            x: Rc::clone(&x.val),
            gamma_dims: gamma.dims().to_vec(),
            mean,
            rstd,
            nodes: [x.node, gamma.node, beta.node],
        },
    )
}

fn bias_gelu(core: &Rc<Core>, tape: &Tape, x: &Var, b: &Var) -> Var {
    let g = broadcast(&[groups(x.dims()), b.dims()[0]]);
    let y = core.tensor(
        with_groups(x.dims(), g),
        MemTag::Activations,
        Kind::Activation,
    );
    let needs = tape.needs_grad(&[Some(x), Some(b)]);
    tape.record(
        y,
        needs,
        Rec::BiasGelu {
            x: Rc::clone(&x.val),
            b_dims: b.dims().to_vec(),
            nodes: [x.node, b.node],
        },
    )
}

fn embed_tokens(core: &Rc<Core>, tape: &Tape, pe: &Var, cls: &Var, pos: &Var) -> Var {
    let g = broadcast(&[groups(pe.dims()), cls.dims()[0], pos.dims()[0]]);
    let (b, p, d) = (pe.dims()[1], pe.dims()[2], pe.dims()[3]);
    let x = core.tensor(vec![g, b, p + 1, d], MemTag::Activations, Kind::Activation);
    let needs = tape.needs_grad(&[Some(pe), Some(cls), Some(pos)]);
    tape.record(
        x,
        needs,
        Rec::Embed {
            pe: Rc::clone(&pe.val),
            cls_dims: cls.dims().to_vec(),
            pos_dims: pos.dims().to_vec(),
            nodes: [pe.node, cls.node, pos.node],
        },
    )
}

fn class_token(core: &Rc<Core>, tape: &Tape, x: &Var) -> Var {
    let d = x.dims();
    let y = core.tensor(
        vec![d[0], d[1], d[3]],
        MemTag::Activations,
        Kind::Activation,
    );
    let needs = tape.needs_grad(&[Some(x)]);
    tape.record(
        y,
        needs,
        Rec::ClassToken {
            tokens: d[2],
            node: x.node,
        },
    )
}

fn cross_entropy(core: &Rc<Core>, tape: &Tape, logits: &Var) -> Var {
    let [m, b] = [logits.dims()[0], logits.dims()[1]];
    // On a GPU the targets come in as u32, and the kernel writes each loss before their mean.
    let targets = core
        .gpu()
        .then(|| core.raw(MemTag::Workspace, 4 * b as u64));
    let dlogits = core.tensor(logits.dims().to_vec(), MemTag::Workspace, Kind::Stat);
    let losses = core
        .gpu()
        .then(|| core.tensor(vec![m * b], MemTag::Workspace, Kind::Stat));
    let loss = core.tensor(vec![1], MemTag::Workspace, Kind::Stat);
    drop((losses, targets));
    let needs = tape.needs_grad(&[Some(logits)]);
    tape.record(
        loss,
        needs,
        Rec::Loss {
            dlogits,
            node: logits.node,
        },
    )
}

// The backward.

/// As `GradSink`: gradients of the values that need one, by node. A gradient may be shared
/// (a residual add hands its dy to both inputs), hence the `Rc`.
struct Sink(Vec<Option<Rc<Buf>>>);

impl Sink {
    fn add(&mut self, node: Option<usize>, g: Buf) {
        self.add_shared(node, Rc::new(g));
    }

    /// As `GradSink::add_shared`: the sum goes into whichever of the two only the sink holds,
    /// or into a new buffer when both are shared.
    fn add_shared(&mut self, node: Option<usize>, g: Rc<Buf>) {
        let Some(n) = node else { return };
        match &mut self.0[n] {
            None => {
                if Rc::strong_count(&g) == 1 {
                    g.set_tag(MemTag::Workspace);
                }
                self.0[n] = Some(g);
            }
            // Added into the existing gradient; `g` is freed.
            Some(acc) if Rc::strong_count(acc) == 1 => {}
            Some(acc) if Rc::strong_count(&g) == 1 => {
                g.set_tag(MemTag::Workspace);
                *acc = g;
            }
            Some(acc) => {
                let sum = acc
                    .core
                    .tensor(acc.dims.clone(), MemTag::Workspace, acc.kind);
                *acc = Rc::new(sum);
            }
        }
    }

    fn add_opt(&mut self, node: Option<usize>, g: Option<Buf>) {
        if let Some(g) = g {
            self.add(node, g);
        }
    }

    /// As `GradSink::take`.
    fn take(&mut self, node: Option<usize>) -> Option<Rc<Buf>> {
        node.and_then(|n| self.0[n].take())
    }
}

/// As `ops::elementwise::add_operand_grad`: a sum's dy itself, or summed into one group.
fn add_operand_grad(
    core: &Rc<Core>,
    sink: &mut Sink,
    node: Option<usize>,
    groups_to: usize,
    dy: &Rc<Buf>,
) {
    if node.is_none() {
        return;
    }
    let g = if dy.groups() == groups_to {
        Rc::clone(dy)
    } else {
        let dims = with_groups(&dy.dims, 1);
        Rc::new(core.tensor(dims, MemTag::Workspace, dy.kind))
    };
    sink.add_shared(node, g);
}

/// As `reduce_to_groups`: a gradient summed over the members when its input was shared.
fn reduce(core: &Rc<Core>, t: Buf, groups_to: usize) -> Buf {
    if t.groups() == groups_to {
        t
    } else {
        let out = core.tensor(with_groups(&t.dims, 1), MemTag::Workspace, t.kind);
        drop(t);
        out
    }
}

fn backward(core: &Rc<Core>, rec: Rec, dy: Rc<Buf>, sink: &mut Sink) {
    let ws = MemTag::Workspace;
    match rec {
        Rec::Linear {
            x,
            x_dims,
            w_dims,
            x_node,
            w_node,
            b_node,
            has_bias,
            residual,
        } => {
            if let Some((node, groups_to)) = residual {
                add_operand_grad(core, sink, node, groups_to, &dy);
            }
            let (gw, n, k) = (w_dims[0], w_dims[1], w_dims[2]);
            let gx = groups(&x_dims);
            let g = broadcast(&[gx, gw]);
            let rows = rows_per_group(&x_dims);
            // cuBLAS reads a bf16 copy of an f32 dY (the logits' gradient).
            let cast = (core.gpu() && dy.kind == Kind::Stat)
                .then(|| core.tensor(dy.dims.clone(), ws, Kind::ActGrad));
            // The gradient x already has (as `unshare`: a copy when something else holds it).
            let dx_plus = sink.take(x_node).map(|p| {
                if Rc::strong_count(&p) == 1 {
                    p
                } else {
                    Rc::new(core.tensor(p.dims.clone(), p.tag.get(), p.kind))
                }
            });
            let shared_input = gw != 1 && gx != g;
            let mut dx = x_node.and_then(|_| {
                core.gemm(g, rows, k, n);
                if core.gpu() && dx_plus.is_some() && !shared_input {
                    // The GPU's GEMM accumulates onto it: no buffer of its own.
                    return None;
                }
                let dx = core.tensor(x_dims.clone(), ws, Kind::ActGrad);
                if core.gpu() && shared_input {
                    // Each member's product, then their sum into dx.
                    drop(core.tensor(with_groups(&x_dims, g), ws, Kind::ActGrad));
                }
                Some(dx)
            });
            if dx_plus.is_some() {
                // Added into it and freed before dW and db are formed.
                drop(dx.take());
            }
            let dw = w_node.map(|_| {
                core.gemm(g, n, k, rows);
                core.tensor(w_dims.clone(), ws, Kind::ParamGrad)
            });
            let db = (b_node.is_some() && has_bias).then(|| {
                let db = core.tensor(vec![gw, n], ws, Kind::ParamGrad);
                if core.gpu() {
                    drop(core.scratch(sum_rows_workspace_len(&SumRowsDims {
                        groups: g,
                        rows,
                        n,
                        ld: n,
                        out_groups: gw,
                    })));
                }
                db
            });
            drop((cast, dy));
            match dx_plus {
                Some(p) => sink.add_shared(x_node, p),
                None => sink.add_opt(x_node, dx),
            }
            sink.add_opt(w_node, dw);
            sink.add_opt(b_node, db);
            drop(x);
        }
        Rec::Lora {
            x,
            u,
            a_dims,
            b_dims,
            nodes: [x_node, a_node, b_node],
            residual,
        } => {
            if let Some((node, groups_to)) = residual {
                add_operand_grad(core, sink, node, groups_to, &dy);
            }
            let (m, r, k) = (a_dims[0], a_dims[1], a_dims[2]);
            let n = b_dims[1];
            let gx = x.groups();
            let dx_plus = sink.take(x_node);
            let rows = rows_per_group(&x.dims);
            core.gemm(m, rows, r, n);
            let v = core.tensor(u.dims.clone(), ws, Kind::LowRank);
            let (mut da, mut db) = (None, None);
            let adapters = a_node.is_some() || b_node.is_some();
            if adapters {
                core.gemm(m, n, r, rows);
                db = Some(core.tensor(b_dims.clone(), ws, Kind::ParamGrad));
                core.gemm(m, r, k, rows);
                da = Some(core.tensor(a_dims.clone(), ws, Kind::ParamGrad));
            }
            let dx = x_node.map(|_| {
                let dx = core.tensor(x.dims.clone(), ws, Kind::ActGrad);
                if gx == m {
                    core.gemm(m, rows, k, n);
                } else {
                    // The members' dY summed first, so the big product runs once (on a GPU
                    // while the GEMM loads its tiles).
                    if !core.gpu() {
                        drop(core.tensor(vec![rows, n], ws, Kind::ActGrad));
                    }
                    core.gemm(1, rows, k, n);
                }
                core.gemm(m, rows, k, r);
                dx
            });
            // The GPU's partial sums of dA and dB where few members leave rows to split.
            let partials = (core.gpu() && adapters)
                .then(|| {
                    lora_grads_workspace_len(&LoraDims {
                        members: m,
                        x_groups: gx,
                        rows,
                        k,
                        n,
                        rank: r,
                    })
                })
                .filter(|&len| len > 0)
                .map(|len| core.scratch(len));
            drop((v, partials));
            drop((dy, dx_plus));
            sink.add_opt(x_node, dx);
            sink.add_opt(a_node, da);
            sink.add_opt(b_node, db);
            drop((x, u));
        }
        Rec::Attention {
            q,
            k,
            v,
            o,
            lse,
            nodes: [qn, kn, vn],
        } => {
            let g = dy.groups();
            let full = dy.dims.clone();
            core.add_flops(
                10.0 * (g * full[1]) as f64 * (full[2] * full[2]) as f64 * full[3] as f64,
            );
            let dq = core.tensor(full.clone(), ws, Kind::ActGrad);
            let dk = core.tensor(full.clone(), ws, Kind::ActGrad);
            let dv = core.tensor(full, ws, Kind::ActGrad);
            // The GPU's Δ = rowsum(dO∘O), one per score row, formed before dQ, dK and dV.
            let delta = core
                .gpu()
                .then(|| core.tensor(lse.dims.clone(), ws, Kind::Stat));
            let dq = reduce(core, dq, q.groups());
            let dk = reduce(core, dk, k.groups());
            let dv = reduce(core, dv, v.groups());
            drop((delta, dy));
            sink.add(qn, dq);
            sink.add(kn, dk);
            sink.add(vn, dv);
            drop((q, k, v, o, lse));
        }
        Rec::LayerNorm {
            x,
            gamma_dims,
            mean,
            rstd,
            nodes: [xn, gn, bn],
        } => {
            let want = dy.dims.clone();
            let dx_plus = sink.take(xn);
            let dx = xn.map(|_| match core.gpu() {
                // One kernel sums over the groups of a shared input.
                true => core.tensor(x.dims.clone(), ws, Kind::ActGrad),
                false => {
                    let all = core.tensor(want.clone(), ws, Kind::ActGrad);
                    reduce(core, all, x.groups())
                }
            });
            let (mut dg, mut dbeta) = (None, None);
            if gn.is_some() || bn.is_some() {
                let dims = NormDims {
                    groups: groups(&want),
                    x_groups: x.groups(),
                    w_groups: gamma_dims[0],
                    rows: rows_per_group(&want),
                    dim: gamma_dims[1],
                };
                dg = Some(core.tensor(gamma_dims.clone(), ws, Kind::ParamGrad));
                dbeta = Some(core.tensor(gamma_dims, ws, Kind::ParamGrad));
                if core.gpu() {
                    drop(core.scratch(layernorm_params_workspace_len(&dims)));
                }
            }
            drop((dy, dx_plus));
            sink.add_opt(xn, dx);
            sink.add_opt(gn, dg);
            sink.add_opt(bn, dbeta);
            drop((x, mean, rstd));
        }
        Rec::BiasGelu {
            x,
            b_dims,
            nodes: [xn, bn],
        } => {
            let dims = BiasGeluDims {
                groups: dy.groups(),
                x_groups: x.groups(),
                b_groups: b_dims[0],
                rows: rows_per_group(&dy.dims),
                n: b_dims[1],
            };
            let (dx, db) = if core.gpu() {
                // dx in x's groups directly, and db by a two-stage column sum.
                let dx = xn.map(|_| core.tensor(x.dims.clone(), ws, Kind::ActGrad));
                let db = bn.map(|_| {
                    let db = core.tensor(b_dims, ws, Kind::ParamGrad);
                    drop(core.scratch(bias_gelu_db_workspace_len(&dims)));
                    db
                });
                (dx, db)
            } else {
                let dz = core.tensor(dy.dims.clone(), ws, Kind::ActGrad);
                let db = bn.map(|_| core.tensor(b_dims, ws, Kind::ParamGrad));
                let dx = match xn {
                    Some(_) => Some(reduce(core, dz, x.groups())),
                    None => {
                        drop(dz);
                        None
                    }
                };
                (dx, db)
            };
            drop(dy);
            sink.add_opt(xn, dx);
            sink.add_opt(bn, db);
            drop(x);
        }
        Rec::Embed {
            pe,
            cls_dims,
            pos_dims,
            nodes: [pn, cn, qn],
        } => {
            let d = &dy.dims;
            let dims = EmbedDims {
                groups: d[0],
                pe_groups: pe.groups(),
                cls_groups: cls_dims[0],
                pos_groups: pos_dims[0],
                batch: d[1],
                patches: d[2] - 1,
                dim: d[3],
            };
            let dpe = pn.map(|_| match core.gpu() {
                // One kernel sums over the groups of a shared pe.
                true => core.tensor(pe.dims.clone(), ws, Kind::ActGrad),
                false => {
                    let t = core.tensor(vec![d[0], d[1], d[2] - 1, d[3]], ws, Kind::ActGrad);
                    reduce(core, t, pe.groups())
                }
            });
            // On a GPU dcls and dpos are two-stage column sums of dx's rows.
            let column_sums = |dims, rows| {
                let sums = core.tensor(dims, ws, Kind::ParamGrad);
                if core.gpu() {
                    drop(core.scratch(sum_rows_workspace_len(&rows)));
                }
                sums
            };
            let dcls = cn.map(|_| column_sums(cls_dims, dims.dcls_rows()));
            let dpos = qn.map(|_| column_sums(pos_dims, dims.dpos_rows()));
            drop(dy);
            sink.add_opt(pn, dpe);
            sink.add_opt(cn, dcls);
            sink.add_opt(qn, dpos);
            drop(pe);
        }
        Rec::ClassToken { tokens, node } => {
            let d = &dy.dims;
            let dx = core.tensor(vec![d[0], d[1], tokens, d[2]], ws, Kind::ActGrad);
            sink.add(node, dx);
            drop(dy);
        }
        Rec::Loss { dlogits, node } => {
            sink.add(node, dlogits);
            drop(dy);
        }
        Rec::Recompute {
            x,
            x_node,
            params,
            block,
            heads,
        } => {
            let tape = Tape::new(true);
            let x = Var {
                val: x,
                node: x_node.map(|_| tape.new_node()),
            };
            let before = core.flops.get();
            let out = block_forward(core, &tape, &x, &block, heads);
            core.recomputed
                .set(core.recomputed.get() + core.flops.get() - before);
            core.flops.set(before);
            let root = out.node.expect("a recomputed block needs a gradient");
            let sub_x = x.node;
            drop((out, x));
            let leaves = tape.leaves.borrow().clone();
            let mut sub = run_records(core, tape, root, dy);
            if let Some(g) = sub.take(sub_x) {
                sink.add_shared(x_node, g);
            }
            // The rerun makes its parameter nodes in the order the block reads them, not the
            // caller's: which outer node holds which gradient moves no bytes.
            for (outer, leaf) in params.into_iter().zip(leaves) {
                if let Some(g) = sub.take(Some(leaf)) {
                    sink.add_shared(Some(outer), g);
                }
            }
        }
    }
}

/// As `Tape::backward`: the loss's seed, the records in reverse, then the parameter gradients
/// added into their buffers.
fn run_backward(core: &Rc<Core>, tape: Tape, loss: &Var) {
    let Some(root) = loss.node else { return };
    let leaves = tape.leaves.borrow().clone();
    let seed = core.tensor(vec![1], MemTag::Workspace, Kind::Stat);
    let mut sink = run_records(core, tape, root, Rc::new(seed));
    for leaf in leaves {
        drop(sink.0[leaf].take());
    }
}

/// As `Tape::run`: the records in reverse from `root`, seeded with `seed`; the sink keeps the
/// gradients of the values no record produced.
fn run_records(core: &Rc<Core>, tape: Tape, root: usize, seed: Rc<Buf>) -> Sink {
    let mut records = tape.records.into_inner();
    let mut sink = Sink((0..tape.nodes.get()).map(|_| None).collect());
    sink.0[root] = Some(seed);
    while let Some((out, rec)) = records.pop() {
        match sink.0[out].take() {
            Some(dy) => backward(core, rec, dy, &mut sink),
            None => drop(rec),
        }
    }
    sink
}

// The model.

struct Lin {
    w: P,
    b: Option<P>,
}

struct Norm {
    g: P,
    b: P,
}

struct Projection {
    lin: Lin,
    adapter: Option<(P, P)>,
}

struct Block {
    norm1: Norm,
    attn: [Projection; 4],
    norm2: Norm,
    fc1: Lin,
    fc2: Lin,
    /// MC Dropout's members, each drawing its own attention masks.
    drop_members: Option<usize>,
}

impl Block {
    /// Every weight, in the order of `vit::Block::values`.
    fn params(&self) -> Vec<&P> {
        fn lin(l: &Lin) -> impl Iterator<Item = &P> {
            std::iter::once(&l.w).chain(l.b.as_ref())
        }
        let mut out = vec![&self.norm1.g, &self.norm1.b];
        for p in &self.attn {
            out.extend(lin(&p.lin));
            if let Some((a, b)) = &p.adapter {
                out.extend([a, b]);
            }
        }
        out.extend([&self.norm2.g, &self.norm2.b]);
        out.extend(lin(&self.fc1));
        out.extend(lin(&self.fc2));
        out
    }
}

struct Model {
    patch: Lin,
    cls: P,
    pos: P,
    blocks: Vec<Rc<Block>>,
    norm: Norm,
    head: Lin,
}

struct Build<'a> {
    core: &'a Rc<Core>,
    groups: usize,
    members: usize,
    train: bool,
    /// Every weight, and whether it is trained.
    all: Vec<(Rc<Buf>, bool)>,
    /// The low-precision copies of trainable weight matrices (see [`Kind::Shadow`]).
    shadows: Vec<Buf>,
}

impl Build<'_> {
    /// A weight; `matrix` for one the GEMMs read (`Params::add_gemm_weight`).
    fn weight(&mut self, dims: Vec<usize>, trainable: bool, matrix: bool) -> P {
        let (tag, kind) = match (trainable, matrix) {
            (true, _) => (MemTag::Trainable, Kind::Param),
            (false, true) => (MemTag::FrozenWeights, Kind::Matrix),
            (false, false) => (MemTag::FrozenWeights, Kind::Param),
        };
        if trainable && matrix && self.core.precision.shadow > 0 {
            let shadow = self
                .core
                .tensor(dims.clone(), MemTag::Trainable, Kind::Shadow);
            self.shadows.push(shadow);
        }
        let val = Rc::new(self.core.tensor(dims, tag, kind));
        self.all.push((Rc::clone(&val), trainable));
        P { val, trainable }
    }

    fn p(&mut self, dims: Vec<usize>, trainable: bool) -> P {
        self.weight(dims, trainable, false)
    }

    fn linear(&mut self, out: usize, inp: usize, bias: bool) -> Lin {
        let (g, t) = (self.groups, self.train);
        Lin {
            w: self.weight(vec![g, out, inp], t, true),
            b: bias.then(|| self.p(vec![g, out], t)),
        }
    }

    fn norm(&mut self, d: usize) -> Norm {
        let (g, t) = (self.groups, self.train);
        Norm {
            g: self.p(vec![g, d], t),
            b: self.p(vec![g, d], t),
        }
    }
}

type Weights = (Vec<(Rc<Buf>, bool)>, Vec<Buf>);

fn build(core: &Rc<Core>, vit: &VitConfig, ens: &EnsembleConfig) -> (Model, Weights) {
    let (d, m) = (vit.dim, ens.members);
    let explicit = ens.method == Method::Explicit;
    let mut b = Build {
        core,
        groups: if explicit { m } else { 1 },
        members: m,
        train: ens.method.trains_backbone(),
        all: Vec::new(),
        shadows: Vec::new(),
    };
    let patch = b.linear(d, vit.patch_features(), true);
    let (g, t) = (b.groups, b.train);
    let cls = b.p(vec![g, d], t);
    let pos = b.p(vec![g, vit.tokens(), d], t);
    let mut blocks = Vec::new();
    for _ in 0..vit.depth {
        let norm1 = b.norm(d);
        let attn = Proj::ALL.map(|proj| {
            let lin = b.linear(d, d, true);
            let lora = &ens.lora;
            let adapter = (ens.method.uses_lora() && lora.targets.contains(proj)).then(|| {
                let mm = b.members;
                (
                    b.p(vec![mm, lora.rank, d], true),
                    b.p(vec![mm, d, lora.rank], true),
                )
            });
            Projection { lin, adapter }
        });
        let norm2 = b.norm(d);
        let fc1 = b.linear(vit.mlp_dim, d, true);
        let fc2 = b.linear(d, vit.mlp_dim, true);
        blocks.push(Rc::new(Block {
            norm1,
            attn,
            norm2,
            fc1,
            fc2,
            drop_members: ens.method.drops_keys().then_some(m),
        }));
    }
    let norm = b.norm(d);
    let head = Lin {
        w: b.weight(vec![m, ens.classes, d], true, true),
        b: Some(b.p(vec![m, ens.classes], true)),
    };
    let model = Model {
        patch,
        cls,
        pos,
        blocks,
        norm,
        head,
    };
    (model, (b.all, b.shadows))
}

fn lin(core: &Rc<Core>, tape: &Tape, x: &Var, l: &Lin, residual: Option<&Var>) -> Var {
    let b = l.b.as_ref().map(|b| tape.param(b));
    linear(core, tape, x, &tape.param(&l.w), b.as_ref(), residual)
}

fn norm(core: &Rc<Core>, tape: &Tape, x: &Var, n: &Norm) -> Var {
    layernorm(core, tape, x, &tape.param(&n.g), &tape.param(&n.b))
}

fn project(core: &Rc<Core>, tape: &Tape, x: &Var, p: &Projection, residual: Option<&Var>) -> Var {
    match &p.adapter {
        None => lin(core, tape, x, &p.lin, residual),
        Some((a, b)) => {
            let w = tape.param(&p.lin.w);
            let bias = p.lin.b.as_ref().map(|b| tape.param(b));
            let ab = (&tape.param(a), &tape.param(b));
            lora_linear(core, tape, x, (&w, bias.as_ref()), ab, residual)
        }
    }
}

/// As `Vit::forward`, statement by statement: shadowed values live to the end of their scope.
fn forward(
    core: &Rc<Core>,
    tape: &Tape,
    m: &Model,
    vit: &VitConfig,
    batch: usize,
    activations: Activations,
) -> Var {
    let patches = Var::constant(core.tensor(
        vec![1, batch, vit.patches(), vit.patch_features()],
        MemTag::Activations,
        Kind::Activation,
    ));
    let pe = lin(core, tape, &patches, &m.patch, None);
    let mut x = embed_tokens(core, tape, &pe, &tape.param(&m.cls), &tape.param(&m.pos));
    for blk in &m.blocks {
        x = match activations {
            Activations::Keep => block_forward(core, tape, &x, blk, vit.heads),
            Activations::Recompute => recompute(core, tape, x, blk, vit.heads),
        };
    }
    let c = class_token(core, tape, &x);
    let c = norm(core, tape, &c, &m.norm);
    logits(core, tape, &c, &m.head)
}

/// As `vit::block_forward`.
fn block_forward(core: &Rc<Core>, tape: &Tape, x: &Var, blk: &Block, heads: usize) -> Var {
    let h = norm(core, tape, x, &blk.norm1);
    let [q, k, v] = [0, 1, 2].map(|i| project(core, tape, &h, &blk.attn[i], None));
    let a = attention(core, tape, [&q, &k, &v], heads, blk.drop_members);
    drop((q, k, v));
    let x = project(core, tape, &a, &blk.attn[3], Some(x));
    let h = norm(core, tape, &x, &blk.norm2);
    let h = linear(core, tape, &h, &tape.param(&blk.fc1.w), None, None);
    let fc1_bias = blk.fc1.b.as_ref().expect("fc1 has a bias");
    let h = bias_gelu(core, tape, &h, &tape.param(fc1_bias));
    lin(core, tape, &h, &blk.fc2, Some(&x))
}

/// As `ops::recompute` over a block: run unrecorded, keep only the input.
fn recompute(core: &Rc<Core>, tape: &Tape, x: Var, blk: &Rc<Block>, heads: usize) -> Var {
    let params: Vec<usize> = blk
        .params()
        .into_iter()
        .filter_map(|p| tape.param(p).node)
        .collect();
    if !(tape.recording && (x.node.is_some() || !params.is_empty())) {
        return block_forward(core, tape, &x, blk, heads);
    }
    let constant = Var {
        val: Rc::clone(&x.val),
        node: None,
    };
    let out = block_forward(core, &Tape::new(false), &constant, blk, heads);
    drop(constant);
    let Ok(out) = Rc::try_unwrap(out.val) else {
        unreachable!("an unrecorded block keeps nothing of its output")
    };
    tape.record(
        out,
        true,
        Rec::Recompute {
            x: x.val,
            x_node: x.node,
            params,
            block: Rc::clone(blk),
            heads,
        },
    )
}

fn replay(
    vit: &VitConfig,
    ens: &EnsembleConfig,
    batch: usize,
    moments: u64,
    precision: Precision,
    // A training step that keeps these activations, or an inference pass.
    train: Option<Activations>,
) -> (MemoryPrediction, Flops) {
    let core = Rc::new(Core {
        ledger: RefCell::default(),
        precision,
        flops: Cell::new(0.0),
        recomputed: Cell::new(0.0),
    });
    let (model, params) = build(&core, vit, ens);
    // The gradient buffers and optimizer state a Trainer makes, one of each per trainable tensor.
    let mut state = Vec::new();
    if train.is_some() {
        let trainable: Vec<_> = params.0.iter().filter(|(_, t)| *t).collect();
        for (p, _) in &trainable {
            state.push(core.tensor(p.dims.clone(), MemTag::Gradients, Kind::Param));
            for _ in 0..moments {
                state.push(core.tensor(p.dims.clone(), MemTag::OptimizerState, Kind::Param));
            }
        }
        if precision.gpu_ops {
            let numels: Vec<usize> = trainable
                .iter()
                .map(|(p, _)| p.dims.iter().product())
                .collect();
            let bytes = fused_table_bytes(&numels);
            core.ledger
                .borrow_mut()
                .alloc(MemTag::OptimizerState, bytes);
        }
    }
    core.ledger.borrow_mut().reset_peaks();
    let start = TagBytes(core.ledger.borrow().live);

    let images = core.tensor(
        vec![batch, vit.channels, vit.image_size, vit.image_size],
        MemTag::Workspace,
        Kind::Input,
    );
    let tape = Tape::new(train.is_some());
    // A GPU prediction of MC Dropout names each image by a u64 key, for its masks.
    let keys = (train.is_none() && precision.gpu_ops && ens.method.drops_keys())
        .then(|| core.raw(MemTag::Workspace, 8 * batch as u64));
    let logits = forward(&core, &tape, &model, vit, batch, train.unwrap_or_default());
    drop(keys);
    let kept_activations = core.ledger.borrow().live[tag_index(MemTag::Activations)];
    let forward_flops = core.flops.get();
    if train.is_some() {
        let loss = cross_entropy(&core, &tape, &logits);
        drop(logits);
        run_backward(&core, tape, &loss);
        drop(loss);
    } else {
        // Vit::predict: the probabilities, then the logits are dropped.
        let probs = core.tensor(logits.dims().to_vec(), MemTag::Activations, Kind::Stat);
        drop(logits);
        drop(probs);
        drop(tape);
    }
    drop(images);
    let flops = Flops {
        forward: forward_flops,
        backward: core.flops.get() - forward_flops,
        recomputed: core.recomputed.get(),
    };
    let l = core.ledger.borrow();
    let prediction = MemoryPrediction {
        start,
        peak: TagBytes(l.peak),
        total_peak: l.total_peak,
        kept_activations,
    };
    drop(l);
    drop((state, params, model));
    (prediction, flops)
}

/// The closed forms of [`Flops`] for the LoRA-Ensemble with adapters on all four projections and
/// the explicit ensemble; `None` for other setups (the replay counts those).
pub fn flops_closed_form(vit: &VitConfig, ens: &EnsembleConfig, batch: usize) -> Option<Flops> {
    let f = |v: usize| v as f64;
    let (m, b, t, d, dm, l, c) = (
        f(ens.members),
        f(batch),
        f(vit.tokens()),
        f(vit.dim),
        f(vit.mlp_dim),
        f(vit.depth),
        f(ens.classes),
    );
    let (p, pf) = (f(vit.patches()), f(vit.patch_features()));
    let rows = b * t;
    let attn_fwd = 4.0 * m * b * t * t * d;
    let attn_bwd = 10.0 * m * b * t * t * d;
    match ens.method {
        Method::Lora if ens.lora.targets == crate::config::Targets::ALL => {
            let r = f(ens.lora.rank);
            let low = 4.0 * m * rows * d * r;
            let shared = 2.0 * rows * d * d;
            let per = 2.0 * m * rows * d * d;
            let forward = 2.0 * b * p * pf * d
                + 3.0 * (shared + low)
                + 3.0 * (l - 1.0) * (per + low)
                + l * (per + low)
                + l * attn_fwd
                + l * 4.0 * m * rows * d * dm
                + 2.0 * m * b * d * c;
            let backward = 3.0 * 6.0 * m * rows * d * r
                + (3.0 * (l - 1.0) + l) * (per + 8.0 * m * rows * d * r)
                + l * attn_bwd
                + l * 4.0 * m * rows * d * dm
                + 4.0 * m * b * d * c;
            Some(Flops {
                forward,
                backward,
                recomputed: 0.0,
            })
        }
        Method::Explicit => {
            let pe = 2.0 * m * b * p * pf * d;
            let linears = l * (8.0 * m * rows * d * d + 4.0 * m * rows * d * dm);
            let head = 2.0 * m * b * d * c;
            let forward = pe + linears + l * attn_fwd + head;
            let backward = pe + 2.0 * (linears + head) + l * attn_bwd;
            Some(Flops {
                forward,
                backward,
                recomputed: 0.0,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod each_op;

#[cfg(test)]
mod tests {
    use loren_tensor::{Device, Rng};

    use super::*;
    use crate::config::{LoraConfig, Targets};
    use crate::data::Batch;
    use crate::train::{TrainConfig, Trainer};
    use crate::vit::Vit;

    fn ensemble(method: Method, members: usize, targets: Targets) -> EnsembleConfig {
        EnsembleConfig {
            drop_key: EnsembleConfig::DROP_KEY,
            method,
            members,
            classes: 10,
            lora: LoraConfig {
                rank: 4,
                targets,
                ..LoraConfig::default()
            },
        }
    }

    fn random_batch(vit: &VitConfig, b: usize) -> Batch {
        let mut rng = Rng::new(5);
        let n = b * vit.channels * vit.image_size * vit.image_size;
        Batch {
            images: (0..n).map(|_| rng.normal()).collect(),
            labels: (0..b).map(|i| (i % 10) as u32).collect(),
            batch: b,
            channels: vit.channels,
            height: vit.image_size,
            width: vit.image_size,
        }
    }

    /// Peaks by tag and the total peak of one real training step after a warm-up step.
    fn measured(
        vit: &VitConfig,
        ens: &EnsembleConfig,
        b: usize,
        activations: Activations,
    ) -> (TagBytes, u64) {
        let dev = Device::cpu();
        let mut model = Vit::new(vit, ens, &dev, 0).unwrap();
        let cfg = TrainConfig::plain(b, 1e-3, activations);
        let mut trainer = Trainer::new(&mut model, &cfg, 10 * b).unwrap();
        let batch = random_batch(vit, b);
        trainer.step(&batch).unwrap();
        dev.memory().reset_peaks();
        trainer.step(&batch).unwrap();
        let r = dev.memory().report();
        let mut peaks = TagBytes::default();
        for tag in MemTag::ALL {
            peaks.0[tag_index(tag)] = r.peak(tag);
        }
        (peaks, r.total_peak)
    }

    fn check(vit: &VitConfig, ens: &EnsembleConfig, b: usize) {
        check_with(vit, ens, b, Activations::Keep);
    }

    fn check_with(vit: &VitConfig, ens: &EnsembleConfig, b: usize, activations: Activations) {
        let model = predict(vit, ens, b, 2, Precision::CPU, activations).unwrap();
        let (peaks, total) = measured(vit, ens, b, activations);
        let label = format!(
            "{} M={} targets {} activations {}",
            ens.method,
            ens.members,
            ens.lora.targets,
            activations.name()
        );
        // The model follows every allocation the step makes, so it is exact, byte for byte.
        for tag in MemTag::ALL {
            assert_eq!(model.train.peak.get(tag), peaks.get(tag), "{label}: {tag}");
        }
        assert_eq!(model.train.total_peak, total, "{label}: the total peak");
    }

    #[test]
    fn model_matches_the_cpu_accounting_when_blocks_are_recomputed() {
        let vit = VitConfig::tiny();
        for (method, m) in [
            (Method::Lora, 1),
            (Method::Lora, 5),
            (Method::Explicit, 3),
            (Method::Single, 1),
            (Method::SingleLora, 1),
            (Method::McDropout, 3),
        ] {
            check_with(
                &vit,
                &ensemble(method, m, Targets::ALL),
                8,
                Activations::Recompute,
            );
        }
    }

    #[test]
    fn model_matches_the_cpu_accounting_for_lora_at_several_sizes() {
        let vit = VitConfig::tiny();
        for m in [1, 2, 5, 16] {
            check(&vit, &ensemble(Method::Lora, m, Targets::ALL), 8);
        }
    }

    #[test]
    fn model_matches_the_cpu_accounting_for_explicit_at_several_sizes() {
        let vit = VitConfig::tiny();
        for m in [1, 2, 5, 16] {
            check(&vit, &ensemble(Method::Explicit, m, Targets::ALL), 8);
        }
    }

    #[test]
    fn model_matches_the_cpu_accounting_for_other_setups() {
        let vit = VitConfig::tiny();
        check(&vit, &ensemble(Method::Lora, 3, "qv".parse().unwrap()), 5);
        check(&vit, &ensemble(Method::Lora, 3, "o".parse().unwrap()), 5);
        check(&vit, &ensemble(Method::Single, 1, Targets::ALL), 6);
        check(&vit, &ensemble(Method::SingleLora, 1, Targets::ALL), 6);
        check(&vit, &ensemble(Method::McDropout, 4, Targets::ALL), 6);
    }

    /// An inference pass's peaks on `dev` against the replay at `precision`: LoRA, explicit, and
    /// MC Dropout with its item keys.
    pub(super) fn check_inference(dev: &Device, precision: Precision) {
        let vit = VitConfig::tiny();
        for method in [Method::Lora, Method::Explicit, Method::McDropout] {
            let ens = ensemble(method, 4, Targets::ALL);
            let model = Vit::new(&vit, &ens, dev, 0).unwrap();
            let b = 8;
            let pixels = random_batch(&vit, b).images;
            let keys = model.image_keys(&pixels);
            let images = loren_tensor::Tensor::from_vec_as(
                pixels,
                [b, 1, 8, 8],
                dev.compute_dtype(),
                MemTag::Workspace,
                dev,
            )
            .unwrap();
            dev.memory().reset_peaks();
            drop(model.predict(&images, &keys).unwrap());
            let r = dev.memory().report();
            let p = predict(&vit, &ens, b, 2, precision, Activations::Keep).unwrap();
            for tag in MemTag::ALL {
                assert_eq!(p.inference.peak.get(tag), r.peak(tag), "{method} {tag}");
            }
            assert_eq!(p.inference.total_peak, r.total_peak, "{method}");
        }
    }

    #[test]
    fn inference_prediction_matches_predict() {
        check_inference(&Device::cpu(), Precision::CPU);
    }

    #[test]
    fn parameter_counts_match_the_built_model() {
        for vit in [VitConfig::tiny(), VitConfig::vit_b_32()] {
            for method in Method::ALL {
                let m = if method.is_single() { 1 } else { 3 };
                let ens = ensemble(method, m, Targets::ALL);
                let counts = ParamCounts::new(&vit, &ens);
                if vit.name == "tiny" {
                    let model = Vit::new(&vit, &ens, &Device::cpu(), 0).unwrap();
                    assert_eq!(counts.trainable, model.params().num_trainable(), "{method}");
                    assert_eq!(
                        counts.frozen + counts.trainable,
                        model.params().num_total(),
                        "{method}"
                    );
                }
                let p = predict(&vit, &ens, 2, 2, Precision::CPU, Activations::Keep).unwrap();
                assert_eq!(
                    p.train.start.get(MemTag::Trainable),
                    4 * counts.trainable as u64
                );
                assert_eq!(
                    p.train.start.get(MemTag::OptimizerState),
                    8 * counts.trainable as u64
                );
                assert_eq!(
                    p.train.start.get(MemTag::FrozenWeights),
                    4 * counts.frozen as u64
                );
            }
        }
        // ViT-B/32 has the published 87.8M backbone parameters (with a 1000-class head: 88.2M).
        let vit = VitConfig::vit_b_32();
        let c = ParamCounts::new(&vit, &ensemble(Method::Lora, 1, Targets::ALL));
        assert_eq!(c.backbone + 1000 * 768 + 1000, 88_224_232);
    }

    #[test]
    fn sizes_past_what_loren_counts_are_refused_before_any_integer_overflows() {
        let vit = VitConfig::tiny();
        let refused = |vit: &VitConfig, ens: &EnsembleConfig, batch: usize| {
            predict(vit, ens, batch, 2, Precision::CPU, Activations::Keep)
                .unwrap_err()
                .to_string()
        };
        let e = refused(&vit, &ensemble(Method::Lora, usize::MAX, Targets::ALL), 1);
        assert!(e.contains("parameters, more than loren builds"), "{e}");
        let e = refused(&vit, &ensemble(Method::Explicit, 1 << 40, Targets::ALL), 1);
        assert!(e.contains("M = 1099511627776"), "{e}");
        let mut many_classes = ensemble(Method::Lora, 2, Targets::ALL);
        many_classes.classes = usize::MAX;
        let e = refused(&vit, &many_classes, 1);
        assert!(e.contains("18446744073709551615 classes"), "{e}");
        // Where every parameter count fits, the batch is what is too large.
        let e = refused(&vit, &ensemble(Method::Lora, 8, Targets::ALL), usize::MAX);
        assert!(e.contains("activation values in a training step"), "{e}");
        // Tokens are (image / patch)^2: 2^32 pixels a side would overflow them.
        let wide = VitConfig {
            image_size: 1 << 32,
            ..VitConfig::tiny()
        };
        let e = refused(&wide, &ensemble(Method::Lora, 1, Targets::ALL), 1);
        assert!(e.contains("image_size 4294967296 is above 1048576"), "{e}");
        // Few, large patches: the images and the patch inputs are the largest tensors.
        let coarse = VitConfig {
            image_size: 1 << 19,
            patch: 1 << 19,
            channels: 3,
            dim: 1,
            heads: 1,
            mlp_dim: 1,
            depth: 1,
            ..VitConfig::tiny()
        };
        let e = refused(
            &coarse,
            &ensemble(Method::Explicit, 1, Targets::ALL),
            1 << 23,
        );
        assert!(e.contains("activation values"), "{e}");
        // The bounds are far from real models: ViT-B/16's explicit ensemble of 64 at batch 256.
        let b16 = VitConfig::vit_b_16();
        predict(
            &b16,
            &ensemble(Method::Explicit, 64, Targets::ALL),
            256,
            2,
            Precision::CPU,
            Activations::Keep,
        )
        .unwrap();
    }

    #[test]
    fn lora_grows_by_adapters_and_heads_alone() {
        let vit = VitConfig::vit_b_32();
        let at = |method, m| {
            predict(
                &vit,
                &ensemble(method, m, Targets::ALL),
                4,
                2,
                Precision::CPU,
                Activations::Keep,
            )
            .unwrap()
        };
        let (l1, l2) = (at(Method::Lora, 1), at(Method::Lora, 2));
        let per = 4 * (12 * 4 * 2 * 4 * 768 + 10 * 768 + 10) as u64;
        let step =
            |a: &StepModel, b: &StepModel, tag| b.train.start.get(tag) - a.train.start.get(tag);
        assert_eq!(step(&l1, &l2, MemTag::Trainable), per);
        assert_eq!(step(&l1, &l2, MemTag::OptimizerState), 2 * per);
        assert_eq!(step(&l1, &l2, MemTag::FrozenWeights), 0);
        let (e1, e2) = (at(Method::Explicit, 1), at(Method::Explicit, 2));
        assert_eq!(
            step(&e1, &e2, MemTag::Trainable),
            4 * e1.params.trainable_per_member as u64
        );
    }

    #[test]
    fn kept_activations_follow_the_documented_closed_forms() {
        for vit in [VitConfig::tiny(), VitConfig::vit_b_32()] {
            let (d, dm, h, l, c) = (vit.dim, vit.mlp_dim, vit.heads, vit.depth, 10);
            let (p, f) = (vit.patches(), vit.patch_features());
            let b = 4;
            let rows = b * vit.tokens();
            for m in [1, 3] {
                let lora = ensemble(Method::Lora, m, Targets::ALL);
                let r = lora.lora.rank;
                let want = m
                    * rows
                    * ((l - 1) * (7 * d + dm + 4 * r + h + 4) + 5 * d + dm + 4 * r + h + 2)
                    + rows * d
                    + m * b * (2 * d + 2 + c);
                let got = predict(&vit, &lora, b, 2, Precision::CPU, Activations::Keep).unwrap();
                assert_eq!(
                    got.train.kept_activations,
                    4 * want as u64,
                    "{} lora",
                    vit.name
                );
                let explicit = ensemble(Method::Explicit, m, Targets::ALL);
                let want = m * rows * l * (8 * d + 2 * dm + h + 4)
                    + b * p * f
                    + m * b * (p * d + 2 * d + 2 + c);
                let got =
                    predict(&vit, &explicit, b, 2, Precision::CPU, Activations::Keep).unwrap();
                assert_eq!(
                    got.train.kept_activations,
                    4 * want as u64,
                    "{} explicit",
                    vit.name
                );

                // Recomputing: the blocks' inputs and the same end.
                let end = m * b * (2 * d + 2 + c);
                let want = rows * d + m * rows * d * (l - 1) + end;
                let got =
                    predict(&vit, &lora, b, 2, Precision::CPU, Activations::Recompute).unwrap();
                assert_eq!(got.train.kept_activations, 4 * want as u64, "{}", vit.name);
                let want = m * rows * d * l + b * p * f + m * b * p * d + end;
                let got = predict(
                    &vit,
                    &explicit,
                    b,
                    2,
                    Precision::CPU,
                    Activations::Recompute,
                )
                .unwrap();
                assert_eq!(got.train.kept_activations, 4 * want as u64, "{}", vit.name);
            }
        }
    }

    #[test]
    fn replayed_flops_equal_the_closed_forms() {
        for vit in [
            VitConfig::tiny(),
            VitConfig::vit_b_32(),
            VitConfig::vit_b_16(),
        ] {
            for method in [Method::Lora, Method::Explicit] {
                for m in [1, 4, 16] {
                    let ens = ensemble(method, m, Targets::ALL);
                    let p = predict(&vit, &ens, 32, 2, Precision::CPU, Activations::Keep).unwrap();
                    let c = flops_closed_form(&vit, &ens, 32).unwrap();
                    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b;
                    assert!(
                        close(p.train_flops.forward, c.forward),
                        "{} {method} {m}",
                        vit.name
                    );
                    assert!(
                        close(p.train_flops.backward, c.backward),
                        "{} {method} {m}",
                        vit.name
                    );
                    assert!(close(p.inference_flops, c.forward));
                }
            }
        }
    }

    #[test]
    fn recomputing_runs_the_blocks_forward_again_outside_the_model_flops() {
        let vit = VitConfig::vit_b_32();
        let (b, c) = (32.0, 10.0);
        let (d, p, f) = (
            vit.dim as f64,
            vit.patches() as f64,
            vit.patch_features() as f64,
        );
        for (method, m) in [(Method::Lora, 4), (Method::Explicit, 2)] {
            let ens = ensemble(method, m, Targets::ALL);
            let at = |a| predict(&vit, &ens, 32, 2, Precision::CPU, a).unwrap();
            let (kept, again) = (at(Activations::Keep), at(Activations::Recompute));
            assert_eq!(kept.train_flops.recomputed, 0.0);
            assert_eq!(
                kept.train_flops.total(),
                again.train_flops.total(),
                "{method}"
            );
            // Everything but the patch embedding and the heads runs again.
            let patch_groups = if method == Method::Explicit {
                m as f64
            } else {
                1.0
            };
            let outside = 2.0 * patch_groups * b * p * f * d + 2.0 * m as f64 * b * d * c;
            let blocks = kept.train_flops.forward - outside;
            let got = again.train_flops.recomputed;
            assert!(
                (got - blocks).abs() <= 1e-9 * blocks,
                "{method}: {got} vs {blocks}"
            );
            assert!(again.train.total_peak < kept.train.total_peak);
        }
    }

    #[test]
    fn gpu_precision_halves_weight_matrices_and_adds_shadows() {
        let vit = VitConfig::vit_b_32();
        let (d, dm, l) = (vit.dim, vit.mlp_dim, vit.depth);
        let matrices = (d * vit.patch_features() + l * (4 * d * d + 2 * d * dm)) as u64;
        let ens = ensemble(Method::Lora, 4, Targets::ALL);
        let cpu = predict(&vit, &ens, 32, 2, Precision::CPU, Activations::Keep).unwrap();
        let gpu = predict(&vit, &ens, 32, 2, Precision::GPU_BF16, Activations::Keep).unwrap();
        let (c, g) = (cpu.train.start, gpu.train.start);
        // Frozen matrices in bf16, frozen biases, norms and embeddings in f32.
        assert_eq!(
            c.get(MemTag::FrozenWeights) - g.get(MemTag::FrozenWeights),
            2 * matrices
        );
        // Trainable: f32 masters plus a bf16 shadow of each head's weight matrix.
        assert_eq!(
            g.get(MemTag::Trainable) - c.get(MemTag::Trainable),
            2 * 4 * 10 * 768
        );
        // The same moments, and the GPU optimizer's device table: a 56-byte slot per tensor (96
        // adapters of 4·4·768 values, the heads' weight and bias), an f64 norm partial per block
        // of 4096 values and their sum, the f32 clipping factor and the u64 count of skipped
        // steps.
        let blocks = 96 * 3 + 8 + 1;
        assert_eq!(
            g.get(MemTag::OptimizerState) - c.get(MemTag::OptimizerState),
            98 * 56 + 8 * (blocks + 1) + 4 + 8
        );
        assert!(gpu.train.total_peak < cpu.train.total_peak);
        let e = ensemble(Method::Explicit, 2, Targets::ALL);
        let cpu = predict(&vit, &e, 32, 2, Precision::CPU, Activations::Keep).unwrap();
        let gpu = predict(&vit, &e, 32, 2, Precision::GPU_BF16, Activations::Keep).unwrap();
        assert_eq!(
            gpu.train.start.get(MemTag::Trainable) - cpu.train.start.get(MemTag::Trainable),
            2 * (2 * matrices + 2 * 10 * 768)
        );
    }
}
