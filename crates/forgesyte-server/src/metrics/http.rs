//! The HTTP side of the metrics: the `GET /metrics` route and the
//! middleware that counts and times every request by its route template.
//!
//! Knows the app state (for [`super::Metrics`]) and axum; no handler knows
//! this module except the router, which mounts both.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, VARY};
use axum::http::{HeaderMap, HeaderValue, Method, Request};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use super::Route;
use crate::error::ApiError;
use crate::state::AppState;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric in the OpenMetrics text format, for Prometheus, or in the
/// Prometheus text format (0.0.4) when the request's `Accept` prefers
/// `text/plain` ([`super::text::wanted`]). Needs no token.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "server",
    responses((
        status = 200,
        description = "Prometheus metrics (OpenMetrics text format; the Prometheus text format 0.0.4 for `Accept: text/plain`): plugin states, tool calls by outcome, latencies, runner memory and CPU, HTTP requests by route, load passes, build info. The README lists every metric",
        content(
            (String = "application/openmetrics-text"),
            (String = "text/plain"),
        )
    ))
)]
pub(crate) async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let text = super::text::wanted(&headers);
    match state.metrics().scrape() {
        Ok(body) => {
            let (body, content_type) = if text {
                let converted = super::text::from_openmetrics(&String::from_utf8_lossy(&body));
                (bytes::Bytes::from(converted), super::text::CONTENT_TYPE)
            } else {
                (body, OPENMETRICS)
            };
            let mut response = body.into_response();
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            // The format depends on `Accept` (RFC 9110 §12.5.5).
            headers.insert(VARY, HeaderValue::from_static("accept"));
            response
        }
        Err(e) => ApiError::Internal {
            context: format!("encoding the metrics: {e}"),
        }
        .into_response(),
    }
}

/// Counts and times every request under its route template (axum's
/// [`MatchedPath`](axum::extract::MatchedPath); [`super::UNMATCHED`] for the 404 fallback), never its
/// path. A plain tower layer rather than `axum::middleware::from_fn`, which
/// clones the inner service and boxes a future per request: this is on the
/// path of every health check.
#[derive(Clone)]
pub(crate) struct TrackLayer {
    state: AppState,
}

impl TrackLayer {
    pub(crate) fn new(state: AppState) -> Self {
        TrackLayer { state }
    }
}

impl<S> Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The service of [`TrackLayer`].
#[derive(Clone)]
pub(crate) struct Track<S> {
    inner: S,
    state: AppState,
}

impl<S, B> Service<Request<B>> for Track<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let started = Instant::now();
        let method = request.method().clone();
        let route = Route::of(&request);
        Tracked {
            inner: self.inner.call(request),
            record: Some((self.state.clone(), route, method, started)),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer, recorded when it is ready; a request dropped
    /// before (its client went away: hyper drops the handler's future) is
    /// recorded when dropped, with the status `aborted`. Left out, the
    /// requests clients gave up on were missing from the count and from
    /// the latency histogram, whose slowest they are.
    pub(crate) struct Tracked<F> {
        #[pin]
        inner: F,
        record: Option<(AppState, Route, Method, Instant)>,
    }

    impl<F> PinnedDrop for Tracked<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((state, route, method, started)) = this.record.take() {
                state
                    .metrics()
                    .record_request(route, &method, None, started.elapsed());
            }
        }
    }
}

impl<F, E> Future for Tracked<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let (Ok(response), Some((state, route, method, started))) = (&output, this.record.take())
        {
            state.metrics().record_request(
                route,
                &method,
                Some(response.status()),
                started.elapsed(),
            );
        }
        Poll::Ready(output)
    }
}
