//! A constructed plugin in a runner process: its calls (one request frame
//! each, attachments inline or shared, a time-out that kills the runner)
//! and what a call gets when the runner ends. Starting the runner and
//! constructing the plugin are the importer's (`super`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_errors::{PluginError, ToolError};
use forgesyte_protocol::wire::{Response, capability};
use parking_lot::Mutex;

use super::child::{Child, KillReason};
use super::spares;
use super::transport::{ATOMIC_FRAME, Reply, TrySend};
use super::wire_error::WireErrorExt;
use crate::CallContext;
use crate::host::{
    AsyncCall, AsyncKill, CallOutput, ExitCallback, PluginInstance, ToolInfo,
    on_blocking_pool_within,
};

/// A plugin instance in a runner process. Dropping it stops the process
/// (asked first, killed after a grace).
#[derive(Debug)]
pub struct ProcessInstance {
    pub(super) child: Child,
    pub(super) tools: Arc<[ToolInfo]>,
    pub(super) call_timeout: Duration,
    /// Held around each call when the runner runs one call at a time;
    /// waited for at most the call timeout.
    pub(super) serial: Option<Mutex<()>>,
}

impl ProcessInstance {
    /// The runtime the runner announced (`native`, `python`, …) and its
    /// version.
    pub fn runtime(&self) -> (&str, &str) {
        let hello = self.child.hello();
        (&hello.runtime, &hello.runtime_version)
    }

    /// The sandbox its runner reported (`filesystem`, `network`, `env`:
    /// what is enforced, or `unconfined: why`); `None` when it was started
    /// unconfined.
    pub fn confinement(&self) -> Option<&std::collections::BTreeMap<String, String>> {
        self.child.hello().confinement.as_ref()
    }

    /// Runs `tool` with the JSON `args` and binary `attachments`, placed at
    /// the JSON Pointers of `pointers` (see `PROTOCOL.md`). The result's own
    /// attachments come back as base64 strings at their places, the
    /// representation of bytes in JSON answers ([`Self::call_output`] keeps
    /// them as bytes).
    pub fn call_with(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
    ) -> Result<Vec<u8>, ToolError> {
        self.call_in(tool, args, attachments, &CallContext::default())
    }

    /// [`call_with`](Self::call_with) with the call's `context` (request
    /// id, `traceparent`), sent in the call's `context` field unless empty.
    pub fn call_in(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
        context: &CallContext,
    ) -> Result<Vec<u8>, ToolError> {
        self.call_output(tool, args, attachments, context)?
            .into_json()
    }

    /// [`call_in`](Self::call_in) with the result's attachments kept as
    /// bytes beside the JSON: slices of the answer frame, shared, not
    /// copied. A count of pointers that differs from the frame's count of
    /// attachments is a protocol error.
    pub fn call_output(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
        context: &CallContext,
    ) -> Result<CallOutput, ToolError> {
        check_args(args)?;
        let hello = self.child.hello();
        if !attachments.is_empty() && !hello.can(capability::ATTACHMENTS) {
            return Err(ToolError::InvalidArgs {
                message: format!(
                    "the plugin's runner ({} {}) does not accept binary attachments",
                    hello.runtime, hello.runtime_version
                ),
            });
        }
        let bytes: Vec<&[u8]> = attachments.iter().map(|(_, b)| *b).collect();
        // A runner that did not announce concurrent calls gets one at a
        // time: queued in the pipe, a call's timeout would run while it
        // waits behind another. The wait for the turn is bounded by the
        // call's timeout too; past it the call fails alone, never sent. It
        // is not `TimedOut` (a fault: the process is killed): the runner is
        // busy with another call, which has a deadline of its own.
        let _one_at_a_time = match &self.serial {
            None => None,
            Some(serial) => match serial.try_lock_for(self.call_timeout) {
                Some(turn) => Some(turn),
                None => {
                    return Err(ToolError::QueueTimedOut {
                        after: self.call_timeout,
                    });
                }
            },
        };
        let head = call_head(tool, attachments, context);
        let reply = self
            .child
            .request(head, &[args, b"}"], &bytes, self.call_timeout);
        if matches!(reply, Err(None)) {
            self.child
                .kill_timed_out(self.timeout_of(tool), PluginError::Timeout);
        }
        self.answer(reply)
    }

    /// Whether [`call_awaited`](Self::call_awaited) takes this call (of no
    /// attachments) without a thread: the runner takes several calls at
    /// once, and the request frame can be written whole at once.
    fn awaits(&self, tool: &str, args: &[u8], context: &CallContext) -> bool {
        // The head with the longest id there is, the length's fields, `}`.
        let frame = 12 + call_head(tool, &[], context)(u64::MAX).len() + args.len() + 1;
        self.serial.is_none() && frame <= ATOMIC_FRAME
    }

    /// [`call_output`](Self::call_output) of a call without attachments,
    /// awaited: the request written without blocking (another caller
    /// writing, or a pipe without room, is waited out by the task, within
    /// the call timeout), the answer awaited; a runner killed past the call
    /// timeout, or found with its pipe closed, is awaited dead. A call it
    /// cannot take so ([`Self::awaits`]) is made on tokio's blocking pool
    /// ([`Self::on_thread`]). It must be polled inside a tokio runtime
    /// whose timers are enabled.
    async fn call_awaited(
        self: Arc<Self>,
        tool: String,
        args: Vec<u8>,
        context: CallContext,
    ) -> Result<CallOutput, ToolError> {
        /// How long a task yields between tries while another caller
        /// writes, before it sleeps between them.
        const YIELDING: Duration = Duration::from_micros(200);
        if !self.awaits(&tool, &args, &context) {
            return self.on_thread(tool, args, context).await;
        }
        check_args(&args)?;
        let deadline = Instant::now().checked_add(self.call_timeout);
        let mut busy_since = None;
        let sent = loop {
            match self
                .child
                .try_send(call_head(&tool, &[], &context), &[&args, b"}"])
            {
                TrySend::Sent(sent) => break Some(sent),
                TrySend::Closed(Some(report)) => return Err(tool_crash(&report)),
                TrySend::Closed(None) => {
                    let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    let report = self.child.closed_report_awaited(left).await;
                    return Err(tool_crash(&crate::host::ExitReport::for_an_unsent_call(
                        report,
                    )));
                }
                // Never for a call that `awaits` allowed.
                TrySend::TooLarge => return self.on_thread(tool, args, context).await,
                TrySend::Busy => {
                    let now = Instant::now();
                    if deadline.is_some_and(|d| now >= d) {
                        break None;
                    }
                    if now.duration_since(*busy_since.get_or_insert(now)) < YIELDING {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            }
        };
        let reply = match sent {
            Some(sent) => self.child.wait(sent, deadline).await,
            None => Err(None),
        };
        if matches!(reply, Err(None)) {
            // Killed, its death processed before the call returns, as for
            // a blocked caller.
            self.child
                .kill_timed_out_awaited(self.timeout_of(&tool), PluginError::Timeout)
                .await;
        }
        self.answer(reply)
    }

    /// The call made on tokio's blocking pool, if a thread of it takes it
    /// within the call timeout; else never made (`QueueTimedOut`), as a
    /// call the server's pool cannot start.
    async fn on_thread(
        self: Arc<Self>,
        tool: String,
        args: Vec<u8>,
        context: CallContext,
    ) -> Result<CallOutput, ToolError> {
        let limit = self.call_timeout;
        let call = move || self.call_output(&tool, &args, &[], &context);
        match on_blocking_pool_within(limit, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ToolError::QueueTimedOut { after: limit }),
        }
    }

    /// The time limit a call of `tool` passed, which kills the runner.
    fn timeout_of(&self, tool: &str) -> forgesyte_errors::TimeoutError {
        crate::manifest::Limits::call_timed_out(tool, self.call_timeout)
    }

    /// What a call's reply means for its caller (`Err(None)`: none came
    /// within the call timeout, and the runner was killed for it).
    fn answer(
        &self,
        reply: Result<Reply, Option<Arc<crate::host::ExitReport>>>,
    ) -> Result<CallOutput, ToolError> {
        match reply {
            Ok(Reply::Answer(
                Response::Result {
                    result,
                    attachments,
                    ..
                },
                frame,
            )) => with_attachments(result.get(), attachments, frame),
            Ok(Reply::Answer(Response::ToolFailed { error, .. }, _)) => Err(error.into_tool()),
            Ok(Reply::Answer(other, _)) => Err(ToolError::Protocol {
                detail: format!(
                    "unexpected '{}' answer to a tool call",
                    forgesyte_protocol::wire::response_kind(&other)
                ),
            }),
            Ok(Reply::Greeting(_)) => Err(ToolError::Protocol {
                detail: "a second greeting".into(),
            }),
            Ok(Reply::Died(report)) | Err(Some(report)) => Err(tool_crash(&report)),
            Ok(Reply::Unreceived(detail)) => Err(ToolError::HostResources { detail }),
            Err(None) => Err(ToolError::TimedOut {
                after: self.call_timeout,
            }),
        }
    }
}

/// The arguments of a call, refused unless JSON.
fn check_args(args: &[u8]) -> Result<(), ToolError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(args)
        .map(drop)
        .map_err(|_| ToolError::InvalidArgs {
            message: "the arguments are not JSON".into(),
        })
}

/// A call request's header up to its `args` (which follow it, then `}`),
/// given its id.
fn call_head<'a>(
    tool: &'a str,
    attachments: &'a [(&str, &[u8])],
    context: &'a CallContext,
) -> impl FnOnce(u64) -> Vec<u8> + 'a {
    move |id: u64| {
        let mut head = format!(r#"{{"op":"call","id":{id},"tool":"#).into_bytes();
        // A string always serialises.
        let _ = serde_json::to_writer(&mut head, tool);
        if !attachments.is_empty() {
            head.extend_from_slice(br#","attachments":"#);
            let pointers: Vec<&str> = attachments.iter().map(|(p, _)| *p).collect();
            let _ = serde_json::to_writer(&mut head, &pointers);
        }
        if !context.is_empty() {
            head.extend_from_slice(br#","context":"#);
            // Strings only: always serialises.
            let _ = serde_json::to_writer(&mut head, context);
        }
        head.extend_from_slice(br#","args":"#);
        head
    }
}

/// A result's JSON and its attachments as shared slices of `frame`.
fn with_attachments(
    result: &str,
    pointers: Vec<String>,
    frame: forgesyte_protocol::wire::Frame,
) -> Result<CallOutput, ToolError> {
    if pointers.len() != frame.attachment_count() {
        return Err(ToolError::Protocol {
            detail: format!(
                "{} attachment places for {} attachments",
                pointers.len(),
                frame.attachment_count()
            ),
        });
    }
    let json = result.as_bytes().to_vec();
    if pointers.is_empty() {
        return Ok(CallOutput::json(json));
    }
    let frame = Arc::new(frame);
    let binary = pointers
        .into_iter()
        .enumerate()
        .map(|(index, pointer)| {
            let part = FramePart {
                frame: Some(Arc::clone(&frame)),
                index,
            };
            (pointer, bytes::Bytes::from_owner(part))
        })
        .collect();
    Ok(CallOutput { json, binary })
}

/// Attachment `index` of a shared frame, as bytes that own (a share of)
/// the frame.
struct FramePart {
    /// `None` only while it drops.
    frame: Option<Arc<forgesyte_protocol::wire::Frame>>,
    index: usize,
}

impl AsRef<[u8]> for FramePart {
    fn as_ref(&self) -> &[u8] {
        self.frame
            .as_deref()
            .and_then(|frame| frame.attachment(self.index))
            .unwrap_or_default()
    }
}

impl Drop for FramePart {
    /// The last part of a frame drops the frame where that costs least
    /// ([`spares::drop_frame`]): an HTTP answer's bytes are let go on the
    /// async runtime's threads.
    fn drop(&mut self) {
        if let Some(frame) = self.frame.take().and_then(|f| Arc::try_unwrap(f).ok()) {
            spares::drop_frame(frame);
        }
    }
}

impl PluginInstance for ProcessInstance {
    fn tools(&self) -> &[ToolInfo] {
        &self.tools
    }

    fn shared_tools(&self) -> Arc<[ToolInfo]> {
        Arc::clone(&self.tools)
    }

    fn confinement(&self) -> Option<std::collections::BTreeMap<String, String>> {
        ProcessInstance::confinement(self).cloned()
    }

    fn call(&self, tool: &str, args: &[u8]) -> Result<Vec<u8>, ToolError> {
        ProcessInstance::call_with(self, tool, args, &[])
    }

    fn call_with(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
    ) -> Result<Vec<u8>, ToolError> {
        ProcessInstance::call_with(self, tool, args, attachments)
    }

    fn call_output(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
        context: &CallContext,
    ) -> Result<CallOutput, ToolError> {
        ProcessInstance::call_output(self, tool, args, attachments, context)
    }

    fn takes_binary(&self) -> bool {
        self.child.hello().can(capability::ATTACHMENTS)
    }

    fn awaitable(&self, tool: &str, args: &[u8], context: &CallContext) -> bool {
        self.awaits(tool, args, context)
    }

    fn call_async(self: Arc<Self>, tool: &str, args: Vec<u8>, context: &CallContext) -> AsyncCall {
        Box::pin(self.call_awaited(tool.to_owned(), args, context.clone()))
    }

    fn stop(&self) {
        // Dropping the last owner of the child stops it; before that, ask
        // it to exit (it reads the end of its input) with the same grace.
        self.child.stop();
    }

    fn wait_stopped(&self, timeout: Duration) -> bool {
        self.child.wait_dead(timeout).is_some()
    }

    fn pid(&self) -> Option<u32> {
        self.child.live_pid()
    }

    fn on_exit(&self, callback: ExitCallback) -> bool {
        self.child.on_exit(callback);
        true
    }

    fn kill(&self, reason: &str) -> bool {
        self.child.kill_and_wait(KillReason::host(reason));
        true
    }

    fn kill_async(self: Arc<Self>, reason: String) -> AsyncKill {
        Box::pin(async move {
            self.child.kill_and_await(KillReason::host(&reason)).await;
            true
        })
    }
}

/// What a call in flight gets when its runner ended: the crash, or, for a
/// runner the host let go (its report carries no crash), `Stopped`.
fn tool_crash(report: &crate::host::ExitReport) -> ToolError {
    match &report.crash {
        Some(crash) => ToolError::Crashed(crash.clone()),
        None => ToolError::Stopped {
            reason: report.reason.clone(),
            reached: !report.unsent,
        },
    }
}
