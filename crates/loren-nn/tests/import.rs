//! Pretrained weights in timm, Hugging Face and torchvision naming: small files written here with
//! the names and layouts those libraries use (spelled out independently of the importer's
//! tables), read back through the importer, and every tensor checked against what was written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use loren_nn::checkpoint::{Entry, TensorFile};
use loren_nn::config::{EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::import::posembed::resample_pos_embed;
use loren_nn::import::{Imported, Scheme, backbone_shapes, import_backbone};
use loren_nn::vit::Vit;
use loren_tensor::{Device, Rng};
use safetensors::tensor::{Dtype, TensorView};

/// A small ViT: 16×16 RGB images in 4×4 patches (a 4×4 grid, 17 tokens), width 8, depth 2.
fn small() -> VitConfig {
    VitConfig {
        name: "small".into(),
        image_size: 16,
        channels: 3,
        patch: 4,
        dim: 8,
        depth: 2,
        heads: 2,
        mlp_dim: 16,
        ln_eps: 1e-6,
    }
}

const D: usize = 8;

type Tensors = BTreeMap<String, Entry>;

/// Random values that f16 and bf16 hold exactly (multiples of 1/64 in [-1, 1]), so files of
/// every dtype can be checked for equality.
fn values(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.uniform(-64.0, 64.0).round()) / 64.0)
        .collect()
}

/// loren's backbone for `vit`, random.
fn truth(vit: &VitConfig, seed: u64) -> Tensors {
    let mut rng = Rng::new(seed);
    backbone_shapes(vit)
        .into_iter()
        .map(|(name, shape)| {
            let data = values(shape.iter().product(), &mut rng);
            (name, Entry { shape, data })
        })
        .collect()
}

fn entry(shape: &[usize], data: Vec<f32>) -> Entry {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    Entry {
        shape: shape.to_vec(),
        data,
    }
}

/// Helpers to write loren's tensors under another library's names.
struct Writer<'a> {
    truth: &'a Tensors,
    out: Tensors,
    prefix: &'a str,
}

impl Writer<'_> {
    fn data(&self, ours: &str) -> Vec<f32> {
        self.truth[ours].data.clone()
    }

    fn put(&mut self, name: &str, shape: &[usize], data: Vec<f32>) {
        self.out
            .insert(format!("{}{name}", self.prefix), entry(shape, data));
    }

    /// Our tensor as it is, under `name`.
    fn same(&mut self, name: &str, ours: &str) {
        let shape = self.truth[ours].shape.clone();
        self.put(name, &shape, self.data(ours));
    }

    fn linear(&mut self, name: &str, ours: &str) {
        self.same(&format!("{name}.weight"), &format!("{ours}.weight"));
        self.same(&format!("{name}.bias"), &format!("{ours}.bias"));
    }

    /// q, k and v of block `i` stacked into one `[3D, D]` weight and `[3D]` bias.
    fn fused(&mut self, weight: &str, bias: &str, i: usize) {
        let cat = |wb: &str| -> Vec<f32> {
            ["q", "k", "v"]
                .iter()
                .flat_map(|p| self.data(&format!("blocks.{i}.attn.{p}.{wb}")))
                .collect()
        };
        let (w, b) = (cat("weight"), cat("bias"));
        self.put(weight, &[3 * D, D], w);
        self.put(bias, &[3 * D], b);
    }

    fn conv(&mut self, name: &str, vit: &VitConfig) {
        let shape = [vit.dim, vit.channels, vit.patch, vit.patch];
        self.put(name, &shape, self.data("patch_embed.weight"));
    }

    fn tokens(&mut self, cls: &str, pos: &str, vit: &VitConfig) {
        self.put(cls, &[1, 1, D], self.data("cls_token"));
        self.put(pos, &[1, vit.tokens(), D], self.data("pos_embed"));
    }
}

/// The tensors as timm's `VisionTransformer` names them, plus its classifier head.
fn timm(truth: &Tensors, vit: &VitConfig, prefix: &str) -> Tensors {
    let mut w = Writer {
        truth,
        out: Tensors::new(),
        prefix,
    };
    w.conv("patch_embed.proj.weight", vit);
    w.same("patch_embed.proj.bias", "patch_embed.bias");
    w.tokens("cls_token", "pos_embed", vit);
    for i in 0..vit.depth {
        let b = format!("blocks.{i}");
        w.linear(&format!("{b}.norm1"), &format!("{b}.norm1"));
        w.fused(
            &format!("{b}.attn.qkv.weight"),
            &format!("{b}.attn.qkv.bias"),
            i,
        );
        w.linear(&format!("{b}.attn.proj"), &format!("{b}.attn.o"));
        w.linear(&format!("{b}.norm2"), &format!("{b}.norm2"));
        w.linear(&format!("{b}.mlp.fc1"), &format!("{b}.mlp.fc1"));
        w.linear(&format!("{b}.mlp.fc2"), &format!("{b}.mlp.fc2"));
    }
    w.linear("norm", "norm");
    w.put("head.weight", &[5, D], vec![0.5; 5 * D]);
    w.put("head.bias", &[5], vec![0.5; 5]);
    w.out
}

/// As Hugging Face's `ViTForImageClassification` names them: `vit.` before the backbone and a
/// `classifier` beside it, a pooler too.
fn hugging_face(truth: &Tensors, vit: &VitConfig) -> Tensors {
    let mut w = Writer {
        truth,
        out: Tensors::new(),
        prefix: "vit.",
    };
    w.conv("embeddings.patch_embeddings.projection.weight", vit);
    w.same(
        "embeddings.patch_embeddings.projection.bias",
        "patch_embed.bias",
    );
    w.tokens(
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        vit,
    );
    for i in 0..vit.depth {
        let (l, b) = (format!("encoder.layer.{i}"), format!("blocks.{i}"));
        w.linear(&format!("{l}.layernorm_before"), &format!("{b}.norm1"));
        w.linear(
            &format!("{l}.attention.attention.query"),
            &format!("{b}.attn.q"),
        );
        w.linear(
            &format!("{l}.attention.attention.key"),
            &format!("{b}.attn.k"),
        );
        w.linear(
            &format!("{l}.attention.attention.value"),
            &format!("{b}.attn.v"),
        );
        w.linear(
            &format!("{l}.attention.output.dense"),
            &format!("{b}.attn.o"),
        );
        w.linear(&format!("{l}.layernorm_after"), &format!("{b}.norm2"));
        w.linear(&format!("{l}.intermediate.dense"), &format!("{b}.mlp.fc1"));
        w.linear(&format!("{l}.output.dense"), &format!("{b}.mlp.fc2"));
    }
    w.linear("layernorm", "norm");
    w.put("pooler.dense.weight", &[D, D], vec![0.25; D * D]);
    w.put("pooler.dense.bias", &[D], vec![0.25; D]);
    w.prefix = "";
    w.put("classifier.weight", &[3, D], vec![0.5; 3 * D]);
    w.put("classifier.bias", &[3], vec![0.5; 3]);
    w.out
}

/// As torchvision's `vit_b_*` state dict names them; the last block uses the MLP names of
/// torchvision's older files (`linear_1`, `linear_2`), which its loader still accepts.
fn torchvision(truth: &Tensors, vit: &VitConfig) -> Tensors {
    let mut w = Writer {
        truth,
        out: Tensors::new(),
        prefix: "",
    };
    w.conv("conv_proj.weight", vit);
    w.same("conv_proj.bias", "patch_embed.bias");
    w.tokens("class_token", "encoder.pos_embedding", vit);
    for i in 0..vit.depth {
        let (l, b) = (
            format!("encoder.layers.encoder_layer_{i}"),
            format!("blocks.{i}"),
        );
        w.linear(&format!("{l}.ln_1"), &format!("{b}.norm1"));
        w.fused(
            &format!("{l}.self_attention.in_proj_weight"),
            &format!("{l}.self_attention.in_proj_bias"),
            i,
        );
        w.linear(
            &format!("{l}.self_attention.out_proj"),
            &format!("{b}.attn.o"),
        );
        w.linear(&format!("{l}.ln_2"), &format!("{b}.norm2"));
        let (fc1, fc2) = if i + 1 == vit.depth {
            ("mlp.linear_1", "mlp.linear_2")
        } else {
            ("mlp.0", "mlp.3")
        };
        w.linear(&format!("{l}.{fc1}"), &format!("{b}.mlp.fc1"));
        w.linear(&format!("{l}.{fc2}"), &format!("{b}.mlp.fc2"));
    }
    w.linear("encoder.ln", "norm");
    w.put("heads.head.weight", &[4, D], vec![0.5; 4 * D]);
    w.put("heads.head.bias", &[4], vec![0.5; 4]);
    w.out
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loren-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.safetensors"))
}

/// Write `tensors` in `dtype` to a safetensors file.
fn write(name: &str, tensors: &Tensors, dtype: Dtype) -> PathBuf {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, e)| {
            let b = match dtype {
                Dtype::F32 => e.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => e
                    .data
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::BF16 => e
                    .data
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                other => panic!("no writer for {other:?}"),
            };
            (n.clone(), e.shape.clone(), b)
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| (n.as_str(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    let path = temp(name);
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

fn import(path: &Path, vit: &VitConfig) -> loren_nn::Result<Imported> {
    import_backbone(TensorFile::read(path)?, vit)
}

fn assert_is_truth(imported: &Imported, truth: &Tensors) {
    assert_eq!(imported.file.names().count(), truth.len());
    for (name, e) in truth {
        let got = imported.file.get(name).unwrap();
        assert_eq!(got.shape, e.shape, "{name}");
        assert!(got.data == e.data, "{name} differs from what was written");
    }
}

#[test]
fn every_scheme_imports_to_exactly_the_written_weights() {
    let vit = small();
    let t = truth(&vit, 1);
    let cases = [
        (
            "timm",
            timm(&t, &vit, "module."),
            Dtype::F32,
            Scheme::Timm,
            "module.",
            1e-6,
        ),
        (
            "hf",
            hugging_face(&t, &vit),
            Dtype::F16,
            Scheme::HuggingFace,
            "vit.",
            1e-12,
        ),
        (
            "tv",
            torchvision(&t, &vit),
            Dtype::BF16,
            Scheme::Torchvision,
            "",
            1e-6,
        ),
    ];
    for (name, tensors, dtype, scheme, prefix, eps) in cases {
        let imported = import(&write(name, &tensors, dtype), &vit).unwrap();
        assert_eq!(
            (imported.scheme, imported.prefix.as_str()),
            (scheme, prefix)
        );
        assert_eq!(imported.ln_eps, Some(eps));
        assert!(!imported.interpolated);
        assert_is_truth(&imported, &t);
        // And the model takes it: its backbone is then exactly the written one.
        let ens = EnsembleConfig {
            drop_key: EnsembleConfig::DROP_KEY,
            method: Method::Lora,
            members: 2,
            classes: 3,
            lora: LoraConfig::default(),
        };
        let mut model = Vit::new(&vit, &ens, &Device::cpu(), 0).unwrap();
        model.load_backbone(&imported.file).unwrap();
        for (n, e) in model.backbone_tensors().unwrap() {
            assert!(e == t[&n], "{name}: model tensor {n}");
        }
    }
    // loren's own names pass through unchanged, the config's eps kept.
    let path = write("loren", &t, Dtype::F32);
    let imported = import(&path, &vit).unwrap();
    assert_eq!((imported.scheme, imported.ln_eps), (Scheme::Loren, None));
    assert_is_truth(&imported, &t);
}

#[test]
fn position_embeddings_for_another_image_size_are_resampled() {
    let vit = small();
    let t = truth(&vit, 2);
    let mut tensors = timm(&t, &vit, "");
    // Weights for 32×32 images: an 8×8 grid, 65 tokens.
    let big = VitConfig {
        image_size: 32,
        ..small()
    };
    let pos = values(big.tokens() * D, &mut Rng::new(3));
    tensors.insert(
        "pos_embed".into(),
        entry(&[1, big.tokens(), D], pos.clone()),
    );
    let imported = import(&write("timm-32", &tensors, Dtype::F32), &vit).unwrap();
    assert!(imported.interpolated);
    let got = imported.file.get("pos_embed").unwrap();
    assert_eq!(got.shape, vec![vit.tokens(), D]);
    assert_eq!(
        &got.data[..D],
        &pos[..D],
        "the class token's embedding is kept"
    );
    assert_eq!(got.data, resample_pos_embed(&pos, D, 4).unwrap());
    // Each embedding dimension constant over the grid stays that constant.
    let flat: Vec<f32> = (0..big.tokens() * D)
        .map(|i| (i % D) as f32 / 8.0)
        .collect();
    tensors.insert("pos_embed".into(), entry(&[1, big.tokens(), D], flat));
    let imported = import(&write("timm-32-flat", &tensors, Dtype::F32), &vit).unwrap();
    for (i, v) in imported
        .file
        .get("pos_embed")
        .unwrap()
        .data
        .iter()
        .enumerate()
    {
        assert!((v - (i % D) as f32 / 8.0).abs() < 1e-6, "element {i}: {v}");
    }
    // Every other tensor is untouched.
    for (name, e) in &t {
        if name != "pos_embed" {
            assert_eq!(imported.file.get(name).unwrap(), e, "{name}");
        }
    }
}

/// The import error for `tensors` (timm naming, changed by `change`), as text.
fn error_after(name: &str, change: impl FnOnce(&mut Tensors)) -> String {
    let vit = small();
    let mut tensors = timm(&truth(&vit, 4), &vit, "");
    change(&mut tensors);
    let path = write(name, &tensors, Dtype::F32);
    let e = import(&path, &vit).unwrap_err().to_string();
    assert!(
        e.contains(&format!("{name}.safetensors")),
        "the file is named: {e}"
    );
    e
}

#[test]
fn a_missing_tensor_is_named() {
    let e = error_after("missing", |t| {
        t.remove("blocks.1.attn.qkv.weight");
    });
    assert!(
        e.contains("'blocks.1.attn.qkv.weight' is missing") && e.contains("blocks.1.attn.q.weight"),
        "{e}"
    );
    let e = error_after("missing-norm", |t| {
        t.remove("norm.bias");
    });
    assert!(e.contains("'norm.bias' is missing"), "{e}");
}

#[test]
fn a_misshapen_tensor_is_named_with_both_shapes() {
    let e = error_after("fc1", |t| {
        t.insert(
            "blocks.0.mlp.fc1.weight".into(),
            entry(&[16, 9], vec![0.0; 144]),
        );
    });
    assert!(
        e.contains("'blocks.0.mlp.fc1.weight'") && e.contains("[16, 9]") && e.contains("[16, 8]"),
        "{e}"
    );
    let e = error_after("qkv", |t| {
        t.insert(
            "blocks.0.attn.qkv.weight".into(),
            entry(&[2 * D, D], vec![0.0; 2 * D * D]),
        );
    });
    assert!(
        e.contains("'blocks.0.attn.qkv.weight'") && e.contains("[16, 8]") && e.contains("[24, 8]"),
        "{e}"
    );
    // Weights for another patch size.
    let e = error_after("patch", |t| {
        t.insert(
            "patch_embed.proj.weight".into(),
            entry(&[D, 3, 2, 2], vec![0.0; D * 12]),
        );
    });
    assert!(
        e.contains("[8, 3, 2, 2]") && e.contains("[8, 3, 4, 4]"),
        "{e}"
    );
    let e = error_after("cls", |t| {
        t.insert("cls_token".into(), entry(&[1, 2, D], vec![0.0; 2 * D]));
    });
    assert!(e.contains("'cls_token'") && e.contains("[1, 2, 8]"), "{e}");
    let e = error_after("grid", |t| {
        t.insert("pos_embed".into(), entry(&[1, 11, D], vec![0.0; 11 * D]));
    });
    assert!(
        e.contains("'pos_embed'") && e.contains("11 position embeddings"),
        "{e}"
    );
}

#[test]
fn tensors_the_model_has_no_place_for_are_listed() {
    let e = error_after("extra", |t| {
        t.insert("blocks.2.norm1.weight".into(), entry(&[D], vec![1.0; D]));
        t.insert("blocks.0.ls1.gamma".into(), entry(&[D], vec![1.0; D]));
    });
    assert!(
        e.contains("'blocks.2.norm1.weight'")
            && e.contains("'blocks.0.ls1.gamma'")
            && e.contains("depth 2"),
        "{e}"
    );
    // A config deeper than the file: the first missing block is named.
    let vit = small();
    let path = write("shallow", &timm(&truth(&vit, 5), &vit, ""), Dtype::F32);
    let deep = VitConfig {
        depth: 3,
        ..small()
    };
    let e = import(&path, &deep).unwrap_err().to_string();
    assert!(e.contains("'blocks.2.norm1.weight' is missing"), "{e}");
}

#[test]
fn an_unknown_scheme_lists_the_keys_it_saw() {
    let mut t = Tensors::new();
    t.insert("encoder.weird.0".into(), entry(&[2], vec![0.0; 2]));
    t.insert("stem.conv.weight".into(), entry(&[2], vec![0.0; 2]));
    let e = import(&write("unknown", &t, Dtype::F32), &small())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown.safetensors")
            && e.contains("naming scheme")
            && e.contains("'encoder.weird.0'")
            && e.contains("'stem.conv.weight'"),
        "{e}"
    );
}

#[test]
fn unreadable_files_are_named() {
    let vit = small();
    let path = write("cut", &timm(&truth(&vit, 6), &vit, ""), Dtype::F32);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
    let e = import(&path, &vit).unwrap_err().to_string();
    assert!(
        e.contains("cut.safetensors") && e.contains("truncated: its header describes"),
        "{e}"
    );
    // An integer tensor.
    let raw = vec![0u8; 8];
    let views = vec![(
        "patch_embed.proj.weight",
        TensorView::new(Dtype::I32, vec![2], &raw).unwrap(),
    )];
    let path = temp("ints");
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    let e = import(&path, &vit).unwrap_err().to_string();
    assert!(e.contains("ints.safetensors") && e.contains("I32"), "{e}");
}
