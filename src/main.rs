//! The `loren` command line: train, evaluate and compare LoRA-Ensembles.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use loren::backbone::{self, PretrainSpec};
use loren::dataset::DataSource;
use loren::progress::Verbosity;
use loren::progress::eval_bar;
use loren::report::{calibration_report, comparison_table, method_title, training_line};
use loren::run::{RunResult, RunSpec, run};
use loren_autograd::optim::OptimizerKind;
use loren_nn::checkpoint::TensorFile;
use loren_nn::checkpoint::write_atomic;
use loren_nn::config::{EnsembleConfig, LoraConfig, Method, Targets, VitConfig};
use loren_nn::data::{Augment, Splits};
use loren_nn::eval::{EvalOptions, eval_images, evaluate};
use loren_nn::reliability::reliability_svg;
use loren_nn::train::{TrainConfig, load_trained};
use loren_tensor::DeviceSpec;

const ABOUT: &str = "LoRA-Ensembles: calibrated uncertainty for Vision Transformers at a fraction of a deep ensemble's cost";

const LONG_ABOUT: &str = "\
LoRA-Ensembles: calibrated uncertainty for Vision Transformers at a fraction of a deep ensemble's cost.

M members share one frozen pretrained ViT. Each member trains only low-rank adapters (A_m, B_m) on
the attention projections q, k, v and o, plus its own classification head. The prediction is the
mean of the members' softmax probabilities; how the members disagree measures the uncertainty.

With no command, loren trains a LoRA-Ensemble on the bundled 8x8 digits and prints its
calibration report (the same as `loren train`).

Examples:
  loren                                   train the default LoRA-Ensemble (M=8, rank 8)
  loren train --members 16 --rank 4       a larger ensemble of smaller adapters
  loren compare                           single, single-lora, explicit and lora side by side
  loren eval --checkpoint runs/train/checkpoint.safetensors
  loren pretrain                          remake the bundled backbone";

#[derive(Parser)]
#[command(name = "loren", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune an ensemble from the pretrained backbone, then print its calibration report.
    ///
    /// Writes DIR/report.json, DIR/reliability.svg and DIR/checkpoint.safetensors (trainable
    /// weights, optimizer state and position, for --resume and eval).
    Train(TrainArgs),
    /// Evaluate a checkpoint written by `train`: calibration, shift and OOD detection.
    Eval(EvalArgs),
    /// Train single, single-lora, explicit and lora with the same backbone, data, seed and budget,
    /// and print them side by side (also written to DIR/compare.json).
    Compare(CompareArgs),
    /// Pretrain the backbone (a single ViT trained from scratch on the pretrain split).
    Pretrain(PretrainArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Where to run: auto (a GPU when one can be used, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seeds the members' start, the data order and augmentation. The data split is fixed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print only the report: no progress bars or epoch lines.
    #[arg(long, short)]
    quiet: bool,
}

impl Common {
    fn device(&self) -> Result<DeviceSpec> {
        Ok(self.device.parse::<DeviceSpec>()?)
    }

    fn verbosity(&self) -> Verbosity {
        if self.quiet {
            Verbosity::Quiet
        } else {
            Verbosity::Normal
        }
    }
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// The ViT: tiny (the bundled digits: 8x8 images, 17 tokens, width 64, depth 4), vit-b-32 or vit-b-16.
    #[arg(long, default_value = "tiny")]
    config: String,
    /// Pretrained backbone (safetensors). Default: the repository's assets/backbone-<config>.safetensors,
    /// pretrained first when missing.
    #[arg(long)]
    backbone: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct EnsembleArgs {
    /// lora (LoRA-Ensemble), explicit (M fully fine-tuned copies), single, or single-lora.
    #[arg(long, default_value = "lora")]
    method: String,
    /// Ensemble members (single and single-lora always have 1).
    #[arg(long, short = 'm', default_value_t = 8)]
    members: usize,
    /// LoRA rank r of each adapter.
    #[arg(long, short = 'r', default_value_t = 8)]
    rank: usize,
    /// LoRA scale s in y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ.
    #[arg(long, default_value_t = 1.0)]
    lora_scale: f32,
    /// Which attention projections get adapters: any of q, k, v, o.
    #[arg(long, default_value = "qkvo")]
    lora_targets: String,
    /// Gain of the Xavier-uniform start of A; large gains start the members far apart.
    #[arg(long, default_value_t = 10.0)]
    lora_gain: f32,
}

#[derive(Args, Clone)]
struct OptimArgs {
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Peak learning rate (default: 1e-3 for LoRA methods, 3e-4 for full fine-tuning).
    #[arg(long)]
    lr: Option<f32>,
    /// Learning rate at the end of the cosine decay.
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f32,
    /// Linear warmup steps before the cosine decay.
    #[arg(long, default_value_t = 50)]
    warmup: u64,
    /// AdamW's decoupled weight decay (or SGD's L2 penalty), on weight matrices only.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    /// adamw or sgd (with --momentum).
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Training augmentation: none; digits (rotation ±10°, translation ±1 px); or paper (the
    /// LoRA-Ensemble paper's CIFAR setup: horizontal and vertical flips, rotation ±15°).
    #[arg(long, default_value = "none")]
    augment: String,
}

#[derive(Args, Clone)]
struct DataArgs {
    /// The dataset: digits (the bundled 8x8 digits) or digits:PATH (the same gzipped CSV format).
    /// Default: digits; for eval, the data the checkpoint was trained on.
    #[arg(long)]
    data: Option<String>,
    /// Classes to hold out of fine-tuning and test, and score as out-of-distribution (e.g. 8,9).
    #[arg(long, value_delimiter = ',')]
    holdout_classes: Vec<u32>,
    /// Skip the shifted test sets.
    #[arg(long)]
    no_shift: bool,
    /// Skip out-of-distribution detection.
    #[arg(long)]
    no_ood: bool,
    /// Batch size for evaluation.
    #[arg(long, default_value_t = 256)]
    eval_batch_size: usize,
}

#[derive(Args, Clone)]
struct TrainArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    ensemble: EnsembleArgs,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Output folder.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Continue from a checkpoint written by an earlier `train` with the same settings.
    #[arg(long)]
    resume: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct EvalArgs {
    #[command(flatten)]
    common: Common,
    /// A checkpoint written by `loren train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The backbone the checkpoint was trained from (default: the path recorded in it).
    #[arg(long)]
    backbone: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Output folder for eval.json and eval-reliability.svg (default: the checkpoint's folder).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct CompareArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    ensemble: EnsembleArgs,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Methods to compare, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "single,single-lora,explicit,lora"
    )]
    methods: Vec<String>,
    /// Output folder.
    #[arg(long, default_value = "runs/compare")]
    out: PathBuf,
}

#[derive(Args, Clone)]
struct PretrainArgs {
    #[command(flatten)]
    common: Common,
    /// Where to write the backbone (default: the repository's assets/backbone-tiny.safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    epochs: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => train(&TrainArgs::parse_from(["train"])),
        Some(Command::Train(a)) => train(&a),
        Some(Command::Eval(a)) => eval(&a),
        Some(Command::Compare(a)) => compare(&a),
        Some(Command::Pretrain(a)) => pretrain(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Lets a flattened argument group parse on its own, for the no-command default.
impl TrainArgs {
    fn parse_from<const N: usize>(args: [&str; N]) -> TrainArgs {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: TrainArgs,
        }
        Only::parse_from(args).args
    }
}

fn splits(data: &DataArgs) -> Result<Splits> {
    let source: DataSource = data.data.as_deref().unwrap_or("digits").parse()?;
    source.splits(&data.holdout_classes)
}

/// What `eval` needs to rebuild the same data: the source and the held-out classes.
fn data_metadata(data: &DataArgs) -> HashMap<String, String> {
    let holdout: Vec<String> = data.holdout_classes.iter().map(u32::to_string).collect();
    HashMap::from([
        (
            "data".to_string(),
            data.data.clone().unwrap_or_else(|| "digits".into()),
        ),
        ("holdout_classes".to_string(), holdout.join(",")),
    ])
}

fn eval_options(data: &DataArgs) -> EvalOptions {
    EvalOptions {
        batch_size: data.eval_batch_size,
        shift: !data.no_shift,
        ood: !data.no_ood,
    }
}

fn ensemble_config(e: &EnsembleArgs, method: Method, classes: usize) -> Result<EnsembleConfig> {
    Ok(EnsembleConfig {
        method,
        members: if method.is_single() { 1 } else { e.members },
        classes,
        lora: LoraConfig {
            rank: e.rank,
            scale: e.lora_scale,
            targets: e.lora_targets.parse::<Targets>()?,
            init_gain: e.lora_gain,
        },
    })
}

fn train_config(o: &OptimArgs, method: Method, seed: u64) -> Result<TrainConfig> {
    let optimizer = match o.optimizer.as_str() {
        "adamw" => OptimizerKind::adamw(o.weight_decay),
        "sgd" => OptimizerKind::Sgd {
            momentum: o.momentum,
            weight_decay: o.weight_decay,
        },
        other => anyhow::bail!("unknown optimizer '{other}': expected adamw or sgd"),
    };
    let default_lr = if method.uses_lora() { 1e-3 } else { 3e-4 };
    Ok(TrainConfig {
        epochs: o.epochs,
        batch_size: o.batch_size,
        lr: o.lr.unwrap_or(default_lr),
        min_lr: o.min_lr,
        warmup_steps: o.warmup,
        optimizer,
        grad_clip: (o.grad_clip > 0.0).then_some(o.grad_clip),
        augment: match o.augment.as_str() {
            "none" => Augment::none(),
            "digits" => Augment::digits(),
            "paper" => Augment::paper(),
            other => {
                anyhow::bail!("unknown augmentation '{other}': expected none, digits or paper")
            }
        },
        seed,
    })
}

#[allow(clippy::too_many_arguments)]
fn run_spec(
    common: &Common,
    model: &ModelArgs,
    ens: &EnsembleArgs,
    optim: &OptimArgs,
    data: &DataArgs,
    method: Method,
    classes: usize,
    checkpoint: Option<PathBuf>,
) -> Result<RunSpec> {
    let vit = VitConfig::by_name(&model.config)?;
    let ensemble = ensemble_config(ens, method, classes)?;
    let train = train_config(optim, method, common.seed)?;
    // Settle every setting before anything slow (loading, pretraining) starts.
    ensemble.validate(&vit)?;
    train.validate()?;
    Ok(RunSpec {
        vit,
        ensemble,
        train,
        model_seed: common.seed,
        device: common.device()?,
        checkpoint,
        resume: None,
        eval: eval_options(data),
        verbosity: common.verbosity(),
        metadata: data_metadata(data),
    })
}

/// Write the report as JSON and its reliability diagram beside it.
fn write_outputs(out: &Path, result: &RunResult) -> Result<Vec<PathBuf>> {
    let json = out.join("report.json");
    write_atomic(&json, serde_json::to_string_pretty(result)?.as_bytes())?;
    let svg = out.join("reliability.svg");
    let title = format!("{} (M={}) on digits test", result.method, result.members);
    write_atomic(
        &svg,
        reliability_svg(&result.report.test, &title).as_bytes(),
    )?;
    Ok(vec![json, svg])
}

fn train(a: &TrainArgs) -> Result<()> {
    let method: Method = a.ensemble.method.parse()?;
    let data = splits(&a.data)?;
    let ckpt = a.out.join("checkpoint.safetensors");
    let mut spec = run_spec(
        &a.common,
        &a.model,
        &a.ensemble,
        &a.optim,
        &a.data,
        method,
        data.train.classes,
        Some(ckpt.clone()),
    )?;
    spec.resume = a.resume.clone();
    let backbone = backbone::resolve(
        a.model.backbone.as_deref(),
        &spec.vit,
        &data,
        spec.verbosity,
    )?;
    let result = run(&spec, &data, &backbone)?;
    let title = method_title(result.method, result.members, result.rank);
    print!(
        "{}{}",
        calibration_report(&title, &result.report),
        training_line(&result)
    );
    let written = write_outputs(&a.out, &result)?;
    println!(
        "wrote {}, {}, {}",
        written[0].display(),
        written[1].display(),
        ckpt.display()
    );
    Ok(())
}

fn eval(a: &EvalArgs) -> Result<()> {
    let file = TensorFile::read(&a.checkpoint)?;
    // The data it was trained on, unless the command line says otherwise.
    let meta = file.metadata();
    let mut data_args = a.data.clone();
    data_args.data = data_args.data.or_else(|| meta.get("data").cloned());
    let recorded = meta.get("holdout_classes").filter(|h| !h.is_empty());
    if let (true, Some(h)) = (data_args.holdout_classes.is_empty(), recorded) {
        data_args.holdout_classes = h
            .split(',')
            .map(|c| {
                c.parse::<u32>()
                    .with_context(|| format!("checkpoint metadata holdout_classes '{h}'"))
            })
            .collect::<Result<_>>()?;
    }
    let data = splits(&data_args)?;
    let backbone = match (&a.backbone, file.metadata().get("backbone")) {
        (Some(p), _) => Some(TensorFile::read(p)?),
        (None, Some(p)) => Some(TensorFile::read(Path::new(p)).context(
            "the backbone the checkpoint was trained from (pass --backbone to name another)",
        )?),
        (None, None) => None,
    };
    let device = a.common.device()?.open()?;
    let model = load_trained(&file, backbone.as_ref(), &device)?;
    let opts = eval_options(&data_args);
    let held_out = data.held_out.as_ref();
    let bar = eval_bar(
        "eval",
        eval_images(&data.test, held_out, &opts),
        a.common.verbosity(),
    );
    let report = evaluate(&model, &data.test, held_out, &opts, &mut |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    let ens = &model.ensemble;
    let title = method_title(
        ens.method,
        ens.members,
        ens.method.uses_lora().then_some(ens.lora.rank),
    );
    print!("{}", calibration_report(&title, &report));
    let out = match &a.out {
        Some(o) => o.clone(),
        None => a
            .checkpoint
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let json = out.join("eval.json");
    write_atomic(&json, serde_json::to_string_pretty(&report)?.as_bytes())?;
    let svg = out.join("eval-reliability.svg");
    write_atomic(&svg, reliability_svg(&report.test, &title).as_bytes())?;
    println!("wrote {}, {}", json.display(), svg.display());
    Ok(())
}

fn compare(a: &CompareArgs) -> Result<()> {
    let methods = a
        .methods
        .iter()
        .map(|m| m.parse::<Method>().map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    let data = splits(&a.data)?;
    let vit = VitConfig::by_name(&a.model.config)?;
    let backbone = backbone::resolve(
        a.model.backbone.as_deref(),
        &vit,
        &data,
        a.common.verbosity(),
    )?;
    let mut results = Vec::new();
    for method in methods {
        let spec = run_spec(
            &a.common,
            &a.model,
            &a.ensemble,
            &a.optim,
            &a.data,
            method,
            data.train.classes,
            None,
        )?;
        let r = run(&spec, &data, &backbone).with_context(|| format!("method {method}"))?;
        write_outputs(&a.out.join(method.name()), &r)?;
        results.push(r);
    }
    print!("{}", comparison_table(&results));
    let json = a.out.join("compare.json");
    write_atomic(&json, serde_json::to_string_pretty(&results)?.as_bytes())?;
    println!(
        "wrote {} and a report.json and reliability.svg per method under {}",
        json.display(),
        a.out.display()
    );
    Ok(())
}

fn pretrain(a: &PretrainArgs) -> Result<()> {
    let data = splits(&DataArgs {
        data: None,
        holdout_classes: vec![],
        no_shift: true,
        no_ood: true,
        eval_batch_size: 256,
    })?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| backbone::default_path(&VitConfig::tiny()));
    let mut spec = PretrainSpec::bundled(out);
    spec.train.epochs = a.epochs;
    spec.seed = a.common.seed;
    spec.train.seed = a.common.seed;
    spec.device = a.common.device()?;
    let r = backbone::pretrain(&spec, &data, a.common.verbosity())?;
    println!(
        "pretrained {} in {:.1}s: validation accuracy {:.2}%; wrote {}",
        spec.vit.name,
        r.summary.seconds,
        100.0 * r.val_accuracy,
        r.path.display()
    );
    Ok(())
}
