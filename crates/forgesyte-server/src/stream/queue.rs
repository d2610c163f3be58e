//! The frames of one stream that wait for the plugin, under the stream's
//! [`Policy`]: `latest` keeps at most one (a newer frame replaces it and the
//! replaced one counts as dropped), `block` keeps up to its queue length and
//! makes the producer wait beyond it. Either way the queue holds a bounded
//! number of frames.
//!
//! A leaf: one producer (the socket reader) and one consumer (the task that
//! calls the plugin); it knows nothing of WebSockets, plugins or HTTP.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

/// The default queue length of the `block` policy.
pub(crate) const DEFAULT_BLOCK_QUEUE: usize = 4;

/// The longest queue the `block` policy accepts.
pub(crate) const MAX_BLOCK_QUEUE: usize = 64;

/// What a stream does with frames that arrive while the plugin is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// One frame waits; a newer one replaces it (the older is dropped).
    Latest,
    /// Up to `queue` frames wait; beyond that the producer waits (the
    /// socket is not read: TCP backpressure). Nothing is dropped.
    Block {
        /// How many frames may wait (1 to [`MAX_BLOCK_QUEUE`]).
        queue: usize,
    },
}

impl Policy {
    /// How many frames may wait.
    fn capacity(self) -> usize {
        match self {
            Policy::Latest => 1,
            Policy::Block { queue } => queue.max(1),
        }
    }

    /// The policy of a query string's `policy` and `queue` values
    /// (`latest` by default, `queue` only with `block`), or why not.
    pub(crate) fn parse(policy: Option<&str>, queue: Option<&str>) -> Result<Policy, String> {
        match (policy.unwrap_or("latest"), queue) {
            ("latest", None) => Ok(Policy::Latest),
            ("latest", Some(_)) => Err("`queue` applies to `policy=block` only".to_owned()),
            ("block", None) => Ok(Policy::Block {
                queue: DEFAULT_BLOCK_QUEUE,
            }),
            // Digits only: `parse` takes a leading `+`.
            ("block", Some(text)) => match text.parse::<usize>() {
                Ok(queue)
                    if text.bytes().all(|b| b.is_ascii_digit())
                        && (1..=MAX_BLOCK_QUEUE).contains(&queue) =>
                {
                    Ok(Policy::Block { queue })
                }
                _ => Err(format!(
                    "`queue` must be an integer from 1 to {MAX_BLOCK_QUEUE}, not {:?}",
                    crate::error::Shown(text).to_string()
                )),
            },
            (other, _) => Err(format!(
                "`policy` must be `latest` or `block`, not {:?}",
                crate::error::Shown(other).to_string()
            )),
        }
    }
}

/// Frames numbered by the producer, waiting for the consumer.
#[derive(Debug)]
pub(crate) struct FrameQueue<T> {
    policy: Policy,
    state: Mutex<State<T>>,
    /// A frame arrived, or the queue closed (the consumer waits on it).
    ready: Notify,
    /// A frame left, or the queue closed (a blocked producer waits on it).
    space: Notify,
    /// Frames replaced before the consumer took them (`latest`).
    dropped: AtomicU64,
}

#[derive(Debug)]
struct State<T> {
    frames: VecDeque<(u64, T)>,
    closed: bool,
    /// Closed by [`FrameQueue::finish`]: the frame in its call is still
    /// answered.
    finishing: bool,
}

impl<T> FrameQueue<T> {
    /// An empty, open queue.
    pub(crate) fn new(policy: Policy) -> Self {
        FrameQueue {
            policy,
            state: Mutex::new(State {
                frames: VecDeque::with_capacity(policy.capacity()),
                closed: false,
                finishing: false,
            }),
            ready: Notify::new(),
            space: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds frame `seq`. Under `latest` it never waits (a waiting frame is
    /// replaced and dropped); under `block` it waits while the queue is
    /// full. `false` when the queue is closed (the frame is discarded).
    pub(crate) async fn push(&self, seq: u64, frame: T) -> bool {
        let mut frame = Some(frame);
        loop {
            {
                let mut state = self.state();
                if state.closed {
                    return false;
                }
                let full = state.frames.len() >= self.policy.capacity();
                if !full || self.policy == Policy::Latest {
                    if full {
                        state.frames.pop_front();
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(frame) = frame.take() {
                        state.frames.push_back((seq, frame));
                    }
                    drop(state);
                    self.ready.notify_one();
                    return true;
                }
            }
            // One producer: a permit stored by a `pop` between the check
            // and this wait wakes it at once.
            self.space.notified().await;
        }
    }

    /// Under `latest`, drops the waiting frame now (counted), as the next
    /// [`push`](Self::push) would: called before the newer frame takes its
    /// room in the body budget, so that the room of the frame it replaces
    /// is given back first. Nothing under `block`.
    pub(crate) fn drop_waiting_for_newer(&self) {
        if self.policy != Policy::Latest {
            return;
        }
        let dropped = {
            let mut state = self.state();
            if state.frames.len() < self.policy.capacity() {
                return;
            }
            state.frames.pop_front()
        };
        if dropped.is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The oldest waiting frame; waits for one. `None` once the queue is
    /// closed.
    pub(crate) async fn pop(&self) -> Option<(u64, T)> {
        loop {
            {
                let mut state = self.state();
                if state.closed {
                    return None;
                }
                if let Some(frame) = state.frames.pop_front() {
                    drop(state);
                    self.space.notify_one();
                    return Some(frame);
                }
            }
            self.ready.notified().await;
        }
    }

    /// Closes the queue: waiting frames are discarded, and both sides stop
    /// waiting.
    pub(crate) fn close(&self) {
        self.close_finishing(false);
    }

    /// [`close`](Self::close), but the frame already taken (in its call)
    /// is still answered: [`is_closed`](Self::is_closed) stays `false`.
    pub(crate) fn finish(&self) {
        self.close_finishing(true);
    }

    fn close_finishing(&self, finishing: bool) {
        {
            let mut state = self.state();
            state.closed = true;
            state.finishing = finishing;
            state.frames.clear();
        }
        self.ready.notify_one();
        self.space.notify_one();
    }

    /// Whether [`FrameQueue::close`] was called (its answers are
    /// discarded).
    pub(crate) fn is_closed(&self) -> bool {
        let state = self.state();
        state.closed && !state.finishing
    }

    /// Frames dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Frames waiting now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state().frames.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn policies_parse_from_the_query_values() {
        assert_eq!(Policy::parse(None, None), Ok(Policy::Latest));
        assert_eq!(Policy::parse(Some("latest"), None), Ok(Policy::Latest));
        assert_eq!(
            Policy::parse(Some("block"), None),
            Ok(Policy::Block {
                queue: DEFAULT_BLOCK_QUEUE
            })
        );
        assert_eq!(
            Policy::parse(Some("block"), Some("64")),
            Ok(Policy::Block { queue: 64 })
        );
        for (policy, queue) in [
            (Some("block"), Some("0")),
            (Some("block"), Some("65")),
            (Some("block"), Some("-1")),
            (Some("block"), Some("+4")),
            (Some("block"), Some(" 4")),
            (Some("block"), Some("")),
            (Some("latest"), Some("2")),
            (None, Some("2")),
            (Some("newest"), None),
            (Some(""), None),
        ] {
            let refused = Policy::parse(policy, queue);
            assert!(refused.is_err(), "{policy:?} {queue:?}: {refused:?}");
        }
    }

    #[tokio::test]
    async fn latest_keeps_the_newest_frame_and_counts_the_rest() {
        let queue = FrameQueue::new(Policy::Latest);
        for seq in 0..10 {
            assert!(queue.push(seq, seq * 10).await);
            assert_eq!(queue.len(), 1);
        }
        assert_eq!(queue.dropped(), 9);
        assert_eq!(queue.pop().await, Some((9, 90)));
        assert!(queue.push(10, 100).await);
        assert_eq!(queue.pop().await, Some((10, 100)));
        assert_eq!(queue.dropped(), 9);
    }

    #[tokio::test]
    async fn block_waits_for_space_and_drops_nothing() {
        let queue = Arc::new(FrameQueue::new(Policy::Block { queue: 2 }));
        assert!(queue.push(0, ()).await);
        assert!(queue.push(1, ()).await);
        // Full: the third push waits until the consumer takes one.
        let producer = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.push(2, ()).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!producer.is_finished());
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.pop().await, Some((0, ())));
        assert!(producer.await.unwrap());
        assert_eq!(queue.pop().await, Some((1, ())));
        assert_eq!(queue.pop().await, Some((2, ())));
        assert_eq!(queue.dropped(), 0);
    }

    #[tokio::test]
    async fn closing_discards_frames_and_ends_both_waits() {
        let queue = Arc::new(FrameQueue::new(Policy::Block { queue: 1 }));
        assert!(queue.push(0, ()).await);
        let producer = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.push(1, ()).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        queue.close();
        assert!(!producer.await.unwrap(), "a push into a closed queue fails");
        assert!(queue.is_closed());
        assert_eq!(queue.pop().await, None);
        // Finished: closed the same, but the frame in its call is answered.
        let finished = FrameQueue::new(Policy::Block { queue: 2 });
        assert!(finished.push(0, ()).await);
        finished.finish();
        assert!(!finished.is_closed(), "answers still go");
        assert!(!finished.push(1, ()).await);
        assert_eq!(finished.pop().await, None, "what waited is discarded");
        // A consumer waiting on an empty queue is woken by the close too.
        let empty = Arc::new(FrameQueue::<()>::new(Policy::Latest));
        let consumer = {
            let empty = Arc::clone(&empty);
            tokio::spawn(async move { empty.pop().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        empty.close();
        assert_eq!(consumer.await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_consumer_sees_every_frame_of_a_blocked_producer_in_order() {
        let queue = Arc::new(FrameQueue::new(Policy::Block { queue: 3 }));
        let producer = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                for seq in 0..1000 {
                    assert!(queue.push(seq, seq).await);
                }
                queue.close_when_empty_for_test().await;
            })
        };
        let mut seen = Vec::new();
        while let Some((seq, value)) = queue.pop().await {
            assert_eq!(seq, value);
            seen.push(seq);
        }
        producer.await.unwrap();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    }

    impl<T> FrameQueue<T> {
        /// Waits until the consumer took every frame, then closes.
        async fn close_when_empty_for_test(&self) {
            while self.len() > 0 {
                tokio::task::yield_now().await;
            }
            self.close();
        }
    }
}
