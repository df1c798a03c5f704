//! Output paths, checked before the work that will fill them: a run that cannot save its results
//! fails in its first second, not after its training.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Prove a file can be written in `dir`: make it (with its parents), write and remove a probe
/// file, and remove again the folders it made, so that nothing is left behind for a run that
/// then reads its data from around there (runs started together under one missing root may leave
/// that root, empty). `flag` names the option the folder came from.
pub fn writable_dir(dir: &Path, flag: &str) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let fail = || format!("{flag} {}: cannot write there", dir.display());
    // Two runs started together under one missing root (`runs/a`, `runs/b`) race: one may remove
    // the `runs` it made just as the other makes its folder inside it. That shows as NotFound,
    // and trying again from the top makes the root anew; 100 tries outlast any such race.
    let mut tries = 0;
    loop {
        match probe_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 100 => tries += 1,
            done => return done.with_context(fail),
        }
    }
}

/// One try of [`writable_dir`].
fn probe_dir(dir: &Path) -> std::io::Result<()> {
    // Outermost first, each folder made here alone, so that only those are removed after: a
    // path through `..` or a folder another process makes meanwhile is left as it is.
    let mut made = Vec::new();
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
        .collect();
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => made.push(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                remove_made(&made);
                return Err(e);
            }
        }
    }
    let probe = dir.join(format!(".loren-write-probe-{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map(drop)
        .and_then(|()| fs::remove_file(&probe));
    remove_made(&made);
    written
}

/// Innermost first; `remove_dir` leaves a folder something else has filled meanwhile.
fn remove_made(made: &[&Path]) {
    for d in made.iter().rev() {
        let _ = fs::remove_dir(d);
    }
}

/// [`writable_dir`] for the folder that will hold `file`; a folder of that name is an error.
pub fn writable_file(file: &Path, flag: &str) -> Result<()> {
    if file.is_dir() {
        anyhow::bail!("{flag} {}: is a folder, not a file", file.display());
    }
    writable_dir(file.parent().unwrap_or(Path::new(".")), flag)
}

/// Remove an earlier run's output file that this run does not write, which would otherwise
/// read as this run's.
pub fn remove_stale(path: &Path) -> Result<()> {
    if path.is_file() {
        fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// `base` when it is free (missing, or an empty folder), else the first free `base-2`,
/// `base-3`, ...: where a command's default output folder goes, so that running it again keeps
/// what the last run wrote.
pub fn free_dir(base: &Path) -> PathBuf {
    let free = |d: &Path| fs::read_dir(d).map_or(!d.exists(), |mut e| e.next().is_none());
    if free(base) {
        return base.to_path_buf();
    }
    let mut name = base.as_os_str().to_os_string();
    name.push("-");
    (2u64..)
        .map(|n| {
            let mut d = name.clone();
            d.push(n.to_string());
            PathBuf::from(d)
        })
        .find(|d| free(d))
        .expect("some numbered folder is free")
}

/// Whether `a` and `b` name the same file (both existing), however they are spelled.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("loren-outputs-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_probe_leaves_nothing_and_removes_only_what_it_made() {
        let base = temp("probe");
        writable_dir(&base.join("new/deeper"), "--out").unwrap();
        assert!(!base.join("new").exists(), "the folders it made stay");
        // Through a folder that is not there and back out: the existing empty folder stays.
        fs::create_dir(base.join("empty")).unwrap();
        writable_dir(&base.join("nothere/../empty"), "--out").unwrap();
        assert!(
            base.join("empty").is_dir(),
            "an existing folder was removed"
        );
        assert!(!base.join("nothere").exists());
        assert_eq!(
            fs::read_dir(&base).unwrap().count(),
            1,
            "a probe file stayed"
        );
        // Under a regular file: an error naming the flag and the path.
        fs::write(base.join("file"), b"x").unwrap();
        let e = writable_dir(&base.join("file/out"), "--out").unwrap_err();
        assert!(format!("{e:#}").contains("--out") && format!("{e:#}").contains("file/out"));
    }

    #[test]
    fn runs_started_together_under_one_missing_root_all_find_it_writable() {
        let base = temp("together");
        let root = base.join("runs");
        std::thread::scope(|s| {
            for t in 0..4 {
                let out = root.join(format!("run{t}"));
                s.spawn(move || {
                    for i in 0..300 {
                        if let Err(e) = writable_dir(&out, "--out") {
                            panic!("try {i}: {e:#}");
                        }
                    }
                });
            }
        });
        // The root may stay, empty, when one run made it while another was making its own folder
        // inside it; the runs' own folders and probe files may not.
        let left = fs::read_dir(&root).map_or(0, |d| d.count());
        assert_eq!(left, 0, "a run's folder or a probe file stayed");
    }
}
