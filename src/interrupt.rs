//! Ctrl-C while training, scoring or measuring: the first asks the run to stop after its current
//! step, batch or row, with a line saying which checkpoint resumes (or scores) it, or writing the
//! rows measured; a second does what Ctrl-C did before (by default, ends the process at once).
//! SIGTERM, which a batch scheduler or container runtime sends before it kills, does the same.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

/// The signal that asked the run to stop (SIGINT or SIGTERM), 0 while none has.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// How many [`Guard`]s live.
static DEPTH: AtomicUsize = AtomicUsize::new(0);

/// Whether Ctrl-C was pressed (or SIGTERM came) since the [`Guard`] was installed.
pub fn requested() -> bool {
    SIGNAL.load(Ordering::Relaxed) != 0
}

/// The exit status of a run the signal stopped: 128 + its number, as a shell reports a command
/// that signal ended (130 for Ctrl-C, 143 for SIGTERM).
pub fn exit_status() -> u8 {
    match SIGNAL.load(Ordering::Relaxed) {
        0 => 130,
        signal => 128u8.saturating_add(signal as u8),
    }
}

/// For scoring's progress callbacks: an error once Ctrl-C was pressed, which ends the scoring after
/// its current batch, saying what is `kept`.
pub fn scoring_stop(kept: &str) -> loren_nn::Result<()> {
    match requested() {
        true => Err(loren_nn::NnError::EvalInterrupted {
            kept: kept.to_string(),
        }),
        false => Ok(()),
    }
}

/// A measuring command (bench, memprofile) that Ctrl-C stopped between rows, after writing and
/// printing the rows it had: what the rest of its rows say.
#[derive(Debug, thiserror::Error)]
#[error(
    "stopped (Ctrl-C or SIGTERM): the rows measured before it are written; the rest say `stopped`"
)]
pub struct Stopped;

/// While it lives, Ctrl-C or SIGTERM asks training or scoring to stop (see [`requested`]); once
/// one came, or once the guard is dropped, that signal does again what it did before the guard:
/// the default (ending the process) or the handler of a program that embeds loren, which it gets
/// back untouched (its flags and mask too). The request is the process's: every run under a
/// guard stops.
/// Guards nest: the outermost one installs and restores.
pub struct Guard(());

impl Guard {
    pub fn install() -> Guard {
        if DEPTH.fetch_add(1, Ordering::SeqCst) == 0 {
            SIGNAL.store(0, Ordering::Relaxed);
            sys::install();
        }
        Guard(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if DEPTH.fetch_sub(1, Ordering::SeqCst) == 1 {
            sys::restore();
        }
    }
}

#[cfg(unix)]
mod sys {
    use std::cell::UnsafeCell;
    use std::mem::MaybeUninit;
    use std::sync::atomic::Ordering;

    /// The signals a run stops on: Ctrl-C, and what a batch scheduler or container runtime
    /// sends before it kills (SLURM, Docker, Kubernetes).
    const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

    /// What each of [`SIGNALS`] did before the guard, whole (handler, flags and mask), so that
    /// a host's `SA_SIGINFO` handler comes back as it was. Written only while none of ours is
    /// installed, read by `restore` and the handler after.
    struct Previous(UnsafeCell<[MaybeUninit<libc::sigaction>; 2]>);
    // SAFETY: see the field's access rule above; the DEPTH count orders install before use.
    unsafe impl Sync for Previous {}
    static PREVIOUS: Previous = Previous(UnsafeCell::new([MaybeUninit::uninit(); 2]));
    static SAVED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    pub fn install() {
        let previous = PREVIOUS.0.get();
        for (i, &signal) in SIGNALS.iter().enumerate() {
            // SAFETY: a zeroed sigaction is a valid value to fill in; the handler does only
            // async-signal-safe work; `previous` is not read until SAVED is set below.
            unsafe {
                let mut ours: libc::sigaction = std::mem::zeroed();
                ours.sa_sigaction = handler as *const () as libc::sighandler_t;
                libc::sigemptyset(&mut ours.sa_mask);
                libc::sigaction(signal, &ours, (*previous)[i].as_mut_ptr());
            }
            // Each entry is written before its signal can reach the handler that reads it.
            SAVED.store(true, Ordering::SeqCst);
        }
    }

    pub fn restore() {
        for &signal in &SIGNALS {
            restore_one(signal);
        }
    }

    /// `signal`'s disposition from before the guard, whole. sigaction(2) is async-signal-safe.
    fn restore_one(signal: libc::c_int) {
        if !SAVED.load(Ordering::SeqCst) {
            return;
        }
        let i = SIGNALS.iter().position(|&s| s == signal).unwrap_or(0);
        // SAFETY: SAVED says install filled this entry.
        unsafe {
            let previous = (*PREVIOUS.0.get())[i].as_ptr();
            libc::sigaction(signal, previous, std::ptr::null_mut());
        }
    }

    /// Only async-signal-safe work: an atomic, and sigaction(2) to hand the next such signal
    /// back.
    extern "C" fn handler(signal: libc::c_int) {
        let _ = super::SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
        restore_one(signal);
    }
}

#[cfg(not(unix))]
mod sys {
    pub fn install() {}
    pub fn restore() {}
}
