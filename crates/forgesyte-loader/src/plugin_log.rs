//! The log lines of in-process plugins: the host's [`LogLineFn`] that a
//! library built with the SDK writes its `log()` lines to (handed to it
//! when it is opened, see `abi::LOG_SINK_SYMBOL`), and the plugin each
//! line is of (the one this thread runs now: a call or a construction).
//!
//! Lines reach the log as records of target
//! `forgesyte_loader::plugin_stderr`, as an isolated plugin's stderr lines
//! do, with the plugin's name and the call's `request_id` and `trace_id`;
//! under `--log-format json` each is one JSON record, where it used to be
//! a bare line on the server's stderr. Only a host opts in
//! ([`route_in_process_logs`]): a runner process keeps writing to stderr,
//! its host's channel.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use forgesyte_protocol::abi::LogLineFn;
use forgesyte_protocol::wire::LogTags;

/// Whether libraries opened from now on get [`host_log_line`].
static ROUTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The plugin this thread runs (empty: none).
    static PLUGIN: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Has every in-process library opened from now on write its SDK log lines
/// to the host's log (the server calls it at start).
pub fn route_in_process_logs() {
    ROUTED.store(true, Ordering::Relaxed);
}

/// The host's log function for a library being opened, when the host
/// routes in-process logs.
pub(crate) fn sink() -> Option<LogLineFn> {
    ROUTED
        .load(Ordering::Relaxed)
        .then_some(host_log_line as LogLineFn)
}

/// Runs `f` as plugin `name` on this thread: its log lines name it.
pub(crate) fn as_plugin<R>(name: &str, f: impl FnOnce() -> R) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = PLUGIN.try_with(|p| p.borrow_mut().clear());
        }
    }
    let _ = PLUGIN.try_with(|p| {
        let mut p = p.borrow_mut();
        p.clear();
        p.push_str(name);
    });
    let _reset = Reset;
    f()
}

/// One log line of an in-process plugin (see the module documentation):
/// the FFI boundary a plugin calls, as `abi::LogLineFn`.
///
/// # Safety
///
/// `line` is null, or valid for reads of `len` bytes.
#[allow(unsafe_code)]
unsafe extern "C" fn host_log_line(line: *const u8, len: usize) {
    if line.is_null() || len > isize::MAX as usize {
        return;
    }
    // SAFETY: the plugin's contract (`abi::LogLineFn`): `len` readable
    // bytes at `line`, not null and within `isize::MAX` (checked above),
    // live for this call.
    let bytes = unsafe { std::slice::from_raw_parts(line, len) };
    // No unwinding into the plugin's frames.
    let _ = std::panic::catch_unwind(|| log_line(&String::from_utf8_lossy(bytes)));
}

/// Logs `text` (a line a plugin wrote, perhaps tagged) for the plugin this
/// thread runs.
fn log_line(text: &str) {
    let (tags, message) = LogTags::split(text);
    let tags = tags.unwrap_or_default();
    let request_id = tags.request_id.as_deref();
    let trace_id = tags.trace_id.as_deref();
    let _ = PLUGIN.try_with(|plugin| {
        let plugin = plugin.borrow();
        let plugin = (!plugin.is_empty()).then_some(plugin.as_str());
        tracing::info!(
            target: "forgesyte_loader::plugin_stderr",
            plugin,
            request_id,
            trace_id,
            "{message}"
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_is_named_while_it_runs_and_only_then() {
        let name = |f: &dyn Fn() -> String| f();
        let current = || PLUGIN.with(|p| p.borrow().clone());
        assert_eq!(name(&current), "");
        let inside = as_plugin("ocr", current);
        assert_eq!(inside, "ocr");
        assert_eq!(current(), "");
        // Reset on unwind too.
        let _ = std::panic::catch_unwind(|| as_plugin("boom", || panic!("x")));
        assert_eq!(current(), "");
    }
}
