//! Plugins the host could not start for want of its own resources (file
//! descriptors, processes, memory) are tried again on a backoff, from
//! [`FIRST_RETRY`] doubling up to [`LONGEST_WAIT`], until each has loaded
//! or failed for a reason of its own
//! ([`Loader::retry_host_short`](forgesyte_loader::Loader::retry_host_short)):
//! once the pressure is gone the server heals without an operator's rescan.
//! Each try takes the one admin claim, as a rescan does. Knows the state
//! and the loader; nothing of routes or requests.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use forgesyte_registry::{Change, ChangeKind, PluginLifecycleState};

use crate::rescan::claim_when_free;
use crate::state::AppState;

/// The wait before the first try.
pub(crate) const FIRST_RETRY: Duration = Duration::from_secs(2);
/// The longest wait between two tries.
pub(crate) const LONGEST_WAIT: Duration = Duration::from_secs(60);
/// The trigger the tries are logged with.
const TRIGGER: &str = "host-resources";

/// Starts the task that retries them, for as long as the runtime lives. It
/// looks once at the start and again whenever a plugin goes FAILED.
pub(crate) fn start(state: &AppState) {
    let wake = Arc::new(tokio::sync::Notify::new());
    state
        .registry()
        .add_observer(Arc::new(failed_observer(Arc::clone(&wake))));
    // The load pass may have recorded some already.
    wake.notify_one();
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            retry_while_short(&state, &wake).await;
            if state.loader().is_shutting_down() {
                return;
            }
        }
    });
}

/// Tries the plugins the host was short for until none is left: each newly
/// listed one [`FIRST_RETRY`] after it was, then on the backoff.
async fn retry_while_short(state: &AppState, wake: &tokio::sync::Notify) {
    let mut delay = FIRST_RETRY;
    let mut next = tokio::time::Instant::now() + delay;
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        let short = state.loader().host_short_plugins();
        if short.is_empty() {
            return;
        }
        // One that joined the list meanwhile is not kept waiting for the
        // others' long backoff.
        if short.iter().any(|name| !known.contains(name)) {
            delay = FIRST_RETRY;
            next = next.min(tokio::time::Instant::now() + delay);
        }
        known = short.into_iter().collect();
        // When the next try comes, in each one's status (`next_retry_at`,
        // and a call's `Retry-After`): FAILED without it, a plugin the
        // server heals on its own read as failed for good. (A load clears
        // it.)
        let at = std::time::SystemTime::now()
            + next.saturating_duration_since(tokio::time::Instant::now());
        for name in &known {
            let _ = state.registry().set_next_retry(name, Some(at));
        }
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            // A plugin went FAILED: look at the list again (the time of
            // the next try stays, or comes nearer).
            () = wake.notified() => continue,
        }
        let Some(guard) = claim_when_free(state, "Retrying plugins", TRIGGER).await else {
            if state.loader().is_shutting_down() {
                return;
            }
            next = tokio::time::Instant::now() + delay;
            continue;
        };
        let loader = Arc::clone(state.loader());
        let tried = known.clone();
        let outcomes = match crate::pool::on_a_thread("forgesyte-retry", move || {
            let outcomes = loader.retry_host_short();
            drop(guard);
            outcomes
        })
        .await
        {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::error!(
                    trigger = TRIGGER,
                    "Retrying plugins the host was short for failed: {e}"
                );
                Vec::new()
            }
        };
        // A plugin retried under another name (its manifest could not be
        // read, and names another now) leaves its old name's series.
        for gone in tried
            .iter()
            .filter(|name| state.registry().get_status(name).is_none())
        {
            state.metrics().forget_plugin(gone);
        }
        let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
        crate::rescan::forget_gone_tools(state, &names);
        let loaded = outcomes.iter().filter(|o| o.state.is_available()).count();
        let waiting = state.loader().host_short_plugins();
        delay = delay.saturating_mul(2).min(LONGEST_WAIT);
        next = tokio::time::Instant::now() + delay;
        if waiting.is_empty() {
            tracing::info!(
                trigger = TRIGGER,
                loaded,
                "Retried {} plugin(s) the host had been too short of resources to start: {loaded} loaded",
                outcomes.len()
            );
        } else {
            tracing::warn!(trigger = TRIGGER, loaded, waiting = %waiting.join(","), "Retried {} plugin(s) the host had been too short of resources to start: {loaded} loaded, {} still waiting (next try in {} s)", outcomes.len(), waiting.len(), delay.as_secs());
        }
    }
}

/// Wakes the task whenever a plugin goes FAILED, or a FAILED one's reason
/// changes, or its runner crashed as it loaded (lost with its Python
/// zygote: recorded as a crash, from LOADED); never for the crash of a
/// plugin that was up (its supervisor's) or a tool call.
fn failed_observer(wake: Arc<tokio::sync::Notify>) -> impl Fn(&Change<'_>) + Send + Sync {
    move |change| {
        let as_it_loaded =
            change.kind == ChangeKind::Crashed && change.from == Some(PluginLifecycleState::Loaded);
        if (as_it_loaded || matches!(change.kind, ChangeKind::State | ChangeKind::Reason))
            && change.to == PluginLifecycleState::Failed
        {
            wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use forgesyte_registry::{ExitInfo, PluginInfo, Registry};
    use futures_util::FutureExt as _;

    #[test]
    fn the_retry_task_wakes_when_a_plugin_goes_failed_only() {
        let registry = Registry::new();
        let wake = Arc::new(tokio::sync::Notify::new());
        registry.add_observer(Arc::new(super::failed_observer(Arc::clone(&wake))));
        let woken = || wake.notified().now_or_never().is_some();
        registry.register("p", PluginInfo::default()).unwrap();
        registry.mark_initialized("p").unwrap();
        drop(registry.begin_call("p").unwrap());
        assert!(!woken(), "a load and a call");
        registry.mark_loaded("p", None).unwrap();
        registry
            .mark_failed("p", "ImportError: cannot start x")
            .unwrap();
        assert!(woken(), "a failed load");
        registry.mark_loaded("p", None).unwrap();
        registry
            .mark_unavailable("p", "Missing dependencies: x")
            .unwrap();
        assert!(!woken(), "UNAVAILABLE");
        registry.mark_loaded("p", None).unwrap();
        registry.mark_initialized("p").unwrap();
        registry
            .mark_crashed("p", "CrashError: exited with code 3", ExitInfo::default())
            .unwrap();
        assert!(!woken(), "a crash (its supervisor's)");
        registry
            .mark_failed("p", "ImportError: cannot start y")
            .unwrap();
        assert!(woken(), "a FAILED plugin's new reason");
    }
}
