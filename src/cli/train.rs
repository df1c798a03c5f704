//! `loren train` (and `loren` with no command).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{ArgMatches, Args, Parser};

use super::say;
use loren::backbone;
use loren::dataset::{Normalize, recorded_train_on_val};
use loren::progress::Verbosity;
use loren::report::{calibration_report, method_title, training_line};
use loren::run::{check_resume, read_checkpoint, run};
use loren_autograd::optim::OptimizerKind;
use loren_nn::checkpoint::TensorFile;
use loren_nn::config::{Activations, EnsembleConfig, Method, VitConfig};
use loren_nn::data::Augment;
use loren_nn::train::TrainConfig;

use loren::dataset::{TRAINING_IMAGES_KEY, training_images};

use super::args::{
    ClassRef, Common, DataArgs, EnsembleArgs, ModelArgs, OptimArgs, Scoring, SeedArgs, TakenFrom,
    check_out_outside_data, checkpoint_arg, note_unused, out_dir, run_spec, saved_holdout_classes,
    splits, text_path, unused_flags, write_outputs,
};
use loren::outputs::writable_dir;

#[derive(Args, Clone)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub seed: SeedArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub ensemble: EnsembleArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output folder. Default: runs/train, or runs/train-2, runs/train-3, ... when it holds an
    /// earlier run, so that no run takes another's place (a folder named here is used as it is,
    /// replacing a run in it, which is said); with --resume, the resumed checkpoint's folder, so
    /// that the run continues in place.
    #[arg(long, value_parser = text_path, default_value = "runs/train")]
    pub out: PathBuf,
    /// Continue an earlier `train` from its checkpoint (the file, or the folder it is in), with
    /// the settings saved there; a settings flag given must agree with them, but for --epochs
    /// (more, to extend the run) and --recompute. How the run scores itself (--no-shift,
    /// --no-ood, --ood-data, --save-predictions, --eval-batch-size, --val-every) is taken from
    /// there too unless given anew (--ood-data turns a saved --no-ood off; `loren eval` scores
    /// the checkpoint with shift and OOD whatever the run chose).
    #[arg(long, value_parser = checkpoint_arg)]
    pub resume: Option<PathBuf>,
}

/// Lets a flattened argument group parse on its own, for the no-command default.
impl TrainArgs {
    pub fn parse_from<const N: usize>(args: [&str; N]) -> TrainArgs {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            args: TrainArgs,
        }
        Only::parse_from(args).args
    }
}

/// `loren train`; `given` holds the command line's own flags (`None`: no flags at all).
pub fn train(a: &TrainArgs, given: Option<&ArgMatches>) -> Result<()> {
    let is_given = |id: &str| {
        given.is_some_and(|m| m.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    };
    // Read once: the settings come from it here, the state in `run`.
    let saved;
    let (a, resume) = match &a.resume {
        Some(path) => {
            let file = read_checkpoint(path, "--resume")?;
            saved = with_saved_settings(a, &is_given, &file)?;
            (&saved, Some(Arc::new(file)))
        }
        None => (a, None),
    };
    a.optim.check()?;
    a.ensemble.check()?;
    a.data.check()?;
    let method: Method = a.ensemble.method.parse()?;
    if let (true, Some(m)) = (method.is_single(), a.ensemble.members)
        && m != 1
    {
        bail!(
            "--members {m}: {} is one network; leave --members out, or train an ensemble \
             (--method lora, explicit or mc-dropout)",
            method.name()
        );
    }
    if a.common.verbosity() == Verbosity::Normal {
        note_unused(&unused_flags(&[method], &a.optim, &is_given), "run");
    }
    let config = VitConfig::by_name(&a.model.config)?;
    // Before any folder is made for it, default or named.
    check_out_outside_data(&a.out, &a.data)?;
    // With --resume the run continues in its checkpoint's folder (or the one named).
    let mut out = out_dir(
        &a.out,
        resume.is_some() || is_given("out"),
        a.common.verbosity() == Verbosity::Quiet,
    )?;
    let moved = TrainArgs {
        out: out.path.clone(),
        ..a.clone()
    };
    let a = &moved;
    // After the flags' own checks, so that a mistyped flag is named as such and not as a folder.
    writable_dir(&a.out, "--out")?;
    // Its own files, and eval's, which replacing a run removes.
    let files = [&loren::run::RUN_FILES[..], &["checkpoint.safetensors"]].concat();
    loren::run::check_no_folder_in_the_way(&a.out, &files)?;
    let data = splits(&a.data, &config, a.optim.train_on_val, a.common.verbosity())?;
    out.hold()?;
    let ckpt = a.out.join("checkpoint.safetensors");
    let mut spec = run_spec(
        &a.common,
        a.seed.seed,
        &a.model,
        &a.ensemble,
        &a.optim,
        &a.data,
        method,
        data.train.classes,
        Some(ckpt.clone()),
    )?;
    spec.metadata.insert(
        TRAINING_IMAGES_KEY.to_string(),
        training_images(&data.train),
    );
    if let Some(file) = resume.as_deref() {
        // Before the backbone is read, so that another --config is named as such.
        check_resume(&spec, file)?;
    }
    spec.resume = resume;
    let backbone = backbone::resolve(
        a.model.backbone.as_deref(),
        &mut spec.vit,
        &data,
        spec.verbosity,
    )?;
    // The device too is refused before the run is said to begin (opened once, it is kept).
    loren::open_device(spec.device)?;
    out.say_where();
    let result = run(&spec, &data, &backbone)?;
    // Written before the report is printed: a reader that stops early (| head) loses nothing.
    let written = write_outputs(&a.out, &result, &data.test)
        .with_context(|| format!("writing the report ({})", loren::run::scored_again(&ckpt)))?;
    let title = method_title(result.method, result.members, result.rank);
    say(format_args!(
        "{}{}",
        calibration_report(&title, &data.test.name, &result.report),
        training_line(&result)
    ))?;
    let written: Vec<String> = written
        .iter()
        .chain([&ckpt])
        .map(|p| p.display().to_string())
        .collect();
    say(format_args!("wrote {}\n", written.join(", ")))?;
    Ok(())
}

/// A resumed run's settings are the checkpoint's: every flag of the settings left off the
/// command line takes the saved run's value, so `--resume DIR` alone continues it. A flag that is
/// given stays as given, and the resume check refuses it unless it may change (--epochs,
/// --recompute) or agrees with the saved run.
fn with_saved_settings(
    a: &TrainArgs,
    given: &dyn Fn(&str) -> bool,
    file: &TensorFile,
) -> Result<TrainArgs> {
    let vit: VitConfig = file.meta_json("vit")?;
    let ens: EnsembleConfig = file.meta_json("ensemble")?;
    let train: TrainConfig = file.meta_json("train")?;
    // Corrupt or crafted metadata is the file's fault, and named so.
    let corrupt = || {
        format!(
            "{}: its metadata describe no run loren trains",
            file.path().display()
        )
    };
    ens.validate(&vit).with_context(corrupt)?;
    train.validate().with_context(corrupt)?;
    let meta = file.metadata();
    let mut r = a.clone();
    let (m, e, o) = (&mut r.model, &mut r.ensemble, &mut r.optim);
    let keep = |id: &str| !given(id);
    if keep("config") {
        m.config = vit.name.clone();
    }
    if keep("backbone") {
        m.backbone = meta
            .get("backbone")
            .map(PathBuf::from)
            .or(m.backbone.take());
    }
    if keep("method") {
        e.method = ens.method.name().to_string();
    }
    if keep("members") && !ens.method.is_single() {
        e.members = Some(ens.members);
    }
    if keep("rank") {
        e.rank = ens.lora.rank;
    }
    if keep("lora_scale") {
        e.lora_scale = ens.lora.scale;
    }
    if keep("lora_targets") {
        e.lora_targets = ens.lora.targets.to_string();
    }
    if keep("lora_gain") {
        e.lora_gain = ens.lora.init_gain;
    }
    if keep("drop_key") {
        e.drop_key = ens.drop_key;
    }
    if keep("epochs") {
        o.epochs = train.epochs;
    }
    if keep("batch_size") {
        o.batch_size = train.batch_size;
    }
    if keep("lr") {
        o.lr = Some(train.lr);
    }
    if keep("min_lr") {
        o.min_lr = train.min_lr;
    }
    if keep("warmup") {
        o.warmup = train.warmup_steps;
    }
    if keep("warmup_from_zero") {
        o.warmup_from_zero = train.warmup_from_zero;
    }
    let (optimizer, weight_decay, momentum) = match train.optimizer {
        OptimizerKind::AdamW { weight_decay, .. } => ("adamw", weight_decay, o.momentum),
        OptimizerKind::Sgd {
            momentum,
            weight_decay,
        } => ("sgd", weight_decay, momentum),
    };
    if keep("optimizer") {
        o.optimizer = optimizer.to_string();
    }
    if keep("weight_decay") {
        o.weight_decay = weight_decay;
    }
    if keep("momentum") {
        o.momentum = momentum;
    }
    if keep("grad_clip") {
        o.grad_clip = train.grad_clip.unwrap_or(0.0);
    }
    if keep("augment") {
        let presets = [
            ("none", Augment::none()),
            ("digits", Augment::digits()),
            ("paper", Augment::paper()),
        ];
        match presets.iter().find(|(_, p)| *p == train.augment) {
            Some((name, _)) => o.augment = name.to_string(),
            // No preset today (one from before a preset changed): continue it as it was.
            None => o.saved_augment = Some(train.augment.clone()),
        }
    }
    if keep("no_shuffle") {
        o.no_shuffle = !train.shuffle;
    }
    if keep("train_on_val") {
        o.train_on_val = recorded_train_on_val(meta)?;
    }
    if keep("recompute") {
        o.recompute = train.activations == Activations::Recompute;
    }
    if keep("seed") {
        r.seed.seed = train.seed;
    }
    if keep("out") {
        r.out = file.path().parent().map(PathBuf::from).unwrap_or_default();
    }
    let mut taken = TakenFrom {
        checkpoint: file.path().to_path_buf(),
        data: false,
        ood_data: false,
    };
    if keep("data") {
        taken.data = meta.contains_key("data");
        r.data.data = meta.get("data").cloned().or(r.data.data.take());
    }
    if keep("holdout_classes") {
        r.data.holdout_classes = saved_holdout_classes(meta)?
            .into_iter()
            .map(ClassRef::Number)
            .collect();
    }
    if keep("normalize") {
        r.data.normalize = Some(Normalize::recorded(meta)?.to_string());
    }
    if let Some(s) = Scoring::recorded(meta)? {
        if keep("no_shift") {
            r.data.no_shift = s.no_shift;
        }
        // OOD sets asked for anew ask for OOD detection, whatever the run chose.
        if keep("no_ood") && keep("ood_data") {
            r.data.no_ood = s.no_ood;
        }
        // Not into a run told to score no OOD detection.
        if keep("ood_data") && !r.data.no_ood {
            taken.ood_data = !s.ood_data.is_empty();
            r.data.ood_data = s.ood_data;
        }
        if keep("save_predictions") {
            r.data.save_predictions = s.save_predictions;
        }
        if keep("eval_batch_size") {
            r.data.eval_batch_size = s.eval_batch_size;
        }
        if keep("val_every") {
            r.optim.val_every = s.val_every;
        }
    }
    r.data.taken_from = Some(taken);
    Ok(r)
}
