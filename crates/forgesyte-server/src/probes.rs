//! Kubernetes-style probes: `GET /livez` and `GET /readyz`.
//!
//! - **Live** while the process serves HTTP: `/livez` has no check that a
//!   plugin could fail, so a broken plugin never gets the server restarted.
//! - **Ready** when the startup load pass has finished **and** every plugin
//!   not marked `"optional": true` in its manifest is INITIALIZED or
//!   RUNNING. A plugin that is FAILED, UNAVAILABLE, or LOADED (still being
//!   constructed, restarted or reloaded) keeps the server out of rotation
//!   unless it is optional: "optional" is how an operator says the server is
//!   useful without it. This is the rule `GET /v1/health` uses for `ok`
//!   versus `degraded`.
//!
//! `?verbose` adds `checks`, one entry per check (`load-pass`, then
//! `plugin:NAME` for each plugin, sorted), each with `ok` and a `detail`.

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::respond::json;
use crate::state::{AppState, passes_readiness, plugin_counts};

/// Answer of `GET /livez`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LiveResponse {
    /// Always `ok`.
    pub status: String,
}

/// Answer of `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReadyResponse {
    /// `ok` (200) or `not ready` (503).
    pub status: String,
    /// When not ready: which checks fail, in one sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// With `?verbose`: every check and its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<ReadyCheck>>,
}

/// One readiness check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReadyCheck {
    /// `load-pass`, `entry-points`, or `plugin:NAME`.
    pub name: String,
    /// Whether it passes.
    pub ok: bool,
    /// What was found (`finished`, `INITIALIZED`, `FAILED: reason`, ...).
    pub detail: String,
}

/// The readiness checks over the current state, in a fixed order.
pub(crate) fn ready_checks(state: &AppState) -> Vec<ReadyCheck> {
    let loading = state.is_loading();
    let failed = state.load_failed();
    let mut checks = vec![ReadyCheck {
        name: "load-pass".into(),
        ok: !loading && !failed,
        detail: if loading {
            "the startup load pass is running".into()
        } else if failed {
            "the startup load pass failed: it stopped before it reached every plugin, or it \
             could not list the plugins directory and loaded nothing (see the log); a rescan \
             (SIGHUP, or POST /v1/plugins/reload) runs it again"
                .into()
        } else {
            "finished".into()
        },
    }];
    // Asked for installed plugins, and their interpreter could not list
    // them: none of them is there, which health and readiness said nowhere.
    if let Some(error) = state.loader().entry_points_error() {
        checks.push(ReadyCheck {
            name: "entry-points".into(),
            ok: false,
            detail: format!(
                "the installed plugins (--python-entry-points) were not discovered: {error}; a \
                 rescan (SIGHUP, or POST /v1/plugins/reload) tries again"
            ),
        });
    }
    let snapshot = state.registry().snapshot();
    for status in snapshot.statuses() {
        let available = status.state.is_available();
        let ok = passes_readiness(state, &status.name, available);
        let mut detail = status.state.as_str().to_owned();
        if let Some(reason) = &status.reason {
            detail.push_str(": ");
            detail.push_str(reason);
        }
        if ok && !available {
            detail.push_str(" (optional: does not block readiness)");
        }
        checks.push(ReadyCheck {
            name: format!("plugin:{}", status.name),
            ok,
            detail,
        });
    }
    checks
}

/// Whether `?verbose` is asked for (`?verbose`, `?verbose=1`,
/// `?verbose=true`; a value every switch of the server reads as off,
/// `0`, `false`, `no`, `off`, `n`, `f` in any case, is not: `?verbose=off`
/// got the verbose body).
fn wants_verbose(uri: &Uri) -> bool {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == "verbose").then_some(value)
        })
        .any(|value| crate::config::parse_switch(value) != Ok(false))
}

/// Liveness: 200 while the process serves HTTP.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "server",
    responses((status = 200, description = "The process serves HTTP", body = LiveResponse))
)]
pub(crate) async fn livez() -> Response {
    json(
        StatusCode::OK,
        &LiveResponse {
            status: "ok".into(),
        },
    )
}

/// Readiness: 200 once the startup load pass has finished and every plugin
/// not marked `optional` is available; 503 otherwise. `?verbose` lists the
/// checks.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "server",
    params(("verbose" = Option<bool>, Query, description = "List every check (`?verbose` alone is enough)")),
    responses(
        (status = 200, description = "Ready to take traffic", body = ReadyResponse),
        (status = 503, description = "Not ready: the load pass runs, or a plugin not marked optional is not available", body = ReadyResponse),
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>, uri: Uri) -> Response {
    let verbose = wants_verbose(&uri);
    // Ready and not asked for them, the common case: no check is written
    // out (none fails).
    let checks = if !verbose
        && !state.is_loading()
        && !state.load_failed()
        && state.loader().entry_points_error().is_none()
        && plugin_counts(&state).required_available
    {
        Vec::new()
    } else {
        ready_checks(&state)
    };
    let failing: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    let (status, body) = if failing.is_empty() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    let detail = (!failing.is_empty()).then(|| {
        let shown = failing
            .iter()
            .take(10)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let more = failing.len().saturating_sub(10);
        if more > 0 {
            format!("Not ready: {shown} and {more} more")
        } else {
            format!("Not ready: {shown}")
        }
    });
    json(
        status,
        &ReadyResponse {
            status: body.into(),
            detail,
            checks: verbose.then_some(checks),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_pass_that_failed_is_not_ready_until_a_rescan_ends() {
        let state = AppState::new(
            std::sync::Arc::new(crate::build_loader(&[])),
            &crate::ServerConfig::default(),
        );
        let load_pass = |state: &AppState| ready_checks(state).remove(0);
        assert!(load_pass(&state).ok);
        state.set_load_failed(true);
        let check = load_pass(&state);
        assert!(!check.ok);
        assert!(check.detail.contains("failed"), "{}", check.detail);
        state.set_load_failed(false);
        assert!(load_pass(&state).ok);
    }

    #[test]
    fn verbose_is_a_flag_or_a_truthy_value() {
        let verbose = |q: &str| wants_verbose(&q.parse::<Uri>().unwrap());
        assert!(verbose("/readyz?verbose"));
        assert!(verbose("/readyz?verbose="));
        assert!(verbose("/readyz?verbose=1"));
        assert!(verbose("/readyz?verbose=true"));
        assert!(verbose("/readyz?x=1&verbose"));
        assert!(!verbose("/readyz"));
        assert!(!verbose("/readyz?verbose=0"));
        assert!(!verbose("/readyz?verbose=false"));
        for off in ["no", "off", "OFF", "n", "F"] {
            assert!(!verbose(&format!("/readyz?verbose={off}")), "{off}");
        }
        assert!(verbose("/readyz?verbose=yes"));
        assert!(verbose("/readyz?verbose=on"));
        assert!(!verbose("/readyz?verbosely"));
    }
}
