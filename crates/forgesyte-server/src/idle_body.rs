//! The request body's idle timeout: a body that gives nothing for longer
//! than the body read timeout (`--body-read-timeout`) ends with
//! [`BodyIdle`], which the run route answers 408.
//!
//! tower-http's `RequestBodyTimeoutLayer` does the same, but arms its
//! timer before it first looks at the body: a timer registered and
//! cleared for every body, even one that came whole with the request's
//! head (most tool calls), and a registration earlier than every other
//! timer wakes the runtime's timer driver. This body arms its timer only
//! once the body has nothing to give, and drops it with the next frame.
//! It knows nothing of routes or of what reads the body.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};

/// A body read error: no byte came for the body read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body stopped arriving")]
pub(crate) struct BodyIdle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// `inner`, ending with [`BodyIdle`] when it gives nothing for
    /// `timeout`.
    pub(crate) struct IdleTimeoutBody<B> {
        #[pin]
        inner: B,
        #[pin]
        idle: Option<tokio::time::Sleep>,
        timeout: Duration,
    }
}

impl<B> IdleTimeoutBody<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            idle: None,
            timeout,
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
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
            this.idle.set(None);
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.idle.is_none() {
            this.idle.set(Some(tokio::time::sleep(*this.timeout)));
        }
        match this.idle.as_pin_mut().map(|idle| idle.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Some(Err(Box::new(BodyIdle)))),
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

    /// A body whose bytes are there reads whole without a timer; one that
    /// stalls ends with `BodyIdle` after the timeout, and a frame before
    /// the timeout starts the count again.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_ends_idle_and_a_ready_one_reads_whole() {
        let ready = IdleTimeoutBody::new(
            http_body_util::Full::new(Bytes::from_static(b"frame")),
            Duration::from_secs(1),
        );
        let bytes = ready.collect().await.map(|c| c.to_bytes());
        assert_eq!(bytes.ok(), Some(Bytes::from_static(b"frame")));

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        let stream = http_body_util::StreamBody::new(frames);
        let mut body = std::pin::pin!(IdleTimeoutBody::new(stream, Duration::from_secs(1)));
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
}
