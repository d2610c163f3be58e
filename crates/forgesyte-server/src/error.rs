//! The one mapping from failures to HTTP answers.
//!
//! [`ApiError`] is every way a request can fail and has the crate's only
//! `IntoResponse` for errors. Most variants answer FastAPI's `{"detail": …}`;
//! [`ApiError::Run`] answers the tool-run failure shape of SPEC §5
//! (`{"ok": false, "error", "error_type", "detail", …}`), whose status and
//! fields [`RunError`] decides. Internal details are logged, never sent.

use std::fmt;
use std::time::Duration;

use axum::Json;
use axum::http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use forgesyte_errors::{Kib, ToolError};
use forgesyte_loader::CallError;
use forgesyte_registry::PluginLifecycleState;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::ToSchema;

use crate::wire::PluginStateJson;

/// Longest piece of a client-supplied name echoed back in a message.
const SHOWN_CHARS: usize = 128;

/// A client-supplied name as shown in messages: cut to [`SHOWN_CHARS`]
/// characters so a 10 KB path does not come back as a 10 KB message.
pub(crate) struct Shown<'a>(pub(crate) &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(SHOWN_CHARS) {
            Some((cut, _)) => write!(f, "{}…", &self.0[..cut]),
            None => f.write_str(self.0),
        }
    }
}

/// A tool error's `message`, or, when it is empty, its class and that it
/// said nothing more.
fn or_class(message: &str, error_type: Option<&str>) -> String {
    match (message.is_empty(), error_type) {
        (false, _) => message.to_owned(),
        (true, Some(class)) if !class.is_empty() => format!("{class} (no message)"),
        (true, _) => "the tool failed without a message".to_owned(),
    }
}

fn state_name(state: Option<PluginLifecycleState>) -> &'static str {
    state.map_or("not loaded", PluginLifecycleState::as_str)
}

fn reason_suffix(reason: Option<&str>) -> String {
    reason.map(|r| format!(": {r}")).unwrap_or_default()
}

/// The error body of every route but the tool run: FastAPI's shape
/// (SPEC §5), what [`ApiError`] answers for all its variants but
/// [`ApiError::Run`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong.
    pub detail: String,
}

/// A tool run that failed (400, 404, 406, 408, 413, 422, 502, 503, 504):
/// the body [`ApiError::Run`] answers, built by [`RunError::failure`].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct RunFailure {
    /// Always `false`.
    pub ok: bool,
    /// The plugin named in the path.
    pub plugin_id: String,
    /// The tool named in the path.
    pub tool_name: String,
    /// What went wrong, briefly (for a tool error: the tool's own message).
    pub error: String,
    /// Error class: `PluginNotFound`, `UnknownTool`, `PluginNotRunnable`,
    /// `MalformedBody`, `InvalidBody`, `PayloadTooLarge`, `BodyTimeout`,
    /// `InvalidArgs`, `ToolError` (or the plugin's own class),
    /// `ResultTooLarge`, `ResultTooDeep`, `AnswerTooLarge`, `NotAcceptable`,
    /// `NotStreamable`, `ToolPanic`, `ProtocolError`, `CrashError`,
    /// `Timeout`, `QueueTimeout`, `TooManyCalls`, `ServerBusy`.
    pub error_type: String,
    /// A full sentence naming the plugin and the tool.
    pub detail: String,
    /// Only for `PluginNotRunnable`: the plugin's `state` and `reason`
    /// (both present then, null where unknown).
    #[serde(flatten)]
    #[schema(value_type = NotRunnable)]
    pub not_runnable: Option<NotRunnable>,
}

/// Why a plugin cannot run tools, in the failure body of
/// `PluginNotRunnable`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
pub struct NotRunnable {
    /// The plugin's state (only for `PluginNotRunnable`; null when it is
    /// not registered).
    pub state: Option<PluginStateJson>,
    /// Why it is not runnable (only for `PluginNotRunnable`; null when no
    /// reason was recorded).
    pub reason: Option<String>,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// No plugin of that name is registered (404).
    #[error("Plugin '{}' not found{}", Shown(name), held_by_suffix(held_by.as_deref()))]
    PluginNotFound {
        /// The name asked for.
        name: String,
        /// The plugin a plugin directory of that name holds, under its
        /// manifest's own name.
        held_by: Option<String>,
    },
    /// The plugin is registered but its manifest was not valid JSON (404).
    #[error(
        "Plugin '{}' has no readable manifest (see its health for the reason)",
        Shown(name)
    )]
    ManifestUnavailable {
        /// The plugin.
        name: String,
    },
    /// The plugin has no live instance, so it has no tools to list (503).
    #[error("Plugin '{}' is {} and has no live instance{}", Shown(name), state_name(*state), reason_suffix(reason.as_deref()))]
    PluginNotRunnable {
        /// The plugin.
        name: String,
        /// Its state, if registered.
        state: Option<PluginLifecycleState>,
        /// Its reason, if any.
        reason: Option<String>,
    },
    /// A path parameter could not be read (400), such as a value of the
    /// wrong type; the message is axum's (`Invalid URL: ...`).
    #[error("{detail}")]
    BadPath {
        /// What is wrong with the path.
        detail: String,
    },
    /// No route matches the path (404).
    #[error("Not Found")]
    RouteNotFound,
    /// The route exists, but not for this method (405).
    #[error("Method Not Allowed")]
    MethodNotAllowed,
    /// A tool run failed; answered in the tool-run failure shape.
    #[error(
        "tool run of '{}' on plugin '{}' failed: {error}",
        Shown(tool),
        Shown(plugin)
    )]
    Run {
        /// The plugin named in the path.
        plugin: String,
        /// The tool named in the path.
        tool: String,
        /// What went wrong.
        #[source]
        error: RunError,
    },
    /// The admin routes are disabled because no admin token is configured
    /// (403).
    #[error(
        "Reload is disabled: set FORGESYTE_ADMIN_TOKEN (or --admin-token-file) to enable the admin routes"
    )]
    AdminDisabled,
    /// The request carries no usable `Authorization: Bearer` header (401,
    /// with `WWW-Authenticate: Bearer`).
    #[error("{detail}")]
    Unauthorized {
        /// What is missing or malformed.
        detail: String,
    },
    /// The bearer token is not the admin token (403).
    #[error("Invalid admin token")]
    Forbidden,
    /// Too many wrong admin tokens from this address lately (429, with
    /// `Retry-After`): the attempt was not checked.
    #[error("Too many invalid admin tokens from this address; retry in {retry_after_s} s")]
    TooManyAttempts {
        /// Seconds until the address may try again.
        retry_after_s: u64,
    },
    /// A reload by name of a serving plugin whose directory has no
    /// manifest any more (409, the plugin's files in conflict with its
    /// registration): moved or removed, it is left serving.
    #[error(
        "Plugin '{}' was not reloaded: {detail} (POST /v1/plugins/reload rescans)",
        Shown(name)
    )]
    PluginFilesGone {
        /// The plugin.
        name: String,
        /// Why, and what to do.
        detail: String,
    },
    /// Another load pass or reload is running (409).
    #[error("{what} is running; try again when it has finished")]
    Busy {
        /// What is running.
        what: &'static str,
    },
    /// A bug or unexpected condition in the host (500). The context is
    /// logged; the client only sees `Internal Server Error`.
    #[error("Internal Server Error")]
    Internal {
        /// What happened, for the log.
        context: String,
    },
}

/// What a 404 adds when a plugin directory of the name asked for holds a
/// plugin registered under another name (its manifest's, or, for a
/// manifest that names none, its directory's made valid): an author calls
/// the directory's name.
fn held_by_suffix(held_by: Option<&str>) -> String {
    held_by.map_or_else(String::new, |other| {
        format!(
            "; the plugin directory of that name holds plugin '{}' (the name it is registered under)",
            Shown(other)
        )
    })
}

impl ApiError {
    /// [`ApiError::PluginNotFound`] of `name`, saying which plugin a
    /// plugin directory of that name holds, if one does.
    pub(crate) fn not_found(state: &crate::state::AppState, name: String) -> ApiError {
        let held_by = state.loader().plugin_of_directory(&name);
        ApiError::PluginNotFound { name, held_by }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::PluginNotFound { .. }
            | ApiError::ManifestUnavailable { .. }
            | ApiError::RouteNotFound => StatusCode::NOT_FOUND,
            ApiError::PluginNotRunnable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::AdminDisabled | ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadPath { .. } => StatusCode::BAD_REQUEST,
            ApiError::Busy { .. } | ApiError::PluginFilesGone { .. } => StatusCode::CONFLICT,
            ApiError::Run { error, .. } => error.status(),
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body this error answers with.
    pub fn body(&self) -> Value {
        match self {
            ApiError::Run {
                plugin,
                tool,
                error,
            } => error.body(plugin, tool),
            other => json!(ErrorDetail {
                detail: other.to_string()
            }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal { context } => {
                tracing::error!(%context, "internal error answering a request");
            }
            ApiError::Run {
                plugin,
                tool,
                error: RunError::Internal { message },
            } => {
                tracing::error!(plugin = %Shown(plugin), tool = %Shown(tool), %message, "internal error running a tool");
            }
            // A plugin's fault (502) or a call past its limit (504): the
            // crash is logged where it happens, by its supervisor, with no
            // request to name; this line, in the request's span, names the
            // request, the plugin and the tool. At most one per call in
            // flight when the plugin failed (it is FAILED after: the calls
            // that follow are 503s), so no client can flood the log with it.
            ApiError::Run {
                plugin,
                tool,
                error: error @ (RunError::Fault { .. } | RunError::Timeout { .. }),
            } => {
                let error = error.to_string();
                let error = forgesyte_errors::logged(&error);
                tracing::warn!(plugin = %Shown(plugin), tool = %Shown(tool), status = status.as_u16(), "The call of tool {} failed its plugin {}: {error}", Shown(tool), Shown(plugin));
            }
            // A 503 (busy, not ready) is the client's to retry: one line per
            // request at warn level let any client flood the log. An admin
            // refusal was logged where it was made, with its address,
            // throttled (`reload::admit`).
            other => tracing::debug!(status = status.as_u16(), "{other}"),
        }
        let mut response = (status, Json(self.body())).into_response();
        // A plugin being constructed or reloaded (LOADED, or an available
        // state with no live instance yet) is runnable in a moment: say
        // when to try again, as for the other passing refusals.
        let in_a_moment = |state: &Option<PluginLifecycleState>| {
            matches!(
                state,
                Some(
                    PluginLifecycleState::Loaded
                        | PluginLifecycleState::Initialized
                        | PluginLifecycleState::Running
                )
            )
        };
        if matches!(
            &self,
            ApiError::Run {
                error: RunError::TooManyCalls { .. }
                    | RunError::NotStarted { .. }
                    | RunError::BodiesInFlight { .. }
                    | RunError::AnswersInFlight { .. }
                    | RunError::AnswerLost { .. }
                    | RunError::RunnerBusy { .. },
                ..
            }
        ) || matches!(&self, ApiError::Run { error: RunError::NotRunnable { state, .. }, .. } if in_a_moment(state))
            || matches!(&self, ApiError::PluginNotRunnable { state, .. } if in_a_moment(state))
            // A call cut off by its plugin's reload or restart: sent again,
            // it reaches the instance in its place.
            || matches!(&self, ApiError::Run { error: RunError::Interrupted { .. }, .. })
            // An admin request while another pass runs (a reload, a rescan,
            // the settling of dependents after a crash): mostly a moment.
            || matches!(&self, ApiError::Busy { .. })
        {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::TooManyAttempts { retry_after_s } = &self {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*retry_after_s));
        }
        if matches!(self, ApiError::Unauthorized { .. }) {
            // RFC 6750 §3: a 401 names the scheme the client should use.
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"forgesyte-admin\""),
            );
        }
        response
    }
}

/// How a malformed multipart body's message begins.
pub(crate) const MALFORMED_MULTIPART: &str = "malformed multipart body";
/// How the message of a multipart `args` part that is not JSON begins.
pub(crate) const MALFORMED_ARGS_PART: &str = "the 'args' part";
/// How the message of a body that could not be read begins (its chunked
/// framing broken, the connection failing): whatever its type.
pub(crate) const UNREADABLE_BODY: &str = "Failed to read the request body";

/// Why a tool run (`POST /v1/plugins/{name}/tools/{tool}/run`) failed.
///
/// Each variant fixes the status code and the `error_type` of the failure
/// body; `error` is [`RunError`]'s `Display`, `detail` a full sentence
/// naming the plugin and tool, except for [`RunError::ToolFailed`], whose
/// `detail` is the tool's own message (what the seed's server answered).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// No plugin of that name (404, `PluginNotFound`); `held_by`: the
    /// plugin a plugin directory of that name holds, under its manifest's
    /// own name.
    #[error("plugin not found")]
    PluginNotFound {
        /// That plugin's name.
        held_by: Option<String>,
    },
    /// The plugin has no tool of that name (404, `UnknownTool`).
    #[error("unknown tool")]
    UnknownTool,
    /// The plugin cannot run tools now (503, `PluginNotRunnable`).
    #[error("plugin is {} and cannot run tools", state_name(*state))]
    NotRunnable {
        /// Its state.
        state: Option<PluginLifecycleState>,
        /// Its reason, if any.
        reason: Option<String>,
    },
    /// The call reached a plugin process the host let go before it answered
    /// (a reload, a rescan, the server's stop): 503, `PluginNotRunnable`,
    /// with the plugin's state as the call ended and what happened in
    /// `reason`. Not the
    /// plugin's fault; sent again, the call reaches the instance in its
    /// place.
    #[error(
        "the call did not finish: the host stopped the plugin's process under it; send it again"
    )]
    Interrupted {
        /// The plugin's state as the call ended.
        state: Option<PluginLifecycleState>,
        /// What happened to the call.
        reason: String,
    },
    /// The body is not JSON (400, `MalformedBody`).
    #[error("{message}")]
    MalformedBody {
        /// The parser's message.
        message: String,
    },
    /// The body is JSON of the wrong shape (422, `InvalidBody`).
    #[error("{message}")]
    InvalidBody {
        /// What is wrong.
        message: String,
    },
    /// A multipart body of the wrong shape: a part without a name, two
    /// `args` parts, an argument given twice (422, `InvalidBody`).
    #[error("{message}")]
    InvalidForm {
        /// What is wrong.
        message: String,
    },
    /// The body's binary data does not fit the tool's declared binary
    /// arguments: an octet-stream body (or a stream's frame) for a tool
    /// with none or several, or one given twice (422, `InvalidBody`).
    #[error("{message}")]
    BodyMismatch {
        /// What is wrong.
        message: String,
    },
    /// A declared binary argument sent as a JSON string that is not base64
    /// (422, `InvalidArgs`): the host refused it, the tool never ran.
    #[error("argument '{name}' is not valid base64: {message}")]
    NotBase64 {
        /// The argument.
        name: String,
        /// The decoder's message.
        message: String,
    },
    /// A declared binary argument sent in JSON as something other than
    /// text (an object, an array, a number, a boolean) (422,
    /// `InvalidArgs`): the host refused it, the tool never ran.
    #[error("argument '{name}' is binary, and was sent as {found}")]
    NotBinary {
        /// The argument.
        name: String,
        /// What it was sent as: `an object`, `an array`, `a number`, `a
        /// boolean`.
        found: &'static str,
    },
    /// The body is larger than the limit (413, `PayloadTooLarge`).
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The JSON arguments hold more values than a body may (413,
    /// `PayloadTooLarge`): parsed, each costs far more than its text.
    #[error("JSON arguments of about {values} values, more than the {max} a body may hold")]
    TooManyValues {
        /// About how many values (an upper bound).
        values: usize,
        /// The most a body may hold.
        max: usize,
    },
    /// The client stopped sending the body for longer than the body read
    /// timeout (408, `BodyTimeout`).
    #[error("the request body stopped arriving; it must keep coming within the body read timeout")]
    BodyTimedOut,
    /// The body arrived slower on average than the minimum rate, after
    /// its grace (408, `BodyTimeout`).
    #[error("the request body arrived slower than {min_rate} bytes a second")]
    BodyTooSlow {
        /// The minimum rate, in bytes a second (`--body-min-rate`).
        min_rate: u64,
    },
    /// The tool rejected its arguments (422, `InvalidArgs`).
    #[error("{message}")]
    InvalidArgs {
        /// The tool's message.
        message: String,
    },
    /// The tool ran and returned an error (422; `error_type` is the
    /// plugin's own class, else `ToolError`). An empty message reads as
    /// its class (`sys.exit()` answered `""`).
    #[error("{}", or_class(message, error_type.as_deref()))]
    ToolFailed {
        /// The plugin's own error class.
        error_type: Option<String>,
        /// The plugin's message.
        message: String,
        /// The last lines of its traceback (a Python plugin's exception):
        /// logged, never answered.
        traceback: Vec<String>,
    },
    /// The tool panicked or broke the protocol; the plugin is now FAILED
    /// (502, `ToolPanic` / `ProtocolError`).
    #[error("{message}")]
    Fault {
        /// Stable error class.
        kind: String,
        /// What happened.
        message: String,
    },
    /// The tool ran past its time limit; the plugin is now FAILED (504, `Timeout`).
    #[error("{reason}")]
    Timeout {
        /// The limit it ran past.
        after: Duration,
        /// The reason recorded for the plugin.
        reason: String,
    },
    /// The call waited its time limit for its turn behind the plugin's calls
    /// in progress and never ran; the plugin is unaffected (504,
    /// `QueueTimeout`).
    #[error("{message}")]
    QueueTimeout {
        /// The limit it waited.
        after: Duration,
        /// What happened.
        message: String,
    },
    /// Every thread that runs tool calls was busy for the call's whole time
    /// limit; the call never ran and the plugin is unaffected (503,
    /// `ServerBusy`, with `Retry-After`).
    #[error("no call thread free within {}s", waited.as_secs_f64())]
    NotStarted {
        /// How long it waited.
        waited: Duration,
    },
    /// The request bodies of calls in progress fill the memory set aside for
    /// them; this call's body was not read and the call never ran (503,
    /// `ServerBusy`, with `Retry-After`).
    #[error("request bodies in progress fill their {}", Kib(*budget_kib))]
    BodiesInFlight {
        /// The memory for request bodies, in KiB.
        budget_kib: usize,
    },
    /// The tool ran, but the answers waiting to be sent to their clients
    /// fill the memory set aside for them; this one was dropped (503,
    /// `ServerBusy`, with `Retry-After`).
    #[error("answers waiting to be sent fill their {}", Kib(*budget_kib))]
    AnswersInFlight {
        /// The memory for answers, in KiB.
        budget_kib: usize,
    },
    /// The tool ran, but the host could not take its answer for want of its
    /// own resources (out of file descriptors); the plugin is unaffected
    /// (503, `ServerBusy`, with `Retry-After`).
    #[error("{message}")]
    AnswerLost {
        /// What was short.
        message: String,
    },
    /// The plugin's runner could not start a thread for the call; it never
    /// ran, the plugin is unaffected (503, `ServerBusy`, with
    /// `Retry-After`): the runner's lack, not the tool's error (it was a
    /// 422 counted against the plugin).
    #[error("{message}")]
    RunnerBusy {
        /// What the runner said.
        message: String,
    },
    /// The tool ran, but its encoded answer is larger than all the memory
    /// set aside for answers; it was dropped (422, `AnswerTooLarge`: the
    /// host's limit, where a Python runner's `ResultTooLarge` is the
    /// tool's error).
    #[error("an answer of {bytes} bytes, more than the {} for answers", Kib(*budget_kib))]
    AnswerTooLarge {
        /// The encoded answer's size.
        bytes: usize,
        /// The memory for answers, in KiB.
        budget_kib: usize,
    },
    /// A stream's tool ran, but its encoded answer is larger than a
    /// stream's answers may be (`AnswerTooLarge` in the frame's answer: the
    /// stream goes on; it was closed 1011, which blames the plugin).
    #[error("an answer of {bytes} bytes, more than a stream's {limit}")]
    StreamAnswerTooLarge {
        /// The encoded answer's size.
        bytes: usize,
        /// The most a stream's answer may hold, in bytes.
        limit: usize,
    },
    /// The plugin already has its limit of tool calls in progress; the call
    /// never ran (503, `TooManyCalls`, with `Retry-After`).
    #[error("the plugin has its limit of tool calls in progress ({limit})")]
    TooManyCalls {
        /// The limit per plugin.
        limit: usize,
        /// Of the calls in progress, the in-process ones past their time
        /// limit, still running in the plugin's code.
        abandoned: usize,
    },
    /// A bug in the host (500, `InternalError`); the message is only logged.
    #[error("Internal Server Error")]
    Internal {
        /// What happened, for the log.
        message: String,
    },
}

impl RunError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            RunError::PluginNotFound { .. } | RunError::UnknownTool => StatusCode::NOT_FOUND,
            RunError::NotRunnable { .. }
            | RunError::Interrupted { .. }
            | RunError::TooManyCalls { .. }
            | RunError::NotStarted { .. }
            | RunError::BodiesInFlight { .. }
            | RunError::AnswersInFlight { .. }
            | RunError::AnswerLost { .. }
            | RunError::RunnerBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            RunError::MalformedBody { .. } => StatusCode::BAD_REQUEST,
            RunError::InvalidBody { .. }
            | RunError::InvalidForm { .. }
            | RunError::BodyMismatch { .. }
            | RunError::NotBase64 { .. }
            | RunError::NotBinary { .. }
            | RunError::InvalidArgs { .. }
            | RunError::ToolFailed { .. }
            | RunError::AnswerTooLarge { .. }
            | RunError::StreamAnswerTooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            RunError::PayloadTooLarge { .. } | RunError::TooManyValues { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            RunError::BodyTimedOut | RunError::BodyTooSlow { .. } => StatusCode::REQUEST_TIMEOUT,
            RunError::Fault { .. } => StatusCode::BAD_GATEWAY,
            RunError::Timeout { .. } | RunError::QueueTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            RunError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error_type` field.
    pub fn error_type(&self) -> &str {
        match self {
            RunError::PluginNotFound { .. } => "PluginNotFound",
            RunError::UnknownTool => "UnknownTool",
            RunError::NotRunnable { .. } | RunError::Interrupted { .. } => "PluginNotRunnable",
            RunError::MalformedBody { .. } => "MalformedBody",
            RunError::InvalidBody { .. }
            | RunError::InvalidForm { .. }
            | RunError::BodyMismatch { .. } => "InvalidBody",
            RunError::NotBase64 { .. } | RunError::NotBinary { .. } => "InvalidArgs",
            RunError::PayloadTooLarge { .. } | RunError::TooManyValues { .. } => "PayloadTooLarge",
            RunError::BodyTimedOut | RunError::BodyTooSlow { .. } => "BodyTimeout",
            RunError::InvalidArgs { .. } => "InvalidArgs",
            RunError::ToolFailed { error_type, .. } => error_type.as_deref().unwrap_or("ToolError"),
            RunError::Fault { kind, .. } => kind,
            RunError::Timeout { .. } => "Timeout",
            RunError::QueueTimeout { .. } => "QueueTimeout",
            RunError::TooManyCalls { .. } => "TooManyCalls",
            RunError::NotStarted { .. }
            | RunError::BodiesInFlight { .. }
            | RunError::AnswersInFlight { .. }
            | RunError::AnswerLost { .. }
            | RunError::RunnerBusy { .. } => "ServerBusy",
            RunError::AnswerTooLarge { .. } | RunError::StreamAnswerTooLarge { .. } => {
                "AnswerTooLarge"
            }
            RunError::Internal { .. } => "InternalError",
        }
    }

    /// The `detail` field: a sentence naming the plugin and tool, or the
    /// tool's own message for [`RunError::ToolFailed`].
    pub fn detail(&self, plugin: &str, tool: &str) -> String {
        let (p, t) = (Shown(plugin), Shown(tool));
        match self {
            RunError::PluginNotFound { held_by } => {
                format!(
                    "Plugin '{p}' not found{}",
                    held_by_suffix(held_by.as_deref())
                )
            }
            RunError::UnknownTool => format!("Tool '{t}' not found in plugin '{p}'"),
            RunError::NotRunnable { state, reason } => format!(
                "Plugin '{p}' is {} and cannot run tools{}",
                state_name(*state),
                reason_suffix(reason.as_deref())
            ),
            RunError::Interrupted { reason, .. } => {
                format!("Tool '{t}' of plugin '{p}' did not finish: {reason}")
            }
            // A multipart body (or its `args` part) says what it is in its
            // message, and so does a body that could not be read; any other
            // malformed body was meant to be JSON.
            RunError::MalformedBody { message }
                if message.starts_with(MALFORMED_MULTIPART)
                    || message.starts_with(MALFORMED_ARGS_PART)
                    || message.starts_with(UNREADABLE_BODY) =>
            {
                format!("Request body is malformed: {message}")
            }
            RunError::MalformedBody { message } => {
                format!("Request body is not valid JSON: {message}")
            }
            RunError::InvalidBody { message } => {
                format!("Request body must be an object {{\"args\": {{...}}}}: {message}")
            }
            RunError::InvalidForm { message } => {
                format!("Multipart request body is invalid: {message}")
            }
            RunError::BodyMismatch { message } => {
                format!("Request body does not fit tool '{t}' of plugin '{p}': {message}")
            }
            RunError::NotBase64 { name, message } => format!(
                "Argument '{}' of tool '{t}' of plugin '{p}' is binary and its text is not valid base64: {message}",
                Shown(name)
            ),
            RunError::NotBinary { name, found } => format!(
                "Argument '{}' of tool '{t}' of plugin '{p}' is binary, and was sent as {found} \
                 in JSON: send its bytes as base64 text in JSON, as a file part of \
                 multipart/form-data, or as an application/octet-stream body",
                Shown(name)
            ),
            RunError::PayloadTooLarge { limit } => {
                format!("Request body is larger than the limit of {limit} bytes")
            }
            RunError::TooManyValues { values, max } => format!(
                "The JSON arguments hold about {values} values, more than the {max} a body may \
                 hold (each takes about {} bytes once parsed: the body limit divided by that; \
                 send large data as a binary argument, or raise --body-limit)",
                forgesyte_loader::json_text::PARSED_VALUE_BYTES
            ),
            RunError::BodyTimedOut => {
                "The request body stopped arriving before it was complete (body read timeout)"
                    .to_owned()
            }
            RunError::BodyTooSlow { min_rate } => format!(
                "The request body arrived slower than the minimum rate of {min_rate} bytes a second \
                 (body read timeout, then one second per {min_rate} bytes: --body-min-rate)"
            ),
            RunError::InvalidArgs { message } => {
                format!("Tool '{t}' of plugin '{p}' rejected its arguments: {message}")
            }
            // The tool's own message, as the seed's server answered an
            // exception (`detail` is `str(e)`; `error_type` names its class).
            RunError::ToolFailed {
                message,
                error_type,
                ..
            } => or_class(message, error_type.as_deref()),
            // "During", not "of": a runner's crash ends every call it had in
            // flight, and any one of them (or none) may have caused it.
            RunError::Fault { message, .. } => {
                format!(
                    "Plugin '{p}' faulted during this call of tool '{t}' and is now FAILED: \
                     {message}"
                )
            }
            // Durations as the plugins' reasons write them (`5 s`, `250 ms`).
            RunError::Timeout { after, .. } => format!(
                "Tool '{t}' of plugin '{p}' ran past its time limit of {}; the plugin is now FAILED",
                forgesyte_errors::fmt_duration(*after)
            ),
            RunError::QueueTimeout { after, .. } => format!(
                "Tool '{t}' of plugin '{p}' waited its time limit of {} for the plugin's call in progress and never ran; the plugin is unaffected",
                forgesyte_errors::fmt_duration(*after)
            ),
            RunError::NotStarted { waited } => format!(
                "Tool '{t}' of plugin '{p}' could not start within its time limit of {}: every thread that runs tool calls was busy; it did not run, the plugin is unaffected, retry later",
                forgesyte_errors::fmt_duration(*waited)
            ),
            RunError::TooManyCalls {
                limit,
                abandoned: 0,
            } => format!(
                "Plugin '{p}' has {limit} tool calls in progress, its limit; tool '{t}' did not run, retry later"
            ),
            RunError::TooManyCalls { limit, abandoned } => format!(
                "Plugin '{p}' has {limit} tool calls in progress, its limit; tool '{t}' did not run. {abandoned} of them passed their time limit and still run in the plugin's code, which cannot be stopped in process: they free their places only when they return (restart the server to end them, or run the plugin with \"isolation\": \"process\")"
            ),
            RunError::BodiesInFlight { budget_kib } => format!(
                "The request bodies of tool calls in progress fill the {} set aside for them; tool '{t}' of plugin '{p}' did not run, retry later",
                Kib(*budget_kib)
            ),
            RunError::AnswersInFlight { budget_kib } => format!(
                "Tool '{t}' of plugin '{p}' ran, but the answers waiting to be sent fill the {} set aside for them; its answer was dropped, retry later",
                Kib(*budget_kib)
            ),
            RunError::AnswerLost { message } => format!(
                "Tool '{t}' of plugin '{p}' ran, but the server could not take its answer ({message}); retry later"
            ),
            RunError::RunnerBusy { message } => {
                format!("Tool '{t}' of plugin '{p}' did not run: {message}; retry later")
            }
            RunError::AnswerTooLarge { bytes, budget_kib } => format!(
                "Tool '{t}' of plugin '{p}' ran, but its answer ({bytes} bytes as encoded) is larger than the {} set aside for answers (--answer-memory); a binary result takes less as multipart/mixed or application/octet-stream than as base64 in JSON",
                Kib(*budget_kib)
            ),
            RunError::StreamAnswerTooLarge { bytes, limit } => format!(
                "Tool '{t}' of plugin '{p}' ran, but its answer ({bytes} bytes as encoded) is larger than a stream's answers may be ({limit} bytes: twice --body-limit, at least 4 MiB); the stream goes on, and the run route takes such an answer"
            ),
            RunError::Internal { .. } => "Internal Server Error".to_owned(),
        }
    }

    /// The failure body of SPEC §5, plus `plugin_id`, `tool_name`, and for
    /// [`RunError::NotRunnable`] and [`RunError::Interrupted`] the plugin's
    /// `state` and `reason`.
    pub fn failure(&self, plugin: &str, tool: &str) -> RunFailure {
        RunFailure {
            ok: false,
            plugin_id: plugin.to_owned(),
            tool_name: tool.to_owned(),
            error: self.to_string(),
            error_type: self.error_type().to_owned(),
            detail: self.detail(plugin, tool),
            not_runnable: match self {
                RunError::NotRunnable { state, reason } => Some(NotRunnable {
                    state: state.map(PluginStateJson::from),
                    reason: reason.clone(),
                }),
                RunError::Interrupted { state, reason } => Some(NotRunnable {
                    state: state.map(PluginStateJson::from),
                    reason: Some(reason.clone()),
                }),
                _ => None,
            },
        }
    }

    /// [`RunError::failure`] as JSON.
    pub fn body(&self, plugin: &str, tool: &str) -> Value {
        json!(self.failure(plugin, tool))
    }
}

impl From<ToolError> for RunError {
    fn from(e: ToolError) -> Self {
        match e {
            ToolError::UnknownTool { .. } => RunError::UnknownTool,
            ToolError::InvalidArgs { message } => RunError::InvalidArgs { message },
            ToolError::Failed {
                error_type,
                message,
                traceback,
            } => RunError::ToolFailed {
                // A class a client can act on: one the plugin left empty
                // or wrote with a control character in it is `ToolError`.
                error_type: error_type
                    .filter(|t| !t.is_empty() && !t.chars().any(char::is_control)),
                message,
                traceback,
            },
            ToolError::TimedOut { after } => RunError::Timeout {
                after,
                reason: forgesyte_errors::PluginError::Tool(ToolError::TimedOut { after }).reason(),
            },
            e @ ToolError::QueueTimedOut { after } => RunError::QueueTimeout {
                after,
                message: e.to_string(),
            },
            ToolError::HostResources { detail } => RunError::AnswerLost { message: detail },
            e @ ToolError::RunnerOverloaded { .. } => RunError::RunnerBusy {
                message: e.to_string(),
            },
            ToolError::Panicked { message } => RunError::Fault {
                kind: "ToolPanic".into(),
                message: format!("tool panicked: {message}"),
            },
            // Without the runner's last stderr lines: they may be another
            // caller's (a plugin that prints its arguments), and this
            // answer goes to whoever made this call. The server's log has
            // them, and the plugin's status and failure journal unless
            // withheld (`--withhold-stderr`).
            ToolError::Crashed(crash) => RunError::Fault {
                kind: "CrashError".into(),
                message: if crash.stderr_tail.is_empty() {
                    crash.cause.to_string()
                } else {
                    let journal = if forgesyte_loader::process::stderr_withheld() {
                        ""
                    } else {
                        " and the plugin's failure journal"
                    };
                    format!(
                        "{}; its last stderr lines are in the server's log{journal}",
                        crash.cause
                    )
                },
            },
            other if other.is_fault() => RunError::Fault {
                kind: other.kind().into(),
                message: other.to_string(),
            },
            other => RunError::ToolFailed {
                error_type: Some(other.kind().into()),
                message: other.to_string(),
                traceback: Vec::new(),
            },
        }
    }
}

impl From<CallError> for RunError {
    fn from(e: CallError) -> Self {
        match e {
            // No state: the plugin is no longer registered (a rescan
            // removed it between the route's look-up and the call).
            CallError::NotRunnable { state: None, .. } => {
                RunError::PluginNotFound { held_by: None }
            }
            CallError::NotRunnable { state, reason, .. } => RunError::NotRunnable { state, reason },
            CallError::Interrupted { state, reason, .. } => RunError::Interrupted { state, reason },
            CallError::Tool(tool) => tool.into(),
            other => RunError::Internal {
                message: other.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner out of threads for a call answers 503 `ServerBusy` (with
    /// `Retry-After`), counted as refused: it was a 422 counted as the
    /// plugin's error.
    #[test]
    fn a_runner_out_of_threads_is_busy_not_the_tools_error() {
        let busy = RunError::from(ToolError::RunnerOverloaded {
            detail: "can't start new thread".into(),
        });
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.error_type(), "ServerBusy");
        assert_eq!(
            crate::metrics::Outcome::of_error(&busy),
            Some(crate::metrics::Outcome::rejected)
        );
    }

    /// A call that reached a plugin a rescan had just removed (no state
    /// in the registry) answers as a call to an unknown plugin: 404.
    #[test]
    fn a_call_to_a_plugin_removed_meanwhile_is_not_found() {
        let gone = RunError::from(CallError::NotRunnable {
            name: "p".into(),
            state: None,
            reason: None,
        });
        assert_eq!(gone.status(), StatusCode::NOT_FOUND);
        assert_eq!(gone.error_type(), "PluginNotFound");
        let failed = RunError::from(CallError::NotRunnable {
            name: "p".into(),
            state: Some(forgesyte_registry::PluginLifecycleState::Failed),
            reason: Some("x".into()),
        });
        assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_malformed_multipart_body_is_not_called_json() {
        let multipart = RunError::MalformedBody {
            message: format!("{MALFORMED_MULTIPART}: a part lacks its boundary"),
        };
        let detail = multipart.detail("p", "t");
        assert!(
            detail.starts_with("Request body is malformed: malformed multipart body"),
            "{detail}"
        );
        let unreadable = RunError::MalformedBody {
            message: format!("{UNREADABLE_BODY}: error reading a body from connection"),
        };
        assert!(
            unreadable
                .detail("p", "t")
                .starts_with("Request body is malformed: Failed to read the request body"),
            "{}",
            unreadable.detail("p", "t")
        );
        let json = RunError::MalformedBody {
            message: "expected value at line 1 column 1".into(),
        };
        assert!(
            json.detail("p", "t")
                .starts_with("Request body is not valid JSON"),
            "{}",
            json.detail("p", "t")
        );
    }

    /// `sys.exit()` in a tool answered `"error": ""` and `"detail": ""`.
    #[test]
    fn a_tool_error_without_a_message_names_its_class() {
        let exit = RunError::from(ToolError::Failed {
            error_type: Some("SystemExit".into()),
            message: String::new(),
            traceback: Vec::new(),
        });
        assert_eq!(exit.to_string(), "SystemExit (no message)");
        assert_eq!(exit.detail("p", "t"), "SystemExit (no message)");
        let bare = RunError::from(ToolError::Failed {
            error_type: None,
            message: String::new(),
            traceback: Vec::new(),
        });
        assert_eq!(bare.to_string(), "the tool failed without a message");
        let said = RunError::from(ToolError::Failed {
            error_type: Some("ValueError".into()),
            message: "bad".into(),
            traceback: Vec::new(),
        });
        assert_eq!(said.detail("p", "t"), "bad");
        for unusable in ["", "Value\nError", "\u{7}"] {
            let odd = RunError::from(ToolError::Failed {
                error_type: Some(unusable.into()),
                message: "m".into(),
                traceback: Vec::new(),
            });
            assert_eq!(odd.error_type(), "ToolError", "{unusable:?}");
        }
    }

    #[test]
    fn process_timeouts_answer_504_and_crashes_502() {
        let timeout = RunError::from(ToolError::TimedOut {
            after: Duration::from_secs(2),
        });
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(timeout.error_type(), "Timeout");
        let crash = RunError::from(ToolError::Crashed(forgesyte_errors::CrashError {
            cause: forgesyte_errors::CrashCause::Signal {
                name: "SIGSEGV".into(),
                number: 11,
            },
            stderr_tail: Vec::new(),
        }));
        assert_eq!(crash.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(crash.error_type(), "CrashError");
        // The runner's last stderr lines may be another caller's: this
        // caller's answer says where they are instead.
        let printed = RunError::from(ToolError::Crashed(forgesyte_errors::CrashError {
            cause: forgesyte_errors::CrashCause::Signal {
                name: "SIGSEGV".into(),
                number: 11,
            },
            stderr_tail: vec!["debug: got {'api_key': 'ALICE-SECRET'}".into()],
        }));
        let body = printed.body("p", "t").to_string();
        assert!(
            !body.contains("ALICE-SECRET")
                && body.contains("killed by signal SIGSEGV (11); its last stderr lines are in"),
            "{body}"
        );
        // Timed out waiting for its turn: a 504 that does not blame the plugin.
        let queued = RunError::from(ToolError::QueueTimedOut {
            after: Duration::from_secs(2),
        });
        assert_eq!(queued.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(queued.error_type(), "QueueTimeout");
        let detail = queued.detail("p", "t");
        assert!(
            detail.contains("never ran") && !detail.contains("FAILED"),
            "{detail}"
        );
    }

    #[test]
    fn shown_cuts_long_names_on_a_char_boundary() {
        assert_eq!(Shown("ocr").to_string(), "ocr");
        let long = "é".repeat(1000);
        let shown = Shown(&long).to_string();
        assert_eq!(shown.chars().count(), SHOWN_CHARS + 1);
        assert!(shown.ends_with('…'));
    }

    #[test]
    fn plain_errors_answer_detail_only() {
        let e = ApiError::PluginNotFound {
            name: "x".into(),
            held_by: None,
        };
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.body(), json!({"detail": "Plugin 'x' not found"}));
        assert_eq!(
            ApiError::MethodNotAllowed.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let internal = ApiError::Internal {
            context: "secret path /etc/shadow".into(),
        };
        assert_eq!(internal.body(), json!({"detail": "Internal Server Error"}));
    }

    #[test]
    fn admin_errors_answer_401_403_409_with_a_detail() {
        let cases = [
            (ApiError::AdminDisabled, 403, "Reload is disabled"),
            (
                ApiError::Unauthorized {
                    detail: "Missing header".into(),
                },
                401,
                "Missing header",
            ),
            (ApiError::Forbidden, 403, "Invalid admin token"),
            (
                ApiError::TooManyAttempts { retry_after_s: 42 },
                429,
                "Too many invalid admin tokens",
            ),
            (
                ApiError::Busy {
                    what: "The startup load pass",
                },
                409,
                "The startup load pass is running",
            ),
        ];
        for (error, status, detail) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            let body = error.body();
            assert!(
                body["detail"].as_str().unwrap().starts_with(detail),
                "{body}"
            );
            let response = error.into_response();
            assert_eq!(
                response.headers().contains_key(WWW_AUTHENTICATE),
                status == 401
            );
            // A 409 while a pass runs is a moment's wait: said.
            let retry_after = match status {
                429 => Some("42".to_owned()),
                409 => Some("1".to_owned()),
                _ => None,
            };
            assert_eq!(
                response
                    .headers()
                    .get(RETRY_AFTER)
                    .map(|v| v.to_str().unwrap().to_owned()),
                retry_after
            );
        }
    }

    #[test]
    fn tool_errors_map_to_the_spec_statuses() {
        let cases: [(ToolError, u16, &str); 5] = [
            (
                ToolError::UnknownTool {
                    plugin: "p".into(),
                    tool: "t".into(),
                },
                404,
                "UnknownTool",
            ),
            (
                ToolError::InvalidArgs {
                    message: "m".into(),
                },
                422,
                "InvalidArgs",
            ),
            (
                ToolError::Failed {
                    error_type: Some("ValueError".into()),
                    message: "m".into(),
                    traceback: Vec::new(),
                },
                422,
                "ValueError",
            ),
            (
                ToolError::Panicked {
                    message: "boom".into(),
                },
                502,
                "ToolPanic",
            ),
            (
                ToolError::Protocol { detail: "d".into() },
                502,
                "ProtocolError",
            ),
        ];
        for (tool_error, status, error_type) in cases {
            let run = RunError::from(CallError::Tool(tool_error));
            assert_eq!(run.status().as_u16(), status, "{run:?}");
            assert_eq!(run.error_type(), error_type, "{run:?}");
        }
    }

    #[test]
    fn not_runnable_body_carries_state_and_reason() {
        let run = RunError::from(CallError::NotRunnable {
            name: "p".into(),
            state: Some(PluginLifecycleState::Failed),
            reason: Some("ImportError: gone".into()),
        });
        let body = ApiError::Run {
            plugin: "p".into(),
            tool: "t".into(),
            error: run,
        }
        .body();
        assert_eq!(body["ok"], false);
        assert_eq!(body["error_type"], "PluginNotRunnable");
        assert_eq!(body["state"], "FAILED");
        assert_eq!(body["reason"], "ImportError: gone");
        assert_eq!(
            body["detail"],
            "Plugin 'p' is FAILED and cannot run tools: ImportError: gone"
        );
    }

    #[test]
    fn an_interrupted_call_says_so_and_names_the_state_it_left() {
        let run = RunError::from(CallError::Interrupted {
            name: "p".into(),
            state: Some(PluginLifecycleState::Initialized),
            reason: "the host stopped the plugin's process while this call ran".into(),
        });
        assert_eq!(run.status().as_u16(), 503);
        let body = run.body("p", "t");
        assert_eq!(body["error_type"], "PluginNotRunnable");
        assert_eq!(body["state"], "INITIALIZED");
        let error = body["error"].as_str().unwrap();
        assert!(!error.contains("cannot run tools"), "{error}");
        assert!(error.contains("send it again"), "{error}");
        assert_eq!(
            body["detail"],
            "Tool 't' of plugin 'p' did not finish: the host stopped the plugin's process \
             while this call ran"
        );
    }

    #[test]
    fn state_and_reason_are_present_only_when_not_runnable() {
        let keys = |body: &Value| -> Vec<String> {
            let mut keys: Vec<String> = body.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        let common = [
            "detail",
            "error",
            "error_type",
            "ok",
            "plugin_id",
            "tool_name",
        ];
        let body = RunError::UnknownTool.body("p", "t");
        assert_eq!(keys(&body), common);
        let body = RunError::NotRunnable {
            state: None,
            reason: None,
        }
        .body("p", "t");
        let mut expected: Vec<&str> = common.into();
        expected.extend(["reason", "state"]);
        expected.sort_unstable();
        assert_eq!(keys(&body), expected);
        assert_eq!(body["state"], Value::Null);
        assert_eq!(body["reason"], Value::Null);
        let failure: RunFailure = serde_json::from_value(body).unwrap();
        assert_eq!(failure.error_type, "PluginNotRunnable");
    }

    #[test]
    fn failure_body_has_every_spec_field() {
        let body = RunError::ToolFailed {
            error_type: None,
            message: "bad input".into(),
            traceback: vec!["  File \"plugin.py\", line 3".into()],
        }
        .body("p", "t");
        for field in [
            "ok",
            "error",
            "error_type",
            "detail",
            "plugin_id",
            "tool_name",
        ] {
            assert!(body.get(field).is_some(), "missing {field}: {body}");
        }
        assert_eq!(body["error"], "bad input");
        assert_eq!(body["error_type"], "ToolError");
        assert_eq!(body["detail"], "bad input");
    }
}
