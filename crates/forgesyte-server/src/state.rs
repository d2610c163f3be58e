//! [`AppState`]: what every handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use forgesyte_loader::Loader;
use forgesyte_registry::Registry;

use crate::ServerConfig;

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
}
