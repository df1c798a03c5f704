//! One method trained and evaluated end to end, and the side-by-side comparison of methods.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use loren_nn::checkpoint::TensorFile;
use loren_nn::config::{EnsembleConfig, Method, VitConfig};
use loren_nn::data::Splits;
use loren_nn::eval::{EvalOptions, EvalReport, eval_images, evaluate, predict};
use loren_nn::metrics::calibration;
use loren_nn::train::{CheckpointSpec, TrainConfig, TrainSummary, Trainer};
use loren_nn::vit::Vit;
use loren_tensor::{DeviceSpec, MemTag, MemoryReport};
use serde::Serialize;

use crate::progress::{TrainBar, Verbosity, eval_bar};

/// Everything that defines a run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub vit: VitConfig,
    pub ensemble: EnsembleConfig,
    pub train: TrainConfig,
    /// Seeds the adapters' and heads' start.
    pub model_seed: u64,
    pub device: DeviceSpec,
    /// Where to keep the training checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// A checkpoint to continue from.
    pub resume: Option<PathBuf>,
    pub eval: EvalOptions,
    pub verbosity: Verbosity,
    /// Written into the checkpoint beside the run's own metadata (the data, for `eval`).
    pub metadata: HashMap<String, String>,
}

/// Peak bytes per memory tag, and the peak of their sum.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryBreakdown {
    pub peak: BTreeMap<String, u64>,
    pub total_peak: u64,
}

impl From<MemoryReport> for MemoryBreakdown {
    fn from(r: MemoryReport) -> Self {
        MemoryBreakdown {
            peak: MemTag::ALL
                .iter()
                .map(|t| (t.name().to_string(), r.peak(*t)))
                .collect(),
            total_peak: r.total_peak,
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub method: Method,
    pub members: usize,
    pub rank: Option<usize>,
    pub device: String,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Peak memory while training, by tag.
    pub memory: MemoryBreakdown,
    pub train: TrainSummary,
    /// Accuracy and NLL on the validation split: the split to choose settings by.
    pub val_accuracy: f64,
    pub val_nll: f64,
    pub val_ece: f64,
    pub report: EvalReport,
    pub train_seconds: f64,
    pub eval_seconds: f64,
}

/// Train `spec.ensemble` from `backbone` on the train split, then evaluate it.
pub fn run(spec: &RunSpec, data: &Splits, backbone: &TensorFile) -> Result<RunResult> {
    let device = spec.device.open()?;
    let ens = &spec.ensemble;
    let mut model = Vit::new(&spec.vit, ens, &device, spec.model_seed)?;
    model
        .load_backbone(backbone)
        .context("loading the backbone")?;
    let label = ens.method.name();

    let t0 = Instant::now();
    device.memory().reset_peaks();
    let summary = {
        let mut trainer = Trainer::new(&mut model, &spec.train, data.train.len())?;
        if let Some(path) = &spec.resume {
            trainer
                .resume(&TensorFile::read(path)?)
                .context("resuming")?;
        }
        // The data too (spec.metadata), so eval and export find what it was trained on.
        let mut metadata = spec.metadata.clone();
        metadata.insert(
            "backbone".to_string(),
            backbone.path().display().to_string(),
        );
        let ckpt = CheckpointSpec {
            path: spec.checkpoint.clone(),
            metadata,
        };
        let mut bar = TrainBar::new(label, spec.verbosity);
        trainer.fit(&data.train, &ckpt, &mut bar)?
    };
    let memory = device.memory().report().into();
    let train_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let val = predict(&model, &data.val, spec.eval.batch_size, &mut |_| {})?;
    let val_report = calibration(&val, &data.val.labels)?;
    let held_out = data.held_out.as_ref();
    let bar = eval_bar(
        label,
        eval_images(&data.test, held_out, &spec.eval),
        spec.verbosity,
    );
    let report = evaluate(&model, &data.test, held_out, &spec.eval, &mut |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();

    Ok(RunResult {
        method: ens.method,
        members: ens.members,
        rank: ens.method.uses_lora().then_some(ens.lora.rank),
        device: device.to_string(),
        trainable_params: model.params().num_trainable(),
        total_params: model.params().num_total(),
        memory,
        train: summary,
        val_accuracy: val_report.accuracy,
        val_nll: val_report.nll,
        val_ece: val_report.ece,
        report,
        train_seconds,
        eval_seconds: t1.elapsed().as_secs_f64(),
    })
}
