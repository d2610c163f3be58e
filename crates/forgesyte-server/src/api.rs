//! The handlers of SPEC §5 (`/v1/health` and the plugin routes) and the
//! types they answer with. The router is [`crate::router`].
//!
//! Plugin and tool names come from the path through [`ApiPath`]
//! (percent-decoded by axum; a name that is not UTF-8 is decoded lossily):
//! any name that is not a registry key is simply "not found", whatever
//! bytes it holds.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::VERSION;
use crate::answer;
use crate::body::{self, RunRequest};
use crate::error::{ApiError, ErrorDetail, RunFailure};
use crate::extract::{ApiPath, PluginPath, ToolPath};
use crate::respond::{json, json_bytes};
use crate::state::AppState;
use crate::tools::{self, RunSuccess};
use crate::wire::{JournalEntryJson, PluginStatusJson, ToolInfoJson};

/// Answer of `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `loading` while the startup load pass runs; then `ok` when every
    /// plugin not marked `optional` is available (and, with
    /// `--python-entry-points`, the installed plugins could be listed),
    /// else `degraded`. The server itself is up in all three cases.
    pub status: String,
    /// Plugins that can take tool calls (INITIALIZED or RUNNING).
    pub plugins_loaded: usize,
    /// Plugins registered, in any state.
    pub plugins_total: usize,
    /// The server's version.
    pub version: String,
}

/// Answer of `GET /v1/plugins/{name}/health`: the status object of SPEC §5
/// plus the plugin's failure journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PluginHealth {
    /// The status object, its fields at the top level.
    #[serde(flatten)]
    pub status: PluginStatusJson,
    /// The last moves into FAILED or UNAVAILABLE and the supervisor's
    /// restarts, oldest first (an addition to SPEC §5).
    pub journal: Vec<JournalEntryJson>,
    /// What runs the plugin's code: `native` or `python`; null when its
    /// manifest was invalid.
    #[schema(required = true)]
    #[serde(default)]
    pub runtime: Option<String>,
    /// Where it runs: `in-process` or `process` (Python plugins always in
    /// a process); null when its manifest was invalid.
    #[schema(required = true)]
    #[serde(default)]
    pub isolation: Option<String>,
}

/// Server health and the number of plugins available.
#[utoipa::path(
    get,
    path = "/v1/health",
    tag = "server",
    responses((status = 200, description = "The server is up", body = HealthResponse))
)]
pub(crate) async fn server_health(State(state): State<AppState>) -> Response {
    let counts = crate::state::plugin_counts(&state);
    let status = if state.is_loading() {
        "loading"
    } else if counts.required_available
        && !state.load_failed()
        && state.loader().entry_points_error().is_none()
    {
        "ok"
    } else {
        "degraded"
    };
    json(
        StatusCode::OK,
        &HealthResponse {
            status: status.to_owned(),
            plugins_loaded: counts.available,
            plugins_total: counts.total,
            version: VERSION.to_owned(),
        },
    )
}

/// Every plugin's status, sorted by name, failed and unavailable ones included.
///
/// Also served at `/v1/plugins/` (same answer, no redirect).
#[utoipa::path(
    get,
    path = "/v1/plugins",
    tag = "plugins",
    responses((status = 200, description = "Every plugin, sorted by name", body = [PluginStatusJson]))
)]
pub(crate) async fn list_plugins(State(state): State<AppState>) -> Response {
    match state.list_body() {
        Ok(body) => json_bytes(StatusCode::OK, body),
        Err(e) => ApiError::Internal {
            context: format!("serialising the plugin list: {e}"),
        }
        .into_response(),
    }
}

/// The same answer as `GET /v1/plugins` (no redirect).
#[utoipa::path(
    get,
    path = "/v1/plugins/",
    tag = "plugins",
    responses((status = 200, description = "Every plugin, sorted by name", body = [PluginStatusJson]))
)]
pub(crate) async fn list_plugins_slash(state: State<AppState>) -> Response {
    list_plugins(state).await
}

/// One plugin's status (state, reason, version, metrics, supervision)
/// and its failure journal.
#[utoipa::path(
    get,
    path = "/v1/plugins/{name}/health",
    tag = "plugins",
    params(("name" = String, Path, description = "Plugin name (registry key)")),
    responses(
        (status = 200, description = "The plugin's status, whatever its state, with its failure journal", body = PluginHealth),
        (status = 404, description = "No plugin of that name", body = ErrorDetail),
    )
)]
pub(crate) async fn plugin_health(
    State(state): State<AppState>,
    ApiPath(PluginPath { name }): ApiPath<PluginPath>,
) -> Response {
    let built = state.health_body(&name, || {
        // One entry read: the status and the journal agree.
        let (status, journal) = state.registry().status_with_journal(&name)?;
        let placement = state.loader().placement(&name);
        let health = PluginHealth {
            status: status.into(),
            journal: journal.into_iter().map(JournalEntryJson::from).collect(),
            runtime: placement.map(|(r, _)| r.as_str().to_owned()),
            isolation: placement.map(|(_, i)| i.as_str().to_owned()),
        };
        Some(serde_json::to_vec(&health).map(Bytes::from))
    });
    match built {
        Some(Ok(body)) => json_bytes(StatusCode::OK, body),
        Some(Err(e)) => ApiError::Internal {
            context: format!("serialising a plugin's health: {e}"),
        }
        .into_response(),
        None => ApiError::not_found(&state, name).into_response(),
    }
}

/// The plugin's `manifest.json` as read, unknown fields kept.
#[utoipa::path(
    get,
    path = "/v1/plugins/{name}/manifest",
    tag = "plugins",
    params(("name" = String, Path, description = "Plugin name (registry key)")),
    responses(
        (status = 200, description = "The manifest object as read", body = Object),
        (status = 404, description = "No plugin of that name, or its manifest is not valid JSON", body = ErrorDetail),
    )
)]
pub(crate) async fn plugin_manifest(
    State(state): State<AppState>,
    ApiPath(PluginPath { name }): ApiPath<PluginPath>,
) -> Result<Response, ApiError> {
    if let Some(raw) = state.loader().manifest(&name) {
        return Ok(json(StatusCode::OK, &*raw));
    }
    if state.registry().contains(&name) {
        Err(ApiError::ManifestUnavailable { name })
    } else {
        Err(ApiError::not_found(&state, name))
    }
}

/// The tools the loaded plugin offers (authoritative over the manifest).
#[utoipa::path(
    get,
    path = "/v1/plugins/{name}/tools",
    tag = "plugins",
    params(("name" = String, Path, description = "Plugin name (registry key)")),
    responses(
        (status = 200, description = "The plugin's tools", body = [ToolInfoJson]),
        (status = 404, description = "No plugin of that name", body = ErrorDetail),
        (status = 503, description = "The plugin has no live instance", body = ErrorDetail),
    )
)]
pub(crate) async fn plugin_tools(
    State(state): State<AppState>,
    ApiPath(PluginPath { name }): ApiPath<PluginPath>,
) -> Result<Response, ApiError> {
    if let Some(handle) = state.loader().handle(&name) {
        let tools: Vec<ToolInfoJson> = handle.tools().iter().map(ToolInfoJson::from).collect();
        return Ok(json(StatusCode::OK, &tools));
    }
    match state.registry().get_status(&name) {
        Some(status) => Err(ApiError::PluginNotRunnable {
            name,
            state: Some(status.state),
            reason: status.reason,
        }),
        None => Err(ApiError::not_found(&state, name)),
    }
}

/// Runs a tool. The call runs off the async runtime under a time limit
/// (the manifest's `limits.call_timeout_s`, else the server's
/// `--call-timeout`); a panic, protocol fault or timeout marks the plugin
/// FAILED (in-process, a timed-out call's thread cannot be stopped).
#[utoipa::path(
    post,
    path = "/v1/plugins/{name}/tools/{tool}/run",
    tag = "tools",
    params(
        ("name" = String, Path, description = "Plugin name (registry key)"),
        ("tool" = String, Path, description = "Tool id"),
        ("x-request-id" = Option<String>, Header, description = "The request's id, kept when it is 1 to 128 visible ASCII characters other than a quote and a backslash (else one is made); answered in `x-request-id`, passed to a plugin in a runner with the call and named in the plugin's log lines of the call"),
        ("traceparent" = Option<String>, Header, description = "A W3C trace context (`00-<32 hex>-<16 hex>-<2 hex>`), passed to a plugin in a runner with the call; an invalid one is ignored"),
        ("accept" = Option<String>, Header, description = "How binary results come back: `application/json` (default: base64 strings at their places in `result`), `multipart/mixed` (the JSON answer, then one part per binary result named by its JSON Pointer), or `application/octet-stream` (the one binary result's bytes; the JSON answer in `X-Forgesyte-Result`)"),
    ),
    request_body(content(
        (RunRequest = "application/json"),
        (Object = "multipart/form-data"),
        (Vec<u8> = "application/octet-stream"),
    ), description = "`{\"args\": {...}}` (an empty body means no arguments); or `multipart/form-data` whose parts are arguments under their field names (bytes; a part named like an argument the input schema declares and not as binary is a form field of that argument's type: text for a string, else the JSON it holds) and whose optional `args` part holds the rest as JSON; or `application/octet-stream`, the tool's one binary argument. Arguments the tool's input schema declares binary (`format: binary`, `contentEncoding: base64`) reach the plugin as bytes"),
    responses(
        (status = 200, description = "The tool's result: JSON by default; with `Accept: multipart/mixed`, the JSON answer (null at each binary result's place) then one part per binary result named by its JSON Pointer; with `Accept: application/octet-stream`, the one binary result's bytes, the JSON answer in `X-Forgesyte-Result` (see the `accept` parameter)", content(
            (RunSuccess = "application/json"),
            (String = "multipart/mixed"),
            (String = "application/octet-stream"),
        )),
        (status = 406, description = "Raw bytes were the only acceptable answer and the result has not exactly one binary result (`NotAcceptable`; the tool has run)", body = RunFailure),
        (status = 400, description = "The body is not JSON, or is a malformed multipart body, or could not be read (its chunked framing broken, cut short, a `Transfer-Encoding` other than `chunked` or a `Content-Encoding` other than `identity`, two `Content-Type` headers): `MalformedBody`", body = RunFailure),
        (status = 404, description = "Unknown plugin or tool", body = RunFailure),
        (status = 413, description = "The body is larger than the limit, or its JSON arguments hold more values than a body may (the body limit / 128)", body = RunFailure),
        (status = 408, description = "The body stopped arriving for longer than the body read timeout (`--body-read-timeout`), or arrived slower than the minimum rate (`--body-min-rate`)", body = RunFailure),
        (status = 422, description = "The body has the wrong shape, or the tool returned an error, or its answer is larger than all the memory for answers waiting to be sent (`AnswerTooLarge`, `--answer-memory`; the tool ran)", body = RunFailure),
        (status = 502, description = "The tool panicked (`ToolPanic`), broke the protocol (`ProtocolError`), or its runner process crashed (`CrashError`: a signal, an exit, a memory limit); the plugin is now FAILED", body = RunFailure),
        (status = 503, description = "The plugin cannot run tools (state and reason in the body; `PluginNotRunnable`), or it has its limit of tool calls in progress and this one did not run (`TooManyCalls`, with `Retry-After`), or no thread to run it was free within its time limit, or its body found no room in `--body-memory` (`ServerBusy`, with `Retry-After`), or it ran and its answer found no room in `--answer-memory` (`ServerBusy`, with `Retry-After`; the answer was dropped)", body = RunFailure),
        (status = 504, description = "The tool ran past its time limit; the plugin is now FAILED (`Timeout`). Or the call waited its time limit behind the plugin's call in progress (a plugin that takes one call at a time) and never ran; the plugin is unaffected (`QueueTimeout`)", body = RunFailure),
    )
)]
pub(crate) async fn run_tool(
    State(state): State<AppState>,
    ApiPath(ToolPath { name: plugin, tool }): ApiPath<ToolPath>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let limit = state.body_limit();
    // A call refused whatever its body holds is refused before the body is
    // read (see `tools::refused_before_its_body`). The body takes room from
    // the server's budget for bodies as it arrives (see `body::receive`);
    // the room goes with the call.
    let received = match tools::refused_before_its_body(&state, &plugin, &tool) {
        Err(e) => Err(e),
        Ok(handle) => {
            // A frame for a plugin in a child process: received into the
            // memory file its runner gets. The handle goes before the body
            // arrives: held, it kept an instance a reload had let go alive
            // for as long as a slow client took to upload.
            let into_file = handle.isolation() == forgesyte_loader::Isolation::Process
                && body::is_octet_stream(&headers);
            drop(handle);
            match body::receive(state.body_budget(), &headers, body, limit, into_file).await {
                Ok((bytes, room)) => {
                    // Counted as read: a client that leaves before its
                    // answer ends this handler at the call, whose end it
                    // never sees (the call runs on).
                    if state.registry().contains(&plugin) {
                        let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
                        state.metrics().record_bytes(&plugin, read, 0);
                    }
                    body::read(&headers, bytes, limit)
                        .await
                        .map(|input| (input, room))
                }
                Err(e) => Err(e),
            }
        }
    };
    let outcome = match received {
        Ok((input, room)) => {
            let context = tools::call_context(&headers);
            tools::run_output(&state, &plugin, &tool, input, context, Some(room.into())).await
        }
        Err(e) => {
            // Counted like the calls made (a 400, 408, 413 or 503 for want
            // of room is the plugin's traffic too).
            tools::record_refused(&state, (&plugin, &tool), &e);
            Err(e)
        }
    };
    let response = match outcome {
        // Binary results by `Accept`: base64 in the JSON by default,
        // multipart/mixed, or raw bytes (see `answer`).
        Ok((success, binary)) => match answer::negotiate(&headers, binary.len()) {
            Ok(representation) => {
                answer::respond(success, binary, representation, state.answer_budget())
            }
            Err(detail) => Ok(answer::not_acceptable(&success, detail)),
        },
        Err(error) => Err(error),
    };
    let response = response.unwrap_or_else(|error| {
        state.metrics().record_dropped_answer(&error);
        tools::refusal(&state, plugin.clone(), tool, error)
    });
    // Per plugin only for registered plugins: the label stays bounded.
    if state.registry().contains(&plugin) {
        // A streamed (multipart) body states its length in its header.
        let response_bytes = axum::body::HttpBody::size_hint(response.body())
            .exact()
            .or_else(|| {
                response
                    .headers()
                    .get(axum::http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
            })
            .unwrap_or(0);
        state.metrics().record_bytes(&plugin, 0, response_bytes);
    }
    Ok(response)
}
