//! The rescan of the plugins directory ([`forgesyte_loader::Loader::rescan`])
//! and its three triggers: `POST /v1/plugins/reload` ([`crate::reload`]),
//! `SIGHUP`, and `serve --watch` ([`crate::watch`]).
//!
//! [`rescan`] is the one function all three run; its result is the
//! serialisable [`ReloadReport`], logged here (and publishable elsewhere).
//! Every trigger takes the one admin claim ([`AppState::begin_admin`]): a
//! signal or a file change while the startup load pass or another admin
//! operation runs waits for it, then rescans once. Knows the state and the
//! loader's rescan; nothing of routes, requests or the token.

use std::sync::Arc;
use std::time::Duration;

use crate::error::ApiError;
use crate::state::{AdminGuard, AppState};
use crate::wire::ReloadReport;

/// The trigger of a rescan for a file change (`serve --watch`).
pub(crate) const WATCH: &str = "watch";

/// How long a signal or file change waits for a busy admin claim.
const WAIT_FOR_CLAIM: Duration = Duration::from_secs(600);

/// Runs the loader's rescan on the blocking pool under `guard` (released
/// when it ends), logs its result and publishes it on the event stream
/// (`reload`, with the trigger), in a task of its own: an admin client that
/// hangs up mid-rescan (its handler dropped) leaves all of that done, the
/// metrics of removed plugins forgotten included.
pub(crate) async fn rescan(
    state: &AppState,
    guard: AdminGuard,
    trigger: &str,
) -> Result<ReloadReport, ApiError> {
    let (state, trigger) = (state.clone(), trigger.to_owned());
    tokio::spawn(async move { rescan_to_the_end(&state, guard, &trigger).await })
        .await
        .map_err(|e| ApiError::Internal {
            context: format!("rescan of the plugins directory failed: {e}"),
        })?
}

async fn rescan_to_the_end(
    state: &AppState,
    guard: AdminGuard,
    trigger: &str,
) -> Result<ReloadReport, ApiError> {
    let loader = Arc::clone(state.loader());
    // The claim is held until the pass's metrics and event are out: the
    // next admin operation's come after this one's.
    // A file change retries no FAILED plugin: an operator's rescan does.
    let retry = if trigger == WATCH {
        forgesyte_loader::Retry::Unavailable
    } else {
        forgesyte_loader::Retry::Terminal
    };
    let (report, _guard) = crate::pool::on_a_thread("forgesyte-rescan", move || {
        (loader.rescan_retrying(retry), guard)
    })
    .await
    .map_err(|e| ApiError::Internal {
        context: format!("rescan of the plugins directory failed: {e}"),
    })?;
    let summary = report.summary();
    // A rescan that ended, having listed the plugins directory, looked at
    // every plugin again.
    if !report.unlisted {
        state.set_load_failed(false);
    }
    state.metrics().record_load_pass(&report.plugins());
    for removed in &report.removed {
        // Also when a plugin of the same name took its place in this
        // rescan (a directory renamed): that one counts from zero, as its
        // status does. (Its calls in the moment between its registration
        // and this line are in its status, not in these series.)
        state.metrics().forget_plugin(&removed.name);
    }
    let reloaded: Vec<&str> = report
        .changed
        .iter()
        .chain(&report.retried)
        .chain(&report.added)
        .map(|outcome| outcome.name.as_str())
        .collect();
    forget_gone_tools(state, &reloaded);
    let mut report = ReloadReport::from(report);
    // Installed plugins that could not be listed (this rescan's discovery,
    // under the admin claim it holds): none was added or removed, with no
    // word of it. (One whose files changed is still reloaded.)
    if let Some(why) = state.loader().entry_points_error() {
        let said =
            format!("the installed plugins could not be listed ({why}): none was added or removed");
        report.warning = Some(match report.warning.take() {
            Some(first) => format!("{first}; {said}"),
            None => said,
        });
    }
    // Names joined by commas: one type per field in the JSON log.
    let names = |names: &mut dyn Iterator<Item = &str>| names.collect::<Vec<_>>().join(",");
    tracing::info!(
        %trigger,
        added = %names(&mut report.added.iter().map(String::as_str)),
        changed = %names(&mut report.changed.iter().map(String::as_str)),
        retried = %names(&mut report.retried.iter().map(String::as_str)),
        removed = %names(&mut report.removed.iter().map(|r| r.name.as_str())),
        "Rescan ({trigger}): {summary}"
    );
    state.events().reload_finished(trigger, &report);
    Ok(report)
}

/// Drops the metric series of the tools that `plugins` (loaded again) no
/// longer offer, for each that is live now (one that failed keeps its
/// series: its tools may come back).
pub(crate) fn forget_gone_tools(state: &AppState, plugins: &[&str]) {
    for name in plugins {
        if let Some(handle) = state.loader().handle(name) {
            let tools = handle.tools();
            let live: Vec<&str> = tools.iter().map(|t| t.id.as_str()).collect();
            state.metrics().forget_gone_tools(name, &live);
        }
    }
}

/// Waits (bounded) for the admin claim, then rescans; for the triggers
/// that have no client to answer 409 to. The rescan's report, when one ran
/// to its end (`serve --watch` reads which plugins it loaded).
pub(crate) async fn rescan_when_free(state: &AppState, trigger: &str) -> Option<ReloadReport> {
    let guard = claim_when_free(state, "Rescan", trigger).await?;
    rescan(state, guard, trigger)
        .await
        .inspect_err(|e| tracing::error!(%trigger, "Rescan ({trigger}) failed: {e}"))
        .ok()
}

/// The admin claim, waited for (bounded); `None` when the wait gave up or
/// the server is stopping (logged: `what` and its `trigger`).
pub(crate) async fn claim_when_free(
    state: &AppState,
    what: &str,
    trigger: &str,
) -> Option<AdminGuard> {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_CLAIM;
    loop {
        if state.loader().is_shutting_down() {
            tracing::info!(%trigger, "{what} ({trigger}) dropped: the server is shutting down");
            return None;
        }
        match state.begin_admin() {
            Ok(guard) => return Some(guard),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%trigger, "{what} waits: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                tracing::warn!(%trigger, "{what} ({trigger}) dropped: {e}");
                return None;
            }
        }
    }
}

/// Starts the settling of dependents after crashes and supervisor
/// restarts, for as long as the runtime lives: a plugin its supervisor
/// brought back (INITIALIZED after a restart) may have dependents that
/// were checked while it was down (a crash during the startup pass) and
/// are UNAVAILABLE over it, and a plugin whose restarts are spent has
/// dependents still available over it; they are loaded again
/// ([`Loader::settle`](forgesyte_loader::Loader::settle)), under the admin
/// claim, once no other pass runs and only when one is unsettled; and the
/// metric series of tools a new instance no longer lists are forgotten.
/// Wake-ups close together are taken once.
pub(crate) fn start_settling(state: &AppState) {
    let wake = Arc::new(tokio::sync::Notify::new());
    state
        .registry()
        .add_observer(Arc::new(settle_observer(Arc::clone(&wake))));
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            // A pass in progress (the startup pass, a reload, a rescan)
            // shows plugins half reloaded, which the check below would
            // misread, and may leave a dependent it loaded before the crash
            // it is woken for: it is waited for first.
            let deadline = tokio::time::Instant::now() + WAIT_FOR_CLAIM;
            while state.is_loading() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = state.admin_ended(deadline).await;
            // Mostly nothing to settle (a crash whose restart is
            // scheduled): then the admin claim is not taken, and an admin
            // request at that moment is not refused 409.
            if state.loader().has_unsettled_dependents()
                && let Some(guard) = claim_when_free(&state, "Settling dependents", "restart").await
            {
                let loader = Arc::clone(state.loader());
                let _ = crate::pool::on_a_thread("forgesyte-settle", move || {
                    loader.settle();
                    drop(guard);
                })
                .await;
            }
            // A restarted instance may list other tools than the one
            // before: the metric series of tools gone go, as at a rescan
            // (an instance naming its tools anew each time added series
            // at every crash).
            let names: Vec<String> = state
                .registry()
                .list_all()
                .into_iter()
                .map(|p| p.name)
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            forget_gone_tools(&state, &names);
        }
    });
}

/// The registry observer of [`start_settling`]: wakes its task (a permit
/// stored in `wake`, nothing more: it runs under the registry's write
/// lock) when a supervisor restart ends INITIALIZED, and at every crash
/// (its dependents follow a dependency whose restarts are spent; one whose
/// restart is scheduled leaves them as they are), and when a plugin becomes
/// FAILED or UNAVAILABLE otherwise (an in-process plugin's panic). A reload
/// of a plugin restarted once is no restart.
fn settle_observer(
    wake: Arc<tokio::sync::Notify>,
) -> impl Fn(&forgesyte_registry::Change<'_>) + Send + Sync {
    use forgesyte_registry::{ChangeKind, PluginLifecycleState};
    // The plugins a restart began for, until it ends.
    let restarting = std::sync::Mutex::new(std::collections::HashSet::<String>::new());
    move |change| {
        // A tool call's two moves: nothing to look at, and no lock taken
        // on the call path.
        if change.is_call_bookkeeping() {
            return;
        }
        let mut restarting = restarting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match change.kind {
            ChangeKind::Restarting => {
                restarting.insert(change.plugin.to_owned());
            }
            // Taken out of the set as it is matched. RUNNING at once when
            // a call still counted in flight (it began before the crash)
            // outlived the restart: a tool call's own moves are filtered
            // out above, so this one is from LOADED.
            ChangeKind::State
                if matches!(
                    change.to,
                    PluginLifecycleState::Initialized | PluginLifecycleState::Running
                ) && restarting.remove(change.plugin) =>
            {
                wake.notify_one();
            }
            ChangeKind::Crashed => {
                restarting.remove(change.plugin);
                wake.notify_one();
            }
            // A FAILED plugin's reason changed (a restart that could not be
            // scheduled says so).
            ChangeKind::Reason if change.to == PluginLifecycleState::Failed => {
                wake.notify_one();
            }
            // Back to FAILED or UNAVAILABLE (a reload, or an in-process
            // plugin a panic made FAILED for good: no supervisor restarts
            // it, so its dependents follow at once), or registered anew
            // (removed and added by a rescan): no restart of it ends.
            ChangeKind::State
                if matches!(
                    change.to,
                    PluginLifecycleState::Failed | PluginLifecycleState::Unavailable
                ) =>
            {
                restarting.remove(change.plugin);
                wake.notify_one();
            }
            ChangeKind::Registered => {
                restarting.remove(change.plugin);
            }
            _ => {}
        }
    }
}

/// Starts the `SIGHUP` listener, which lives as long as the runtime
/// ([`crate::server`] starts it, beside `serve --watch`'s watcher).
#[cfg(unix)]
pub(crate) fn start_sighup(state: &AppState) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot listen for SIGHUP: rescans only through the admin route");
            return;
        }
    };
    let state = state.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            // A storm (a script that signals once per file it changed, a
            // process manager's reload loop) is one rescan: the signals of
            // the next moment are merged into the first. Each one that came
            // after a rescan ended started another: 1,000 in a second ran
            // 763 rescans, and a FAILED plugin was constructed 57 times.
            let mut merged = 0u32;
            let settle = tokio::time::sleep(SIGHUP_SETTLE);
            tokio::pin!(settle);
            loop {
                tokio::select! {
                    () = &mut settle => break,
                    more = hangup.recv() => match more {
                        Some(()) => merged = merged.saturating_add(1),
                        None => break,
                    },
                }
            }
            if merged == 0 {
                tracing::info!("SIGHUP received: rescanning the plugins directory");
            } else {
                tracing::info!(
                    merged,
                    "SIGHUP received ({} more merged into it): rescanning the plugins directory",
                    merged
                );
            }
            let _ = rescan_when_free(&state, "SIGHUP").await;
        }
    });
}

/// How long after a `SIGHUP` more of them are merged into its rescan.
#[cfg(unix)]
const SIGHUP_SETTLE: std::time::Duration = std::time::Duration::from_millis(300);

#[cfg(not(unix))]
pub(crate) fn start_sighup(_state: &AppState) {}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use forgesyte_registry::{ExitInfo, PluginInfo, Registry};
    use futures_util::FutureExt as _;

    /// Whether `wake` held a permit (taken now).
    fn woken(wake: &tokio::sync::Notify) -> bool {
        wake.notified().now_or_never().is_some()
    }

    /// The settle task wakes at a crash and when a restart ends, never for
    /// a reload of a plugin restarted once.
    #[test]
    fn the_settle_task_wakes_at_crashes_and_at_the_end_of_restarts_only() {
        let registry = Registry::new();
        let wake = Arc::new(tokio::sync::Notify::new());
        registry.add_observer(Arc::new(super::settle_observer(Arc::clone(&wake))));
        registry.register("p", PluginInfo::default()).unwrap();
        registry.mark_initialized("p").unwrap();
        assert!(!woken(&wake), "a load is no restart");
        registry
            .mark_crashed("p", "CrashError: exited with code 3", ExitInfo::default())
            .unwrap();
        assert!(woken(&wake), "a crash wakes it");
        registry.mark_restarting("p").unwrap();
        assert!(!woken(&wake), "a restart that begins");
        registry.mark_initialized("p").unwrap();
        assert!(woken(&wake), "a restart that ended");
        // A reload of it later: LOADED, then INITIALIZED again.
        registry.mark_loaded("p", None).unwrap();
        registry.mark_initialized("p").unwrap();
        assert!(!woken(&wake), "a reload is no restart");
        drop(registry.begin_call("p").unwrap());
        assert!(!woken(&wake), "a tool call");
        // A restart that ends while a call of the crashed instance is
        // still counted: LOADED to RUNNING.
        let call = registry.begin_call("p").unwrap();
        registry
            .mark_crashed("p", "CrashError: exited with code 3", ExitInfo::default())
            .unwrap();
        assert!(woken(&wake), "a crash wakes it");
        registry.mark_restarting("p").unwrap();
        registry.mark_initialized("p").unwrap();
        assert_eq!(
            registry.get_status("p").map(|s| s.state),
            Some(forgesyte_registry::PluginLifecycleState::Running)
        );
        assert!(woken(&wake), "a restart that ended with a call in flight");
        drop(call);
        assert!(!woken(&wake), "that call's end");
    }
}
