//! Where each of loren's backbone tensors lives in the other naming schemes.

use super::Scheme;

/// How a source tensor becomes ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The same shape.
    Same,
    /// A convolution weight `[D, C, p, p]`, flattened to `[D, C·p·p]` (the order is already
    /// `(c, i, j)`).
    Conv,
    /// A token `[1, 1, D]` (or `[1, D]` or `[D]`) to `[D]`.
    Token,
    /// Position embeddings `[1, T', D]` (or `[T', D]`) to `[T, D]`, the patch grid
    /// interpolated when `T' ≠ T`.
    Pos,
    /// The `k`-th third (q, k, v) of a fused `[3·D, ...]` projection.
    Fused(usize),
}

/// One of our tensors: the source names to try, in order, and how to convert it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub names: Vec<String>,
    pub layout: Layout,
}

impl Source {
    fn new(names: &[String], layout: Layout) -> Source {
        Source {
            names: names.to_vec(),
            layout,
        }
    }
}

/// The source of our global (non-block) tensor `ours`, without any prefix.
pub fn global_source(scheme: Scheme, ours: &str) -> Source {
    use Layout::*;
    let (name, layout) = match (scheme, ours) {
        (Scheme::Loren, "cls_token") => ("cls_token", Token),
        (Scheme::Loren, "pos_embed") => ("pos_embed", Pos),
        (Scheme::Loren, other) => (other, Same),
        (Scheme::Timm, "patch_embed.weight") => ("patch_embed.proj.weight", Conv),
        (Scheme::Timm, "patch_embed.bias") => ("patch_embed.proj.bias", Same),
        (Scheme::Timm, "cls_token") => ("cls_token", Token),
        (Scheme::Timm, "pos_embed") => ("pos_embed", Pos),
        (Scheme::HuggingFace, "patch_embed.weight") => {
            ("embeddings.patch_embeddings.projection.weight", Conv)
        }
        (Scheme::HuggingFace, "patch_embed.bias") => {
            ("embeddings.patch_embeddings.projection.bias", Same)
        }
        (Scheme::HuggingFace, "cls_token") => ("embeddings.cls_token", Token),
        (Scheme::HuggingFace, "pos_embed") => ("embeddings.position_embeddings", Pos),
        (Scheme::Torchvision, "patch_embed.weight") => ("conv_proj.weight", Conv),
        (Scheme::Torchvision, "patch_embed.bias") => ("conv_proj.bias", Same),
        (Scheme::Torchvision, "cls_token") => ("class_token", Token),
        (Scheme::Torchvision, "pos_embed") => ("encoder.pos_embedding", Pos),
        (s, norm) => match norm.strip_prefix("norm.") {
            Some(wb) => {
                let name = match s {
                    Scheme::HuggingFace => format!("layernorm.{wb}"),
                    Scheme::Torchvision => format!("encoder.ln.{wb}"),
                    _ => format!("norm.{wb}"),
                };
                return Source::new(&[name], Same);
            }
            None => (norm, Same),
        },
    };
    Source::new(&[name.to_string()], layout)
}

/// The source of our tensor `rest` (e.g. `attn.q.weight`) in block `i`, without any prefix.
pub fn block_source(scheme: Scheme, i: usize, rest: &str) -> Source {
    let (module, wb) = rest.rsplit_once('.').unwrap_or((rest, ""));
    let fused = |k: usize| -> Layout { Layout::Fused(k) };
    let qkv = ["attn.q", "attn.k", "attn.v"]
        .iter()
        .position(|&m| m == module);
    let one = |name: String| Source::new(&[name], Layout::Same);
    match scheme {
        Scheme::Loren => one(format!("blocks.{i}.{rest}")),
        Scheme::Timm => {
            let p = format!("blocks.{i}");
            match (module, qkv) {
                (_, Some(k)) => Source::new(&[format!("{p}.attn.qkv.{wb}")], fused(k)),
                ("attn.o", _) => one(format!("{p}.attn.proj.{wb}")),
                _ => one(format!("{p}.{rest}")),
            }
        }
        Scheme::HuggingFace => {
            // The hub's files (and `save_pretrained`) keep transformers 4's names; transformers
            // 5 renames them on load, so its `state_dict()` has the second set.
            let (v4, v5) = match module {
                "norm1" => ("layernorm_before", "layernorm_before"),
                "attn.q" => ("attention.attention.query", "attention.q_proj"),
                "attn.k" => ("attention.attention.key", "attention.k_proj"),
                "attn.v" => ("attention.attention.value", "attention.v_proj"),
                "attn.o" => ("attention.output.dense", "attention.o_proj"),
                "norm2" => ("layernorm_after", "layernorm_after"),
                "mlp.fc1" => ("intermediate.dense", "mlp.fc1"),
                "mlp.fc2" => ("output.dense", "mlp.fc2"),
                other => (other, other),
            };
            let names = [
                format!("encoder.layer.{i}.{v4}.{wb}"),
                format!("layers.{i}.{v5}.{wb}"),
            ];
            Source::new(&names, Layout::Same)
        }
        Scheme::Torchvision => {
            let p = format!("encoder.layers.encoder_layer_{i}");
            if let Some(k) = qkv {
                return Source::new(&[format!("{p}.self_attention.in_proj_{wb}")], fused(k));
            }
            // torchvision renamed the MLP's layers; its loader still accepts the old names.
            let modules: &[&str] = match module {
                "norm1" => &["ln_1"],
                "attn.o" => &["self_attention.out_proj"],
                "norm2" => &["ln_2"],
                "mlp.fc1" => &["mlp.0", "mlp.linear_1"],
                "mlp.fc2" => &["mlp.3", "mlp.linear_2"],
                other => return one(format!("{p}.{other}.{wb}")),
            };
            let names: Vec<String> = modules.iter().map(|m| format!("{p}.{m}.{wb}")).collect();
            Source::new(&names, Layout::Same)
        }
    }
}

/// Tensors a backbone file may hold that loren's ViT does not use: classifier heads and
/// poolers, masked-modelling tokens, and the head `loren pretrain` stores for reference.
pub fn is_ignorable(name: &str) -> bool {
    const PREFIXES: [&str; 7] = [
        "head.",
        "heads.",
        "classifier.",
        "pooler.",
        "pre_logits.",
        "pretrain_head.",
        "embeddings.mask_token",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || name == "mask_token"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_scheme_tables_name_the_documented_tensors() {
        let s = block_source(Scheme::Timm, 3, "attn.k.bias");
        assert_eq!(s.names, vec!["blocks.3.attn.qkv.bias"]);
        assert_eq!(s.layout, Layout::Fused(1));
        let s = block_source(Scheme::HuggingFace, 0, "mlp.fc2.weight");
        assert_eq!(
            s.names,
            vec![
                "encoder.layer.0.output.dense.weight",
                "layers.0.mlp.fc2.weight"
            ]
        );
        let s = block_source(Scheme::Torchvision, 11, "attn.v.weight");
        assert_eq!(
            s.names,
            vec!["encoder.layers.encoder_layer_11.self_attention.in_proj_weight"]
        );
        assert_eq!(s.layout, Layout::Fused(2));
        let s = block_source(Scheme::Torchvision, 1, "mlp.fc1.bias");
        assert_eq!(
            s.names,
            vec![
                "encoder.layers.encoder_layer_1.mlp.0.bias",
                "encoder.layers.encoder_layer_1.mlp.linear_1.bias"
            ]
        );
        assert_eq!(
            global_source(Scheme::Torchvision, "norm.bias").names,
            vec!["encoder.ln.bias"]
        );
        assert_eq!(
            global_source(Scheme::HuggingFace, "pos_embed").names,
            vec!["embeddings.position_embeddings"]
        );
        assert_eq!(
            global_source(Scheme::Timm, "norm.weight").names,
            vec!["norm.weight"]
        );
        assert!(is_ignorable("heads.head.weight") && !is_ignorable("fc_norm.weight"));
    }
}
