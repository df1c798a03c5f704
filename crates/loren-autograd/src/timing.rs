//! Where a training step's time goes, op by op.
//!
//! A [`StepTimer`] given to a [`Tape`](crate::tape::Tape) ([`Tape::timed`](crate::tape::Tape::timed))
//! marks the device's timeline after each op's forward and after each op's backward; the caller
//! marks the rest of the step (the upload, the loss read-back, the optimizer). The time from one
//! mark to the next is the work between them. On a GPU a mark is an event on the stream, so the
//! times are the device's own, and time the device spent idle waiting for the host (launch
//! overhead, a read-back) lands on whatever follows the gap, which is how a launch-bound step
//! shows. A mark costs the host an event record, so time the step itself without a timer.

use loren_tensor::{Device, Error, Mark, Result};

/// The part of a step a span belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Forward,
    Backward,
    /// The optimizer step and what goes with it.
    Update,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Update => "update",
        }
    }
}

/// The work between two marks: `what` in `phase`, `seconds` of device time.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub phase: Phase,
    pub what: &'static str,
    pub seconds: f64,
}

/// Marks on one device's timeline, from its creation on.
pub struct StepTimer {
    device: Device,
    start: Mark,
    marks: Vec<(Phase, &'static str, Mark)>,
    /// The first mark that failed: reported by [`StepTimer::finish`], so an op that marks need
    /// not handle it.
    error: Option<Error>,
}

impl StepTimer {
    /// A timer whose first span starts now.
    pub fn new(device: &Device) -> Result<StepTimer> {
        Ok(StepTimer {
            device: device.clone(),
            start: device.mark()?,
            marks: Vec::new(),
            error: None,
        })
    }

    /// The work since the previous mark was `what`, in `phase`.
    pub fn mark(&mut self, phase: Phase, what: &'static str) {
        match self.device.mark() {
            Ok(m) => self.marks.push((phase, what, m)),
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
    }

    /// Every span in order, once the device has passed the last mark.
    pub fn finish(self) -> Result<Vec<Span>> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let mut spans = Vec::with_capacity(self.marks.len());
        let mut prev = &self.start;
        for (phase, what, m) in &self.marks {
            spans.push(Span {
                phase: *phase,
                what,
                seconds: self.device.seconds_between(prev, m)?,
            });
            prev = m;
        }
        Ok(spans)
    }
}

/// Spans with the same phase and name, added up.
#[derive(Clone, Debug, PartialEq)]
pub struct Total {
    pub phase: Phase,
    pub what: &'static str,
    /// How many spans were added.
    pub count: usize,
    pub seconds: f64,
}

/// The spans added up per (phase, name), largest first (ties in first-seen order).
pub fn totals(spans: &[Span]) -> Vec<Total> {
    let mut out: Vec<Total> = Vec::new();
    for s in spans {
        match out
            .iter_mut()
            .find(|t| t.phase == s.phase && t.what == s.what)
        {
            Some(t) => {
                t.count += 1;
                t.seconds += s.seconds;
            }
            None => out.push(Total {
                phase: s.phase,
                what: s.what,
                count: 1,
                seconds: s.seconds,
            }),
        }
    }
    out.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_per_phase_and_name() {
        let span = |phase, what, seconds| Span {
            phase,
            what,
            seconds,
        };
        let spans = [
            span(Phase::Forward, "linear", 1.0),
            span(Phase::Forward, "gelu", 0.5),
            span(Phase::Backward, "linear", 2.0),
            span(Phase::Forward, "linear", 1.0),
        ];
        let t = totals(&spans);
        assert_eq!(t.len(), 3);
        assert_eq!(
            (t[0].phase, t[0].what, t[0].count),
            (Phase::Forward, "linear", 2)
        );
        assert_eq!(t[0].seconds, 2.0);
        assert_eq!((t[1].phase, t[1].what), (Phase::Backward, "linear"));
        assert_eq!((t[2].what, t[2].count, t[2].seconds), ("gelu", 1, 0.5));
    }

    #[test]
    fn cpu_spans_follow_the_marks() {
        let dev = Device::cpu();
        let mut timer = StepTimer::new(&dev).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        timer.mark(Phase::Forward, "sleep");
        timer.mark(Phase::Update, "nothing");
        let spans = timer.finish().unwrap();
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].what, "sleep");
        assert!(spans[0].seconds >= 0.02, "{spans:?}");
        assert!(spans[1].seconds < spans[0].seconds, "{spans:?}");
    }
}
