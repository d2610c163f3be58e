//! Startup (seed §4) and shutdown: bind, load in the background while
//! serving, stop gracefully.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use forgesyte_deps::DependencyChecker;
use forgesyte_loader::{Loader, LoaderConfig};
use forgesyte_registry::Registry;
use tokio::net::TcpListener;

use crate::config::ServerConfig;
use crate::conn;
use crate::router::app;
use crate::state::AppState;

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Accepting or serving connections failed.
    #[error("server error")]
    Serve {
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A loader over the real filesystem and real plugin libraries, with its
/// own registry, searching `lib_paths` for libraries and `lib:` dependencies;
/// every other loader setting at its default.
pub fn build_loader(lib_paths: &[PathBuf]) -> Loader {
    let checker = Arc::new(DependencyChecker::system(lib_paths.to_vec()));
    let config = LoaderConfig {
        lib_paths: lib_paths.to_vec(),
        ..LoaderConfig::default()
    };
    Loader::new(Registry::new(), checker, config)
}

/// The hidden subcommand of the `forgesyte` binary that probes the
/// machine's GPUs and prints the report as JSON
/// ([`forgesyte_deps::probe_here`]): run by [`ServerConfig::probe_program`].
pub const GPU_PROBE_SUBCOMMAND: &str = "__probe-gpu";

/// The hidden subcommand of the `forgesyte` binary that tries `dlopen` on
/// its arguments and prints the first that opened as JSON (or `null`)
/// ([`forgesyte_deps::dlopen_first`]): run by [`ServerConfig::probe_program`].
pub const LIB_PROBE_SUBCOMMAND: &str = "__probe-lib";

/// A loader over the real filesystem and real plugin libraries, with its
/// own registry, set up from `config` ([`ServerConfig::loader_config`]:
/// library search path, preflight, default isolation, runner).
pub fn build_loader_from(config: &ServerConfig) -> Loader {
    // A manifest's `python` is the plugin's own: probed as the runner user.
    let python = match config.runner_user {
        Some(user) => forgesyte_deps::SystemPython::new().as_user(user.uid, user.gid),
        None => forgesyte_deps::SystemPython::new(),
    };
    let mut checker = DependencyChecker::builder()
        .library_paths(config.lib_paths.clone())
        .python(Arc::new(python));
    let program = config.probe_program.as_ref();
    if let Some(program) = program {
        checker = checker.libraries(Arc::new(
            forgesyte_deps::SystemLibraries::new(config.lib_paths.clone())
                .dlopen_in_child(program, vec![LIB_PROBE_SUBCOMMAND.into()]),
        ));
    }
    if config.no_gpu {
        checker = checker.gpu(Arc::new(forgesyte_deps::NoGpu::new(
            "this server runs no GPU plugins (--no-gpu)",
        )));
    } else if let Some(program) = program {
        checker = checker.gpu(Arc::new(forgesyte_deps::CudaProbe::in_child(
            program,
            vec![GPU_PROBE_SUBCOMMAND.into()],
        )));
    }
    let checker = Arc::new(checker.build());
    Loader::new(Registry::new(), checker, config.loader_config())
}

/// A bound server, ready to [`run`](Server::run).
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: AppState,
    config: ServerConfig,
}

impl Server {
    /// Binds `config.bind` with a loader over the real filesystem and libraries.
    ///
    /// # Errors
    ///
    /// [`ServeError::Bind`] when the address cannot be bound.
    pub async fn bind(config: ServerConfig) -> Result<Server, ServeError> {
        // A result's values are bounded by the answer limit (one per 32
        // bytes): refused before parsing, a two-byte value is no 128.
        forgesyte_loader::json_text::set_max_result_values(
            forgesyte_loader::json_text::max_result_values_for(config.max_response),
        );
        let loader = Arc::new(build_loader_from(&config));
        Server::bind_with(config, loader).await
    }

    /// Binds `config.bind` with the given loader (fakes in tests).
    ///
    /// # Errors
    ///
    /// [`ServeError::Bind`] when the address cannot be bound.
    pub async fn bind_with(
        config: ServerConfig,
        loader: Arc<Loader>,
    ) -> Result<Server, ServeError> {
        let bind_error = |source| ServeError::Bind {
            addr: config.bind.clone(),
            source,
        };
        let listener = TcpListener::bind(config.bind.as_str())
            .await
            .map_err(bind_error)?;
        let local_addr = listener.local_addr().map_err(bind_error)?;
        let state = AppState::new(loader, &config);
        Ok(Server {
            listener,
            local_addr,
            state,
            config,
        })
    }

    /// The address actually bound (the real port when `bind` asked for 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The app state (registry, loader, settings).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Loads every plugin of `config.plugins_dir` on a blocking thread while
    /// serving, until `shutdown` completes; then stops accepting, waits for
    /// in-flight requests up to `config.shutdown_grace`, and drops the plugin
    /// instances. Load errors never stop the server.
    ///
    /// # Errors
    ///
    /// [`ServeError::Serve`] when serving fails.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Server {
            listener,
            local_addr,
            state,
            config,
        } = self;
        tracing::info!(addr = %local_addr, plugins_dir = %config.plugins_dir.display(), "forgesyte listening on http://{local_addr}");
        start_loading(&state, config.plugins_dir.clone());
        // SIGHUP (and, with --watch, file changes) rescan the plugins directory.
        start_rescan_triggers(&state, &config.plugins_dir, config.watch);

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let nofile = conn::nofile_limit();
        let limits = conn::Limits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            answer_min_rate: config.answer_min_rate,
            max_connections: conn::effective_max_connections(config.max_connections, nofile),
        };
        if limits.max_connections < config.max_connections {
            tracing::warn!(
                configured = config.max_connections,
                applied = limits.max_connections,
                nofile = nofile.unwrap_or(u64::MAX),
                "The connection cap is lowered to half the file-descriptor limit (raise the hard limit, `ulimit -Hn`, for more)"
            );
        }
        let refusals = {
            let state = state.clone();
            conn::Refusals::new(limits.max_connections, move |how| {
                state.metrics().record_refusal(how);
            })
        };
        let serving = conn::serve(
            listener,
            app(state.clone()),
            limits,
            config.public_hosts.clone(),
            refusals,
            async {
                let _ = stop_rx.await;
            },
        );
        let mut server = tokio::spawn(async move {
            serving.await;
            Ok::<(), io::Error>(())
        });
        // One grace for the whole shutdown, the drain and a reload still
        // running together (a deployment's grace period is sized on it).
        let mut grace_ends = None;
        // The plugins' stop, once begun (early when the grace ran out).
        let mut stopping = None;
        let result = tokio::select! {
            ended = &mut server => flatten(ended),
            () = shutdown => {
                let deadline = tokio::time::Instant::now() + config.shutdown_grace;
                grace_ends = Some(deadline);
                let calls = calls_in_flight(&state);
                let stopping_since = tokio::time::Instant::now();
                tracing::info!(grace_s = config.shutdown_grace.as_secs_f64(), calls_in_flight = calls, "Shutting down: no new connections, waiting for in-flight requests ({calls} tool call(s) in flight)");
                // From here on a plugin process that ends is recorded, never
                // restarted; the plugins keep serving the calls in flight.
                state.loader().shutdown();
                // Event streams never end by themselves: end them so the
                // drain does not wait the whole grace for them.
                state.events().close();
                // Streams close with 1001; their connections left the drain
                // at the upgrade, so they are waited for here.
                state.streams().close();
                let _ = stop_tx.send(());
                let drained = async {
                    let ended = (&mut server).await;
                    state.streams().drained().await;
                    ended
                };
                tokio::select! {
                    waited = tokio::time::timeout_at(deadline, drained) => match waited {
                        Ok(ended) => {
                            tracing::info!("In-flight requests finished after {:.1} s", stopping_since.elapsed().as_secs_f64());
                            flatten(ended)
                        }
                        Err(_) => {
                            let cut = calls_in_flight(&state);
                            tracing::warn!(grace_s = config.shutdown_grace.as_secs_f64(), calls_cut_off = cut, "In-flight requests did not finish in time; stopping anyway (tool calls still running: {cut})");
                            // The plugins' processes stop now: the calls
                            // they run end, and are answered (503, "send it
                            // again"; a stream's frame its error, then
                            // 1001) before the connections go. Calls of
                            // in-process plugins cannot be cut: theirs are
                            // dropped unanswered.
                            let _ = state.admin_ended(tokio::time::Instant::now()).await;
                            stopping = Some(stop_plugins(&state));
                            let answered = async {
                                // Not when the drain above saw it end (the
                                // streams kept it waiting): a handle is
                                // polled once past its end.
                                if !server.is_finished() {
                                    let _ = (&mut server).await;
                                }
                                state.streams().drained().await;
                            };
                            let _ = tokio::time::timeout(CUT_CALLS_ANSWERED, answered).await;
                            server.abort();
                            Ok(())
                        }
                    },
                    () = HURRY.notified() => {
                        let cut = calls_in_flight(&state);
                        tracing::info!(calls_cut_off = cut, "Stopped waiting for the requests in flight (tool calls still running: {cut})");
                        server.abort();
                        Ok(())
                    }
                }
            }
        };
        // A reload that began before the shutdown ends before the instances
        // go (one that constructs or retires plugins meanwhile would race
        // the drop); none can begin after it (`AppState::begin_admin`).
        let deadline =
            grace_ends.unwrap_or_else(|| tokio::time::Instant::now() + config.shutdown_grace);
        if !state.admin_ended(deadline).await {
            tracing::warn!(
                "A reload still runs after the shutdown grace; dropping the instances anyway"
            );
        }
        // The plugins' processes end, and their groups are killed (only
        // the server does that), before the server exits.
        let wait = forgesyte_loader::RUNNER_STOP_WAIT;
        let stopped_by = stopping.unwrap_or_else(|| stop_plugins(&state));
        let stopped = matches!(
            tokio::time::timeout(wait + Duration::from_secs(6), stopped_by).await,
            Ok(true)
        );
        if !stopped {
            tracing::warn!(
                wait_s = wait.as_secs_f64(),
                "Plugin processes did not all end in time; what they started may outlive the server"
            );
        }
        // A load pass the stop cut short records what it cut off (each
        // plugin's line, the pass's summary) before the server exits: the
        // runners it waited on have ended, so it ends within moments.
        let pass_ends = tokio::time::Instant::now() + LOAD_PASS_END_WAIT;
        while state.is_loading() && tokio::time::Instant::now() < pass_ends {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tracing::info!("Plugin instances dropped; bye");
        result
    }
}

/// How long the calls the shutdown grace cut off (their plugins'
/// processes stopped) have to be answered before the connections go.
const CUT_CALLS_ANSWERED: Duration = Duration::from_secs(2);

/// How long the server's stop waits, once its plugins are stopped, for a
/// load pass it cut short to record what it cut off (an in-process
/// constructor that never returns holds its pass for good: not waited
/// longer).
const LOAD_PASS_END_WAIT: Duration = Duration::from_secs(2);

/// Drops the plugin instances and stops their processes
/// (`Loader::drop_instances`), on a thread of its own (the blocking pool
/// may be full of calls that never end), started at once
/// ([`crate::pool::on_a_thread`]): whether all ended in time, once they
/// did (`false` too when the thread could not start).
fn stop_plugins(state: &AppState) -> impl std::future::Future<Output = bool> + use<> {
    let loader = Arc::clone(state.loader());
    let stopped = crate::pool::on_a_thread("forgesyte-stop-plugins", move || {
        loader.drop_instances(forgesyte_loader::RUNNER_STOP_WAIT)
    });
    async move { stopped.await.unwrap_or(false) }
}

/// Tool calls in flight on all plugins now.
fn calls_in_flight(state: &AppState) -> u64 {
    state
        .registry()
        .list_all()
        .iter()
        .map(|p| u64::from(p.in_flight))
        .sum()
}

fn flatten(ended: Result<io::Result<()>, tokio::task::JoinError>) -> Result<(), ServeError> {
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ServeError::Serve { source }),
        Err(join) => Err(ServeError::Serve {
            source: io::Error::other(join.to_string()),
        }),
    }
}

/// Starts the `SIGHUP` listener ([`crate::rescan::start_sighup`]) and,
/// with `watch`, the watcher of `plugins_dir` ([`crate::watch`]). Both live
/// as long as the runtime. Here rather than in [`crate::rescan`], which the
/// watcher calls: the rescan knows none of its triggers' starts.
fn start_rescan_triggers(state: &AppState, plugins_dir: &std::path::Path, watch: bool) {
    crate::rescan::start_sighup(state);
    crate::rescan::start_settling(state);
    crate::host_retry::start(state);
    if watch {
        crate::watch::start(state, plugins_dir);
    }
}

/// Runs the load pass on the blocking pool and logs its summary; the
/// state says `loading` until it ends, whatever happens to it.
fn start_loading(state: &AppState, plugins_dir: PathBuf) {
    state.set_loading(true);
    state.events().load_started();
    let loader = Arc::clone(state.loader());
    let state = state.clone();
    tokio::spawn(async move {
        let dir = plugins_dir.clone();
        let pass = crate::pool::on_a_thread("forgesyte-load", move || {
            let report = loader.load_all(&dir);
            // A plugins directory that cannot be listed (a mount gone
            // wrong) with nothing loaded from elsewhere is a failed pass:
            // not ready, and `degraded`, rather than ready serving nothing.
            // Asked only of a pass that found nothing: the pass listed the
            // directory already.
            // (A default directory that may be missing, and is, fails no
            // pass: the installed plugins alone are served, and a rescan
            // that loads some made it ready, where it stayed not ready.)
            let missing_as_allowed = loader.plugins_dir_missing_as_allowed(&dir);
            let unlisted = report.plugins.is_empty()
                && std::fs::read_dir(&dir).is_err()
                && !missing_as_allowed;
            if unlisted {
                tracing::error!(dir = %dir.display(), "The plugins directory {} cannot be listed and no plugin was loaded: not ready until a rescan lists it", dir.display());
            } else if report.plugins.is_empty() && missing_as_allowed {
                // (An interpreter that could not list them said so already,
                // and the readiness check says it.)
                if loader.entry_points_error().is_none() {
                    tracing::warn!(dir = %dir.display(), "No plugins: no installed package declares a {} entry point, and there is no plugins directory {}; a rescan loads what is installed since", forgesyte_loader::entry_points::GROUP, dir.display());
                }
            } else if report.plugins.is_empty() {
                tracing::warn!(dir = %dir.display(), "No plugins in {}: none of its subdirectories holds a manifest.json", dir.display());
            }
            (report, unlisted)
        })
        .await;
        state.set_load_failed(pass.as_ref().map_or(true, |(_, unlisted)| *unlisted));
        let pass = pass.map(|(report, _)| report);
        state.set_loading(false);
        if let Ok(report) = &pass {
            state.metrics().record_load_pass(report);
        }
        match &pass {
            Ok(report) => state.events().load_finished(
                Some((report.loaded(), report.failed(), report.unavailable())),
                report.elapsed_ms,
            ),
            Err(_) => state.events().load_finished(None, 0.0),
        }
        match pass {
            // A stop during the pass: the plugins it cut off are FAILED
            // with no fault of theirs, and "ready" would be untrue.
            Ok(report) if state.loader().is_shutting_down() => tracing::info!(
                loaded = report.loaded(),
                elapsed_ms = report.elapsed_ms,
                "Load pass cut short by the stop: {} loaded, {} not ({:.1} ms)",
                report.loaded(),
                report.failed() + report.unavailable(),
                report.elapsed_ms
            ),
            Ok(report) => tracing::info!(
                loaded = report.loaded(),
                failed = report.failed(),
                unavailable = report.unavailable(),
                elapsed_ms = report.elapsed_ms,
                "Plugins ready: {} loaded, {} failed, {} unavailable ({:.1} ms)",
                report.loaded(),
                report.failed(),
                report.unavailable(),
                report.elapsed_ms
            ),
            Err(e) => {
                tracing::error!(error = %e, dir = %plugins_dir.display(), "The plugin load pass failed; serving the plugins registered so far")
            }
        }
    });
}

/// Set by a second `SIGINT` or `SIGTERM` during the shutdown
/// ([`shutdown_signal`]): the drain ends at once.
static HURRY: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The next `SIGINT` or `SIGTERM` of the two streams (`None`: not
/// listened for, never comes), by name; `false` when its stream ended
/// instead (the runtime's signal driver is gone).
#[cfg(unix)]
async fn next_stop_signal(
    interrupt: &mut Option<tokio::signal::unix::Signal>,
    terminate: &mut Option<tokio::signal::unix::Signal>,
) -> (&'static str, bool) {
    async fn next(stream: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
        match stream {
            Some(stream) => stream.recv().await,
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        got = next(interrupt) => ("SIGINT", got.is_some()),
        got = next(terminate) => ("SIGTERM", got.is_some()),
    }
}

/// The connection cap `serve` applies for a `configured` one: at most
/// half the open-file limit `serve` runs with, which is the hard limit
/// (`serve` raises its soft limit to it first; `config --print` said the
/// soft limit's half, 512 in a container that gives `serve` far more).
pub fn applied_max_connections(configured: usize) -> usize {
    conn::effective_max_connections(configured, forgesyte_deps::open_file_limit_after_raise())
}

/// A future that completes on SIGINT (Ctrl-C) or SIGTERM; a second one
/// afterwards ends [`Server::run`]'s wait for the requests in flight.
///
/// The signal handlers are installed when this function is called (it
/// must be called inside a tokio runtime), not when the future is first
/// polled, so a signal that arrives in between is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(stream) => Some(stream),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}");
                None
            }
        };
        let mut interrupt = listen(SignalKind::interrupt(), "SIGINT");
        let mut terminate = listen(SignalKind::terminate(), "SIGTERM");
        async move {
            let (name, _) = next_stop_signal(&mut interrupt, &mut terminate).await;
            tracing::info!("{name} received");
            // A second one (an impatient operator's Ctrl-C, a process
            // manager's repeat) was ignored without a word: it now ends
            // the wait for the requests in flight at once.
            tokio::spawn(async move {
                loop {
                    let (name, delivered) = next_stop_signal(&mut interrupt, &mut terminate).await;
                    if !delivered {
                        return;
                    }
                    tracing::warn!(
                        "{name} received again: the server stops now, without waiting for the requests in flight"
                    );
                    HURRY.notify_one();
                }
            });
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
        tracing::info!("Ctrl-C received");
    }
}

/// Binds, prints nothing, and serves until SIGINT or SIGTERM: the whole of
/// `forgesyte serve` but the logging setup and the listening line.
///
/// # Errors
///
/// [`ServeError`] when the address cannot be bound or serving fails.
pub async fn serve(config: ServerConfig) -> Result<(), ServeError> {
    let shutdown = shutdown_signal();
    Server::bind(config).await?.run(shutdown).await
}
