//! Progress bars for training and evaluation. They draw on stderr when it is a terminal; in a
//! log they give way to a plain line every half minute, so a long run still shows it is alive.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use loren_nn::train::{EpochInfo, Observer, StepInfo};

/// How the run shows its progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verbosity {
    /// Bars on a terminal, epoch lines.
    Normal,
    /// Nothing but errors.
    Quiet,
}

fn bar(len: u64, template: &str, verbosity: Verbosity) -> ProgressBar {
    if verbosity == Verbosity::Quiet {
        return ProgressBar::hidden();
    }
    // indicatif's own {per_sec} prints four decimals ("3,073.8227/s"): whole images are enough.
    let rate = |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = write!(w, "{:.0}/s", state.per_sec());
    };
    let style = ProgressStyle::with_template(template)
        .expect("the templates are fixed and valid")
        .with_key("rate", rate)
        .progress_chars("=> ");
    ProgressBar::new(len).with_style(style)
}

/// When a run with no bar to draw prints its next progress line.
struct Heartbeat {
    every: Duration,
    last: Instant,
}

impl Heartbeat {
    fn new() -> Heartbeat {
        Heartbeat::every(Duration::from_secs(30))
    }

    fn every(every: Duration) -> Heartbeat {
        Heartbeat {
            every,
            last: Instant::now(),
        }
    }

    /// Whether a line is due: only where `bar` shows nothing on a run that is not quiet.
    fn due(&mut self, bar: &ProgressBar, verbosity: Verbosity) -> bool {
        let due =
            verbosity == Verbosity::Normal && bar.is_hidden() && self.last.elapsed() >= self.every;
        if due {
            self.last = Instant::now();
        }
        due
    }
}

/// Draws one bar over all training steps, with loss, learning rate and throughput.
pub struct TrainBar {
    bar: ProgressBar,
    label: String,
    verbosity: Verbosity,
    heartbeat: Heartbeat,
    /// Exponential moving averages of the loss and of images per second.
    loss: Option<f64>,
    rate: Option<f64>,
    /// The flag that sets this run's learning rate, for the warning about skipped steps.
    lr_flag: Option<&'static str>,
}

impl TrainBar {
    pub fn new(label: &str, verbosity: Verbosity) -> TrainBar {
        TrainBar {
            bar: ProgressBar::hidden(),
            label: label.to_string(),
            verbosity,
            heartbeat: Heartbeat::new(),
            loss: None,
            rate: None,
            lr_flag: None,
        }
    }

    /// Name `flag` (e.g. `--lr`) where the warning about skipped steps suggests a lower rate.
    pub fn lr_flag(mut self, flag: &'static str) -> TrainBar {
        self.lr_flag = Some(flag);
        self
    }

    /// The warning for an epoch some of whose steps changed nothing, for gradients that were not
    /// finite: training goes on, and the run's user should know it is diverging.
    fn skipped_warning(&self, e: &EpochInfo) -> Option<String> {
        let n = e.skipped_steps;
        let lr = match self.lr_flag {
            Some(flag) => format!("a lower {flag}"),
            None => "a lower learning rate".to_string(),
        };
        (n > 0).then(|| {
            format!(
                "{}: warning: epoch {}: {n} step{} left the parameters as they were: {} gradients \
                 were not finite (a diverging run; {lr} may help)",
                self.label,
                e.epoch,
                if n == 1 { "" } else { "s" },
                if n == 1 { "its" } else { "their" },
            )
        })
    }

    /// A line above the bar on a terminal, else on stderr.
    fn line(&self, line: &str) {
        match self.bar.is_hidden() {
            true => crate::note!("{line}"),
            false => self.bar.println(line),
        }
    }
}

fn ema(prev: Option<f64>, x: f64, keep: f64) -> f64 {
    prev.map_or(x, |p| keep * p + (1.0 - keep) * x)
}

impl Observer for TrainBar {
    fn start(&mut self, total_steps: u64, first_step: u64) {
        // The bar takes the width the rest of the line leaves, so the line fits the terminal (80
        // columns leave it 15).
        let template = "{prefix:>11} [{wide_bar}] step {pos}/{len}, {msg}, eta {eta}";
        self.bar = bar(total_steps, template, self.verbosity).with_prefix(self.label.clone());
        self.bar.set_position(first_step);
    }

    fn step(&mut self, s: &StepInfo) {
        let loss = ema(self.loss, s.loss as f64, 0.9);
        let rate = ema(self.rate, s.images as f64 / s.seconds.max(1e-9), 0.9);
        (self.loss, self.rate) = (Some(loss), Some(rate));
        let progress = format!("epoch {}, loss {loss:.4}, {rate:.0} img/s", s.epoch + 1);
        if self.heartbeat.due(&self.bar, self.verbosity) {
            // A log has the room a terminal's bar has not: the learning rate too.
            crate::note!(
                "{}: step {}/{}, {progress}, lr {:.2e}",
                self.label,
                s.step + 1,
                s.total_steps,
                s.lr
            );
        }
        self.bar.set_message(progress);
        self.bar.set_position(s.step + 1);
    }

    fn stop_requested(&self) -> bool {
        crate::interrupt::requested()
    }

    fn validating(&mut self, epoch: usize) {
        let msg = format!("{}, scoring the validation part", self.bar.message());
        self.bar.set_message(msg);
        // In a log, where the step lines stop meanwhile, a long run says what it is doing.
        if self.heartbeat.due(&self.bar, self.verbosity) {
            crate::note!(
                "{}: epoch {epoch} trained, scoring the validation part",
                self.label
            );
        }
    }

    fn epoch(&mut self, e: &EpochInfo) {
        // Even under --quiet: a run that goes on after steps it could not take is one its user
        // would otherwise trust.
        if let Some(warning) = self.skipped_warning(e) {
            self.line(&warning);
        }
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        let mut line = format!(
            "{}: epoch {} mean loss {:.4} ({:.1}s)",
            self.label, e.epoch, e.mean_loss, e.seconds
        );
        if let Some(v) = e.val {
            line += &format!(
                ", validation accuracy {:.2}% NLL {:.4} ECE {:.4} ({:.1}s)",
                100.0 * v.accuracy,
                v.nll,
                v.ece,
                v.seconds
            );
        }
        // A line per epoch: above the bar on a terminal, so the loss's history stays on screen.
        self.line(&line);
    }
}

impl Drop for TrainBar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// A bar over images evaluated.
pub struct EvalBar {
    bar: ProgressBar,
    label: String,
    verbosity: Verbosity,
    heartbeat: Heartbeat,
}

impl EvalBar {
    pub fn new(label: &str, images: usize, verbosity: Verbosity) -> EvalBar {
        let template = "{prefix:>11} [{wide_bar}] {pos}/{len} images, {rate}, eta {eta}";
        EvalBar {
            bar: bar(images as u64, template, verbosity).with_prefix(label.to_string()),
            label: label.to_string(),
            verbosity,
            heartbeat: Heartbeat::new(),
        }
    }

    /// `images` more are scored.
    pub fn inc(&mut self, images: usize) {
        self.bar.inc(images as u64);
        if self.heartbeat.due(&self.bar, self.verbosity) {
            let (done, total) = (self.bar.position(), self.bar.length().unwrap_or(0));
            crate::note!(
                "{}: {done}/{total} images scored ({:.0}/s)",
                self.label,
                self.bar.per_sec()
            );
        }
    }
}

impl Drop for EvalBar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// `work`, which reads image files (a folder dataset), with a counter of the files read beside
/// it: reading a folder of photos takes minutes, which would otherwise pass in silence. In a
/// log, a line every half minute.
pub fn reading_images<T>(label: &str, verbosity: Verbosity, work: impl FnOnce() -> T) -> T {
    use std::sync::atomic::{AtomicBool, Ordering};
    let template = "{prefix:>11} {spinner} images read: {pos}, {rate}, {elapsed}";
    let bar = bar(0, template, verbosity).with_prefix(label.to_string());
    let start = loren_nn::data::folder::images_tried();
    let done = AtomicBool::new(false);
    // Set however `work` ends, a panic included: the scope waits for the counter's thread.
    struct Done<'a>(&'a AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut heartbeat = Heartbeat::new();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                // Drawn from the first image on: data that is no folder of images (the digits,
                // CIFAR) reads none, and shows nothing.
                let read = loren_nn::data::folder::images_tried() - start;
                if read > 0 {
                    bar.set_position(read as u64);
                    if heartbeat.due(&bar, verbosity) {
                        crate::note!("{label}: {read} images read ({:.0}/s)", bar.per_sec());
                    }
                }
            }
        });
        let _done = Done(&done);
        work()
    });
    bar.finish_and_clear();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reading's result comes back, and a panic in it ends the counter's thread rather than
    /// leaving the scope waiting on it for ever.
    #[test]
    fn reading_images_gives_back_its_work_and_ends_with_it() {
        assert_eq!(reading_images("reading", Verbosity::Quiet, || 7), 7);
        let panicked = std::panic::catch_unwind(|| {
            reading_images("reading", Verbosity::Quiet, || {
                panic!("a bug in the reading")
            })
        });
        assert!(panicked.is_err());
    }

    #[test]
    fn a_log_gets_progress_lines_a_terminal_and_a_quiet_run_do_not() {
        let hidden = ProgressBar::hidden();
        let mut now = Heartbeat::every(Duration::ZERO);
        assert!(now.due(&hidden, Verbosity::Normal));
        assert!(!now.due(&hidden, Verbosity::Quiet));
        let mut later = Heartbeat::every(Duration::from_secs(3600));
        assert!(!later.due(&hidden, Verbosity::Normal));
    }

    #[test]
    fn an_epoch_with_skipped_steps_warns_and_one_without_does_not() {
        let epoch = |skipped_steps| EpochInfo {
            epoch: 3,
            mean_loss: 1.0,
            seconds: 1.0,
            val: None,
            skipped_steps,
        };
        let bar = TrainBar::new("train", Verbosity::Quiet).lr_flag("--lr");
        assert_eq!(bar.skipped_warning(&epoch(0)), None);
        assert_eq!(
            bar.skipped_warning(&epoch(2)).as_deref(),
            Some(
                "train: warning: epoch 3: 2 steps left the parameters as they were: their \
                 gradients were not finite (a diverging run; a lower --lr may help)"
            )
        );
        let pretrain = TrainBar::new("pretrain", Verbosity::Quiet);
        assert_eq!(
            pretrain.skipped_warning(&epoch(1)).as_deref(),
            Some(
                "pretrain: warning: epoch 3: 1 step left the parameters as they were: its \
                 gradients were not finite (a diverging run; a lower learning rate may help)"
            )
        );
    }
}
