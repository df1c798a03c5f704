//! Recomputing each block in the backward (`Activations::Recompute`) against keeping its
//! activations: two training steps of the tiny ViT give the same loss, gradients and parameters,
//! bit for bit, for every method, in less activation memory. On the CPU always; on a GPU too
//! when one is usable (the kernels are deterministic: no atomics, one stream).

use loren_nn::config::{Activations, EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::{SplitOptions, bundled_digits, split_digits};
use loren_nn::train::{TrainConfig, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::{Device, MemTag};

struct Run {
    losses: Vec<u32>,
    grads: Vec<(String, Vec<u32>)>,
    params: Vec<(String, Vec<u32>)>,
    peak_activations: u64,
}

fn bits(v: Vec<f32>) -> Vec<u32> {
    v.into_iter().map(f32::to_bits).collect()
}

fn two_steps(dev: &Device, method: Method, activations: Activations) -> Run {
    let ens = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method,
        members: if method.is_single() { 1 } else { 3 },
        classes: 10,
        lora: LoraConfig {
            rank: 4,
            init_gain: 1.0,
            ..LoraConfig::default()
        },
    };
    let mut model = Vit::new(&VitConfig::tiny(), &ens, dev, 7).unwrap();
    let data = split_digits(&bundled_digits().unwrap(), &SplitOptions::default())
        .unwrap()
        .train;
    let cfg = TrainConfig::plain(16, 1e-3, activations);
    let mut trainer = Trainer::new(&mut model, &cfg, 32).unwrap();
    dev.memory().reset_peaks();
    let losses = (0..2)
        .map(|i| {
            let batch = data.batch(&(16 * i..16 * (i + 1)).collect::<Vec<_>>(), None);
            trainer.step(&batch).unwrap().to_bits()
        })
        .collect();
    let peak_activations = dev.memory().report().peak(MemTag::Activations);
    let named = |id| trainer.model().params().param(id).name().to_string();
    let grads = trainer
        .grads()
        .iter()
        .map(|(id, g)| (named(id), bits(g.to_vec().unwrap())))
        .collect();
    let params = trainer
        .model()
        .params()
        .iter()
        .map(|(_, p)| (p.name().to_string(), bits(p.value().to_vec().unwrap())))
        .collect();
    Run {
        losses,
        grads,
        params,
        peak_activations,
    }
}

fn same_step(open: impl Fn() -> Device, method: Method) {
    let kept = two_steps(&open(), method, Activations::Keep);
    let again = two_steps(&open(), method, Activations::Recompute);
    assert_eq!(kept.losses, again.losses, "{method}: losses differ");
    assert!(!kept.grads.is_empty(), "{method}: no gradients to compare");
    let names = |v: &[(String, Vec<u32>)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&kept.grads), names(&again.grads), "{method}");
    assert_eq!(names(&kept.params), names(&again.params), "{method}");
    for (k, a) in kept.grads.iter().zip(&again.grads) {
        assert_eq!(k.0, a.0);
        assert!(k.1 == a.1, "{method}: the gradient of {} differs", k.0);
    }
    for (k, a) in kept.params.iter().zip(&again.params) {
        assert!(k.1 == a.1, "{method}: {} differs after the steps", k.0);
    }
    assert!(
        again.peak_activations < kept.peak_activations,
        "{method}: recomputing peaked at {} activation bytes, keeping at {}",
        again.peak_activations,
        kept.peak_activations
    );
}

const METHODS: [Method; 5] = [
    Method::Lora,
    Method::Explicit,
    Method::Single,
    Method::SingleLora,
    Method::McDropout,
];

#[test]
fn recomputed_blocks_train_bit_for_bit_as_kept_ones_on_the_cpu() {
    for method in METHODS {
        same_step(Device::cpu, method);
    }
}

/// One method per test, so that CI's emulated GPU can afford LoRA's alone.
fn on_a_gpu(method: Method) {
    if let Err(e) = loren_kernels::cuda_available() {
        loren_kernels::skip_without_gpu(format!("no CUDA device ({e})"));
        return;
    }
    same_step(|| Device::cuda(0).expect("a usable GPU opens"), method);
}

#[test]
fn recomputed_blocks_train_bit_for_bit_as_kept_ones_on_a_gpu_lora() {
    on_a_gpu(Method::Lora);
}

#[test]
fn recomputed_blocks_train_bit_for_bit_as_kept_ones_on_a_gpu_explicit() {
    on_a_gpu(Method::Explicit);
}

#[test]
fn recomputed_blocks_train_bit_for_bit_as_kept_ones_on_a_gpu_single() {
    on_a_gpu(Method::Single);
}

#[test]
fn recomputed_blocks_train_bit_for_bit_as_kept_ones_on_a_gpu_single_lora() {
    on_a_gpu(Method::SingleLora);
}

#[test]
fn recomputed_blocks_train_bit_for_bit_as_kept_ones_on_a_gpu_mc_dropout() {
    on_a_gpu(Method::McDropout);
}
