//! The HTTP side of the metrics: the `GET /metrics` route and the
//! middleware that counts and times every request by its route template.
//!
//! Knows the app state (for [`super::Metrics`]) and axum; no handler knows
//! this module except the router, which mounts both.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::UNMATCHED;
use crate::error::ApiError;
use crate::state::AppState;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric in the OpenMetrics text format, for Prometheus. Needs no
/// token.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "server",
    responses((
        status = 200,
        description = "Prometheus metrics (OpenMetrics text format): plugin states, tool calls by outcome, latencies, runner memory and CPU, HTTP requests by route, load passes, build info. The README lists every metric",
        content_type = "application/openmetrics-text"
    ))
)]
pub(crate) async fn scrape(State(state): State<AppState>) -> Response {
    match state.metrics().scrape() {
        Ok(body) => {
            let mut response = body.into_response();
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        Err(e) => ApiError::Internal {
            context: format!("encoding the metrics: {e}"),
        }
        .into_response(),
    }
}

/// Counts and times one request under its route template (axum's
/// [`MatchedPath`]; [`UNMATCHED`] for the 404 fallback), never its path.
pub(crate) async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().cloned();
    let response = next.run(request).await;
    let route = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    state
        .metrics()
        .record_request(route, &method, response.status(), started.elapsed());
    response
}
