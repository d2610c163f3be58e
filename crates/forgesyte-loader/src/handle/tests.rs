use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;

use forgesyte_registry::PluginInfo;
use parking_lot::Mutex;

use super::*;

/// An isolated "runner" whose call of `wait` blocks until the test
/// releases it, and which counts the kills it gets.
#[derive(Debug)]
struct Runner {
    tools: Vec<ToolInfo>,
    entered: Mutex<Option<mpsc::Sender<()>>>,
    release: Mutex<Option<mpsc::Receiver<()>>>,
    kills: AtomicU32,
}

impl Runner {
    fn new() -> (Arc<Self>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let runner = Arc::new(Runner {
            tools: vec![ToolInfo::new("wait")],
            entered: Mutex::new(Some(entered_tx)),
            release: Mutex::new(Some(release_rx)),
            kills: AtomicU32::new(0),
        });
        (runner, entered_rx, release_tx)
    }
}

impl PluginInstance for Runner {
    fn tools(&self) -> &[ToolInfo] {
        &self.tools
    }

    fn call(&self, _tool: &str, _args: &[u8]) -> Result<Vec<u8>, ToolError> {
        let release = self.release.lock().take();
        if let Some(tx) = self.entered.lock().take() {
            let _ = tx.send(());
        }
        if let Some(rx) = release {
            let _ = rx.recv();
        }
        Ok(b"null".to_vec())
    }

    fn kill(&self, _reason: &str) -> bool {
        self.kills.fetch_add(1, Ordering::SeqCst);
        true
    }
}

/// A registry holding plugin `p`, INITIALIZED.
fn registry_with_p() -> Registry {
    let registry = Registry::new();
    registry.register("p", PluginInfo::default()).unwrap();
    registry.mark_initialized("p").unwrap();
    registry
}

/// The race of a call whose thread stalls before it marks the call
/// running: its caller gives up on it, a reload retires the handle,
/// then the thread marks the (reloaded) name running. It must undo its
/// own mark: nothing else would finish that call.
#[test]
fn a_call_given_up_on_before_it_started_leaves_nothing_in_flight() {
    let registry = registry_with_p();
    let (runner, _entered, _release) = Runner::new();
    let runner = Arc::try_unwrap(runner).expect("the only reference");
    let handle = PluginHandle::new(
        "p".into(),
        registry.clone(),
        Box::new(runner),
        Some(Duration::from_millis(10)),
    );
    let ticket = CallTicket::new();
    // No plugin code ran: not a timeout of the plugin's, nor blamed,
    // nor counted; the caller takes the thread's answer.
    assert_eq!(
        handle.fail_timeout("wait", Duration::from_millis(10), &ticket),
        None
    );
    let status = registry.get_status("p").unwrap();
    assert_eq!(status.state, PluginLifecycleState::Initialized);
    assert_eq!((status.error_count, status.in_flight), (0, 0));

    handle.retire();
    let late = handle.call_ticketed(
        "wait",
        &serde_json::json!({}),
        &[],
        &CallContext::default(),
        &ticket,
    );
    assert!(
        matches!(late, Err(CallError::Interrupted { .. })),
        "{late:?}"
    );
    let status = registry.get_status("p").unwrap();
    assert_eq!(status.state, PluginLifecycleState::Initialized);
    assert_eq!((status.error_count, status.in_flight), (0, 0));
    // Given up on once started, the call is the plugin's: counted (the
    // handle is retired, so its plugin is not marked FAILED here).
    let ticket = CallTicket::new();
    assert!(ticket.start());
    registry.mark_running("p").unwrap();
    assert!(
        handle
            .fail_timeout("wait", Duration::from_millis(10), &ticket)
            .is_some()
    );
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.error_count, status.in_flight), (1, 0));
}

#[test]
fn a_timed_out_isolated_call_kills_its_own_runner_not_a_newer_one() {
    let registry = registry_with_p();
    let (old, entered, release) = Runner::new();
    let slot = Arc::new(Slot::new(
        "p".into(),
        registry.clone(),
        Arc::clone(&old) as Arc<dyn PluginInstance>,
    ));
    let handle = PluginHandle {
        inner: Arc::new(Inner {
            slot: Arc::clone(&slot),
            call_timeout: Some(Duration::from_secs(1)),
            isolation: Isolation::Process,
            supervisor: None,
        }),
    };
    let ticket = CallTicket::new();
    let call = {
        let (handle, ticket) = (handle.clone(), ticket.clone());
        std::thread::spawn(move || {
            handle
                .call_ticketed(
                    "wait",
                    &serde_json::json!({}),
                    &[],
                    &CallContext::default(),
                    &ticket,
                )
                .map(|o| o.result)
        })
    };
    entered.recv().unwrap();
    // A restart put another runner in place while the call waits on
    // the first.
    let (new, _entered, _release) = Runner::new();
    slot.replace_unless_retired(Arc::clone(&new) as Arc<dyn PluginInstance>, || {})
        .unwrap();

    let reason = handle.fail_timeout("wait", Duration::from_secs(1), &ticket);
    assert!(reason.is_some_and(|r| r.contains("Timeout")));
    assert_eq!(old.kills.load(Ordering::SeqCst), 1, "the call's runner");
    assert_eq!(new.kills.load(Ordering::SeqCst), 0, "not the newer one");

    release.send(()).unwrap();
    assert_eq!(call.join().unwrap().unwrap(), serde_json::Value::Null);
    // A call that has returned is not timed out: nothing is killed.
    assert_eq!(
        handle.fail_timeout("wait", Duration::from_secs(1), &ticket),
        None
    );
    assert_eq!(old.kills.load(Ordering::SeqCst), 1);
}

/// An isolated "runner" whose calls are awaited while it holds an
/// answer channel, and made on a thread (counted) otherwise.
#[derive(Debug)]
struct Awaiting {
    tools: Vec<ToolInfo>,
    answer: Mutex<Option<tokio::sync::oneshot::Receiver<Vec<u8>>>>,
    on_thread: AtomicU32,
}

impl PluginInstance for Awaiting {
    fn tools(&self) -> &[ToolInfo] {
        &self.tools
    }

    fn call(&self, _tool: &str, _args: &[u8]) -> Result<Vec<u8>, ToolError> {
        self.on_thread.fetch_add(1, Ordering::SeqCst);
        Ok(br#""thread""#.to_vec())
    }

    fn awaitable(&self, _tool: &str, _args: &[u8], _context: &CallContext) -> bool {
        self.answer.lock().is_some()
    }

    fn call_async(
        self: Arc<Self>,
        tool: &str,
        args: Vec<u8>,
        context: &CallContext,
    ) -> crate::host::AsyncCall {
        let Some(answer) = self.answer.lock().take() else {
            // What an instance that cannot await does: a thread's call.
            return Box::pin(crate::host::call_on_thread(
                self,
                tool.to_owned(),
                args,
                context.clone(),
            ));
        };
        Box::pin(async move {
            answer
                .await
                .map(crate::host::CallOutput::json)
                .map_err(|_| ToolError::Protocol {
                    detail: "no answer".into(),
                })
        })
    }
}

/// An isolated plugin `p` of `registry` on an [`Awaiting`] instance (its
/// answer channel `answer`), and its handle.
fn awaiting(
    registry: &Registry,
    answer: Option<tokio::sync::oneshot::Receiver<Vec<u8>>>,
) -> (Arc<Awaiting>, PluginHandle) {
    let instance = Arc::new(Awaiting {
        tools: vec![ToolInfo::new("t")],
        answer: Mutex::new(answer),
        on_thread: AtomicU32::new(0),
    });
    let handle = PluginHandle {
        inner: Arc::new(Inner {
            slot: Arc::new(Slot::new(
                "p".into(),
                registry.clone(),
                Arc::clone(&instance) as Arc<dyn PluginInstance>,
            )),
            call_timeout: Some(Duration::from_secs(10)),
            isolation: Isolation::Process,
            supervisor: None,
        }),
    };
    (instance, handle)
}

#[tokio::test]
async fn an_awaited_call_is_in_flight_until_its_answer_and_recorded_once() {
    let registry = registry_with_p();
    let (instance, handle) = awaiting(&registry, None);
    let counts = || {
        let s = registry.get_status("p").unwrap();
        (s.state, s.in_flight, s.success_count, s.error_count)
    };
    let context = CallContext::default();
    let args = serde_json::json!({});
    // Without an answer channel the fake cannot await its calls.
    assert!(handle.awaitable("t", &args, &context).is_none());
    // Nor arguments no request frame written at once holds.
    let (_tx, rx) = tokio::sync::oneshot::channel();
    *instance.answer.lock() = Some(rx);
    let big = serde_json::json!({"x": "y".repeat(libc::PIPE_BUF)});
    assert!(handle.awaitable("t", &big, &context).is_none());
    *instance.answer.lock() = None;
    let call = |handle: &PluginHandle, awaitable: Awaitable| {
        let handle = handle.clone();
        tokio::spawn(async move {
            handle
                .call_ticketed_async("t", awaitable, &CallContext::default(), &CallTicket::new())
                .await
                .map(|o| o.result)
        })
    };
    let in_flight = || async {
        while registry.get_status("p").unwrap().in_flight == 0 {
            tokio::task::yield_now().await;
        }
    };
    use PluginLifecycleState::{Initialized, Running as Busy};

    // Awaited: in flight (RUNNING) until the answer comes, then counted.
    let (tx, rx) = tokio::sync::oneshot::channel();
    *instance.answer.lock() = Some(rx);
    let awaitable = handle.awaitable("t", &args, &context).unwrap();
    let awaited = call(&handle, awaitable);
    in_flight().await;
    assert_eq!(counts(), (Busy, 1, 0, 0));
    tx.send(br#"{"ok":1}"#.to_vec()).unwrap();
    assert_eq!(
        awaited.await.unwrap().unwrap(),
        serde_json::json!({"ok": 1})
    );
    assert_eq!(counts(), (Initialized, 0, 1, 0));
    assert_eq!(instance.on_thread.load(Ordering::SeqCst), 0);

    // No longer awaitable when called (another instance in its place,
    // say): made on a thread, recorded the same way.
    let stale = Awaitable {
        args: b"{}".to_vec(),
    };
    assert_eq!(call(&handle, stale).await.unwrap().unwrap(), "thread");
    assert_eq!(counts(), (Initialized, 0, 2, 0));
    assert_eq!(instance.on_thread.load(Ordering::SeqCst), 1);

    // Dropped before its answer: no longer in flight, not counted.
    let (_tx, rx) = tokio::sync::oneshot::channel();
    *instance.answer.lock() = Some(rx);
    let dropped = call(&handle, handle.awaitable("t", &args, &context).unwrap());
    in_flight().await;
    dropped.abort();
    assert!(dropped.await.unwrap_err().is_cancelled());
    assert_eq!(counts(), (Initialized, 0, 2, 0));
}

#[test]
fn an_awaited_call_s_large_result_needs_no_free_thread() {
    // Every thread of the blocking pool busy (slow in-process calls): a
    // result over 64 KiB is read in the task rather than waiting for one.
    let (runtime, release) = crate::host::starved_runtime();
    let registry = registry_with_p();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (_instance, handle) = awaiting(&registry, Some(rx));
    let context = CallContext::default();
    let awaitable = handle
        .awaitable("t", &serde_json::json!({}), &context)
        .unwrap();
    let large = "x".repeat(100 * 1024);
    tx.send(serde_json::to_vec(&large).unwrap()).unwrap();
    let started = std::time::Instant::now();
    let result =
        runtime.block_on(handle.call_ticketed_async("t", awaitable, &context, &CallTicket::new()));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(result.unwrap().result, serde_json::Value::String(large));
    assert_eq!(registry.get_status("p").unwrap().success_count, 1);
    drop(release);
}

/// An instance whose every call waited its whole limit for its turn and
/// was never sent (`QueueTimedOut`), and then answers.
#[derive(Debug)]
struct Queued {
    tools: Vec<ToolInfo>,
    queued: std::sync::atomic::AtomicBool,
}

impl PluginInstance for Queued {
    fn tools(&self) -> &[ToolInfo] {
        &self.tools
    }

    fn call(&self, _tool: &str, _args: &[u8]) -> Result<Vec<u8>, ToolError> {
        if self.queued.swap(false, Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            return Err(ToolError::QueueTimedOut {
                after: Duration::from_millis(50),
            });
        }
        Ok(b"null".to_vec())
    }
}

/// A call that never reached the plugin (it timed out in the queue) is
/// neither an error of the plugin's nor a time in its figures: the
/// caller gets `QueueTimedOut`, the counts and timings stay as they were.
#[test]
fn a_call_that_never_reached_the_plugin_is_not_counted() {
    let registry = registry_with_p();
    let handle = PluginHandle::new(
        "p".into(),
        registry.clone(),
        Box::new(Queued {
            tools: vec![ToolInfo::new("t")],
            queued: true.into(),
        }),
        None,
    );
    let queued = handle.call("t", &serde_json::json!({}));
    assert!(
        matches!(
            queued,
            Err(CallError::Tool(ToolError::QueueTimedOut { .. }))
        ),
        "{queued:?}"
    );
    let status = registry.get_status("p").unwrap();
    assert_eq!(status.state, PluginLifecycleState::Initialized);
    assert_eq!(
        (status.error_count, status.success_count, status.in_flight),
        (0, 0, 0)
    );
    assert_eq!(status.last_execution_time_ms, None);
    handle.call("t", &serde_json::json!({})).unwrap();
    let status = registry.get_status("p").unwrap();
    assert_eq!((status.error_count, status.success_count), (0, 1));
}

/// A result the host cannot read because of one of its values (nested too
/// deep, a number past a float's range) is the tool's error; text that is
/// not JSON is the runner's fault.
#[test]
fn a_result_value_the_host_cannot_read_is_the_tool_s_error() {
    let parse = |text: &str| result_error(serde_json::from_str::<Value>(text).unwrap_err());
    for (text, kind) in [
        ("[1e400]", "ValueError"),
        (&format!("{{\"n\": -{}}}", "9".repeat(400)), "ValueError"),
        (&"[".repeat(200), "ResultTooDeep"),
    ] {
        match parse(text) {
            ToolError::Failed { error_type, .. } => {
                assert_eq!(error_type.as_deref(), Some(kind), "{text:.20}")
            }
            other => panic!("{text:.20}: {other:?}"),
        }
    }
    assert!(matches!(parse("{\"a\": tru}"), ToolError::Protocol { .. }));
}
