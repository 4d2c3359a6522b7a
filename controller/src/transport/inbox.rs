//! What the MQTT event loop hands to the engine: a queue that never makes the event loop wait.
//!
//! The event loop is also what sends the engine's publishes. If it waited for the engine to take
//! an incoming report while the engine waited for it to take a publish (a mesh-wide change of
//! 10,000 configs during an enrolment storm), both would stop for good, and the broker would
//! drop the controller for missing its keep-alive. So the queue is unbounded in count, and
//! bounded in bytes instead: past [`LIMIT`] bytes of messages not yet handled, further messages
//! are dropped and counted (a flood of enrolments must not exhaust memory). Agents repeat
//! enrolments and status reports, so a dropped one comes again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::mpsc;

/// Bytes of received messages not yet handled above which more are dropped.
pub const LIMIT: usize = 64 << 20;

/// The event loop's end.
#[derive(Debug)]
pub struct Sender<T> {
    tx: mpsc::UnboundedSender<(T, usize)>,
    bytes: Arc<AtomicUsize>,
    limit: usize,
    dropped: AtomicU64,
}

/// The engine's end.
#[derive(Debug)]
pub struct Receiver<T> {
    rx: mpsc::UnboundedReceiver<(T, usize)>,
    bytes: Arc<AtomicUsize>,
}

/// A queue holding at most `limit` bytes of messages (see the module docs).
pub fn channel<T>(limit: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let bytes = Arc::new(AtomicUsize::new(0));
    (
        Sender {
            tx,
            bytes: bytes.clone(),
            limit,
            dropped: AtomicU64::new(0),
        },
        Receiver { rx, bytes },
    )
}

/// The engine is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl<T> Sender<T> {
    /// Queues an event that must not be lost (a connection change): never dropped.
    pub fn control(&self, event: T) -> Result<(), Closed> {
        self.tx.send((event, 0)).map_err(|_| Closed)
    }

    /// Queues a message of `size` bytes, or drops it when the engine is [`LIMIT`] bytes behind
    /// (logged with the count so far). Never waits.
    pub fn message(&self, event: T, size: usize, topic: &str) -> Result<(), Closed> {
        if self.tx.is_closed() {
            return Err(Closed);
        }
        let queued = self.bytes.load(Ordering::Relaxed);
        if queued.saturating_add(size) > self.limit {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    "the controller is {queued} bytes of messages behind: dropped a message on {topic} ({n} dropped so far; agents send them again)"
                );
            }
            return Ok(());
        }
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.tx.send((event, size)).map_err(|_| Closed)
    }

    /// Messages dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl<T> Receiver<T> {
    fn took(&self, (event, size): (T, usize)) -> T {
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        event
    }

    /// The next event; `None` once the event loop is gone.
    pub async fn recv(&mut self) -> Option<T> {
        let item = self.rx.recv().await?;
        Some(self.took(item))
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        let item = self.rx.try_recv().ok()?;
        Some(self.took(item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_waits_and_drops_messages_only_past_the_byte_limit() {
        let (tx, mut rx) = channel::<u32>(100);
        // Far more events than any bounded queue the engine could have: none waits.
        for i in 0..10_000 {
            assert_eq!(tx.control(i), Ok(()));
        }
        for i in 0..10_000 {
            assert_eq!(rx.try_recv(), Some(i));
        }
        assert_eq!(tx.message(1, 60, "a"), Ok(()));
        assert_eq!(tx.message(2, 40, "b"), Ok(()));
        // 100 bytes behind: the next message is dropped, a control event is not.
        assert_eq!(tx.message(3, 1, "c"), Ok(()));
        assert_eq!(tx.dropped(), 1);
        assert_eq!(tx.control(4), Ok(()));
        assert_eq!(rx.try_recv(), Some(1));
        // Taking one frees its bytes.
        assert_eq!(tx.message(5, 60, "d"), Ok(()));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(4));
        assert_eq!(rx.try_recv(), Some(5));
        assert_eq!(rx.try_recv(), None);
        assert_eq!(tx.dropped(), 1);
        drop(rx);
        assert_eq!(tx.message(6, 1, "e"), Err(Closed));
        assert_eq!(tx.control(7), Err(Closed));
    }
}
