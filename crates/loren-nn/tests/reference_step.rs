//! LoRA-Ensemble training steps against PyTorch. `scripts/reference-step.py` ran three steps of
//! the `tiny` LoRA-Ensemble (3 members, rank 4, batch 5) in PyTorch, with the model and step of
//! the CPU speed comparison (`benches/pytorch/lora_ensemble_step.py`), and saved the start, the
//! batches, the losses, every trainable tensor after the steps and the members' probabilities
//! (`fixtures/reference-step/`). loren's trainer, from the same start on the same batches, must
//! give the same numbers: forward, loss, every gradient (through the AdamW updates they drive),
//! clipping, weight decay, bias correction and the learning-rate schedule.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use loren_autograd::optim::OptimizerKind;
use loren_nn::checkpoint::TensorFile;
use loren_nn::config::{Activations, EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::Batch;
use loren_nn::train::{TrainConfig, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::{Device, MemTag, Tensor};

const MEMBERS: usize = 3;
const RANK: usize = 4;
/// The script's: 1 would hide a scale applied in the wrong place.
const LORA_SCALE: f32 = 2.0;
/// The script's: far above training's 0.01, so that decay where there should be none, or none
/// where there should be, moves elements by ~1e-3.
const WEIGHT_DECAY: f32 = 0.5;

fn fixture(name: &str) -> TensorFile {
    let path: PathBuf = [
        env!("CARGO_MANIFEST_DIR"),
        "tests/fixtures/reference-step",
        name,
    ]
    .iter()
    .collect();
    TensorFile::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The LoRA-Ensemble PyTorch started from.
fn lora_start(dev: &Device) -> Vit {
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method: Method::Lora,
        members: MEMBERS,
        classes: 10,
        lora: LoraConfig {
            rank: RANK,
            scale: LORA_SCALE,
            ..LoraConfig::default()
        },
    };
    let weights = fixture("weights.safetensors");
    let mut model = Vit::new(&VitConfig::tiny(), &ens, dev, 1).unwrap();
    model.load_backbone(&weights).unwrap();
    model
        .load_tensors(&weights, |name, _| !Vit::is_backbone(name))
        .unwrap();
    model
}

/// Batch `s` of the fixture's `images` [S, B, 1, 8, 8] and `labels` [S, B].
fn batch(steps: &TensorFile, s: usize) -> Batch {
    let images = steps.get("images").unwrap();
    let [_, b, c, h, w] = images.shape[..] else {
        panic!("images are {:?}", images.shape)
    };
    let n = b * c * h * w;
    let labels = &steps.get("labels").unwrap().data[s * b..(s + 1) * b];
    Batch {
        images: images.data[s * n..(s + 1) * n].to_vec(),
        labels: labels.iter().map(|&l| l as u32).collect(),
        batch: b,
        channels: c,
        height: h,
        width: w,
    }
}

/// Calls `check(name, id, theirs)` for each of the model's trainable tensors with the fixture's
/// `PREFIX.name` (same shape); the fixture must hold exactly those under `prefix`.
fn for_each_trainable(
    steps: &TensorFile,
    prefix: &str,
    model: &Vit,
    mut check: impl FnMut(&str, loren_autograd::ParamId, &[f32]),
) {
    let mut checked = 0;
    for (id, p) in model.params().iter().filter(|(_, p)| p.trainable()) {
        let name = p.name();
        let want = steps
            .get(&format!("{prefix}{name}"))
            .unwrap_or_else(|_| panic!("PyTorch has no trainable '{name}'"));
        assert_eq!(p.value().dims(), &want.shape[..], "{name}");
        check(name, id, &want.data);
        checked += 1;
    }
    let expected = steps.names().filter(|n| n.starts_with(prefix)).count();
    assert_eq!(checked, expected, "trainable tensors under '{prefix}'");
}

/// The fixture's tensors named `PREFIX.name`, as `name`.
fn renamed(file: &TensorFile, prefix: &str) -> TensorFile {
    let tensors = file
        .names()
        .filter_map(|n| {
            Some((
                n.strip_prefix(prefix)?.to_string(),
                file.get(n).ok()?.clone(),
            ))
        })
        .collect();
    TensorFile::from_entries(Path::new(prefix), tensors, HashMap::new())
}

/// Largest |ours − theirs|, and theirs' largest magnitude.
fn max_diff(ours: &[f32], theirs: &[f32]) -> (f32, f32) {
    assert_eq!(ours.len(), theirs.len());
    let diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .max_by(f32::total_cmp)
        .unwrap_or(0.0);
    (diff, theirs.iter().fold(0.0f32, |m, v| m.max(v.abs())))
}

#[test]
fn lora_ensemble_steps_match_pytorch() {
    let dev = Device::cpu();
    let mut model = lora_start(&dev);
    let steps = fixture("steps.safetensors");
    check_steps(&mut model, &steps, adamw(&steps), &dev);
}

/// SGD with momentum and L2 decay, on a schedule with a warmup and a floor: the script's
/// learning rates 0.25, 0.5, 0.5, 0.275 are loren's warmup-cosine at base 0.5, floor 0.05, 2
/// warmup steps of 4.
#[test]
fn lora_ensemble_sgd_steps_match_pytorch() {
    let dev = Device::cpu();
    let mut model = lora_start(&dev);
    let steps = fixture("sgd-steps.safetensors");
    let mut config = adamw(&steps);
    config.lr = 0.5;
    config.min_lr = 0.05;
    config.warmup_steps = 2;
    config.optimizer = OptimizerKind::Sgd {
        momentum: 0.9,
        weight_decay: 0.05,
    };
    check_steps(&mut model, &steps, config, &dev);
}

/// The AdamW runs' settings: weight decay 0.5, clipping at 1, torch's cosine over the fixture's
/// steps from its first learning rate (one epoch of S batches, so that loren's schedule spans
/// the S steps as torch's did).
fn adamw(steps: &TensorFile) -> TrainConfig {
    let lr0 = steps.get("lr").unwrap().data[0];
    let b = steps.get("labels").unwrap().shape[1];
    let mut config = TrainConfig::plain(b, lr0, Activations::Keep);
    config.optimizer = OptimizerKind::adamw(WEIGHT_DECAY);
    config.grad_clip = Some(1.0);
    config
}

/// M whole ViTs, every weight trained: the dW of every layer, the LayerNorms' and embeddings'
/// gradients, and the member axis on all of them, which LoRA's check leaves out.
#[test]
fn explicit_ensemble_steps_match_pytorch() {
    let dev = Device::cpu();
    let vit = VitConfig {
        name: "reference-explicit".into(),
        image_size: 8,
        channels: 1,
        patch: 2,
        dim: 32,
        depth: 2,
        heads: 2,
        mlp_dim: 64,
        ln_eps: 1e-6,
    };
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method: Method::Explicit,
        members: 2,
        classes: 10,
        lora: LoraConfig::default(),
    };
    let mut model = Vit::new(&vit, &ens, &dev, 1).unwrap();
    model
        .load_tensors(&fixture("explicit-weights.safetensors"), |_, _| true)
        .unwrap();
    let steps = fixture("explicit-steps.safetensors");
    check_steps(&mut model, &steps, adamw(&steps), &dev);
}

/// Trains `model` with `config` on the fixture's batches as PyTorch did and compares the losses,
/// the first step's gradients, the parameters after the steps and the members' probabilities
/// after them.
fn check_steps(model: &mut Vit, steps: &TensorFile, config: TrainConfig, dev: &Device) {
    let lrs = steps.get("lr").unwrap().data.clone();
    let s_count = lrs.len();
    let before = trainable_values(model);
    let mut trainer = Trainer::new(model, &config, s_count * config.batch_size).unwrap();
    let theirs = steps.get("loss").unwrap().data.clone();
    for (s, want) in theirs.iter().enumerate() {
        let loss = trainer.step(&batch(steps, s)).unwrap();
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs(),
            "step {s}: loss {loss}, PyTorch {want}"
        );
        if s == 0 {
            // Every gradient of the first step, clipped: f32 rounding apart, the same (7.2e-6 of
            // the largest at most, when written). The key bias's gradient is 0 in exact
            // arithmetic (softmax ignores a shift common to a row), so both sides hold rounding
            // there, measured against the clipped gradients' norm of 1.
            for_each_trainable(steps, "grad.", trainer.model(), |name, id, theirs| {
                let grad = trainer.grads().get(id).unwrap().to_vec().unwrap();
                let (diff, scale) = max_diff(&grad, theirs);
                let bound = if name.ends_with(".attn.k.bias") {
                    1e-7
                } else {
                    3e-5 * scale
                };
                assert!(
                    diff <= bound,
                    "{name}: gradient differs from PyTorch's by up to {diff:e} (largest {scale})"
                );
            });
        }
    }
    drop(trainer);

    match config.optimizer {
        OptimizerKind::AdamW { .. } => check_adam_after(model, steps, lrs[0]),
        OptimizerKind::Sgd { .. } => check_sgd_after(model, steps, &before),
    }

    // And what the trained members predict, from PyTorch's trained weights: the parameters
    // above carry the rounding the steps magnified, which this check of the forward should not.
    let trained = renamed(steps, "after.");
    model
        .load_tensors(&trained, |_, trainable| trainable)
        .unwrap();
    let x = batch(steps, 0);
    let images = Tensor::from_vec(
        x.images.clone(),
        x.image_shape().to_vec(),
        MemTag::Activations,
        dev,
    )
    .unwrap();
    let keys = model.image_keys(&x.images);
    let probs = model.predict(&images, &keys).unwrap().to_vec().unwrap();
    let (diff, _) = max_diff(&probs, &steps.get("probs").unwrap().data);
    assert!(
        diff <= 1e-6,
        "probabilities differ from PyTorch by up to {diff:e}"
    );
}

/// Every trainable tensor after Adam's steps, against PyTorch's.
fn check_adam_after(model: &Vit, steps: &TensorFile, lr: f32) {
    // Every trainable tensor after the steps. Adam moves an element by about the learning rate
    // per step whatever its gradient's size, so a gradient of the wrong sign, a wrong schedule or
    // decay (0.5 here: ~1e-3 on these tensors) leaves errors of 1e-3 to 1e-2 in many elements.
    // Rounding leaves less than 6.3e-5 (2e-2·lr is the bound), except where a gradient is within
    // rounding of 0: there Adam's g/(|g| + eps), eps = 1e-8, turns rounding into moves of up to
    // the learning rate, on both sides. So an element past the bound must have had a first-step
    // gradient under 1e-6, and such elements must be rare, but for the key biases, whose gradient
    // is 0 in exact arithmetic. When written: 119 key-bias elements, and one weight whose first
    // gradient was -4.2e-9 (5.6e-4 off).
    let (mut elements, mut near_zero) = (0, 0);
    for_each_trainable(steps, "after.", model, |name, id, theirs| {
        let ours = model.params().get(id).to_vec().unwrap();
        let grad0 = &steps.get(&format!("grad.{name}")).unwrap().data;
        let key_bias = name.ends_with(".attn.k.bias");
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            if (a - b).abs() > 2e-2 * lr {
                assert!(
                    grad0[i].abs() < 1e-6,
                    "{name}[{i}]: {a} after the steps, PyTorch {b}, though its first gradient \
                     was {:e}",
                    grad0[i]
                );
                near_zero += usize::from(!key_bias);
            }
        }
        elements += ours.len();
    });
    assert!(
        near_zero * 1000 <= elements,
        "{near_zero} of {elements} elements differ from PyTorch's after the steps"
    );
}

/// Every trainable tensor after SGD's steps, against PyTorch's. SGD moves an element in
/// proportion to its gradient, so the moves are compared, each tensor's against its largest.
/// Rounding, grown over four steps at learning rates up to 0.5, left 6.6e-5 of it when written;
/// a dampened momentum or a decay left out moves elements by ~10%.
fn check_sgd_after(model: &Vit, steps: &TensorFile, before: &HashMap<String, Vec<f32>>) {
    for_each_trainable(steps, "after.", model, |name, id, theirs| {
        let ours = model.params().get(id).to_vec().unwrap();
        let start = &before[name];
        let moved = |v: &[f32]| -> Vec<f32> { v.iter().zip(start).map(|(a, b)| a - b).collect() };
        let (diff, scale) = max_diff(&moved(&ours), &moved(theirs));
        assert!(
            diff <= 1e-3 * scale,
            "{name}: moved differently from PyTorch's, by up to {diff:e} (largest move {scale})"
        );
    });
}

/// Every trainable tensor's values by name.
fn trainable_values(model: &Vit) -> HashMap<String, Vec<f32>> {
    model
        .params()
        .iter()
        .filter(|(_, p)| p.trainable())
        .map(|(_, p)| (p.name().to_string(), p.value().to_vec().unwrap()))
        .collect()
}
