//! Batches made on a background thread while the current step computes.
//!
//! A producer thread calls `make(0)`, `make(1)`, … in order and hands each result (a batch, and
//! in training its images staged for the device) over a bounded
//! channel, staying at most `depth` batches ahead. The consumer receives them in the same
//! order, so training sees exactly the batches it would have made itself: determinism and
//! bit-exact resume do not depend on the thread. When the consumer stops early (an error, a NaN
//! loss) the channel closes and the producer stops at its next hand-over.

use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::Scope;

/// How many batches the producer may have ready ahead of the step that is running.
pub const DEPTH: usize = 2;

/// The results of `make(0..count)`, made on a thread of `scope` and received in order.
pub fn prefetch<'scope, T, F>(
    scope: &'scope Scope<'scope, '_>,
    count: usize,
    depth: usize,
    mut make: F,
) -> Prefetched<'scope, T>
where
    T: Send + 'scope,
    F: FnMut(usize) -> T + Send + 'scope,
{
    // One result has nothing to overlap with: made on the calling thread when it is asked for
    // (a server's prediction of a few images would otherwise pay a thread's start each call).
    if count <= 1 {
        let one =
            (count == 1).then(|| Box::new(move || make(0)) as Box<dyn FnOnce() -> T + 'scope>);
        return Prefetched(Source::Here(one));
    }
    let (tx, rx) = sync_channel(depth.max(1));
    scope.spawn(move || {
        for i in 0..count {
            if tx.send(make(i)).is_err() {
                break;
            }
        }
    });
    Prefetched(Source::Thread(rx))
}

/// The receiving end: an iterator over the results in order.
pub struct Prefetched<'scope, T>(Source<'scope, T>);

enum Source<'scope, T> {
    Thread(Receiver<T>),
    /// The one result, still to be made.
    Here(Option<Box<dyn FnOnce() -> T + 'scope>>),
}

impl<T> Iterator for Prefetched<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match &mut self.0 {
            // An error means the producer is done (or panicked, which the scope re-raises).
            Source::Thread(rx) => rx.recv().ok(),
            Source::Here(one) => one.take().map(|make| make()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Batch;

    /// Far longer than a batch of four numbers takes: a producer that never ran fails, not hangs.
    const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

    fn batch(i: usize) -> Batch {
        Batch {
            images: vec![i as f32; 4],
            labels: vec![i as u32],
            batch: 1,
            channels: 1,
            height: 2,
            width: 2,
        }
    }

    #[test]
    fn data_prefetch_yields_every_batch_in_order() {
        let got: Vec<Batch> = std::thread::scope(|s| prefetch(s, 7, 2, batch).collect());
        assert_eq!(got, (0..7).map(batch).collect::<Vec<_>>());
        let none: Vec<Batch> = std::thread::scope(|s| prefetch(s, 0, 2, batch).collect());
        assert!(none.is_empty());
    }

    #[test]
    fn data_prefetch_makes_a_lone_result_on_the_calling_thread() {
        let caller = std::thread::current().id();
        let made_on: Vec<_> =
            std::thread::scope(|s| prefetch(s, 1, 2, |_| std::thread::current().id()).collect());
        assert_eq!(made_on, [caller]);
        let made_on: Vec<_> =
            std::thread::scope(|s| prefetch(s, 2, 2, |_| std::thread::current().id()).collect());
        assert!(made_on.iter().all(|t| *t != caller));
    }

    #[test]
    fn data_prefetch_stops_when_the_consumer_does() {
        let made = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let mut it = prefetch(s, 1000, 1, |i| {
                made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                batch(i)
            });
            assert_eq!(it.next(), Some(batch(0)));
        });
        // At most the one received, one in the channel and one being handed over.
        assert!(made.into_inner() <= 3);
    }

    #[test]
    fn data_prefetch_runs_ahead_of_the_consumer() {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let mut it = prefetch(s, 3, 2, move |i| {
                started_tx.send(i).unwrap();
                batch(i)
            });
            // Before anything is received, the producer has made the first batches.
            assert_eq!(
                started_rx
                    .recv_timeout(WAIT)
                    .expect("the producer did not run ahead"),
                0
            );
            assert_eq!(
                started_rx
                    .recv_timeout(WAIT)
                    .expect("the producer did not run ahead"),
                1
            );
            assert_eq!(it.by_ref().count(), 3);
        });
    }
}
