//! The admin routes: `POST /v1/plugins/{name}/reload` and
//! `POST /v1/plugins/reload`.
//!
//! Both need `Authorization: Bearer <token>` ([`crate::admin`]); they are
//! disabled (403) when no admin token is configured. A reload re-reads the
//! manifest, re-checks dependencies, restarts an isolated plugin's process,
//! retries a FAILED or UNAVAILABLE in-process plugin, and loads again an
//! in-process one whose directory changed. In-process libraries are never
//! unloaded (a plugin's thread-local destructors and detached threads could
//! still run code of an unmapped library): a new build is opened under a
//! new file identity beside the old one.
//!
//! One admin operation runs at a time: a second one, or one during the
//! startup load pass, is refused with 409. The loader's reload blocks (it
//! constructs plugins), so it runs on the blocking pool; it finishes even
//! if the client goes away.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use forgesyte_loader::ReloadRefused;

use crate::error::{ApiError, ErrorDetail, Shown};
use crate::extract::{ApiPath, Peer, PluginPath};
use crate::respond::json;
use crate::state::AppState;

pub use crate::wire::{ReloadOutcome, ReloadReport, RemovedPlugin};

/// Checks an admin request's token (and its address's recent wrong ones),
/// logging a refusal with the caller's address. Warnings, bounded (any
/// client can send refusals in a loop): a client's first wrong token of its
/// window and the one that locks it out; a request without a token once
/// per 10 s. The rest (further wrong tokens, the 429s of a lockout) are
/// debug lines.
fn admit(state: &AppState, headers: &HeaderMap, peer: Peer) -> Result<(), ApiError> {
    static NO_TOKEN: crate::throttle::Throttle = crate::throttle::Throttle::new(10);
    let now = std::time::Instant::now();
    state
        .admin()
        .check(headers, peer.ip(), now)
        .inspect_err(|e| {
            let warn = match e {
                ApiError::AdminDisabled => return,
                ApiError::Forbidden => {
                    let count = state.admin().failures_of(peer.ip(), now);
                    count <= 1 || count == crate::admin::MAX_FAILURES
                }
                ApiError::Unauthorized { .. } => NO_TOKEN.warn_now(),
                _ => false,
            };
            if warn {
                tracing::warn!(%peer, "Admin: request from {peer} refused: {e}");
            } else {
                tracing::debug!(%peer, "Admin: request from {peer} refused: {e}");
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
        (status = 409, description = "The startup load pass or another reload is running, or the plugin's directory has no manifest any more (moved or removed), or an installed plugin's entry point is no longer installed or its module not found: it is left as it is, and a rescan finds where it went or lets it go", body = ErrorDetail),
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
    // In a task of its own, so that the event is published even if the
    // client hangs up mid-reload (its handler dropped).
    let (loader, events, key) = (Arc::clone(state.loader()), state.clone(), name.clone());
    let for_metrics = state.clone();
    let outcome = tokio::spawn(async move {
        // The claim is held until the event is out: the next admin
        // operation's event comes after this one's.
        let (outcomes, _guard) = crate::pool::on_a_thread("forgesyte-reload", move || {
            (loader.reload_with_others(&key), guard)
        })
        .await?;
        Ok::<_, std::io::Error>(outcomes.map(|outcomes| {
            // The named plugin's first, then those a changed trusted key
            // signed, reloaded with it: each one's gone tools forgotten,
            // all in the event.
            let names: Vec<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
            crate::rescan::forget_gone_tools(&for_metrics, &names);
            let outcomes: Vec<ReloadOutcome> = outcomes
                .into_iter()
                .inspect(|o| tracing::debug!(plugin = %o.name, state = %o.state.as_str(), reason = ?o.reason, "Reload finished"))
                .map(ReloadOutcome::from)
                .collect();
            events
                .events()
                .reload_finished("admin", &ReloadReport::of(&outcomes));
            outcomes.into_iter().next()
        }))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|joined| joined.map_err(|e| e.to_string()))
    .map_err(|e| ApiError::Internal {
        context: format!("reload of plugin '{}' failed: {e}", Shown(&name)),
    })?;
    match outcome {
        Ok(Some(outcome)) => Ok(json(StatusCode::OK, &outcome)),
        Ok(None) | Err(ReloadRefused::NotRegistered) => Err(ApiError::not_found(&state, name)),
        Err(refused) => {
            tracing::warn!(plugin = %Shown(&name), "Reload of plugin {} refused: {refused}", Shown(&name));
            Err(ApiError::PluginFilesGone {
                name,
                detail: refused.to_string(),
            })
        }
    }
}

/// Rescans the plugins directory (admin token required): new plugins load,
/// removed ones are retired after their calls in flight, changed ones
/// reload, failed ones are retried; see [`crate::rescan`].
#[utoipa::path(
    post,
    path = "/v1/plugins/reload",
    tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "What the rescan did (added, changed, retried, removed, unchanged) and every plugin's state after it", body = ReloadReport),
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
    tracing::info!(%peer, "Admin: rescan of the plugins directory requested by {peer}");
    let report = crate::rescan::rescan(&state, guard, "admin").await?;
    Ok(json(StatusCode::OK, &report))
}
