//! Building JSON answers, the `{"detail": …}` answer that closes its
//! connection ([`closing`]), and reading a header's comma-separated tokens
//! ([`has_token`]).
//!
//! A leaf beside [`crate::error`]: the handlers of every route module,
//! the connection layer ([`crate::conn`]), the origin guard
//! ([`crate::origin`]) and the stream's upgrade ([`crate::stream`]) use
//! it, and it knows none of them.

use axum::body::Body;
use axum::http::header::{self, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ApiError;

/// A JSON response from a borrowed value.
pub(crate) fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_bytes(status, body),
        Err(e) => ApiError::Internal {
            context: format!("serialising a response: {e}"),
        }
        .into_response(),
    }
}

/// A response of JSON that is already serialised.
pub(crate) fn json_bytes(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A JSON `{"detail": …}` answer that closes the connection.
pub(crate) fn closing(status: StatusCode, detail: &str) -> Response {
    let body = serde_json::json!({ "detail": detail }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// `left` in whole seconds, rounded up: what a `Retry-After` says (0.2 s
/// left is 1, never 0).
pub(crate) fn seconds_up(left: std::time::Duration) -> u64 {
    left.as_secs() + u64::from(left.subsec_nanos() > 0)
}

/// Whether header `name` is given more than once (a request's `Host`, a
/// WebSocket key or version: each at most once).
pub(crate) fn repeated(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.get_all(name).iter().nth(1).is_some()
}

/// Whether one of `name`'s comma-separated values is `token` (any case).
pub(crate) fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}
