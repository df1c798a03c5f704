//! Imported weights give the source library's own logits. The fixtures in
//! `fixtures/reference-vits/` were written by `scripts/reference-vits.py` with timm,
//! torchvision and Hugging Face transformers (versions in each file's metadata): a small random
//! ViT of each library, its state_dict as the library saves it, fixed images and the logits of
//! the library's forward on them. loren imports the state_dict, takes the library's classifier
//! as its head and must give the same logits to f32 rounding. Where the naming tests in
//! `import.rs` check that tensors land under the documented names, this checks the numbers
//! against the real model code: the qkv split, the patch flattening order, the class token and
//! position embeddings, the LayerNorm epsilon, the GELU and the final norm, and timm's
//! position-embedding resampling when the image size changes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use loren_autograd::Tape;
use loren_nn::checkpoint::{Entry, TensorFile};
use loren_nn::config::{Activations, EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::import::{Scheme, import_backbone};
use loren_nn::vit::{Draw, Vit};
use loren_tensor::{Device, MemTag, Tensor};

/// The models the script builds: 16×16 RGB in 4×4 patches, width 32, depth 2, 2 heads, MLP 64,
/// 5 classes. The epsilon here is a placeholder the import must replace with the library's.
fn config(image_size: usize) -> VitConfig {
    VitConfig {
        name: "reference".into(),
        image_size,
        channels: 3,
        patch: 4,
        dim: 32,
        depth: 2,
        heads: 2,
        mlp_dim: 64,
        ln_eps: 0.5,
    }
}

const CLASSES: usize = 5;

fn fixture(name: &str) -> TensorFile {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests/fixtures/reference-vits",
        name,
    ]
    .iter()
    .collect();
    TensorFile::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The logits loren computes for `io`'s images with the library's weights and classifier,
/// after checking that the import recognised `scheme` and resampled the position embeddings
/// exactly when the image size differs from the checkpoint's.
fn loren_logits(weights: &str, io: &TensorFile, scheme: Scheme, image_size: usize) -> Vec<f32> {
    let mut vit = config(image_size);
    let imported = import_backbone(fixture(weights), &vit).unwrap();
    assert_eq!(imported.scheme, scheme, "{weights}");
    assert_eq!(imported.interpolated, image_size != 16, "{weights}");
    vit.ln_eps = imported
        .ln_eps
        .expect("a library's scheme fixes its epsilon");
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method: Method::Single,
        members: 1,
        classes: CLASSES,
        lora: LoraConfig::default(),
    };
    let dev = Device::cpu();
    let mut model = Vit::new(&vit, &ens, &dev, 7).unwrap();
    model.load_backbone(&imported.file).unwrap();
    model
        .load_tensors(&head(io), |name, _| name.starts_with("head."))
        .unwrap();
    let images = io.get("images").unwrap();
    let x = Tensor::from_vec(
        images.data.clone(),
        images.shape.clone(),
        MemTag::Activations,
        &dev,
    )
    .unwrap();
    let logits = model
        .forward(
            &Tape::inference(),
            &x,
            Activations::Keep,
            Draw::prediction(0, None),
        )
        .unwrap();
    logits.value().to_vec().unwrap()
}

/// The library's classifier as loren's one-member head: `head.weight` [1, C, D], `head.bias`
/// [1, C].
fn head(io: &TensorFile) -> TensorFile {
    let mut t = BTreeMap::new();
    for name in ["head.weight", "head.bias"] {
        let e = io.get(name).unwrap();
        let shape = std::iter::once(1).chain(e.shape.iter().copied()).collect();
        let data = e.data.clone();
        t.insert(name.to_string(), Entry { shape, data });
    }
    TensorFile::from_entries(Path::new("head"), t, HashMap::new())
}

/// Largest |loren − library| over all logits, relative to the largest library logit.
fn assert_same_logits(what: &str, ours: &[f32], io: &TensorFile) {
    let theirs = &io.get("logits").unwrap().data;
    assert_eq!(ours.len(), theirs.len(), "{what}: logit count");
    let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .max_by(f32::total_cmp)
        .unwrap_or(0.0);
    // f32 end to end on both sides: only summation order differs.
    assert!(
        err <= 1e-5 * scale.max(1.0),
        "{what}: loren's logits differ from the library's by up to {err:e} (largest logit \
         {scale}):\n  loren   {ours:?}\n  library {theirs:?}"
    );
}

#[test]
fn timm_weights_give_timms_logits() {
    let io = fixture("timm-io.safetensors");
    let ours = loren_logits("timm.safetensors", &io, Scheme::Timm, 16);
    assert_same_logits("timm", &ours, &io);
}

#[test]
fn torchvision_weights_give_torchvisions_logits() {
    let io = fixture("torchvision-io.safetensors");
    let ours = loren_logits("torchvision.safetensors", &io, Scheme::Torchvision, 16);
    assert_same_logits("torchvision", &ours, &io);
}

/// Both namings: the hub's (`save_pretrained`), and transformers 5's `state_dict()`.
#[test]
fn hugging_face_weights_give_transformers_logits() {
    let io = fixture("hf-io.safetensors");
    for file in ["hf.safetensors", "hf-state-dict.safetensors"] {
        let ours = loren_logits(file, &io, Scheme::HuggingFace, 16);
        assert_same_logits(file, &ours, &io);
    }
}

/// A 16-pixel checkpoint used at 24 and 12 pixels: the position embeddings resampled to a 6×6
/// and a 3×3 grid as timm's `resample_abs_pos_embed` does (bicubic, antialiased).
#[test]
fn timm_weights_at_another_image_size_give_timms_resampled_logits() {
    let io = fixture("timm-io.safetensors");
    for size in [24, 12] {
        let at = fixture(&format!("timm-{size}-io.safetensors"));
        let ours = loren_logits("timm.safetensors", &with_head(&at, &io), Scheme::Timm, size);
        assert_same_logits(&format!("timm at {size} pixels"), &ours, &at);
    }
}

/// `at`'s images and logits with `io`'s classifier (the script writes the head once).
fn with_head(at: &TensorFile, io: &TensorFile) -> TensorFile {
    let mut t = BTreeMap::new();
    for (file, names) in [
        (at, ["images", "logits"]),
        (io, ["head.weight", "head.bias"]),
    ] {
        for name in names {
            t.insert(name.to_string(), file.get(name).unwrap().clone());
        }
    }
    TensorFile::from_entries(Path::new("io"), t, HashMap::new())
}
