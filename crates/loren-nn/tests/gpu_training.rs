//! A whole training step of the tiny ViT on the GPU against the CPU: the loss, every gradient and
//! every parameter after AdamW. Both start from the same weights (the GPU's, whose frozen
//! matrices are bf16) and take the same batch. With no usable GPU the tests say so and pass.
//!
//! Bounds: the GPU runs the whole network in bf16 activations with f32 accumulation, so the
//! gradients at the end of ~60 ops carry several bf16 roundings (2⁻⁹ each); 5e-2 relative is the
//! bound for them, 1e-2 for the loss, and the parameters after the step move by at most a few lr.

use loren_autograd::optim::OptimizerKind;
use loren_nn::config::{EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::{Augment, SplitOptions, bundled_digits, split_digits};
use loren_nn::train::{TrainConfig, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::Device;

fn gpu() -> Option<Device> {
    match loren_kernels::cuda_available() {
        Ok(()) => Some(Device::cuda(0).expect("a usable GPU opens")),
        Err(e) => {
            loren_kernels::skip_without_gpu(format!("no CUDA device ({e})"));
            None
        }
    }
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

fn step_matches(method: Method, members: usize) {
    let Some(gdev) = gpu() else { return };
    let ens = EnsembleConfig {
        method,
        members,
        classes: 10,
        lora: LoraConfig {
            rank: 4,
            init_gain: 1.0,
            ..LoraConfig::default()
        },
    };
    let vit = VitConfig::tiny();
    let mut on_gpu = Vit::new(&vit, &ens, &gdev, 5).unwrap();
    let mut on_cpu = Vit::new(&vit, &ens, &Device::cpu(), 5).unwrap();
    // The CPU starts from exactly the GPU's weights (bf16-rounded frozen matrices included).
    let ids: Vec<_> = on_gpu.params().iter().map(|(id, _)| id).collect();
    for id in ids {
        let v = on_gpu.params().get(id).to_vec().unwrap();
        on_cpu.params_mut().set(id, &v).unwrap();
    }
    let data = split_digits(&bundled_digits().unwrap(), &SplitOptions::default())
        .unwrap()
        .train;
    let batch = data.batch(&(0..32).collect::<Vec<_>>(), None);
    let cfg = TrainConfig {
        epochs: 1,
        batch_size: 32,
        lr: 1e-3,
        min_lr: 0.0,
        warmup_steps: 0,
        optimizer: OptimizerKind::adamw(0.01),
        grad_clip: Some(1.0),
        augment: Augment::none(),
        seed: 0,
        activations: loren_nn::config::Activations::Keep,
    };
    let mut tg = Trainer::new(&mut on_gpu, &cfg, 32).unwrap();
    let mut tc = Trainer::new(&mut on_cpu, &cfg, 32).unwrap();
    let (lg, lc) = (tg.step(&batch).unwrap(), tc.step(&batch).unwrap());
    let le = ((lg - lc) / lc).abs() as f64;
    println!("{method} M={members}: loss gpu {lg:.6} cpu {lc:.6}, relative error {le:.3e}");
    assert!(le < 1e-2, "loss differs: {lg} vs {lc}");
    for ((id, gg), (_, gc)) in tg.grads().iter().zip(tc.grads().iter()) {
        let name = tg.model().params().param(id).name().to_string();
        let e = rel(&gg.to_vec().unwrap(), &gc.to_vec().unwrap());
        println!("  grad {name:<32} relative error {e:.3e}");
        assert!(e < 5e-2, "{method}: gradient of {name} differs by {e:e}");
    }
    for (id, p) in tg.model().params().iter() {
        let e = rel(
            &p.value().to_vec().unwrap(),
            &tc.model().params().get(id).to_vec().unwrap(),
        );
        assert!(
            e < 1e-2,
            "{method}: parameter {} after the step differs by {e:e}",
            p.name()
        );
    }
}

#[test]
fn lora_ensemble_step_matches_the_cpu() {
    step_matches(Method::Lora, 3);
}

#[test]
fn explicit_ensemble_step_matches_the_cpu() {
    step_matches(Method::Explicit, 3);
}

#[test]
fn single_network_step_matches_the_cpu() {
    step_matches(Method::Single, 1);
}
