//! The stream's worker: one frame at a time through the plugin
//! ([`tools::run`], the run route's own call), each answer (or the error
//! that stands for it: too large, no room) handed to the writer in order,
//! and the errors that end a stream (its plugin FAILED for good, removed,
//! no longer streamable) said as its close.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use forgesyte_registry::PluginLifecycleState;

use super::{Activity, Charged, Frame, Outbox, Outgoing, Session, close, say_close};
use crate::body::RunInput;
use crate::error::RunError;
use crate::stream::queue::FrameQueue;
use crate::tools;

/// One frame at a time through the plugin, each answer to the writer; ends
/// when the queue closes or the plugin fails.
pub(super) async fn work(
    session: &Session,
    queue: &FrameQueue<Frame>,
    out: Outbox,
    activity: &Activity,
    answered: &mut u64,
) {
    while let Some((seq, (args, charged))) = queue.pop().await {
        let started = Instant::now();
        let frame_bytes = match &charged {
            Charged::Held(bytes, _) => bytes.len(),
            Charged::Refused(_) => 0,
        };
        let result = match charged {
            Charged::Held(bytes, room) => {
                let input = RunInput {
                    args: args.map.clone(),
                    binary: Vec::new(),
                    unnamed: Some(bytes),
                };
                activity.calling(true);
                let result = tools::run(
                    &session.state,
                    &session.plugin,
                    &session.tool,
                    (input, Some(room)),
                    session.context.clone(),
                )
                .await;
                activity.calling(false);
                result
            }
            Charged::Refused(busy) => {
                tools::record_refused(&session.state, (&session.plugin, &session.tool), &busy);
                Err(busy)
            }
        };
        if queue.is_closed() {
            return;
        }
        let elapsed = started.elapsed();
        let answer = answer_to(seq, &result, elapsed, queue.dropped(), session);
        // The result (its binary results base64 strings in it) goes now:
        // only the answer's text, counted, waits for the writer below.
        let error = result.err();
        // Too big to send: the frame is answered `AnswerTooLarge` and the
        // stream goes on, as the run route answers 422 (the stream was
        // closed 1011, which blames the plugin, and the frame's answer and
        // those waiting lost, uncounted).
        let answer = if answer.len() > session.answer_limit {
            let too_big = RunError::StreamAnswerTooLarge {
                bytes: answer.len(),
                limit: session.answer_limit,
            };
            // Let go now, not at the end of this pass: it holds more than
            // a stream's answers may, and no budget counts it.
            drop(answer);
            session.state.metrics().record_dropped_answer(&too_big);
            answer_to(seq, &Err(too_big), elapsed, queue.dropped(), session)
        } else {
            answer
        };
        // The answer holds room in `--answer-memory` until it is written;
        // without room the frame is answered `ServerBusy` instead (its
        // call ran and was counted).
        let outgoing = match session.state.answer_budget().charge(answer.len()) {
            Ok(room) => Outgoing {
                text: answer,
                room: Some(room),
            },
            Err(busy) => {
                session.state.metrics().record_dropped_answer(&busy);
                let dropped = queue.dropped();
                answer_to(seq, &Err(busy), elapsed, dropped, session).into()
            }
        };
        // Counted as a run's body and answer are (per plugin only for
        // registered plugins: the label stays bounded).
        if session.state.registry().contains(&session.plugin) {
            session.state.metrics().record_bytes(
                &session.plugin,
                u64::try_from(frame_bytes).unwrap_or(u64::MAX),
                u64::try_from(outgoing.text.len()).unwrap_or(u64::MAX),
            );
        }
        if out.answers.send(outgoing).await.is_err() {
            return;
        }
        activity.touch();
        *answered += 1;
        if let Some(error) = &error
            && let Some((code, why)) = ends_stream(error)
        {
            let reason = match error {
                RunError::PluginNotFound { .. } | RunError::UnknownTool => {
                    // The plugin's own "unknown tool" is a frame's error:
                    // the stream ends only when the host no longer has it.
                    if !gone(session) {
                        continue;
                    }
                    error.detail(&session.plugin, &session.tool)
                }
                _ => error.to_string(),
            };
            let reason = format!("{why}: {}: {reason}", error.error_type());
            say_close(&out, code, &reason);
            return;
        }
        if let Some(error) = &error
            && let Some(reason) = no_longer_streamable(session, error)
        {
            say_close(&out, close::GOING_AWAY, &reason);
            return;
        }
        // FAILED through another client's call (a crash of the run route,
        // an in-process plugin's panic) and not restarted: no later frame
        // could be answered either.
        if let Some(RunError::NotRunnable {
            state: Some(PluginLifecycleState::Failed),
            reason,
        }) = &error
            && failed_for_good(session)
        {
            let reason = format!(
                "plugin failed: PluginNotRunnable: it is FAILED and not restarted: {}",
                reason.as_deref().unwrap_or("no reason recorded")
            );
            say_close(&out, close::PLUGIN_FAILED, &reason);
            return;
        }
    }
}

/// Whether the session's plugin is FAILED with no restart scheduled.
fn failed_for_good(session: &Session) -> bool {
    session
        .state
        .registry()
        .get_status(&session.plugin)
        .is_some_and(|s| s.state == PluginLifecycleState::Failed && s.next_retry_at.is_none())
}

/// The close code and reason (its start) of the errors that end a stream:
/// the plugin is FAILED (it crashed, panicked, broke the protocol or ran
/// past its time limit, or its runner was killed under this frame for
/// another call's: 1011), or the plugin or its tool is gone (a rescan or
/// reload removed it: 1001, as no later frame could ever be answered).
/// Every other error leaves the stream open.
fn ends_stream(error: &RunError) -> Option<(u16, &'static str)> {
    match error {
        RunError::Fault { .. }
        | RunError::Timeout { .. }
        | RunError::Interrupted {
            state: Some(PluginLifecycleState::Failed),
            ..
        } => Some((close::PLUGIN_FAILED, "plugin failed")),
        RunError::PluginNotFound { .. } => Some((close::GOING_AWAY, "plugin removed")),
        RunError::UnknownTool => Some((close::GOING_AWAY, "tool removed")),
        _ => None,
    }
}

/// Why the stream ends when a frame did not fit its tool
/// (`BodyMismatch`) because the tool no longer declares exactly one binary
/// argument (a reload changed it): no later frame could fit either.
fn no_longer_streamable(session: &Session, error: &RunError) -> Option<String> {
    if !matches!(error, RunError::BodyMismatch { .. }) {
        return None;
    }
    let handle = tools::live_handle(&session.state, &session.plugin, &session.tool).ok()?;
    let binary = tools::declared_binary(&handle.tools(), &session.tool).len();
    (binary != 1).then(|| {
        format!("tool no longer streamable: it declares {binary} binary arguments, not one")
    })
}

/// Whether the registry no longer has the session's plugin, or the plugin
/// no longer declares its tool.
fn gone(session: &Session) -> bool {
    matches!(
        tools::live_handle(&session.state, &session.plugin, &session.tool),
        Err(RunError::PluginNotFound { .. } | RunError::UnknownTool)
    )
}

/// An answer to a frame, borrowing the tool's result (serialised once).
#[derive(Debug, Serialize)]
struct Answer<'a> {
    seq: u64,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
    processing_time_ms: f64,
    dropped: u64,
}

/// The answer to frame `seq`.
fn answer_to(
    seq: u64,
    result: &Result<tools::RunSuccess, RunError>,
    elapsed: Duration,
    dropped: u64,
    session: &Session,
) -> String {
    let answer = match result {
        Ok(success) => Answer {
            seq,
            ok: true,
            result: Some(&success.result),
            error_type: None,
            detail: None,
            processing_time_ms: success.processing_time_ms,
            dropped,
        },
        Err(error) => {
            if let RunError::Internal { message } = error {
                tracing::error!(plugin = %crate::error::Shown(&session.plugin), %message, "internal error in a stream's tool call");
            }
            Answer {
                seq,
                ok: false,
                result: None,
                error_type: Some(error.error_type()),
                detail: Some(error.detail(&session.plugin, &session.tool)),
                processing_time_ms: tools::ms(elapsed),
                dropped,
            }
        }
    };
    // A JSON value, strings and numbers: serialising cannot fail.
    serde_json::to_string(&answer).unwrap_or_else(|e| {
        json!({"seq": seq, "ok": false, "error_type": "InternalError", "detail": e.to_string()})
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_the_protocols_fields_and_nothing_else() {
        let ok = Answer {
            seq: 3,
            ok: true,
            result: Some(&json!({"n": 1})),
            error_type: None,
            detail: None,
            processing_time_ms: 1.5,
            dropped: 2,
        };
        assert_eq!(
            serde_json::to_value(&ok).unwrap(),
            json!({"seq": 3, "ok": true, "result": {"n": 1}, "processing_time_ms": 1.5, "dropped": 2})
        );
        let failed = Answer {
            result: None,
            ok: false,
            error_type: Some("ToolError"),
            detail: Some("no".into()),
            ..ok
        };
        assert_eq!(
            serde_json::to_value(&failed).unwrap(),
            json!({"seq": 3, "ok": false, "error_type": "ToolError", "detail": "no",
                   "processing_time_ms": 1.5, "dropped": 2})
        );
    }

    #[test]
    fn faults_timeouts_and_removals_end_a_stream_and_tool_errors_do_not() {
        let failed = Some((close::PLUGIN_FAILED, "plugin failed"));
        assert_eq!(
            ends_stream(&RunError::Fault {
                kind: "CrashError".into(),
                message: "SIGSEGV".into()
            }),
            failed
        );
        assert_eq!(
            ends_stream(&RunError::Timeout {
                after: Duration::from_secs(1),
                reason: "slow".into()
            }),
            failed
        );
        assert_eq!(
            ends_stream(&RunError::PluginNotFound { held_by: None }),
            Some((close::GOING_AWAY, "plugin removed"))
        );
        assert_eq!(
            ends_stream(&RunError::UnknownTool),
            Some((close::GOING_AWAY, "tool removed"))
        );
        for kept in [
            RunError::ToolFailed {
                error_type: None,
                message: "no".into(),
                traceback: Vec::new(),
            },
            RunError::InvalidArgs {
                message: "no".into(),
            },
            RunError::TooManyCalls {
                limit: 1,
                abandoned: 0,
            },
            RunError::NotRunnable {
                state: None,
                reason: None,
            },
        ] {
            assert_eq!(ends_stream(&kept), None, "{kept:?}");
        }
    }
}
