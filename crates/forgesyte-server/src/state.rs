//! [`AppState`]: what every handler shares, and the readiness count
//! ([`plugin_counts`]) that `GET /v1/health` and `GET /readyz` both ask.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use axum::body::Bytes;

use forgesyte_loader::Loader;
use forgesyte_registry::Registry;

use crate::admin::AdminGate;
use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::events::{EVENT_BUFFER, Events};
use crate::metrics::Metrics;
use crate::pool::CallPool;
use crate::slots::{CallSlot, CallSlots};
use crate::stream::Streams;
use crate::wire::PluginStatusJson;

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
    /// The request bodies of tool calls held at once, in KiB (see
    /// [`crate::body::reserve`]).
    body_budget: crate::budget::BodyBudget,
    answer_budget: crate::budget::AnswerBudget,
    body_pace: crate::body_pace::BodyPace,
    stream_idle_timeout: Duration,
    loading: AtomicBool,
    /// The startup load pass ended in a panic, and no rescan has ended
    /// since: plugins it did not reach are missing.
    load_failed: AtomicBool,
    admin: AdminGate,
    /// An admin operation (reload) is running.
    admin_busy: AtomicBool,
    /// The last serialised `GET /v1/plugins` body; see [`AppState::list_body`].
    list_cache: ArcSwapOption<CachedBody>,
    /// The last serialised `GET /v1/plugins/{name}/health` bodies, by
    /// name; see [`AppState::health_body`].
    health_cache: RwLock<HashMap<String, CachedBody>>,
    /// Origin of the list cache's clock ticks.
    started: Instant,
    /// Where tool calls run.
    calls: CallPool,
    /// Tool calls in progress per plugin, and their bound.
    call_slots: CallSlots,
    /// The event stream's hub (`GET /v1/events`), fed by the registry.
    events: Arc<Events>,
    /// The Prometheus metrics (`GET /metrics`).
    metrics: Metrics,
    /// The open WebSocket streams (`.../tools/{tool}/stream`).
    streams: Streams,
}

/// How long a serialised plugin list or health may be served again while
/// the registry does not change: `uptime_seconds` in it is at most this old.
pub(crate) const LIST_CACHE_TICK: Duration = Duration::from_millis(100);

/// A serialised answer and the registry generation and clock tick it was
/// built in: served again while both are current.
#[derive(Debug, Clone)]
struct CachedBody {
    generation: u64,
    tick: u128,
    body: Bytes,
}

impl CachedBody {
    fn current(&self, generation: u64, tick: u128) -> Option<Bytes> {
        (self.generation == generation && self.tick == tick).then(|| self.body.clone())
    }
}

impl AppState {
    /// State over `loader`, with the call timeout and body limit of `config`.
    pub fn new(loader: Arc<Loader>, config: &ServerConfig) -> Self {
        let registry = loader.registry().clone();
        let events = Events::new(EVENT_BUFFER);
        registry.add_observer(events.observer());
        let metrics = Metrics::new(Arc::clone(&loader));
        AppState {
            inner: Arc::new(Inner {
                loader,
                registry,
                call_timeout: config.call_timeout,
                body_limit: config.body_limit,
                body_budget: crate::budget::BodyBudget::new(config.body_limit, config.body_memory),
                answer_budget: crate::budget::AnswerBudget::new(
                    usize::try_from(config.max_response).unwrap_or(usize::MAX),
                    config.answer_memory,
                ),
                body_pace: crate::body_pace::BodyPace {
                    timeout: config.body_read_timeout,
                    min_rate: config.body_min_rate,
                },
                stream_idle_timeout: config.stream_idle_timeout,
                loading: AtomicBool::new(false),
                load_failed: AtomicBool::new(false),
                admin: AdminGate::new(config.admin_token.clone()),
                admin_busy: AtomicBool::new(false),
                list_cache: ArcSwapOption::empty(),
                health_cache: RwLock::new(HashMap::new()),
                started: Instant::now(),
                calls: CallPool::new(),
                call_slots: CallSlots::new(config.max_calls_per_plugin),
                events,
                metrics,
                // The connection cap as applied (half the descriptor limit at most).
                streams: Streams::new(crate::conn::effective_max_connections(
                    config.max_connections,
                    crate::conn::nofile_limit(),
                )),
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

    /// What is left of the memory for tool calls' request bodies.
    pub(crate) fn body_budget(&self) -> &crate::budget::BodyBudget {
        &self.inner.body_budget
    }

    /// What is left of the memory for answers waiting to be sent.
    pub(crate) fn answer_budget(&self) -> &crate::budget::AnswerBudget {
        &self.inner.answer_budget
    }

    /// Longest wait for the next piece of a request's body.
    pub fn body_read_timeout(&self) -> Duration {
        self.inner.body_pace.timeout
    }

    /// The pace every request body must keep (its read timeout and minimum
    /// rate).
    pub(crate) fn body_pace(&self) -> crate::body_pace::BodyPace {
        self.inner.body_pace
    }

    /// How long a stream may be idle (no client message, no answer) before
    /// it is closed; `None`: never.
    pub fn stream_idle_timeout(&self) -> Option<Duration> {
        Some(self.inner.stream_idle_timeout).filter(|t| !t.is_zero())
    }

    /// Whether a load pass is still running (`GET /v1/health` says `loading`).
    pub fn is_loading(&self) -> bool {
        self.inner.loading.load(Ordering::Acquire)
    }

    /// Marks the start or the end of a load pass.
    pub fn set_loading(&self, loading: bool) {
        self.inner.loading.store(loading, Ordering::Release);
    }

    /// Whether the startup load pass ended in a panic and no rescan has
    /// ended since (`GET /readyz` is not ready).
    pub(crate) fn load_failed(&self) -> bool {
        self.inner.load_failed.load(Ordering::Acquire)
    }

    /// Records how the last load pass (the startup one, or a rescan) ended.
    pub(crate) fn set_load_failed(&self, failed: bool) {
        self.inner.load_failed.store(failed, Ordering::Release);
    }

    /// The `GET /v1/plugins` body: every status, sorted by name.
    ///
    /// Serialising 100 statuses costs far more than sending them, so the
    /// body is cached and rebuilt when the registry's generation changes (any
    /// state, reason or metric) or when the [`LIST_CACHE_TICK`] it was built
    /// in has passed (so `uptime_seconds` lags by less than 0.1 s). Readers
    /// never lock: the cache is an atomic pointer, and two readers that miss
    /// at once both build a body, the later store wins.
    pub(crate) fn list_body(&self) -> Result<Bytes, serde_json::Error> {
        let registry = &self.inner.registry;
        let (generation, tick) = self.cache_key();
        if let Some(body) = self
            .inner
            .list_cache
            .load()
            .as_deref()
            .and_then(|cached| cached.current(generation, tick))
        {
            return Ok(body);
        }
        // The generation is read before the snapshot: a write landing in
        // between makes this body newer than its key, never older, and the
        // next reader rebuilds it.
        let statuses: Vec<PluginStatusJson> = registry
            .snapshot()
            .statuses()
            .into_iter()
            .map(PluginStatusJson::from)
            .collect();
        let body = Bytes::from(serde_json::to_vec(&statuses)?);
        self.inner.list_cache.store(Some(Arc::new(CachedBody {
            generation,
            tick,
            body: body.clone(),
        })));
        Ok(body)
    }

    /// The registry's generation (read first: a write landing after it
    /// makes a body built now newer than its key, never older) and the
    /// current [`LIST_CACHE_TICK`].
    fn cache_key(&self) -> (u64, u128) {
        let generation = self.inner.registry.generation();
        let tick = self.inner.started.elapsed().as_millis() / LIST_CACHE_TICK.as_millis();
        (generation, tick)
    }

    /// The `GET /v1/plugins/{name}/health` body, built by `build` (`None`:
    /// no such plugin) and cached by name like [`AppState::list_body`]: a
    /// load balancer polling one plugin's health reads a lock and clones a
    /// buffer. The cache holds registered names only (a miss for a name
    /// that is gone removes it).
    pub(crate) fn health_body(
        &self,
        name: &str,
        build: impl FnOnce() -> Option<Result<Bytes, serde_json::Error>>,
    ) -> Option<Result<Bytes, serde_json::Error>> {
        let (generation, tick) = self.cache_key();
        let cache = &self.inner.health_cache;
        if let Some(body) = cache
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .and_then(|cached| cached.current(generation, tick))
        {
            return Some(Ok(body));
        }
        let built = build();
        let mut cache = cache.write().unwrap_or_else(PoisonError::into_inner);
        match &built {
            Some(Ok(body)) => {
                let cached = CachedBody {
                    generation,
                    tick,
                    body: body.clone(),
                };
                match cache.get_mut(name) {
                    Some(entry) => *entry = cached,
                    None => {
                        cache.insert(name.to_owned(), cached);
                    }
                }
            }
            Some(Err(_)) | None => {
                cache.remove(name);
            }
        }
        built
    }

    /// The event stream's hub.
    pub(crate) fn events(&self) -> &Arc<Events> {
        &self.inner.events
    }

    /// Where tool calls run (off the async runtime).
    pub(crate) fn calls(&self) -> &CallPool {
        &self.inner.calls
    }

    /// Claims one of `plugin`'s [`ServerConfig::max_calls_per_plugin`]
    /// slots for a tool call (see [`CallSlots::begin`]).
    pub(crate) fn begin_call(&self, plugin: &str) -> Result<CallSlot, crate::error::RunError> {
        self.inner.call_slots.begin(plugin)
    }

    /// The refusal a [`begin_call`](Self::begin_call) now would answer:
    /// `plugin` has its limit of tool calls in progress.
    pub(crate) fn calls_full(&self, plugin: &str) -> Option<crate::error::RunError> {
        self.inner.call_slots.full(plugin)
    }

    /// The Prometheus metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The open WebSocket streams.
    pub(crate) fn streams(&self) -> &Streams {
        &self.inner.streams
    }

    /// The admin routes' gate (their token, and wrong tokens by address).
    pub(crate) fn admin(&self) -> &AdminGate {
        &self.inner.admin
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
        // Shutting down: no pass may construct or retire plugins while the
        // server lets its instances go.
        if self.loader().is_shutting_down() {
            return Err(ApiError::Busy {
                what: "The server's shutdown",
            });
        }
        self.inner
            .admin_busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| ApiError::Busy {
                what: "Another reload (or the settling of dependents after a crash)",
            })?;
        Ok(AdminGuard(Arc::clone(&self.inner)))
    }
}

impl AppState {
    /// Waits, until `deadline` at most, for the admin operation in progress
    /// (a reload or rescan) to end; `true` when none runs.
    pub(crate) async fn admin_ended(&self, deadline: tokio::time::Instant) -> bool {
        while self.inner.admin_busy.load(Ordering::Acquire) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        true
    }
}

/// The plugins, counted by the readiness rule without copying any
/// plugin's status (each `GET /v1/health` and `GET /readyz` asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PluginCounts {
    /// Plugins registered.
    pub(crate) total: usize,
    /// Of those, available (INITIALIZED or RUNNING).
    pub(crate) available: usize,
    /// Whether every plugin not marked optional is available.
    pub(crate) required_available: bool,
}

/// Counts the plugins by the readiness rule (see [`crate::probes`]); the
/// loader is asked whether a plugin is optional only for a plugin that is
/// not available. Here, beside the state, because two handler modules ask
/// it (`GET /v1/health` in [`crate::api`], `GET /readyz` in
/// [`crate::probes`]) and handlers never know each other.
pub(crate) fn plugin_counts(state: &AppState) -> PluginCounts {
    let mut counts = PluginCounts {
        total: 0,
        available: 0,
        required_available: true,
    };
    state.registry().for_each_state(|name, plugin_state| {
        let available = plugin_state.is_available();
        counts.total += 1;
        counts.available += usize::from(available);
        if counts.required_available && !passes_readiness(state, name, available) {
            counts.required_available = false;
        }
    });
    counts
}

/// The readiness rule for one plugin: available, or marked optional (the
/// loader is asked only about a plugin that is not available).
pub(crate) fn passes_readiness(state: &AppState, name: &str, available: bool) -> bool {
    available || state.loader().is_optional(name)
}

/// Held while an admin operation runs; see [`AppState::begin_admin`].
#[derive(Debug)]
pub(crate) struct AdminGuard(Arc<Inner>);

impl Drop for AdminGuard {
    fn drop(&mut self) {
        self.0.admin_busy.store(false, Ordering::Release);
    }
}
