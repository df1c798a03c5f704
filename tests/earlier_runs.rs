//! What a run does with what earlier runs left: a resumed run must continue the same training
//! (settings, data, backbone), eval and export must use what the checkpoint was trained with, and
//! nothing a run needs to write is found unwritable only after its training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
mod svg_check;
use common::{all_tensors, fails_with, loren, loren_in, report_json, run_ok, strs, temp_dir};

use loren_nn::checkpoint::{TensorFile, write};

/// The command fails with one error line holding every needle, having printed nothing else
/// (with -q, a run that trained or evaluated first would have printed its report).
fn refused(args: &[&str], needles: &[&str]) {
    let out = fails_with(args, needles);
    assert!(
        out.is_empty(),
        "loren {args:?} printed before failing:\n{out}"
    );
}

/// What `train` writes into its folder.
const OUTPUTS: [&str; 4] = [
    "checkpoint.safetensors",
    "report.json",
    "reliability.svg",
    "training.svg",
];

/// The run's settings but its epochs (two for the trained one) and learning rate (the default).
const RUN: [&str; 9] = [
    "-m",
    "2",
    "-r",
    "4",
    "--no-shift",
    "--no-ood",
    "-q",
    "--seed",
    "5",
];

/// `loren train` into `dir` for `epochs` with `RUN` and `extra`, which must succeed: what it
/// printed.
fn train_ok(dir: &Path, epochs: &str, extra: &[&str]) -> String {
    let mut args = vec!["train", "--out", dir.to_str().unwrap(), "--epochs", epochs];
    args.extend(RUN);
    args.extend(extra);
    let (ok, printed, err) = loren(&args);
    assert!(ok, "training failed: {err}");
    printed
}

/// One LoRA-Ensemble trained for two epochs, shared by the tests.
fn trained() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = temp_dir("trained");
        let printed = train_ok(&dir, "2", &[]);
        assert!(printed.contains("\n  validation: accuracy "), "{printed}");
        assert!(printed.contains("\n  by ensemble size "), "{printed}");
        dir
    })
}

fn checkpoint() -> String {
    trained()
        .join("checkpoint.safetensors")
        .to_str()
        .unwrap()
        .to_string()
}

/// Resume `checkpoint()` into a fresh folder with `RUN` and `extra`.
fn resume_args(out: &Path, extra: &[&'static str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--out", out.to_str().unwrap(), "--resume"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(checkpoint());
    args.extend(RUN.iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn resuming_with_other_settings_names_each_one() {
    let out = temp_dir("other-settings");
    let args = resume_args(
        &out,
        &[
            "--lr",
            "0.002",
            "--batch-size",
            "16",
            "--epochs",
            "3",
            "--warmup-from-zero",
        ],
    );
    refused(
        &strs(&args),
        &[
            "other settings",
            "lr: saved 0.001, now 0.002",
            "batch_size: saved 32, now 16",
            "warmup_from_zero: saved false, now true",
        ],
    );
}

#[test]
fn resuming_with_another_model_ensemble_and_schedule_names_all_three_before_reading_weights() {
    let out = temp_dir("other-everything");
    let ckpt = checkpoint();
    let out = out.to_str().unwrap();
    // Read first, the recorded tiny backbone would fail on vit-b-32's shapes: naming the config,
    // not a backbone shape, shows the settings were checked first.
    let args = [
        "train", "--resume", &ckpt, "--out", out, "--config", "vit-b-32", "-m", "3", "--lr",
        "0.002", "-q",
    ];
    refused(
        &args,
        &[
            "config: saved tiny, now vit-b-32",
            "ensemble.members: saved 2, now 3",
            "lr: saved 0.001, now 0.002",
        ],
    );
}

/// A run killed after its last checkpoint, while it was scored (so its last epoch's scoring, cut
/// short by Ctrl-C, is missing too), is finished by resuming it: nothing is trained, the last
/// epoch is scored, and the report, the history and the checkpoint are the unstopped run's.
#[test]
fn a_finished_run_resumed_is_scored_and_written_as_it_was() {
    let ckpt = trained_run_edited("finished", |m| {
        let mut history: serde_json::Value = serde_json::from_str(&m["epoch_history"]).unwrap();
        history[1]["val"] = serde_json::Value::Null;
        m.insert("epoch_history".into(), history.to_string());
    });
    let dir = ckpt.parent().unwrap();
    std::fs::remove_file(dir.join("report.json")).unwrap();
    let out = temp_dir("finished-elsewhere");
    let mut args = resume_args(&out, &[]);
    args[4] = ckpt.to_str().unwrap().to_string();
    let (ok, _, err) = loren(&strs(&args));
    assert!(ok, "{err}");
    assert!(
        err.contains("has trained all 2 of its epochs: nothing is left to train"),
        "{err}"
    );
    let (ours, theirs) = (report_json(&out), report_json(trained()));
    for part in [
        "/report/test",
        "/report/val",
        "/train/epochs/1/val/accuracy",
    ] {
        assert_eq!(ours.pointer(part), theirs.pointer(part), "{part}");
    }
    assert!(ours.pointer("/train/epochs/1/val/nll").unwrap().is_f64());
    let written = TensorFile::read(&out.join("checkpoint.safetensors")).unwrap();
    let original = TensorFile::read(&trained().join("checkpoint.safetensors")).unwrap();
    assert_eq!(all_tensors(&written), all_tensors(&original));
    // In place, what scored the same weights stays (eval's), and the report is written again.
    let (ok, _, err) = loren(&["train", "--resume", ckpt.to_str().unwrap(), "-q"]);
    assert!(ok, "{err}");
    assert!(dir.join("eval.json").exists(), "eval's report went");
    assert_eq!(
        report_json(dir).pointer("/report/test"),
        theirs.pointer("/report/test")
    );
    let history = TensorFile::read(&ckpt)
        .unwrap()
        .meta("epoch_history")
        .unwrap()
        .to_string();
    assert!(
        !history.contains("null"),
        "the rescored epoch was not saved: {history}"
    );
    // Killed once its last epoch was scored, while the test part was: the validation part is
    // predicted again, in the training's batches as at the epoch's end, so its figures and the
    // temperature fitted on it are the unstopped run's to the last bit.
    let scored = copy_of_the_trained_run("scored-then-killed");
    std::fs::remove_file(scored.join("report.json")).unwrap();
    let out = temp_dir("scored-then-killed-elsewhere");
    let mut args = resume_args(&out, &[]);
    args[4] = scored.to_str().unwrap().to_string();
    let (ok, _, err) = loren(&strs(&args));
    assert!(ok, "{err}");
    let ours = report_json(&out);
    for part in ["/val_nll", "/val_ece", "/report/tempered", "/report/test"] {
        assert!(ours.pointer(part).is_some(), "{part}");
        assert_eq!(ours.pointer(part), theirs.pointer(part), "{part}");
    }
}

#[test]
fn resuming_from_the_folder_alone_takes_the_saved_settings() {
    // The same third epoch with every setting given, and with none but --epochs: bit for bit.
    let (all, saved) = (temp_dir("resume-all-flags"), temp_dir("resume-saved-flags"));
    let (ok, _, err) = loren(&strs(&resume_args(&all, &["--epochs", "3"])));
    assert!(ok, "{err}");
    // The trained run resumed for a third epoch into `out` with `extra` alone, which succeeds.
    let resume_saved = |out: &Path, extra: &[&str]| {
        let ckpt = trained().to_str().unwrap();
        let mut args = vec!["train", "--resume", ckpt, "--epochs", "3", "-q"];
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        let (ok, _, err) = loren(&args);
        assert!(ok, "{err}");
    };
    resume_saved(&saved, &[]);
    // Scored as the run was, without the shifted sets and OOD detection.
    let report = report_json(&saved);
    assert_eq!(
        report.pointer("/report/shift"),
        Some(&serde_json::json!([]))
    );
    assert_eq!(
        report.pointer("/report/ood"),
        Some(&serde_json::Value::Null)
    );
    // An OOD set asked for anew turns the saved --no-ood off.
    let asked = temp_dir("resume-ood-asked");
    resume_saved(&asked, &["--ood-data", "digits"]);
    let sets = report_json(&asked)["report"]["ood_sets"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(sets, 1);
    let read = |d: &Path| TensorFile::read(&d.join("checkpoint.safetensors")).unwrap();
    let (a, b) = (read(&all), read(&saved));
    assert_eq!(
        a.fingerprint(),
        b.fingerprint(),
        "the two resumed runs differ"
    );
    // All but the epochs' timings.
    let settings = |f: &TensorFile| {
        let mut m = f.metadata().clone();
        m.remove("epoch_history");
        m
    };
    assert_eq!(settings(&a), settings(&b));
}

/// As above, for a run whose every setting differs from its default: each is taken from the
/// checkpoint, none from the defaults. Clipping off (`--grad-clip 0`) is a setting like the
/// others, and `-q` prints nothing at all.
#[test]
fn a_run_of_other_settings_resumes_from_its_folder_with_them() {
    let dir = temp_dir("resume-other-settings");
    let first = dir.join("first");
    let settings = [
        "--warmup",
        "5",
        "--min-lr",
        "2e-5",
        "--weight-decay",
        "0.02",
        "--lora-targets",
        "qv",
        "--lora-gain",
        "5",
        "--lora-scale",
        "2",
        "--optimizer",
        "sgd",
        "--momentum",
        "0.8",
        "--grad-clip",
        "0",
        "--lr",
        "0.01",
        "--batch-size",
        "16",
        "--augment",
        "digits",
        "--no-shuffle",
    ];
    let mut args = vec!["train", "--out", first.to_str().unwrap(), "--epochs", "1"];
    args.extend(RUN);
    args.extend(settings);
    let (ok, printed, err) = loren(&args);
    assert!(ok && err.is_empty(), "a quiet run wrote to stderr: {err}");
    assert!(
        printed.contains(
            "  trained: lr 1e-2, 5 warmup steps, cosine to 2e-5; SGD (momentum 0.8, weight decay \
             0.02); 1 epoch of batch 16 in file order, rotation ±10°, translation ±1 px\n"
        ),
        "{printed}"
    );
    assert!(report_json(&first)["settings"]["train"]["grad_clip"].is_null());
    let resume = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--resume",
            first.to_str().unwrap(),
            "--epochs",
            "2",
        ];
        args.extend(["--out", out.to_str().unwrap()]);
        args.extend(extra);
        let (ok, _, err) = loren(&args);
        assert!(ok, "{err}");
        TensorFile::read(&out.join("checkpoint.safetensors")).unwrap()
    };
    let mut given: Vec<&str> = RUN.to_vec();
    given.extend(settings);
    let (all, saved) = (
        resume(&dir.join("all"), &given),
        resume(&dir.join("saved"), &["--no-shift", "--no-ood", "-q"]),
    );
    assert_eq!(all.fingerprint(), saved.fingerprint());
    assert_eq!(
        report_json(&dir.join("saved"))["train"]["epochs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn resuming_with_fewer_epochs_than_the_run_was_started_for_is_refused() {
    let out = temp_dir("fewer-epochs");
    let args = resume_args(&out, &["--epochs", "1"]);
    refused(
        &strs(&args),
        &[
            "started for 2 epochs",
            "--epochs 1 would cut",
            "--epochs 2",
            "TrainConfig::epochs",
        ],
    );
}

#[test]
fn resuming_with_more_epochs_continues_and_says_the_schedule_stretches() {
    let out = temp_dir("more-epochs");
    let mut args = resume_args(&out, &["--epochs", "3"]);
    args.retain(|a| a != "-q");
    let (ok, report, err) = loren(&strs(&args));
    assert!(ok, "{err}");
    assert!(report.contains("accuracy"), "{report}");
    assert!(err.contains("from 2 to 3 epochs"), "{err}");
    // The report's epochs are the whole run's, the saved two and the resumed third.
    let report = report_json(&out);
    let epochs: Vec<u64> = report["train"]["epochs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2, 3]);
}

/// A run stopped before the epochs it was started for resumes to its own end: its schedule is
/// the one it started with, so there is no note of one stretched.
#[test]
fn an_unfinished_run_resumes_to_its_end_without_stretching_its_schedule() {
    // The shared two-epoch run, as if started for three and stopped after two.
    let ckpt = trained_run_edited("unfinished", |m| set_json(m, "train", "epochs", 3));
    let out = ckpt.parent().unwrap().to_str().unwrap();
    let mut args = vec!["train", "--out", out, "--resume", ckpt.to_str().unwrap()];
    args.extend(RUN.iter().filter(|a| **a != "-q"));
    args.extend(["--epochs", "3"]);
    let (ok, report, err) = loren(&args);
    assert!(ok, "{err}");
    assert!(report.contains("accuracy"), "{report}");
    assert!(!err.contains("extending"), "{err}");
    assert_eq!(epochs_in_report(ckpt.parent().unwrap()), 3);
}

#[test]
fn resuming_on_other_data_is_refused() {
    let out = temp_dir("other-data");
    let args = resume_args(&out, &["--epochs", "3", "--holdout-classes", "8,9"]);
    refused(&strs(&args), &["holdout_classes", "same data"]);
}

/// The model was trained on normalised inputs: resuming or evaluating it on raw pixels is
/// refused; checkpoints from before the setting (which lack its key) read as normalised.
#[test]
fn resuming_or_evaluating_with_other_normalisation_is_refused() {
    let out = temp_dir("other-normalize");
    let args = resume_args(&out, &["--epochs", "3", "--normalize", "none"]);
    refused(
        &strs(&args),
        &["normalize 'dataset', not 'none'", "same data"],
    );
    refused(
        &[
            "eval",
            "--checkpoint",
            &checkpoint(),
            "--normalize",
            "none",
            "--out",
            out.to_str().unwrap(),
        ],
        &["--normalize none", "was trained with --normalize dataset"],
    );
    // A checkpoint that never recorded it resumes as normalised, its default.
    let copy = trained_run_without("normalize", "dataset");
    let ckpt = copy.join("checkpoint.safetensors");
    let (ok, _, err) = loren(&[
        "train",
        "--resume",
        ckpt.to_str().unwrap(),
        "--epochs",
        "3",
        "-q",
    ]);
    assert!(ok, "{err}");
    assert_eq!(epochs_in_report(&copy), 3);
}

/// Training on the validation part changes the data a run trains on: a resumed run must agree,
/// takes the setting from the checkpoint when the flag is left out, and still has no validation
/// figures; a checkpoint from before the setting was recorded kept the part apart.
#[test]
fn training_on_the_validation_part_is_recorded_and_resumed() {
    let out = temp_dir("other-train-on-val");
    let args = resume_args(&out, &["--epochs", "3", "--train-on-val"]);
    refused(
        &strs(&args),
        &[
            "trained without --train-on-val, not with --train-on-val",
            "same data",
        ],
    );

    let dir = temp_dir("train-on-val");
    let printed = train_ok(&dir, "1", &["--train-on-val"]);
    assert!(
        printed.contains("\n  validation: none (--train-on-val"),
        "{printed}"
    );
    let ckpt = dir.join("checkpoint.safetensors");
    let file = TensorFile::read(&ckpt).unwrap();
    assert_eq!(file.metadata()["train_on_val"], "true");
    let report = report_json;
    // The digits' 539 training images and 179 validation images, in batches of 32.
    assert_eq!(report(&dir)["train"]["steps"], 23);
    assert!(report(&dir)["val_accuracy"].is_null());
    assert!(report(trained())["val_accuracy"].is_f64());
    let (ok, _, err) = loren(&[
        "train",
        "--resume",
        ckpt.to_str().unwrap(),
        "--epochs",
        "2",
        "-q",
    ]);
    assert!(ok, "{err}");
    assert_eq!(report(&dir)["train"]["steps"], 46);
    assert!(report(&dir)["val_accuracy"].is_null());
    // Its evaluation records the data as it was trained.
    let scored = dir.join("eval");
    let (ok, _, err) = loren(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--no-shift",
        "--no-ood",
        "-q",
        "--out",
        scored.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(scored.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["settings"]["data"]["train_on_val"], "true", "{eval}");

    let ckpt = trained_run_without("train_on_val", "false").join("checkpoint.safetensors");
    let args = [
        "train",
        "--resume",
        ckpt.to_str().unwrap(),
        "--epochs",
        "3",
        "--train-on-val",
        "-q",
    ];
    refused(&args, &["trained without --train-on-val, not with"]);
}

/// Every epoch is scored on the validation part, for the learning curves: in report.json's
/// epochs, drawn in training.svg, kept through a resume, the last epoch's scores the report's.
/// Scoring reads the model alone: without it the checkpoint's tensors and the peak memory are the
/// same.
#[test]
fn every_epoch_is_scored_on_the_validation_part_without_changing_the_training() {
    let report = report_json(trained());
    let scored = |r: &serde_json::Value, i: usize| r["train"]["epochs"][i]["val"].clone();
    for i in 0..2 {
        let acc = scored(&report, i)["accuracy"].as_f64().unwrap();
        assert!(acc > 0.5 && acc <= 1.0, "epoch {i}: accuracy {acc}");
        assert!(scored(&report, i)["ece"].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(scored(&report, 1)["accuracy"], report["val_accuracy"]);
    assert_eq!(scored(&report, 1)["nll"], report["val_nll"]);
    assert_eq!(scored(&report, 1)["ece"], report["val_ece"]);
    let svg = std::fs::read_to_string(trained().join("training.svg")).unwrap();
    svg_check::check_svg(&svg).unwrap();
    assert!(svg.contains(">validation ECE (15 bins)<"), "{svg}");

    let dir = temp_dir("val-every-0");
    train_ok(&dir, "2", &["--val-every", "0"]);
    let unscored = report_json(&dir);
    assert!(scored(&unscored, 0).is_null() && scored(&unscored, 1).is_null());
    // The validation part is scored as at an epoch's end, so its figures, the temperature fitted
    // on it and the figures at that temperature are the same to the last bit.
    for key in ["val_accuracy", "val_nll", "val_ece", "memory"] {
        assert_eq!(unscored[key], report[key], "{key}");
    }
    assert_eq!(unscored["report"]["tempered"], report["report"]["tempered"]);
    // And so are `eval`'s, scoring the checkpoint again.
    let again = temp_dir("val-every-eval");
    let ckpt = trained().join("checkpoint.safetensors");
    run_ok(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--no-shift",
        "--no-ood",
        "-q",
    ]);
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(again.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["tempered"], report["report"]["tempered"]);
    assert_eq!(eval["test"], report["report"]["test"]);
    let tensors = |d: &Path| {
        all_tensors(&TensorFile::read(&d.join("checkpoint.safetensors")).unwrap())
            .into_iter()
            .map(|(n, e)| (n, e.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    };
    assert!(
        tensors(&dir) == tensors(trained()),
        "scoring changed the training"
    );
    let svg = std::fs::read_to_string(dir.join("training.svg")).unwrap();
    assert!(svg.contains("no epoch was scored"), "{svg}");

    // Resumed to five epochs and scored every second: the first two epochs' scores are the
    // checkpoint's, the third is not scored, the fourth is (every second) and the fifth (the last).
    let out = temp_dir("val-every-2");
    let (ok, _, err) = loren(&strs(&resume_args(
        &out,
        &["--epochs", "5", "--val-every", "2"],
    )));
    assert!(ok, "{err}");
    let resumed = report_json(&out);
    assert_eq!(scored(&resumed, 0), scored(&report, 0));
    assert_eq!(scored(&resumed, 1), scored(&report, 1));
    assert!(scored(&resumed, 2).is_null());
    assert!(scored(&resumed, 3)["accuracy"].is_f64());
    assert!(scored(&resumed, 4)["accuracy"].is_f64());
}

/// The report scores the ensembles of fewer members too, from the same predictions: each member
/// alone (their mean), then the whole ensemble, whose scores are the report's own.
#[test]
fn the_report_scores_smaller_ensembles_made_of_the_members() {
    let report = report_json(trained())["report"].clone();
    let rows = report["by_size"].as_array().unwrap();
    let sizes: Vec<(u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["members"].as_u64().unwrap(),
                r["groups"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(sizes, [(1, 2), (2, 1)]);
    let test = &report["test"];
    for key in ["accuracy", "ece", "nll", "brier"] {
        assert_eq!(rows[1][key], test[key], "{key}");
    }
    let alone = rows[0]["accuracy"].as_f64().unwrap();
    let members = test["mean_member_accuracy"].as_f64().unwrap();
    assert!((alone - members).abs() < 1e-12, "{alone} against {members}");
}

/// The test prediction is also scored scaled by a temperature fitted on the validation part:
/// the same after training and in `loren eval` (up to the rounding of another batch size), with
/// the accuracy untouched; a run that trained on the validation part has none.
#[test]
fn the_prediction_is_scored_at_a_temperature_fitted_on_validation() {
    let report = report_json(trained())["report"].clone();
    let tempered = &report["tempered"];
    let t = tempered["temperature"].as_f64().unwrap();
    assert!(t > 0.01 && t < 100.0, "T = {t}");
    assert!(tempered["nll"].as_f64().unwrap() > 0.0);

    let out = temp_dir("eval-tempered");
    let ckpt = checkpoint();
    let args = [
        "eval",
        "--checkpoint",
        &ckpt,
        "--out",
        out.to_str().unwrap(),
        "--no-ood",
        "-q",
    ];
    let (ok, printed, err) = loren(&args);
    assert!(ok, "{err}");
    assert!(
        printed.contains("\n  temperature-scaled   ECE "),
        "{printed}"
    );
    // And the shifted sets at the temperature fitted in distribution.
    assert!(
        printed.contains(" at the temperature fitted on validation\n"),
        "{printed}"
    );
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("eval.json")).unwrap()).unwrap();
    for key in ["temperature", "ece", "nll", "brier"] {
        let (a, b) = (
            tempered[key].as_f64().unwrap(),
            eval["tempered"][key].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1e-3),
            "{key}: {a} after training, {b} in eval"
        );
    }
    assert_eq!(eval["test"]["accuracy"], report["test"]["accuracy"]);
    let shift = eval["shift"].as_array().unwrap();
    assert_eq!(shift.len(), 15);
    assert!(shift.iter().all(|r| r["ece_tempered"].as_f64().is_some()));

    let dir = temp_dir("tempered-train-on-val");
    train_ok(&dir, "1", &["--train-on-val"]);
    assert!(report_json(&dir)["report"]["tempered"].is_null());
}

/// A copy of the trained run whose checkpoint's metadata `edit` changed: that checkpoint.
fn trained_run_edited(name: &str, edit: impl FnOnce(&mut HashMap<String, String>)) -> PathBuf {
    let ckpt = copy_of_the_trained_run(name).join("checkpoint.safetensors");
    let file = TensorFile::read(&ckpt).unwrap();
    let mut meta = file.metadata().clone();
    edit(&mut meta);
    write(&ckpt, &all_tensors(&file), meta).unwrap();
    ckpt
}

/// Set `field` of the JSON metadata `key` to `value`.
fn set_json(
    meta: &mut HashMap<String, String>,
    key: &str,
    field: &str,
    value: impl Into<serde_json::Value>,
) {
    let mut json: serde_json::Value = serde_json::from_str(&meta[key]).unwrap();
    json[field] = value.into();
    meta.insert(key.into(), json.to_string());
}

/// `loren eval` of `ckpt` is refused, as [`refused`] says.
fn eval_refused(ckpt: &Path, needles: &[&str]) {
    let c = ckpt.to_str().unwrap();
    refused(
        &["eval", "--checkpoint", c, "--no-shift", "--no-ood"],
        needles,
    );
}

/// A copy of the trained run whose checkpoint lacks the metadata `key` (which held `value`), as
/// one written before the setting was recorded.
fn trained_run_without(key: &str, value: &str) -> PathBuf {
    let ckpt = trained_run_edited(&format!("before-{key}"), |meta| {
        assert_eq!(meta.remove(key).as_deref(), Some(value));
    });
    ckpt.parent().unwrap().to_path_buf()
}

/// A checkpoint whose metadata describe a far larger model than its tensors (corrupt, or
/// crafted) is refused by every command that reads it, before a model of that size is made:
/// 2^25 members of the tiny ViT would be 2 TB, whose allocation aborts the process.
#[test]
fn metadata_describing_a_model_its_tensors_cannot_hold_are_refused() {
    let ckpt = trained_run_edited("crafted", |m| set_json(m, "ensemble", "members", 1 << 25));
    let c = ckpt.to_str().unwrap();
    let out = ckpt.with_file_name("export.safetensors");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/examples");
    for args in [
        vec!["eval", "--checkpoint", c, "--no-shift", "--no-ood"],
        vec!["predict", "--model", c, examples.to_str().unwrap()],
        vec!["export", "--checkpoint", c, "--out", out.to_str().unwrap()],
    ] {
        refused(&args, &["33554432 members", "do not match the tensors"]);
    }
    // Past what loren builds at all, each command names the file whose metadata say so.
    let ckpt = trained_run_edited("crafted-huge", |m| {
        set_json(m, "ensemble", "members", 1u64 << 40)
    });
    let c = ckpt.to_str().unwrap();
    for args in [
        vec!["eval", "--checkpoint", c, "--no-shift", "--no-ood"],
        vec!["predict", "--model", c, examples.to_str().unwrap()],
        vec!["export", "--checkpoint", c, "--out", out.to_str().unwrap()],
        vec!["train", "--resume", c, "--epochs", "3", "-q"],
    ] {
        refused(&args, &[c, "more than loren builds"]);
    }
    // A resumed run's saved training settings likewise.
    let ckpt = trained_run_edited("crafted-batch", |m| set_json(m, "train", "batch_size", 0));
    let c = ckpt.to_str().unwrap();
    refused(
        &["train", "--resume", c, "--epochs", "3", "-q"],
        &[
            c,
            "describe no run loren trains",
            "batch size must be at least 1",
        ],
    );
    // An image side of 2^16 pixels in patches of 2 is refused before the position embedding is
    // resampled to it.
    let ckpt = trained_run_edited("crafted-image", |m| {
        set_json(m, "vit", "image_size", 1 << 16)
    });
    eval_refused(&ckpt, &["32768 patches a side, above 1024"]);
    // An epsilon of 0 would make a constant row NaN.
    let ckpt = trained_run_edited("crafted-eps", |m| set_json(m, "vit", "ln_eps", 0.0));
    eval_refused(&ckpt, &["layernorm epsilon 0 must be finite and above 0"]);
}

/// A LoRA checkpoint that names no backbone, and is given none, says that it needs one: its own
/// tensors are not the model its metadata describe, and that is not the problem.
#[test]
fn a_lora_checkpoint_without_its_backbone_says_it_needs_one() {
    let ckpt = trained_run_edited("no-backbone", |meta| {
        assert!(meta.remove("backbone").is_some());
    });
    eval_refused(&ckpt, &["its frozen backbone is needed too"]);
}

/// A checkpoint from before the augmentation recorded its sampling reads as bilinear, which
/// `--augment paper` no longer is: resumed, it continues as it was trained; asked to go on as
/// today's paper preset, it is refused by name.
/// A checkpoint from before the training images were recorded resumes on the data it names.
#[test]
fn a_checkpoint_from_before_the_training_images_record_resumes() {
    let ckpt = trained_run_edited("before-training-images", |m| {
        assert!(m.remove("training_images").is_some());
    });
    let out = temp_dir("before-training-images-resumed");
    let mut args = vec!["train", "--resume", ckpt.to_str().unwrap(), "--epochs", "3"];
    args.extend(["--out", out.to_str().unwrap()]);
    args.extend(RUN);
    let (ok, _, err) = loren(&args);
    assert!(ok, "{err}");
    assert_eq!(
        report_json(&out)["train"]["epochs"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn a_paper_augmentation_from_before_nearest_sampling_resumes_as_it_was() {
    let dir = temp_dir("old-paper-augment");
    train_ok(&dir, "1", &["--augment", "paper"]);
    let ckpt = dir.join("checkpoint.safetensors");
    let train_meta = |ckpt: &Path| -> serde_json::Value {
        serde_json::from_str(TensorFile::read(ckpt).unwrap().meta("train").unwrap()).unwrap()
    };
    let mut train = train_meta(&ckpt);
    let augment = train["augment"].as_object_mut().unwrap();
    assert_eq!(augment.remove("sampling").unwrap(), "nearest");
    let file = TensorFile::read(&ckpt).unwrap();
    let mut meta = file.metadata().clone();
    meta.insert("train".into(), train.to_string());
    write(&ckpt, &all_tensors(&file), meta).unwrap();

    let c = ckpt.to_str().unwrap();
    refused(
        &[
            "train",
            "--resume",
            c,
            "--epochs",
            "2",
            "--augment",
            "paper",
            "-q",
        ],
        &[r#"augment.sampling: saved "bilinear", now "nearest""#],
    );
    let (ok, _, err) = loren(&["train", "--resume", c, "--epochs", "2", "-q"]);
    assert!(ok, "{err}");
    let resumed = train_meta(&ckpt);
    assert_eq!(resumed["epochs"], 2);
    assert_eq!(resumed["augment"]["sampling"], "bilinear");
    assert_eq!(resumed["augment"]["max_rotation_deg"], 90.0);
}

/// The bundled backbone with one weight changed, as a backbone pretrained again would differ.
fn other_backbone(dir: &Path) -> PathBuf {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/backbone-tiny.safetensors");
    let file = TensorFile::read(&bundled).unwrap();
    let mut tensors = all_tensors(&file);
    tensors[0].1.data[0] += 0.5;
    let path = dir.join("backbone.safetensors");
    write(&path, &tensors, file.metadata().clone()).unwrap();
    path
}

#[test]
fn other_backbone_weights_are_refused_by_resume_eval_and_export() {
    let dir = temp_dir("other-backbone");
    let b = other_backbone(&dir);
    let b = b.to_str().unwrap();
    let c = checkpoint();
    let needles = ["trained from a backbone with fingerprint", "--backbone"];
    refused(
        &[
            "eval",
            "--checkpoint",
            &c,
            "--backbone",
            b,
            "--out",
            dir.to_str().unwrap(),
        ],
        &needles,
    );
    let out = dir.join("ensemble.safetensors");
    refused(
        &[
            "export",
            "--checkpoint",
            &c,
            "--backbone",
            b,
            "--out",
            out.to_str().unwrap(),
        ],
        &needles,
    );
    assert!(!out.exists());
    let mut args = resume_args(&dir, &["--epochs", "3"]);
    args.extend(["--backbone".to_string(), b.to_string()]);
    refused(&strs(&args), &needles);
}

#[test]
fn held_out_classes_are_the_same_in_any_order() {
    let dir = temp_dir("holdout-order");
    let c = held_out_run().join("checkpoint.safetensors");
    let (ok, _, err) = loren(&[
        "eval",
        "--checkpoint",
        c.to_str().unwrap(),
        "--holdout-classes",
        "9,8",
        "--no-shift",
        "-q",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let mut args: Vec<String> = ["train", "--out", dir.to_str().unwrap(), "--resume"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(c.to_str().unwrap().to_string());
    args.extend(RUN.iter().map(|s| s.to_string()));
    args.extend(["--epochs", "2", "--holdout-classes", "8,9,8"].map(String::from));
    let (ok, _, err) = loren(&strs(&args));
    assert!(ok, "{err}");
}

/// A LoRA-Ensemble trained holding out classes 9 and 8 (given in that order), for one epoch.
fn held_out_run() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = temp_dir("held-out");
        train_ok(&dir, "1", &["--holdout-classes", "9,8"]);
        dir
    })
}

/// The explicit ensemble's checkpoint holds every weight: the backbone it is loaded over does not
/// matter, and is not refused.
#[test]
fn a_checkpoint_without_frozen_weights_takes_any_backbone() {
    let dir = temp_dir("explicit-backbone");
    train_ok(&dir, "1", &["--method", "explicit"]);
    let b = other_backbone(&dir);
    let c = dir.join("checkpoint.safetensors");
    let (ok, _, err) = loren(&[
        "eval",
        "--checkpoint",
        c.to_str().unwrap(),
        "--backbone",
        b.to_str().unwrap(),
        "--no-shift",
        "-q",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
}

#[test]
fn eval_with_other_held_out_classes_is_refused() {
    let dir = temp_dir("eval-holdout");
    refused(
        &[
            "eval",
            "--checkpoint",
            &checkpoint(),
            "--holdout-classes",
            "7,9",
            "--out",
            dir.to_str().unwrap(),
        ],
        &["--holdout-classes 7,9", "holding out no classes"],
    );
}

#[test]
fn eval_takes_the_folder_a_run_wrote() {
    let dir = temp_dir("eval-folder");
    let run = trained();
    let (ok, report, err) = loren(&[
        "eval",
        "--checkpoint",
        run.to_str().unwrap(),
        "--no-shift",
        "--no-ood",
        "-q",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(report.contains("accuracy"), "{report}");
}

#[test]
fn eval_on_other_data_than_it_was_trained_on_says_so() {
    let dir = temp_dir("eval-other-data");
    let copy = dir.join("digits-copy.csv.gz");
    std::fs::copy("assets/digits/digits.csv.gz", &copy).unwrap();
    let data = format!("digits:{}", copy.display());
    let (ok, _, err) = loren(&[
        "eval",
        "--checkpoint",
        &checkpoint(),
        "--data",
        &data,
        "--no-shift",
        "--no-ood",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("was trained on digits") && err.contains(&format!("scoring it on {data}")),
        "{err}"
    );
    // A digits file is split as the bundled one is, its pretraining part unused by the run.
    let said = format!(
        "{data} is split as the bundled digits are: 720 of its images (40%) are the pretraining \
         part"
    );
    assert!(err.contains(&said), "{err}");
    // The data it was trained on, named: nothing to say.
    let (ok, _, err) = loren(&[
        "eval",
        "--checkpoint",
        &checkpoint(),
        "--data",
        "digits",
        "--no-shift",
        "--no-ood",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(!err.contains("scoring it on"), "{err}");
}

#[test]
fn export_replaces_an_earlier_export_and_nothing_else() {
    let dir = temp_dir("export-self");
    let c = dir.join("checkpoint.safetensors");
    std::fs::copy(checkpoint(), &c).unwrap();
    let before = std::fs::read(&c).unwrap();
    let c = c.to_str().unwrap();
    refused(
        &["export", "--checkpoint", c, "--out", c],
        &["is the checkpoint itself"],
    );
    assert_eq!(std::fs::read(c).unwrap(), before, "the checkpoint changed");
    // Nor onto another run's checkpoint, a backbone or any file but an earlier export.
    let other = copy_of_the_trained_run("export-other").join("checkpoint.safetensors");
    let other_before = std::fs::read(&other).unwrap();
    refused(
        &[
            "export",
            "--checkpoint",
            c,
            "--out",
            other.to_str().unwrap(),
        ],
        &["is a training checkpoint", "write it elsewhere"],
    );
    assert_eq!(std::fs::read(&other).unwrap(), other_before);
    let backbone = dir.join("backbone.safetensors");
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/backbone-tiny.safetensors");
    std::fs::copy(bundled, &backbone).unwrap();
    let plain = dir.join("ensemble.safetensors");
    std::fs::write(&plain, b"an earlier file").unwrap();
    for (out, is) in [(&backbone, "is a backbone"), (&plain, "is not an ensemble")] {
        let before = std::fs::read(out).unwrap();
        let export = ["export", "--checkpoint", c, "--out", out.to_str().unwrap()];
        refused(&export, &[is, "write it elsewhere"]);
        assert_eq!(std::fs::read(out).unwrap(), before);
    }
    // An earlier export is replaced.
    std::fs::remove_file(&plain).unwrap();
    let export = [
        "export",
        "--checkpoint",
        c,
        "--out",
        plain.to_str().unwrap(),
    ];
    for _ in 0..2 {
        let (ok, _, err) = loren(&export);
        assert!(ok, "{err}");
    }
}

#[test]
fn an_unwritable_out_folder_fails_before_training() {
    let dir = temp_dir("unwritable");
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a folder").unwrap();
    let under = file.join("out");
    let mut args = vec!["train", "--out", under.to_str().unwrap(), "--epochs", "1"];
    args.extend(RUN);
    refused(&args, &["--out", "cannot write there"]);
    // A folder where the run would write a file fails it before it trains, not after.
    let blocked = dir.join("blocked");
    std::fs::create_dir_all(blocked.join("predictions.safetensors")).unwrap();
    let mut args = vec!["train", "--out", blocked.to_str().unwrap(), "--epochs", "1"];
    args.extend(RUN);
    refused(&args, &["predictions.safetensors is a folder"]);
    let blocked = dir.join("blocked-checkpoint");
    std::fs::create_dir_all(blocked.join("checkpoint.safetensors")).unwrap();
    let mut args = vec!["train", "--out", blocked.to_str().unwrap(), "--epochs", "1"];
    args.extend(RUN);
    refused(&args, &["checkpoint.safetensors is a folder"]);
}

/// A fresh run into a folder that holds another run's results says it replaces them, and leaves
/// them whole when it is refused or stops before its first checkpoint; a NaN loss does not call
/// the older run's checkpoint its own.
#[test]
fn a_fresh_run_replaces_an_earlier_one_and_does_not_claim_its_checkpoint() {
    let dir = temp_dir("replace");
    for f in OUTPUTS {
        std::fs::copy(trained().join(f), dir.join(f)).unwrap();
    }
    // A run refused before it trains leaves the earlier one as it was.
    let mut args = vec!["train", "--out", dir.to_str().unwrap(), "--epochs", "2"];
    args.extend(RUN);
    args.extend(["--backbone", "nowhere.safetensors"]);
    let (ok, _, err) = loren(&args);
    assert!(!ok && !err.contains("earlier run"), "{err}");
    assert!(dir.join("report.json").exists() && dir.join("reliability.svg").exists());

    let mut args = vec![
        "train",
        "--out",
        dir.to_str().unwrap(),
        "--lr",
        "1e30",
        "--weight-decay",
        "0",
        "--epochs",
        "2",
    ];
    args.extend(RUN);
    let (ok, _, err) = loren(&args);
    assert!(!ok, "a learning rate of 1e30 trained");
    assert!(err.contains("holds an earlier run"), "{err}");
    assert!(err.contains("checkpoint.safetensors continues it"), "{err}");
    assert!(
        err.contains("no checkpoint had been written yet")
            && err.contains("checkpoint.safetensors is still the earlier run's"),
        "{err}"
    );
    for f in OUTPUTS {
        let (now, was) = (dir.join(f), trained().join(f));
        assert_eq!(
            std::fs::read(now).unwrap(),
            std::fs::read(was).unwrap(),
            "{f}"
        );
    }
}

/// A copy of the trained run in a folder of its own, with an `eval.json` and the predictions
/// files beside it as `--save-predictions` and `loren eval` leave them.
fn copy_of_the_trained_run(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    for f in OUTPUTS {
        std::fs::copy(trained().join(f), dir.join(f)).unwrap();
    }
    for f in EARLIER_SCORES {
        std::fs::write(dir.join(f), b"{}").unwrap();
    }
    dir
}

/// What scored the earlier run's checkpoint: a run that replaces it removes them.
const EARLIER_SCORES: [&str; 3] = [
    "eval.json",
    "eval-predictions.safetensors",
    "predictions.safetensors",
];

fn epochs_in_report(dir: &Path) -> usize {
    report_json(dir)["train"]["epochs"]
        .as_array()
        .unwrap()
        .len()
}

/// Without --out, a run never takes an earlier one's place: it goes to the first free
/// `runs/train-N`, and the earlier run's files stay as they were.
#[test]
fn the_default_folder_moves_on_past_an_earlier_run() {
    let cwd = temp_dir("default-out");
    let first = cwd.join("runs/train");
    std::fs::create_dir_all(&first).unwrap();
    for f in OUTPUTS {
        std::fs::copy(trained().join(f), first.join(f)).unwrap();
    }
    // An empty folder is free: the run after takes it.
    std::fs::create_dir_all(cwd.join("runs/train-3")).unwrap();
    for (n, expected) in [
        (1, "runs/train-2"),
        (2, "runs/train-3"),
        (3, "runs/train-4"),
    ] {
        let mut args = vec!["train", "--epochs", "1"];
        args.extend(RUN);
        let (ok, printed, err) = loren_in(&cwd, &args);
        assert!(ok, "run {n}: {err}");
        assert!(
            printed.contains(&format!("wrote {expected}/report.json")),
            "run {n}: {printed}"
        );
        assert!(cwd.join(expected).join("checkpoint.safetensors").is_file());
    }
    for f in OUTPUTS {
        assert_eq!(
            std::fs::read(first.join(f)).unwrap(),
            std::fs::read(trained().join(f)).unwrap(),
            "{f}"
        );
    }
}

/// compare, bench and memprofile keep an earlier run's files the same way.
#[test]
fn every_commands_default_folder_moves_on_past_an_earlier_run() {
    let cwd = temp_dir("default-out-all");
    let measure = [
        "--device",
        "cpu",
        "--config",
        "tiny",
        "--members",
        "1",
        "--methods",
        "lora",
    ];
    let commands: [(&str, &[&str], &str); 3] = [
        (
            "compare",
            &[
                "--methods",
                "single",
                "--epochs",
                "1",
                "--no-shift",
                "--no-ood",
            ],
            "compare.json",
        ),
        (
            "bench",
            &[&measure[..], &["--warmup", "0", "--repeats", "1"]].concat(),
            "bench.json",
        ),
        ("memprofile", &measure, "memprofile.json"),
    ];
    for (command, args, file) in commands {
        let first = cwd.join("runs").join(command).join(file);
        for (n, folder) in [(1, command.to_string()), (2, format!("{command}-2"))] {
            let (ok, _, err) = loren_in(&cwd, &[&[command], args].concat());
            assert!(ok, "{command} {n}: {err}");
            assert!(
                cwd.join("runs").join(&folder).join(file).is_file(),
                "{command} {n}: {err}"
            );
            if n == 1 {
                std::fs::write(&first, b"the earlier run's").unwrap();
            } else {
                assert!(err.contains("holds an earlier run"), "{err}");
            }
        }
        assert_eq!(std::fs::read(&first).unwrap(), b"the earlier run's");
    }
}

/// A run killed outright cannot remove its claim on the default folder, but the operating system
/// lets go of the claim's lock: the next run takes the folder when the killed one wrote nothing
/// else in it, and moves on past it when it did.
#[test]
fn a_killed_runs_claim_does_not_keep_the_default_folder() {
    let cwd = temp_dir("killed-claim");
    let mut killed = std::process::Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(["train", "-q"])
        .current_dir(&cwd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let claim = cwd.join("runs/train/.loren-claim");
    // Written: a claim not yet locked is empty, and is rightly never taken over.
    let started = std::time::Instant::now();
    while !std::fs::metadata(&claim).is_ok_and(|m| m.len() > 0) {
        assert!(
            started.elapsed().as_secs() < 60 && killed.try_wait().unwrap().is_none(),
            "the run made no claim"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(claim.is_file(), "a killed run removed its claim");
    let left = std::fs::read_dir(cwd.join("runs/train")).unwrap().count();
    let expected = if left == 1 {
        "runs/train"
    } else {
        "runs/train-2"
    };
    let mut args = vec!["train", "--epochs", "1"];
    args.extend(RUN);
    let (ok, printed, err) = loren_in(&cwd, &args);
    assert!(ok, "{err}");
    assert!(
        printed.contains(&format!("wrote {expected}/report.json")),
        "{left} files left by the killed run: {printed}"
    );
    assert!(!cwd.join(expected).join(".loren-claim").exists());
}

#[test]
fn resuming_without_out_continues_in_the_checkpoints_folder() {
    let run = copy_of_the_trained_run("in-place");
    let cwd = temp_dir("in-place-cwd");
    let args = [
        "train",
        "--resume",
        run.to_str().unwrap(),
        "--epochs",
        "3",
        "--no-shift",
        "--no-ood",
        "-q",
    ];
    let (ok, _, err) = loren_in(&cwd, &args);
    assert!(ok, "{err}");
    assert!(!err.contains("earlier run"), "resumed in place: {err}");
    assert_eq!(epochs_in_report(&run), 3, "the run's own report");
    for f in EARLIER_SCORES {
        assert!(
            !run.join(f).exists(),
            "{f} of the two-epoch checkpoint stayed beside the three-epoch one"
        );
    }
    assert_eq!(
        std::fs::read_dir(&cwd).unwrap().count(),
        0,
        "the resumed run wrote into the working folder"
    );
    // From inside the folder, by the file's bare name: the same run again, in place.
    let args = [
        "train",
        "--resume",
        "checkpoint.safetensors",
        "--epochs",
        "4",
        "--no-shift",
        "--no-ood",
        "-q",
    ];
    let (ok, _, err) = loren_in(&run, &args);
    assert!(ok && !err.contains("earlier run"), "{err}");
    assert_eq!(epochs_in_report(&run), 4);
}

#[test]
fn an_explicit_run_resumes_with_lora_flags_it_does_not_use() {
    let dir = temp_dir("explicit-resume");
    let out = dir.to_str().unwrap();
    let quick = ["--no-shift", "--no-ood", "-q"];
    let mut args = vec!["train", "--method", "explicit", "-m", "2", "--epochs", "1"];
    args.extend(["--out", out]);
    args.extend(quick);
    let (ok, _, err) = loren(&args);
    assert!(ok, "{err}");
    // -q keeps the note back; without it the run says it does not use --rank, and resumes.
    let args = [
        "train",
        "--resume",
        out,
        "--rank",
        "4",
        "--epochs",
        "2",
        "--no-shift",
        "--no-ood",
    ];
    let (ok, _, err) = loren(&args);
    assert!(ok, "{err}");
    assert!(err.contains("does not use --rank"), "{err}");
    assert_eq!(epochs_in_report(&dir), 2);
}

#[test]
fn resuming_into_another_runs_folder_says_it_replaces_that_run() {
    let other = copy_of_the_trained_run("resume-over");
    let (ok, _, err) = loren(&strs(&resume_args(&other, &["--epochs", "3"])));
    assert!(ok, "{err}");
    assert!(err.contains("holds an earlier run"), "{err}");
    assert_eq!(epochs_in_report(&other), 3);
    for f in EARLIER_SCORES {
        assert!(!other.join(f).exists(), "the other run's {f} stayed");
    }
}

/// A file at the checkpoint's place that --resume would refuse is replaced without offering to
/// resume it.
#[test]
fn a_file_that_is_no_checkpoint_is_replaced_without_an_offer_to_resume_it() {
    let dir = temp_dir("not-a-checkpoint");
    std::fs::write(dir.join("checkpoint.safetensors"), b"not a checkpoint").unwrap();
    let mut args = vec!["train", "--out", dir.to_str().unwrap(), "--epochs", "1"];
    args.extend(RUN);
    let (ok, _, err) = loren(&args);
    assert!(ok, "{err}");
    assert!(
        err.contains("holds a file at its checkpoint's place that is no training checkpoint"),
        "{err}"
    );
    assert!(!err.contains("--resume"), "{err}");
}

/// A run that diverges stops at the first sign, and what it keeps is a checkpoint of numbers
/// from before it, or said not to be one: never a file of NaN called good, and never a
/// metrics error about probabilities for a model whose weights blew up. (Batch 10000 is all
/// the images: one step an epoch.)
#[test]
fn a_run_that_diverges_keeps_only_a_checkpoint_of_numbers() {
    let dir = temp_dir("diverges");
    // `train` into `dir/name` with `flags`, which fails: its one-line error.
    let diverge = |name: &str, flags: &[&str]| {
        let out = dir.join(name);
        let mut args = vec!["train", "-m", "2", "--no-shift", "--no-ood", "-q"];
        // No weight decay: at these rates it would be refused before training.
        args.extend([
            "--batch-size",
            "10000",
            "--warmup",
            "0",
            "--weight-decay",
            "0",
        ]);
        args.extend(flags);
        args.extend(["--out", out.to_str().unwrap()]);
        let (ok, _, err) = loren(&args);
        assert!(!ok && err.lines().count() == 1, "{err}");
        (out.join("checkpoint.safetensors"), err)
    };
    let epoch_of = |ckpt: &Path| {
        TensorFile::read(ckpt)
            .unwrap()
            .meta("epoch")
            .unwrap()
            .to_string()
    };
    // Weights or moments that stop being numbers at the second epoch's step (no clipping to skip
    // it), not scored at its end: that epoch's checkpoint is not written, and the first epoch's
    // stays, whole.
    let nan = [
        "--lr",
        "1e6",
        "--grad-clip",
        "0",
        "--epochs",
        "3",
        "--val-every",
        "0",
    ];
    let (ckpt, err) = diverge("nan", &nan);
    let said = "error: training stopped: after epoch 2 (step 2), tensor '";
    assert!(
        err.starts_with(said) && err.contains("has diverged"),
        "{err}"
    );
    let kept = format!("the last good checkpoint is kept at {}", ckpt.display());
    assert!(err.contains(&kept), "{err}");
    assert_eq!(epoch_of(&ckpt), "1");
    run_ok(&[
        "eval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "-q",
        "--no-shift",
        "--no-ood",
    ]);
    // Finite weights that predict NaN: the validation part at the first epoch's end says so, before
    // any checkpoint.
    let (ckpt, err) = diverge("huge", &["--lr", "1e30", "--epochs", "2"]);
    let said = "error: training stopped: after epoch 1 (step 1), member 0's probabilities for \
                validation image 0 are NaN: the weights have diverged; no checkpoint had been \
                written yet";
    assert!(err.starts_with(said), "{err}");
    assert!(!ckpt.exists());
    // Not scored at epochs' ends, the next epoch's loss says it, and the checkpoint it began
    // from is said to hold those weights, not to be a good one.
    let (ckpt, err) = diverge(
        "unscored",
        &["--lr", "1e30", "--epochs", "2", "--val-every", "0"],
    );
    let said = format!(
        "error: training stopped: the loss is NaN at step 2, in epoch 2; the last checkpoint \
         written, {}, holds the weights that step began from (epoch 1's end), so they may have \
         diverged already",
        ckpt.display()
    );
    assert_eq!(err.trim_end(), said);
    // Scored only once trained, they are said to be the trained weights, and where they are;
    // `eval` says the same of them.
    let (ckpt, err) = diverge(
        "once",
        &["--lr", "1e30", "--epochs", "1", "--val-every", "0"],
    );
    let said = format!(
        "error: scoring the trained ensemble (its checkpoint {} holds those weights): member 0's \
         probabilities for image 0 are not numbers (NaN): its weights have diverged",
        ckpt.display()
    );
    assert_eq!(err.trim_end(), said);
    let c = ckpt.to_str().unwrap();
    let (ok, _, err) = loren(&["eval", "--checkpoint", c, "-q", "--no-shift", "--no-ood"]);
    let said = "error: member 0's probabilities for image 0 are not numbers (NaN): its weights have \
                diverged";
    assert!(!ok && err.trim_end() == said, "{err}");
    // `predict` names the image by its file.
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/examples/digit-3.png");
    let (ok, _, err) = loren(&["predict", "--model", c, image.to_str().unwrap(), "-q"]);
    let said = format!(
        "error: {}: member 0's probabilities are not numbers (NaN): the model's weights have \
         diverged",
        image.display()
    );
    assert!(!ok && err.trim_end() == said, "{err}");
}

/// The report keeps scoring's peak apart from training's: it grows with --eval-batch-size, which
/// training's does not see, and the printed line shows both.
#[test]
fn the_report_says_the_peak_of_scoring_apart_from_training() {
    let dir = temp_dir("scoring-peak");
    let run = |name: &str, batch: &str| {
        let out = dir.join(name);
        let printed = train_ok(&out, "1", &["--eval-batch-size", batch]);
        let report = report_json(&out);
        let peak = |key: &str| report.pointer(key).and_then(|v| v.as_u64()).unwrap();
        (printed, peak("/memory/total_peak"), peak("/scoring_peak"))
    };
    let (_, train_small, score_small) = run("small", "1");
    let (printed, train_large, score_large) = run("large", "300");
    assert_eq!(train_small, train_large);
    assert!(
        score_large > 10 * score_small,
        "{score_small} {score_large}"
    );
    let line = printed
        .lines()
        .find(|l| l.contains("peak tensor memory"))
        .unwrap();
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
    let said = format!(
        "peak tensor memory {} training, {} scoring, on cpu;",
        mib(train_large),
        mib(score_large)
    );
    assert!(line.contains(&said), "{line}");
}
