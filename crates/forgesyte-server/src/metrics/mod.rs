//! Prometheus metrics: what is recorded as it happens, and the scrape.
//!
//! [`Metrics`] owns a `prometheus-client` registry (every name prefixed
//! `forgesyte_`) and is the one place metric names, labels and buckets are
//! defined. Two kinds of metric live here:
//!
//! - *recorded* where the event happens, because nobody else keeps them:
//!   tool-call outcomes, call latency and bytes per plugin and tool
//!   ([`Metrics::record_call`], [`Metrics::record_bytes`], called by the run
//!   route), HTTP requests and latency per route ([`http::TrackLayer`]), and the
//!   load passes ([`Metrics::record_load_pass`]);
//! - *read at scrape time* from what the plugin registry and the loader
//!   already keep (state, in-flight calls, restarts) and from `/proc` (a
//!   runner's memory and CPU time): [`plugins::PluginCollector`], so there is
//!   no second source of truth to drift.
//!
//! Label values are bounded: plugin names are registry keys (checked by the
//! caller before recording: [`Metrics::record_call`] is only called for a
//! registered plugin), tool names are tools the plugin offers or
//! [`UNKNOWN_TOOL`], routes are the router's templates or [`UNMATCHED`],
//! methods and outcomes come from fixed lists. A raw request path never
//! becomes a label value. A plugin a rescan removes takes its recorded
//! series with it ([`Metrics::forget_plugin`]).
//!
//! This module knows the loader and the registry, never a handler; the
//! `/metrics` route and the request middleware are in [`http`].

pub(crate) mod http;
mod plugins;
mod proc;
mod text;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use axum::body::Bytes;

use axum::extract::MatchedPath;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use forgesyte_loader::{LoadReport, Loader};

use crate::error::RunError;

/// The tool label of a call to a tool the plugin cannot be asked about (a
/// plugin that is not runnable and never had an instance, nor a manifest
/// that lists its tools).
pub(crate) const UNKNOWN_TOOL: &str = "_unknown";

/// The route label of a request no route matched.
pub(crate) const UNMATCHED: &str = "_unmatched";

/// How a tool call ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub(crate) enum Outcome {
    /// The tool returned a result.
    ok,
    /// The tool returned an error (bad arguments, an exception).
    tool_error,
    /// The tool panicked, crashed its process or broke the protocol.
    fault,
    /// The tool ran past its time limit.
    timeout,
    /// The plugin was not runnable (FAILED, UNAVAILABLE, no instance).
    not_runnable,
    /// The call never ran: the plugin had its limit of calls in progress, or
    /// the call waited its time limit for its turn (or for a call thread).
    rejected,
    /// The request's body or arguments were malformed; the tool never ran.
    bad_request,
    /// A bug in the host.
    internal,
}

impl Outcome {
    /// Every outcome (the label values [`Metrics::forget_plugin`] clears).
    const ALL: [Outcome; 8] = [
        Outcome::ok,
        Outcome::tool_error,
        Outcome::fault,
        Outcome::timeout,
        Outcome::not_runnable,
        Outcome::rejected,
        Outcome::bad_request,
        Outcome::internal,
    ];

    /// The outcome of a finished call; `None` for a call to a plugin or
    /// tool that does not exist (not counted: its name is not a bounded
    /// label value; the route's 404s count it).
    pub(crate) fn of(result: &Result<impl Sized, RunError>) -> Option<Outcome> {
        match result {
            Ok(_) => Some(Outcome::ok),
            Err(e) => Outcome::of_error(e),
        }
    }

    /// The outcome of a call that failed with `e`; see [`Outcome::of`].
    pub(crate) fn of_error(e: &RunError) -> Option<Outcome> {
        Some(match e {
            RunError::ToolFailed { .. } | RunError::InvalidArgs { .. } => Outcome::tool_error,
            RunError::Fault { .. } => Outcome::fault,
            RunError::Timeout { .. } => Outcome::timeout,
            RunError::PluginNotFound { .. } | RunError::UnknownTool => return None,
            RunError::NotRunnable { .. } | RunError::Interrupted { .. } => Outcome::not_runnable,
            RunError::TooManyCalls { .. }
            | RunError::QueueTimeout { .. }
            | RunError::NotStarted { .. }
            | RunError::RunnerBusy { .. }
            | RunError::BodiesInFlight { .. } => Outcome::rejected,
            RunError::MalformedBody { .. }
            | RunError::InvalidBody { .. }
            | RunError::InvalidForm { .. }
            | RunError::BodyMismatch { .. }
            | RunError::NotBase64 { .. }
            | RunError::NotBinary { .. }
            | RunError::PayloadTooLarge { .. }
            | RunError::TooManyValues { .. }
            | RunError::BodyTimedOut
            | RunError::BodyTooSlow { .. } => Outcome::bad_request,
            RunError::Internal { .. } => Outcome::internal,
            // Never a call's own end: an answer dropped for want of room
            // comes after its call was counted (`ok`); as outcomes they
            // would be these.
            RunError::AnswersInFlight { .. } => Outcome::rejected,
            RunError::AnswerTooLarge { .. } | RunError::StreamAnswerTooLarge { .. } => {
                Outcome::tool_error
            }
            // The plugin answered; the host could not take it.
            RunError::AnswerLost { .. } => Outcome::rejected,
        })
    }

    /// Whether the plugin's code ran (so the call's latency means something).
    fn ran(self) -> bool {
        matches!(
            self,
            Outcome::ok | Outcome::tool_error | Outcome::fault | Outcome::timeout
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    plugin: String,
    tool: Text,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ToolLabels {
    plugin: String,
    tool: Text,
}

/// A label value a plugin chose (a tool's name: unlike plugin names, any
/// text), escaped as the text format requires: `prometheus-client` writes
/// label values as they are, and a `"`, `\` or line break in one broke the
/// whole scrape (or added series of the plugin's making).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Text(String);

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    method: &'static str,
    status: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    route: Route,
}

/// A route label: the router's template (axum's [`MatchedPath`], shared,
/// so that recording a request allocates nothing) or [`UNMATCHED`].
#[derive(Debug, Clone)]
pub(crate) struct Route(Option<MatchedPath>);

impl Route {
    /// The route of a request: its template, if a route matched.
    pub(crate) fn of<B>(request: &axum::http::Request<B>) -> Self {
        Route(request.extensions().get::<MatchedPath>().cloned())
    }

    fn as_str(&self) -> &str {
        self.0.as_ref().map_or(UNMATCHED, MatchedPath::as_str)
    }
}

impl PartialEq for Route {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Route {}

impl std::hash::Hash for Route {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LoadLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

impl DropLabels {
    /// Every reason an answer is dropped for: no room now, too large ever.
    const REASONS: [&'static str; 2] = ["no_room", "too_large"];
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabels {
    how: &'static str,
}

/// Builds each latency histogram of a family with the same buckets.
#[derive(Debug, Clone, Copy)]
struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        // 100 µs to 105 s, ×4 per bucket: past the default call time
        // limit (60 s), so a slow call's time has a bucket of its own.
        Histogram::new(exponential_buckets(0.000_1, 4.0, 11))
    }
}

type LatencyFamily<L> = Family<L, Histogram, LatencyBuckets>;

/// Every metric of the server; see the module documentation. Shared by
/// reference from the app state.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: LatencyFamily<ToolLabels>,
    bytes_in: Family<PluginLabels, Counter>,
    bytes_out: Family<PluginLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    request_seconds: LatencyFamily<RouteLabels>,
    load_passes: Counter,
    load_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    load_plugins: Family<LoadLabels, Gauge>,
    answers_dropped: Family<DropLabels, Counter>,
    connections_refused: Family<RefusedLabels, Counter>,
    /// The tool label values each plugin's series were made with: what
    /// [`Metrics::forget_plugin`] removes (`prometheus-client` cannot list
    /// a family's label sets).
    tools_seen: Mutex<HashMap<String, HashSet<String>>>,
    /// The last scrape's body and the [`SCRAPE_TICK`] it was built in.
    scraped: ArcSwapOption<(u128, Bytes)>,
    /// Origin of the scrape ticks.
    started: Instant,
}

/// How long one encoded scrape is served again: every value in `/metrics`
/// is at most this old. Prometheus scrapes every few seconds, so only
/// scrapers faster than this (a second Prometheus of a pair, a load test)
/// ever get the cached body.
pub(crate) const SCRAPE_TICK: Duration = Duration::from_millis(100);

impl Metrics {
    /// Every metric, with the per-plugin ones read from `loader` (and its
    /// registry) at each scrape.
    pub(crate) fn new(loader: Arc<Loader>) -> Self {
        let mut registry = Registry::with_prefix("forgesyte");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "tool_calls",
            "Tool calls by plugin, tool and outcome",
            calls.clone(),
        );
        let call_seconds = LatencyFamily::<ToolLabels>::new_with_constructor(LatencyBuckets);
        registry.register(
            "tool_call_duration_seconds",
            "Wall time of tool calls whose plugin code ran, by plugin and tool",
            call_seconds.clone(),
        );
        let bytes_in = Family::<PluginLabels, Counter>::default();
        registry.register(
            "tool_request_bytes",
            "Bytes of tool-run request bodies, by plugin",
            bytes_in.clone(),
        );
        let bytes_out = Family::<PluginLabels, Counter>::default();
        registry.register(
            "tool_response_bytes",
            "Bytes of tool-run response bodies, by plugin",
            bytes_out.clone(),
        );
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route template, method and status class",
            requests.clone(),
        );
        let request_seconds = LatencyFamily::<RouteLabels>::new_with_constructor(LatencyBuckets);
        registry.register(
            "http_request_duration_seconds",
            "Time to the response's head, by route template",
            request_seconds.clone(),
        );
        let load_passes = Counter::default();
        registry.register(
            "load_passes",
            "Load passes finished (startup and reload-all)",
            load_passes.clone(),
        );
        let load_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "load_pass_duration_seconds",
            "Wall time of the last load pass",
            load_seconds.clone(),
        );
        let load_plugins = Family::<LoadLabels, Gauge>::default();
        registry.register(
            "load_pass_plugins",
            "Plugins of the last load pass by outcome (loaded, failed, unavailable)",
            load_plugins.clone(),
        );
        let answers_dropped = Family::<DropLabels, Counter>::default();
        // Both series from the start, at zero: a counter that first
        // appears at 1 is a drop `increase()` and `rate()` never see.
        for reason in DropLabels::REASONS {
            let _ = answers_dropped.get_or_create(&DropLabels { reason });
        }
        registry.register(
            "answers_dropped",
            "Answers of tool calls that ran, dropped for want of room in --answer-memory \
             (no_room: retry later; too_large: larger than all of it); the calls count as ok",
            answers_dropped.clone(),
        );
        let connections_refused = Family::<RefusedLabels, Counter>::default();
        for how in crate::conn::Refusal::ALL {
            let _ = connections_refused.get_or_create(&RefusedLabels { how: how.label() });
        }
        registry.register(
            "connections_refused",
            "Work refused at the connection cap (--max-connections): requests answered 503 on \
             the probes' reserve (answered_503), connections closed unanswered beyond it (closed)",
            connections_refused.clone(),
        );
        registry.register(
            "build",
            "The server's version",
            Info::new(vec![("version", crate::VERSION)]),
        );
        registry.register_collector(Box::new(plugins::PluginCollector::new(loader)));
        Metrics {
            registry,
            calls,
            call_seconds,
            bytes_in,
            bytes_out,
            requests,
            request_seconds,
            load_passes,
            load_seconds,
            load_plugins,
            answers_dropped,
            connections_refused,
            tools_seen: Mutex::default(),
            scraped: ArcSwapOption::empty(),
            started: Instant::now(),
        }
    }

    /// Records one tool call of the registered plugin `plugin`: `tool` must
    /// be a tool it offers or [`UNKNOWN_TOOL`]; `elapsed` is the plugin
    /// call's wall time when its code ran.
    pub(crate) fn record_call(
        &self,
        plugin: &str,
        tool: &str,
        outcome: Outcome,
        elapsed: Option<Duration>,
    ) {
        let labels = CallLabels {
            plugin: plugin.to_owned(),
            tool: Text(tool.to_owned()),
            outcome,
        };
        // The read guard of `get` ends with this statement (before a new
        // series takes the family's write lock).
        let counted = match self.calls.get(&labels) {
            Some(counter) => {
                counter.inc();
                true
            }
            None => false,
        };
        if !counted {
            self.tools_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(labels.plugin.clone())
                .or_default()
                .insert(tool.to_owned());
            self.calls.get_or_create(&labels).inc();
        }
        if let (true, Some(elapsed)) = (outcome.ran(), elapsed) {
            self.call_seconds
                .get_or_create(&ToolLabels {
                    plugin: plugin.to_owned(),
                    tool: Text(tool.to_owned()),
                })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Adds the sizes of one tool-run request body (as read: one refused
    /// before its body is read, such as `PluginNotRunnable`, adds none)
    /// and response of the registered plugin `plugin`; the run route adds
    /// each as it has it (a client that leaves has its body counted).
    pub(crate) fn record_bytes(&self, plugin: &str, request: u64, response: u64) {
        let labels = PluginLabels {
            plugin: plugin.to_owned(),
        };
        self.bytes_in.get_or_create(&labels).inc_by(request);
        self.bytes_out.get_or_create(&labels).inc_by(response);
    }

    /// Counts an answer dropped for want of room (`error`: the answer
    /// budget's refusal; any other error is not an answer's).
    pub(crate) fn record_dropped_answer(&self, error: &RunError) {
        let reason = match error {
            RunError::AnswersInFlight { .. } => DropLabels::REASONS[0],
            RunError::AnswerTooLarge { .. } | RunError::StreamAnswerTooLarge { .. } => {
                DropLabels::REASONS[1]
            }
            _ => return,
        };
        self.answers_dropped
            .get_or_create(&DropLabels { reason })
            .inc();
    }

    /// Counts work refused at the connection cap.
    pub(crate) fn record_refusal(&self, how: crate::conn::Refusal) {
        self.connections_refused
            .get_or_create(&RefusedLabels { how: how.label() })
            .inc();
    }

    /// Removes every series of `plugin` (its calls, latencies and bytes),
    /// once it is gone from the registry: a removed plugin's series would
    /// otherwise stay in every scrape until the server restarts.
    pub(crate) fn forget_plugin(&self, plugin: &str) {
        let tools = self
            .tools_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(plugin)
            .unwrap_or_default();
        for tool in tools {
            self.remove_tool_series(plugin, tool);
        }
        let labels = PluginLabels {
            plugin: plugin.to_owned(),
        };
        self.bytes_in.remove(&labels);
        self.bytes_out.remove(&labels);
        // The next scrape encodes afresh.
        self.scraped.store(None);
    }

    /// Removes the series of `plugin`'s tools that its live instance no
    /// longer offers (`live`, its tool ids), once a reload or rescan
    /// changed it: a renamed or dropped tool's series would otherwise stay
    /// in every scrape until the server restarts.
    pub(crate) fn forget_gone_tools(&self, plugin: &str, live: &[&str]) {
        let gone: Vec<String> = {
            let mut seen = self
                .tools_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(tools) = seen.get_mut(plugin) else {
                return;
            };
            let gone: Vec<String> = tools
                .iter()
                .filter(|tool| *tool != UNKNOWN_TOOL && !live.contains(&tool.as_str()))
                .cloned()
                .collect();
            for tool in &gone {
                tools.remove(tool);
            }
            gone
        };
        if gone.is_empty() {
            return;
        }
        for tool in gone {
            self.remove_tool_series(plugin, tool);
        }
        self.scraped.store(None);
    }

    /// Removes the call and latency series of one tool of `plugin`.
    fn remove_tool_series(&self, plugin: &str, tool: String) {
        for outcome in Outcome::ALL {
            self.calls.remove(&CallLabels {
                plugin: plugin.to_owned(),
                tool: Text(tool.clone()),
                outcome,
            });
        }
        self.call_seconds.remove(&ToolLabels {
            plugin: plugin.to_owned(),
            tool: Text(tool),
        });
    }

    /// Records one HTTP request under its route.
    pub(crate) fn record_request(
        &self,
        route: Route,
        method: &axum::http::Method,
        status: Option<axum::http::StatusCode>,
        elapsed: Duration,
    ) {
        self.request_seconds
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .observe(elapsed.as_secs_f64());
        self.requests
            .get_or_create(&RequestLabels {
                route,
                method: method_label(method),
                status: status_class(status),
            })
            .inc();
    }

    /// Records a finished load pass.
    pub(crate) fn record_load_pass(&self, report: &LoadReport) {
        self.load_passes.inc();
        self.load_seconds.set(report.elapsed_ms / 1000.0);
        for (outcome, count) in [
            ("loaded", report.loaded()),
            ("failed", report.failed()),
            ("unavailable", report.unavailable()),
        ] {
            self.load_plugins
                .get_or_create(&LoadLabels { outcome })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// [`Metrics::encode`], built at most once per [`SCRAPE_TICK`].
    /// Readers never lock: two scrapes that miss at once both encode, the
    /// later store wins.
    pub(crate) fn scrape(&self) -> Result<Bytes, std::fmt::Error> {
        let tick = self.started.elapsed().as_millis() / SCRAPE_TICK.as_millis();
        if let Some(cached) = &*self.scraped.load()
            && cached.0 == tick
        {
            return Ok(cached.1.clone());
        }
        let body = Bytes::from(self.encode()?);
        self.scraped.store(Some(Arc::new((tick, body.clone()))));
        Ok(body)
    }

    /// Every metric in the OpenMetrics text format (what Prometheus
    /// scrapes), ending with `# EOF`.
    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The `method` label: the standard methods by name, anything else `OTHER`.
fn method_label(method: &axum::http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        "TRACE" => "TRACE",
        "CONNECT" => "CONNECT",
        _ => "OTHER",
    }
}

/// The `status` label: the answer's class (`1xx` to `5xx`), or `aborted` for a request
/// whose client went away before its answer was ready.
fn status_class(status: Option<axum::http::StatusCode>) -> &'static str {
    let Some(status) = status else {
        return "aborted";
    };
    match status.as_u16() / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::{Body, to_bytes};
    use axum::http::{Method, Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::config::ServerConfig;
    use crate::server::build_loader;
    use crate::state::AppState;

    fn loader() -> Arc<Loader> {
        Arc::new(build_loader(&ServerConfig::default().lib_paths))
    }

    /// The sample lines of `text` (no comments).
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    /// Both dropped-answer series are scraped from the start, at zero: the
    /// first drop is an increase a query sees.
    #[test]
    fn dropped_answers_are_counted_from_zero() {
        let metrics = Metrics::new(loader());
        let text = metrics.encode().unwrap();
        for reason in ["no_room", "too_large"] {
            let series = format!("forgesyte_answers_dropped_total{{reason=\"{reason}\"}} 0");
            assert!(samples(&text).contains(&series.as_str()), "{text}");
        }
    }

    #[test]
    fn outcomes_follow_the_run_errors() {
        let of = |e: RunError| Outcome::of(&Err::<(), _>(e));
        assert_eq!(Outcome::of(&Ok::<(), RunError>(())), Some(Outcome::ok));
        assert_eq!(of(RunError::PluginNotFound { held_by: None }), None);
        assert_eq!(of(RunError::UnknownTool), None);
        let timeout = RunError::Timeout {
            after: Duration::from_secs(1),
            reason: "r".into(),
        };
        assert_eq!(of(timeout), Some(Outcome::timeout));
        let fault = RunError::Fault {
            kind: "ToolPanic".into(),
            message: "m".into(),
        };
        assert_eq!(of(fault), Some(Outcome::fault));
        assert_eq!(
            of(RunError::TooManyCalls {
                limit: 1,
                abandoned: 0,
            }),
            Some(Outcome::rejected)
        );
        assert_eq!(
            of(RunError::NotRunnable {
                state: None,
                reason: None
            }),
            Some(Outcome::not_runnable)
        );
    }

    /// A tool's name is the plugin's choice: quotes, backslashes and line
    /// breaks in it are escaped, so it neither breaks the scrape nor adds
    /// series.
    /// Calls up to the default time limit (60 s) fall in a bucket below
    /// `+Inf`.
    #[test]
    fn call_times_up_to_the_default_limit_have_a_bucket() {
        let metrics = Metrics::new(loader());
        metrics.record_call("p", "t", Outcome::ok, Some(Duration::from_secs(59)));
        let text = metrics.encode().unwrap();
        let finite: Vec<&str> = samples(&text)
            .into_iter()
            .filter(|l| l.starts_with("forgesyte_tool_call_duration_seconds_bucket"))
            .filter(|l| !l.contains("le=\"+Inf\""))
            .collect();
        let last = finite.last().expect("finite buckets");
        assert!(last.ends_with(" 1"), "{last}");
        let le: f64 = last
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|v| v.parse().ok())
            .expect("a bound");
        assert!((60.0..=120.0).contains(&le), "{le}");
    }

    #[test]
    fn tool_names_are_escaped_in_label_values() {
        let metrics = Metrics::new(loader());
        let tool = "q\"x\\y\nforgesyte_injected_total 999\n#";
        metrics.record_call("p", tool, Outcome::ok, Some(Duration::from_millis(1)));
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                r#"forgesyte_tool_calls_total{plugin="p",tool="q\"x\\y\nforgesyte_injected_total 999\n#",outcome="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("forgesyte_injected_total")),
            "{text}"
        );
    }

    #[test]
    fn a_forgotten_plugin_leaves_no_series_and_the_others_keep_theirs() {
        let metrics = Metrics::new(loader());
        for (plugin, tool, outcome) in [
            ("gone", "a", Outcome::ok),
            ("gone", "a", Outcome::fault),
            ("gone", "b", Outcome::timeout),
            ("gone", UNKNOWN_TOOL, Outcome::not_runnable),
            ("kept", "a", Outcome::ok),
        ] {
            metrics.record_call(plugin, tool, outcome, Some(Duration::from_millis(2)));
            metrics.record_bytes(plugin, 5, 7);
        }
        let before = metrics.scrape().unwrap();
        assert!(String::from_utf8_lossy(&before).contains(r#"plugin="gone""#));
        metrics.forget_plugin("gone");
        // The scrape cached within its tick is dropped too.
        let text = String::from_utf8_lossy(&metrics.scrape().unwrap()).into_owned();
        assert!(!text.contains(r#"plugin="gone""#), "{text}");
        for kept in [
            r#"forgesyte_tool_calls_total{plugin="kept",tool="a",outcome="ok"} 1"#,
            r#"forgesyte_tool_call_duration_seconds_count{plugin="kept",tool="a"} 1"#,
            r#"forgesyte_tool_request_bytes_total{plugin="kept"} 5"#,
        ] {
            assert!(samples(&text).contains(&kept), "{kept} in {text}");
        }
        // A plugin of the same name later starts from zero.
        metrics.record_call("gone", "a", Outcome::ok, None);
        let text = metrics.encode().unwrap();
        assert!(
            samples(&text)
                .contains(&r#"forgesyte_tool_calls_total{plugin="gone",tool="a",outcome="ok"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn the_series_of_tools_a_reloaded_plugin_no_longer_offers_are_dropped() {
        let metrics = Metrics::new(loader());
        for tool in ["old", "kept", UNKNOWN_TOOL] {
            metrics.record_call("p", tool, Outcome::ok, Some(Duration::from_millis(2)));
        }
        metrics.record_call("q", "old", Outcome::ok, None);
        let _ = metrics.scrape().unwrap();
        metrics.forget_gone_tools("p", &["kept", "new"]);
        let text = String::from_utf8_lossy(&metrics.scrape().unwrap()).into_owned();
        assert!(!text.contains(r#"plugin="p",tool="old""#), "{text}");
        for kept in [
            r#"forgesyte_tool_calls_total{plugin="p",tool="kept",outcome="ok"} 1"#.to_owned(),
            format!(
                r#"forgesyte_tool_calls_total{{plugin="p",tool="{UNKNOWN_TOOL}",outcome="ok"}} 1"#
            ),
            r#"forgesyte_tool_calls_total{plugin="q",tool="old",outcome="ok"} 1"#.to_owned(),
        ] {
            assert!(samples(&text).contains(&kept.as_str()), "{kept} in {text}");
        }
    }

    #[test]
    fn recorded_calls_and_load_passes_are_encoded() {
        let metrics = Metrics::new(loader());
        for _ in 0..3 {
            metrics.record_call("p", "t", Outcome::ok, Some(Duration::from_millis(3)));
        }
        metrics.record_call("p", "t", Outcome::not_runnable, None);
        metrics.record_bytes("p", 10, 32);
        metrics.record_load_pass(&LoadReport {
            plugins: Vec::new(),
            elapsed_ms: 1500.0,
        });
        let text = metrics.encode().unwrap();
        let lines = samples(&text);
        for expected in [
            r#"forgesyte_tool_calls_total{plugin="p",tool="t",outcome="ok"} 3"#,
            r#"forgesyte_tool_calls_total{plugin="p",tool="t",outcome="not_runnable"} 1"#,
            r#"forgesyte_tool_call_duration_seconds_count{plugin="p",tool="t"} 3"#,
            r#"forgesyte_tool_request_bytes_total{plugin="p"} 10"#,
            r#"forgesyte_tool_response_bytes_total{plugin="p"} 32"#,
            r#"forgesyte_build_info{version=""#,
            "forgesyte_load_passes_total 1",
            "forgesyte_load_pass_duration_seconds 1.5",
            r#"forgesyte_load_pass_plugins{outcome="failed"} 0"#,
        ] {
            assert!(
                lines.iter().any(|l| l.starts_with(expected)),
                "no {expected} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
    }

    /// A request whose client went away before its answer (hyper drops
    /// its future) is counted, as `aborted`: left out, the count ran below
    /// the calls made and the latency histogram lost its slowest requests.
    #[tokio::test]
    async fn a_request_dropped_before_its_answer_is_counted_as_aborted() {
        use tower::{Layer, Service};
        let state = AppState::new(loader(), &ServerConfig::default());
        let mut service =
            http::TrackLayer::new(state.clone()).layer(tower::service_fn(|_: Request<Body>| {
                std::future::pending::<Result<axum::response::Response, std::convert::Infallible>>()
            }));
        let request = Request::builder()
            .uri("/v1/plugins/p/tools/t/run")
            .body(Body::empty())
            .unwrap();
        let call = service.call(request);
        // Polled, then dropped unanswered.
        let waited = tokio::time::timeout(Duration::from_millis(20), call).await;
        assert!(waited.is_err());
        let text = state.metrics().encode().unwrap();
        let expected =
            r#"forgesyte_http_requests_total{route="_unmatched",method="GET",status="aborted"} 1"#;
        assert!(samples(&text).contains(&expected), "{text}");
        assert!(
            samples(&text).iter().any(|l| l.starts_with(
                r#"forgesyte_http_request_duration_seconds_count{route="_unmatched"} 1"#
            )),
            "{text}"
        );
    }

    #[tokio::test]
    async fn requests_are_labelled_by_route_template_never_by_path() {
        let state = AppState::new(loader(), &ServerConfig::default());
        let app = crate::app(state.clone());
        for uri in [
            "/v1/plugins/secret-1/health",
            "/v1/plugins/secret-2/health",
            "/nowhere/secret-3",
        ] {
            let request = Request::builder().uri(uri).body(Body::empty()).unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::NOT_FOUND);
        }
        // A run of a plugin that does not exist: a 404, never a `plugin` label.
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/plugins/secret-4/tools/secret-5/run")
            .body(Body::from("{}"))
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        let request = Request::builder()
            .method(Method::GET)
            .uri("/metrics")
            .body(Body::empty())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(!text.contains("secret"), "a path became a label:\n{text}");
        let lines = samples(&text);
        for expected in [
            r#"forgesyte_http_requests_total{route="/v1/plugins/{name}/health",method="GET",status="4xx"} 2"#,
            r#"forgesyte_http_requests_total{route="_unmatched",method="GET",status="4xx"} 1"#,
            r#"forgesyte_http_requests_total{route="/v1/plugins/{name}/tools/{tool}/run",method="POST",status="4xx"} 1"#,
        ] {
            assert!(lines.contains(&expected), "no {expected} in\n{text}");
        }
    }
}
