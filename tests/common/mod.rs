//! What the tests that run the `loren` binary share: running it, and judging a failure.
// Each test crate uses its own share of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use loren_nn::checkpoint::{Entry, TensorFile};

/// `loren args` run from `cwd`: whether it succeeded, its stdout and its stderr.
pub fn loren_in(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_loren"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("the loren binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn loren(args: &[&str]) -> (bool, String, String) {
    loren_in(Path::new("."), args)
}

/// The stdout of a run that must succeed without a panic.
pub fn run_ok_in(cwd: &Path, args: &[&str]) -> String {
    let (ok, out, err) = loren_in(cwd, args);
    assert!(ok, "loren {args:?} failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    out
}

pub fn run_ok(args: &[&str]) -> String {
    run_ok_in(Path::new("."), args)
}

/// The run failed, without a panic, printing exactly one `error:` line that holds every one of
/// `needles` on stderr; returns its stdout.
pub fn fails_with(args: &[&str], needles: &[&str]) -> String {
    fails_with_in(Path::new("."), args, needles)
}

/// [`fails_with`], run from `cwd`.
pub fn fails_with_in(cwd: &Path, args: &[&str], needles: &[&str]) -> String {
    let (ok, out, err) = loren_in(cwd, args);
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
    out
}

/// An empty folder of this test crate's and process's own.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "loren-{}-{}-{name}",
        env!("CARGO_CRATE_NAME"),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `report.json` a run wrote into `dir`.
pub fn report_json(dir: &Path) -> serde_json::Value {
    let path = dir.join("report.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Every tensor of `file`, by name: to write it again with other metadata.
pub fn all_tensors(file: &TensorFile) -> Vec<(String, Entry)> {
    file.names()
        .map(|n| (n.to_string(), file.get(n).unwrap().clone()))
        .collect()
}
