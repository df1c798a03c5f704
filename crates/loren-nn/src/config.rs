//! Model and ensemble configurations, validated before anything is allocated.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{NnError, Result};
use crate::memory_model::ParamCounts;

/// The shape of a Vision Transformer.
///
/// [`VitConfig::validate`] checks the sizes before anything is built; each is at least 1 and at
/// most [`MAX_SIDE`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// A label (`tiny`, `vit-b-32`, ...): in messages, in the bundled backbone's file name, and
    /// recorded in checkpoints, where a resume checks it is the same. The computation does not
    /// read it.
    pub name: String,
    /// The side of the square input image, in pixels: inputs are `image_size × image_size`. A
    /// multiple of `patch`.
    pub image_size: usize,
    /// Input channels (1 for grey images, 3 for RGB).
    pub channels: usize,
    /// The side of a square patch, in pixels: the image is `(image_size / patch)²` patches (at
    /// most [`MAX_GRID`] a side), each one token.
    pub patch: usize,
    /// D, the token width (embedding dimension) throughout the network. A multiple of `heads`.
    pub dim: usize,
    /// The number of transformer blocks.
    pub depth: usize,
    /// Attention heads per block, each `dim / heads` wide ([`VitConfig::head_dim`]). On a GPU
    /// the attention kernels exist for head widths 16, 32, 64 and 128 only: another is an error
    /// there.
    pub heads: usize,
    /// The hidden width of each block's MLP (`fc1` is `[mlp_dim, dim]`).
    pub mlp_dim: usize,
    /// The LayerNorms' epsilon, added to the variance; finite and above 0. Weights trained
    /// elsewhere need their library's: 1e-6 for timm and torchvision, 1e-12 for Hugging Face
    /// ([`crate::import`] says which, as `loren::backbone::read_backbone` does).
    pub ln_eps: f32,
}

impl VitConfig {
    /// The model for the bundled 8×8 digits: 16 patches of 2×2 plus the class token, 17 tokens.
    /// Kept exactly so, because other engines are compared on it.
    pub fn tiny() -> Self {
        VitConfig {
            name: "tiny".into(),
            image_size: 8,
            channels: 1,
            patch: 2,
            dim: 64,
            depth: 4,
            heads: 4,
            mlp_dim: 128,
            ln_eps: 1e-6,
        }
    }

    /// ViT-B/32 at 224×224: 49 patches plus the class token, 50 tokens.
    pub fn vit_b_32() -> Self {
        VitConfig {
            name: "vit-b-32".into(),
            image_size: 224,
            channels: 3,
            patch: 32,
            dim: 768,
            depth: 12,
            heads: 12,
            mlp_dim: 3072,
            ln_eps: 1e-6,
        }
    }

    /// ViT-B/16 at 224×224: 196 patches plus the class token, 197 tokens.
    pub fn vit_b_16() -> Self {
        VitConfig {
            name: "vit-b-16".into(),
            patch: 16,
            ..VitConfig::vit_b_32()
        }
    }

    /// The names [`VitConfig::by_name`] knows.
    pub const NAMES: [&'static str; 3] = ["tiny", "vit-b-32", "vit-b-16"];

    /// The built-in config of that name (one of [`VitConfig::NAMES`]); another name is an
    /// [`NnError::Config`] listing them.
    pub fn by_name(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(VitConfig::tiny()),
            "vit-b-32" => Ok(VitConfig::vit_b_32()),
            "vit-b-16" => Ok(VitConfig::vit_b_16()),
            _ => Err(NnError::Config(format!(
                "unknown model config '{name}': expected one of {}",
                VitConfig::NAMES.join(", ")
            ))),
        }
    }

    /// The patches of an image: `(image_size / patch)²`.
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch).pow(2)
    }

    /// Sequence length: the patches plus the class token.
    pub fn tokens(&self) -> usize {
        self.patches() + 1
    }

    /// The values of one patch, the patch embedding's input width: `channels · patch²`.
    pub fn patch_features(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    /// The width of one attention head: `dim / heads`.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Check the shape: every size at least 1 and at most [`MAX_SIDE`], at most [`MAX_GRID`]
    /// patches a side, `patch` tiling `image_size`, `heads` dividing `dim`, `ln_eps` finite and
    /// above 0. Otherwise an [`NnError::Config`] naming the model and what is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(NnError::Config(format!("model '{}': {msg}", self.name)));
        let dims = [
            ("image_size", self.image_size),
            ("channels", self.channels),
            ("patch", self.patch),
            ("dim", self.dim),
            ("depth", self.depth),
            ("heads", self.heads),
            ("mlp_dim", self.mlp_dim),
        ];
        if let Some((what, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{what} must be at least 1"));
        }
        if let Some((what, v)) = dims.iter().find(|(_, v)| *v > MAX_SIDE) {
            return bad(format!("{what} {v} is above {MAX_SIDE}"));
        }
        let side = self.image_size / self.patch;
        if side > MAX_GRID {
            return bad(format!(
                "image size {} in patches of {} is {side} patches a side, above {MAX_GRID}",
                self.image_size, self.patch
            ));
        }
        if !self.image_size.is_multiple_of(self.patch) {
            return bad(format!(
                "patch {} does not tile image size {}",
                self.patch, self.image_size
            ));
        }
        if !self.dim.is_multiple_of(self.heads) {
            return bad(format!(
                "{} heads do not divide dim {}",
                self.heads, self.dim
            ));
        }
        // A constant row (a zero variance) would be divided by sqrt(eps).
        if !(self.ln_eps > 0.0 && self.ln_eps.is_finite()) {
            return bad(format!(
                "layernorm epsilon {} must be finite and above 0",
                self.ln_eps
            ));
        }
        Ok(())
    }
}

/// The largest value of any one size in a [`VitConfig`]. Far above any ViT, and low enough that
/// no count made from the sizes (tokens, parameters) overflows.
pub const MAX_SIDE: usize = 1 << 20;

/// The most patches a side of the image may have: a million tokens, whose attention alone
/// would take 2^40 scores an image and head. It bounds the position embedding an imported
/// backbone is resampled to before anything else is checked.
pub const MAX_GRID: usize = 1 << 10;

/// The most parameters a model may have: 4 TiB in f32, more than any device holds. Beyond it a
/// configuration is refused before anything is counted in integers or allocated.
pub const MAX_PARAMS: f64 = (1u64 << 40) as f64;

/// How the members are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// LoRA-Ensemble: one frozen backbone, per-member adapters and heads.
    Lora,
    /// M full copies of the network, every weight trained.
    Explicit,
    /// One network, every weight trained.
    Single,
    /// One network with LoRA adapters and a head trained, the backbone frozen.
    SingleLora,
    /// MC Dropout, the paper's third baseline: one network, every weight trained, DropKey on
    /// every attention score and a head per member. Each member is a pass with masks of its
    /// own, in training and in prediction.
    McDropout,
}

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Single,
        Method::SingleLora,
        Method::McDropout,
        Method::Explicit,
        Method::Lora,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Explicit => "explicit",
            Method::Single => "single",
            Method::SingleLora => "single-lora",
            Method::McDropout => "mc-dropout",
        }
    }

    /// Whether every backbone weight is trained.
    pub fn trains_backbone(self) -> bool {
        matches!(self, Method::Explicit | Method::Single | Method::McDropout)
    }

    /// Whether attention scores drop (DropKey) in training and prediction.
    pub fn drops_keys(self) -> bool {
        self == Method::McDropout
    }

    /// Whether the backbone is frozen and adapted by LoRA.
    pub fn uses_lora(self) -> bool {
        matches!(self, Method::Lora | Method::SingleLora)
    }

    /// Whether the method has one member whatever `--members` says.
    pub fn is_single(self) -> bool {
        matches!(self, Method::Single | Method::SingleLora)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = NnError;

    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                NnError::Config(format!(
                    "unknown method '{s}': expected lora, explicit, single, single-lora or mc-dropout"
                ))
            })
    }
}

/// Which attention projections carry adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    pub q: bool,
    pub k: bool,
    pub v: bool,
    pub o: bool,
}

impl Targets {
    pub const ALL: Targets = Targets {
        q: true,
        k: true,
        v: true,
        o: true,
    };

    pub fn contains(&self, proj: Proj) -> bool {
        match proj {
            Proj::Q => self.q,
            Proj::K => self.k,
            Proj::V => self.v,
            Proj::O => self.o,
        }
    }

    pub fn is_empty(&self) -> bool {
        !(self.q || self.k || self.v || self.o)
    }
}

impl FromStr for Targets {
    type Err = NnError;

    /// A subset of "qkvo", e.g. "qv".
    fn from_str(s: &str) -> Result<Self> {
        let mut t = Targets {
            q: false,
            k: false,
            v: false,
            o: false,
        };
        for c in s.chars() {
            match c {
                'q' => t.q = true,
                'k' => t.k = true,
                'v' => t.v = true,
                'o' => t.o = true,
                _ => {
                    return Err(NnError::Config(format!(
                        "LoRA targets '{s}': '{c}' is not one of q, k, v, o"
                    )));
                }
            }
        }
        if t.is_empty() {
            return Err(NnError::Config(
                "LoRA targets: name at least one of q, k, v, o".into(),
            ));
        }
        Ok(t)
    }
}

impl fmt::Display for Targets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in Proj::ALL {
            if self.contains(p) {
                f.write_str(p.name())?;
            }
        }
        Ok(())
    }
}

/// The four attention projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    Q,
    K,
    V,
    O,
}

impl Proj {
    pub const ALL: [Proj; 4] = [Proj::Q, Proj::K, Proj::V, Proj::O];

    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q",
            Proj::K => "k",
            Proj::V => "v",
            Proj::O => "o",
        }
    }
}

/// The adapters: `y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ`.
///
/// Read by the methods that adapt a frozen backbone ([`Method::uses_lora`]); the others ignore
/// it. [`EnsembleConfig::validate`] checks it for them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// r, the adapters' rank: A is `[r, d_in]` and B `[d_out, r]` per member and projection.
    /// From 1 to the model's `dim`.
    pub rank: usize,
    /// s, the raw factor the adapter's product is multiplied by, as written above. It is not
    /// divided by the rank: for PEFT's `lora_alpha`, set `scale` to `alpha / rank`. Finite and not
    /// 0 (where the adapters would change nothing); the reference setup's is 1.
    pub scale: f32,
    /// Which of the attention projections q, k, v and o carry adapters; the others stay the
    /// frozen projection alone.
    pub targets: Targets,
    /// Gain of A's Xavier-uniform start; large, so the members start apart.
    pub init_gain: f32,
}

impl Default for LoraConfig {
    /// The method's reference setup: rank 8, scale 1, all four projections, gain 10.
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            scale: 1.0,
            targets: Targets::ALL,
            init_gain: 10.0,
        }
    }
}

/// What to build: a method, its member count and its adapters, for a number of classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnsembleConfig {
    /// How the members are made.
    pub method: Method,
    /// M, the members: at least 1, and exactly 1 for the single-network methods
    /// ([`Method::is_single`]). Under MC Dropout, the passes with masks of their own.
    pub members: usize,
    /// C, the classes every member's head scores: at least 2, and the training data's.
    pub classes: usize,
    /// The adapters, for the methods that have them ([`Method::uses_lora`]).
    pub lora: LoraConfig,
    /// MC Dropout's DropKey rate: the probability that an attention score drops.
    #[serde(default = "EnsembleConfig::drop_key_default")]
    pub drop_key: f32,
}

impl EnsembleConfig {
    /// The paper's p_drop for MC Dropout.
    pub const DROP_KEY: f32 = 0.2;

    fn drop_key_default() -> f32 {
        EnsembleConfig::DROP_KEY
    }

    /// Check the ensemble against the model it adapts.
    pub fn validate(&self, model: &VitConfig) -> Result<()> {
        model.validate()?;
        if self.members == 0 {
            return Err(NnError::Config(
                "the ensemble needs at least 1 member (--members, or EnsembleConfig::members)"
                    .into(),
            ));
        }
        if self.method.is_single() && self.members != 1 {
            return Err(NnError::Config(format!(
                "method {} has exactly 1 member, not {}",
                self.method, self.members
            )));
        }
        if self.classes < 2 {
            return Err(NnError::Config(format!(
                "a classifier needs at least 2 classes, got {}",
                self.classes
            )));
        }
        if self.method.uses_lora() {
            let r = self.lora.rank;
            if r == 0 {
                return Err(NnError::Config(
                    "LoRA rank must be at least 1 (--rank, or LoraConfig::rank)".into(),
                ));
            }
            if r > model.dim {
                return Err(NnError::Config(format!(
                    "LoRA rank {r} is above the model width {} (--rank, or LoraConfig::rank, must be at most {})",
                    model.dim, model.dim
                )));
            }
            // At scale 0 the adapters change nothing, and their gradients are all 0.
            if !self.lora.scale.is_finite()
                || self.lora.scale == 0.0
                || !self.lora.init_gain.is_finite()
                || self.lora.init_gain <= 0.0
            {
                return Err(NnError::Config(
                    "LoRA scale must be finite and not 0, and the init gain finite and positive"
                        .into(),
                ));
            }
        }
        let params = ParamCounts::estimate(model, self).total();
        if params > MAX_PARAMS {
            return Err(NnError::Config(format!(
                "{} (M = {}, {} classes) on {} would have {params:.2e} parameters, more \
                 than loren builds (at most {MAX_PARAMS:.2e}, 4 TiB of f32)",
                self.method, self.members, self.classes, model.name
            )));
        }
        if self.method.drops_keys() && !(0.0..1.0).contains(&self.drop_key) {
            return Err(NnError::Config(format!(
                "the DropKey rate must be at least 0 and below 1 (--drop-key, or EnsembleConfig::drop_key), got {}",
                self.drop_key
            )));
        }
        Ok(())
    }
}

/// What a training forward keeps for the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activations {
    /// Everything each op's backward reads: the fastest step.
    #[default]
    Keep,
    /// Only each block's input; the backward runs the block's forward again, one block at a
    /// time. A LoRA-Ensemble block keeps R·D instead of R·(7D + Dm + 4r + H + 4) elements per
    /// member (R rows, width D), for one more forward of the blocks' compute; the gradients are
    /// the same bit for bit.
    Recompute,
}

impl Activations {
    pub fn name(self) -> &'static str {
        match self {
            Activations::Keep => "keep",
            Activations::Recompute => "recompute",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The adapters' factor and initial gain, as a program sets them: at scale 0 the adapters
    /// would train nothing, which the command line refuses too.
    #[test]
    fn lora_scale_and_gain_out_of_range_are_refused() {
        let vit = VitConfig::tiny();
        let with = |scale: f32, init_gain: f32| EnsembleConfig {
            lora: LoraConfig {
                scale,
                init_gain,
                ..LoraConfig::default()
            },
            drop_key: EnsembleConfig::DROP_KEY,
            method: Method::Lora,
            members: 4,
            classes: 10,
        };
        assert!(with(1.0, 10.0).validate(&vit).is_ok());
        assert!(with(-0.5, 10.0).validate(&vit).is_ok());
        for (scale, gain) in [
            (0.0, 10.0),
            (-0.0, 10.0),
            (f32::NAN, 10.0),
            (1.0, 0.0),
            (1.0, f32::INFINITY),
        ] {
            let e = with(scale, gain).validate(&vit).unwrap_err().to_string();
            assert!(
                e.contains("LoRA scale must be finite and not 0"),
                "{scale}, {gain}: {e}"
            );
        }
    }
}
