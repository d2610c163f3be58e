//! The context of the call a tool runs for: the request id of the HTTP
//! request and its W3C `traceparent`, which the host hands the plugin
//! before each call (through the `forgesyte_plugin_call_context` symbol
//! that [`export_plugin!`](crate::export_plugin) exports), in process and
//! in an isolated runner alike.
//!
//! Owns a thread-local: the host sets it on the thread that runs the call
//! and clears it after, so [`current_call`] inside a tool (on that thread)
//! sees its own call's context. Knows nothing of the host's log.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::OnceLock;

use forgesyte_protocol::abi::LogLineFn;
use forgesyte_protocol::wire::{LOG_TAG_PREFIX, LogTags};

pub use forgesyte_protocol::wire::CallContext;

thread_local! {
    static CURRENT: RefCell<Option<CallContext>> = const { RefCell::new(None) };
}

/// Where [`log`] writes when the host gave it a function (an in-process
/// plugin: the host's log), and the context the host hands back with each
/// line (an address, kept as a number to live in a static); else stderr.
static LOG_SINK: OnceLock<(LogLineFn, usize)> = OnceLock::new();

/// The context of the call running on this thread (`None` outside a call,
/// on another thread, or when the request had neither an id nor a trace).
pub fn current_call() -> Option<CallContext> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Writes `message` as one line to the host's log, tagged with the current
/// call's request id and trace id when there is one: in process through
/// the function the host handed the library (`abi::LOG_SINK_SYMBOL`),
/// which logs it as a record with the plugin's name and those ids; in a
/// runner (or under a host without that function) to stderr, which the
/// runner's host logs the same way. Newlines in `message` are replaced by
/// spaces, so it stays one line. A line that cannot be written (stderr
/// closed) is lost.
pub fn log(message: &str) {
    let message = message.replace(['\n', '\r'], " ");
    let line = match current_call() {
        Some(call) => {
            let tags = LogTags {
                trace_id: call.trace_id().map(str::to_owned),
                request_id: call.request_id,
            };
            match serde_json::to_string(&tags) {
                Ok(json) => format!("{LOG_TAG_PREFIX}{json} {message}"),
                Err(_) => message,
            }
        }
        None => message,
    };
    match LOG_SINK.get() {
        // SAFETY: the host's function and context (`__set_log_sink`); the
        // function copies the `len` bytes at the pointer, live for the
        // call.
        #[allow(unsafe_code)]
        Some(&(sink, context)) => unsafe {
            sink(
                context as *const std::ffi::c_void,
                line.as_ptr(),
                line.len(),
            )
        },
        None => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
}

/// Takes the host's log function and its context (the first given; none
/// leaves [`log`] on stderr). Called by the symbol
/// [`export_plugin!`](crate::export_plugin) exports, not by plugins.
///
/// # Safety
///
/// `sink` is the host's, callable with `context` from any thread for as
/// long as the library is loaded.
#[doc(hidden)]
#[allow(unsafe_code)]
pub unsafe fn __set_log_sink(sink: Option<LogLineFn>, context: *const std::ffi::c_void) {
    if let Some(sink) = sink
        && LOG_SINK.set((sink, context as usize)).is_ok()
    {
        // In the server's process, this library's own standard library
        // would print a panic (its message, its place, a backtrace)
        // straight to the server's stderr, outside its log: a message
        // quoting input could forge the log's lines. Through the host's
        // log it is one escaped line of the plugin's (the call that
        // panicked reports the message as its `ToolPanic` too). A hook the
        // plugin sets later replaces this one.
        std::panic::set_hook(Box::new(|info| log(&info.to_string())));
    }
}

/// Sets (or, for a null pointer, clears) this thread's call context from
/// the host's JSON; what is not a JSON context clears it. Called by the
/// symbol [`export_plugin!`](crate::export_plugin) exports, not by plugins.
///
/// # Safety
///
/// `json` is null, or valid for reads of `len` bytes.
#[doc(hidden)]
#[allow(unsafe_code)]
pub unsafe fn __set_from_host(json: *const u8, len: usize) {
    // A length no slice may have is no context (as a null pointer is).
    let context = if json.is_null() || len == 0 || len > isize::MAX as usize {
        None
    } else {
        // SAFETY: the caller's contract: `len` readable bytes at `json`;
        // not null, and within `isize::MAX` (checked above).
        let bytes = unsafe { std::slice::from_raw_parts(json, len) };
        serde_json::from_slice::<CallContext>(bytes).ok()
    };
    // No unwinding out of an `extern "C"` function: a context that cannot
    // be stored (this thread's locals being torn down) is dropped.
    let caught = std::panic::catch_unwind(|| {
        let _ = CURRENT.try_with(|c| *c.borrow_mut() = context);
    });
    if let Err(payload) = caught {
        // Not dropped: its `Drop` could panic again, unguarded.
        let _leaked = std::mem::ManuallyDrop::new(payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_host_sets_and_clears_this_threads_context() {
        assert_eq!(current_call(), None);
        let json = br#"{"request_id":"abc-123","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#;
        // SAFETY: a live byte string and its length.
        unsafe { __set_from_host(json.as_ptr(), json.len()) };
        let call = current_call().unwrap_or_default();
        assert_eq!(call.request_id.as_deref(), Some("abc-123"));
        assert_eq!(call.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        // Another thread sees none.
        assert_eq!(std::thread::spawn(current_call).join().ok().flatten(), None);
        // SAFETY: null clears.
        unsafe { __set_from_host(std::ptr::null(), 0) };
        assert_eq!(current_call(), None);
        // Garbage clears too.
        // SAFETY: a live byte string and its length.
        unsafe { __set_from_host(b"[1]".as_ptr(), 3) };
        assert_eq!(current_call(), None);
        // A length no slice may have is no context, read of nothing.
        // SAFETY: the length is refused before the pointer is read.
        unsafe { __set_from_host(json.as_ptr(), usize::MAX) };
        assert_eq!(current_call(), None);
    }

    static LOGGED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    #[allow(unsafe_code)]
    unsafe extern "C" fn collect(context: *const std::ffi::c_void, line: *const u8, len: usize) {
        assert_eq!(context as usize, 42, "the context handed back");
        // SAFETY: the SDK's call: `len` bytes at `line`, live for the call.
        let bytes = unsafe { std::slice::from_raw_parts(line, len) };
        if let Ok(mut logged) = LOGGED.lock() {
            logged.push(String::from_utf8_lossy(bytes).into_owned());
        }
    }

    /// Once the host handed a log function, `log` writes there, one line
    /// tagged with the call; the first function given stays.
    #[test]
    #[allow(unsafe_code)]
    fn log_writes_to_the_hosts_function_once_given() {
        // SAFETY: `collect` takes any context and copies the line.
        unsafe {
            __set_log_sink(None, std::ptr::null());
            __set_log_sink(Some(collect), 42 as *const std::ffi::c_void);
        }
        let json = br#"{"request_id":"r-1"}"#;
        // SAFETY: a live byte string and its length.
        unsafe { __set_from_host(json.as_ptr(), json.len()) };
        log("two\nlines");
        // SAFETY: null clears.
        unsafe { __set_from_host(std::ptr::null(), 0) };
        log("outside");
        let logged = LOGGED.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(
            logged,
            [r#"@call {"request_id":"r-1"} two lines"#, "outside"]
        );
    }
}
