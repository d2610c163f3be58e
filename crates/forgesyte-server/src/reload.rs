//! The admin routes: `POST /v1/plugins/{name}/reload` and
//! `POST /v1/plugins/reload`.
//!
//! Both need `Authorization: Bearer <token>` ([`crate::admin`]); they are
//! disabled (403) when no admin token is configured. A reload re-reads the
//! manifest, re-checks dependencies, restarts an isolated plugin's process,
//! and retries a FAILED or UNAVAILABLE in-process plugin. In-process
//! libraries are never unloaded (a plugin's thread-local destructors and
//! detached threads could still run code of an unmapped library), so a new
//! build of an in-process library that was already opened needs a server
//! restart; a library that never opened is simply opened on retry.
//!
//! One admin operation runs at a time: a second one, or one during the
//! startup load pass, is refused with 409. The loader's reload blocks (it
//! constructs plugins), so it runs on the blocking pool; it finishes even
//! if the client goes away.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use forgesyte_loader::{LoadReport, PluginLoadOutcome};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorDetail, Shown};
use crate::extract::{ApiPath, Peer, PluginPath};
use crate::respond::json;
use crate::state::AppState;
use crate::wire::PluginStateJson;

/// What reloading one plugin led to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReloadOutcome {
    /// The plugin's registry key.
    pub name: String,
    /// Its plugin directory.
    pub dir: String,
    /// Its state after the reload.
    pub state: PluginStateJson,
    /// Why it is FAILED or UNAVAILABLE; null otherwise.
    #[schema(required = true)]
    pub reason: Option<String>,
    /// How long its reload took, in milliseconds.
    pub elapsed_ms: f64,
}

impl From<PluginLoadOutcome> for ReloadOutcome {
    fn from(o: PluginLoadOutcome) -> Self {
        ReloadOutcome {
            name: o.name,
            dir: o.dir.display().to_string(),
            state: o.state.into(),
            reason: o.reason,
            elapsed_ms: o.elapsed_ms,
        }
    }
}

/// What reloading every plugin led to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReloadReport {
    /// Every plugin, sorted by name.
    pub plugins: Vec<ReloadOutcome>,
    /// Plugins available after the reload.
    pub loaded: usize,
    /// Plugins FAILED after the reload.
    pub failed: usize,
    /// Plugins UNAVAILABLE after the reload.
    pub unavailable: usize,
    /// Wall time of the whole reload, in milliseconds.
    pub elapsed_ms: f64,
}

impl From<LoadReport> for ReloadReport {
    fn from(report: LoadReport) -> Self {
        let (loaded, failed, unavailable) =
            (report.loaded(), report.failed(), report.unavailable());
        let mut plugins: Vec<ReloadOutcome> = report
            .plugins
            .into_iter()
            .map(ReloadOutcome::from)
            .collect();
        plugins.sort_by(|a, b| a.name.cmp(&b.name));
        ReloadReport {
            plugins,
            loaded,
            failed,
            unavailable,
            elapsed_ms: report.elapsed_ms,
        }
    }
}

/// Checks an admin request's token (and its address's recent wrong ones),
/// logging a refusal with the caller's address.
fn admit(state: &AppState, headers: &HeaderMap, peer: Peer) -> Result<(), ApiError> {
    state
        .admin()
        .check(headers, peer.ip(), std::time::Instant::now())
        .inspect_err(|e| {
            if !matches!(e, ApiError::AdminDisabled) {
                tracing::warn!(%peer, "Admin: request from {peer} refused: {e}");
            }
        })
}

/// Reloads one plugin (admin token required).
#[utoipa::path(
    post,
    path = "/v1/plugins/{name}/reload",
    tag = "admin",
    params(("name" = String, Path, description = "Plugin name (registry key)")),
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "The plugin's state after the reload (which may be FAILED: see `reason`)", body = ReloadOutcome),
        (status = 401, description = "No `Authorization: Bearer <token>` header", body = ErrorDetail),
        (status = 403, description = "Wrong token, or reload disabled (no admin token configured)", body = ErrorDetail),
        (status = 429, description = "Too many wrong tokens from this address in the last minute (`Retry-After` says when to try again)", body = ErrorDetail),
        (status = 404, description = "No plugin of that name", body = ErrorDetail),
        (status = 409, description = "The startup load pass or another reload is running", body = ErrorDetail),
    )
)]
pub(crate) async fn reload_plugin(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
    ApiPath(PluginPath { name }): ApiPath<PluginPath>,
) -> Result<Response, ApiError> {
    admit(&state, &headers, peer)?;
    let guard = state.begin_admin()?;
    tracing::info!(plugin = %Shown(&name), %peer, "Admin: reload of plugin {} requested by {peer}", Shown(&name));
    let loader = Arc::clone(state.loader());
    let key = name.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        loader.reload(&key)
    })
    .await
    .map_err(|e| ApiError::Internal {
        context: format!("reload of plugin '{}' failed: {e}", Shown(&name)),
    })?;
    match outcome {
        Some(outcome) => {
            tracing::debug!(plugin = %outcome.name, state = %outcome.state.as_str(), reason = ?outcome.reason, "Reload finished");
            Ok(json(StatusCode::OK, &ReloadOutcome::from(outcome)))
        }
        None => Err(ApiError::PluginNotFound { name }),
    }
}

/// Reloads every plugin (admin token required): plugins are discovered
/// again, so a new plugin directory is picked up.
#[utoipa::path(
    post,
    path = "/v1/plugins/reload",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "Every plugin's state after the reload", body = ReloadReport),
        (status = 401, description = "No `Authorization: Bearer <token>` header", body = ErrorDetail),
        (status = 403, description = "Wrong token, or reload disabled (no admin token configured)", body = ErrorDetail),
        (status = 429, description = "Too many wrong tokens from this address in the last minute (`Retry-After` says when to try again)", body = ErrorDetail),
        (status = 409, description = "The startup load pass or another reload is running", body = ErrorDetail),
    )
)]
pub(crate) async fn reload_all(
    State(state): State<AppState>,
    peer: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admit(&state, &headers, peer)?;
    let guard = state.begin_admin()?;
    tracing::info!(%peer, "Admin: reload of every plugin requested by {peer}");
    let loader = Arc::clone(state.loader());
    let report = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        loader.reload_all()
    })
    .await
    .map_err(|e| ApiError::Internal {
        context: format!("reload of every plugin failed: {e}"),
    })?;
    // The loader logs the summary.
    state.metrics().record_load_pass(&report);
    Ok(json(StatusCode::OK, &ReloadReport::from(report)))
}
