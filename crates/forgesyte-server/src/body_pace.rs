//! The pace a request body must keep: a body that gives nothing for longer
//! than the body read timeout (`--body-read-timeout`) ends with
//! [`BodyIdle`], and one that arrives slower on average than the minimum
//! rate (`--body-min-rate`) ends with [`BodyTooSlow`]; the run route
//! answers both 408.
//!
//! The minimum rate is what bounds how long a body holds the room of
//! `--body-memory`: without it, a client that sent most of a large body
//! and then one byte every timeout minus a second held that room for as
//! long as it liked, and eight such clients kept every tool call out. A
//! body is given the body read timeout from the server's first wait for
//! it, plus one second for every `min_rate` bytes it has sent (Apache's
//! `mod_reqtimeout` rule): a client sending at least the minimum rate
//! never meets it, and one holding room must keep sending `min_rate` bytes
//! a second to go on holding it.
//!
//! tower-http's `RequestBodyTimeoutLayer` has the idle timeout alone, and
//! arms its timer before it first looks at the body: a timer registered
//! and cleared for every body, even one that came whole with the
//! request's head (most tool calls), and a registration earlier than every
//! other timer wakes the runtime's timer driver. This body arms its timer
//! only once the body has nothing to give, and drops it with the next
//! frame. It knows nothing of routes or of what reads the body.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf as _;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

/// A body read error: no byte came for the body read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body stopped arriving")]
pub(crate) struct BodyIdle;

/// A body read error: the body came slower than the minimum rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body arrived slower than {min_rate} bytes a second")]
pub(crate) struct BodyTooSlow {
    /// The minimum rate, in bytes a second.
    pub(crate) min_rate: u64,
}

/// The pace every request body must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BodyPace {
    /// Longest wait for the next piece of a body; also the grace before
    /// the minimum rate counts.
    pub(crate) timeout: Duration,
    /// Bytes a second a body must average after the grace; 0: no minimum.
    pub(crate) min_rate: u64,
}

impl BodyPace {
    /// When a body first waited for at `started` must be complete, having
    /// sent `received` bytes so far; `None` without a minimum rate (or
    /// past what a clock can count).
    fn deadline(&self, started: Instant, received: u64) -> Option<Instant> {
        if self.min_rate == 0 {
            return None;
        }
        let earned = Duration::try_from_secs_f64(received as f64 / self.min_rate as f64)
            .unwrap_or(Duration::MAX);
        started.checked_add(self.timeout.saturating_add(earned))
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// `inner`, ending with [`BodyIdle`] when it gives nothing for the
    /// pace's timeout and with [`BodyTooSlow`] when it falls behind its
    /// minimum rate.
    pub(crate) struct PacedBody<B> {
        #[pin]
        inner: B,
        #[pin]
        wait: Option<tokio::time::Sleep>,
        // What the armed `wait` ends in.
        waiting_for: Late,
        pace: BodyPace,
        // The server's first wait for the body (a body that came whole
        // never reads the clock).
        started: Option<Instant>,
        // Bytes given so far.
        received: u64,
    }
}

/// Which limit an armed wait stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Late {
    Idle,
    Slow,
}

impl<B> PacedBody<B> {
    pub(crate) fn new(inner: B, pace: BodyPace) -> Self {
        PacedBody {
            inner,
            wait: None,
            waiting_for: Late::Idle,
            pace,
            started: None,
            received: 0,
        }
    }
}

impl<B> Body for PacedBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            this.wait.set(None);
            if let Some(Ok(frame)) = &frame
                && let Some(data) = frame.data_ref()
            {
                *this.received += data.remaining() as u64;
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.wait.is_none() {
            let now = Instant::now();
            let started = *this.started.get_or_insert(now);
            // A timeout past what the clock can count is no timeout.
            let idle = now.checked_add(this.pace.timeout);
            let slow = this.pace.deadline(started, *this.received);
            let next = match (idle, slow) {
                (Some(idle), Some(slow)) if slow < idle => Some((slow, Late::Slow)),
                (Some(idle), _) => Some((idle, Late::Idle)),
                (None, slow) => slow.map(|slow| (slow, Late::Slow)),
            };
            let Some((at, late)) = next else {
                return Poll::Pending;
            };
            *this.waiting_for = late;
            this.wait.set(Some(tokio::time::sleep_until(at)));
        }
        match this.wait.as_pin_mut().map(|wait| wait.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(match this.waiting_for {
                Late::Idle => Box::new(BodyIdle),
                Late::Slow => Box::new(BodyTooSlow {
                    min_rate: this.pace.min_rate,
                }),
            }))),
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use http_body_util::BodyExt as _;

    type Frames = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

    /// A body fed through the returned sender, paced by `pace`.
    fn fed(pace: BodyPace) -> (Frames, Pin<Box<impl Body<Data = Bytes, Error = BoxError>>>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        let body = PacedBody::new(http_body_util::StreamBody::new(frames), pace);
        (tx, Box::pin(body))
    }

    fn pace(timeout_ms: u64, min_rate: u64) -> BodyPace {
        BodyPace {
            timeout: Duration::from_millis(timeout_ms),
            min_rate,
        }
    }

    /// A body whose bytes are there reads whole without a timer; one that
    /// stalls ends with `BodyIdle` after the timeout, and a frame before
    /// the timeout starts the count again.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_ends_idle_and_a_ready_one_reads_whole() {
        let ready = PacedBody::new(
            http_body_util::Full::new(Bytes::from_static(b"frame")),
            pace(1_000, 0),
        );
        let bytes = ready.collect().await.map(|c| c.to_bytes());
        assert_eq!(bytes.ok(), Some(Bytes::from_static(b"frame")));

        let (tx, mut body) = fed(pace(1_000, 0));
        let feeder = tokio::spawn(async move {
            // Each frame comes before the timeout: none ends the body.
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
            }
            // Then nothing, with the sender still open.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(tx);
        });
        let started = tokio::time::Instant::now();
        for _ in 0..3 {
            let frame = body.frame().await;
            assert!(matches!(frame, Some(Ok(_))), "{frame:?}");
        }
        let end = body.frame().await;
        let error = end
            .and_then(Result::err)
            .expect("the stalled body ends with an error");
        assert!(error.is::<BodyIdle>(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(3_700));
        feeder.abort();
    }

    /// A body trickling a byte before each idle timeout ends once it is
    /// behind the minimum rate: at the grace plus one second per
    /// `min_rate` bytes it sent, not whenever its client likes.
    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_ends_when_it_falls_behind_the_minimum_rate() {
        // 1 s of grace, then 10 bytes a second: 10 bytes every 900 ms
        // keep up, a byte every 900 ms does not.
        let (tx, mut body) = fed(pace(1_000, 10));
        let feeder = tokio::spawn(async move {
            for n in 0..100 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                let chunk: &'static [u8] = if n < 3 { b"0123456789" } else { b"x" };
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(chunk))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let started = tokio::time::Instant::now();
        let mut frames = 0;
        let error = loop {
            match body.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(error)) => break error,
                None => panic!("the body ended without an error"),
            }
        };
        assert_eq!(
            error.downcast_ref::<BodyTooSlow>(),
            Some(&BodyTooSlow { min_rate: 10 }),
            "{error}"
        );
        // The grace (1 s) and the 30 bytes of the first three frames (3 s)
        // put the deadline at 4 s; each single byte then adds 0.1 s. The
        // first comes at 3.6 s (deadline 4.1 s), the next would at 4.5 s.
        assert_eq!(frames, 4, "frames before the end");
        assert_eq!(started.elapsed(), Duration::from_millis(4_100));
        feeder.abort();
    }

    /// Without a minimum rate only the idle timeout ends a body: the same
    /// trickle reads to its end.
    #[tokio::test(start_paused = true)]
    async fn without_a_minimum_rate_a_trickle_is_read_whole() {
        let (tx, body) = fed(pace(1_000, 0));
        tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
            }
        });
        let bytes = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(bytes.ok().map(|b| b.len()), Some(20));
    }

    /// A read timeout past what the clock can count (an operator's "never")
    /// arms no timer, and never panics: the body reads whole.
    #[tokio::test(start_paused = true)]
    async fn a_timeout_past_the_clock_is_no_timeout() {
        for min_rate in [0, 1] {
            let (tx, body) = fed(BodyPace {
                timeout: Duration::MAX,
                min_rate,
            });
            tokio::spawn(async move {
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_secs(3_600)).await;
                    let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x")))).await;
                }
            });
            let bytes = body.collect().await.map(|c| c.to_bytes());
            assert_eq!(bytes.ok().map(|b| b.len()), Some(3), "min_rate {min_rate}");
        }
    }

    /// A body sent at the minimum rate or faster is never cut short, however
    /// long it takes.
    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_reads_whole() {
        let (tx, body) = fed(pace(1_000, 100));
        tokio::spawn(async move {
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(900)).await;
                let _ = tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 90])))).await;
            }
        });
        let started = tokio::time::Instant::now();
        let bytes = body.collect().await.map(|c| c.to_bytes());
        assert_eq!(bytes.ok().map(|b| b.len()), Some(4_500));
        assert_eq!(started.elapsed(), Duration::from_millis(45_000));
    }
}
