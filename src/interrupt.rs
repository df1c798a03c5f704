//! Ctrl-C while training or scoring: the first asks the run to stop after its current step or
//! batch, with a line saying which checkpoint resumes (or scores) it; a second ends the process at
//! once, as usual.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

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

/// While it lives, Ctrl-C asks training or scoring to stop (see [`requested`]); dropped, Ctrl-C
/// ends the process again.
pub struct Guard(());

impl Guard {
    pub fn install() -> Guard {
        REQUESTED.store(false, Ordering::Relaxed);
        sys::on_sigint(Some(sys::handler));
        Guard(())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        sys::on_sigint(None);
    }
}

#[cfg(unix)]
mod sys {
    const SIGINT: i32 = 2;
    const SIG_DFL: usize = 0;

    unsafe extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }

    /// Only async-signal-safe work: an atomic store, and signal(2) to make the next Ctrl-C the
    /// default one.
    pub extern "C" fn handler(_: i32) {
        super::REQUESTED.store(true, std::sync::atomic::Ordering::Relaxed);
        on_sigint(None);
    }

    pub fn on_sigint(handler: Option<extern "C" fn(i32)>) {
        let disposition = handler.map_or(SIG_DFL, |h| h as usize);
        // SAFETY: signal(2) with the default disposition or a handler that only does
        // async-signal-safe work.
        unsafe {
            signal(SIGINT, disposition);
        }
    }
}

#[cfg(not(unix))]
mod sys {
    pub extern "C" fn handler(_: i32) {}
    pub fn on_sigint(_: Option<extern "C" fn(i32)>) {}
}
