//! Ctrl-C while training, scoring or measuring: the first asks the run to stop after its current
//! step, batch or row, with a line saying which checkpoint resumes (or scores) it, or writing the
//! rows measured; a second does what Ctrl-C did before (by default, ends the process at once).
//! SIGTERM, which a batch scheduler or container runtime sends before it kills, does the same.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, PoisonError};

/// The signal that asked the run to stop (SIGINT or SIGTERM), 0 while none has.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// How many [`Guard`]s live.
static DEPTH: Mutex<usize> = Mutex::new(0);

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
        // Under the lock with the count: one thread's restore must not interleave with another's
        // install, which would save loren's handler as the one to give back.
        let mut depth = DEPTH.lock().unwrap_or_else(PoisonError::into_inner);
        if *depth == 0 {
            SIGNAL.store(0, Ordering::Relaxed);
            sys::install();
        }
        *depth += 1;
        Guard(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut depth = DEPTH.lock().unwrap_or_else(PoisonError::into_inner);
        *depth -= 1;
        if *depth == 0 {
            sys::restore();
        }
    }
}

#[cfg(unix)]
mod sys {
    use std::cell::UnsafeCell;
    use std::mem::MaybeUninit;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The signals a run stops on: Ctrl-C, and what a batch scheduler or container runtime
    /// sends before it kills (SLURM, Docker, Kubernetes).
    const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

    /// What each of [`SIGNALS`] did before the guard, whole (handler, flags and mask), so that
    /// a host's `SA_SIGINFO` handler comes back as it was.
    struct Previous(UnsafeCell<[MaybeUninit<libc::sigaction>; 2]>);
    // SAFETY: entry i is written only by `install`, under the guards' lock, while SAVED[i] is
    // false and loren's handler is not installed for that signal; it is read only by whoever
    // swaps SAVED[i] from true to false, which the write's SeqCst store happened before.
    unsafe impl Sync for Previous {}
    static PREVIOUS: Previous = Previous(UnsafeCell::new([MaybeUninit::uninit(); 2]));
    /// Whether PREVIOUS[i] holds a disposition to give back.
    static SAVED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

    pub fn install() {
        let previous = PREVIOUS.0.get();
        for (i, &signal) in SIGNALS.iter().enumerate() {
            // SAFETY: zeroed sigactions are valid values to fill in; the old disposition is read
            // and saved before loren's goes in, so the handler never finds an entry unwritten;
            // the handler does only async-signal-safe work.
            unsafe {
                libc::sigaction(signal, std::ptr::null(), (*previous)[i].as_mut_ptr());
                SAVED[i].store(true, Ordering::SeqCst);
                let mut ours: libc::sigaction = std::mem::zeroed();
                ours.sa_sigaction = handler as *const () as libc::sighandler_t;
                // As signal(2) gave: a call the signal interrupts goes on rather than fail EINTR.
                ours.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut ours.sa_mask);
                libc::sigaction(signal, &ours, std::ptr::null_mut());
            }
        }
    }

    pub fn restore() {
        for i in 0..SIGNALS.len() {
            restore_one(i);
        }
    }

    /// SIGNALS[i]'s disposition from before the guard, whole, once: the first of the handler and
    /// `restore` to get here gives it back. sigaction(2) is async-signal-safe.
    fn restore_one(i: usize) {
        if SAVED[i].swap(false, Ordering::SeqCst) {
            // SAFETY: SAVED[i] was true, so install wrote the entry (see Previous).
            unsafe {
                let previous = (*PREVIOUS.0.get())[i].as_ptr();
                libc::sigaction(SIGNALS[i], previous, std::ptr::null_mut());
            }
        }
    }

    /// Only async-signal-safe work: atomics, and sigaction(2) to hand the next such signal
    /// back.
    extern "C" fn handler(signal: libc::c_int) {
        let _ = super::SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
        if let Some(i) = SIGNALS.iter().position(|&s| s == signal) {
            restore_one(i);
        }
    }
}

#[cfg(not(unix))]
mod sys {
    pub fn install() {}
    pub fn restore() {}
}
