//! Pretrained ViT weights from other libraries, renamed and reshaped into loren's backbone.
//!
//! Four naming schemes are recognised from the key names, each by its patch-embedding tensor,
//! under an optional prefix such as `vit.`, `module.` or `model.`:
//!
//! | scheme | patch embedding | attention | LayerNorm eps |
//! | --- | --- | --- | --- |
//! | loren (`loren pretrain`) | `patch_embed.weight` `[D, C·p·p]` | `blocks.N.attn.{q,k,v,o}` | the config's |
//! | timm | `patch_embed.proj.weight` `[D, C, p, p]` | `blocks.N.attn.qkv` (fused) and `.proj` | 1e-6 |
//! | Hugging Face `ViTModel` | `embeddings.patch_embeddings.projection.weight` | `encoder.layer.N.attention.attention.{query,key,value}`, `.attention.output.dense` (the hub's files; transformers 5's `state_dict()`: `layers.N.attention.{q,k,v,o}_proj`) | 1e-12 |
//! | torchvision `vit_b_*` | `conv_proj.weight` | `encoder.layers.encoder_layer_N.self_attention.in_proj_weight` (fused) and `.out_proj` | 1e-6 |
//!
//! The conversion:
//! - a fused `[3·D, D]` projection (and its `[3·D]` bias) splits into q, k and v, in that order;
//! - the patch convolution `[D, C, p, p]` flattens to `[D, C·p·p]`, which is the `(c, i, j)`
//!   order loren's patches use;
//! - the class token `[1, 1, D]` becomes `[D]` and position embeddings `[1, T, D]` become
//!   `[T, D]`; when the file's patch grid differs from the config's (weights for another image
//!   size), the grid is resampled by antialiased bicubic interpolation and the class token's
//!   embedding kept ([`posembed`]);
//! - classifier heads and poolers are ignored ([`schemes::is_ignorable`]).
//!
//! A tensor the config needs that is missing or misshapen is an error naming the file, the
//! source tensor and both shapes; a tensor loren's ViT has no place for (a deeper model, layer
//! scale, distillation tokens) is an error listing it, so a different architecture is never
//! loaded half-way. Files may be f32, f16 or bf16 ([`TensorFile`]).

pub mod posembed;
pub mod schemes;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::checkpoint::{Entry, TensorFile};
use crate::config::{Proj, VitConfig};
use crate::error::{NnError, Result};
use schemes::{Layout, Source, block_source, global_source, is_ignorable};

/// Written into an imported file's metadata, as `loren pretrain` writes it.
pub const BACKBONE_FORMAT: &str = "loren-backbone-v1";

/// A naming scheme of ViT weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Loren,
    Timm,
    HuggingFace,
    Torchvision,
}

impl Scheme {
    pub const ALL: [Scheme; 4] = [
        Scheme::Loren,
        Scheme::Timm,
        Scheme::HuggingFace,
        Scheme::Torchvision,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scheme::Loren => "loren",
            Scheme::Timm => "timm",
            Scheme::HuggingFace => "Hugging Face",
            Scheme::Torchvision => "torchvision",
        }
    }

    /// The tensor that identifies the scheme: its patch embedding.
    pub fn anchor(self) -> &'static str {
        match self {
            Scheme::Loren => "patch_embed.weight",
            Scheme::Timm => "patch_embed.proj.weight",
            Scheme::HuggingFace => "embeddings.patch_embeddings.projection.weight",
            Scheme::Torchvision => "conv_proj.weight",
        }
    }

    /// The LayerNorm epsilon the source library trains with (`None`: keep the config's).
    pub fn ln_eps(self) -> Option<f32> {
        match self {
            Scheme::Loren => None,
            Scheme::Timm | Scheme::Torchvision => Some(1e-6),
            Scheme::HuggingFace => Some(1e-12),
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A backbone in loren's names, ready for [`crate::Vit::load_backbone`].
#[derive(Debug)]
pub struct Imported {
    /// loren's names and shapes, without the group axis; errors name the source file.
    pub file: TensorFile,
    pub scheme: Scheme,
    /// The prefix the source's names carried (`""`, `"vit."`, `"module."`, …).
    pub prefix: String,
    /// The LayerNorm epsilon to run it with, when the scheme fixes one.
    pub ln_eps: Option<f32>,
    /// Whether the position embeddings were resampled to the config's patch grid.
    pub interpolated: bool,
}

/// The scheme of `file` and the prefix before its names.
pub fn detect(file: &TensorFile) -> Result<(Scheme, String)> {
    let mut found: Vec<(Scheme, String)> = Vec::new();
    for name in file.names() {
        for scheme in Scheme::ALL {
            let Some(prefix) = name.strip_suffix(scheme.anchor()) else {
                continue;
            };
            if prefix.is_empty() || prefix.ends_with('.') {
                found.push((scheme, prefix.to_string()));
            }
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(NnError::checkpoint(
            file.path(),
            format!(
                "cannot tell which ViT naming scheme it uses: no patch embedding named as timm \
                 ('patch_embed.proj.weight'), Hugging Face ('vit.embeddings.patch_embeddings.\
                 projection.weight'), torchvision ('conv_proj.weight') or loren \
                 ('patch_embed.weight') name it; it holds {}",
                sample_names(file.names(), 6)
            ),
        )),
        many => Err(NnError::checkpoint(
            file.path(),
            format!(
                "it holds more than one patch embedding ({}); give a file with one ViT",
                many.iter()
                    .map(|(s, p)| format!("'{p}{}'", s.anchor()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

/// `n` of `names` quoted, and how many there are in all.
fn sample_names<'a>(names: impl Iterator<Item = &'a str>, n: usize) -> String {
    let all: Vec<&str> = names.collect();
    let shown: Vec<String> = all.iter().take(n).map(|s| format!("'{s}'")).collect();
    let more = all.len().saturating_sub(n);
    match (all.len(), more) {
        (0, _) => "no tensors".to_string(),
        (_, 0) => format!("{} tensors: {}", all.len(), shown.join(", ")),
        _ => format!("{} tensors, e.g. {}", all.len(), shown.join(", ")),
    }
}

/// loren's backbone tensors for `vit`, as [`crate::Vit::backbone_tensors`] names and shapes
/// them (no group axis), in its order.
pub fn backbone_shapes(vit: &VitConfig) -> Vec<(String, Vec<usize>)> {
    let (d, mlp) = (vit.dim, vit.mlp_dim);
    let mut out = vec![
        (
            "patch_embed.weight".to_string(),
            vec![d, vit.patch_features()],
        ),
        ("patch_embed.bias".to_string(), vec![d]),
        ("cls_token".to_string(), vec![d]),
        ("pos_embed".to_string(), vec![vit.tokens(), d]),
    ];
    for i in 0..vit.depth {
        let p = format!("blocks.{i}");
        let mut add = |name: String, shape: Vec<usize>| out.push((format!("{p}.{name}"), shape));
        add("norm1.weight".into(), vec![d]);
        add("norm1.bias".into(), vec![d]);
        for proj in Proj::ALL {
            add(format!("attn.{}.weight", proj.name()), vec![d, d]);
            add(format!("attn.{}.bias", proj.name()), vec![d]);
        }
        add("norm2.weight".into(), vec![d]);
        add("norm2.bias".into(), vec![d]);
        add("mlp.fc1.weight".into(), vec![mlp, d]);
        add("mlp.fc1.bias".into(), vec![mlp]);
        add("mlp.fc2.weight".into(), vec![d, mlp]);
        add("mlp.fc2.bias".into(), vec![d]);
    }
    out.push(("norm.weight".to_string(), vec![d]));
    out.push(("norm.bias".to_string(), vec![d]));
    out
}

/// Where our tensor `ours` comes from in `scheme`.
fn source_of(scheme: Scheme, ours: &str) -> Source {
    let block = ours.strip_prefix("blocks.").and_then(|rest| {
        let (i, rest) = rest.split_once('.')?;
        Some((i.parse::<usize>().ok()?, rest))
    });
    match block {
        Some((i, rest)) => block_source(scheme, i, rest),
        None => global_source(scheme, ours),
    }
}

/// Convert `file` (any recognised scheme) into loren's backbone for `vit`.
pub fn import_backbone(file: TensorFile, vit: &VitConfig) -> Result<Imported> {
    vit.validate()?;
    let (scheme, prefix) = detect(&file)?;
    let mut reader = Reader {
        file,
        prefix: prefix.clone(),
        scheme,
        used: BTreeSet::new(),
        fused: HashMap::new(),
        interpolated: false,
    };
    let mut tensors = BTreeMap::new();
    for (ours, shape) in backbone_shapes(vit) {
        let entry = reader.convert(&ours, &shape, vit)?;
        tensors.insert(ours, entry);
    }
    reader.reject_unused(vit)?;
    let meta = HashMap::from([
        ("format".to_string(), BACKBONE_FORMAT.to_string()),
        ("imported_from".to_string(), scheme.name().to_string()),
    ]);
    let path = reader.file.path().to_path_buf();
    Ok(Imported {
        file: TensorFile::from_entries(&path, tensors, meta),
        scheme,
        prefix,
        ln_eps: scheme.ln_eps(),
        interpolated: reader.interpolated,
    })
}

/// The source file being taken apart, and what has been taken from it.
struct Reader {
    file: TensorFile,
    prefix: String,
    scheme: Scheme,
    used: BTreeSet<String>,
    /// Fused q/k/v tensors, kept after their first use for the other two thirds.
    fused: HashMap<String, Entry>,
    interpolated: bool,
}

impl Reader {
    fn err(&self, msg: String) -> NnError {
        NnError::checkpoint(self.file.path(), msg)
    }

    /// The first of `names` (under the prefix) the file holds.
    fn find(&self, ours: &str, names: &[String]) -> Result<String> {
        let full: Vec<String> = names
            .iter()
            .map(|n| format!("{}{n}", self.prefix))
            .collect();
        if let Some(hit) = full
            .iter()
            .find(|n| self.file.contains(n) || self.fused.contains_key(*n))
        {
            return Ok(hit.clone());
        }
        let quoted: Vec<String> = full.iter().map(|n| format!("'{n}'")).collect();
        Err(self.err(format!(
            "tensor {} is missing ({} naming, for loren's '{ours}')",
            quoted.join(" or "),
            self.scheme
        )))
    }

    fn convert(&mut self, ours: &str, shape: &[usize], vit: &VitConfig) -> Result<Entry> {
        let source = source_of(self.scheme, ours);
        let name = self.find(ours, &source.names)?;
        self.used.insert(name.clone());
        if let Layout::Fused(k) = source.layout {
            return self.third(&name, k, ours, shape);
        }
        let e = self.file.take(&name)?;
        let mismatch = |want: Vec<usize>| -> NnError {
            self.err(format!(
                "tensor '{name}' has shape {:?}, expected {want:?} (for loren's '{ours}' in config '{}')",
                e.shape, vit.name
            ))
        };
        let data = match source.layout {
            Layout::Same if e.shape == shape => e.data,
            Layout::Same => return Err(mismatch(shape.to_vec())),
            Layout::Conv => {
                let want = vec![vit.dim, vit.channels, vit.patch, vit.patch];
                if e.shape != want {
                    return Err(mismatch(want));
                }
                e.data
            }
            Layout::Token if is_token(&e.shape, vit.dim) => e.data,
            Layout::Token => return Err(mismatch(vec![1, 1, vit.dim])),
            Layout::Pos if is_pos(&e.shape, vit.dim) => self.pos(e.data, &name, vit)?,
            Layout::Pos => return Err(mismatch(vec![1, vit.tokens(), vit.dim])),
            Layout::Fused(_) => unreachable!("handled above"),
        };
        Ok(Entry {
            shape: shape.to_vec(),
            data,
        })
    }

    /// Third `k` (q, k or v) of the fused tensor `name`.
    fn third(&mut self, name: &str, k: usize, ours: &str, shape: &[usize]) -> Result<Entry> {
        if !self.fused.contains_key(name) {
            let e = self.file.take(name)?;
            self.fused.insert(name.to_string(), e);
        }
        let e = &self.fused[name];
        let mut want = shape.to_vec();
        want[0] *= 3;
        if e.shape != want {
            return Err(self.err(format!(
                "tensor '{name}' has shape {:?}, expected {want:?} (q, k and v fused, for loren's '{ours}')",
                e.shape
            )));
        }
        let len: usize = shape.iter().product();
        Ok(Entry {
            shape: shape.to_vec(),
            data: e.data[k * len..(k + 1) * len].to_vec(),
        })
    }

    /// Position embeddings as `[T, D]` for the config's grid, resampled when the file's differs.
    fn pos(&mut self, data: Vec<f32>, name: &str, vit: &VitConfig) -> Result<Vec<f32>> {
        if data.len() == vit.tokens() * vit.dim {
            return Ok(data);
        }
        let grid = vit.image_size / vit.patch;
        self.interpolated = true;
        posembed::resample_pos_embed(&data, vit.dim, grid)
            .map_err(|msg| self.err(format!("tensor '{name}': {msg}")))
    }

    /// Every tensor left in the file must be one loren may ignore.
    fn reject_unused(&self, vit: &VitConfig) -> Result<()> {
        let left: Vec<&str> = self
            .file
            .names()
            .filter(|n| !self.used.contains(*n))
            .filter(|n| {
                let bare = n.strip_prefix(self.prefix.as_str()).unwrap_or(n);
                !is_ignorable(n) && !is_ignorable(bare)
            })
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        Err(self.err(format!(
            "{} has no place in loren's ViT for config '{}' (depth {}, width {}): is it another \
             architecture or size? Left over: {}",
            self.scheme,
            vit.name,
            vit.depth,
            vit.dim,
            sample_names(left.into_iter(), 5)
        )))
    }
}

/// A token's shape: `[D]`, `[1, D]` or `[1, 1, D]`.
fn is_token(shape: &[usize], dim: usize) -> bool {
    matches!(shape, [d] | [1, d] | [1, 1, d] if *d == dim)
}

/// Position embeddings' shape: `[T, D]` or `[1, T, D]`.
fn is_pos(shape: &[usize], dim: usize) -> bool {
    matches!(shape, [_, d] | [1, _, d] if *d == dim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_token_and_pos_shapes() {
        assert!(is_token(&[4], 4) && is_token(&[1, 4], 4) && is_token(&[1, 1, 4], 4));
        assert!(!is_token(&[2, 4], 4) && !is_token(&[1, 1, 5], 4) && !is_token(&[], 4));
        assert!(is_pos(&[1, 17, 4], 4) && is_pos(&[17, 4], 4));
        assert!(!is_pos(&[2, 17, 4], 4) && !is_pos(&[17, 5], 4) && !is_pos(&[4], 4));
    }

    #[test]
    fn import_backbone_shapes_match_the_model() {
        use crate::config::{EnsembleConfig, LoraConfig, Method};
        let vit = VitConfig::tiny();
        let ens = EnsembleConfig {
            drop_key: EnsembleConfig::DROP_KEY,
            method: Method::Lora,
            members: 2,
            classes: 3,
            lora: LoraConfig::default(),
        };
        let model = crate::Vit::new(&vit, &ens, &loren_tensor::Device::cpu(), 0).unwrap();
        let theirs: Vec<(String, Vec<usize>)> = model
            .backbone_tensors()
            .unwrap()
            .into_iter()
            .map(|(n, e)| (n, e.shape))
            .collect();
        assert_eq!(backbone_shapes(&vit), theirs);
    }
}
