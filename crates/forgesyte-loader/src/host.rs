//! The seam between the load pipeline and plugin code.
//!
//! The pipeline only sees these traits: an [`Importer`] opens a plugin
//! library, a [`PluginLibrary`] creates instances, a [`PluginInstance`] lists
//! and runs tools. The real implementation is [`crate::native`] (dlopen of an
//! SDK-built library); tests use the in-memory fake in [`crate::fake`];
//! process isolation ([`crate::process`]) is another implementation, whose
//! instances also have a process id, report when that process ends, and can
//! be killed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use forgesyte_errors::{CrashCause, CrashError, ImportError, InitError, ToolError};

use crate::CallContext;

/// A tool as the loaded plugin describes it (authoritative over the
/// manifest): the boundary's own tool spec.
pub use forgesyte_protocol::ToolSpec as ToolInfo;

/// The most tools a plugin may list.
pub(crate) const MAX_TOOLS: usize = 1024;
/// The most bytes a plugin's tool list may take as JSON (ids, titles,
/// descriptions, schemas), as `GET /v1/plugins/{name}/tools` serves it.
pub(crate) const MAX_TOOL_LIST_BYTES: usize = 4 << 20;

/// A plugin's tool list that names a tool twice is broken: a call could
/// reach either, and its schema (which arguments are binary) would be the
/// first one's. One of more than [`MAX_TOOLS`] tools or
/// [`MAX_TOOL_LIST_BYTES`] of JSON is refused too: the server keeps it
/// for as long as the plugin is loaded and serves it to any client that
/// asks (a plugin listing 250,000 tools took the server to 577 MB, and
/// sixteen reads of it at once to 1.9 GB). The construction fails with a
/// protocol error naming what is wrong.
pub(crate) fn check_tool_list(tools: &[ToolInfo]) -> Result<(), InitError> {
    if tools.len() > MAX_TOOLS {
        return Err(InitError::Protocol {
            detail: format!(
                "its tool list names {} tools; the host takes at most {MAX_TOOLS}",
                tools.len()
            ),
        });
    }
    let bytes = json_len(tools);
    if bytes > MAX_TOOL_LIST_BYTES {
        return Err(InitError::Protocol {
            detail: format!(
                "its tool list takes {bytes} bytes as JSON; the host takes at most \
                 {MAX_TOOL_LIST_BYTES} (4 MiB)"
            ),
        });
    }
    let mut seen = std::collections::HashSet::new();
    match tools.iter().find(|t| !seen.insert(t.id.as_str())) {
        Some(tool) => Err(InitError::Protocol {
            detail: format!("the tool list names tool '{}' twice", tool.id),
        }),
        None => Ok(()),
    }
}

/// How many bytes `value` takes as JSON, counted, not written.
fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 = self.0.saturating_add(buf.len());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // A JSON value always serialises; a failure would count what it wrote.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Opens plugin libraries.
pub trait Importer: Send + Sync + std::fmt::Debug {
    /// Opens the library at `path` and checks it speaks the host's ABI.
    fn open(&self, path: &Path) -> Result<Arc<dyn PluginLibrary>, ImportError>;

    /// Opens the library whose checked bytes are `bytes` (read from `path`
    /// and compared with their signed or pinned digest), so that what is
    /// loaded is what was checked. The native importer loads the bytes
    /// themselves; the default (importers that cannot load from memory,
    /// the fakes) opens `path`.
    fn open_bytes(&self, path: &Path, bytes: &[u8]) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        let _ = bytes;
        self.open(path)
    }

    /// The part of opening the library at `path` that the dynamic loader
    /// does not serialise, done ahead: a load pass runs it for each library
    /// as its checks end, on the pass's pool, so that the single thread
    /// that opens libraries ([`open_prepared`](Self::open_prepared)) only
    /// maps them. The native importer asks the kernel to read the file in
    /// and reads and checks its ELF headers; an error is the one `open`
    /// would give. The default prepares nothing.
    fn prepare(&self, path: &Path) -> Result<Prepared, ImportError> {
        let _ = path;
        Ok(Prepared::default())
    }

    /// Opens the library at `path` as [`open`](Self::open) does, with what
    /// [`prepare`](Self::prepare) found. The default ignores it.
    fn open_prepared(
        &self,
        path: &Path,
        prepared: Prepared,
    ) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        let _ = prepared;
        self.open(path)
    }

    /// Kills the processes this importer started that have not yet
    /// constructed their plugin (a restart in progress as the plugin is let
    /// go), so that what builds them fails at once. The default (an
    /// importer that starts no process) does nothing.
    fn stop_starting(&self) {}
}

/// What an [`Importer`] learnt of a library ahead of opening it
/// ([`Importer::prepare`]), for its [`Importer::open_prepared`]. Opaque,
/// and only ever a shortcut: the native importer uses its ELF check only
/// for the very file it then opens (the same device, inode, size and
/// change time), and checks the file again otherwise.
#[derive(Debug, Default)]
pub struct Prepared(pub(crate) Option<Box<crate::native::PreparedElf>>);

/// An opened plugin library. Libraries are never unloaded.
pub trait PluginLibrary: Send + Sync + std::fmt::Debug {
    /// Constructs an instance from its configuration JSON
    /// (`{"manifest", "plugin_dir", "models"}`).
    fn instantiate(&self, config: &[u8]) -> Result<Box<dyn PluginInstance>, InitError>;

    /// Says which plugin the library is about to be constructed for: the
    /// name its log lines carry when no call or construction of it runs
    /// on the thread that logs (a thread it started, its `Drop`). Nothing
    /// by default.
    fn constructed_for(&self, _plugin: &str) {}
}

/// What a tool call produced: the result JSON and its binary results, each
/// a JSON Pointer into the result and the bytes that belong there (the
/// JSON holds a placeholder). The bytes are shared, not copied: a native
/// plugin's own buffer (freed by the plugin when the last clone drops), a
/// slice of a runner's answer frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallOutput {
    /// The result, JSON bytes.
    pub json: Vec<u8>,
    /// The binary results, `(pointer, bytes)`, in the plugin's order.
    pub binary: Vec<(String, bytes::Bytes)>,
}

impl CallOutput {
    /// A JSON-only result.
    pub fn json(json: Vec<u8>) -> Self {
        CallOutput {
            json,
            binary: Vec::new(),
        }
    }

    /// The result JSON with each binary result put at its place as a
    /// base64 string (the spelling of bytes in JSON); a place that does
    /// not exist is a protocol error.
    pub fn into_json(self) -> Result<Vec<u8>, ToolError> {
        if self.binary.is_empty() {
            return Ok(self.json);
        }
        let protocol = |detail: String| ToolError::Protocol { detail };
        let mut value: serde_json::Value =
            serde_json::from_slice(&self.json).map_err(|e| protocol(e.to_string()))?;
        place_base64(
            &mut value,
            self.binary.iter().map(|(p, b)| (p.as_str(), &b[..])),
        )
        .map_err(protocol)?;
        serde_json::to_vec(&value).map_err(|e| protocol(e.to_string()))
    }
}

/// Runs `call` on tokio's blocking pool and awaits its outcome; a panic
/// there goes on in the caller, and a runtime that stops first ends the
/// call `Stopped`.
pub(crate) async fn on_blocking_pool<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    joined(tokio::task::spawn_blocking(call).await)
}

/// [`on_blocking_pool`] for `work` that must not wait past `patience` for a
/// thread of the pool (every one busy: slow calls can take them all): then
/// it is handed back, never to run there (`Err(work)`), for the caller to
/// run it itself or give up.
pub(crate) async fn on_blocking_pool_within<T, W>(
    patience: Duration,
    work: W,
) -> Result<Result<T, ToolError>, W>
where
    T: Send + 'static,
    W: FnOnce() -> Result<T, ToolError> + Send + 'static,
{
    let slot = Arc::new(parking_lot::Mutex::new(Some(work)));
    let theirs = Arc::clone(&slot);
    let mut ran = tokio::task::spawn_blocking(move || {
        let work = theirs.lock().take();
        work.map(|work| work())
    });
    let finished = match tokio::time::timeout(patience, &mut ran).await {
        Ok(finished) => finished,
        Err(_) => {
            let back = slot.lock().take();
            if let Some(work) = back {
                return Err(work);
            }
            ran.await // a thread took it meanwhile
        }
    };
    Ok(joined(finished.map(|outcome| {
        // `None` only for work handed back, which returned above.
        outcome.unwrap_or_else(|| {
            Err(ToolError::Stopped {
                reason: "the call was handed back by the thread pool".into(),
                reached: false,
            })
        })
    })))
}

/// The outcome of work on tokio's blocking pool: a panic there goes on in
/// the caller, and a runtime that stopped first ends the call `Stopped`.
fn joined<T>(
    finished: Result<Result<T, ToolError>, tokio::task::JoinError>,
) -> Result<T, ToolError> {
    match finished {
        Ok(outcome) => outcome,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(_) => Err(ToolError::Stopped {
                reason: "the server stopped while the call waited for a thread".into(),
                reached: false,
            }),
        },
    }
}

/// `instance`'s [`call_output`](PluginInstance::call_output) of a call
/// without attachments, made on tokio's blocking pool and awaited.
pub(crate) async fn call_on_thread<I: PluginInstance + ?Sized + 'static>(
    instance: Arc<I>,
    tool: String,
    args: Vec<u8>,
    context: CallContext,
) -> Result<CallOutput, ToolError> {
    on_blocking_pool(move || instance.call_output(&tool, &args, &[], &context)).await
}

/// A call [`PluginInstance::call_async`] made, awaited for its outcome.
pub type AsyncCall =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<CallOutput, ToolError>> + Send>>;

/// A kill [`PluginInstance::kill_async`] made, awaited for its end.
pub type AsyncKill = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// A live plugin instance; tools may be called from several threads at once.
pub trait PluginInstance: Send + Sync + std::fmt::Debug {
    /// The tools the instance offers.
    fn tools(&self) -> &[ToolInfo];
    /// [`tools`](Self::tools), shared: an instance that holds them in an
    /// `Arc` hands out a clone of it, so that a handle on a plugin needs
    /// no copy of every schema. By default they are copied.
    fn shared_tools(&self) -> Arc<[ToolInfo]> {
        Arc::from(self.tools())
    }
    /// Runs `tool` with JSON-encoded `args`; returns the JSON-encoded result.
    fn call(&self, tool: &str, args: &[u8]) -> Result<Vec<u8>, ToolError>;

    /// [`call`](Self::call) with binary arguments, each placed at its JSON
    /// Pointer in `args`. By default (a plugin that takes JSON only) they
    /// are put there as base64 strings; a runner-hosted instance sends them
    /// as bytes.
    fn call_with(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
    ) -> Result<Vec<u8>, ToolError> {
        if attachments.is_empty() {
            return self.call(tool, args);
        }
        let args = base64_into_json(args, attachments)?;
        self.call(tool, &args)
    }

    /// [`call_with`](Self::call_with) for a caller with a `context` (request
    /// id, `traceparent`). A runner-hosted instance sends it with the call;
    /// a native library hands it to the plugin when it exports the SDK's
    /// context symbol. It is [`call_output`](Self::call_output)'s JSON (an
    /// instance with binary results has them as base64 there).
    fn call_in(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
        context: &CallContext,
    ) -> Result<Vec<u8>, ToolError> {
        self.call_output(tool, args, attachments, context)?
            .into_json()
    }

    /// [`call_in`](Self::call_in) with binary results kept as bytes beside
    /// the JSON (a native ABI-3 library's, a runner's result attachments):
    /// the one call an instance that takes a context or gives binary
    /// results overrides. By default (an instance whose results are JSON
    /// only and that has no way to take a context) [`call_with`](Self::call_with),
    /// the context not passed on.
    fn call_output(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
        context: &CallContext,
    ) -> Result<CallOutput, ToolError> {
        let _ = context;
        self.call_with(tool, args, attachments)
            .map(CallOutput::json)
    }

    /// Whether binary arguments reach the plugin as bytes (a native ABI-3
    /// library, a runner that takes attachments): a caller holding one as
    /// a base64 string then decodes it once and passes the bytes. `false`
    /// (the default) when they would only be base64-encoded again.
    fn takes_binary(&self) -> bool {
        false
    }

    /// Whether [`call_async`](Self::call_async) awaits this call (of no
    /// attachments) without a thread of its own: a runner-hosted instance
    /// that takes several calls at once, for a request small enough to be
    /// written whole at once. `false` (the default): `call_async` would
    /// only make the call on tokio's blocking pool, and a caller with
    /// threads of its own uses `call_output` there instead.
    fn awaitable(&self, tool: &str, args: &[u8], context: &CallContext) -> bool {
        let _ = (tool, args, context);
        false
    }

    /// [`call_output`](Self::call_output) of a call without attachments,
    /// awaited. An instance for which [`awaitable`](Self::awaitable) holds
    /// writes the request without blocking and awaits the answer; by
    /// default the call is made on tokio's blocking pool. The future must
    /// be polled inside a tokio runtime whose timers are enabled.
    fn call_async(self: Arc<Self>, tool: &str, args: Vec<u8>, context: &CallContext) -> AsyncCall
    where
        Self: 'static,
    {
        Box::pin(call_on_thread(self, tool.to_owned(), args, context.clone()))
    }

    /// The id of the process the instance lives in, when that is not the
    /// host's own (process isolation), while that process runs (none once
    /// it is reaped: the number may be another process's).
    fn pid(&self) -> Option<u32> {
        None
    }

    /// The sandbox the instance's process reported (see
    /// [`crate::sandbox`]); `None` in the host's own process or when its
    /// runner was started unconfined.
    fn confinement(&self) -> Option<std::collections::BTreeMap<String, String>> {
        None
    }

    /// Asks to be told, once, when the instance's process ends (at once if
    /// it already has). Returns `false` (and drops `callback`) for an
    /// instance in the host's own process.
    fn on_exit(&self, callback: ExitCallback) -> bool {
        drop(callback);
        false
    }

    /// Kills the instance's process because of `reason` (a registry reason,
    /// e.g. `ToolPanic: ...`) and returns once its end is processed (exit
    /// callbacks run). Returns `false` for an instance in the host's own
    /// process, which cannot be stopped.
    fn kill(&self, reason: &str) -> bool {
        let _ = reason;
        false
    }

    /// [`kill`](Self::kill), awaited. A runner-hosted instance kills at
    /// once and awaits the death without a thread; by default `kill` runs
    /// on tokio's blocking pool.
    fn kill_async(self: Arc<Self>, reason: String) -> AsyncKill
    where
        Self: 'static,
    {
        Box::pin(async move {
            on_blocking_pool(move || Ok(self.kill(&reason)))
                .await
                .unwrap_or(false)
        })
    }

    /// Asks the instance's process to exit, and kills it after a short
    /// grace if it has not; returns at once (the grace runs elsewhere). A
    /// no-op in the host's own process.
    fn stop(&self) {}

    /// Waits up to `timeout` for the instance's process to have ended (and
    /// what it started, its process group, to be killed): whether it has.
    /// `true` at once in the host's own process.
    fn wait_stopped(&self, timeout: Duration) -> bool {
        let _ = timeout;
        true
    }
}

/// `args` (JSON) with each attachment put at its pointer as a base64 string.
pub(crate) fn base64_into_json(
    args: &[u8],
    attachments: &[(&str, &[u8])],
) -> Result<Vec<u8>, ToolError> {
    let invalid = |message: String| ToolError::InvalidArgs { message };
    let mut value: serde_json::Value =
        serde_json::from_slice(args).map_err(|e| invalid(e.to_string()))?;
    place_base64(&mut value, attachments.iter().copied()).map_err(invalid)?;
    serde_json::to_vec(&value).map_err(|e| invalid(e.to_string()))
}

/// Puts each `(pointer, bytes)` into `value` as a base64 string: the
/// representation of bytes in JSON (the host's answers, ABI-1 arguments).
pub(crate) fn place_base64<'a>(
    value: &mut serde_json::Value,
    attachments: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> Result<(), String> {
    use base64::Engine as _;
    for (pointer, bytes) in attachments {
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        forgesyte_protocol::wire::attach::place(value, pointer, text.into())
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Called once when an isolated instance's process ends.
pub type ExitCallback = Box<dyn FnOnce(&ExitReport) + Send>;

/// How an isolated instance's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// The reason to record for the plugin (`CrashError: killed by signal
    /// SIGSEGV (11); stderr: ...`, `TimeoutError: timed out after 5 s during
    /// tool 'x'`).
    pub reason: String,
    /// The crash, when a process ended (`None` when a restart failed in
    /// another way, e.g. the constructor returned an error, and in what
    /// the calls in flight of a process the host let go are told: theirs
    /// is no crash).
    pub crash: Option<CrashError>,
    /// The signal that ended the process, by name.
    pub signal: Option<String>,
    /// The process's exit code, when it exited on its own.
    pub code: Option<i32>,
    /// The process, when one ended (to match with the kernel's messages:
    /// the OOM killer names it).
    pub pid: Option<u32>,
    /// A call told of this report was never sent to the process (it was
    /// let go, or its kill was decided, first).
    pub unsent: bool,
}

impl ExitReport {
    /// `report` as told to a call that was never sent ([`Self::unsent`]).
    pub(crate) fn for_an_unsent_call(report: Arc<ExitReport>) -> Arc<ExitReport> {
        if report.unsent {
            return report;
        }
        Arc::new(ExitReport {
            unsent: true,
            ..(*report).clone()
        })
    }

    /// A report for a broken protocol with no process status to show.
    pub(crate) fn protocol(detail: &str) -> Self {
        let crash = CrashError {
            cause: CrashCause::Protocol {
                detail: detail.to_owned(),
            },
            stderr_tail: Vec::new(),
        };
        ExitReport {
            reason: forgesyte_errors::PluginError::Crash(crash.clone()).reason(),
            crash: Some(crash),
            signal: None,
            code: None,
            pid: None,
            unsent: false,
        }
    }
}

/// A tokio runtime (one worker) whose blocking pool has one thread, taken
/// until the returned sender is dropped or sends (at most 30 s): what
/// every blocking thread busy with slow calls looks like to a task.
#[cfg(test)]
pub(crate) fn starved_runtime() -> (tokio::runtime::Runtime, std::sync::mpsc::Sender<()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (taken, is_taken) = std::sync::mpsc::channel();
    runtime.spawn_blocking(move || {
        taken.send(()).unwrap();
        let _ = released.recv_timeout(Duration::from_secs(30));
    });
    is_taken.recv().unwrap();
    (runtime, release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_no_thread_takes_in_time_is_handed_back_never_run_there() {
        let (runtime, release) = starved_runtime();
        let ran = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let work = {
            let ran = Arc::clone(&ran);
            move || {
                ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(std::thread::current().id())
            }
        };
        let started = std::time::Instant::now();
        let back = runtime.block_on(on_blocking_pool_within(Duration::from_millis(100), work));
        let elapsed = started.elapsed();
        let Err(work) = back else {
            panic!("the pool's only thread is taken")
        };
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        // Freed, the pool's thread finds nothing left to do.
        release.send(()).unwrap();
        runtime.block_on(async {
            let more = on_blocking_pool_within(Duration::from_secs(30), || Ok(()));
            assert!(matches!(more.await, Ok(Ok(()))));
        });
        assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(work(), Ok(std::thread::current().id()));
        // With a thread free, the work runs there.
        let there = runtime.block_on(on_blocking_pool_within(Duration::from_secs(30), || {
            Ok(std::thread::current().id())
        }));
        assert!(matches!(there, Ok(Ok(id)) if id != std::thread::current().id()));
    }

    #[test]
    fn a_tool_list_naming_a_tool_twice_is_refused() {
        let list = |ids: &[&str]| ids.iter().map(|id| ToolInfo::new(*id)).collect::<Vec<_>>();
        assert!(check_tool_list(&list(&[])).is_ok());
        assert!(check_tool_list(&list(&["a", "b"])).is_ok());
        let err = check_tool_list(&list(&["a", "b", "a"])).unwrap_err();
        assert!(err.to_string().contains("names tool 'a' twice"), "{err}");
    }

    #[test]
    fn a_tool_list_too_long_or_too_large_is_refused() {
        let many = |n: usize| {
            (0..n)
                .map(|i| ToolInfo::new(format!("t{i}")))
                .collect::<Vec<_>>()
        };
        assert!(check_tool_list(&many(MAX_TOOLS)).is_ok());
        let err = check_tool_list(&many(MAX_TOOLS + 1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid answer from plugin constructor: its tool list names 1025 tools; the host \
             takes at most 1024"
        );
        let big = |n: usize| vec![ToolInfo::new("big").description("d".repeat(n))];
        let at_limit = MAX_TOOL_LIST_BYTES - json_len(&big(0));
        assert_eq!(json_len(&big(at_limit)), MAX_TOOL_LIST_BYTES);
        assert!(check_tool_list(&big(at_limit)).is_ok());
        let err = check_tool_list(&big(at_limit + 1)).unwrap_err();
        assert!(
            err.to_string().contains(
                "its tool list takes 4194305 bytes as JSON; the host takes at most 4194304"
            ),
            "{err}"
        );
    }
}
