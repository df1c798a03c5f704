//! The argument groups commands share, and how they become configs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use loren::curves::{curve, learning_curves_svg};
use loren::dataset::{DataSource, Normalize, TRAIN_ON_VAL_KEY};
use loren::outputs::{ClaimedDir, remove_stale};
use loren::progress::{Verbosity, reading_images};
use loren::report::split_phrase;
use loren::run::{RunResult, RunSpec, SCORING_KEY};
use loren_autograd::optim::OptimizerKind;
use loren_nn::checkpoint::write_atomic;
use loren_nn::config::{Activations, EnsembleConfig, LoraConfig, Method, Targets, VitConfig};
use loren_nn::data::Dataset;
use loren_nn::data::folder::{PassedOver, passed_over, passed_over_set};
use loren_nn::data::{Augment, Splits};
use loren_nn::eval::{EvalOptions, EvalReport, write_predictions};
use loren_nn::reliability::reliability_svg;
use loren_nn::train::TrainConfig;
use loren_tensor::DeviceSpec;

#[derive(Args, Clone)]
pub struct Common {
    /// Where to run: auto (a GPU when one can be used, else the CPU), cpu, cuda (GPU 0; gpu
    /// says the same) or cuda:N (GPU N, from 0).
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Print only the report: no progress bars, progress lines or notes. Warnings still show
    /// (a GPU --device auto cannot use; in training, an earlier run this one replaces and an
    /// epoch with steps skipped for gradients that were not finite).
    #[arg(long, short)]
    pub quiet: bool,
}

/// The seed of the commands that train.
#[derive(Args, Clone)]
pub struct SeedArgs {
    /// Seeds training: the members' start, the data order and augmentation. The data split is
    /// fixed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
}

impl Common {
    pub fn device(&self) -> Result<DeviceSpec> {
        Ok(self.device.parse::<DeviceSpec>()?)
    }

    pub fn verbosity(&self) -> Verbosity {
        if self.quiet {
            Verbosity::Quiet
        } else {
            Verbosity::Normal
        }
    }
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// The ViT: tiny (the bundled digits: 8x8 images, 17 tokens, width 64, depth 4), vit-b-32 or vit-b-16.
    #[arg(long, default_value = "tiny")]
    pub config: String,
    /// Pretrained backbone (safetensors). Default: the repository's assets/backbone-<config>.safetensors
    /// (for tiny, pretrained first when missing; vit-b-32 and vit-b-16 need real weights: see the
    /// README).
    #[arg(long, value_parser = text_path)]
    pub backbone: Option<PathBuf>,
}

#[derive(Args, Clone)]
pub struct EnsembleArgs {
    /// lora (LoRA-Ensemble), explicit (M fully fine-tuned copies), single, single-lora, or
    /// mc-dropout (one fully fine-tuned network, DropKey on its attention, a head per member; each
    /// member is one stochastic pass, in training and in prediction).
    #[arg(long, default_value = "lora")]
    pub method: String,
    /// Ensemble members (single and single-lora are one network) [default: 8].
    #[arg(long, short = 'm', allow_negative_numbers = true)]
    pub members: Option<usize>,
    /// LoRA rank r of each adapter.
    #[arg(long, short = 'r', default_value_t = 8, allow_negative_numbers = true)]
    pub rank: usize,
    /// LoRA scale s in y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ.
    #[arg(long, value_parser = f32_arg, default_value_t = 1.0, allow_hyphen_values = true)]
    pub lora_scale: f32,
    /// Which attention projections get adapters: q, k, v and o, each at most once (e.g. qv).
    #[arg(long, default_value = "qkvo")]
    pub lora_targets: String,
    /// Gain of the Xavier-uniform start of A; large gains start the members far apart.
    #[arg(long, value_parser = f32_arg, default_value_t = 10.0, allow_hyphen_values = true)]
    pub lora_gain: f32,
    /// mc-dropout: the probability that an attention score is dropped (DropKey), the paper's
    /// p_drop.
    #[arg(long, value_parser = f32_arg, default_value_t = EnsembleConfig::DROP_KEY, allow_hyphen_values = true)]
    pub drop_key: f32,
}

impl EnsembleArgs {
    pub fn members(&self) -> usize {
        self.members.unwrap_or(8)
    }

    /// Refuse adapter settings no ensemble can use, naming the flag, before anything slow starts.
    pub fn check(&self) -> Result<()> {
        if !(self.lora_scale.is_finite() && self.lora_scale != 0.0) {
            bail!(
                "--lora-scale {}: must be finite and not 0 (at 0 the adapters change nothing, and \
                 learn nothing)",
                self.lora_scale
            );
        }
        if !(self.lora_gain.is_finite() && self.lora_gain > 0.0) {
            bail!("--lora-gain {}: must be finite and above 0", self.lora_gain);
        }
        if !(0.0..1.0).contains(&self.drop_key) {
            bail!(
                "--drop-key {}: a probability of dropping a score, at least 0 and below 1",
                self.drop_key
            );
        }
        check_targets(&self.lora_targets)
    }
}

/// `Targets` takes any string of q, k, v and o, so "qq" would pass for "q": a repeated letter is
/// more likely a typo for another projection than meant, so it is refused here.
fn check_targets(t: &str) -> Result<()> {
    if t.is_empty() {
        bail!("--lora-targets is empty: name at least one of q, k, v, o (e.g. qv)");
    }
    for (i, c) in t.char_indices() {
        if !"qkvo".contains(c) {
            bail!("--lora-targets '{t}': '{c}' is not one of q, k, v, o");
        }
        if t[..i].contains(c) {
            bail!(
                "--lora-targets '{t}': '{c}' is named twice; name each of q, k, v, o at most once"
            );
        }
    }
    Ok(())
}

// The numeric flags, here and in EnsembleArgs, take a value with a leading '-' (the floats even
// one clap would not read as a number, e.g. -1e-5), so `--lr -1` reaches the checks below and
// gets their error, not clap's "unexpected argument '-1' found".
#[derive(Args, Clone)]
pub struct OptimArgs {
    /// Passes over the training split.
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    pub epochs: usize,
    /// Training images per step (every member sees the same batch).
    #[arg(long, default_value_t = 32, allow_negative_numbers = true)]
    pub batch_size: usize,
    /// Peak learning rate (default: 3e-4 for the single networks, single and single-lora; 1e-3
    /// for the ensembles, explicit, lora and mc-dropout: each method's rate chosen on validation
    /// by `loren compare --lrs 3e-4,1e-3,3e-3 --seeds 0,1,2,3` on the bundled digits).
    #[arg(long, value_parser = f32_arg, allow_hyphen_values = true)]
    pub lr: Option<f32>,
    /// Learning rate at the end of the cosine decay.
    #[arg(long, value_parser = f32_arg, default_value_t = 1e-5, allow_hyphen_values = true)]
    pub min_lr: f32,
    /// Linear warmup steps before the cosine decay (a warmup past the run's steps is cut to
    /// them, which the run says: the rate then rises over the whole run).
    #[arg(long, default_value_t = 50, allow_negative_numbers = true)]
    pub warmup: u64,
    /// Score the validation part after every N epochs and after the last: accuracy, NLL and
    /// ECE on each epoch's line, in report.json's train.epochs and in DIR/training.svg, the
    /// learning curves. 0 scores it only once trained. It changes nothing in the training, so a
    /// resumed run may take another (the epochs scored before are kept); left out, the run's own.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        allow_negative_numbers = true
    )]
    pub val_every: usize,
    /// Start the warmup (--warmup N, N > 0) at learning rate 0, as the LoRA-Ensemble paper's
    /// code does: step k of the warmup at k/N of the peak, so its first step moves no weight
    /// and only feeds the optimizer's state (AdamW's moments, SGD's momentum). By default step
    /// k is at (k+1)/N, and no step is spent.
    #[arg(long)]
    pub warmup_from_zero: bool,
    /// AdamW's decoupled weight decay (or SGD's L2 penalty), on weight matrices only.
    #[arg(long, value_parser = f32_arg, default_value_t = 0.01, allow_hyphen_values = true)]
    pub weight_decay: f32,
    /// adamw or sgd (with --momentum).
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// SGD's momentum, in [0, 1) (adamw does not use it).
    #[arg(long, value_parser = f32_arg, default_value_t = 0.9, allow_hyphen_values = true)]
    pub momentum: f32,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    pub grad_clip: f64,
    /// Training augmentation: none; digits (rotation ±10°, translation ±1 px); or paper (the
    /// LoRA-Ensemble paper's CIFAR setup, as its code has it: horizontal and vertical flips and
    /// a rotation taking the nearest pixel, which together turn images to any angle, mirrored
    /// half the time).
    #[arg(long, default_value = "none")]
    pub augment: String,
    /// A resumed run's augmentation when it is none of the presets (`--augment paper` from
    /// before its rotation took the nearest pixel), used in place of `augment`.
    #[arg(skip)]
    pub saved_augment: Option<Augment>,
    /// Train on the images in the dataset's own order every epoch, where the default draws a
    /// fresh seeded order for each (the LoRA-Ensemble paper's code does not shuffle). That is
    /// the files' order for CIFAR, and class by class for an image folder.
    #[arg(long)]
    pub no_shuffle: bool,
    /// Train on the validation part too, and report no validation figures: all 50,000 CIFAR
    /// training images, as the LoRA-Ensemble paper does (90% without the flag), or 80% of an
    /// image folder (70%). The test part is the same either way.
    #[arg(long)]
    pub train_on_val: bool,
    /// Keep only each transformer block's input in the forward and run the block again in the
    /// backward: far less activation memory (for large batches or ViT-B at many members), a
    /// third to a half more time per step, the same gradients bit for bit.
    #[arg(long)]
    pub recompute: bool,
}

impl OptimArgs {
    /// Refuse optimizer settings no training can use, naming the flag, before anything slow
    /// starts. NaN fails every comparison, hence the positive forms (`!(x >= 0.0)`).
    pub fn check(&self) -> Result<()> {
        if let Some(lr) = self.lr
            && !(lr.is_finite() && lr > 0.0)
        {
            bail!("--lr {lr}: must be finite and above 0");
        }
        if !(self.min_lr.is_finite() && self.min_lr >= 0.0) {
            bail!("--min-lr {}: must be finite and not negative", self.min_lr);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!(
                "--weight-decay {}: must be finite and not negative",
                self.weight_decay
            );
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!("--momentum {}: must be in [0, 1)", self.momentum);
        }
        // 0 is the documented "off"; a negative or NaN clip would silently be off too.
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            bail!(
                "--grad-clip {}: must be finite and not negative (0 turns clipping off)",
                self.grad_clip
            );
        }
        Ok(())
    }
}

#[derive(Args, Clone)]
pub struct DataArgs {
    /// The dataset: digits (the bundled 8x8 digits), digits:PATH (the same gzipped CSV format),
    /// cifar10:DIR or cifar100:DIR (the official binary version), or folder:DIR (one subfolder of
    /// PNG or JPEG images per class). Images are resized to the model's size.
    /// Default: digits.
    #[arg(long)]
    pub data: Option<String>,
    /// Classes to hold out of fine-tuning and test, and score as out-of-distribution: by name
    /// (cat,dog: a folder's subfolder names, CIFAR's class names) or by number from 0 in the
    /// data's class order (8,9; a folder's subfolders sort byte-wise: 0, 1, 10, 2, ...), a
    /// number always counting. The run's first lines name them. Fine-tuning never sees them;
    /// the backbone may have: the bundled digits backbone was pretrained on all ten classes, as
    /// an ImageNet-pretrained ViT may have seen a CIFAR class.
    #[arg(long, value_delimiter = ',', value_name = "CLASS")]
    pub holdout_classes: Vec<ClassRef>,
    /// Skip the shifted test sets: the test images under gaussian noise, rotation and pixel
    /// dropout at 5 severities each, scored for accuracy and ECE.
    #[arg(long)]
    pub no_shift: bool,
    /// Skip out-of-distribution detection: the test images against every test image inverted, as
    /// many noise images and any held-out classes, scored by AUROC, AUPR and FPR at 95% TPR.
    #[arg(long)]
    pub no_ood: bool,
    /// Also score OOD detection against this dataset's test images, as --data names one (e.g.
    /// a CIFAR-10 model against cifar100:DIR, or an image folder: of classes, its test part;
    /// without class subfolders, every image in it): brought to the model's size and scaled as
    /// the training data is. Repeat the flag for several; each is reported apart.
    #[arg(long, value_name = "DATA")]
    pub ood_data: Vec<String>,
    /// Batch size for evaluation: the test part, shifted and OOD sets. The validation part,
    /// which fits the temperature, is predicted at the run's training batch size on every path,
    /// so that its figures are the same bits wherever they are scored.
    #[arg(long, default_value_t = 256)]
    pub eval_batch_size: usize,
    /// Also write every member's probabilities on every scored set (validation, test, each shift
    /// and severity, OOD), with the labels, to predictions.safetensors beside report.json (eval:
    /// eval-predictions.safetensors beside eval.json), for analysis elsewhere: tensors
    /// NAME/probs [M, N, C] and NAME/labels [N] (safetensors.numpy.load_file reads them).
    #[arg(long)]
    pub save_predictions: bool,
    /// How images are scaled for the model: dataset ((x - mean) / std per channel with the
    /// dataset's statistics: see the README's table of datasets) or none (pixels in [0, 1], as
    /// the LoRA-Ensemble paper's code feeds them). Default: dataset; a resumed run and `eval`
    /// take the checkpoint's.
    #[arg(long)]
    pub normalize: Option<String>,
    /// The checkpoint `--data` and `--ood-data` were taken from, where they were (a resumed run,
    /// `eval`): reading them may fail long after, and the error then names where they came from
    /// instead of a flag the user never gave.
    #[arg(skip)]
    pub taken_from: Option<TakenFrom>,
}

/// Which of [`DataArgs`]'s data flags a checkpoint gave, and which checkpoint.
#[derive(Clone, Debug)]
pub struct TakenFrom {
    pub checkpoint: PathBuf,
    pub data: bool,
    pub ood_data: bool,
}

impl DataArgs {
    /// What an error reading `--data` (`ood` false) or an `--ood-data` `given` says first: the
    /// checkpoint it came from, where one did and its place is gone (a file there that cannot
    /// be read is another matter, which the error names).
    fn taken(&self, ood: bool, given: &str) -> Option<String> {
        let flag = if ood { "--ood-data" } else { "--data" };
        let t = self.taken_from.as_ref()?;
        let gone = given.parse::<DataSource>().ok()?.place()?.try_exists().ok() == Some(false);
        (gone && if ood { t.ood_data } else { t.data }).then(|| {
            format!(
                "{flag} {given}, as {} saved it (if it moved, give {flag} with its new place)",
                t.checkpoint.display()
            )
        })
    }

    pub fn check(&self) -> Result<()> {
        if self.eval_batch_size == 0 {
            bail!("--eval-batch-size 0: must be at least 1");
        }
        if self.no_ood && !self.ood_data.is_empty() {
            bail!("--ood-data with --no-ood: --no-ood skips OOD detection; leave one of them out");
        }
        for (i, source) in self.ood_data.iter().enumerate() {
            source.parse::<DataSource>().context("--ood-data")?;
            if self.ood_data[..i].contains(source) {
                bail!("--ood-data {source} is given twice: each set is scored once");
            }
        }
        self.normalize()?;
        Ok(())
    }

    /// The data `--data` names, or the default.
    pub fn source(&self) -> Result<DataSource> {
        Ok(self.data.as_deref().unwrap_or("digits").parse()?)
    }

    /// `--holdout-classes` as numbers in the data's class order, sorted, once each (8,9 and 9,8
    /// are the same data). A name is looked up among the data's classes, which reads only
    /// names; a number is checked when the data is split.
    pub fn held_out_classes(&self) -> Result<Vec<u32>> {
        let needs_names = self
            .holdout_classes
            .iter()
            .any(|c| matches!(c, ClassRef::Name(_)));
        let source = self.source()?;
        let names = match needs_names {
            true => source.class_names(&[])?,
            false => Vec::new(),
        };
        let mut classes = self
            .holdout_classes
            .iter()
            .map(|class| match class {
                ClassRef::Number(n) => Ok(*n),
                ClassRef::Name(name) => match names.iter().position(|n| n == name) {
                    Some(c) => Ok(c as u32),
                    None => bail!(
                        "--holdout-classes {name}: {source} has no class of that name; its \
                         classes are {}",
                        listed(&names)
                    ),
                },
            })
            .collect::<Result<Vec<u32>>>()?;
        classes.sort_unstable();
        classes.dedup();
        Ok(classes)
    }

    /// `--normalize`, or the default.
    pub fn normalize(&self) -> Result<Normalize> {
        match &self.normalize {
            Some(n) => n.parse().context("--normalize"),
            None => Ok(Normalize::default()),
        }
    }
}

/// The data for a model of config `vit` (its channels and image size), with the validation
/// part trained on when `train_on_val`.
/// The `--ood-data` sets come with them, in order.
pub fn splits(
    data: &DataArgs,
    vit: &VitConfig,
    train_on_val: bool,
    verbosity: Verbosity,
) -> Result<Splits> {
    let source = data.source()?;
    let held_out = data.held_out_classes()?;
    let normalize = data.normalize()?;
    let mut splits = reading_images("reading", verbosity, || {
        source.splits(&held_out, vit, normalize, train_on_val)
    })
    .map_err(|e| match data.taken(false, &source.to_string()) {
        Some(taken) => anyhow::Error::from(e).context(taken),
        None => e.into(),
    })?;
    if let (DataSource::Folder(dir), Verbosity::Normal) = (&source, verbosity) {
        note_passed_over(&source, &passed_over(dir));
    }
    if verbosity == Verbosity::Normal {
        if let Some(held) = &splits.held_out {
            note_held_out(&source, &held_out, &held.class_names, !data.no_ood);
        }
        note_unscored_classes(&source, &splits);
        if let DataSource::Digits(Some(_)) = source {
            loren::note!(
                "note: {source} is split as the bundled digits are: {} of its images (40%) are \
                 the pretraining part, which a run from a backbone does not train on",
                splits.pretrain.len()
            );
        }
    }
    for ood in &data.ood_data {
        let parsed = ood.parse::<DataSource>();
        // With classes held out, the in-distribution test part lacks them and the set does not.
        if let (Ok(same), Verbosity::Normal) = (&parsed, verbosity)
            && same.same_as(&source)
            && held_out.is_empty()
        {
            loren::note!(
                "note: --ood-data {ood} is the data scored in distribution: its test images are \
                 scored against themselves, which no score tells apart (AUROC 0.5)"
            );
        }
        if let (Ok(DataSource::Folder(dir)), Verbosity::Normal) = (&parsed, verbosity) {
            note_passed_over(&format!("--ood-data {ood}"), &passed_over_set(dir));
        }
        let set = parsed
            .and_then(|s| reading_images("reading", verbosity, || s.ood_set(vit, &splits.test)))
            .with_context(|| {
                data.taken(true, ood)
                    .unwrap_or_else(|| format!("--ood-data {ood}"))
            })?;
        splits.ood_sets.push(set);
    }
    Ok(splits)
}

/// The flags given (`is_given`, by clap id) that change nothing for any of `methods`: said, not
/// silently ignored, and not refused either, so that one command line loops over the methods.
pub fn unused_flags(
    methods: &[Method],
    optim: &OptimArgs,
    is_given: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    // "explicit has no adapters", "none of single, explicit has adapters".
    let lacks = |what: &str| match methods {
        [m] => format!("{} has no {what}", m.name()),
        _ => {
            let names: Vec<&str> = methods.iter().map(|m| m.name()).collect();
            format!("none of {} has {what}", names.join(", "))
        }
    };
    let lora_flags = ["rank", "lora_scale", "lora_targets", "lora_gain"];
    let no_lora = !methods.iter().any(|m| m.uses_lora());
    let no_dropout = !methods.iter().any(|m| m.drops_keys());
    lora_flags
        .iter()
        .filter(|f| no_lora && is_given(f))
        .map(|f| format!("--{} ({})", f.replace('_', "-"), lacks("adapters")))
        .chain(
            (no_dropout && is_given("drop_key"))
                .then(|| format!("--drop-key ({})", lacks("dropout"))),
        )
        .chain(
            (optim.optimizer == "adamw" && is_given("momentum"))
                .then(|| "--momentum (adamw does not use it)".to_string()),
        )
        .chain(
            (optim.warmup == 0 && is_given("warmup_from_zero"))
                .then(|| "--warmup-from-zero (there is no warmup: --warmup 0)".to_string()),
        )
        .collect()
}

/// Say the flags [`unused_flags`] found, for a `what` (run, comparison).
pub fn note_unused(unused: &[String], what: &str) {
    if !unused.is_empty() {
        loren::note!("note: this {what} does not use {}", unused.join(", "));
    }
}

/// An output folder inside an image folder the run reads (`--data` or `--ood-data`) is refused:
/// it would read as a class of no images there (or change a folder of images into one of
/// classes), and every later run on that data would fail.
pub fn check_out_outside_data(out: &Path, data: &DataArgs) -> Result<()> {
    let sources = data.data.iter().chain(&data.ood_data);
    for (flag, given) in std::iter::once("--data")
        .chain(std::iter::repeat("--ood-data"))
        .zip(sources)
    {
        let Ok(DataSource::Folder(dir)) = given.parse::<DataSource>() else {
            continue;
        };
        let (Ok(dir), Some(out)) = (dir.canonicalize(), resolved(out)) else {
            continue;
        };
        if out.starts_with(&dir) {
            bail!(
                "{}: an output folder inside {flag} {given} would read as a class of images \
                 there; name one outside it (--out DIR)",
                out.display()
            );
        }
    }
    Ok(())
}

/// `path` with its symbolic links and `..` resolved: what exists by the filesystem, what does
/// not (which has no links yet) by its words, `..` taking one back.
fn resolved(path: &Path) -> Option<PathBuf> {
    use std::path::Component;
    // A bare file's folder (a resumed checkpoint named alone) is the working one.
    let path = match path.as_os_str().is_empty() {
        true => Path::new("."),
        false => path,
    };
    let absolute = std::path::absolute(path).ok()?;
    let mut real = PathBuf::from("/");
    let mut exists = true;
    for part in absolute.components() {
        match part {
            // Back out of a folder that is not there, into one that is: by the filesystem again.
            Component::ParentDir => {
                real.pop();
                exists = real.exists();
            }
            Component::CurDir => {}
            Component::Prefix(_) | Component::RootDir => real.push(part),
            Component::Normal(name) => {
                real.push(name);
                if exists {
                    match real.canonicalize() {
                        Ok(r) => real = r,
                        Err(_) => exists = false,
                    }
                }
            }
        }
    }
    Some(real)
}

/// What an image folder holds that its dataset leaves out, said once, so that no file is
/// dropped without a word.
pub fn note_passed_over(source: &dyn std::fmt::Display, left: &PassedOver) {
    if left.is_empty() {
        return;
    }
    let folders = left.folders.iter().map(|f| {
        format!(
            "{}{} (a folder: a class's images go directly in its class folder)",
            f.display(),
            std::path::MAIN_SEPARATOR
        )
    });
    let files = left
        .files
        .iter()
        .map(|(f, what)| format!("{} ({what})", f.display()));
    // Folders first: a class's images in a subfolder are the likeliest of these to matter.
    let all: Vec<String> = folders.chain(files).collect();
    const SHOWN: usize = 5;
    let more = match all.len().saturating_sub(SHOWN) {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    loren::note!(
        "note: {source}: passed over {} that it does not read: {}{more}",
        counted(left.files.len(), left.folders.len()),
        all[..all.len().min(SHOWN)].join(", ")
    );
}

/// A class as `--holdout-classes` gives it: a number counts in the data's class order, anything
/// else is a class's name.
#[derive(Clone, Debug, PartialEq)]
pub enum ClassRef {
    Number(u32),
    Name(String),
}

impl std::str::FromStr for ClassRef {
    type Err = String;

    fn from_str(s: &str) -> Result<ClassRef, String> {
        match s.parse::<u32>() {
            Ok(n) => Ok(ClassRef::Number(n)),
            Err(_) if s.is_empty() => Err("an empty class (two commas, or one at an end)".into()),
            Err(_) => Ok(ClassRef::Name(s.to_string())),
        }
    }
}

impl std::fmt::Display for ClassRef {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            ClassRef::Number(n) => write!(f, "{n}"),
            ClassRef::Name(name) => write!(f, "{name}"),
        }
    }
}

/// Up to 20 names, then how many more.
fn listed(names: &[String]) -> String {
    const SHOWN: usize = 20;
    let shown = names[..names.len().min(SHOWN)].join(", ");
    match names.len().saturating_sub(SHOWN) {
        0 => shown,
        n => format!("{shown} and {n} more"),
    }
}

/// The classes held out (`holdout`, sorted), by number and name (`names`: all the data's classes):
/// `--holdout-classes` counts in the data's class order, which for a folder is its subfolders'
/// byte order (0, 1, 10, 2, ...), so the name is what says which class it is.
fn note_held_out(source: &DataSource, holdout: &[u32], names: &[String], ood: bool) {
    let named: Vec<String> = holdout
        .iter()
        .map(|&c| format!("{c} (`{}`)", names[c as usize]))
        .collect();
    let scored = match ood {
        true => "scored as out-of-distribution",
        false => "not scored (--no-ood)",
    };
    loren::note!(
        "note: {source}: holding out class{} {} of {}, never trained on and {scored}",
        if named.len() == 1 { "" } else { "es" },
        named.join(", "),
        names.len()
    );
}

/// Classes with too few images for the split to give the test part (or validation) any: their
/// accuracy and calibration go unmeasured, and a class missing from validation is missing
/// from the temperature's fit. The images counted are those split for fine-tuning (the
/// digits' pretraining part is said apart).
fn note_unscored_classes(source: &DataSource, splits: &Splits) {
    let parts = [Some(&splits.test), splits.val.as_ref()];
    let counts: Vec<Option<Vec<usize>>> =
        parts.iter().map(|d| d.map(Dataset::class_counts)).collect();
    let trained = splits.train.class_counts();
    // Classes grouped by the parts they miss, each with its count of images: one line a group.
    let mut groups: Vec<(Vec<&str>, Vec<String>)> = Vec::new();
    for (c, name) in splits.test.class_names.iter().enumerate() {
        let missing: Vec<&str> = counts
            .iter()
            .zip(["test", "validation"])
            .filter(|(n, _)| n.as_ref().is_some_and(|n| n[c] == 0))
            .map(|(_, part)| part)
            .collect();
        if missing.is_empty() {
            continue;
        }
        let images = trained[c] + counts.iter().flatten().map(|n| n[c]).sum::<usize>();
        let class = format!(
            "`{name}` ({images} image{})",
            if images == 1 { "" } else { "s" }
        );
        match groups.iter_mut().find(|(m, _)| *m == missing) {
            Some((_, classes)) => classes.push(class),
            None => groups.push((missing, vec![class])),
        }
    }
    for (missing, classes) in groups {
        loren::note!(
            "note: {source}: too few images to have any in the {} part{}, so unscored there: \
             class{} {}",
            missing.join(" or "),
            if missing.len() == 1 { "" } else { "s" },
            if classes.len() == 1 { "" } else { "es" },
            classes.join(", ")
        );
    }
}

/// "2 files and 1 folder", "1 file", "3 folders".
fn counted(files: usize, folders: usize) -> String {
    let of = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    match (files, folders) {
        (f, 0) => of(f, "file"),
        (0, d) => of(d, "folder"),
        (f, d) => format!("{} and {}", of(f, "file"), of(d, "folder")),
    }
}

/// What `eval` needs to rebuild the same data, and a resumed run to train on it: the source,
/// the held-out classes, the normalisation and whether the validation part trained.
pub fn data_metadata(data: &DataArgs, train_on_val: bool) -> Result<HashMap<String, String>> {
    let holdout: Vec<String> = data
        .held_out_classes()?
        .iter()
        .map(u32::to_string)
        .collect();
    Ok(HashMap::from([
        (
            "data".to_string(),
            // Recorded absolute, so `eval` finds it from any directory.
            match data.data.as_deref().map(str::parse::<DataSource>) {
                Some(Ok(source)) => source.absolute().to_string(),
                Some(Err(_)) => data.data.clone().unwrap_or_default(),
                None => "digits".into(),
            },
        ),
        ("holdout_classes".to_string(), holdout.join(",")),
        (
            Normalize::KEY.to_string(),
            data.normalize().unwrap_or_default().to_string(),
        ),
        (TRAIN_ON_VAL_KEY.to_string(), train_on_val.to_string()),
    ]))
}

/// How a run scores itself, as its checkpoint records it ([`SCORING_KEY`]): the flags a resumed
/// run takes from it unless given again, so that it reports what the run would have unstopped.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Scoring {
    pub no_shift: bool,
    pub no_ood: bool,
    /// Absolute, as `data` is recorded, so that a run resumed from elsewhere finds them.
    pub ood_data: Vec<String>,
    pub save_predictions: bool,
    pub eval_batch_size: usize,
    pub val_every: usize,
}

impl Scoring {
    fn of(data: &DataArgs, optim: &OptimArgs) -> Scoring {
        let absolute = |s: &String| match s.parse::<DataSource>() {
            Ok(source) => source.absolute().to_string(),
            Err(_) => s.clone(),
        };
        Scoring {
            no_shift: data.no_shift,
            no_ood: data.no_ood,
            ood_data: data.ood_data.iter().map(absolute).collect(),
            save_predictions: data.save_predictions,
            eval_batch_size: data.eval_batch_size,
            val_every: optim.val_every,
        }
    }

    /// What a checkpoint recorded; None for one from before it was recorded.
    pub fn recorded(meta: &HashMap<String, String>) -> Result<Option<Scoring>> {
        meta.get(SCORING_KEY)
            .map(|s| serde_json::from_str(s).context("checkpoint metadata scoring"))
            .transpose()
    }
}

/// The held-out classes a checkpoint recorded ([`data_metadata`]), sorted, once each.
pub fn saved_holdout_classes(meta: &HashMap<String, String>) -> Result<Vec<u32>> {
    let mut classes: Vec<u32> = match meta.get("holdout_classes").filter(|h| !h.is_empty()) {
        Some(h) => h
            .split(',')
            .map(|c| c.parse::<u32>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("checkpoint metadata holdout_classes '{h}'"))?,
        None => Vec::new(),
    };
    classes.sort_unstable();
    classes.dedup();
    Ok(classes)
}

pub fn eval_options(data: &DataArgs) -> EvalOptions {
    EvalOptions {
        batch_size: data.eval_batch_size,
        shift: !data.no_shift,
        ood: !data.no_ood,
        // Fitted on the validation part when there is one, by the command.
        temperature: None,
        keep_predictions: data.save_predictions,
    }
}

pub fn ensemble_config(e: &EnsembleArgs, method: Method, classes: usize) -> Result<EnsembleConfig> {
    Ok(EnsembleConfig {
        drop_key: e.drop_key,
        method,
        members: if method.is_single() { 1 } else { e.members() },
        classes,
        lora: LoraConfig {
            rank: e.rank,
            scale: e.lora_scale,
            targets: e.lora_targets.parse::<Targets>()?,
            init_gain: e.lora_gain,
        },
    })
}

pub fn train_config(o: &OptimArgs, method: Method, seed: u64) -> Result<TrainConfig> {
    let optimizer = match o.optimizer.as_str() {
        "adamw" => OptimizerKind::adamw(o.weight_decay),
        "sgd" => OptimizerKind::Sgd {
            momentum: o.momentum,
            weight_decay: o.weight_decay,
        },
        other => anyhow::bail!("unknown optimizer '{other}': expected adamw or sgd"),
    };
    // Each method's rate is the one `loren compare --lrs` picks on validation NLL over four seeds
    // (benches/results/cpu-2026-12-05/lr-sweep): the ensembles fit best at 1e-3, the single
    // networks at 3e-4. At 3e-4 MC Dropout's eight heads on one backbone do not even fit the
    // training data in the default budget (training loss 0.26 against single's 0.011).
    let default_lr = if method.is_single() { 3e-4 } else { 1e-3 };
    Ok(TrainConfig {
        epochs: o.epochs,
        batch_size: o.batch_size,
        lr: o.lr.unwrap_or(default_lr),
        min_lr: o.min_lr,
        warmup_steps: o.warmup,
        warmup_from_zero: o.warmup_from_zero,
        optimizer,
        grad_clip: (o.grad_clip > 0.0).then_some(o.grad_clip),
        augment: match (&o.saved_augment, o.augment.as_str()) {
            (Some(saved), _) => saved.clone(),
            (None, "none") => Augment::none(),
            (None, "digits") => Augment::digits(),
            (None, "paper") => Augment::paper(),
            (None, other) => {
                anyhow::bail!("unknown augmentation '{other}': expected none, digits or paper")
            }
        },
        shuffle: !o.no_shuffle,
        seed,
        activations: activations(o.recompute),
    })
}

pub fn activations(recompute: bool) -> Activations {
    if recompute {
        Activations::Recompute
    } else {
        Activations::Keep
    }
}

/// The run the flags describe. The flag groups' own checks (`OptimArgs::check`,
/// `EnsembleArgs::check`, `DataArgs::check`) come first, in the command, before its data is read.
#[allow(clippy::too_many_arguments)]
pub fn run_spec(
    common: &Common,
    seed: u64,
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
    let train = train_config(optim, method, seed)?;
    // Settle every setting before anything slow (loading, pretraining) starts.
    ensemble.validate(&vit)?;
    train.validate()?;
    Ok(RunSpec {
        vit,
        ensemble,
        train,
        model_seed: seed,
        device: common.device()?,
        checkpoint,
        resume: None,
        eval: eval_options(data),
        val_every: optim.val_every,
        verbosity: common.verbosity(),
        metadata: {
            let mut m = data_metadata(data, optim.train_on_val)?;
            let scoring = Scoring::of(data, optim);
            m.insert(SCORING_KEY.to_string(), serde_json::to_string(&scoring)?);
            m
        },
    })
}

/// Write the report as JSON, and beside it its reliability diagram and learning curves, and the
/// predictions when the run kept them (`--save-predictions`).
pub fn write_outputs(out: &Path, result: &RunResult, test: &Dataset) -> Result<Vec<PathBuf>> {
    let dataset = &test.name;
    let json = out.join("report.json");
    write_atomic(&json, serde_json::to_string_pretty(result)?.as_bytes())?;
    let svg = out.join("reliability.svg");
    let title = format!(
        "{} (M={}) on {}",
        result.method,
        result.members,
        split_phrase(dataset)
    );
    write_atomic(
        &svg,
        reliability_svg(&result.report.test, &title).as_bytes(),
    )?;
    let curves = out.join("training.svg");
    let title = format!(
        "{} (M={}): training by epoch",
        result.method, result.members
    );
    let name = format!("{} M={}", result.method, result.members);
    let line = [curve(name, 0, false, &result.train.epochs)];
    write_atomic(&curves, learning_curves_svg(&title, &line).as_bytes())?;
    let mut written = vec![json, svg, curves];
    let file = out.join("predictions.safetensors");
    written.extend(save_predictions(&file, &result.report, test, None)?);
    Ok(written)
}

/// Write the predictions `report` kept (`--save-predictions`) to `file`, with the model, the
/// classes, the temperature and the `checkpoint` scored, when given, in its metadata; when it
/// kept none, remove an earlier run's `file`, which would read as this run's. The file, when
/// written.
pub fn save_predictions(
    file: &Path,
    report: &EvalReport,
    test: &Dataset,
    checkpoint: Option<&Path>,
) -> Result<Option<PathBuf>> {
    if report.predictions.is_empty() {
        remove_stale(file)?;
        return Ok(None);
    }
    let mut meta = HashMap::from([
        ("method".to_string(), report.method.clone()),
        ("members".to_string(), report.members.to_string()),
        ("dataset".to_string(), test.name.clone()),
        (
            "class_names".to_string(),
            serde_json::Value::from(test.class_names.clone()).to_string(),
        ),
    ]);
    if let Some(t) = &report.tempered {
        meta.insert("temperature".to_string(), t.temperature.to_string());
    }
    if let Some(c) = checkpoint {
        meta.insert("checkpoint".to_string(), c.display().to_string());
    }
    write_predictions(file, &report.predictions, meta)?;
    Ok(Some(file.to_path_buf()))
}

/// `--memory-budget`, read as bytes (bench and memprofile).
/// The first item given more than once.
pub fn first_repeated<T: PartialEq>(items: &[T]) -> Option<&T> {
    items
        .iter()
        .find(|x| items.iter().filter(|y| y == x).count() > 1)
}

/// `--methods`, each named once: `why` says what one method is to the command.
pub fn methods(names: &[String], why: &str) -> Result<Vec<Method>> {
    let methods = names
        .iter()
        .map(|m| m.parse::<Method>().map_err(anyhow::Error::from))
        .collect::<Result<Vec<_>>>()?;
    if let Some(twice) = first_repeated(&methods) {
        bail!("--methods names {} twice: {why}", twice.name());
    }
    Ok(methods)
}

/// `--config`, each named once: `why` says what one config is to the command.
pub fn configs(names: &[String], why: &str) -> Result<Option<Vec<String>>> {
    if let Some(twice) = first_repeated(names) {
        bail!("--config names {twice} twice: {why}");
    }
    Ok((!names.is_empty()).then(|| names.to_vec()))
}

pub fn memory_budget(arg: Option<&str>) -> Result<Option<u64>> {
    arg.map(loren::bench::parse_bytes)
        .transpose()
        .context("--memory-budget")
}

/// An f32 flag, refused by clap when its value does not fit an f32: 1e-300 would otherwise be
/// taken, and reported, as 0, and 1e39 as infinity. NaN and infinities written as such pass,
/// for each flag's own check to name.
pub fn f32_arg(arg: &str) -> Result<f32, String> {
    let v: f64 = arg
        .trim()
        .parse()
        .map_err(|_| format!("'{arg}' is not a number"))?;
    let x = v as f32;
    if v != 0.0 && x == 0.0 {
        return Err(format!("{arg} is too small for an f32: it would be 0"));
    }
    // Past f32's range, "1e999" (an infinite f64) too; "inf" itself is said as it was typed.
    let word = arg
        .trim()
        .trim_start_matches(['+', '-'])
        .to_ascii_lowercase();
    if x.is_infinite() && !matches!(word.as_str(), "inf" | "infinity") {
        return Err(format!(
            "{arg} is too large for an f32 (at most {:e})",
            f32::MAX
        ));
    }
    Ok(x)
}

/// A path that is written down as text (in checkpoints, reports and notes), so must be text:
/// clap refuses one that is not UTF-8 before this runs, as it refuses every flag's value.
/// An empty one, most often a shell variable that was not set, is refused: it would write into
/// the working folder.
pub fn text_path(arg: &str) -> Result<PathBuf, String> {
    match arg.is_empty() {
        true => {
            Err("an empty path (a shell variable that is not set?): name a file or folder".into())
        }
        false => Ok(PathBuf::from(arg)),
    }
}

/// A checkpoint argument: the file, or the folder `loren train --out` wrote it into.
pub fn checkpoint_arg(arg: &str) -> Result<PathBuf, String> {
    Ok(loren::run::checkpoint_in(&text_path(arg)?))
}

/// The folder a command writes into, held for the command's life.
pub struct OutDir {
    pub path: PathBuf,
    /// The default folder, when it held an earlier run and this one moved on, unless quiet.
    moved_from: Option<PathBuf>,
    /// None for a named folder until [`OutDir::hold`].
    claim: Option<ClaimedDir>,
}

impl OutDir {
    /// Hold a named folder for this run alone (a default one is held from the start): once the
    /// command has read its data, which the folder made for the claim would otherwise join
    /// when it is named inside an image folder.
    pub fn hold(&mut self) -> Result<()> {
        if self.claim.is_none() {
            self.claim = Some(ClaimedDir::hold(&self.path, "--out")?);
        }
        Ok(())
    }

    /// Say where the run goes when it moved on from the default folder: once the command has
    /// checked what it was given, so that a refusal is not preceded by it.
    pub fn say_where(&self) {
        if let Some(from) = &self.moved_from {
            loren::note!(
                "note: {} holds an earlier run; this one goes to {} (--out DIR names the \
                 folder, and replaces a run in it)",
                from.display(),
                self.path.display()
            );
        }
    }
}

/// A folder named with --out is used as it is, replacing what an earlier run of the command
/// left there, and held from [`OutDir::hold`] on. The default one never takes an earlier run's place: the first free of `out`,
/// `out-2`, `out-3`, ... is claimed, and a move is said ([`OutDir::say_where`]) unless `quiet`.
pub fn out_dir(out: &Path, named: bool, quiet: bool) -> Result<OutDir> {
    if named {
        return Ok(OutDir {
            path: out.to_path_buf(),
            moved_from: None,
            claim: None,
        });
    }
    let claim = ClaimedDir::claim(out, "--out")?;
    Ok(OutDir {
        path: claim.path.clone(),
        moved_from: (claim.path != out && !quiet).then(|| out.to_path_buf()),
        claim: Some(claim),
    })
}
