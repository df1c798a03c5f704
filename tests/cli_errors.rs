//! Bad input to the `loren` binary gets a one-line error naming what is wrong, a non-zero exit
//! code, and never a panic.

use std::path::{Path, PathBuf};

mod common;
use common::{fails_with, fails_with_in, loren, run_ok, strs, temp_dir};

fn quick(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--epochs", "1", "-q", "--no-shift", "--no-ood"]
        .map(String::from)
        .into();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// One epoch of two members into `out`, with `flags`, which must succeed: its stderr.
fn two_members_one_epoch(out: &Path, flags: &[&str]) -> String {
    let mut args = vec!["train", "-m", "2", "--epochs", "1", "--no-shift"];
    args.extend(flags);
    args.extend(["--out", out.to_str().unwrap()]);
    let (ok, _, err) = loren(&args);
    assert!(ok, "{err}");
    err
}

#[test]
fn zero_members() {
    fails_with(&strs(&quick(&["--members", "0"])), &["at least 1 member"]);
}

/// The default run's options given before any command are shown where they go.
#[test]
fn options_before_a_command_are_shown_after_train() {
    let (ok, _, err) = loren(&["--members", "4", "--rank", "2"]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("tip: options go after a command: loren train --members 4 --rank 2"),
        "{err}"
    );
}

/// A batch larger than the training data is the data, one step an epoch, and the run's first
/// line says so.
#[test]
fn a_batch_past_the_data_is_said_to_be_all_of_it() {
    let out = temp_dir("batch-past-the-data");
    let (ok, _, err) = loren(&[
        "train",
        "--epochs",
        "1",
        "-m",
        "2",
        "--no-shift",
        "--no-ood",
        "--batch-size",
        "1000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("1 epoch of 1 step (batch 1000: all the images)"),
        "{err}"
    );
}

#[test]
fn zero_rank() {
    fails_with(
        &strs(&quick(&["--rank", "0"])),
        &["rank must be at least 1"],
    );
}

#[test]
fn rank_above_the_width() {
    fails_with(
        &strs(&quick(&["--rank", "65"])),
        &["rank 65", "above the model width 64"],
    );
}

#[test]
fn a_run_too_large_for_the_memory_is_refused_before_it_starts() {
    // 100,000 members of the tiny ViT need terabytes, with or without --recompute.
    fails_with(
        &strs(&quick(&["--members", "100000", "--device", "cpu"])),
        &[
            "lora with 100000 members on tiny",
            "predicted to need",
            "is available",
        ],
    );
}

#[test]
fn unknown_device() {
    fails_with(
        &strs(&quick(&["--device", "tpu"])),
        &["unknown device 'tpu'"],
    );
}

#[test]
fn cuda_without_a_usable_gpu_is_a_clear_error() {
    // On a machine with a working GPU this would train; CI and developer machines have none.
    let (ok, _, err) = loren(&strs(&quick(&["--device", "cuda"])));
    if ok {
        eprintln!("skipped: this machine has a usable CUDA device");
        return;
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.to_lowercase().contains("cuda"),
        "{err}"
    );
}

#[test]
fn unknown_method_and_config() {
    fails_with(
        &strs(&quick(&["--method", "bagging"])),
        &["unknown method 'bagging'"],
    );
    fails_with(
        &strs(&quick(&["--config", "vit-h"])),
        &["unknown model config 'vit-h'"],
    );
}

#[test]
fn missing_dataset_file() {
    fails_with(
        &strs(&quick(&["--data", "digits:/no/such/digits.csv.gz"])),
        &["/no/such/digits.csv.gz"],
    );
}

#[test]
fn corrupt_dataset_file() {
    let p = temp_dir("corrupt-data").join("digits.csv.gz");
    std::fs::write(&p, b"this is not gzip").unwrap();
    let arg = format!("digits:{}", p.display());
    fails_with(
        &strs(&quick(&["--data", &arg])),
        &[&p.display().to_string(), "gzip"],
    );
}

fn bundled_backbone() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/backbone-tiny.safetensors")
}

#[test]
fn truncated_backbone() {
    let bytes =
        std::fs::read(bundled_backbone()).expect("the bundled backbone is in the repository");
    let p = temp_dir("truncated").join("backbone.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &strs(&quick(&["--backbone", p.to_str().unwrap()])),
        &[p.to_str().unwrap(), "truncated: its header describes"],
    );
}

/// Rewrite the bundled backbone with `edit` applied to its tensors.
fn edited_backbone(
    name: &str,
    edit: impl Fn(&mut Vec<(String, loren_nn::checkpoint::Entry)>),
) -> PathBuf {
    let f = loren_nn::checkpoint::TensorFile::read(&bundled_backbone()).unwrap();
    let mut tensors: Vec<_> = f
        .names()
        .map(|n| (n.to_string(), f.get(n).unwrap().clone()))
        .collect();
    edit(&mut tensors);
    let p = temp_dir(name).join("backbone.safetensors");
    loren_nn::checkpoint::write(&p, &tensors, f.metadata().clone()).unwrap();
    p
}

#[test]
fn backbone_with_a_missing_tensor() {
    let p = edited_backbone("missing", |t| {
        t.retain(|(n, _)| n != "blocks.2.attn.v.weight")
    });
    fails_with(
        &strs(&quick(&["--backbone", p.to_str().unwrap()])),
        &["blocks.2.attn.v.weight", "missing", p.to_str().unwrap()],
    );
}

#[test]
fn backbone_with_a_misshapen_tensor() {
    let p = edited_backbone("shape", |t| {
        let e = &mut t
            .iter_mut()
            .find(|(n, _)| n == "blocks.1.mlp.fc1.weight")
            .unwrap()
            .1;
        e.shape = vec![64, 128];
    });
    fails_with(
        &strs(&quick(&["--backbone", p.to_str().unwrap()])),
        &["blocks.1.mlp.fc1.weight", "[64, 128]", "[128, 64]"],
    );
}

#[test]
fn resume_from_a_missing_checkpoint() {
    fails_with(
        &strs(&quick(&["--resume", "/no/such/checkpoint.safetensors"])),
        &["--resume", "/no/such/checkpoint.safetensors"],
    );
}

#[test]
fn a_missing_backbone_or_checkpoint_names_its_flag() {
    fails_with(
        &strs(&quick(&["--backbone", "/no/such/backbone.safetensors"])),
        &["--backbone: /no/such/backbone.safetensors"],
    );
    let empty = temp_dir("no-checkpoint");
    for command in ["eval", "export"] {
        let mut args = vec![command, "--checkpoint", empty.to_str().unwrap()];
        if command == "export" {
            args.extend(["--out", "/tmp/loren-never-written.safetensors"]);
        }
        fails_with(
            &args,
            &["--checkpoint ", "a folder with no checkpoint.safetensors"],
        );
    }
}

#[test]
fn bench_refuses_a_bad_rank_class_count_or_size_before_measuring() {
    // Not quiet: a "measuring the peak" line before the error would fail the one-line check.
    for (flag, needle) in [
        ("--rank", "rank must be at least 1"),
        ("--classes", "at least 2 classes"),
    ] {
        fails_with(&["bench", "--device", "cpu", flag, "0"], &[needle]);
    }
    // A size twice, as compare refuses one.
    for command in ["bench", "memprofile"] {
        fails_with(
            &[command, "--device", "cpu", "-m", "2,1,2"],
            &["--members names 2 twice"],
        );
    }
}

/// A refusal comes before the default folder is chosen: with an earlier run in runs/COMMAND, no
/// note that this one goes to runs/COMMAND-2 comes before the error, and no runs/COMMAND-2 is
/// left.
#[test]
fn refusals_come_before_the_folder_is_said() {
    let cwd = temp_dir("refused-before-the-folder");
    let missing = cwd.join("missing.safetensors");
    let missing = missing.to_str().unwrap();
    for (command, file) in [
        ("train", "report.json"),
        ("compare", "compare.json"),
        ("bench", "bench.json"),
        ("memprofile", "memprofile.json"),
    ] {
        let earlier = cwd.join("runs").join(command);
        std::fs::create_dir_all(&earlier).unwrap();
        std::fs::write(earlier.join(file), "{}").unwrap();
        let mut refusals = vec![
            (
                vec![command, "--device", "cpu", "--rank", "0"],
                "rank must be at least 1",
            ),
            (
                vec![command, "--device", "cpu", "--members", "999999999"],
                "more than loren builds",
            ),
        ];
        if matches!(command, "train" | "compare") {
            refusals.push((
                vec![command, "--device", "cpu", "--backbone", missing],
                "missing.safetensors",
            ));
        }
        for (args, needle) in refusals {
            fails_with_in(&cwd, &args, &[needle]);
        }
        assert!(!cwd.join("runs").join(format!("{command}-2")).exists());
    }
}

/// OOD sets that are the data scored in distribution (however the path is written) are said to
/// be: no score tells an image from itself, and an AUROC of 0.5 could be read as a failure.
#[test]
fn an_ood_set_that_is_the_data_itself_is_noted() {
    let dir = temp_dir("ood-itself");
    let out = dir.join("run");
    let noted = "note: --ood-data digits is the data scored in distribution";
    let train = |out: &Path, extra: &[&str]| {
        two_members_one_epoch(out, &[&["--ood-data", "digits"], extra].concat())
    };
    let err = train(&out, &[]);
    assert!(err.contains(noted), "{err}");
    let ckpt = out.join("checkpoint.safetensors");
    let c = ckpt.to_str().unwrap();
    let (ok, _, err) = loren(&[
        "eval",
        "--checkpoint",
        c,
        "--no-shift",
        "--ood-data",
        "digits",
    ]);
    assert!(ok && err.contains(noted), "{err}");
    // With classes held out, the set holds images the scored test part lacks: no such note.
    let held = dir.join("held");
    let err = train(&held, &["--holdout-classes", "8,9"]);
    assert!(!err.contains("scored in distribution"), "{err}");
    // A folder of images passes over what it does not read, and says so, as --data does.
    let loose = dir.join("loose");
    std::fs::create_dir_all(loose.join("inner")).unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/examples");
    for (from, to) in [("digit-1.png", "1.png"), ("digit-2.png", "inner/2.png")] {
        std::fs::copy(examples.join(from), loose.join(to)).unwrap();
    }
    std::fs::write(loose.join("inner/notes.txt"), "not an image").unwrap();
    std::fs::write(loose.join("old.gif"), b"GIF89a\x01\x00\x01\x00").unwrap();
    let ood = format!("folder:{}", loose.display());
    let (ok, _, err) = loren(&["eval", "--checkpoint", c, "--no-shift", "--ood-data", &ood]);
    let said = format!(
        "note: --ood-data {ood}: passed over 2 files that it does not read: inner/notes.txt (not \
         an image), old.gif (a GIF image)"
    );
    assert!(ok && err.contains(&said), "{err}");
}

#[test]
fn flags_the_method_or_optimizer_does_not_use_are_named() {
    let dir = temp_dir("unused-flags");
    let train =
        |out: &Path, flags: &[&str]| two_members_one_epoch(out, &[&["--no-ood"], flags].concat());
    let explicit = [
        "--method",
        "explicit",
        "--rank",
        "4",
        "--lora-targets",
        "qv",
        "--momentum",
        "0.5",
        "--drop-key",
        "0.2",
    ];
    let err = train(&dir.join("explicit"), &explicit);
    assert!(
        err.contains(
            "this run does not use --rank (explicit has no adapters), --lora-targets (explicit \
             has no adapters), --drop-key (explicit has no dropout), --momentum (adamw does not \
             use it)"
        ),
        "{err}"
    );
    // Its 17 steps (539 images in batches of 32) end inside the default 50-step warm-up.
    assert!(
        err.contains("explicit: note: its 17 steps are all learning-rate warm-up (--warmup 50)"),
        "{err}"
    );
    // Quiet, the note is held back with the rest.
    let quiet = [&explicit[..], &["-q"]].concat();
    let err = train(&dir.join("quiet"), &quiet);
    assert!(err.is_empty(), "{err}");
    // MC Dropout drops keys; a 5-step warm-up ends inside the run, so it has no note either.
    let err = train(
        &dir.join("mc-dropout"),
        &[
            "--method",
            "mc-dropout",
            "--drop-key",
            "0.2",
            "--warmup",
            "5",
        ],
    );
    assert!(!err.contains("does not use"), "{err}");
    assert!(!err.contains("warm-up"), "{err}");
    // A LoRA run with SGD uses both; a warmup of 5 steps may start from zero.
    let err = train(
        &dir.join("lora-sgd"),
        &[
            "--rank",
            "4",
            "--optimizer",
            "sgd",
            "--momentum",
            "0.5",
            "--warmup",
            "5",
            "--warmup-from-zero",
        ],
    );
    assert!(!err.contains("does not use"), "{err}");
    // With no warmup there is nothing to start from zero.
    let err = train(
        &dir.join("no-warmup"),
        &["--warmup", "0", "--warmup-from-zero"],
    );
    assert!(
        err.contains("this run does not use --warmup-from-zero (there is no warmup: --warmup 0)"),
        "{err}"
    );
    // A warm-up from zero cut to the run ends short of the peak; one of one step trains nothing,
    // which is warned of under -q too (batch 10000: one step an epoch).
    let err = train(
        &dir.join("short"),
        &["--warmup", "100", "--warmup-from-zero"],
    );
    let said = "note: its 17 steps are all learning-rate warm-up (--warmup 100), which rises from \
                0 to 94% of the peak over the whole run";
    assert!(err.contains(said), "{err}");
    let one = [
        "--warmup",
        "1",
        "--warmup-from-zero",
        "--batch-size",
        "10000",
        "-q",
    ];
    let err = train(&dir.join("one"), &one);
    let said = "lora: warning: the run's one step is the first of its warm-up from zero \
                (--warmup-from-zero), at learning rate 0: it trains nothing";
    assert_eq!(err.trim_end(), said);
    // A comparison says the same of the flags none of its methods uses, before its data is read
    // (here data that is not there, to stop it there).
    let (ok, _, err) = loren(&[
        "compare",
        "--methods",
        "single,explicit",
        "-r",
        "4",
        "--drop-key",
        "0.3",
        "--sizes",
        "1,2",
        "--data",
        "folder:/no/such/images",
        "--out",
        dir.join("cmp").to_str().unwrap(),
    ]);
    let said = "this comparison does not use --rank (none of single, explicit has adapters), \
                --drop-key (none of single, explicit has dropout)";
    assert!(!ok && err.contains(said), "{err}");
    let (ok, _, err) = loren(&[
        "compare",
        "--methods",
        "single,single-lora",
        "--sizes",
        "1,2",
        "--data",
        "folder:/no/such/images",
        "--out",
        dir.join("cmp").to_str().unwrap(),
    ]);
    let said = "this comparison does not use --sizes (each method is one network)";
    assert!(!ok && err.contains(said), "{err}");
}

#[test]
fn a_single_network_refuses_members() {
    fails_with(
        &strs(&quick(&["--method", "single", "-m", "4"])),
        &["--members 4: single is one network"],
    );
}

#[test]
fn compare_refuses_a_method_named_twice() {
    fails_with(
        &["compare", "--methods", "lora,single,lora", "-q"],
        &["--methods names lora twice"],
    );
}

#[test]
fn bench_and_memprofile_refuse_a_method_or_config_named_twice() {
    for command in ["bench", "memprofile"] {
        fails_with(
            &[
                command,
                "--device",
                "cpu",
                "--methods",
                "lora,explicit,lora",
            ],
            &["--methods names lora twice"],
        );
        fails_with(
            &[command, "--device", "cpu", "--config", "tiny,tiny"],
            &["--config names tiny twice"],
        );
    }
}

#[test]
fn compare_refuses_a_bad_rate_per_method() {
    let dir = temp_dir("compare-method-lr");
    let out = dir.to_str().unwrap();
    for (value, needles) in [
        ("lora", &["--method-lr lora", "METHOD=LR"][..]),
        ("lora=fast", &["'fast' is not a number"]),
        ("lora=-1e-3", &["positive and finite"]),
        ("lora=0", &["positive and finite"]),
        (
            "bagging=1e-3",
            &["--method-lr bagging=1e-3", "unknown method 'bagging'"],
        ),
        ("explicit=1e-3", &["explicit is not among --methods"]),
        ("lora=1e-3,lora=2e-3", &["gives lora two rates"]),
        ("lora=1e-6", &["method lora", "--min-lr"]),
    ] {
        fails_with(
            &[
                "compare",
                "--methods",
                "single,lora",
                "--method-lr",
                value,
                "--epochs",
                "1",
                "-q",
                "--out",
                out,
            ],
            needles,
        );
    }
}

#[test]
fn eval_of_a_file_that_is_not_a_checkpoint() {
    let b = bundled_backbone();
    fails_with(
        &["eval", "--checkpoint", b.to_str().unwrap(), "-q"],
        &["not a loren training checkpoint"],
    );
}

#[test]
fn help_teaches() {
    let (ok, out, _) = loren(&["train", "--help"]);
    assert!(ok);
    for flag in [
        "--members",
        "--rank",
        "--method",
        "--seed",
        "--epochs",
        "--out",
        "--device",
        "--resume",
    ] {
        assert!(out.contains(flag), "train --help lacks {flag}");
    }
}

/// [`fails_with`], and nothing on stdout either: the run stopped before any of its work (an epoch,
/// a table, a report) got as far as printing.
fn fails_before_work(args: &[&str], needles: &[&str]) {
    fails_with(args, needles);
    let (_, out, _) = loren(args);
    assert!(out.is_empty(), "{args:?} printed before failing: {out}");
}

#[test]
fn pretrain_to_an_unwritable_out_fails_before_the_epochs() {
    // Not quiet, so an epoch line would show as a second line of stderr.
    fails_before_work(
        &[
            "pretrain",
            "--epochs",
            "30",
            "--out",
            "/proc/x/a.safetensors",
        ],
        &["--out", "/proc/x"],
    );
}

#[test]
fn pretrain_to_a_folder_asks_for_a_file_with_or_without_force() {
    let dir = temp_dir("pretrain-folder");
    let out = dir.to_str().unwrap();
    for force in [&[][..], &["--force"][..]] {
        let mut args = vec!["pretrain", "--epochs", "30", "--out", out];
        args.extend(force);
        fails_before_work(&args, &["is a folder", "backbone.safetensors"]);
    }
}

/// A one-epoch run of two members into a new folder named for `name`: the folder.
fn quick_run(name: &str) -> std::path::PathBuf {
    let dir = temp_dir(name);
    let args = quick(&["-m", "2", "--out", dir.to_str().unwrap()]);
    run_ok(&strs(&args));
    dir
}

/// --force replaces a backbone, not a run's checkpoint or an export in its place.
#[test]
fn pretrain_force_leaves_a_checkpoint_and_an_export_alone() {
    let dir = quick_run("pretrain-over-a-run");
    let run = dir.to_str().unwrap();
    let ckpt = dir.join("checkpoint.safetensors");
    let export = dir.join("ensemble.safetensors");
    run_ok(&[
        "export",
        "--checkpoint",
        run,
        "--out",
        export.to_str().unwrap(),
    ]);
    let report = dir.join("report.json");
    for (file, what) in [
        (&ckpt, "a training checkpoint"),
        (&export, "an ensemble"),
        (&report, "not a backbone"),
    ] {
        let before = std::fs::read(file).unwrap();
        let args = [
            "pretrain",
            "--epochs",
            "30",
            "--force",
            "--out",
            file.to_str().unwrap(),
        ];
        fails_before_work(&args, &[what, "which --force does not replace"]);
        assert_eq!(std::fs::read(file).unwrap(), before);
    }
}

/// A folder where eval writes one of its files is refused before the scoring, as train's are.
#[test]
fn eval_with_a_folder_in_the_way_fails_before_scoring() {
    let dir = quick_run("eval-folder-in-the-way");
    let run = dir.to_str().unwrap();
    for name in ["eval.json", "eval-reliability.svg"] {
        std::fs::create_dir(dir.join(name)).unwrap();
        let folder = format!("{} is a folder", dir.join(name).display());
        fails_before_work(
            &["eval", "--checkpoint", run],
            &[
                &folder,
                "is a folder, where the run writes a file of that name",
            ],
        );
        std::fs::remove_dir(dir.join(name)).unwrap();
    }
}

#[test]
fn compare_with_a_size_twice_or_of_zero_is_refused() {
    let dir = temp_dir("compare-sizes");
    let out = dir.to_str().unwrap();
    fails_before_work(
        &["compare", "--sizes", "2,1,2", "--out", out],
        &["--sizes names 2 twice"],
    );
    fails_before_work(
        &["compare", "--sizes", "0,2", "--out", out],
        &["--sizes", "at least 1"],
    );
}

#[test]
fn compare_with_a_seed_twice_or_beside_seed_is_refused() {
    let dir = temp_dir("compare-seeds");
    let out = dir.to_str().unwrap();
    fails_before_work(
        &["compare", "--seeds", "3,1,3", "--out", out],
        &["--seeds names 3 twice"],
    );
    // A usage error, which clap explains with the usage line.
    let (ok, _, err) = loren(&["compare", "--seed", "1", "--seeds", "2,3", "--out", out]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(
        err.starts_with("error: the argument '--seed <SEED>' cannot be used with '--seeds"),
        "{err}"
    );
}

#[test]
fn ood_data_that_cannot_be_scored_is_refused_before_training() {
    let dir = temp_dir("ood-data");
    let out = dir.to_str().unwrap();
    fails_before_work(
        &["train", "--no-ood", "--ood-data", "digits", "--out", out],
        &["--ood-data with --no-ood"],
    );
    fails_before_work(
        &["train", "--ood-data", "svhn:x", "--out", out],
        &["--ood-data", "unknown dataset 'svhn:x'"],
    );
    fails_before_work(
        &[
            "eval",
            "--checkpoint",
            out,
            "--ood-data",
            "digits",
            "--ood-data",
            "digits",
        ],
        &["--ood-data digits is given twice"],
    );
    let missing = dir.join("missing");
    let arg = format!("folder:{}", missing.display());
    fails_before_work(
        &["compare", "--ood-data", &arg, "--out", out],
        &["--ood-data folder:", "missing"],
    );
}

#[test]
fn compare_to_an_unwritable_out_fails_before_training() {
    fails_before_work(
        &[
            "compare",
            "--epochs",
            "1",
            "--no-shift",
            "--no-ood",
            "--out",
            "/proc/x/cmp",
        ],
        &["--out /proc/x/cmp"],
    );
}

/// The quickest `loren bench` on the CPU (one LoRA row, one repeat), with a peak GEMM of side
/// `peak`, writing to `out`, plus `extra`.
fn quick_bench(peak: &str, out: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "bench",
        "--device",
        "cpu",
        "-m",
        "1",
        "--methods",
        "lora",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--peak-size",
        peak,
        "--out",
        out,
    ]
    .map(String::from)
    .into();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The quickest `loren memprofile` on the CPU (tiny, one LoRA row), writing to `out`, plus
/// `extra`.
fn quick_memprofile(out: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "memprofile",
        "--device",
        "cpu",
        "--config",
        "tiny",
        "-m",
        "1",
        "--methods",
        "lora",
        "--out",
        out,
    ]
    .map(String::from)
    .into();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn bench_and_memprofile_to_an_unwritable_out_fail_before_measuring() {
    let bench = quick_bench("64", "/proc/x/b", &[]);
    fails_before_work(&strs(&bench), &["--out /proc/x/b"]);
    let memprofile = quick_memprofile("/proc/x/m", &[]);
    fails_before_work(&strs(&memprofile), &["--out /proc/x/m"]);
}

#[test]
fn compare_refuses_a_size_too_large_before_training_the_others() {
    let out = temp_dir("compare-sizes");
    fails_before_work(
        &[
            "compare",
            "--methods",
            "lora,explicit",
            "--sizes",
            "1,2,100000",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
        &["lora with 100000 members", "predicted to need"],
    );
    assert!(
        !out.join("lora-M1").exists(),
        "lora at M=1 was trained first"
    );
}

#[test]
fn compare_refuses_flags_it_would_ignore() {
    let (ok, _, err) = loren(&["compare", "-m", "4", "--sizes", "1,2"]);
    assert!(!ok, "-m with --sizes was accepted");
    assert!(
        err.contains("--members") && err.contains("--sizes") && !err.contains("panicked"),
        "{err}"
    );
    fails_with(
        &["compare", "--method", "lora", "--epochs", "1"],
        &["--method lora", "--methods"],
    );
    let (ok, help, _) = loren(&["compare", "--help"]);
    assert!(ok);
    assert!(
        help.contains("--methods") && !help.contains("--method <"),
        "{help}"
    );
}

#[test]
fn bad_optimizer_and_adapter_flags_name_the_flag() {
    for (flag, value, needle) in [
        ("--lr", "-1", "finite and above 0"),
        ("--lr", "0", "finite and above 0"),
        ("--lr", "NaN", "finite and above 0"),
        ("--min-lr", "-1e-5", "not negative"),
        ("--min-lr", "inf", "finite"),
        ("--grad-clip", "NaN", "0 turns clipping off"),
        ("--grad-clip", "-1", "not negative"),
        ("--weight-decay", "-0.01", "not negative"),
        ("--weight-decay", "NaN", "not negative"),
        // At the default --lr 1e-3: each step would scale the weights by 1 - lr·wd.
        ("--weight-decay", "1000", "by 1 − 1, zeroing them"),
        ("--weight-decay", "2000", "by 1 − 2, flipping them"),
        ("--momentum", "1", "[0, 1)"),
        ("--momentum", "-0.5", "[0, 1)"),
        ("--momentum", "NaN", "[0, 1)"),
        ("--lora-scale", "inf", "finite"),
        ("--lora-scale", "0", "not 0"),
        ("--min-lr", "1", "above the peak (--lr 0.001)"),
        ("--eval-batch-size", "0", "at least 1"),
        ("--lora-gain", "0", "above 0"),
        ("--lora-gain", "-2", "above 0"),
        ("--lora-gain", "inf", "finite"),
        ("--lora-targets", "qq", "named twice"),
        ("--lora-targets", "qvq", "named twice"),
        ("--lora-targets", "qx", "'x' is not one of q, k, v, o"),
        ("--lora-targets", "", "name at least one"),
        ("--drop-key", "1", "below 1"),
        ("--drop-key", "-0.1", "at least 0"),
        ("--drop-key", "NaN", "below 1"),
    ] {
        fails_with(&strs(&quick(&[flag, value])), &[flag, needle]);
    }
    // Checked with every flag, whatever the method: before the output folder is.
    fails_with(
        &strs(&quick(&["--method", "explicit", "--lora-gain", "inf"])),
        &["--lora-gain", "finite"],
    );
    fails_with(
        &strs(&quick(&["--normalize", "bogus", "--out", "/proc/nope"])),
        &["--normalize", "bogus"],
    );
    // 0 is the documented "off" for clipping, and a negative LoRA scale is a scale: both pass,
    // and the run stops at the next check, the epochs, without training.
    for [flag, value] in [["--grad-clip", "0"], ["--lora-scale", "-1"]] {
        fails_with(
            &["train", "-q", "--epochs", "0", flag, value],
            &["at least 1 epoch"],
        );
    }
}

/// A value an f32 cannot hold is refused as written, not taken as 0 or infinity.
#[test]
fn values_past_f32_and_empty_paths_are_refused_as_written() {
    for (args, needle) in [
        (
            vec!["train", "--lr", "1e-300"],
            "1e-300 is too small for an f32",
        ),
        (
            vec!["train", "--lora-scale", "1e39"],
            "1e39 is too large for an f32",
        ),
        (
            vec!["train", "--lr", "1e999"],
            "1e999 is too large for an f32",
        ),
        (
            vec!["train", "--out", ""],
            "'' for '--out <OUT>': an empty path",
        ),
        (
            vec!["eval", "--checkpoint", ""],
            "an empty path (a shell variable that is not set?)",
        ),
        (
            vec!["compare", "--lrs", "1e-3,1e-300"],
            "1e-300 is too small",
        ),
        (
            vec!["compare", "--method-lr", "lora=1e-300"],
            "--method-lr lora=1e-300: 1e-300 is too small",
        ),
    ] {
        let (ok, _, err) = loren(&args);
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bench_refuses_a_peak_gemm_that_cannot_fit() {
    let out = temp_dir("bench-peak");
    let bench = |peak: &str, extra: &[&str]| quick_bench(peak, out.to_str().unwrap(), extra);
    // This one aborted the process allocating 40 GB.
    fails_before_work(
        &strs(&bench("100000", &[])),
        &["--peak-size 100000", "at most 8192"],
    );
    fails_before_work(
        &strs(&bench("4096", &["--memory-budget", "100MiB"])),
        &["--peak-size 4096", "100.0 MiB", "or less"],
    );
    fails_before_work(&strs(&bench("0", &[])), &["--peak-size 0", "at least 1"]);
}

#[test]
fn memory_budgets_read_gb_as_decimal_and_refuse_a_bare_g() {
    fails_with(
        &["bench", "--memory-budget", "16G"],
        &["--memory-budget", "ambiguous", "16GiB", "16GB"],
    );
    let out = temp_dir("budget");
    let args = quick_memprofile(
        out.to_str().unwrap(),
        &["--predict-only", "--memory-budget", "16GB", "-q"],
    );
    let (ok, stdout, err) = loren(&strs(&args));
    assert!(ok, "{err}");
    // 16·10^9 bytes; 16 GiB would print as 16.0 GiB.
    assert!(stdout.contains("memory budget: 14.9 GiB"), "{stdout}");
}

#[test]
fn memprofile_refuses_a_measured_size_it_does_not_profile() {
    fails_before_work(
        &[
            "memprofile",
            "--device",
            "cpu",
            "-m",
            "1",
            "--measure",
            "2",
            "--out",
            "/tmp",
        ],
        &["--measure 2", "--members"],
    );
}

/// The flags of `command`'s short help that have no description (after checking that the help's
/// flags were found at all: a format change must not leave nothing to judge).
fn undescribed_flags(command: &str) -> Vec<String> {
    let (ok, help, _) = loren(&[command, "-h"]);
    assert!(ok);
    let lines: Vec<&str> = help.lines().collect();
    let is_flag = |l: &str| {
        let t = l.trim_start();
        (t.starts_with("--") || t.starts_with('-')) && l.len() - t.len() <= 6
    };
    let flags = lines.iter().filter(|l| is_flag(l)).count();
    assert!(
        flags >= 3 && lines.iter().any(|l| is_flag(l) && l.contains("--help")),
        "loren {command} -h: found {flags} flags in\n{help}"
    );
    let mut bare = Vec::new();
    for (i, l) in lines.iter().enumerate().filter(|(_, l)| is_flag(l)) {
        // The flag, its value name, and at most a default: no words of its own.
        let words: Vec<&str> = l.split_whitespace().collect();
        let rest = words
            .iter()
            .find(|w| !(w.starts_with('-') || w.starts_with('<')))
            .copied();
        let described_below = lines
            .get(i + 1)
            .is_some_and(|n| !n.trim().is_empty() && !n.trim().starts_with('[') && !is_flag(n));
        if rest.is_none_or(|w| w.starts_with("[default")) && !described_below {
            bare.push(l.trim().to_string());
        }
    }
    bare
}

#[test]
fn every_flag_has_a_description_that_fits_its_command() {
    for c in [
        "train",
        "eval",
        "compare",
        "pretrain",
        "export",
        "bench",
        "memprofile",
    ] {
        let bare = undescribed_flags(c);
        assert!(bare.is_empty(), "loren {c} -h: no description for {bare:?}");
    }
    let (_, pretrain, _) = loren(&["pretrain", "--help"]);
    assert!(
        !pretrain.contains("members") && !pretrain.contains("report"),
        "{pretrain}"
    );
    let (_, eval, _) = loren(&["eval", "--help"]);
    // eval trains nothing: no seed to take.
    assert!(!eval.contains("--seed"), "{eval}");
}

/// A report printed into a full disk (`> /dev/full`) is a one-line error, not a panic; the files
/// were written first.
#[test]
fn a_full_stdout_is_an_error_not_a_panic() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        eprintln!("skipped: this system has no /dev/full");
        return;
    };
    let dir = temp_dir("full-stdout");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(["memprofile", "--predict-only", "-m", "1", "--out"])
        .arg(&dir)
        .stdout(full)
        .output()
        .expect("the loren binary runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("error: writing to stdout"), "{err}");
    assert!(
        dir.join("memprofile.json").exists(),
        "the files come before the table"
    );
}

/// `loren pretrain` would otherwise replace the bundled backbone (its default --out) that every
/// run starts from: an existing file is kept unless --force.
#[test]
fn pretrain_keeps_an_existing_backbone_without_force() {
    let dir = temp_dir("pretrain-exists");
    let file = dir.join("backbone.safetensors");
    std::fs::write(&file, b"weights").unwrap();
    let f = file.to_str().unwrap();
    fails_with(
        &["pretrain", "--epochs", "1", "--out", f],
        &["exists", "--force"],
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"weights");
}

/// A small `loren train` into `dir` with its stderr piped, as a shell would run it. Unless
/// `scored` (the whole scoring, shifted copies and OOD, with stdout piped too), it scores the test
/// split alone and drops stdout.
fn spawn_train_with(dir: &Path, epochs: &str, members: &str, scored: bool) -> std::process::Child {
    use std::process::Stdio;
    let (quick, stdout) = match scored {
        true => (&[][..], Stdio::piped()),
        false => (&["--no-shift", "--no-ood"][..], Stdio::null()),
    };
    std::process::Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(["train", "-m", members, "-r", "4"])
        .args(quick)
        .args(["--epochs", epochs, "--out", dir.to_str().unwrap()])
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn spawn_train(dir: &Path, epochs: &str) -> std::process::Child {
    spawn_train_with(dir, epochs, "2", false)
}

#[test]
fn a_closed_stderr_does_not_stop_a_run() {
    // `loren train 2>&1 | head -1`: the progress lines meet a closed pipe, the run goes on.
    let dir = temp_dir("closed-stderr");
    let mut child = spawn_train(&dir, "1");
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    for f in [
        "checkpoint.safetensors",
        "report.json",
        "reliability.svg",
        "training.svg",
    ] {
        assert!(dir.join(f).exists(), "{f} was not written");
    }
}

/// Two runs named into one folder: the second is refused while the first lives (the one's
/// checkpoint would sit beside the other's report), and the first leaves no claim behind.
#[cfg(unix)]
#[test]
fn a_folder_another_run_is_writing_is_refused() {
    let dir = temp_dir("held");
    let ckpt = dir.join("checkpoint.safetensors");
    let child = spawn_train(&dir, "50");
    let start = std::time::Instant::now();
    while !ckpt.exists() {
        assert!(
            start.elapsed().as_secs() < 120,
            "no checkpoint after two minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (pid, out) = (child.id(), dir.to_str().unwrap());
    let second = ["train", "--epochs", "1", "-q", "--out", out];
    let holder = format!("--out {out}: another loren run (process {pid}) is writing there");
    fails_with(&second, &[&holder]);
    // Nor is an eval written there: the run would take it for its own, or remove it.
    let c = ckpt.to_str().unwrap();
    let eval = ["eval", "--checkpoint", c, "-q", "--no-shift", "--no-ood"];
    let beside = format!(
        "the checkpoint's folder (--out DIR writes elsewhere) {out}: another loren run (process \
         {pid})"
    );
    fails_with(&eval, &[&beside]);
    let first = ctrl_c_once_written(child, &ckpt);
    assert_eq!(first.status.code(), Some(130));
    assert!(!dir.join(".loren-claim").exists(), "the claim stayed");
}

/// A named --out that a live run holds is refused by every command that writes a folder, before
/// it trains or measures anything, naming the run's process: compare, bench and memprofile
/// as train and eval are (their hold was unguarded).
#[test]
fn a_folder_another_run_holds_is_refused_by_every_command() {
    let dir = temp_dir("held-by-this");
    let held = loren::outputs::ClaimedDir::hold(&dir, "--out").unwrap();
    let out = dir.to_str().unwrap();
    let holder = format!(
        "--out {out}: another loren run (process {}) is writing there",
        std::process::id()
    );
    let measure = [
        "--device",
        "cpu",
        "--methods",
        "lora",
        "--members",
        "1",
        "-q",
    ];
    let train = quick(&["--out", out]);
    let mut compare = train.clone();
    compare[0] = "compare".into();
    compare.extend(["--methods", "single"].map(String::from));
    for args in [strs(&train), strs(&compare)] {
        fails_with(&args, &[&holder]);
    }
    for command in ["bench", "memprofile"] {
        let args = [&[command][..], &measure[..], &["--out", out][..]].concat();
        fails_with(&args, &[&holder]);
    }
    drop(held);
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "the refused commands left {left:?}");
}

/// Ctrl-C to `child` once `file` exists, and what it then printed.
#[cfg(unix)]
fn ctrl_c_once_written(child: std::process::Child, file: &Path) -> std::process::Output {
    signal_once_written(child, file, "-INT")
}

/// `signal` (as kill(1) takes it) to `child` once `file` exists, and what it then printed.
#[cfg(unix)]
fn signal_once_written(
    child: std::process::Child,
    file: &Path,
    signal: &str,
) -> std::process::Output {
    let start = std::time::Instant::now();
    while !file.exists() {
        assert!(
            start.elapsed().as_secs() < 120,
            "no {} after two minutes",
            file.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    child.wait_with_output().unwrap()
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_training_after_a_step_and_says_how_to_resume() {
    stops_training_after_a_step_and_says_how_to_resume("ctrl-c", "-INT", 130);
}

/// SIGTERM, which SLURM, Docker and Kubernetes send before they kill, stops a run as Ctrl-C
/// does, and ends it with 128 + 15.
#[cfg(unix)]
#[test]
fn sigterm_stops_training_as_ctrl_c_does() {
    stops_training_after_a_step_and_says_how_to_resume("sigterm", "-TERM", 143);
}

#[cfg(unix)]
fn stops_training_after_a_step_and_says_how_to_resume(name: &str, signal: &str, status: i32) {
    let dir = temp_dir(name);
    let ckpt = dir.join("checkpoint.safetensors");
    let child = spawn_train(&dir, "50");
    // Once the first epoch's checkpoint is there, the run is inside its second epoch.
    let out = signal_once_written(child, &ckpt, signal);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "{err}");
    let resume = format!("--resume {}", ckpt.display());
    assert!(
        err.contains("training interrupted after step") && err.contains(&resume),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Ctrl-C in `loren bench` stops it between rows: the rows measured are written and printed,
/// the rest say `stopped`, and it exits as Ctrl-C ends a command.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_a_bench_between_rows_and_keeps_the_rows_measured() {
    use std::io::{BufRead, BufReader};
    let dir = temp_dir("ctrl-c-bench");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(["bench", "--config", "tiny", "--members", "1,2,4,8,16,32"])
        .args([
            "--repeats",
            "100",
            "--warmup",
            "0",
            "--peak-size",
            "128",
            "--out",
        ])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the first row's figures are said, the second row is being measured.
    let mut said = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        said += &line;
        said.push('\n');
        if line.contains("tiny lora M=1: step") {
            break;
        }
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    for line in lines {
        said += &line.unwrap();
        said.push('\n');
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(
        said.contains("error: stopped (Ctrl-C or SIGTERM): the rows measured"),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap();
    let statuses: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[0], "ok", "{statuses:?}");
    assert_eq!(statuses.last(), Some(&"stopped"), "{statuses:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("stopped"), "{table}");
}

#[cfg(unix)]
#[test]
fn ctrl_c_while_scoring_stops_and_names_the_checkpoint_to_score() {
    let dir = temp_dir("ctrl-c-eval");
    let ckpt = dir.join("checkpoint.safetensors");
    // One epoch and the whole evaluation (shifted copies and OOD): seconds of scoring.
    let child = spawn_train_with(&dir, "1", "4", true);
    // The checkpoint is written when the last epoch ends: from there on the run is scoring.
    let out = ctrl_c_once_written(child, &ckpt);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let score = format!("loren eval --checkpoint {}", ckpt.display());
    assert!(
        err.contains("evaluation interrupted") && err.contains(&score),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "a report was printed");
    assert!(!dir.join("report.json").exists());
    assert!(ckpt.exists(), "the trained checkpoint went");
}

#[test]
fn compare_refuses_bad_rates_to_choose_among() {
    let dir = temp_dir("compare-lrs");
    let out = dir.to_str().unwrap();
    for (extra, needles) in [
        (&["--lrs", "0"][..], &["--lrs 0", "positive and finite"][..]),
        (
            &["--lrs", "1e-3,nan"],
            &["--lrs NaN", "positive and finite"],
        ),
        (&["--lrs", "1e-3,3e-4,1e-3"], &["--lrs names 1e-3 twice"]),
        (&["--lrs", "1e-3", "--train-on-val"], &["--train-on-val"]),
        (
            &["--lrs", "1e-3,1e-6"],
            &["method lora at --lrs 1e-6", "--min-lr"],
        ),
    ] {
        let mut args = vec!["compare", "--methods", "lora", "-q", "--out", out];
        args.extend(extra);
        fails_before_work(&args, needles);
    }
    // One rate per method, or rates to choose among: not both. A usage error, which clap
    // explains with the usage line.
    for other in [["--lr", "1e-3"], ["--method-lr", "lora=1e-3"]] {
        let mut args = vec!["compare", "--lrs", "1e-3,3e-3", "--out", out];
        args.extend(other);
        let (ok, _, err) = loren(&args);
        assert!(!ok && !err.contains("panicked"), "{err}");
        assert!(
            err.starts_with("error: the argument '--lrs <LRS>' cannot be used with"),
            "{err}"
        );
    }
}

/// Paths are written into checkpoints and reports as text, so one that is not UTF-8 is refused
/// as clap refuses any such value, before anything runs.
#[test]
fn paths_that_are_not_text_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"r\xffx");
    for (cmd, flag) in [
        ("train", "--out"),
        ("train", "--backbone"),
        ("export", "--out"),
        ("predict", "--out"),
        ("bench", "--out"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_loren"))
            .args([cmd, flag])
            .arg(bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd} {flag}: {err}");
        assert!(err.contains("invalid UTF-8"), "{cmd} {flag}: {err}");
    }
}

/// `loren pretrain` says how long the work ahead is in its first line, terminal or not.
#[test]
fn pretrain_says_what_it_will_train_first() {
    let dir = temp_dir("pretrain-header");
    let out = dir.join("backbone.safetensors");
    let (ok, _, err) = loren(&["pretrain", "--epochs", "2", "--out", out.to_str().unwrap()]);
    assert!(ok, "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("pretrain: tiny on cpu, ") && first.contains(" images, 2 epochs of "),
        "{err}"
    );
}
