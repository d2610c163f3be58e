//! Live streams: `GET /v1/plugins/{name}/tools/{tool}/stream` upgrades to a
//! WebSocket whose binary messages are frames (the tool's one binary
//! argument) and whose answers are JSON text messages in frame order.
//!
//! This module owns the route's checks before the upgrade (the run route's
//! 404 and 503, 422 for a tool without exactly one binary argument, 400 for
//! a bad query, 503 beyond the cap on open streams) and [`Streams`], the
//! server-wide bookkeeping: the cap, and the shutdown signal on which every
//! stream closes with 1001. [`session`] runs one open stream, [`queue`]
//! holds its waiting frames under its policy.
//!
//! Plugin calls go through [`crate::tools::run`], the run route's own call:
//! this module never touches a plugin handle's call, the registry's
//! records or the metrics itself.

mod metered;
mod queue;
mod session;

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, RawQuery, State};
use axum::http::header::{self, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::Instrument as _;

use crate::error::{ApiError, ErrorDetail, RunFailure, Shown};
use crate::extract::{ApiPath, ToolPath};
use crate::state::AppState;
use crate::tools;

pub(crate) use metered::FrameRoom;
pub(crate) use queue::Policy;

/// Every open stream of the server: at most a fixed number at once, and all
/// told when the server shuts down.
#[derive(Debug)]
pub(crate) struct Streams {
    /// `true` from the shutdown on.
    closing: watch::Sender<bool>,
    /// One permit per stream that may be open.
    open: Arc<Semaphore>,
    capacity: u32,
}

impl Streams {
    /// Room for `capacity` streams at once (at least 1).
    pub(crate) fn new(capacity: usize) -> Streams {
        let capacity = u32::try_from(capacity.clamp(1, Semaphore::MAX_PERMITS))
            .unwrap_or(u32::MAX)
            .max(1);
        Streams {
            closing: watch::channel(false).0,
            open: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
        }
    }

    /// A place for one more stream; `None` when all are taken or the server
    /// is shutting down.
    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        if *self.closing.borrow() {
            return None;
        }
        Arc::clone(&self.open).try_acquire_owned().ok()
    }

    /// Closes every stream with 1001 (at shutdown), and admits no new one.
    pub(crate) fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Waits until no stream is open.
    pub(crate) async fn drained(&self) {
        let _all = self.open.acquire_many(self.capacity).await;
    }
}

/// Streams a tool: each binary WebSocket message is one frame, the tool's
/// one binary argument; a text message `{"args": {...}}` sets the other
/// arguments for the frames after it. Each frame is answered with a JSON
/// text message, in order: `{"seq", "ok", "result" | "error_type" and
/// "detail", "processing_time_ms", "dropped"}`. Under `policy=latest` (the
/// default) a frame that arrives while one waits replaces it (the replaced
/// one is dropped and counted); under `policy=block` up to `queue` frames
/// wait (default 4, at most 64) and the server then stops reading. A plugin
/// crash closes the stream with 1011, a frame or text message larger than
/// the body limit with 1009, what the client sent finding no room in
/// `--body-memory` or its arrival reserve with 1013, a server shutdown or
/// the plugin's removal by a rescan with 1001.
#[utoipa::path(
    get,
    path = "/v1/plugins/{name}/tools/{tool}/stream",
    tag = "tools",
    params(
        ("name" = String, Path, description = "Plugin name (registry key)"),
        ("tool" = String, Path, description = "Tool id; the tool must declare exactly one binary argument"),
        ("policy" = Option<String>, Query, description = "`latest` (default): one frame waits, a newer one replaces it; `block`: frames wait in a queue, then the server stops reading"),
        ("queue" = Option<usize>, Query, minimum = 1, maximum = 64, description = "With `policy=block`: how many frames may wait, 1 to 64 (default 4)"),
    ),
    responses(
        (status = 101, description = "Switched to the WebSocket stream protocol"),
        (status = 400, description = "A bad `policy` or `queue`, or not a WebSocket upgrade request", body = ErrorDetail),
        (status = 404, description = "Unknown plugin or tool", body = RunFailure),
        (status = 422, description = "The tool does not declare exactly one binary argument (`NotStreamable`)", body = RunFailure),
        (status = 426, description = "A WebSocket version other than 13 (the answer's `Sec-WebSocket-Version` says 13), or a connection that cannot be upgraded", body = ErrorDetail),
        (status = 503, description = "The plugin cannot run tools (`PluginNotRunnable`, a `RunFailure`), or the server has its limit of open streams or is shutting down (`{\"detail\"}`, with `Retry-After`)", body = RunFailure),
    )
)]
pub(crate) async fn stream_tool(
    State(state): State<AppState>,
    ApiPath(ToolPath { name: plugin, tool }): ApiPath<ToolPath>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<Upgrade, UpgradeRefused>,
) -> Response {
    let handle = match tools::live_handle(&state, &plugin, &tool) {
        Ok(handle) => handle,
        Err(error) => return tools::refusal(&state, plugin, tool, error),
    };
    let binary = tools::declared_binary(&handle.tools(), &tool).len();
    if binary != 1 {
        return not_streamable(&plugin, &tool, binary);
    }
    let policy = match policy_of(query.as_deref()) {
        Ok(policy) => policy,
        Err(detail) => return ApiError::BadPath { detail }.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(refused) => return refused.into_response(),
    };
    let Some(permit) = state.streams().admit() else {
        let detail = ErrorDetail {
            detail: "The server has its limit of open streams, or is shutting down; retry later"
                .to_owned(),
        };
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(detail)).into_response();
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    let body_limit = state.body_limit();
    let answer_limit = answer_limit(body_limit);
    let idle_timeout = state.stream_idle_timeout();
    let session = session::Session {
        context: tools::call_context(&headers),
        closing: state.streams().closing.subscribe(),
        state,
        plugin,
        tool,
        policy,
        body_limit,
        answer_limit,
        idle_timeout,
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(body_limit))
        .max_frame_size(Some(body_limit))
        // What waits to be written when the client reads nothing: an answer
        // and the pongs of its pings (tungstenite, unbounded by default,
        // queued one per ping).
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER.saturating_add(answer_limit));
    let span = tracing::Span::current();
    let Upgrade { key, on_upgrade } = upgrade;
    tokio::spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    tracing::debug!(error = %e, "the stream's connection was not upgraded");
                    return;
                }
            };
            // Every byte the client sends is charged as it is read.
            let ledger = metered::Ledger::new(session.state.clone());
            let io = metered::Metered::new(TokioIo::new(upgraded), Arc::clone(&ledger));
            let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
            session::run(socket, session, &ledger).await;
            drop(permit);
        }
        .instrument(span),
    );
    switching_protocols(&key)
}

/// A WebSocket upgrade request (RFC 6455 §4.2.1, HTTP/1.1): its key, and
/// the connection to take over once answered. The route upgrades by hand
/// rather than with axum's `WebSocketUpgrade`, which hides the connection:
/// a stream's reads are charged to the body budget beneath the WebSocket
/// layer ([`metered`]).
pub(crate) struct Upgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
}

/// Why a request cannot be upgraded: its status and detail (JSON, as
/// every refusal of the API).
#[derive(Debug)]
pub(crate) struct UpgradeRefused(StatusCode, &'static str);

impl IntoResponse for UpgradeRefused {
    fn into_response(self) -> Response {
        let detail = ErrorDetail {
            detail: self.1.to_owned(),
        };
        let mut response = (self.0, Json(detail)).into_response();
        if self.0 == StatusCode::UPGRADE_REQUIRED {
            // RFC 9110 §15.5.22: the protocol to upgrade to; RFC 6455
            // §4.2.2: the version this server speaks.
            let headers = response.headers_mut();
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

impl<S: Sync> FromRequestParts<S> for Upgrade {
    type Rejection = UpgradeRefused;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let refused = |detail| UpgradeRefused(StatusCode::BAD_REQUEST, detail);
        // The route is a GET route, which takes HEAD too: HEAD answers as
        // a GET without the upgrade would (400), not 405 (which would owe
        // an `Allow` naming GET, the method it was answered for).
        if parts.method != Method::GET {
            return Err(refused("a WebSocket upgrade is a GET request"));
        }
        let headers = &parts.headers;
        // A body would be read as the client's first frames (chunked), or
        // left unread before them (a length): the stream would be garbled,
        // or deaf to the client, from its start.
        if crate::body::announces_a_body(headers) {
            return Err(refused("a WebSocket upgrade request has no body"));
        }
        if !crate::respond::has_token(headers, &header::CONNECTION, "upgrade") {
            return Err(refused(
                "not a WebSocket upgrade request: the Connection header does not name `upgrade`",
            ));
        }
        if !crate::respond::has_token(headers, &header::UPGRADE, "websocket") {
            return Err(refused(
                "not a WebSocket upgrade request: the Upgrade header does not name `websocket`",
            ));
        }
        // RFC 6455 §11.3.1, §11.3.5: each at most once (a second key was
        // ignored, the accept value made of the first).
        for (name, twice) in [
            (
                header::SEC_WEBSOCKET_KEY,
                "more than one Sec-WebSocket-Key header",
            ),
            (
                header::SEC_WEBSOCKET_VERSION,
                "more than one Sec-WebSocket-Version header",
            ),
        ] {
            if crate::respond::repeated(headers, &name) {
                return Err(refused(twice));
            }
        }
        if headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(UpgradeRefused(
                StatusCode::UPGRADE_REQUIRED,
                "the Sec-WebSocket-Version header is not 13, the version this server speaks",
            ));
        }
        let key = headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or_else(|| refused("the Sec-WebSocket-Key header is missing"))?;
        if !valid_key(&key) {
            return Err(refused(
                "the Sec-WebSocket-Key header is not 16 bytes in base64 (RFC 6455 §4.1)",
            ));
        }
        let on_upgrade = parts
            .extensions
            .remove::<hyper::upgrade::OnUpgrade>()
            .ok_or(UpgradeRefused(
                StatusCode::UPGRADE_REQUIRED,
                "this connection cannot be upgraded",
            ))?;
        Ok(Upgrade { key, on_upgrade })
    }
}

/// Whether `key` is a WebSocket key: 16 bytes in base64 (RFC 6455 §4.1).
fn valid_key(key: &HeaderValue) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .is_ok_and(|bytes| bytes.len() == 16)
}

/// The 101 answer to an upgrade request with `key`.
fn switching_protocols(key: &HeaderValue) -> Response {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// What a stream's connection writes out in one go, in bytes (tungstenite's
/// default).
const WRITE_BUFFER: usize = 128 * 1024;

/// The largest answer a stream sends, in bytes, for frames of at most
/// `body_limit` bytes: twice that (an answer that carries a frame's worth
/// of binary result in base64 fits), at least 4 MiB. A larger one closes
/// the stream (1011).
fn answer_limit(body_limit: usize) -> usize {
    body_limit.saturating_mul(2).max(4 << 20)
}

/// The policy of the route's query string (`policy`, `queue`; nothing else).
fn policy_of(query: Option<&str>) -> Result<Policy, String> {
    let (mut policy, mut queue) = (None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (decoded(key)?, decoded(value)?);
        let slot = match &*key {
            "policy" => &mut policy,
            "queue" => &mut queue,
            other => {
                return Err(format!(
                    "unknown query parameter {:?}: a stream takes `policy` and `queue`",
                    Shown(other).to_string()
                ));
            }
        };
        if slot.replace(value).is_some() {
            return Err(format!("query parameter `{key}` given more than once"));
        }
    }
    Policy::parse(policy.as_deref(), queue.as_deref())
}

/// `text` percent-decoded (a query parameter's name or value).
fn decoded(text: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map_err(|_| {
            format!(
                "query parameter {:?} is not UTF-8 once percent-decoded",
                Shown(text).to_string()
            )
        })
}

/// 422: the tool does not take exactly one binary argument.
fn not_streamable(plugin: &str, tool: &str, binary: usize) -> Response {
    let failure = RunFailure {
        ok: false,
        plugin_id: plugin.to_owned(),
        tool_name: tool.to_owned(),
        error: format!("the tool declares {binary} binary arguments, not one"),
        error_type: "NotStreamable".to_owned(),
        detail: format!(
            "Tool '{}' of plugin '{}' cannot be streamed: a stream's frames are the tool's one binary argument, and it declares {binary}",
            Shown(tool),
            Shown(plugin)
        ),
        not_runnable: None,
    };
    (StatusCode::UNPROCESSABLE_ENTITY, Json(failure)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_the_policy_and_nothing_else() {
        assert_eq!(policy_of(None), Ok(Policy::Latest));
        assert_eq!(policy_of(Some("")), Ok(Policy::Latest));
        assert_eq!(
            policy_of(Some("policy=block&queue=8")),
            Ok(Policy::Block { queue: 8 })
        );
        assert!(policy_of(Some("policy=block&queue=99")).is_err());
        // Percent-decoded, as any client may encode them; once each.
        assert_eq!(
            policy_of(Some("policy=bl%6Fck&queue=%38")),
            policy_of(Some("policy=block&queue=8"))
        );
        assert!(
            policy_of(Some("policy=latest&policy=block"))
                .is_err_and(|e| e.contains("more than once"))
        );
        assert!(policy_of(Some("policy=%FF")).is_err_and(|e| e.contains("UTF-8")));
        let unknown = policy_of(Some("policy=latest&size=2"));
        assert!(
            unknown.as_ref().is_err_and(|e| e.contains("size")),
            "{unknown:?}"
        );
    }

    #[test]
    fn a_key_is_sixteen_bytes_in_base64() {
        let key = |k: &'static str| valid_key(&HeaderValue::from_static(k));
        // RFC 6455's own example.
        assert!(key("dGhlIHNhbXBsZSBub25jZQ=="));
        for bad in ["", "abc", "not base64!!", "dGhlIHNhbXBsZSBub25jZQ", "YWJj"] {
            assert!(!key(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn streams_are_capped_and_closing_admits_none() {
        let streams = Streams::new(2);
        let first = streams.admit();
        let second = streams.admit();
        assert!(first.is_some() && second.is_some());
        assert!(streams.admit().is_none(), "over the cap");
        drop(first);
        let third = streams.admit();
        assert!(third.is_some());
        let mut closing = streams.closing.subscribe();
        streams.close();
        assert!(*closing.borrow_and_update());
        assert!(streams.admit().is_none(), "closing");
        // Drained once every permit is back.
        let drained = tokio::time::timeout(std::time::Duration::from_millis(50), streams.drained());
        assert!(drained.await.is_err(), "two streams are still open");
        drop((second, third));
        tokio::time::timeout(std::time::Duration::from_secs(1), streams.drained())
            .await
            .unwrap();
    }
}
