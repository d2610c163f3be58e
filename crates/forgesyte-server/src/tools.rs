//! The tool runner: `POST /v1/plugins/{name}/tools/{tool}/run`.
//!
//! Plugin code runs on the call pool ([`crate::pool`]: hot lane threads,
//! tokio's blocking pool for slow calls), never on the async runtime, under
//! a time limit. Every outcome is recorded in the registry by
//! [`forgesyte_loader::PluginHandle::call`]; this module only decides what
//! the client sees.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use forgesyte_deps::json_type_name;
use forgesyte_loader::Isolation;

use crate::error::RunError;
use crate::state::AppState;

/// Body of a tool run. An empty body means `{"args": {}}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The tool's arguments, a JSON object (default `{}`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub args: Map<String, Value>,
}

/// A tool run that produced a result (200).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct RunSuccess {
    /// Always `true`.
    pub ok: bool,
    /// The plugin that ran the tool.
    pub plugin_id: String,
    /// The tool that ran.
    pub tool_name: String,
    /// What the tool returned.
    #[schema(value_type = Object)]
    pub result: Value,
    /// Wall time of the call as the server measured it, in milliseconds.
    pub processing_time_ms: f64,
}

/// Reads the body: empty means no arguments; otherwise it must be
/// `{"args": {...}}` (400 when not JSON, 422 when JSON of another shape,
/// 413 when larger than the limit).
pub(crate) fn parse_body(
    body: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<RunRequest, RunError> {
    let bytes = match body {
        Ok(bytes) => bytes,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(RunError::PayloadTooLarge { limit });
        }
        Err(rejection) => {
            return Err(RunError::MalformedBody {
                message: rejection.body_text(),
            });
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RunRequest::default());
    }
    // serde would take `[]` for a struct: only an object may be a request.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(match serde_json::from_slice::<Value>(&bytes) {
            Ok(value) => RunError::InvalidBody {
                message: format!("expected a JSON object, found {}", json_type_name(&value)),
            },
            Err(e) => RunError::MalformedBody {
                message: e.to_string(),
            },
        });
    }
    // One pass in the common case; a body that is not a `RunRequest` is
    // parsed again only to tell malformed JSON (400) from the wrong shape (422).
    serde_json::from_slice::<RunRequest>(&bytes).map_err(|e| {
        if e.is_data() {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(value) if !value.is_object() => RunError::InvalidBody {
                    message: format!("expected a JSON object, found {}", json_type_name(&value)),
                },
                Ok(_) => RunError::InvalidBody {
                    message: e.to_string(),
                },
                Err(e) => RunError::MalformedBody {
                    message: e.to_string(),
                },
            }
        } else {
            RunError::MalformedBody {
                message: e.to_string(),
            }
        }
    })
}

/// Runs `tool` of `plugin` with `request`'s arguments.
pub(crate) async fn run(
    state: &AppState,
    plugin: &str,
    tool: &str,
    request: RunRequest,
) -> Result<RunSuccess, RunError> {
    let registry = state.registry();
    let Some(plugin_state) = registry.get_state(plugin) else {
        return Err(RunError::PluginNotFound);
    };
    if !plugin_state.is_available() {
        let status = registry.get_status(plugin);
        return Err(RunError::NotRunnable {
            state: Some(status.as_ref().map_or(plugin_state, |s| s.state)),
            reason: status.and_then(|s| s.reason),
        });
    }
    let Some(handle) = state.loader().handle(plugin) else {
        return Err(RunError::NotRunnable {
            state: Some(plugin_state),
            reason: Some("the plugin has no live instance".into()),
        });
    };
    if !handle.has_tool(tool) {
        return Err(RunError::UnknownTool);
    }
    let limit = handle
        .call_timeout()
        .unwrap_or_else(|| state.call_timeout());
    let args = Value::Object(request.args);
    let started = Instant::now();
    let call = {
        let handle = handle.clone();
        let tool = tool.to_owned();
        state.calls().run(move || handle.call(&tool, &args))
    };
    // One owner per timeout: an isolated plugin's handle times the call out
    // itself (it kills the runner and answers `TimedOut`, a 504), so only
    // an in-process call, whose thread cannot be stopped, is timed here.
    let outcome = if handle.isolation() == Isolation::Process {
        Ok(call.await)
    } else {
        tokio::time::timeout(limit, call).await
    };
    let elapsed = started.elapsed();
    match outcome {
        Ok(Some(Ok(result))) => Ok(RunSuccess {
            ok: true,
            plugin_id: plugin.to_owned(),
            tool_name: tool.to_owned(),
            result,
            processing_time_ms: ms(elapsed),
        }),
        Ok(Some(Err(call_error))) => Err(call_error.into()),
        Ok(None) => Err(RunError::Internal {
            message: "the tool call's thread panicked in host code".into(),
        }),
        Err(_elapsed) => {
            // In-process the call's thread cannot be stopped: the plugin is
            // no longer trusted. The thread finishes (or not) in the background.
            let reason = handle.fail_timeout(tool, limit);
            Err(RunError::Timeout {
                after: limit,
                reason,
            })
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_body(text: &'static str) -> Result<Bytes, BytesRejection> {
        Ok(Bytes::from_static(text.as_bytes()))
    }

    #[test]
    fn empty_and_args_only_bodies_parse() {
        assert_eq!(parse_body(ok_body(""), 10), Ok(RunRequest::default()));
        assert_eq!(parse_body(ok_body("  \n"), 10), Ok(RunRequest::default()));
        assert_eq!(parse_body(ok_body("{}"), 10), Ok(RunRequest::default()));
        let parsed = parse_body(ok_body(r#"{"args": {"x": 1}}"#), 10).unwrap();
        assert_eq!(parsed.args.get("x"), Some(&Value::from(1)));
    }

    #[test]
    fn malformed_json_is_400_and_wrong_shape_is_422() {
        for text in ["{", "not json", r#"{"args": }"#, "{\"args\": {}} trailing"] {
            let err = parse_body(ok_body(text), 10).unwrap_err();
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{text}: {err:?}");
        }
        for text in [
            "[]",
            "42",
            r#"{"args": [1, 2]}"#,
            r#"{"args": "x"}"#,
            r#"{"args": null}"#,
            r#"{"arg": {}}"#,
        ] {
            let err = parse_body(ok_body(text), 10).unwrap_err();
            assert_eq!(
                err.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{text}: {err:?}"
            );
        }
    }
}
