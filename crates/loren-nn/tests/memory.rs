//! Memory per ensemble size: what each added member costs, by tag, for LoRA and explicit
//! ensembles, measured by the device's accounting over one training step.

use loren_autograd::optim::OptimizerKind;
use loren_nn::config::{EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::{Augment, Batch};
use loren_nn::train::{TrainConfig, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::{Device, MemTag, MemoryReport, Rng};

fn step_peak(method: Method, members: usize) -> (MemoryReport, usize) {
    let dev = Device::cpu();
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method,
        members,
        classes: 10,
        lora: LoraConfig::default(),
    };
    let mut model = Vit::new(&VitConfig::tiny(), &ens, &dev, 0).unwrap();
    let trainable = model.params().num_trainable();
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 16,
        lr: 1e-3,
        min_lr: 0.0,
        warmup_steps: 0,
        warmup_from_zero: false,
        optimizer: OptimizerKind::adamw(0.0),
        grad_clip: None,
        augment: Augment::none(),
        shuffle: true,
        seed: 0,
        activations: loren_nn::config::Activations::Keep,
    };
    let mut trainer = Trainer::new(&mut model, &cfg, 16).unwrap();
    let mut rng = Rng::new(0);
    let batch = Batch {
        images: (0..16 * 64).map(|_| rng.next_f32()).collect(),
        labels: (0..16).map(|i| i % 10).collect(),
        batch: 16,
        channels: 1,
        height: 8,
        width: 8,
    };
    dev.memory().reset_peaks();
    trainer.step(&batch).unwrap();
    (dev.memory().report(), trainable)
}

/// Bytes one more member adds under `tags`, from M=2 to M=6.
fn per_member(method: Method, tags: &[MemTag]) -> (f64, f64) {
    let (a, pa) = step_peak(method, 2);
    let (b, pb) = step_peak(method, 6);
    let sum = |r: &MemoryReport| tags.iter().map(|t| r.peak(*t)).sum::<u64>() as f64;
    ((sum(&b) - sum(&a)) / 4.0, (pb - pa) as f64 / 4.0)
}

#[test]
fn lora_members_cost_adapters_and_heads_explicit_members_cost_whole_models() {
    let state = [MemTag::Trainable, MemTag::Gradients, MemTag::OptimizerState];
    let (lora_bytes, lora_params) = per_member(Method::Lora, &state);
    let (explicit_bytes, explicit_params) = per_member(Method::Explicit, &state);
    let vit = VitConfig::tiny();
    // A LoRA member: rank-8 A and B on q, k, v, o in every block, and a head.
    let adapters = vit.depth * 4 * 2 * 8 * vit.dim;
    let head = 10 * vit.dim + 10;
    assert_eq!(lora_params as usize, adapters + head);
    // Weights, gradients and AdamW's two moments: four f32 copies.
    assert_eq!(lora_bytes, 16.0 * lora_params);
    assert_eq!(explicit_bytes, 16.0 * explicit_params);
    assert!(
        explicit_params > 7.0 * lora_params,
        "explicit {explicit_params} vs lora {lora_params} per member"
    );

    // Frozen weights do not grow with M under LoRA; an explicit ensemble has none.
    let (frozen2, _) = step_peak(Method::Lora, 2);
    let (frozen6, _) = step_peak(Method::Lora, 6);
    assert_eq!(
        frozen2.peak(MemTag::FrozenWeights),
        frozen6.peak(MemTag::FrozenWeights)
    );

    // The whole peak grows more slowly too: activations are per member for both, the rest not.
    let total = |m| step_peak(m, 6).0.total_peak as f64 - step_peak(m, 2).0.total_peak as f64;
    let (lt, et) = (total(Method::Lora), total(Method::Explicit));
    eprintln!(
        "per member: lora {lora_params} params, {lora_bytes} B state, {:.0} B peak; explicit {explicit_params} params, {explicit_bytes} B state, {:.0} B peak",
        lt / 4.0,
        et / 4.0
    );
    assert!(
        lt < 0.8 * et,
        "peak growth: lora {lt} vs explicit {et} bytes for 4 members"
    );
}
