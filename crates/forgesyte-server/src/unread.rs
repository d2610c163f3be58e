//! `Connection: close` on every answer that leaves its request's body
//! unread: a call refused before its body is read (an unknown plugin, a
//! plugin that cannot run, a `Content-Length` over the limit), a 404 or 405
//! of the fallbacks, an admin refusal, a stream upgrade with a body. hyper
//! drains only what has already arrived and then closes such a connection;
//! without the header, a client that sent its headers before its body
//! found out on its next request, which was lost without an answer
//! (RFC 9112 §9.6 asks a server that will close to say so). Over HTTP/1.0
//! the answer is marked HTTP/1.0, so hyper leaves its `keep-alive` out and
//! closes (it said `keep-alive` and closed all the same), and so is an
//! answer of no known length there (an event stream), which only the close
//! can end.
//!
//! Such an answer also sets the connection's [`Linger`]: once hyper has
//! written it and let the connection go, [`linger`] reads and drops what
//! the client still sends (at most [`LINGER_TIME`] and [`LINGER_BYTES`],
//! or until the client closes its side) before the socket is closed. A
//! socket closed with unread bytes in its receive queue sends a reset, and
//! a client that writes its whole body before it reads (Python's
//! `http.client`, most of them) got a broken pipe instead of the 404 or
//! 503 the server had answered (nginx's "lingering close").
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

/// The longest a closed connection's socket reads what its client still
/// sends.
pub(crate) const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(5);
/// The most it reads (then it is closed, reset or not).
pub(crate) const LINGER_BYTES: u64 = 256 * 1024 * 1024;
/// The most sockets that linger at once: they are outside the connection
/// cap (its permit went with the connection), so a client closing
/// connections fast could otherwise keep a descriptor each for
/// [`LINGER_TIME`]. Beyond it, a socket is closed at once, as before. Also
/// never more than a sixteenth of the open-file limit (the connections take
/// half of it, and runners keep an eighth free).
pub(crate) const MAX_LINGERING: usize = 256;

/// The places of the sockets that linger: [`MAX_LINGERING`], or a
/// sixteenth of the open-file limit when less (at least 4), made once.
fn lingering() -> &'static Arc<tokio::sync::Semaphore> {
    static PLACES: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    PLACES.get_or_init(|| {
        let places = crate::conn::nofile_limit()
            .and_then(|limit| usize::try_from(limit / 16).ok())
            .map_or(MAX_LINGERING, |share| share.clamp(4, MAX_LINGERING));
        Arc::new(tokio::sync::Semaphore::new(places))
    })
}

/// One connection's mark, in each of its requests' extensions (within its
/// [`crate::origin::Guard`]): an answer left the request's body unread,
/// and the socket is to linger when the connection ends.
#[derive(Debug, Clone, Default)]
pub(crate) struct Linger(Arc<AtomicBool>);

impl Linger {
    /// Whether an answer of the connection left a body unread.
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// An answer of the connection left a body unread.
    pub(crate) fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reads and drops, on a task of its own, what the client still sends on
/// `stream` (at most [`LINGER_TIME`] and [`LINGER_BYTES`], or until it
/// closes its side), on a copy of its descriptor made now: the
/// connection's own is closed when its caller drops it, and the copy then
/// keeps the socket open. No runtime, no place left among
/// [`lingering`]'s, or no descriptor to copy: nothing (the socket is closed as it
/// was).
pub(crate) fn linger(stream: &tokio::net::TcpStream) {
    use std::os::fd::AsFd as _;
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let Ok(place) = Arc::clone(lingering()).try_acquire_owned() else {
        return;
    };
    let Ok(copy) = stream.as_fd().try_clone_to_owned() else {
        return;
    };
    // The same open socket: non-blocking already, as tokio needs it.
    let copy = std::net::TcpStream::from(copy);
    runtime.spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let _place = place;
        let Ok(mut stream) = tokio::net::TcpStream::from_std(copy) else {
            return;
        };
        let ends = tokio::time::Instant::now() + LINGER_TIME;
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0u64;
        while read < LINGER_BYTES {
            match tokio::time::timeout_at(ends, stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => read += n as u64,
                _ => break,
            }
        }
    });
}

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
    R: Body,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let linger = request
            .extensions()
            .get::<crate::origin::Guard>()
            .map(|guard| guard.linger.clone());
        // A body already known to be empty has nothing to leave unread.
        let ended = (crate::body::announces_a_body(request.headers())
            && !request.body().is_end_stream())
        .then(|| Arc::new(AtomicBool::new(false)));
        // HTTP/1.0's answer is marked HTTP/1.0 instead (see `Answer`); the
        // socket lingers all the same (nginx speaks HTTP/1.0 to the servers
        // behind it by default, and turned the early 404 into a 502).
        let http_10 = request.version() == Version::HTTP_10;
        let request = request.map(|inner| Tracked {
            inner,
            ended: ended.clone(),
        });
        Answer {
            inner: self.inner.call(request),
            ended,
            linger,
            http_10,
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
        linger: Option<Linger>,
        http_10: bool,
    }
}

impl<F, R, E> std::future::Future for Answer<F>
where
    F: std::future::Future<Output = Result<Response<R>, E>>,
    R: Body,
{
    type Output = Result<Response<R>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut answer = std::task::ready!(this.inner.poll(cx));
        let Ok(response) = &mut answer else {
            return Poll::Ready(answer);
        };
        let unread = this
            .ended
            .as_ref()
            .is_some_and(|ended| !ended.load(Ordering::Relaxed));
        if unread && let Some(linger) = this.linger {
            linger.set();
        }
        if *this.http_10 {
            // hyper keeps an HTTP/1.0 client's `keep-alive` connection, and
            // says so, for an answer marked HTTP/1.1 (axum's); one marked
            // HTTP/1.0 without `keep-alive` it closes, saying nothing,
            // which is HTTP/1.0's way to say it. So when the connection
            // cannot go on: the body left unread, or an answer of no known
            // length (an event stream; not a stream whose `Content-Length`
            // is set, as `multipart/mixed` answers), which only its close
            // can end.
            let length_unknown = response.body().size_hint().exact().is_none()
                && !response.headers().contains_key(header::CONTENT_LENGTH);
            if unread || length_unknown {
                *response.version_mut() = Version::HTTP_10;
            }
        } else if unread {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::{Body as AxumBody, Bytes};
    use tower::{Layer as _, ServiceExt as _};

    /// Which answers to an HTTP/1.0 request are marked HTTP/1.0 (hyper then
    /// closes, saying nothing of `keep-alive`): those of no known length,
    /// and not a stream whose `Content-Length` is set (a `multipart/mixed`
    /// answer kept its connection; found by review).
    #[tokio::test]
    async fn an_http_10_answer_of_unknown_length_closes_its_connection() {
        fn stream() -> AxumBody {
            AxumBody::from_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(
                Bytes::from_static(b"abc"),
            )]))
        }
        type MakeAnswer = fn() -> Response<AxumBody>;
        let cases: [(Version, MakeAnswer, Version); 4] = [
            (
                Version::HTTP_10,
                || Response::new(AxumBody::from("abc")),
                Version::HTTP_11,
            ),
            (
                Version::HTTP_10,
                || Response::new(stream()),
                Version::HTTP_10,
            ),
            (
                Version::HTTP_10,
                || {
                    let mut answer = Response::new(stream());
                    answer
                        .headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
                    answer
                },
                Version::HTTP_11,
            ),
            (
                Version::HTTP_11,
                || Response::new(stream()),
                Version::HTTP_11,
            ),
        ];
        for (asked, answer, marked) in cases {
            let service = CloseUnreadLayer.layer(tower::service_fn(
                move |_: Request<Tracked<AxumBody>>| async move {
                    Ok::<_, std::convert::Infallible>(answer())
                },
            ));
            let mut request = Request::new(AxumBody::empty());
            *request.version_mut() = asked;
            let response = service.oneshot(request).await.unwrap();
            assert_eq!(response.version(), marked, "asked {asked:?}");
            assert!(!response.headers().contains_key(header::CONNECTION));
        }
    }
}
