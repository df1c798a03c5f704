//! `loren eval`: a training checkpoint scored again.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use super::args::{
    ClassRef, Common, DataArgs, TakenFrom, check_out_outside_data, checkpoint_arg, data_metadata,
    eval_options, note_passed_over, save_predictions, saved_holdout_classes, splits, text_path,
};

use serde::Serialize;

use super::say;
use loren::dataset::{
    DataSource, Normalize, SPLIT_IMAGES_KEY, TRAINING_IMAGES_KEY, every_image,
    recorded_train_on_val, split_images, training_images,
};
use loren::ensemble::load_network;
use loren::progress::{EvalBar, Verbosity};
use loren::report::{calibration_report, method_title};
use loren::run::{
    REPORT_FILES, RUN_FILES, RunSettings, check_no_folder_in_the_way, read_model, validation_batch,
};
use loren_nn::checkpoint::{TensorFile, write_atomic};
use loren_nn::config::{EnsembleConfig, VitConfig};
use loren_nn::data::folder::passed_over;
use loren_nn::data::{Dataset, Splits};
use loren_nn::eval::{EvalReport, ScoredSet, eval_images, evaluate, predict};
use loren_nn::metrics::fit_temperature;
use loren_nn::reliability::reliability_svg;

use loren::outputs::{ClaimedDir, writable_dir};

// The shared --data's default is train's; eval's is the checkpoint's own data, and the
// normalisation and held-out classes are the checkpoint's.
#[derive(Args, Clone)]
#[command(mut_arg("data", |a| a.help("The dataset to score on, in train's --data forms \
    (digits, digits:PATH, cifar10:DIR, cifar100:DIR, folder:DIR). Default: the data the \
    checkpoint was trained on")))]
#[command(mut_arg("normalize", |a| a.help("How images are scaled for the model: the \
    checkpoint's own setting, which this flag may only repeat (another would feed the model \
    inputs it never saw)")))]
#[command(mut_arg("holdout_classes", |a| a.help("The classes the checkpoint held out of \
    training, scored as out-of-distribution: its own, which this flag may only repeat (its \
    heads know the other classes, in order)")))]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: Common,
    /// A checkpoint written by `loren train` (or the folder it is in), or an ensemble written by
    /// `loren export`.
    #[arg(long, value_parser = checkpoint_arg)]
    pub checkpoint: PathBuf,
    /// The backbone the checkpoint was trained from (default: the path recorded in it; an
    /// exported file holds its own).
    #[arg(long, value_parser = text_path)]
    pub backbone: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Output folder for eval.json and eval-reliability.svg (default: the checkpoint's folder).
    #[arg(long, value_parser = text_path)]
    pub out: Option<PathBuf>,
    /// Score every image of --data folder:DIR, a test set of the checkpoint's classes held apart
    /// from training, instead of its split's test part (a fifth of it). The temperature is then
    /// fitted on the validation part of the data the checkpoint trained on (none where it
    /// trained on that part too, --train-on-val).
    #[arg(long, requires = "data")]
    pub all_images: bool,
}

/// Whether `given` (`--data`, or none) names the data the checkpoint `recorded` it trained on:
/// by its absolute path, as the checkpoint records it, so that a relative path to the same data
/// is the same data.
fn is_recorded(given: Option<&str>, recorded: Option<&String>) -> bool {
    match given.map(str::parse::<DataSource>) {
        None => true,
        Some(Ok(source)) => Some(&source.absolute().to_string()) == recorded,
        Some(Err(_)) => false,
    }
}

/// `--all-images`: the data the checkpoint trained on, for its validation part (the
/// temperature's), with every image of the given folder as its test part.
fn every_image_of(
    a: &EvalArgs,
    data_args: &DataArgs,
    vit: &VitConfig,
    recorded: Option<&String>,
    train_on_val: bool,
) -> Result<Splits> {
    let ckpt = a.checkpoint.display();
    let given: DataSource = a.data.data.as_deref().unwrap_or_default().parse()?;
    let DataSource::Folder(dir) = &given else {
        anyhow::bail!(
            "--all-images scores an image folder held apart from training (--data folder:DIR); \
             {given} has a test part of its own, which eval scores without the flag"
        );
    };
    if recorded.is_some() && is_recorded(a.data.data.as_deref(), recorded) {
        anyhow::bail!(
            "--all-images: {ckpt} was trained on {given}, and every image of it holds those it \
             trained on; the flag scores a folder held apart from training"
        );
    }
    if !data_args.holdout_classes.is_empty() {
        anyhow::bail!(
            "--all-images: {ckpt} held classes out of training (--holdout-classes), which a whole \
             folder of its classes has no part for; score it without the flag"
        );
    }
    let Some(recorded) = recorded else {
        anyhow::bail!(
            "--all-images: {ckpt} records no data it trained on, whose validation part would fit \
             the temperature; score it without the flag"
        );
    };
    // Its notes would be about the training data, not the folder scored.
    let trained_on = DataArgs {
        data: Some(recorded.clone()),
        ..data_args.clone()
    };
    let mut data = splits(&trained_on, vit, train_on_val, Verbosity::Quiet).with_context(|| {
        format!("--all-images fits the temperature on the validation part of {recorded}")
    })?;
    if a.common.verbosity() == Verbosity::Normal {
        note_passed_over(&given, &passed_over(dir));
    }
    data.test = every_image(dir, vit, &data.test)?;
    Ok(data)
}

/// An image folder's classes are the ones the checkpoint's heads were trained on, by name and in
/// order: one whose class subfolders are named otherwise (`Cats` for `cats`) sorts otherwise,
/// and would score every image against another class's output. The other sources' labels are
/// their format's own, and their names may be made up where a file is missing (a CIFAR copy
/// without its names file), so they are taken on the class count, as is a checkpoint from before
/// the names were recorded.
fn check_class_names(
    file: &TensorFile,
    checkpoint: &Path,
    scored: &DataSource,
    test: &Dataset,
) -> Result<()> {
    if !matches!(scored, DataSource::Folder(_)) || !file.metadata().contains_key("class_names") {
        return Ok(());
    }
    let trained: Vec<String> = file.meta_json("class_names")?;
    let differing: Vec<String> = trained
        .iter()
        .zip(&test.class_names)
        .enumerate()
        .filter(|(_, (t, d))| t != d)
        .map(|(i, (t, d))| format!("class {i} is `{t}` there and `{d}` here"))
        .collect();
    if let Some(first) = differing.first() {
        let more = match differing.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        anyhow::bail!(
            "{} was trained on other classes than {} has: {first}{more}; score it on data whose \
             classes are named as in training (a folder's class subfolders are taken in byte \
             order, so the names must match exactly)",
            checkpoint.display(),
            test.name
        );
    }
    Ok(())
}

/// eval.json: the report, then what was scored and how: the checkpoint, the device, the batch
/// size, and the settings it was trained with beside the data it was scored on.
#[derive(Serialize)]
struct EvalFile<'a> {
    #[serde(flatten)]
    report: &'a EvalReport,
    checkpoint: String,
    /// The set scored as test: a split's test part (`digits/test`), or with `--all-images`
    /// every image of a folder.
    test_set: String,
    device: String,
    batch_size: usize,
    /// None for an export written before exports recorded them.
    settings: Option<RunSettings>,
}

pub fn eval(a: &EvalArgs) -> Result<()> {
    let out = match &a.out {
        Some(o) => o.clone(),
        None => a
            .checkpoint
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    a.data.check()?;
    // The checkpoint first: a file that is not one is named as such, and its folder left alone.
    let file = read_model(&a.checkpoint, "--checkpoint")?;
    match a.out {
        Some(_) => writable_dir(&out, "--out")?,
        None => writable_dir(&out, "the checkpoint's folder")
            .context("eval writes beside the checkpoint unless given --out DIR")?,
    }
    check_no_folder_in_the_way(&out, &RUN_FILES[REPORT_FILES..])?;
    // Held while it scores, as a run's folder is (and before the data is read, which may take
    // long): a run writing there would take an eval.json beside its checkpoint for its own, or
    // remove it as an earlier run's.
    let flag = match a.out {
        Some(_) => "--out",
        None => "the checkpoint's folder (--out DIR writes elsewhere)",
    };
    let held = if out.as_os_str().is_empty() {
        Path::new(".")
    } else {
        &out
    };
    let _held = ClaimedDir::hold(held, flag)?;
    // The data it was trained on, unless the command line says otherwise.
    let meta = file.metadata();
    let mut data_args = a.data.clone();
    // An export from a checkpoint that recorded no data records it as "".
    let recorded_data = meta.get("data").filter(|d| !d.is_empty());
    let on_its_own_data = is_recorded(a.data.data.as_deref(), recorded_data);
    if let (Some(given), Some(trained_on)) = (&a.data.data, recorded_data) {
        // Other data is a fair question (a shifted copy of the same classes, say), asked aloud.
        if !on_its_own_data && a.common.verbosity() == Verbosity::Normal {
            loren::note!(
                "eval: note: {} was trained on {trained_on}; scoring it on {given}",
                a.checkpoint.display()
            );
        }
    }
    if data_args.data.is_none() && recorded_data.is_some() {
        data_args.data = recorded_data.cloned();
        data_args.taken_from = Some(TakenFrom {
            checkpoint: file.path().to_path_buf(),
            data: true,
            ood_data: false,
        });
    }
    if a.out.is_some() {
        check_out_outside_data(&out, &data_args)?;
    }
    let recorded = saved_holdout_classes(meta)?;
    // The heads know the classes left after the holdout, in order: other held-out classes would
    // score them against the wrong labels.
    if !data_args.holdout_classes.is_empty() && data_args.held_out_classes()? != recorded {
        anyhow::bail!(
            "--holdout-classes {}: {} was trained holding out {}; leave the flag out to use that",
            join(&data_args.holdout_classes),
            a.checkpoint.display(),
            if recorded.is_empty() {
                "no classes".to_string()
            } else {
                format!("classes {}", join(&recorded))
            }
        );
    }
    data_args.holdout_classes = recorded.into_iter().map(ClassRef::Number).collect();
    // The scaling the model was trained with is part of the model: another would score it on
    // inputs it never saw.
    let trained = Normalize::recorded(meta)?;
    if a.data.normalize.is_some() && a.data.normalize()? != trained {
        anyhow::bail!(
            "--normalize {}: {} was trained with --normalize {trained}; leave the flag out to use \
             that",
            a.data.normalize()?,
            a.checkpoint.display()
        );
    }
    data_args.normalize = Some(trained.to_string());
    let vit: VitConfig = file.meta_json("vit")?;
    // Checked before the data is brought to the model's image size: a corrupt size would be
    // allocated for every image.
    file.meta_json::<EnsembleConfig>("ensemble")?
        .validate(&vit)
        .with_context(|| {
            format!(
                "{}: its metadata describe no model loren builds",
                file.path().display()
            )
        })?;
    // The same cut either way: eval scores only the test part and the held-out classes.
    let train_on_val = recorded_train_on_val(meta)?;
    let data = match a.all_images {
        false => splits(&data_args, &vit, train_on_val, a.common.verbosity())?,
        true => every_image_of(a, &data_args, &vit, recorded_data, train_on_val)?,
    };
    let device = loren::open_device(a.common.device()?)?;
    let model = load_network(&file, a.backbone.as_deref(), &device)?;
    // Before the validation part is scored, whose labels would be the first to fall outside.
    if data.test.classes != model.ensemble.classes {
        anyhow::bail!(
            "{} has {} classes, and the data it is scored on ({}) has {}: score it on data with \
             the classes it was trained on",
            a.checkpoint.display(),
            model.ensemble.classes,
            data.test.name,
            data.test.classes
        );
    }
    let scored: DataSource = data_args.data.as_deref().unwrap_or("digits").parse()?;
    check_class_names(&file, &a.checkpoint, &scored, &data.test)?;
    // The split shuffles each class by a fixed seed, so one image added or removed moves others
    // between the parts: some now in test were trained on. Every part's record where the
    // checkpoint has one, else the training part's.
    let records = [
        (
            SPLIT_IMAGES_KEY,
            split_images(&data),
            "split",
            "in other parts",
        ),
        (
            TRAINING_IMAGES_KEY,
            training_images(&data.train),
            "training split",
            "labelled otherwise",
        ),
    ];
    let record = records
        .into_iter()
        .find_map(|(key, now, what, moved)| meta.get(key).map(|r| (r, now, what, moved)));
    if let Some((recorded, now, what, moved)) = record.filter(|_| on_its_own_data)
        && *recorded != now
    {
        let count = |record: &str| record.split(' ').next().unwrap_or_default().to_string();
        let change = match (count(recorded), count(&now)) {
            (then, now) if then == now => {
                format!("its {what} holds as many images ({now}), {moved}")
            }
            (then, now) => format!("its {what} held {then} images and now holds {now}"),
        };
        loren::note!(
            "eval: warning: {} has changed since {} was trained on it ({change}), so the test \
             split scored here may hold images the model trained on: its figures are no clean \
             test",
            data_args.data.as_deref().unwrap_or("digits"),
            a.checkpoint.display()
        );
    }
    let mut opts = eval_options(&data_args);
    let held_out = data.held_out.as_ref();
    let val_images = data.val.as_ref().map_or(0, |v| v.len());
    let images = val_images + eval_images(&data.test, held_out, &data.ood_sets, &opts);
    if a.common.verbosity() == Verbosity::Normal {
        // The first line of a log, where the bar (a terminal's only) does not show.
        loren::note!(
            "eval: {} on {device}, {images} images to score",
            a.checkpoint.display()
        );
    }
    let mut bar = EvalBar::new("eval", images, a.common.verbosity());
    let _ctrl_c = loren::interrupt::Guard::install();
    let mut val_set = None;
    if let Some(val) = &data.val {
        // The temperature is fitted on the validation part, as after training, and in its
        // batches (an export that recorded no training settings: in --eval-batch-size's).
        let batch = match meta.contains_key("train") {
            true => validation_batch(&file.meta_json("train")?),
            false => opts.batch_size,
        };
        let probs = predict(&model, val, batch, &mut |n| {
            bar.inc(n);
            loren::interrupt::scoring_stop("")
        })?;
        opts.temperature = Some(fit_temperature(&probs, &val.labels)?);
        if opts.keep_predictions {
            val_set = Some(ScoredSet::validation(probs, &val.labels));
        }
    }
    let mut report = evaluate(
        &model,
        &data.test,
        held_out,
        &data.ood_sets,
        &opts,
        &mut |n| {
            bar.inc(n);
            loren::interrupt::scoring_stop("")
        },
    )?;
    drop(bar);
    report.predictions.splice(0..0, val_set);
    let ens = &model.ensemble;
    let title = method_title(
        ens.method,
        ens.members,
        ens.method.uses_lora().then_some(ens.lora.rank),
    );
    // Written before the report is printed: a reader that stops early (| head) loses nothing.
    let json = out.join("eval.json");
    let written = EvalFile {
        report: &report,
        checkpoint: a.checkpoint.display().to_string(),
        test_set: data.test.name.clone(),
        device: device.to_string(),
        batch_size: opts.batch_size,
        // An export records its training settings where its checkpoint did.
        settings: meta
            .contains_key("train")
            .then(|| {
                let data = data_metadata(&data_args, train_on_val)?;
                RunSettings::of_checkpoint(&file, data.into_iter().collect())
            })
            .transpose()?,
    };
    write_atomic(&json, serde_json::to_string_pretty(&written)?.as_bytes())?;
    let svg = out.join("eval-reliability.svg");
    write_atomic(&svg, reliability_svg(&report.test, &title).as_bytes())?;
    let mut written = vec![json, svg];
    let file = out.join("eval-predictions.safetensors");
    written.extend(save_predictions(
        &file,
        &report,
        &data.test,
        Some(&a.checkpoint),
    )?);
    say(format_args!(
        "{}",
        calibration_report(&title, &data.test.name, &report)
    ))?;
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    say(format_args!("wrote {}\n", names.join(", ")))?;
    Ok(())
}

fn join<T: ToString>(classes: &[T]) -> String {
    classes
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
