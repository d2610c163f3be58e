//! The tool runner: `POST /v1/plugins/{name}/tools/{tool}/run`.
//!
//! Plugin code runs on the call pool ([`crate::pool`]: hot lane threads,
//! tokio's blocking pool for slow calls), never on the async runtime, under
//! a time limit. Every outcome is recorded in the registry by
//! [`forgesyte_loader::PluginHandle::call`]; this module only decides what
//! the client sees.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::response::{IntoResponse as _, Response};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use forgesyte_loader::{CallContext, Isolation, PluginHandle, ToolOutput};

use crate::arg_schema::binary_arguments;
use crate::base64_arg::decode_in_place;
use crate::body::RunInput;
use crate::error::{ApiError, RunError};
use crate::metrics::{Outcome, UNKNOWN_TOOL};
use crate::state::AppState;

/// A tool run that produced a result (200).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct RunSuccess {
    /// Always `true`.
    pub ok: bool,
    /// The plugin that ran the tool.
    pub plugin_id: String,
    /// The tool that ran.
    pub tool_name: String,
    /// What the tool returned: any JSON value (an object, an array, a
    /// string, a number, a boolean or null).
    #[schema(value_type = Value)]
    pub result: Value,
    /// Wall time of the call as the server measured it, in milliseconds.
    pub processing_time_ms: f64,
}

/// The context a tool call is made in: the request's id (`x-request-id`,
/// set by the router's request-id layer when the client sent none) and its
/// W3C `traceparent` when valid (an invalid one is dropped, never an
/// error). Header values that are not visible ASCII are left out.
pub(crate) fn call_context(headers: &axum::http::HeaderMap) -> CallContext {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    CallContext::new(text("x-request-id"), text("traceparent"))
}

/// Runs `tool` of `plugin` with `input`'s arguments, for a request whose
/// context (request id, `traceparent`) is `context`, and counts the call in
/// the metrics when the plugin is registered and the tool is one it offers
/// (or it cannot be asked: see [`crate::metrics::UNKNOWN_TOOL`]), so every
/// label value names something that exists. Binary results are in the
/// result as base64 strings at their places. The stream route's entry:
/// `room` is its frame's share of `--body-memory`, held until the plugin
/// returns.
pub(crate) async fn run(
    state: &AppState,
    plugin: &str,
    tool: &str,
    (input, room): (RunInput, Option<crate::budget::CallRoom>),
    context: CallContext,
) -> Result<RunSuccess, RunError> {
    run_output(state, plugin, tool, input, context, room)
        .await
        .map(|(success, binary)| crate::answer::with_base64(success, binary))
}

/// [`run`] with the binary results kept as bytes beside the success, whose
/// result holds `null` at their places: `(pointer, bytes)`, in the
/// plugin's order, shared with the plugin's own buffers (no copy).
pub(crate) async fn run_output(
    state: &AppState,
    plugin: &str,
    tool: &str,
    input: RunInput,
    context: CallContext,
    room: Option<crate::budget::CallRoom>,
) -> Result<(RunSuccess, Vec<(String, Bytes)>), RunError> {
    let mut facts = CallFacts::default();
    let result = run_unrecorded(state, plugin, tool, (input, room), context, &mut facts).await;
    record(state, (plugin, tool), &result, &facts);
    if let Err(RunError::ToolFailed {
        error_type,
        message,
        traceback,
    }) = &result
        && !traceback.is_empty()
    {
        log_raised((plugin, tool), error_type.as_deref(), message, traceback);
    }
    result
}

/// A tool that raised an exception (a Python plugin's): its traceback is
/// for the plugin's author, not the client (it names files and lines), so
/// the log says it, in the request's span. The first of each plugin in a
/// minute at WARN, the rest at DEBUG: a client sending bad input in a loop
/// cannot flood the log.
fn log_raised(
    (plugin, tool): (&str, &str),
    error_type: Option<&str>,
    message: &str,
    traceback: &[String],
) {
    static RAISED: crate::throttle::Keyed = crate::throttle::Keyed::new(Duration::from_secs(60));
    let warn = RAISED.warn_now(plugin);
    if !warn && !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let (plugin, tool) = (crate::error::Shown(plugin), crate::error::Shown(tool));
    let error_type = error_type.unwrap_or("Exception");
    // The client's answer has the message whole (up to the runner's 64 Ki
    // characters); one log line needs its start.
    let message = forgesyte_errors::logged(message);
    let folded = traceback.join(" | ");
    let folded = forgesyte_errors::logged(&folded);
    if warn {
        tracing::warn!(plugin = %plugin, tool = %tool, traceback = %folded, "Tool {tool} of plugin {plugin} raised {error_type}: {message} (its next ones this minute are logged at debug level)");
    } else {
        tracing::debug!(plugin = %plugin, tool = %tool, traceback = %folded, "Tool {tool} of plugin {plugin} raised {error_type}: {message}");
    }
}

/// Counts a finished call in the metrics (a registered plugin's only).
fn record<T>(
    state: &AppState,
    (plugin, tool): (&str, &str),
    result: &Result<T, RunError>,
    facts: &CallFacts,
) {
    record_outcome(state, (plugin, tool), Outcome::of(result), facts);
}

/// Counts a call refused before it was made: its body could not be read
/// or parsed, or found no room (a stream's frame too).
pub(crate) fn record_refused(state: &AppState, (plugin, tool): (&str, &str), error: &RunError) {
    let facts = CallFacts::default();
    record_outcome(state, (plugin, tool), Outcome::of_error(error), &facts);
}

fn record_outcome(
    state: &AppState,
    (plugin, tool): (&str, &str),
    outcome: Option<Outcome>,
    facts: &CallFacts,
) {
    if let Some(outcome) = outcome
        && state.registry().contains(plugin)
    {
        let tool = if facts.tool_known || declares_tool(state, plugin, tool) {
            tool
        } else {
            UNKNOWN_TOOL
        };
        state
            .metrics()
            .record_call(plugin, tool, outcome, facts.elapsed);
    }
}

/// What [`run_unrecorded`] learnt on its way, for the metrics.
#[derive(Debug, Default)]
struct CallFacts {
    /// The plugin's live instance offers the tool.
    tool_known: bool,
    /// Wall time of the plugin call, when it was made.
    elapsed: Option<Duration>,
}

/// Whether `plugin` offers `tool` by its live instance, else (none: a
/// reload, a failed one) by its last instance's tools or its manifest's.
fn declares_tool(state: &AppState, plugin: &str, tool: &str) -> bool {
    if let Some(offered) = state.loader().offers_tool(plugin, tool) {
        return offered;
    }
    state
        .loader()
        .manifest(plugin)
        .is_some_and(|manifest| manifest_declares(&manifest, tool))
}

/// Whether a manifest's `tools` names `tool`, in any shape the Python
/// runner reads them in: a list of tools with `id` (else `name`) or of
/// bare ids, or an object of id → tool.
fn manifest_declares(manifest: &Value, tool: &str) -> bool {
    match manifest.get("tools") {
        Some(Value::Object(tools)) => tools.contains_key(tool),
        Some(Value::Array(tools)) => tools.iter().any(|t| match t {
            Value::String(id) => id == tool,
            Value::Object(t) => {
                t.get("id")
                    .or_else(|| t.get("name"))
                    .and_then(Value::as_str)
                    == Some(tool)
            }
            _ => false,
        }),
        _ => false,
    }
}

async fn run_unrecorded(
    state: &AppState,
    plugin: &str,
    tool: &str,
    (input, room): (RunInput, Option<crate::budget::CallRoom>),
    context: CallContext,
    facts: &mut CallFacts,
) -> Result<(RunSuccess, Vec<(String, Bytes)>), RunError> {
    let handle = live_handle(state, plugin, tool)?;
    facts.tool_known = true;
    // Held by the call until the plugin returns (a client that hangs up
    // does not free it): a flood of calls to one slow plugin queues at
    // most this many, and the rest answer 503 at once.
    let slot = state.begin_call(plugin)?;
    let abandoner = slot.abandoner();
    let limit = handle
        .call_timeout()
        .unwrap_or_else(|| state.call_timeout());
    let tools = handle.tools();
    let mut input = input;
    if !input.binary.is_empty()
        && let Some(info) = tools.iter().find(|t| t.id == tool)
    {
        crate::arg_schema::form_fields(
            &mut input.binary,
            &mut input.args,
            &info.input_schema,
            crate::body::max_json_values(state.body_limit()),
        )?;
    }
    let declared = declared_binary(&tools, tool);
    let (args, attachments) = arguments(input, &declared, handle.takes_binary())?;
    let started = Instant::now();
    let start = Start::default();
    let ticket = forgesyte_loader::CallTicket::new();
    let _unstarted = CancelUnstarted(start.clone());
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Instant>();
    let call = {
        let handle = handle.clone();
        let tool = tool.to_owned();
        let start = start.clone();
        let ticket = ticket.clone();
        // The request's span goes with the call to the pool's thread: the
        // host's lines logged there (a plugin marked FAILED, ...) carry the
        // request id.
        let span = tracing::Span::current();
        let pool = state.calls().clone();
        // A call to a runner process without binary arguments, small
        // enough to be written whole at once, is written to its pipe and
        // its answer awaited in this task: no thread is handed it or
        // blocked on it.
        let awaited = if attachments.is_empty() {
            handle.awaitable(&tool, &args, &context)
        } else {
            None
        };
        Box::pin(async move {
            if let Some(awaited) = awaited {
                use futures_util::FutureExt as _;
                use tracing::Instrument as _;
                let call = async move {
                    let _slot = slot;
                    let _room = room;
                    if !start.begin() {
                        return None;
                    }
                    let _ = started_tx.send(Instant::now());
                    Some(
                        handle
                            .call_ticketed_async(&tool, awaited, &context, &ticket)
                            .await,
                    )
                };
                // A panic of host code answers as on the pool's threads.
                return std::panic::AssertUnwindSafe(call.instrument(span))
                    .catch_unwind()
                    .await
                    .ok();
            }
            pool.run(move || {
                // Both held until the plugin returns: its slot, and the
                // room of its request body (whose bytes the call holds).
                let _slot = slot;
                let _room = room;
                if !start.begin() {
                    return None; // its request ended before it started
                }
                let _ = started_tx.send(Instant::now());
                span.in_scope(|| {
                    let refs: Vec<(&str, &[u8])> = attachments
                        .iter()
                        .map(|(pointer, bytes)| (pointer.as_str(), &bytes[..]))
                        .collect();
                    Some(handle.call_ticketed(&tool, &args, &refs, &context, &ticket))
                })
            })
            .await
        })
    };
    // The call is watched in this request's task; if the request ends
    // first (a client that hung up), the rest of the watch goes on in a
    // task of its own (`FinishOnDrop`), so that what follows holds
    // either way: the time limit counts from the call's start (time spent
    // waiting for a thread, every call thread busy, is the server's, never
    // the plugin's); a call that could not start within its limit never
    // runs and answers 503, the plugin unaffected; an in-process call past
    // its limit fails its plugin. (Polling `call` is what queues it.) No
    // task is spawned for a request that waits for its answer.
    let watch = {
        let start = start.clone();
        let handle = handle.clone();
        let tool = tool.to_owned();
        async move {
            let timed = (&handle, &ticket, &abandoner);
            watch_call(call, started_rx, &start, timed, &tool, limit).await
        }
    };
    let orphaned = {
        let (state, plugin, tool) = (state.clone(), plugin.to_owned(), tool.to_owned());
        // Its request ended first: the call is counted here, as it would
        // have been there.
        move |ended| {
            let mut facts = CallFacts {
                tool_known: true,
                elapsed: None,
            };
            let result = conclude(ended, (&plugin, &tool), (started, limit), &mut facts);
            record(&state, (&plugin, &tool), &result, &facts);
        }
    };
    let ended = FinishOnDrop::new(watch, orphaned).await;
    conclude(ended, (plugin, tool), (started, limit), facts)
}

/// What a watched call's end means for its request: the answer, or why
/// there is none.
fn conclude(
    ended: Ended,
    (plugin, tool): (&str, &str),
    (started, limit): (Instant, Duration),
    facts: &mut CallFacts,
) -> Result<(RunSuccess, Vec<(String, Bytes)>), RunError> {
    let outcome = match ended {
        Ended::Ran(outcome) => outcome,
        Ended::NotStarted => {
            facts.elapsed = Some(started.elapsed());
            return Err(RunError::NotStarted { waited: limit });
        }
    };
    let elapsed = started.elapsed();
    facts.elapsed = Some(elapsed);
    match outcome.map(Option::flatten) {
        Ok(Some(Ok(output))) => Ok((
            RunSuccess {
                ok: true,
                plugin_id: plugin.to_owned(),
                tool_name: tool.to_owned(),
                result: output.result,
                processing_time_ms: ms(elapsed),
            },
            output.binary,
        )),
        Ok(Some(Err(call_error))) => Err(call_error.into()),
        Ok(None) => Err(RunError::Internal {
            message: "the tool call's thread panicked in host code".into(),
        }),
        Err(reason) => Err(RunError::Timeout {
            after: limit,
            reason,
        }),
    }
}

/// What the pool answers for one call: `None` if host code panicked, `Some(None)`
/// if it was cancelled before it started.
type Answer = Option<Option<Result<ToolOutput, forgesyte_loader::CallError>>>;

/// How a watched call ended.
enum Ended {
    /// It ran (or failed to): its answer, or the reason its plugin was
    /// marked FAILED for running past its limit.
    Ran(Result<Answer, String>),
    /// No thread started it within its limit; it never runs.
    NotStarted,
}

/// Waits for `call` (queued by being polled) to start, then for its answer
/// within `limit` from its start: see `run_unrecorded`.
async fn watch_call(
    mut call: std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>>,
    mut started_rx: tokio::sync::oneshot::Receiver<Instant>,
    start: &Start,
    (handle, ticket, abandoner): (
        &PluginHandle,
        &forgesyte_loader::CallTicket,
        &crate::slots::Abandoner,
    ),
    tool: &str,
    limit: Duration,
) -> Ended {
    let waited = tokio::time::sleep(limit);
    tokio::pin!(waited);
    let mut finished = None;
    // The sender goes with the call's closure: dropped unsent, the call
    // never started (its request ended first, or the pool let it go).
    let began = loop {
        tokio::select! {
            biased;
            began = &mut started_rx => match began {
                Ok(began) => break Some(began),
                Err(_) => return Ended::NotStarted,
            },
            out = &mut call, if finished.is_none() => finished = Some(out),
            () = &mut waited, if finished.is_none() => break None,
        }
    };
    // The loop left at the end of the wait (never once `call` finished) or
    // of `started_rx`, which is not polled again after its end.
    let began = match began {
        Some(began) => began,
        None if start.cancel() => return Ended::NotStarted,
        // It started just as the wait ended, or its request ended and
        // cancelled it.
        None => match started_rx.await {
            Ok(began) => began,
            Err(_) => return Ended::NotStarted,
        },
    };
    if let Some(out) = finished {
        return Ended::Ran(Ok(out));
    }
    // One owner per timeout: an isolated plugin's handle times the call out
    // itself (it kills the runner and answers `TimedOut`, a 504), so only
    // an in-process call, whose thread cannot be stopped, is timed here.
    if handle.isolation() == Isolation::Process {
        return Ended::Ran(Ok(call.await));
    }
    // The same timer, moved to the call's deadline (one timer per call).
    waited
        .as_mut()
        .reset(tokio::time::Instant::from_std(began) + limit);
    let in_time = tokio::select! {
        biased;
        out = &mut call => Some(out),
        () = &mut waited => None,
    };
    Ended::Ran(match in_time {
        Some(out) => Ok(out),
        // The call's thread cannot be stopped: the plugin is no longer
        // trusted. The thread finishes (or not) in the background.
        None => match handle.fail_timeout(tool, limit, ticket) {
            Some(reason) => {
                // It keeps its slot while it runs on; counted apart.
                abandoner.abandon();
                Err(reason)
            }
            // It returned just as its time ran out: its answer stands.
            None => Ok(call.await),
        },
    })
}

/// Whether a queued call has started: it starts only if its request has
/// not ended (a client that hung up), and is cancelled only if it has not
/// started. Dropped with its request, it cancels a call not yet started.
#[derive(Debug, Default, Clone)]
struct Start(std::sync::Arc<std::sync::atomic::AtomicU8>);

impl Start {
    const PENDING: u8 = 0;
    const STARTED: u8 = 1;
    const CANCELLED: u8 = 2;

    fn moved(&self, from: u8, to: u8) -> bool {
        use std::sync::atomic::Ordering;
        self.0
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// On the call's thread: whether it may run.
    fn begin(&self) -> bool {
        self.moved(Self::PENDING, Self::STARTED)
    }

    /// Whether the call was cancelled before it started.
    fn cancel(&self) -> bool {
        self.moved(Self::PENDING, Self::CANCELLED)
    }
}

/// Cancels the call of a request that ends (dropped) before it started.
struct CancelUnstarted(Start);

impl Drop for CancelUnstarted {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A future run as part of the task that awaits it, and finished in a
/// task of its own when that task drops it first: then `orphaned` gets its
/// output. (Spawning it from the start, as the run route did, cost a task
/// and a wake-up per call.) Outside a runtime, as it shuts down, what is
/// left is dropped.
struct FinishOnDrop<T: Send + 'static> {
    work: Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
    orphaned: Option<Box<dyn FnOnce(T) + Send>>,
    /// The span it was made in, for what goes on after its task.
    span: tracing::Span,
}

impl<T: Send + 'static> FinishOnDrop<T> {
    fn new(
        work: impl std::future::Future<Output = T> + Send + 'static,
        orphaned: impl FnOnce(T) + Send + 'static,
    ) -> Self {
        FinishOnDrop {
            work: Some(Box::pin(work)),
            orphaned: Some(Box::new(orphaned)),
            span: tracing::Span::current(),
        }
    }
}

impl<T: Send + 'static> std::future::Future for FinishOnDrop<T> {
    type Output = T;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        let Some(work) = self.work.as_mut() else {
            // Polled after its end: a bug of the caller, never reached.
            return std::task::Poll::Pending;
        };
        let output = std::task::ready!(work.as_mut().poll(cx));
        self.work = None;
        std::task::Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        use tracing::Instrument as _;
        let (Some(work), Some(orphaned)) = (self.work.take(), self.orphaned.take()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let span = self.span.clone();
            runtime.spawn(async move { orphaned(work.await) }.instrument(span));
        }
    }
}

/// Why a call of `tool` of `plugin` is refused whatever its body holds,
/// checked before the body is read: an unknown plugin or tool (404), a
/// plugin that cannot run tools, or one at its limit of calls in progress
/// (503). A body would take room in the budget, and a slow client the body
/// read timeout, for an answer known at once. The call itself checks again
/// (the state may change while the body arrives). Else the plugin's live
/// handle, which says where its body had best be received.
pub(crate) fn refused_before_its_body(
    state: &AppState,
    plugin: &str,
    tool: &str,
) -> Result<PluginHandle, RunError> {
    let handle = live_handle(state, plugin, tool)?;
    if let Some(full) = state.calls_full(plugin) {
        return Err(full);
    }
    Ok(handle)
}

/// The live handle of `plugin` when it is registered, runnable and offers
/// `tool`: what a tool call checks before it runs (the run route per call,
/// the stream route before its upgrade).
pub(crate) fn live_handle(
    state: &AppState,
    plugin: &str,
    tool: &str,
) -> Result<PluginHandle, RunError> {
    let registry = state.registry();
    let Some(plugin_state) = registry.get_state(plugin) else {
        return Err(RunError::PluginNotFound {
            held_by: state.loader().plugin_of_directory(plugin),
        });
    };
    if !plugin_state.is_available() {
        let status = registry.get_status(plugin);
        return Err(RunError::NotRunnable {
            state: Some(status.as_ref().map_or(plugin_state, |s| s.state)),
            reason: status.and_then(|s| s.reason),
        });
    }
    let Some(handle) = state.loader().handle(plugin) else {
        // Between the retirement of its instance and its new one's
        // construction (a reload; calls of the old one still running, so
        // it still shows RUNNING): said as once they end, LOADED ("RUNNING
        // and cannot run tools" read as a contradiction).
        return Err(RunError::NotRunnable {
            state: Some(forgesyte_registry::PluginLifecycleState::Loaded),
            reason: Some(forgesyte_loader::RELOADING.into()),
        });
    };
    if !handle.has_tool(tool) {
        return Err(RunError::UnknownTool);
    }
    Ok(handle)
}

/// The answer to a call (or a stream) of `plugin`'s `tool` refused with
/// `error`. A plugin FAILED with a restart scheduled gets `Retry-After`,
/// the seconds until that restart (at least 1): without it the 503 read as
/// a plugin FAILED for good. (The tool list of a FAILED plugin is its last
/// instance's, served while it waits for its restart: never such a 503.)
pub(crate) fn refusal(state: &AppState, plugin: String, tool: String, error: RunError) -> Response {
    let restart_in = match &error {
        // (A call cut off by its runner's kill for another call finds its
        // plugin FAILED, its restart scheduled, too.)
        RunError::NotRunnable {
            state: Some(forgesyte_registry::PluginLifecycleState::Failed),
            ..
        }
        | RunError::Interrupted {
            state: Some(forgesyte_registry::PluginLifecycleState::Failed),
            ..
        } => state.registry().restart_in(&plugin),
        _ => None,
    };
    let mut response = ApiError::Run {
        plugin,
        tool,
        error,
    }
    .into_response();
    if let Some(left) = restart_in {
        let seconds = crate::respond::seconds_up(left).max(1);
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, seconds.into());
    }
    response
}

/// The binary arguments `tool` declares in `tools` (a live instance's,
/// [`PluginHandle::tools`]; none when it lists no such tool).
pub(crate) fn declared_binary<'t>(
    tools: &'t [forgesyte_loader::ToolInfo],
    tool: &str,
) -> Vec<&'t str> {
    tools
        .iter()
        .find(|t| t.id == tool)
        .map(|t| binary_arguments(&t.input_schema))
        .unwrap_or_default()
}

/// The JSON arguments and the binary ones (as `(JSON Pointer, bytes)`):
/// multipart parts by name, an octet-stream body as the tool's one declared
/// binary argument (the body's own buffer: no copy), and, for a plugin that
/// takes bytes (`takes_binary`: a runner, a native ABI-3 library), base64
/// strings of declared binary arguments decoded in place (`base64_arg`) so that they reach it
/// as bytes. A binary argument's place in the JSON holds `null`.
fn arguments(
    input: RunInput,
    declared: &[&str],
    takes_binary: bool,
) -> Result<(Value, Vec<(String, Bytes)>), RunError> {
    let RunInput {
        mut args,
        mut binary,
        unnamed,
    } = input;
    if let Some(bytes) = unnamed {
        match declared {
            // The body (or a stream's frame) is the argument: the same name
            // in `args` too is one argument given twice, as multipart
            // refuses a part named like an `args` key.
            [one] if args.get(*one).is_some_and(|v| !v.is_null()) => {
                return Err(RunError::BodyMismatch {
                    message: format!(
                        "argument '{one}' is given twice: as the binary body (or frame) and in args"
                    ),
                });
            }
            [one] => binary.push(((*one).to_owned(), bytes)),
            [] => {
                return Err(RunError::BodyMismatch {
                    message: "the tool declares no binary argument: send JSON".into(),
                });
            }
            many => {
                return Err(RunError::BodyMismatch {
                    message: format!(
                        "the tool declares {} binary arguments ({}): send multipart/form-data",
                        many.len(),
                        many.join(", ")
                    ),
                });
            }
        }
    }
    for name in declared {
        match args.get_mut(*name) {
            // A plugin that takes no attachments (an in-process ABI-1
            // library) gets the text as sent, and decodes it itself.
            Some(Value::String(_)) if !takes_binary => {}
            Some(Value::String(text)) => {
                // Decoded into the text's own buffer (the argument is
                // replaced by `null` below).
                let bytes =
                    decode_in_place(std::mem::take(text)).map_err(|e| RunError::NotBase64 {
                        name: (*name).to_owned(),
                        message: crate::base64_arg::describe(&e),
                    })?;
                binary.push(((*name).to_owned(), bytes.into()));
            }
            // Absent, or `null`: not given.
            None | Some(Value::Null) => {}
            // Refused whatever the plugin takes: an in-process ABI-1
            // plugin got an object or a number where the same library
            // isolated was refused.
            Some(other) => {
                return Err(RunError::NotBinary {
                    name: (*name).to_owned(),
                    found: forgesyte_deps::json_type_name(other),
                });
            }
        }
    }
    let mut attachments = Vec::with_capacity(binary.len());
    for (name, bytes) in binary {
        args.insert(name.clone(), Value::Null);
        let pointer = format!("/{}", name.replace('~', "~0").replace('/', "~1"));
        attachments.push((pointer, bytes));
    }
    Ok((Value::Object(args), attachments))
}

/// `d` in milliseconds, to the microsecond: the clock's nanoseconds made
/// `1.4167159999999999` in answers and headers, a precision no call has.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderMap, HeaderValue};

    use super::{FinishOnDrop, arguments, call_context, manifest_declares};
    use crate::body::RunInput;
    use axum::body::Bytes;
    use serde_json::json;

    /// A manifest's tools name a tool in every shape ForgeSyte's manifests
    /// write them (and the Python runner reads): a list of tools by `id` or
    /// `name`, of bare ids, or an object of id → tool.
    #[test]
    fn a_manifest_declares_a_tool_in_every_shape() {
        for manifest in [
            json!({"tools": [{"id": "detect"}]}),
            json!({"tools": [{"name": "detect", "description": "x"}]}),
            json!({"tools": ["detect"]}),
            json!({"tools": {"detect": {"description": "x"}}}),
        ] {
            assert!(manifest_declares(&manifest, "detect"), "{manifest}");
            assert!(!manifest_declares(&manifest, "track"), "{manifest}");
        }
        assert!(!manifest_declares(&json!({}), "detect"));
        assert!(!manifest_declares(&json!({"tools": "detect"}), "detect"));
    }

    /// Times are answered to the microsecond, never with the float noise
    /// of nanoseconds divided.
    #[test]
    fn processing_times_are_whole_microseconds() {
        use std::time::Duration;
        assert_eq!(super::ms(Duration::from_nanos(1_416_716)), 1.417);
        assert_eq!(super::ms(Duration::from_nanos(1_000_966_631)), 1000.967);
        assert_eq!(super::ms(Duration::from_micros(250)).to_string(), "0.25");
        assert_eq!(super::ms(Duration::ZERO), 0.0);
    }

    #[test]
    fn binary_arguments_are_passed_on_without_copies_and_base64_is_decoded_once() {
        let declared = ["image"];
        // An octet-stream body is the declared argument: the same buffer.
        let body = Bytes::from(vec![1u8, 2, 3]);
        let input = RunInput {
            unnamed: Some(body.clone()),
            ..RunInput::default()
        };
        let (args, binary) = arguments(input, &declared, true).unwrap();
        assert_eq!(args, json!({"image": null}));
        assert_eq!(binary[0].0, "/image");
        assert_eq!(binary[0].1.as_ptr(), body.as_ptr(), "copied");
        // Base64 in JSON: decoded (a data URL too) for a plugin that takes
        // bytes, left as it is for one that takes JSON only.
        let text = json!({"image": " data:image/png;base64,AP8= ", "n": 1});
        let input = |v: &serde_json::Value| RunInput {
            args: v.as_object().cloned().unwrap_or_default(),
            ..RunInput::default()
        };
        let (args, binary) = arguments(input(&text), &declared, true).unwrap();
        assert_eq!(args, json!({"image": null, "n": 1}));
        assert_eq!(&binary[0].1[..], b"\x00\xff");
        let (args, binary) = arguments(input(&text), &declared, false).unwrap();
        assert_eq!(args, text);
        assert!(binary.is_empty());
        let bad = json!({"image": "not base64!"});
        assert!(arguments(input(&bad), &declared, true).is_err());
        // Base64 wrapped in lines, as `base64` and MIME write it.
        let data: Vec<u8> = (0..=255).collect();
        let wrapped: String = {
            use base64::Engine as _;
            let text = base64::engine::general_purpose::STANDARD.encode(&data);
            let lines: Vec<&str> = text
                .as_bytes()
                .chunks(76)
                .map(|l| std::str::from_utf8(l).unwrap())
                .collect();
            lines.join("\r\n") + "\n"
        };
        let (_, binary) = arguments(input(&json!({"image": wrapped})), &declared, true).unwrap();
        assert_eq!(&binary[0].1[..], &data[..]);
        let bad = json!({"image": "QQ\n=!"});
        assert!(arguments(input(&bad), &declared, true).is_err());
        // The body (or a stream frame) and a string of the same name in
        // args: one argument given twice, refused whichever runtime.
        for takes_binary in [true, false] {
            let twice = RunInput {
                args: json!({"image": "QUJD"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                unnamed: Some(Bytes::from_static(b"xyz")),
                ..RunInput::default()
            };
            let err = arguments(twice, &declared, takes_binary).unwrap_err();
            assert!(err.to_string().contains("given twice"), "{err}");
        }
        // JSON other than text or null, refused whichever runtime (an
        // in-process ABI-1 plugin got it).
        for takes_binary in [true, false] {
            for value in [json!({"x": 1}), json!(5), json!([1]), json!(true)] {
                let err = arguments(input(&json!({ "image": value })), &declared, takes_binary)
                    .unwrap_err();
                assert!(
                    matches!(err, crate::error::RunError::NotBinary { .. }),
                    "{takes_binary} {value}: {err}"
                );
            }
        }
    }

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    #[test]
    fn the_call_context_comes_from_the_request_id_and_a_valid_traceparent() {
        let ctx = call_context(&headers(&[
            ("x-request-id", b"abc-123"),
            ("traceparent", TRACEPARENT.as_bytes()),
        ]));
        assert_eq!(ctx.request_id.as_deref(), Some("abc-123"));
        assert_eq!(ctx.traceparent.as_deref(), Some(TRACEPARENT));
        // An invalid traceparent is dropped; the id stays.
        let ctx = call_context(&headers(&[
            ("x-request-id", b"abc-123"),
            (
                "traceparent",
                b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            ),
        ]));
        assert_eq!(ctx.request_id.as_deref(), Some("abc-123"));
        assert_eq!(ctx.traceparent, None);
        // A value that is not visible ASCII is left out, never an error.
        let ctx = call_context(&headers(&[("x-request-id", b"caf\xc3\xa9")]));
        assert!(ctx.is_empty(), "{ctx:?}");
        assert!(call_context(&HeaderMap::new()).is_empty());
    }

    /// Awaited to its end, its output is the awaiter's and `orphaned` is
    /// never called; dropped before its end, it finishes in a task of its
    /// own and `orphaned` gets the output.
    #[tokio::test]
    async fn finish_on_drop_finishes_what_its_task_dropped() {
        let (orphan_tx, orphan_rx) = std::sync::mpsc::channel::<u32>();
        let awaited = FinishOnDrop::new(async { 1 }, {
            let orphan_tx = orphan_tx.clone();
            move |v| orphan_tx.send(v).unwrap()
        });
        assert_eq!(awaited.await, 1);

        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<u32>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let mut dropped = Box::pin(FinishOnDrop::new(
            async move { gate_rx.await.unwrap_or(0) },
            move |v| {
                orphan_tx.send(v).unwrap();
                let _ = done_tx.send(());
            },
        ));
        let pending = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(dropped.as_mut(), cx).is_pending())
        })
        .await;
        assert!(pending, "it waits for its gate");
        drop(dropped);
        gate_tx.send(7).unwrap();
        done_rx.await.unwrap();
        assert_eq!(orphan_rx.try_iter().collect::<Vec<_>>(), vec![7]);
    }
}
