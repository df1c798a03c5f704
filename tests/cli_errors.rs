//! Bad input to the `loren` binary gets a one-line error naming what is wrong, a non-zero exit
//! code, and never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Run loren with `args`; return (exit success, stdout, stderr).
fn loren(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(args)
        .output()
        .expect("the loren binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The run failed with exactly one `error:` line that contains every one of `needles`.
fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = loren(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?} should print one line, printed: {err}"
    );
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{args:?}: '{}' lacks '{n}'", lines[0]);
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loren-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn quick(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["train", "--epochs", "1", "-q", "--no-shift", "--no-ood"]
        .map(String::from)
        .into();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn zero_members() {
    fails_with(&strs(&quick(&["--members", "0"])), &["at least 1 member"]);
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
        &[p.to_str().unwrap(), "not a valid safetensors"],
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
        &["/no/such/checkpoint.safetensors"],
    );
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
