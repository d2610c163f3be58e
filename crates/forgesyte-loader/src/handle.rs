//! [`PluginHandle`]: what the server holds to call a loaded plugin's tools.

use std::sync::Arc;
use std::time::{Duration, Instant};

use forgesyte_errors::{PluginError, ToolError};
use forgesyte_registry::{PluginLifecycleState, Registry};
use serde_json::Value;

use crate::CallContext;
use crate::host::{PluginInstance, ToolInfo};
use crate::manifest::Isolation;
use crate::slot::Slot;
use crate::supervise::Supervisor;

/// Why a tool call produced no result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The plugin is not in a state that runs tools (FAILED after a fault,
    /// waiting for a restart, ...).
    #[error("plugin '{name}' is {state:?} and cannot run tools{}", reason_suffix(.reason))]
    NotRunnable {
        /// The plugin.
        name: String,
        /// Its state.
        state: Option<PluginLifecycleState>,
        /// Its reason, if any.
        reason: Option<String>,
    },
    /// The call reached an instance the host let go before it answered: a
    /// reload or rescan replaced it, or the server is stopping. Not the
    /// plugin's fault and not counted; its result, if any, is lost. Sent
    /// again, it reaches the instance in its place.
    #[error("the call to plugin '{name}' did not finish: {reason}")]
    Interrupted {
        /// The plugin.
        name: String,
        /// Its state when the call ended (a reload may still be building
        /// the instance in its place).
        state: Option<PluginLifecycleState>,
        /// What happened to the call.
        reason: String,
    },
    /// The tool did not produce a result.
    #[error(transparent)]
    Tool(#[from] ToolError),
}

/// What a tool call produced, as [`PluginHandle::call_output`] returns it:
/// the result and its binary results, each a JSON Pointer into `result`
/// (which holds `null` there) and the bytes, shared without a copy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolOutput {
    /// The result.
    pub result: Value,
    /// The binary results, `(pointer, bytes)`, in the plugin's order.
    pub binary: Vec<(String, bytes::Bytes)>,
}

impl ToolOutput {
    /// The result with each binary result put at its place as a base64
    /// string: the spelling of bytes in JSON answers.
    pub fn into_json(self) -> Value {
        use base64::Engine as _;
        let mut result = self.result;
        for (pointer, bytes) in self.binary {
            let text = base64::engine::general_purpose::STANDARD.encode(&bytes);
            // Every place was checked when the output was made.
            let _ = forgesyte_protocol::wire::attach::place(&mut result, &pointer, text.into());
        }
        result
    }
}

fn reason_suffix(reason: &Option<String>) -> String {
    reason
        .as_ref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default()
}

/// One call's claim on its own outcome: whoever settles it first (the call
/// returning, or [`PluginHandle::fail_timeout`] giving up on it) records the
/// call in the registry; the other records nothing. So a call timed out is
/// counted (an error) and no longer in flight at once, and a thread that
/// returns long after, or never, changes nothing.
///
/// A call is *started* once its thread has marked it running: given up on
/// before that, it is not the plugin's (no plugin code ran), so nothing is
/// counted and the plugin is not marked, and the thread, should it mark
/// the call running after all, undoes its own mark. Without that step a
/// thread that stalled before its mark, across a reload, left the new
/// instance with a call in flight that nobody would finish.
#[derive(Debug, Clone, Default)]
pub struct CallTicket(Arc<TicketState>);

#[derive(Debug, Default)]
struct TicketState {
    /// [`NEW`], [`STARTED`] or [`SETTLED`].
    phase: std::sync::atomic::AtomicU8,
    /// The instance the call was made on (an isolated plugin's runner):
    /// the one a time-out kills, not whichever a restart put in place
    /// since.
    instance: std::sync::OnceLock<std::sync::Weak<dyn PluginInstance>>,
}

/// A ticket's call has not been marked running yet.
const NEW: u8 = 0;
/// Its call was marked running (it is in flight in the registry).
const STARTED: u8 = 1;
/// Its call was recorded, or given up on.
const SETTLED: u8 = 2;

impl CallTicket {
    /// A call not settled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The call's thread marked it running: false when it was given up on
    /// before (then the thread undoes its mark).
    fn start(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.0
            .phase
            .compare_exchange(NEW, STARTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Settles the call: true for the first caller only.
    fn settle(&self) -> bool {
        self.give_up() != SETTLED
    }

    /// Settles the call, returning the phase it was in.
    fn give_up(&self) -> u8 {
        self.0
            .phase
            .swap(SETTLED, std::sync::atomic::Ordering::AcqRel)
    }

    /// Whether the call is settled (returned, or given up on).
    fn is_settled(&self) -> bool {
        self.0.phase.load(std::sync::atomic::Ordering::Acquire) == SETTLED
    }

    /// Records the instance the call runs on.
    fn ran_on(&self, instance: &Arc<dyn PluginInstance>) {
        let _ = self.0.instance.set(Arc::downgrade(instance));
    }

    /// The instance the call ran on, if it reached one and it lives.
    fn instance(&self) -> Option<Arc<dyn PluginInstance>> {
        self.0.instance.get().and_then(std::sync::Weak::upgrade)
    }
}

/// A call marked running and not recorded yet: dropped, it is finished
/// (no longer in flight, not counted) unless its ticket was settled.
struct Running<'a> {
    handle: &'a PluginHandle,
    ticket: &'a CallTicket,
}

/// A call [`PluginHandle::awaitable`] found awaitable, for
/// [`PluginHandle::call_ticketed_async`]: its arguments, encoded.
#[derive(Debug)]
pub struct Awaitable {
    args: Vec<u8>,
}

/// A call [`PluginHandle::begin`] started, for [`PluginHandle::record`].
struct Begun<'a> {
    running: Running<'a>,
    /// The arguments, encoded.
    args: Vec<u8>,
    instance: Arc<dyn PluginInstance>,
    started: Instant,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.ticket.settle() {
            let slot = &self.handle.inner.slot;
            let _ = slot.registry.finish(&slot.name);
        }
    }
}

/// A cheap, cloneable handle on a loaded plugin instance.
///
/// Every call goes through the registry: the state moves to RUNNING while the
/// call is in flight, success and error counts and timings are recorded, and a
/// fault (panic, broken answer, crash, timeout) marks the plugin FAILED. The
/// instance (and so its library) lives as long as any handle does.
///
/// For a plugin in its own process ([`Isolation::Process`]) the handle is
/// also its supervisor: when the process ends (a crash, a kill, a fault that
/// made the host kill it) the plugin goes FAILED with the reason, and is
/// restarted with exponential backoff; the handle then routes calls to the
/// new instance. See `ISOLATION.md`.
#[derive(Debug, Clone)]
pub struct PluginHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Name, registry, the live instance and the retirement flag, shared
    /// with the supervisor.
    slot: Arc<Slot>,
    call_timeout: Option<Duration>,
    isolation: Isolation,
    /// Kept alive by the handle: once every handle is gone, nothing
    /// restarts.
    supervisor: Option<Arc<Supervisor>>,
}

impl PluginHandle {
    /// A handle on an in-process instance.
    pub(crate) fn new(
        name: String,
        registry: Registry,
        instance: Box<dyn PluginInstance>,
        call_timeout: Option<Duration>,
    ) -> Self {
        PluginHandle {
            inner: Arc::new(Inner {
                slot: Arc::new(Slot::new(name, registry, Arc::from(instance))),
                call_timeout,
                isolation: Isolation::InProcess,
                supervisor: None,
            }),
        }
    }

    /// A handle on the instance in `slot`, in its own process and
    /// supervised by `supervisor` (which shares the slot).
    pub(crate) fn isolated(
        slot: Arc<Slot>,
        call_timeout: Duration,
        supervisor: Arc<Supervisor>,
    ) -> Self {
        PluginHandle {
            inner: Arc::new(Inner {
                slot,
                call_timeout: Some(call_timeout),
                isolation: Isolation::Process,
                supervisor: Some(supervisor),
            }),
        }
    }

    /// Records the first construction as INITIALIZED (the load pass does,
    /// once its wave is done), unless its instance already ended: then the
    /// supervisor owns the state (FAILED, or LOADED while a restart builds
    /// its runner, which a load pass marked INITIALIZED with the dead
    /// runner still in the slot). `None` when nothing was written. Under
    /// the slot's lock, as the supervisor's own writes.
    pub(crate) fn mark_first_initialized(
        &self,
    ) -> Option<Result<(), forgesyte_registry::RegistryError>> {
        let slot = &self.inner.slot;
        slot.unless_retired(|| {
            let ended = self
                .inner
                .supervisor
                .as_ref()
                .is_some_and(|s| !s.never_ended());
            (!ended).then(|| slot.registry.mark_initialized(&slot.name))
        })
        .flatten()
    }

    /// The sandbox its runner reported (see [`crate::sandbox`]); `None`
    /// in process or unconfined.
    pub fn confinement(&self) -> Option<std::collections::BTreeMap<String, String>> {
        self.inner.slot.current().confinement()
    }

    /// The plugin's registry name.
    pub fn name(&self) -> &str {
        &self.inner.slot.name
    }

    /// The tools the plugin's live instance offers: after a restart, the
    /// restarted instance's (a runner whose tools depend on what it found
    /// when it started may list others).
    pub fn tools(&self) -> Arc<[ToolInfo]> {
        self.inner.slot.current().shared_tools()
    }

    /// Whether the plugin's live instance offers `tool`.
    pub fn has_tool(&self, tool: &str) -> bool {
        self.inner
            .slot
            .current()
            .tools()
            .iter()
            .any(|t| t.id == tool)
    }

    /// The per-call time limit: the manifest's `limits.call_timeout_s` if it
    /// sets one; for an isolated plugin always the limit its process is
    /// killed at (the manifest's, else the loader's default).
    pub fn call_timeout(&self) -> Option<Duration> {
        self.inner.call_timeout
    }

    /// Where the plugin runs. For [`Isolation::Process`] the handle enforces
    /// the call timeout itself (the process is killed and the call returns
    /// [`ToolError::TimedOut`]); a caller need not time the call out.
    pub fn isolation(&self) -> Isolation {
        self.inner.isolation
    }

    /// The id of the process the current instance runs in (isolated plugins
    /// only).
    pub fn pid(&self) -> Option<u32> {
        self.inner.slot.current().pid()
    }

    /// Runs `tool` with `args`, blocking the calling thread, and records the
    /// outcome in the registry.
    pub fn call(&self, tool: &str, args: &Value) -> Result<Value, CallError> {
        self.call_with(tool, args, &[])
    }

    /// [`call`](Self::call) with binary arguments: each `(pointer, bytes)`
    /// goes to the JSON Pointer `pointer` in `args`. A plugin in a runner
    /// gets them as bytes (attachments on the pipe, never base64), an
    /// in-process native ABI-3 plugin as the caller's own slices; an
    /// in-process ABI-1 plugin (JSON only) as base64 strings. Binary
    /// results come back as base64 strings at their places.
    pub fn call_with(
        &self,
        tool: &str,
        args: &Value,
        attachments: &[(&str, &[u8])],
    ) -> Result<Value, CallError> {
        self.call_in(tool, args, attachments, &CallContext::default())
    }

    /// [`call_with`](Self::call_with) on behalf of a request: a plugin in a
    /// runner gets `context` (request id, `traceparent`) with the call, and
    /// its runner tags the plugin's log lines of the call with them. An
    /// in-process plugin does not get it (the caller's own tracing span is
    /// what tags log lines made on its thread).
    pub fn call_in(
        &self,
        tool: &str,
        args: &Value,
        attachments: &[(&str, &[u8])],
        context: &CallContext,
    ) -> Result<Value, CallError> {
        self.call_output(tool, args, attachments, context)
            .map(ToolOutput::into_json)
    }

    /// Whether the plugin takes binary arguments as bytes (a native ABI-3
    /// library in process, any runner that takes attachments): a caller
    /// holding one as a base64 string then decodes it (once) and passes the
    /// bytes; otherwise it passes the string as it is.
    pub fn takes_binary(&self) -> bool {
        self.inner.slot.current().takes_binary()
    }

    /// [`call_in`](Self::call_in) with the binary results kept as bytes
    /// ([`ToolOutput`]); the result holds `null` at their places. A binary
    /// result whose place does not exist in the result is a protocol fault.
    pub fn call_output(
        &self,
        tool: &str,
        args: &Value,
        attachments: &[(&str, &[u8])],
        context: &CallContext,
    ) -> Result<ToolOutput, CallError> {
        self.call_ticketed(tool, args, attachments, context, &CallTicket::new())
    }

    /// [`call_output`](Self::call_output) under `ticket`, which the caller
    /// also hands to [`fail_timeout`](Self::fail_timeout) if it gives up on
    /// the call: the call is then recorded once, by whichever comes first.
    pub fn call_ticketed(
        &self,
        tool: &str,
        args: &Value,
        attachments: &[(&str, &[u8])],
        context: &CallContext,
        ticket: &CallTicket,
    ) -> Result<ToolOutput, CallError> {
        let call = self.begin(tool, encode(args)?, ticket)?;
        let called = || {
            call.instance
                .call_output(tool, &call.args, attachments, context)
        };
        // An in-process plugin's log lines name it (`plugin_log`).
        let outcome = match self.inner.isolation {
            Isolation::InProcess => crate::plugin_log::as_plugin(&self.inner.slot.name, called),
            Isolation::Process => called(),
        };
        let outcome = self.read_output(outcome);
        self.record(call, outcome, false)
    }

    /// A call of `tool` with `args` (no binary arguments) that
    /// [`call_ticketed_async`](Self::call_ticketed_async) awaits without a
    /// thread of its own, its arguments encoded: the plugin runs in a
    /// runner process that takes several calls at once, and the request
    /// can be written whole at once. `None` otherwise: the call is made on
    /// a thread ([`call_ticketed`](Self::call_ticketed)).
    pub fn awaitable(&self, tool: &str, args: &Value, context: &CallContext) -> Option<Awaitable> {
        if self.inner.isolation != Isolation::Process {
            return None;
        }
        // Arguments a request frame cannot hold are not encoded whole
        // (a large JSON body would be encoded twice).
        // `PIPE_BUF`: the most a request frame written whole at once holds.
        let args = crate::json_text::to_vec_capped(args, libc::PIPE_BUF).ok()?;
        self.inner
            .slot
            .current()
            .awaitable(tool, &args, context)
            .then_some(Awaitable { args })
    }

    /// [`call_ticketed`](Self::call_ticketed) of a call
    /// [`awaitable`](Self::awaitable) found awaitable: the request is
    /// written without blocking and the answer awaited, and a runner
    /// killed for a fault is awaited dead. Two things go to tokio's
    /// blocking pool, never waiting for it without bound: a call its
    /// instance can no longer take so (a restart put another in place
    /// meanwhile; no thread within the call timeout: `QueueTimedOut`, the
    /// call never made), and the reading of a result over 64 KiB (no
    /// thread within 100 ms: read in the task). It must be polled inside a
    /// tokio runtime whose timers are enabled. Dropped before its end, the call is no longer in
    /// flight and not counted, and its answer, if one comes, is dropped.
    pub async fn call_ticketed_async(
        &self,
        tool: &str,
        call: Awaitable,
        context: &CallContext,
        ticket: &CallTicket,
    ) -> Result<ToolOutput, CallError> {
        /// Results larger than this are read on a thread...
        const READ_ON_A_THREAD: usize = 64 * 1024;
        /// ... found within this long.
        const READ_PATIENCE: std::time::Duration = std::time::Duration::from_millis(100);
        let mut call = self.begin(tool, call.args, ticket)?;
        let args = std::mem::take(&mut call.args);
        let outcome = Arc::clone(&call.instance)
            .call_async(tool, args, context)
            .await;
        let outcome = match outcome {
            Ok(output) if output.json.len() > READ_ON_A_THREAD => {
                let this = self.clone();
                let read = move || this.read_output(Ok(output));
                // Every thread of the pool busy: read here rather than
                // wait for one without bound.
                match crate::host::on_blocking_pool_within(READ_PATIENCE, read).await {
                    Ok(outcome) => outcome,
                    Err(read) => read(),
                }
            }
            outcome => self.read_output(outcome),
        };
        let kill = match &outcome {
            Err(e) if e.is_fault() => self.kill_for(e),
            _ => None,
        };
        if let Some(reason) = &kill {
            Arc::clone(&call.instance).kill_async(reason.clone()).await;
        }
        self.record(call, outcome, kill.is_some())
    }

    /// A call's start: the tool checked, the plugin marked running under
    /// `ticket`, the instance taken.
    fn begin<'a>(
        &'a self,
        tool: &str,
        args: Vec<u8>,
        ticket: &'a CallTicket,
    ) -> Result<Begun<'a>, CallError> {
        let name = &self.inner.slot.name;
        let registry = &self.inner.slot.registry;
        if !self.has_tool(tool) {
            return Err(ToolError::UnknownTool {
                plugin: name.clone(),
                tool: tool.to_owned(),
            }
            .into());
        }
        if registry.mark_running(name).is_err() {
            // Never ran: nothing for a timeout to record either.
            ticket.settle();
            return Err(self.not_runnable());
        }
        if !ticket.start() {
            // Given up on before its mark (`fail_timeout` recorded nothing
            // then): the mark is this thread's to undo. The name may be a
            // reloaded instance's by now, marked by this thread all the same.
            let _ = registry.finish(name);
            return Err(
                self.interrupted("the call did not start within its time limit; send it again")
            );
        }
        // Until the call is recorded by `record`, it is finished (no longer
        // in flight, not counted) however it is left: an early return, a
        // panic of the host's own, a future dropped.
        let running = Running {
            handle: self,
            ticket,
        };
        if self.inner.slot.is_retired() {
            // A handle taken before a reload or rescan replaced this
            // instance: the name (and its counts) are the new one's.
            drop(running);
            return Err(self.interrupted(
                "the plugin was reloaded while this call waited to start; send it again",
            ));
        }
        let instance = self.inner.slot.current();
        ticket.ran_on(&instance);
        Ok(Begun {
            running,
            args,
            instance,
            started: Instant::now(),
        })
    }

    /// What a call's output holds: its JSON result read, its binary
    /// results' places checked.
    fn read_output(
        &self,
        outcome: Result<crate::host::CallOutput, ToolError>,
    ) -> Result<ToolOutput, ToolError> {
        outcome
            .and_then(|output| {
                let max = crate::json_text::max_result_values();
                if let Some(values) = crate::json_text::over(&output.json, max) {
                    // Parsed, each value would take up to 128 bytes where
                    // its text takes two: refused before it is.
                    return Err(ToolError::Failed {
                        traceback: Vec::new(),
                        error_type: Some("ResultTooLarge".into()),
                        message: format!(
                            "the result holds about {values} JSON values, more than the {max} \
                             an answer may hold (one per 32 bytes of --max-response)"
                        ),
                    });
                }
                let mut result =
                    serde_json::from_slice::<Value>(&output.json).map_err(result_error)?;
                if let Some(conflict) = forgesyte_protocol::wire::attach::conflict(&output.binary) {
                    return Err(ToolError::Protocol {
                        detail: conflict.to_string(),
                    });
                }
                for (pointer, _) in &output.binary {
                    forgesyte_protocol::wire::attach::place(&mut result, pointer, Value::Null)
                        .map_err(|e| ToolError::Protocol {
                            detail: format!("a binary result has no place in the result: {e}"),
                        })?;
                }
                Ok(ToolOutput {
                    result,
                    binary: output.binary,
                })
            })
            .map_err(|e| match e {
                ToolError::UnknownTool { tool, .. } => ToolError::UnknownTool {
                    plugin: self.inner.slot.name.clone(),
                    tool,
                },
                other => other,
            })
    }

    /// A call's end: its outcome recorded (see `begin`); `killed`: the
    /// runner a fault asks to kill was killed already.
    fn record(
        &self,
        call: Begun<'_>,
        outcome: Result<ToolOutput, ToolError>,
        killed: bool,
    ) -> Result<ToolOutput, CallError> {
        let name = &self.inner.slot.name;
        let registry = &self.inner.slot.registry;
        let Begun {
            running,
            instance,
            started,
            ..
        } = call;
        let elapsed = started.elapsed();
        // Recorded by whoever settles first: a call its caller timed out
        // (`fail_timeout`) was counted, and its plugin marked, then; what
        // it does after (a panic, say) changes neither. Bookkeeping errors
        // (the plugin was reloaded meanwhile) are not the caller's problem:
        // the outcome of the call stands.
        if let Err(stopped @ ToolError::Stopped { reached, .. }) = &outcome {
            // Its runner was let go by a reload or rescan, or the host is
            // stopping, or ending it: neither the plugin's doing nor its
            // new instance's, so not counted (`running` finishes it
            // uncounted), and a call sent again reaches the instance in
            // its place.
            drop(running);
            if !reached {
                // "the call never reached the plugin: why"
                return Err(self.interrupted(&format!("{stopped}; send it again")));
            }
            return Err(self.interrupted(
                "the host stopped the plugin's process while this call ran (a reload, a rescan, \
                 the server's stop, or a plugin it depends on failing): its result is lost; send \
                 it again",
            ));
        }
        if let Err(ToolError::Crashed(forgesyte_errors::CrashError {
            cause: forgesyte_errors::CrashCause::Killed { reason },
            ..
        })) = &outcome
        {
            // The host killed the runner before this call's answer came:
            // for another call's time limit or fault (this call's own are
            // `TimedOut` and the fault itself), or its stop. Not this
            // call's outcome, so not counted, and its client is told to
            // send it again rather than that its call faulted.
            drop(running);
            return Err(self.interrupted(&format!(
                "the host killed the plugin's process before this call's answer came, not for \
                 this call ({reason}): its result is lost; send it again once the plugin is back"
            )));
        }
        // (An answer the host could not take for want of descriptors is
        // no outcome of the plugin's either.)
        if let Err(
            e @ (ToolError::QueueTimedOut { .. }
            | ToolError::HostResources { .. }
            | ToolError::RunnerOverloaded { .. }),
        ) = outcome
        {
            // The call never reached the plugin (it waited its whole limit
            // for its turn, or for a thread): no outcome of the plugin's,
            // so neither an error nor a time in its figures.
            drop(running);
            return Err(e.into());
        }
        let ticket = running.ticket;
        let _recorded_below = std::mem::ManuallyDrop::new(running);
        if ticket.settle() {
            if let Err(e) = &outcome
                && e.is_fault()
                && !killed
            {
                self.fault(&instance, e);
            }
            let _ = registry.end_call(name, elapsed, outcome.is_ok());
        }
        outcome.map_err(CallError::from)
    }

    /// The reason to kill a plugin's runner for a faulted call: a runner
    /// that did not end of it (a crash or a time-out did), of a handle not
    /// let go. `None` in process.
    fn kill_for(&self, error: &ToolError) -> Option<String> {
        (self.inner.isolation == Isolation::Process
            && !self.inner.slot.is_retired()
            && !matches!(error, ToolError::Crashed(_) | ToolError::TimedOut { .. }))
        .then(|| PluginError::Tool(error.clone()).reason())
    }

    /// A call faulted. In-process the plugin is marked FAILED. An isolated
    /// plugin whose process died was marked FAILED by its supervisor before
    /// the call returned; one whose process is alive (a caught panic, a
    /// broken answer) is killed, so that it restarts clean.
    fn fault(&self, instance: &Arc<dyn PluginInstance>, error: &ToolError) {
        match self.inner.isolation {
            Isolation::Process => {
                if let Some(reason) = self.kill_for(error) {
                    instance.kill(&reason);
                }
            }
            _ if self.inner.slot.is_retired() => {}
            _ => self.mark_failed_unless_retired(&PluginError::Tool(error.clone()).reason()),
        }
    }

    /// Marks the plugin FAILED with `reason`, under the slot's lock: a
    /// reload that retired it meanwhile keeps its own state (see
    /// `Slot::unless_retired`).
    fn mark_failed_unless_retired(&self, reason: &str) {
        let name = &self.inner.slot.name;
        let registry = &self.inner.slot.registry;
        let marked = self
            .inner
            .slot
            .unless_retired(|| registry.mark_failed(name, reason).is_ok());
        if marked == Some(true) {
            // A panic's message is the plugin's, of any length: the
            // registry keeps 80 Ki characters of it, a log line 4 Ki.
            let reason = forgesyte_errors::logged(reason);
            tracing::error!(plugin = %name, %reason, "✗ Plugin FAILED: {name}");
        }
    }

    /// Records that a call of `tool` ran past `after` (the caller timed it
    /// out), if the call under `ticket` has not returned meanwhile: `None`
    /// when it has (its outcome stands; the caller takes it). In-process the
    /// call's thread cannot be stopped, so the plugin is marked FAILED
    /// (unless this handle was let go: a reload's new instance is not at
    /// fault) and the call is counted now (an error) and no longer in
    /// flight: its thread's return, if it comes, records nothing. A call
    /// not yet marked running is given up on without either (no plugin
    /// code ran) and `None` comes back: its thread's answer says it did not
    /// start. An isolated plugin's process, the one the call went to (not one a
    /// restart started since), is killed (and restarted by its
    /// supervisor); its call returns `TimedOut` and is recorded then.
    /// Returns the reason; `None` too for an isolated call that has
    /// reached no runner yet.
    pub fn fail_timeout(&self, tool: &str, after: Duration, ticket: &CallTicket) -> Option<String> {
        let reason =
            PluginError::Timeout(crate::manifest::Limits::call_timed_out(tool, after)).reason();
        let name = &self.inner.slot.name;
        if self.inner.isolation == Isolation::Process {
            // A call that returned meanwhile stands: its runner, and the
            // other calls in it, are not killed for it.
            if ticket.is_settled() {
                return None;
            }
            // The runner the call went to: a restart since may have put
            // another in place, which has nothing to do with this call. A
            // call that reached none yet (or whose runner is gone) is left
            // to end by itself (its runner's death, or its own limit).
            ticket.instance()?.kill(&reason);
            return Some(reason);
        }
        match ticket.give_up() {
            SETTLED => None,
            // Not marked running yet: no plugin code ran, so the plugin is
            // neither blamed nor counted, and the caller takes what its
            // thread answers (`Interrupted`, "did not start within its
            // time limit", once it undoes a late mark): not a timeout of
            // the plugin's.
            NEW => None,
            _ => {
                self.mark_failed_unless_retired(&reason);
                let _ = self.inner.slot.registry.end_call(name, after, false);
                Some(reason)
            }
        }
    }

    /// Lets the handle go: no more restarts or fault handling, and an
    /// isolated plugin's process is asked to exit (killed after a short
    /// grace; calls still in flight fail). Returns with the last instance,
    /// for a caller that waits for its end: at once, unless a restart was
    /// under way; its runner is then killed (if still constructing) and
    /// the restart waited for (`Supervisor::cancel_attempt`), so no runner
    /// of it outlives the let-go.
    pub(crate) fn retire(&self) -> Arc<dyn PluginInstance> {
        let last = self.inner.slot.retire();
        if self.inner.isolation == Isolation::Process {
            last.stop();
            if let Some(supervisor) = &self.inner.supervisor {
                supervisor.cancel_attempt();
            }
        }
        last
    }

    /// The host is shutting down: a restart that waits is dropped (the
    /// shared flag already stops new ones).
    pub(crate) fn stop_restarts(&self) {
        if let Some(supervisor) = &self.inner.supervisor {
            supervisor.stop_restarts();
        }
    }

    /// A call that did not finish because the host let its instance go:
    /// `reason`, and the plugin's state as it ended.
    fn interrupted(&self, reason: &str) -> CallError {
        let slot = &self.inner.slot;
        CallError::Interrupted {
            name: slot.name.clone(),
            state: slot.registry.get_status(&slot.name).map(|s| s.state),
            reason: reason.to_owned(),
        }
    }

    fn not_runnable(&self) -> CallError {
        let slot = &self.inner.slot;
        let status = slot.registry.get_status(&slot.name);
        CallError::NotRunnable {
            name: slot.name.clone(),
            state: status.as_ref().map(|s| s.state),
            reason: status.and_then(|s| s.reason),
        }
    }
}

/// A call's arguments, encoded (an error no `Value` gives).
fn encode(args: &Value) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(args).map_err(|e| {
        ToolError::InvalidArgs {
            message: e.to_string(),
        }
        .into()
    })
}

/// Why a tool's result could not be read. A result nested as deep as
/// serde_json refuses (128 arrays and objects) is valid JSON the tool
/// returned: a tool error of that call (a client could otherwise make an
/// echoing tool's plugin FAILED, and its other calls fail, with one deep
/// request), not a broken plugin. Anything else is a protocol fault.
fn result_error(e: serde_json::Error) -> ToolError {
    // serde_json names it only in its message.
    if e.to_string().starts_with("recursion limit exceeded") {
        return ToolError::Failed {
            traceback: Vec::new(),
            error_type: Some("ResultTooDeep".to_owned()),
            message: format!(
                "the tool's result nests arrays and objects 128 or more levels deep, \
                 deeper than the host reads ({e})"
            ),
        };
    }
    // A number past a 64-bit float's range (`1e400`): the tool's value,
    // not a broken runner (the Python runner refuses such integers first).
    if e.to_string().starts_with("number out of range") {
        return ToolError::Failed {
            traceback: Vec::new(),
            error_type: Some("ValueError".to_owned()),
            message: format!(
                "the tool's result holds a number beyond the range the host reads \
                 (about 1.8e308) ({e})"
            ),
        };
    }
    ToolError::Protocol {
        detail: format!("result is not valid JSON: {e}"),
    }
}

#[cfg(test)]
mod tests;
