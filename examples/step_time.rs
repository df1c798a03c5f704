//! Median wall time of a training step of the tiny ViT: `cargo run --release --example step_time -- M B`.
use std::time::Instant;

use loren_nn::config::{EnsembleConfig, LoraConfig, Method, VitConfig};
use loren_nn::data::Batch;
use loren_nn::train::{TrainConfig, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::{Device, Rng};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (m, b) = (
        args.first().copied().unwrap_or(16),
        args.get(1).copied().unwrap_or(32),
    );
    let method = if std::env::var("EXPLICIT").is_ok() {
        Method::Explicit
    } else {
        Method::Lora
    };
    let vit = VitConfig::tiny();
    let ens = EnsembleConfig {
        method,
        members: m,
        classes: 10,
        lora: LoraConfig::default(),
    };
    let mut model = Vit::new(&vit, &ens, &Device::cpu(), 0).unwrap();
    let cfg = TrainConfig::plain(b, 1e-3, loren_nn::config::Activations::Keep);
    let mut trainer = Trainer::new(&mut model, &cfg, 1000).unwrap();
    let mut rng = Rng::new(1);
    let batch = Batch {
        images: (0..b * 64).map(|_| rng.normal()).collect(),
        labels: (0..b).map(|i| (i % 10) as u32).collect(),
        batch: b,
        channels: 1,
        height: 8,
        width: 8,
    };
    let mut times = Vec::new();
    for i in 0..30 {
        let t = Instant::now();
        trainer.step(&batch).unwrap();
        if i >= 5 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{method} M={m} B={b}: median {:.1} ms, min {:.1} ms",
        times[times.len() / 2],
        times[0]
    );
}
