//! Output paths, checked before the work that will fill them: a run that cannot save its results
//! fails in its first second, not after its training.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

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

/// A default output folder held by one run: `base` when it is free, else the first free
/// `base-2`, `base-3`, ...; so that running a command again keeps what the last run wrote.
///
/// Free means missing, empty, or holding only the claim of a run that ended without removing
/// it (killed, or a second Ctrl-C; one killed in the instant between making its claim and
/// locking it leaves an unwritten one, and that folder is passed over). A claim is a marker
/// file made only if none is there, so two runs started together cannot both take the folder,
/// and locked for as long as its run lives: the operating system lets go of the lock however
/// the process ends, so a marker nobody holds locked is one a dead run left. Dropping the claim
/// removes the marker, and the folder too when the run left nothing in it.
#[derive(Debug)]
pub struct ClaimedDir {
    pub path: PathBuf,
    marker: PathBuf,
    /// The folders removed with the claim when the run left them empty, innermost first.
    made: Vec<PathBuf>,
    /// Open, and locked, for the claim's life.
    _held: File,
}

const CLAIM: &str = ".loren-claim";

impl ClaimedDir {
    pub fn claim(base: &Path, flag: &str) -> Result<ClaimedDir> {
        for n in 1u64.. {
            let dir = match n {
                1 => base.to_path_buf(),
                n => {
                    let mut name = base.as_os_str().to_os_string();
                    name.push(format!("-{n}"));
                    PathBuf::from(name)
                }
            };
            let claimed = match only_a_claim(&dir) {
                Some(false) => claim_free(&dir),
                Some(true) => Ok(claim_left(&dir)),
                None => Ok(None),
            };
            match claimed
                .with_context(|| format!("{flag} {}: cannot write there", dir.display()))?
            {
                Some(path) => return Ok(path),
                None => continue,
            }
        }
        unreachable!("a u64 of folder names runs out")
    }
}

impl ClaimedDir {
    /// A folder named by the user (`--out`, a resumed run's own), held by this run alone while
    /// it lives, whatever the folder holds: an error names the run that holds it already, where
    /// two runs writing one folder would leave one's checkpoint beside the other's report. A
    /// claim a dead run left is taken over. Dropping it removes the marker, and the folder when
    /// the run left nothing in it.
    pub fn hold(dir: &Path, flag: &str) -> Result<ClaimedDir> {
        let cannot = || format!("{flag} {}: cannot write there", dir.display());
        // Only the folders it makes go with the claim: an empty one the user made stays.
        let made: Vec<PathBuf> = (dir.ancestors())
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        fs::create_dir_all(dir).with_context(cannot)?;
        let marker = dir.join(CLAIM);
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&marker)
                .with_context(cannot)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let process = match holder.trim() {
                        "" => String::new(),
                        pid => format!(" (process {pid})"),
                    };
                    bail!(
                        "{flag} {}: another loren run{process} is writing there; wait for it to \
                         end, or name another folder",
                        dir.display()
                    );
                }
                // A filesystem without locks holds it unlocked, as `claim_free` does.
                Err(std::fs::TryLockError::Error(_)) => {}
            }
            // A run ending just now removes its marker while it holds it: the marker locked
            // must be the one still at the path, else another run may lock a new one.
            if !still_at(&file, &marker) {
                continue;
            }
            file.set_len(0).with_context(cannot)?;
            writeln!(file, "{}", std::process::id()).with_context(cannot)?;
            return Ok(ClaimedDir {
                path: dir.to_path_buf(),
                marker,
                made,
                _held: file,
            });
        }
    }
}

/// Whether `file` is the file at `path` (where a file's identity cannot be read, taken to be).
fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), fs::metadata(path)) {
        (Ok(held), Ok(at_path)) => same_inode(&held, &at_path) || cfg!(not(unix)),
        _ => false,
    }
}

/// `Some(false)` for a folder that is missing or empty, `Some(true)` for one holding a claim
/// and nothing else, `None` for one that holds more (or is not a folder to claim).
fn only_a_claim(dir: &Path) -> Option<bool> {
    // Missing, or not a folder that can be read: making the folder and its claim says why.
    let Ok(entries) = fs::read_dir(dir) else {
        return Some(false);
    };
    let mut names = entries.map(|e| e.map(|e| e.file_name()));
    match (names.next(), names.next()) {
        (None, _) => Some(false),
        (Some(Ok(name)), None) if name == CLAIM => Some(true),
        _ => None,
    }
}

/// Claim a missing or empty folder; `None` when another run claimed it first.
fn claim_free(dir: &Path) -> std::io::Result<Option<ClaimedDir>> {
    // Another command's probe may remove a parent it made, or a run that wrote nothing its
    // empty folder, between making the folder and the marker in it: then again from the top.
    let mut tries = 0;
    let (marker, mut file) = loop {
        fs::create_dir_all(dir)?;
        let marker = dir.join(CLAIM);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
        {
            Ok(f) => break (marker, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 100 => tries += 1,
            Err(e) => return Err(e),
        }
    };
    // A filesystem without locks (NFS with no lock daemon, some FUSE mounts) still gets the
    // claim, unlocked: its run's folder is then passed over after a kill, as an unwritten claim
    // is, and never taken while the run lives. A run named into this folder that locked the new
    // marker first holds it (ClaimedDir::hold): the folder is taken.
    if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock() {
        return Ok(None);
    }
    // Written once locked: a marker still empty may be one its run has not yet locked, so it
    // is never taken as left behind.
    if let Err(e) = writeln!(file, "{}", std::process::id()) {
        let _ = fs::remove_file(&marker);
        let _ = fs::remove_dir(dir);
        return Err(e);
    }
    Ok(Some(ClaimedDir {
        path: dir.to_path_buf(),
        marker,
        made: vec![dir.to_path_buf()],
        _held: file,
    }))
}

/// Take over a claim its run left behind; `None` when its run still holds it (or it changed
/// meanwhile).
fn claim_left(dir: &Path) -> Option<ClaimedDir> {
    let marker = dir.join(CLAIM);
    let mut file = left_claim(&marker)?;
    // Now this run's.
    file.set_len(0).ok()?;
    file.rewind().ok()?;
    writeln!(file, "{}", std::process::id()).ok()?;
    Some(ClaimedDir {
        path: dir.to_path_buf(),
        marker,
        made: vec![dir.to_path_buf()],
        _held: file,
    })
}

/// The claim `marker`, opened and locked, when a dead run left it; `None` when its run still
/// holds it, or it changed meanwhile. The lock may have come free because its run ended just
/// now and removed the marker, or another run made a new one in its place: only a marker still
/// at its path, written in full, is one a dead run left.
fn left_claim(marker: &Path) -> Option<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(marker)
        .ok()?;
    file.try_lock().ok()?;
    let (held, at_path) = (file.metadata().ok()?, fs::metadata(marker).ok()?);
    (held.len() > 0 && same_inode(&held, &at_path)).then_some(file)
}

#[cfg(unix)]
fn same_inode(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// Where a file's identity cannot be read, a left claim is never taken over.
#[cfg(not(unix))]
fn same_inode(_: &fs::Metadata, _: &fs::Metadata) -> bool {
    false
}

impl Drop for ClaimedDir {
    fn drop(&mut self) {
        // Removed while still locked, so that no other run takes it for one left behind.
        let _ = fs::remove_file(&self.marker);
        // Only when empty: a finished run's files keep it, and its parents.
        for dir in &self.made {
            if fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
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
    fn a_claimed_folder_is_one_runs_until_the_claim_ends() {
        let root = temp("claim");
        let base = root.join("train");
        let first = ClaimedDir::claim(&base, "--out").unwrap();
        assert_eq!(first.path, base);
        // Empty but for the claim: another run started meanwhile goes on to the next.
        let second = ClaimedDir::claim(&base, "--out").unwrap();
        assert_eq!(second.path, root.join("train-2"));
        fs::write(first.path.join("report.json"), b"{}").unwrap();
        drop(first);
        drop(second);
        // The run that wrote keeps its folder, without the claim; the one that wrote nothing
        // leaves none.
        let left: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left, std::slice::from_ref(&base));
        assert!(!base.join(CLAIM).exists());
        assert_eq!(
            ClaimedDir::claim(&base, "--out").unwrap().path,
            root.join("train-2")
        );
    }

    #[test]
    fn a_claim_whose_run_died_is_taken_over_and_a_live_one_is_not() {
        let root = temp("left");
        let base = root.join("train");
        // What a killed run leaves: its written marker, locked by nobody (of a process id longer
        // than this one's, which must not show past it).
        fs::create_dir_all(&base).unwrap();
        fs::write(base.join(CLAIM), b"4242424242424242424242\n").unwrap();
        let taken = ClaimedDir::claim(&base, "--out").unwrap();
        assert_eq!(taken.path, base, "a claim nobody holds was passed over");
        assert_eq!(
            fs::read_to_string(base.join(CLAIM)).unwrap(),
            format!("{}\n", std::process::id()),
            "the claim taken over still names the dead run"
        );
        // That claim is now held: the next run moves on.
        assert_eq!(
            ClaimedDir::claim(&base, "--out").unwrap().path,
            root.join("train-2")
        );
        drop(taken);
        assert!(!base.exists(), "the taken-over claim's empty folder stayed");

        // A marker not yet written may be one its run is about to lock; one beside a dead run's
        // files keeps them.
        let (unwritten, with_files) = (root.join("a"), root.join("b"));
        for d in [&unwritten, &with_files] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(unwritten.join(CLAIM), b"").unwrap();
        fs::write(with_files.join(CLAIM), b"4242\n").unwrap();
        fs::write(with_files.join("report.json"), b"{}").unwrap();
        assert_eq!(
            ClaimedDir::claim(&unwritten, "--out").unwrap().path,
            root.join("a-2")
        );
        assert_eq!(
            ClaimedDir::claim(&with_files, "--out").unwrap().path,
            root.join("b-2")
        );
    }

    /// A folder named with --out (or resumed in) is held by one run: a dead run's claim is
    /// taken over, a live one's (a named run's or a default folder's) refused by its process.
    #[test]
    fn a_named_folder_is_held_by_one_run_at_a_time() {
        let root = temp("named");
        let (dead, live) = (root.join("dead"), root.join("live"));
        fs::create_dir_all(&dead).unwrap();
        // Longer than any process id: the claim taken over is rewritten whole, not over its
        // start (the refusal below would name a process "<pid>\n4242...").
        fs::write(dead.join(CLAIM), b"4242424242424242424242\n").unwrap();
        fs::write(dead.join("report.json"), b"{}").unwrap();
        let taken = ClaimedDir::hold(&dead, "--out").unwrap();
        let pid = format!("{}\n", std::process::id());
        assert_eq!(fs::read_to_string(dead.join(CLAIM)).unwrap(), pid);
        let e = ClaimedDir::hold(&dead, "--out").unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "another loren run (process {}) is writing there",
                pid.trim()
            )),
            "{e}"
        );
        drop(taken);
        assert!(!dead.join(CLAIM).exists(), "the claim stayed");
        assert!(dead.join("report.json").exists(), "the folder's files went");
        let claimed = ClaimedDir::claim(&live, "--out").unwrap();
        assert!(
            ClaimedDir::hold(&live, "--out").is_err(),
            "a default folder's claim was taken"
        );
        drop(claimed);
        // Free again, and left as found: the empty folders it made go with the claim, parents
        // too, and an empty one that was there stays.
        let deep = root.join("new/deeper");
        drop(ClaimedDir::hold(&deep, "--out").unwrap());
        assert!(!root.join("new").exists(), "the folders it made stay");
        fs::create_dir_all(&live).unwrap();
        drop(ClaimedDir::hold(&live, "--out").unwrap());
        assert!(live.is_dir(), "a folder that was there went");
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
