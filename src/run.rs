//! One method trained and evaluated end to end, and the side-by-side comparison of methods.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use loren_nn::checkpoint::TensorFile;
use loren_nn::config::{Activations, EnsembleConfig, Method, VitConfig};
use loren_nn::data::{Dataset, Splits};
use loren_nn::eval::{EvalOptions, EvalReport, ScoredSet, eval_images, evaluate, predict};
use loren_nn::memory_model;
use loren_nn::metrics::{Predictions, calibration, fit_temperature};
use loren_nn::train::{
    CheckpointSpec, EpochVal, TrainConfig, TrainSummary, Trainer, check_format, check_resumable,
};
use loren_nn::vit::{Vit, fine_tune_seed};
use loren_tensor::{Device, DeviceSpec, MemTag, MemoryReport};
use serde::Serialize;

use crate::bench::{Budget, CPU_RSS_FACTOR, CPU_RSS_MARGIN, budget_for, need_for_peak, precision};
use crate::dataset::{
    Normalize, SPLIT_IMAGES_KEY, TRAIN_ON_VAL_KEY, TRAINING_IMAGES_KEY, recorded_train_on_val,
    split_images,
};
use crate::progress::{EvalBar, TrainBar, Verbosity};
use crate::report::bytes;

/// Everything that defines a run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub vit: VitConfig,
    pub ensemble: EnsembleConfig,
    pub train: TrainConfig,
    /// Seeds the adapters' and heads' start (through [`fine_tune_seed`]).
    pub model_seed: u64,
    pub device: DeviceSpec,
    /// Where to keep the training checkpoint.
    pub checkpoint: Option<PathBuf>,
    /// A training checkpoint to continue from (shared: one read serves its settings and state);
    /// [`check_resume`] refuses one that does not continue this run before anything is read.
    pub resume: Option<Arc<TensorFile>>,
    pub eval: EvalOptions,
    /// Score the validation part after every this many epochs (and the last), for the learning
    /// curves; 0 scores it only once trained.
    pub val_every: usize,
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

/// The settings a run trained with, as its checkpoint keeps them, so that a report says how it
/// was made: the model, the ensemble, the training (learning rate, schedule, optimizer,
/// augmentation, ...) and the data.
#[derive(Clone, Debug, Serialize)]
pub struct RunSettings {
    pub vit: VitConfig,
    pub ensemble: EnsembleConfig,
    pub train: TrainConfig,
    /// Where the data came from, as `eval` rebuilds it (`data`, `normalize`, ...).
    pub data: BTreeMap<String, String>,
    /// Seeds the adapters' and heads' start; unknown (None) to `eval`, as the checkpoint holds
    /// the trained weights rather than their start.
    pub model_seed: Option<u64>,
}

impl RunSettings {
    /// The settings a checkpoint was trained with, beside the data it is scored on.
    pub fn of_checkpoint(file: &TensorFile, data: BTreeMap<String, String>) -> Result<RunSettings> {
        Ok(RunSettings {
            vit: file.meta_json("vit")?,
            ensemble: file.meta_json("ensemble")?,
            train: file.meta_json("train")?,
            data,
            model_seed: None,
        })
    }
}

/// What a run produced.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub method: Method,
    pub members: usize,
    pub rank: Option<usize>,
    /// The training seed (`--seed`).
    pub seed: u64,
    pub device: String,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Peak memory while training, by tag (the validation part scored at epoch ends included).
    pub memory: MemoryBreakdown,
    /// Peak tensor bytes while the trained ensemble scored the test, shifted and OOD sets, at
    /// `--eval-batch-size`: more than training's at the default sizes.
    pub scoring_peak: u64,
    /// What the training forward kept for the backward.
    pub activations: Activations,
    pub train: TrainSummary,
    /// Accuracy, NLL and ECE on the validation split, the split to choose settings by; `None`
    /// when the run trained on it (`--train-on-val`).
    pub val_accuracy: Option<f64>,
    pub val_nll: Option<f64>,
    pub val_ece: Option<f64>,
    pub report: EvalReport,
    /// Training alone: without scoring the validation part.
    pub train_seconds: f64,
    /// Scoring the validation part, at epoch ends and (when the last was not scored) once
    /// trained.
    pub validation_seconds: f64,
    /// Scoring the test, shifted and OOD sets.
    pub eval_seconds: f64,
    pub settings: RunSettings,
}

/// What a run's first checkpoint replaces at `checkpoint`, removed when that checkpoint is
/// written: so that a run stopped before then leaves the earlier one whole, and one stopped after
/// never leaves a new checkpoint beside an old report. A run resumed in place replaces only its
/// own earlier reports; one whose checkpoint goes where another run's is replaces that run, said
/// on stderr (even with --quiet). Nothing is replaced in a folder without a checkpoint.
fn replaced_by(checkpoint: &Path, resumed: Option<&Path>) -> Vec<PathBuf> {
    let Some(dir) = checkpoint.parent().filter(|_| checkpoint.exists()) else {
        return Vec::new();
    };
    let in_place = resumed.is_some_and(|r| crate::outputs::same_file(r, checkpoint));
    if !in_place {
        // Resuming is offered for what --resume takes: not an export, not a file of another kind.
        let resumable =
            crate::files::FileKind::at(checkpoint) == crate::files::FileKind::Checkpoint;
        let (what, resume) = match resumable {
            true => (
                "an earlier run",
                format!("; --resume {} continues it", checkpoint.display()),
            ),
            false => (
                "a file at its checkpoint's place that is no training checkpoint",
                String::new(),
            ),
        };
        crate::note!(
            "{} holds {what}: this run replaces it when its first epoch ends (--out DIR keeps \
             both{resume})",
            dir.display(),
        );
    }
    RUN_FILES.map(|name| dir.join(name)).to_vec()
}

/// What a run stopped after training keeps: its checkpoint, whole, and the command that scores
/// it.
pub fn scored_again(checkpoint: &Path) -> String {
    format!(
        "the trained checkpoint {0} is whole, and `loren eval --checkpoint {0}` scores it",
        checkpoint.display()
    )
}

/// The files beside a run's checkpoint: `train`'s (the first [`REPORT_FILES`], which `compare`
/// writes too), and `loren eval`'s, which scored it.
pub const RUN_FILES: [&str; 7] = [
    "report.json",
    "reliability.svg",
    "training.svg",
    "predictions.safetensors",
    "eval.json",
    "eval-reliability.svg",
    "eval-predictions.safetensors",
];

/// The metadata key of how a run scores itself (the command line's flags for it, as JSON), which
/// a resumed run takes unless given others, and which its data check passes over.
pub const SCORING_KEY: &str = "scoring";

/// How many of [`RUN_FILES`] a run's report is.
pub const REPORT_FILES: usize = 4;

/// A folder in `out` named as one of the files a command will write there (`names`) fails it
/// only once its work is done, so it is refused first.
pub fn check_no_folder_in_the_way(out: &Path, names: &[&str]) -> Result<()> {
    match names.iter().map(|n| out.join(n)).find(|p| p.is_dir()) {
        Some(p) => bail!(
            "{} is a folder, where the run writes a file of that name",
            p.display()
        ),
        None => Ok(()),
    }
}

/// `path`, or the checkpoint in it when it is the folder `loren train --out` wrote one into.
pub fn checkpoint_in(path: &Path) -> PathBuf {
    let inside = path.join("checkpoint.safetensors");
    match path.is_dir() && inside.is_file() {
        true => inside,
        false => path.to_path_buf(),
    }
}

/// The training checkpoint `flag` names (by `--resume`, `--checkpoint`): a folder given for one
/// is one without a checkpoint.safetensors, the file `loren train` writes.
pub fn read_checkpoint(path: &Path, flag: &str) -> Result<TensorFile> {
    let file = read_model(path, flag)?;
    if crate::ensemble::is_export(&file) {
        bail!(
            "{flag} {}: an ensemble loren export wrote, which keeps the trained weights but not \
             the optimizer's state or the run's place: name the training checkpoint it was \
             exported from",
            path.display()
        );
    }
    Ok(file)
}

/// A trained model `flag` names (`eval --checkpoint`): a training checkpoint, as
/// [`read_checkpoint`] takes it, or an ensemble `loren export` wrote.
pub fn read_model(path: &Path, flag: &str) -> Result<TensorFile> {
    if path.is_dir() {
        bail!(
            "{flag} {}: a folder with no checkpoint.safetensors in it",
            path.display()
        );
    }
    let file = TensorFile::read(path).context(flag.to_string())?;
    if !crate::ensemble::is_export(&file) {
        check_format(&file).context(flag.to_string())?;
    }
    Ok(file)
}

/// Whether `file` continues the run `spec` describes, checked before the backbone is read and
/// anything allocated: the same data (first: other held-out classes would show as another head
/// width), then every setting, each difference named. The layer-norm epsilon comes with the
/// backbone's weights, so the trainer checks it as it resumes.
pub fn check_resume(spec: &RunSpec, file: &TensorFile) -> Result<()> {
    check_same_data(file, &spec.metadata, spec.verbosity)?;
    let vit = VitConfig {
        ln_eps: file.meta_json::<VitConfig>("vit")?.ln_eps,
        ..spec.vit.clone()
    };
    check_resumable(file, &vit, &spec.ensemble, &spec.train)?;
    Ok(())
}

/// A resumed run must train on the data the checkpoint was trained on: the metadata the run
/// records of its data (`spec.metadata`: the source, the held-out classes and the training
/// images' count and labels) must match. The same kind of source at another path (a moved
/// dataset, another machine) holding the same training images is taken with a note.
fn check_same_data(
    file: &TensorFile,
    ours: &HashMap<String, String>,
    verbosity: Verbosity,
) -> Result<()> {
    let kind = |source: &str| source.split(':').next().unwrap_or_default().to_string();
    let recorded_images = file.metadata().get(TRAINING_IMAGES_KEY);
    let same_images = recorded_images.is_none_or(|r| ours.get(TRAINING_IMAGES_KEY) == Some(r));
    // How the run scores itself may change on resume: it trains the same.
    let mut keys: Vec<&String> = ours.keys().filter(|k| *k != SCORING_KEY).collect();
    keys.sort();
    for key in keys {
        if key == TRAINING_IMAGES_KEY && recorded_images.is_none() {
            continue;
        }
        // A checkpoint from before these settings were recorded reads as their defaults.
        let saved = match key.as_str() {
            Normalize::KEY => Normalize::recorded(file.metadata())?.to_string(),
            TRAIN_ON_VAL_KEY => recorded_train_on_val(file.metadata())?.to_string(),
            _ => file
                .metadata()
                .get(key)
                .map_or("(none)", String::as_str)
                .to_string(),
        };
        let saved = saved.as_str();
        let now = ours[key].as_str();
        if saved == now {
            continue;
        }
        // Other images at another path are refused by their own key, with their counts.
        if key == "data" && kind(saved) == kind(now) {
            if same_images && verbosity == Verbosity::Normal {
                crate::note!(
                    "note: {} was trained on {saved}; resuming on {now}, taken to be the same data",
                    file.path().display()
                );
            }
            continue;
        }
        // A switch is named by its flag.
        let with = |on: &str| match on {
            "true" => "with --train-on-val",
            _ => "without --train-on-val",
        };
        let trained = match key.as_str() {
            TRAIN_ON_VAL_KEY => format!("{}, not {}", with(saved), with(now)),
            TRAINING_IMAGES_KEY => format!("on a training split of {saved}, not {now}"),
            _ => format!("with {key} '{saved}', not '{now}'"),
        };
        bail!(
            "{}: it was trained {trained}; resume with the same data",
            file.path().display()
        );
    }
    Ok(())
}

/// Train `spec.ensemble` from `backbone` on the train split, then evaluate it.
pub fn run(spec: &RunSpec, data: &Splits, backbone: &TensorFile) -> Result<RunResult> {
    let device = crate::open_device(spec.device)?;
    check_fits(spec, data, &device)?;
    // The validation probabilities of the last epoch scored, for fitting the temperature.
    let last_val_probs: Mutex<Option<Predictions>> = Mutex::default();
    let ens = &spec.ensemble;
    let mut model = Vit::new(&spec.vit, ens, &device, fine_tune_seed(spec.model_seed))?;
    model
        .load_backbone(backbone)
        .context("loading the backbone")?;
    let label = ens.method.name();

    let t0 = Instant::now();
    device.memory().reset_peaks();
    // Training and the evaluation after it both stop at Ctrl-C, each after a whole step or batch.
    let _ctrl_c = crate::interrupt::Guard::install();
    // What the run records of its data, its training images included for any caller.
    let mut data_metadata = spec.metadata.clone();
    data_metadata.insert(
        TRAINING_IMAGES_KEY.to_string(),
        crate::dataset::training_images(&data.train),
    );
    let summary = {
        let mut trainer = Trainer::new(&mut model, &spec.train, data.train.len())?;
        if let Some(file) = spec.resume.as_deref() {
            // check_resume said so already (with its note); this keeps run() safe for any caller
            // (resume checks the backbone itself).
            check_same_data(file, &data_metadata, Verbosity::Quiet)?;
            trainer.resume(file)?;
            let saved: TrainConfig = file.meta_json("train")?;
            if trainer.epoch() == spec.train.epochs {
                // Said even under -q: the run trains nothing, which the flags alone do not say.
                crate::note!(
                    "{label}: {} has trained all {} of its epochs: nothing is left to train, so \
                     it is scored and its report written (--epochs, more than {1}, trains it \
                     further)",
                    file.path().display(),
                    spec.train.epochs
                );
            } else if saved.epochs < spec.train.epochs && spec.verbosity == Verbosity::Normal {
                crate::note!(
                    "{label}: extending the run from {} to {} epochs: its learning-rate schedule \
                     stretches from here on",
                    saved.epochs,
                    spec.train.epochs
                );
            }
        }
        let replaces = spec.checkpoint.as_deref().map_or_else(Vec::new, |path| {
            replaced_by(path, spec.resume.as_deref().map(TensorFile::path))
        });
        let ckpt = CheckpointSpec {
            path: spec.checkpoint.clone(),
            // The data too, so eval and export find what it was trained on (the checkpoint
            // records the backbone the model was loaded from itself).
            metadata: {
                // Recorded after the resume's check, which a checkpoint from before it passes.
                let mut m = data_metadata.clone();
                m.insert(SPLIT_IMAGES_KEY.to_string(), split_images(data));
                m
            },
            replaces,
        };
        if spec.verbosity == Verbosity::Normal {
            // The first line of a log, and what a slow first step is slow at.
            let steps = trainer.total_steps() / spec.train.epochs.max(1) as u64;
            // A batch past the data is the data, one step an epoch: said, not left to be read
            // off a batch size no step had.
            let batch = match spec.train.batch_size > data.train.len() {
                true => format!("batch {}: all the images", spec.train.batch_size),
                false => format!("batch {}", spec.train.batch_size),
            };
            crate::note!(
                "{label}: M={} on {device}, {} training images, {} epoch{} of {steps} step{} \
                 ({batch})",
                ens.members,
                data.train.len(),
                spec.train.epochs,
                if spec.train.epochs == 1 { "" } else { "s" },
                if steps == 1 { "" } else { "s" },
            );
            let total = trainer.total_steps();
            // (A warm-up from zero of one step is warned of below.)
            if spec.train.warmup_steps >= total && !(spec.train.warmup_from_zero && total == 1) {
                let steps = match total {
                    1 => "its 1 step is".to_string(),
                    n => format!("its {n} steps are all"),
                };
                // From zero, the warm-up cut to the run ends a step short of the peak.
                let to = match spec.train.warmup_from_zero {
                    false => "to the peak".to_string(),
                    true => format!(
                        "from 0 to {:.0}% of the peak",
                        100.0 * (total - 1) as f64 / total as f64
                    ),
                };
                crate::note!(
                    "{label}: note: {steps} learning-rate warm-up (--warmup {}), which rises \
                     {to} over the whole run, with no decay",
                    spec.train.warmup_steps
                );
            }
        }
        // Said even under -q: the run would train nothing, which its flags do not say.
        if spec.train.warmup_from_zero && spec.train.warmup_steps > 0 && trainer.total_steps() == 1
        {
            crate::note!(
                "{label}: warning: the run's one step is the first of its warm-up from zero \
                 (--warmup-from-zero), at learning rate 0: it trains nothing"
            );
        }
        if let Some(val) = &data.val {
            // At the training batch size, so that scoring adds nothing to the training's peak
            // (and so on every path that scores it: see `validation_batch`).
            let batch = validation_batch(&spec.train);
            let kept = &last_val_probs;
            let validate = move |model: &Vit| {
                let scored = epoch_validation(model, val, batch)?;
                Ok(scored.map(|(scores, probs)| {
                    *kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(probs);
                    scores
                }))
            };
            trainer.validate_every(spec.val_every, Box::new(validate));
        }
        let mut bar = TrainBar::new(label, spec.verbosity);
        // train's runs, which write a checkpoint, take their rate from --lr alone; a comparison's
        // may take it from --lrs or --method-lr, and its warning names no flag.
        if spec.checkpoint.is_some() {
            bar = bar.lr_flag("--lr");
        }
        trainer.fit(&data.train, &ckpt, &mut bar)?
    };
    let memory = device.memory().report().into();
    let train_seconds = t0.elapsed().as_secs_f64() - summary.validation_seconds;

    let held_out = data.held_out.as_ref();
    let kept = spec
        .checkpoint
        .as_deref()
        .map_or_else(String::new, scored_again);
    // A prediction that is not a number, once trained, is the weights': said with where they are.
    let once_trained = |e: loren_nn::NnError| -> anyhow::Error {
        if !matches!(e, loren_nn::NnError::NotANumber { .. }) {
            return e.into();
        }
        let holds = match spec.checkpoint.as_deref() {
            Some(p) => format!(" (its checkpoint {} holds those weights)", p.display()),
            None => String::new(),
        };
        anyhow::Error::from(e).context(format!("scoring the trained ensemble{holds}"))
    };
    // The last epoch, when it was scored, was scored on the trained model.
    let last_scored = summary.epochs.last().and_then(|e| e.val);
    let mut validation_seconds = summary.validation_seconds;
    let val_report = match (
        &data.val,
        last_scored,
        last_val_probs
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
    ) {
        (None, ..) => None,
        (Some(val), Some(scored), Some(probs)) => Some((scored, probs, val)),
        (Some(val), ..) => {
            let batch = validation_batch(&spec.train);
            let (scored, probs) = score_validation(&model, val, batch, &mut |_| {
                crate::interrupt::scoring_stop(&kept)
            })
            .map_err(once_trained)?;
            validation_seconds += scored.seconds;
            Some((scored, probs, val))
        }
    };
    let eval = EvalOptions {
        temperature: val_report
            .as_ref()
            .map(|(_, probs, val)| fit_temperature(probs, &val.labels))
            .transpose()?,
        ..spec.eval.clone()
    };
    // The validation part's probabilities lead the kept ones: the temperature's fit set.
    let val_set = val_report
        .as_ref()
        .filter(|_| eval.keep_predictions)
        .map(|(_, probs, val)| ScoredSet::validation(probs.clone(), &val.labels));
    let val_report = val_report.map(|(scored, ..)| scored);
    let t1 = Instant::now();
    device.memory().reset_peaks();
    let mut bar = EvalBar::new(
        label,
        eval_images(&data.test, held_out, &data.ood_sets, &eval),
        spec.verbosity,
    );
    let mut report = evaluate(
        &model,
        &data.test,
        held_out,
        &data.ood_sets,
        &eval,
        &mut |n| {
            bar.inc(n);
            crate::interrupt::scoring_stop(&kept)
        },
    )
    .map_err(once_trained)?;
    drop(bar);
    let scoring_peak = device.memory().report().total_peak;
    report.predictions.splice(0..0, val_set);

    Ok(RunResult {
        method: ens.method,
        members: ens.members,
        rank: ens.method.uses_lora().then_some(ens.lora.rank),
        seed: spec.train.seed,
        device: device.to_string(),
        trainable_params: model.params().num_trainable(),
        total_params: model.params().num_total(),
        memory,
        scoring_peak,
        activations: spec.train.activations,
        train: summary,
        val_accuracy: val_report.map(|r| r.accuracy),
        val_nll: val_report.map(|r| r.nll),
        val_ece: val_report.map(|r| r.ece),
        validation_seconds,
        report,
        train_seconds,
        eval_seconds: t1.elapsed().as_secs_f64(),
        settings: RunSettings {
            vit: spec.vit.clone(),
            ensemble: spec.ensemble.clone(),
            train: spec.train.clone(),
            data: data_metadata.into_iter().collect(),
            model_seed: Some(spec.model_seed),
        },
    })
}

/// The batch the validation part is predicted in, wherever it is scored: an epoch's end, a run
/// that scored no epoch, a resumed one, `eval`. A prediction moves in its last bits with the
/// batch it is in (the CPU's matrix kernels block the batch differently), and one batch makes
/// the validation figures, the temperature fitted on them and every figure at that temperature
/// the same bits on every path.
pub fn validation_batch(train: &TrainConfig) -> usize {
    train.batch_size
}

/// The validation part's accuracy, NLL and ECE, and the probabilities behind them, predicted in
/// chunks of `batch`.
fn score_validation(
    model: &Vit,
    val: &Dataset,
    batch: usize,
    progress: &mut dyn FnMut(usize) -> loren_nn::Result<()>,
) -> loren_nn::Result<(EpochVal, Predictions)> {
    let t = Instant::now();
    let probs = predict(model, val, batch, progress)?;
    let c = calibration(&probs, &val.labels)?;
    let scores = EpochVal {
        accuracy: c.accuracy,
        nll: c.nll,
        ece: c.ece,
        seconds: t.elapsed().as_secs_f64(),
    };
    Ok((scores, probs))
}

/// [`score_validation`] at an epoch's end: a Ctrl-C meanwhile leaves the epoch unscored, and
/// training stops once its checkpoint is written, before the next epoch's first step.
fn epoch_validation(
    model: &Vit,
    val: &Dataset,
    batch: usize,
) -> loren_nn::Result<Option<(EpochVal, Predictions)>> {
    match score_validation(model, val, batch, &mut |_| {
        crate::interrupt::scoring_stop("")
    }) {
        Err(loren_nn::NnError::EvalInterrupted { .. }) => Ok(None),
        scored => scored.map(Some),
    }
}

/// Refuse, before anything is allocated, a run that the analytic memory model says will not fit
/// in what the device has free: on a GPU it would fail part-way, and on the CPU a failed
/// allocation aborts the process.
fn check_fits(spec: &RunSpec, data: &Splits, device: &Device) -> Result<()> {
    match budget_for(device, None) {
        Some(budget) => check_fits_within(spec, data, device, &budget),
        None => Ok(()),
    }
}

/// Refuse a run the analytic memory model says will not fit in `budget`, with an error that
/// says what it needs and what would fit (`train` and `compare` check against free memory).
pub fn check_fits_within(
    spec: &RunSpec,
    data: &Splits,
    device: &Device,
    budget: &Budget,
) -> Result<()> {
    // No batch is larger than the data it is cut from.
    let train_batch = spec.train.batch_size.min(data.train.len());
    let eval_batch = spec.eval.batch_size.min(
        eval_images(
            &data.test,
            data.held_out.as_ref(),
            &data.ood_sets,
            &spec.eval,
        )
        .max(data.val.as_ref().map_or(0, |v| v.len())),
    );
    // The tensors' peak, and what it needs from the budget (on the CPU, room for the buffer pool).
    let peak = |members, activations| -> Result<u64> {
        let ensemble = EnsembleConfig {
            members,
            ..spec.ensemble.clone()
        };
        let at = |batch| {
            memory_model::predict(
                &spec.vit,
                &ensemble,
                batch,
                spec.train.optimizer.state_tensors(),
                precision(device),
                activations,
            )
        };
        let train = at(train_batch)?.train.total_peak;
        let eval = at(eval_batch)?.inference.total_peak;
        Ok(train.max(eval))
    };
    let need = |members, activations| {
        Ok::<_, anyhow::Error>(need_for_peak(peak(members, activations)?, device))
    };
    let ens = &spec.ensemble;
    let activations = spec.train.activations;
    let tensor_peak = peak(ens.members, activations)?;
    let kept = need_for_peak(tensor_peak, device);
    if kept <= budget.bytes {
        return Ok(());
    }
    let cpu_pool = if device.is_cpu() {
        format!(
            " (a tensor peak of {}, {CPU_RSS_FACTOR}x that for the CPU's buffer pool, and {} \
             besides)",
            bytes(tensor_peak),
            bytes(CPU_RSS_MARGIN)
        )
    } else {
        String::new()
    };
    let what = format!(
        "{} with {} members on {} at batch {} (evaluation batch {}) is predicted to need {} of \
         memory{cpu_pool}, and {} is available ({})",
        ens.method.name(),
        ens.members,
        spec.vit.name,
        train_batch,
        eval_batch,
        bytes(kept),
        bytes(budget.bytes),
        budget.source
    );
    // The most members that fit as the run is set (memory grows with M).
    let (mut lo, mut hi) = (0, ens.members);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if need(mid, activations)? <= budget.bytes {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let mut ways = Vec::new();
    if activations == Activations::Keep {
        let recomputed = need(ens.members, Activations::Recompute)?;
        if recomputed <= budget.bytes {
            ways.push(format!(
                "pass --recompute (predicted to need {})",
                bytes(recomputed)
            ));
        }
    }
    if lo > 0 && !ens.method.is_single() {
        ways.push(format!("--members {lo} fits"));
    }
    ways.push("try a smaller --batch-size or --eval-batch-size".to_string());
    let last = ways.pop().unwrap_or_default();
    match ways.is_empty() {
        true => bail!("{what}: {last}"),
        false => bail!("{what}: {}, or {last}", ways.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use loren_nn::config::LoraConfig;
    use loren_nn::eval::EvalOptions;

    use super::*;
    use crate::dataset::DataSource;

    fn spec(members: usize, activations: Activations) -> RunSpec {
        let vit = VitConfig::tiny();
        let ensemble = EnsembleConfig {
            drop_key: EnsembleConfig::DROP_KEY,
            method: Method::Lora,
            members,
            classes: 10,
            lora: LoraConfig::default(),
        };
        let mut train = crate::bench::bench_train_config(32, 0, activations);
        train.epochs = 1;
        RunSpec {
            vit,
            ensemble,
            train,
            model_seed: 0,
            device: DeviceSpec::Cpu,
            checkpoint: None,
            resume: None,
            eval: EvalOptions {
                batch_size: 32,
                shift: false,
                ood: false,
                temperature: None,
                keep_predictions: false,
            },
            val_every: 0,
            verbosity: Verbosity::Quiet,
            metadata: HashMap::new(),
        }
    }

    #[test]
    fn a_run_predicted_not_to_fit_is_refused_with_what_would_fit() {
        let device = Device::cpu();
        let data = "digits"
            .parse::<DataSource>()
            .unwrap()
            .splits(&[], &VitConfig::tiny(), Normalize::Dataset, false)
            .unwrap();
        let nothing = Budget {
            bytes: 1,
            source: "test".into(),
        };
        let err = check_fits_within(&spec(8, Activations::Keep), &data, &device, &nothing)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("lora with 8 members on tiny at batch 32"),
            "{err}"
        );
        assert!(
            !err.contains("--recompute"),
            "1 byte fits neither way: {err}"
        );

        // Between what keeping and what recomputing need: only --recompute fits, and says so.
        let kept = predicted(&spec(8, Activations::Keep), &device);
        let recomputed = predicted(&spec(8, Activations::Recompute), &device);
        assert!(recomputed < kept);
        let between = Budget {
            bytes: (kept + recomputed) / 2,
            source: "test".into(),
        };
        let err = check_fits_within(&spec(8, Activations::Keep), &data, &device, &between)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "pass --recompute (predicted to need {})",
                bytes(recomputed)
            )),
            "{err}"
        );
        check_fits_within(&spec(8, Activations::Recompute), &data, &device, &between).unwrap();
        let enough = Budget {
            bytes: kept,
            source: "test".into(),
        };
        check_fits_within(&spec(8, Activations::Keep), &data, &device, &enough).unwrap();

        // Room for five members as they are set, or for one, the least there is: the error
        // says so.
        for fits in [5, 1] {
            let budget = Budget {
                bytes: predicted(&spec(fits, Activations::Keep), &device),
                source: "test".into(),
            };
            let err = check_fits_within(&spec(8, Activations::Keep), &data, &device, &budget)
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("--members {fits} fits")), "{err}");
        }
    }

    /// What a run of `spec` on the digits needs, from the model directly.
    fn predicted(spec: &RunSpec, device: &Device) -> u64 {
        let model = memory_model::predict(
            &spec.vit,
            &spec.ensemble,
            32,
            2,
            precision(device),
            spec.train.activations,
        )
        .unwrap();
        crate::bench::predicted_need(&model, device)
    }
}
