//! Train a LoRA-Ensemble from a program of your own, through the library rather than the `loren`
//! command: your images in memory, your settings, your view of each epoch, and the same metrics
//! the command prints.
//!
//! ```sh
//! cargo run --release --example train_loop
//! ```
//!
//! It hands the trainer images as a program would (pixels in [0, 1] and labels, here copied out
//! of the bundled digits' splits), trains 4 members of rank 4 on the bundled backbone for 5
//! epochs, scoring the validation part at each epoch's end, and keeps a checkpoint that
//! `loren eval --checkpoint runs/train-loop` scores. Then it scores the test part: accuracy, ECE
//! and NLL, the same after temperature scaling fitted on validation, and by ensemble size; and
//! predicts three test images from their pixels through `loren::Ensemble`, with no file between.

use std::path::Path;

use anyhow::{Context, Result};
use loren::Ensemble;
use loren::backbone::read_backbone;
use loren::dataset::{DataSource, Normalize, TRAIN_ON_VAL_KEY};
use loren::nn::config::{EnsembleConfig, LoraConfig, Method, VitConfig};
use loren::nn::data::{Augment, Dataset};
use loren::nn::eval::predict;
use loren::nn::metrics::{by_ensemble_size, calibration, fit_temperature, tempered_report};
use loren::nn::train::{CheckpointSpec, EpochInfo, EpochVal, Observer, TrainConfig, Trainer};
use loren::nn::vit::{Vit, fine_tune_seed};
use loren::tensor::DeviceSpec;

/// Prints each epoch's line, as a program might log it.
struct EpochLines;

impl Observer for EpochLines {
    fn epoch(&mut self, e: &EpochInfo) {
        let val = e.val.map_or(String::new(), |v| {
            format!(
                ", validation accuracy {:.2}% ECE {:.4}",
                100.0 * v.accuracy,
                v.ece
            )
        });
        println!("epoch {} loss {:.4}{val}", e.epoch, e.mean_loss);
    }
}

/// A dataset made from plain arrays: `[N, C, H, W]` pixels in [0, 1], a label each, the class
/// names, and the per-channel scaling the backbone was trained with.
fn from_arrays(name: &str, like: &Dataset) -> Result<Dataset> {
    let mut pixels = vec![0.0f32; like.len() * like.image_len()];
    for (i, image) in pixels.chunks_exact_mut(like.image_len()).enumerate() {
        like.read_image(i, image);
    }
    let shape = [like.channels, like.height, like.width];
    let data = Dataset::new(
        name,
        shape,
        pixels,
        like.labels.clone(),
        like.class_names.clone(),
    )?;
    Ok(data.with_normalization(like.norm_mean.clone(), like.norm_std.clone())?)
}

fn main() -> Result<()> {
    let mut vit = VitConfig::tiny();
    let splits = "digits"
        .parse::<DataSource>()?
        .splits(&[], &vit, Normalize::Dataset, false)?;
    let train = from_arrays("my-train", &splits.train)?;
    let val = from_arrays("my-val", splits.val.as_ref().context("a validation part")?)?;
    let test = from_arrays("my-test", &splits.test)?;

    let device = DeviceSpec::Auto.open()?;
    let ensemble = EnsembleConfig {
        drop_key: EnsembleConfig::DROP_KEY,
        method: Method::Lora,
        members: 4,
        classes: train.classes,
        lora: LoraConfig {
            rank: 4,
            ..LoraConfig::default()
        },
    };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/backbone-tiny.safetensors");
    // Read as the command reads one: timm, torchvision or Hugging Face names are converted, and
    // the model runs with the LayerNorm epsilon their library trained with.
    let backbone = read_backbone(&path, &vit)?;
    if let Some(eps) = backbone.ln_eps {
        vit.ln_eps = eps;
    }
    let mut model = Vit::new(&vit, &ensemble, &device, fine_tune_seed(0))?;
    model.load_backbone(&backbone.file)?;
    println!(
        "{} members of rank 4 on {device}: {} trainable parameters of {}",
        ensemble.members,
        model.params().num_trainable(),
        model.params().num_total()
    );

    let config = TrainConfig {
        epochs: 5,
        warmup_steps: 10,
        augment: Augment::digits(),
        ..TrainConfig::plain(32, 1e-3, Default::default())
    };
    config.validate()?;
    let out = Path::new("runs/train-loop");
    std::fs::create_dir_all(out)?;
    {
        let mut trainer = Trainer::new(&mut model, &config, train.len())?;
        trainer.validate_every(
            1,
            Box::new(|model: &Vit| {
                // Timed, so that fit counts it as validation and not as training.
                let start = std::time::Instant::now();
                let probs = predict(model, &val, 32, &mut |_| Ok(()))?;
                let c = calibration(&probs, &val.labels)?;
                Ok(Some(EpochVal {
                    accuracy: c.accuracy,
                    nll: c.nll,
                    ece: c.ece,
                    seconds: start.elapsed().as_secs_f64(),
                }))
            }),
        );
        // What `loren eval` needs to know besides the weights, to find the test part: the data
        // and its scaling. The checkpoint records the rest itself: the backbone the model was
        // loaded from (by path, and by fingerprint, so that other weights are refused), and the
        // normalisation and class names of the data it trained on.
        let metadata = [
            ("data", "digits".to_string()),
            (Normalize::KEY, Normalize::Dataset.to_string()),
            (TRAIN_ON_VAL_KEY, false.to_string()),
        ];
        let checkpoint = CheckpointSpec {
            path: Some(out.join("checkpoint.safetensors")),
            metadata: metadata.map(|(k, v)| (k.to_string(), v)).into(),
            ..Default::default()
        };
        let summary = trainer.fit(&train, &checkpoint, &mut EpochLines)?;
        println!(
            "{} steps, {:.0} images/s",
            summary.steps, summary.images_per_second
        );
    }

    let test_probs = predict(&model, &test, 256, &mut |_| Ok(()))?;
    let report = calibration(&test_probs, &test.labels)?;
    println!(
        "test: accuracy {:.2}%, ECE {:.4}, NLL {:.4}",
        100.0 * report.accuracy,
        report.ece,
        report.nll
    );
    let val_probs = predict(&model, &val, 256, &mut |_| Ok(()))?;
    let t = fit_temperature(&val_probs, &val.labels)?;
    let scaled = tempered_report(&test_probs, &test.labels, t)?;
    println!(
        "temperature-scaled (T = {t:.3}): ECE {:.4}, NLL {:.4}",
        scaled.ece, scaled.nll
    );
    for row in by_ensemble_size(&test_probs, &test.labels)? {
        println!(
            "{} member{}: accuracy {:.2}%, ECE {:.4}, NLL {:.4}",
            row.members,
            if row.members == 1 { "" } else { "s" },
            100.0 * row.accuracy,
            row.ece,
            row.nll
        );
    }

    // The trained model, served as it is: raw pixels in, each image's class and how much the
    // members disagree on it.
    let ensemble = Ensemble::from_trained(model, &train)?;
    let pixels = test.images.to_f32();
    let shown = 3;
    let per_image = pixels.len() / test.len();
    let p = ensemble.predict_pixels(&pixels[..shown * per_image], shown)?;
    for b in 0..p.batch {
        let class = p.predicted(b);
        println!(
            "test image {b}: {} ({:.1}%; label {}), mutual information {:.4}",
            ensemble.class_names()[class],
            100.0 * p.mean(b)[class],
            test.class_names[test.labels[b] as usize],
            p.mutual_information[b]
        );
    }
    Ok(())
}
