//! `Connection: close` on every answer that leaves its request's body
//! unread: a call refused before its body is read (an unknown plugin, a
//! plugin that cannot run, a `Content-Length` over the limit), a 404 or 405
//! of the fallbacks, an admin refusal, a stream upgrade with a body. hyper
//! drains only what has already arrived and then closes such a connection;
//! without the header, a client that sent its headers before its body
//! found out on its next request, which was lost without an answer
//! (RFC 9112 §9.6 asks a server that will close to say so).
//!
//! Knows nothing of routes: a tower layer around all of them, which wraps
//! the request body of a request that announces one (`Content-Length`
//! other than 0, or `Transfer-Encoding`) and marks when it was read to its
//! end.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::http::{HeaderValue, Request, Response, Version, header};
use http_body::{Body, Frame, SizeHint};

/// The layer (see the module's doc).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CloseUnreadLayer;

impl<S> tower::Layer<S> for CloseUnreadLayer {
    type Service = CloseUnread<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CloseUnread { inner }
    }
}

/// The service of [`CloseUnreadLayer`].
#[derive(Debug, Clone)]
pub(crate) struct CloseUnread<S> {
    inner: S,
}

impl<S, B, R> tower::Service<Request<B>> for CloseUnread<S>
where
    S: tower::Service<Request<Tracked<B>>, Response = Response<R>>,
    B: Body,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // HTTP/1.0 is left to hyper, which writes its own `Connection`
        // value there (`close` would be joined to its `keep-alive`); a
        // body already known to be empty has nothing to leave unread.
        let ended = (request.version() != Version::HTTP_10
            && crate::body::announces_a_body(request.headers())
            && !request.body().is_end_stream())
        .then(|| Arc::new(AtomicBool::new(false)));
        let request = request.map(|inner| Tracked {
            inner,
            ended: ended.clone(),
        });
        Answer {
            inner: self.inner.call(request),
            ended,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that marks `ended` once read to its end.
    pub(crate) struct Tracked<B> {
        #[pin]
        inner: B,
        ended: Option<Arc<AtomicBool>>,
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let frame = this.inner.as_mut().poll_frame(cx);
        if let Some(ended) = this.ended {
            match &frame {
                Poll::Ready(None) => ended.store(true, Ordering::Relaxed),
                Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                    ended.store(true, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// The answer, with `Connection: close` when the body was not read to
    /// its end.
    pub(crate) struct Answer<F> {
        #[pin]
        inner: F,
        ended: Option<Arc<AtomicBool>>,
    }
}

impl<F, R, E> std::future::Future for Answer<F>
where
    F: std::future::Future<Output = Result<Response<R>, E>>,
{
    type Output = Result<Response<R>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut answer = std::task::ready!(this.inner.poll(cx));
        if let (Ok(response), Some(ended)) = (&mut answer, this.ended.as_ref())
            && !ended.load(Ordering::Relaxed)
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(answer)
    }
}
