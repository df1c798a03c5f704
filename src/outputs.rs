//! Output paths, checked before the work that will fill them: a run that cannot save its results
//! fails in its first second, not after its training.

use std::fs::{self, OpenOptions};
use std::path::Path;

use anyhow::{Context, Result};

/// Prove a file can be written in `dir`: make it (with its parents), write and remove a probe
/// file, and remove again the folders it made, so that nothing is left behind for a run that
/// then reads its data from around there. `flag` names the option the folder came from.
pub fn writable_dir(dir: &Path, flag: &str) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let fail = || format!("{flag} {}: cannot write there", dir.display());
    let made: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .collect();
    fs::create_dir_all(dir).with_context(fail)?;
    let probe = dir.join(format!(".loren-write-probe-{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map(drop)
        .and_then(|()| fs::remove_file(&probe));
    // Innermost first; remove_dir leaves a folder something else has filled meanwhile.
    for d in made {
        let _ = fs::remove_dir(d);
    }
    written.with_context(fail)
}

/// [`writable_dir`] for the folder that will hold `file`; a folder of that name is an error.
pub fn writable_file(file: &Path, flag: &str) -> Result<()> {
    if file.is_dir() {
        anyhow::bail!("{flag} {}: is a folder, not a file", file.display());
    }
    writable_dir(file.parent().unwrap_or(Path::new(".")), flag)
}

/// Whether `a` and `b` name the same file (both existing), however they are spelled.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
