//! [`AppState`]: what every handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use forgesyte_loader::Loader;
use forgesyte_registry::Registry;

use crate::ServerConfig;
use crate::admin::AdminToken;
use crate::error::ApiError;

/// Shared state of the HTTP app: the loader (and through it the registry and
/// the plugin handles) plus the settings the handlers need. Cloning is one
/// `Arc` clone.
///
/// The loader is the seam: the binary builds it over the real filesystem and
/// real libraries ([`crate::build_loader`]); tests build it with
/// [`Loader::with_seams`] over fakes.
#[derive(Debug, Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    loader: Arc<Loader>,
    registry: Registry,
    call_timeout: Duration,
    body_limit: usize,
    loading: AtomicBool,
    admin_token: Option<AdminToken>,
    /// An admin operation (reload) is running.
    admin_busy: AtomicBool,
}

impl AppState {
    /// State over `loader`, with the call timeout and body limit of `config`.
    pub fn new(loader: Arc<Loader>, config: &ServerConfig) -> Self {
        let registry = loader.registry().clone();
        AppState {
            inner: Arc::new(Inner {
                loader,
                registry,
                call_timeout: config.call_timeout,
                body_limit: config.body_limit,
                loading: AtomicBool::new(false),
                admin_token: config.admin_token.clone(),
                admin_busy: AtomicBool::new(false),
            }),
        }
    }

    /// The loader holding the plugin handles and manifests.
    pub fn loader(&self) -> &Arc<Loader> {
        &self.inner.loader
    }

    /// The registry the loader records into.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Time limit of a tool call whose manifest sets none.
    pub fn call_timeout(&self) -> Duration {
        self.inner.call_timeout
    }

    /// Largest accepted request body, in bytes.
    pub fn body_limit(&self) -> usize {
        self.inner.body_limit
    }

    /// Whether a load pass is still running (`GET /v1/health` says `loading`).
    pub fn is_loading(&self) -> bool {
        self.inner.loading.load(Ordering::Acquire)
    }

    /// Marks the start or the end of a load pass.
    pub fn set_loading(&self, loading: bool) {
        self.inner.loading.store(loading, Ordering::Release);
    }

    /// The token of the admin routes; `None`: they are disabled.
    pub(crate) fn admin_token(&self) -> Option<&AdminToken> {
        self.inner.admin_token.as_ref()
    }

    /// Claims the right to run one admin operation (a reload): refused with
    /// [`ApiError::Busy`] while the startup load pass or another admin
    /// operation runs. The claim ends when the guard is dropped, which the
    /// caller does when the operation has finished (not when the client
    /// goes away).
    pub(crate) fn begin_admin(&self) -> Result<AdminGuard, ApiError> {
        if self.is_loading() {
            return Err(ApiError::Busy {
                what: "The startup load pass",
            });
        }
        self.inner
            .admin_busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| ApiError::Busy {
                what: "Another reload",
            })?;
        Ok(AdminGuard(Arc::clone(&self.inner)))
    }
}

/// Held while an admin operation runs; see [`AppState::begin_admin`].
#[derive(Debug)]
pub(crate) struct AdminGuard(Arc<Inner>);

impl Drop for AdminGuard {
    fn drop(&mut self) {
        self.0.admin_busy.store(false, Ordering::Release);
    }
}
