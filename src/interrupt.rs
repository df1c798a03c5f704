//! Ctrl-C while training, scoring or measuring: the first asks the run to stop after its current
//! step, batch or row, with a line saying which checkpoint resumes (or scores) it, or writing the
//! rows measured; a second does what Ctrl-C did before (by default, ends the process at once).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
/// How many [`Guard`]s live.
static DEPTH: AtomicUsize = AtomicUsize::new(0);

/// Whether Ctrl-C was pressed since the [`Guard`] was installed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::Relaxed)
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
#[error("stopped by Ctrl-C: the rows measured before it are written; the rest say `stopped`")]
pub struct Stopped;

/// While it lives, Ctrl-C asks training or scoring to stop (see [`requested`]); once pressed, or
/// once the guard is dropped, Ctrl-C does again what it did before the guard: the default (ending
/// the process) or the handler of a program that embeds loren, which it gets back untouched.
/// Guards nest: the outermost one installs and restores.
pub struct Guard(());

impl Guard {
    pub fn install() -> Guard {
        if DEPTH.fetch_add(1, Ordering::SeqCst) == 0 {
            REQUESTED.store(false, Ordering::Relaxed);
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SIGINT: i32 = 2;
    const SIG_ERR: usize = usize::MAX;

    /// What Ctrl-C did before the guard: SIG_DFL (0), SIG_IGN, or a host program's handler.
    static PREVIOUS: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }

    pub fn install() {
        // SAFETY: signal(2) with a handler that only does async-signal-safe work.
        let previous = unsafe { signal(SIGINT, handler as *const () as usize) };
        if previous != SIG_ERR {
            PREVIOUS.store(previous, Ordering::SeqCst);
        }
    }

    pub fn restore() {
        // SAFETY: signal(2) with the disposition signal(2) itself returned when the guard
        // installed.
        unsafe {
            signal(SIGINT, PREVIOUS.load(Ordering::SeqCst));
        }
    }

    /// Only async-signal-safe work: atomics, and signal(2) to hand the next Ctrl-C back.
    extern "C" fn handler(_: i32) {
        super::REQUESTED.store(true, Ordering::Relaxed);
        restore();
    }
}

#[cfg(not(unix))]
mod sys {
    pub fn install() {}
    pub fn restore() {}
}
