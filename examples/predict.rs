//! Predict with an exported ensemble through the embedding API, `loren::Ensemble`.
//!
//! ```sh
//! cargo run --release -- train --epochs 2 --members 4
//! cargo run --release -- export --checkpoint runs/train/checkpoint.safetensors --out runs/train/ensemble.safetensors
//! cargo run --release --example predict -- runs/train/ensemble.safetensors 12
//! ```
//!
//! It reads the first N test images of the data the ensemble was trained on and prints each
//! one's prediction, confidence, entropy and mutual information, then the accuracy.

use anyhow::{Context, Result};
use loren::Ensemble;
use loren::dataset::{DataSource, Normalize, recorded_train_on_val};
use loren::tensor::DeviceSpec;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "runs/train/ensemble.safetensors".into());
    let n: usize = match args.next() {
        Some(n) => n.parse().context("N must be a whole number")?,
        None => 12,
    };
    let ens = Ensemble::load(&path, DeviceSpec::Auto)?;
    let meta = ens.metadata();
    // Empty when the ensemble was trained on a program's own arrays.
    let source: DataSource = meta
        .get("data")
        .filter(|d| !d.is_empty())
        .map_or("digits", String::as_str)
        .parse()?;
    let holdout: Vec<u32> = meta
        .get("holdout_classes")
        .filter(|h| !h.is_empty())
        .map(|h| h.split(',').map(str::parse).collect::<Result<_, _>>())
        .transpose()?
        .unwrap_or_default();
    let test = source
        .splits(
            &holdout,
            ens.vit(),
            Normalize::recorded(meta)?,
            recorded_train_on_val(meta)?,
        )?
        .test;
    let idx: Vec<usize> = (0..n.min(test.len())).collect();
    // Normalised and at the model's size, exactly as `loren eval` feeds the model.
    let batch = test.batch(&idx, None);
    let p = ens.predict(&batch.images, batch.batch)?;
    println!(
        "{} ({} members) on {} test images of {source}",
        ens.config().method,
        ens.members(),
        p.batch
    );
    println!("image  label      predicted  confidence  entropy  mutual-info");
    let mut correct = 0;
    for (b, &label) in batch.labels.iter().enumerate() {
        let class = p.predicted(b);
        correct += usize::from(class == label as usize);
        println!(
            "{b:>5}  {:<9}  {:<9}  {:>9.1}%  {:>7.3}  {:>11.4}",
            ens.class_names()[label as usize],
            ens.class_names()[class],
            100.0 * p.mean(b)[class],
            p.entropy[b],
            p.mutual_information[b],
        );
    }
    println!("accuracy {correct}/{}", p.batch);
    Ok(())
}
