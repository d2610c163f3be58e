//! The event stream, `GET /v1/events`: Server-Sent Events of plugin state
//! changes, crashes and restarts, load-pass progress and reload results.
//!
//! This module owns the [`Events`] hub: one bounded ring buffer of the last
//! [`EVENT_BUFFER`] events, each with an id one higher than the last, and a
//! wake-up signal for live subscribers. Every subscriber reads from that one
//! buffer at its own pace, so memory never grows with the number of
//! subscribers or their slowness: a subscriber that falls more than a
//! buffer behind (or a client resuming with `Last-Event-ID` from an event
//! no longer held, or from another server process) gets a `reset` event
//! first, which tells it to fetch the full state again, and continues from
//! the newest event. An event is encoded once, as it is published: every
//! subscriber sends those same bytes (shared, never copied), so one that
//! reads nothing holds no copy of the event it is stuck on either.
//!
//! Plugin events come from the registry through its observer hook
//! ([`forgesyte_registry::Observer`]); the load pass ([`Events::load_started`],
//! [`Events::load_finished`]) and every reload ([`Events::reload_finished`],
//! the one function each way of reloading calls) publish their own.
//!
//! It knows the registry's [`Change`], never the router, the loader or
//! the other handlers (a reload's report reaches it as any serialisable
//! object). Ids start at the process's start
//! time in microseconds since the Unix epoch, so a client's id from an
//! earlier server process is always older than this one's buffer (and gets
//! a `reset`), never mistaken for a recent event.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use forgesyte_registry::{Change, ChangeKind, Observer, PluginLifecycleState};
use futures_util::Stream;
use serde::Serialize;
use tokio::sync::watch;

use crate::state::AppState;

/// How many events the hub keeps for resuming clients.
pub(crate) const EVENT_BUFFER: usize = 1024;

/// How many bytes of events (their JSON) the hub keeps at most, the newest
/// included, unless the newest alone is larger (it is kept alone then): a
/// plugin's reason may be 64 KiB, and a reload's event holds every
/// plugin's, so a count alone let the buffer hold a hundred MiB.
pub(crate) const EVENT_BUFFER_BYTES: usize = 4 << 20;

/// The most characters of a reason a state, crash or restart event
/// carries (the health route has the whole reason).
const EVENT_REASON_CHARS: usize = 1024;

/// A reason (or an exit reason) as an event carries it: its first
/// [`EVENT_REASON_CHARS`] characters.
fn cut_reason(reason: &str) -> std::borrow::Cow<'_, str> {
    forgesyte_errors::within(reason, EVENT_REASON_CHARS)
}

/// At most this many events are taken from the buffer at once per
/// subscriber (its next read continues where this one ended).
const BATCH: usize = 64;

/// How often an idle stream sends a comment, so proxies keep it open and a
/// dead client is noticed.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The comment an idle stream sends every [`KEEP_ALIVE`].
const KEEP_ALIVE_COMMENT: &[u8] = b":\n\n";

/// Load-progress events are published at most this often (and at the end).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// One published event, as stored and sent.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    /// Its id: one more than the event before it.
    pub(crate) id: u64,
    /// The SSE event name (`state`, `crash`, `restart`, `load`, `reload`).
    pub(crate) kind: &'static str,
    /// The event as every subscriber sends it (`id:`, `event:` and `data:`
    /// lines; its JSON holds no line break).
    frame: Bytes,
}

impl Stored {
    /// Event `id` of `kind` with JSON `data` (one line), encoded.
    fn new(id: u64, kind: &'static str, data: &str) -> Stored {
        let head = format!("id: {id}\nevent: {kind}\ndata: ");
        let mut frame = Vec::with_capacity(head.len() + data.len() + 2);
        frame.extend_from_slice(head.as_bytes());
        frame.extend_from_slice(data.as_bytes());
        frame.extend_from_slice(b"\n\n");
        Stored {
            id,
            kind,
            frame: Bytes::from(frame),
        }
    }

    /// Its JSON data.
    #[cfg(test)]
    pub(crate) fn data(&self) -> &str {
        let text = std::str::from_utf8(&self.frame).unwrap_or_default();
        text.split_once("\ndata: ")
            .map_or("", |(_, data)| data.trim_end_matches('\n'))
    }
}

/// What a subscriber at some id gets from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Since {
    /// The events after its id (at most the batch asked for; none when it
    /// is up to date).
    Events(Vec<Arc<Stored>>),
    /// Events after its id are no longer held (or its id was never this
    /// process's): it must start over from `last`.
    Gap {
        /// The newest id.
        last: u64,
    },
}

/// The ring buffer itself.
#[derive(Debug)]
struct Ring {
    /// The id the next event gets.
    next: u64,
    events: VecDeque<Arc<Stored>>,
    capacity: usize,
    /// The bytes of the events held, as sent.
    bytes: usize,
}

/// Progress of the running load pass, counted from the registry's changes.
#[derive(Debug, Default)]
struct LoadProgress {
    running: bool,
    started: Option<Instant>,
    registered: usize,
    /// The plugins that left LOADED during the pass, each once (a crash
    /// out of LOADED counts; a restart's way back through LOADED does not
    /// count again).
    settled: std::collections::HashSet<String>,
    last_sent: Option<Instant>,
}

/// The event hub: buffer, subscribers' wake-up, and load-pass progress.
#[derive(Debug)]
pub(crate) struct Events {
    ring: Mutex<Ring>,
    /// Carries the newest id; subscribers wait on it.
    wake: watch::Sender<u64>,
    /// Set at shutdown: every stream ends.
    closed: AtomicBool,
    load: Mutex<LoadProgress>,
}

/// The data of a plugin event (`state`, `crash`, `restart`).
#[derive(Debug, Serialize)]
struct PluginEvent<'a> {
    plugin: &'a str,
    /// `registered`, `state`, `reason`, `crashed`, `restarting`.
    change: &'static str,
    from: Option<&'static str>,
    to: &'static str,
    reason: Option<std::borrow::Cow<'a, str>>,
    restart_count: u64,
    exit: Option<std::borrow::Cow<'a, str>>,
    /// Milliseconds since the Unix epoch.
    at_ms: u64,
}

/// The data of a `load` event.
#[derive(Debug, Serialize)]
struct LoadEvent {
    /// `started`, `progress` or `finished`.
    phase: &'static str,
    registered: usize,
    /// Plugins out of LOADED (INITIALIZED, FAILED or UNAVAILABLE).
    settled: usize,
    loaded: Option<usize>,
    failed: Option<usize>,
    unavailable: Option<usize>,
    elapsed_ms: f64,
    at_ms: u64,
}

/// The data of a `reload` event: the reload's report, with what asked
/// for it.
#[derive(Debug, Serialize)]
struct ReloadEvent<'a, R: Serialize> {
    /// `admin` (a route), or what the caller names.
    trigger: &'a str,
    #[serde(flatten)]
    report: &'a R,
    at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Events {
    /// A hub keeping `capacity` events, its first id from the clock.
    pub(crate) fn new(capacity: usize) -> Arc<Events> {
        let first = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(1))
            .max(1);
        Events::starting_at(capacity, first)
    }

    /// A hub keeping `capacity` events whose first id is `first` (at least 1).
    pub(crate) fn starting_at(capacity: usize, first: u64) -> Arc<Events> {
        let first = first.max(1);
        let (wake, _) = watch::channel(first - 1);
        Arc::new(Events {
            ring: Mutex::new(Ring {
                next: first,
                events: VecDeque::with_capacity(capacity.min(EVENT_BUFFER)),
                capacity: capacity.max(1),
                bytes: 0,
            }),
            wake,
            closed: AtomicBool::new(false),
            load: Mutex::new(LoadProgress::default()),
        })
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes one event: the next id, into the buffer (the oldest one
    /// dropped when full), and wakes the subscribers. Returns its id.
    pub(crate) fn publish(&self, kind: &'static str, data: &impl Serialize) -> Option<u64> {
        let data = match serde_json::to_string(data) {
            Ok(data) => data,
            Err(e) => {
                tracing::warn!(error = %e, kind, "cannot serialise an event; dropped");
                return None;
            }
        };
        let id = {
            let mut ring = self.ring();
            let id = ring.next;
            ring.next += 1;
            let stored = Stored::new(id, kind, &data);
            ring.bytes += stored.frame.len();
            ring.events.push_back(Arc::new(stored));
            // The oldest go while there are too many, or too many bytes
            // (the newest stays, whatever its size).
            while ring.events.len() > ring.capacity
                || (ring.bytes > EVENT_BUFFER_BYTES && ring.events.len() > 1)
            {
                if let Some(old) = ring.events.pop_front() {
                    ring.bytes -= old.frame.len();
                }
            }
            id
        };
        self.wake.send_replace(id);
        Some(id)
    }

    /// The newest id (the one before the first when nothing was published).
    pub(crate) fn last_id(&self) -> u64 {
        self.ring().next - 1
    }

    /// The events after `after`, at most `max`; [`Since::Gap`] when some
    /// of them are no longer held or `after` is not an id this hub gave out.
    pub(crate) fn since(&self, after: u64, max: usize) -> Since {
        let ring = self.ring();
        let last = ring.next - 1;
        let oldest = ring.events.front().map_or(ring.next, |e| e.id);
        if after > last || after < oldest - 1 {
            return Since::Gap { last };
        }
        // Ids are consecutive: the first event after `after` is at
        // `after + 1 - oldest`.
        let skip = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        Since::Events(ring.events.iter().skip(skip).take(max).cloned().collect())
    }

    /// Ends every stream (at shutdown, so draining does not wait on them).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.send_modify(|_| {});
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The registry observer that publishes this hub's plugin events.
    pub(crate) fn observer(self: &Arc<Self>) -> Arc<dyn Observer> {
        Arc::new(HubObserver(Arc::clone(self)))
    }

    /// One registry change: a plugin event (tool calls' `INITIALIZED ⇄
    /// RUNNING` moves are not published: they happen twice per call and the
    /// counts of the status objects already show them), and load progress.
    fn on_change(&self, change: &Change<'_>) {
        if change.is_call_bookkeeping() {
            return;
        }
        let kind = match change.kind {
            ChangeKind::Crashed => "crash",
            ChangeKind::Restarting => "restart",
            _ => "state",
        };
        self.publish(
            kind,
            &PluginEvent {
                plugin: change.plugin,
                change: change.kind.as_str(),
                from: change.from.map(PluginLifecycleState::as_str),
                to: change.to.as_str(),
                reason: change.reason.map(cut_reason),
                restart_count: change.restart_count,
                exit: change.exit.map(cut_reason),
                at_ms: now_ms(),
            },
        );
        self.count_progress(change);
    }

    fn load(&self) -> std::sync::MutexGuard<'_, LoadProgress> {
        self.load.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn count_progress(&self, change: &Change<'_>) {
        let mut load = self.load();
        if !load.running {
            return;
        }
        match change.kind {
            ChangeKind::Registered => load.registered += 1,
            ChangeKind::State | ChangeKind::Crashed
                if change.from == Some(PluginLifecycleState::Loaded)
                    && change.to != PluginLifecycleState::Loaded =>
            {
                if !load.settled.insert(change.plugin.to_owned()) {
                    return;
                }
            }
            _ => return,
        }
        let now = Instant::now();
        let due = load
            .last_sent
            .is_none_or(|sent| now.duration_since(sent) >= PROGRESS_EVERY);
        if due || load.settled.len() == load.registered {
            load.last_sent = Some(now);
            let event = LoadEvent {
                phase: "progress",
                registered: load.registered,
                settled: load.settled.len(),
                loaded: None,
                failed: None,
                unavailable: None,
                elapsed_ms: load
                    .started
                    .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3),
                at_ms: now_ms(),
            };
            drop(load);
            self.publish("load", &event);
        }
    }

    /// The startup load pass begins.
    pub(crate) fn load_started(&self) {
        *self.load() = LoadProgress {
            running: true,
            started: Some(Instant::now()),
            ..LoadProgress::default()
        };
        self.publish(
            "load",
            &LoadEvent {
                phase: "started",
                registered: 0,
                settled: 0,
                loaded: None,
                failed: None,
                unavailable: None,
                elapsed_ms: 0.0,
                at_ms: now_ms(),
            },
        );
    }

    /// The startup load pass ended with these counts (`None` when it
    /// failed as a whole).
    /// `elapsed_ms` is the loader's own measure of the pass, which starts
    /// a hair after this hub's: the event carries the larger of the two, so
    /// it never reads less than the `progress` event before it.
    pub(crate) fn load_finished(&self, counts: Option<(usize, usize, usize)>, elapsed_ms: f64) {
        let (registered, settled, elapsed_ms) = {
            let mut load = self.load();
            load.running = false;
            let ours = load
                .started
                .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3);
            (load.registered, load.settled.len(), elapsed_ms.max(ours))
        };
        self.publish(
            "load",
            &LoadEvent {
                phase: "finished",
                registered,
                settled,
                loaded: counts.map(|c| c.0),
                failed: counts.map(|c| c.1),
                unavailable: counts.map(|c| c.2),
                elapsed_ms,
                at_ms: now_ms(),
            },
        );
    }

    /// A reload ended: publishes its report (a JSON object: the reload
    /// routes' `ReloadReport`) as one `reload` event, with `trigger` and
    /// `at_ms` added. Every way of reloading (the admin routes, and
    /// whatever else triggers a reload) calls this once per reload, naming
    /// itself in `trigger`.
    pub(crate) fn reload_finished(&self, trigger: &str, report: &impl Serialize) {
        self.publish(
            "reload",
            &ReloadEvent {
                trigger,
                report,
                at_ms: now_ms(),
            },
        );
    }

    /// The stream of one subscriber: `hello` (or, resuming, the missed
    /// events, or `reset`), then every event as it is published, until the
    /// hub closes.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        last_event_id: Option<&str>,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + use<> {
        let mut wake = self.wake.subscribe();
        wake.mark_changed();
        let mut pending = VecDeque::new();
        // An empty `Last-Event-ID` is none (the SSE rule).
        let last_event_id = last_event_id.map(str::trim).filter(|id| !id.is_empty());
        let last = match last_event_id.map(str::parse::<u64>) {
            None => {
                let last = self.last_id();
                pending.push_back(Pending::Marker(marker("hello", last, "subscribed")));
                last
            }
            Some(Ok(id)) => id,
            // Not an id of ours: start over.
            Some(Err(_)) => {
                let last = self.last_id();
                pending.push_back(Pending::Marker(marker(
                    "reset",
                    last,
                    "unknown Last-Event-ID",
                )));
                last
            }
        };
        let cursor = Cursor {
            hub: Arc::clone(self),
            wake,
            last,
            pending,
        };
        futures_util::stream::unfold(cursor, |mut c| async move {
            loop {
                if let Some(event) = c.pending.pop_front() {
                    return Some((Ok(event.into_bytes()), c));
                }
                if c.hub.is_closed() {
                    return None;
                }
                // Marks the current version seen before reading, so a
                // publish after the read wakes `changed` below.
                c.wake.borrow_and_update();
                match c.hub.since(c.last, BATCH) {
                    Since::Events(events) if !events.is_empty() => {
                        for stored in events {
                            c.last = stored.id;
                            c.pending.push_back(Pending::Stored(stored));
                        }
                    }
                    Since::Events(_) => {
                        match tokio::time::timeout(KEEP_ALIVE, c.wake.changed()).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => return None,
                            // Quiet for its interval: a comment.
                            Err(_) => {
                                return Some((Ok(Bytes::from_static(KEEP_ALIVE_COMMENT)), c));
                            }
                        }
                    }
                    Since::Gap { last } => {
                        c.last = last;
                        c.pending.push_back(Pending::Marker(marker(
                            "reset",
                            last,
                            "events were missed",
                        )));
                    }
                }
            }
        })
    }
}

/// A `hello` or `reset` event: not buffered, it carries the newest id (the
/// position the client continues from) and tells the client to fetch the
/// full state.
fn marker(kind: &'static str, last: u64, why: &str) -> Bytes {
    let data = serde_json::json!({"last_id": last, "detail": why});
    Bytes::from(format!(
        "id: {last}\nevent: {kind}\nretry: 1000\ndata: {data}\n\n"
    ))
}

/// One subscriber's position.
struct Cursor {
    hub: Arc<Events>,
    wake: watch::Receiver<u64>,
    last: u64,
    pending: VecDeque<Pending>,
}

/// An event taken for a subscriber and not yet sent: a stored one is
/// shared with the hub, and sent as the hub's bytes, so a subscriber that
/// reads nothing holds no copies of the events it is behind on, nor of the
/// one it is sending.
enum Pending {
    Stored(Arc<Stored>),
    Marker(Bytes),
}

impl Pending {
    fn into_bytes(self) -> Bytes {
        match self {
            Pending::Stored(stored) => stored.frame.clone(),
            Pending::Marker(bytes) => bytes,
        }
    }
}

/// Publishes a hub's plugin events from the registry.
struct HubObserver(Arc<Events>);

impl Observer for HubObserver {
    fn observe(&self, change: &Change<'_>) {
        self.0.on_change(change);
    }
}

/// Server-Sent Events of plugin state changes, crashes, restarts,
/// load-pass progress and reload results.
///
/// Each event has an `id`; a client reconnecting with `Last-Event-ID` (as
/// `EventSource` does) gets the events it missed from a buffer of the last
/// 1,024, or a `reset` event when they are no longer held. A new
/// subscriber first gets `hello`; on `hello` and `reset` a client fetches
/// the full state (`GET /v1/plugins`).
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "server",
    params(("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received, to resume after it")),
    responses((
        status = 200,
        description = "An endless `text/event-stream`. Event names: `hello` and `reset` (data `{last_id, detail}`: fetch the full state), \
                       `state`, `crash`, `restart` (data `{plugin, change, from, to, reason, restart_count, exit, at_ms}`), \
                       `load` (`{phase: started|progress|finished, registered, settled, loaded, failed, unavailable, elapsed_ms, at_ms}`), \
                       `reload` (`{trigger, plugins: [ReloadOutcome], loaded, failed, unavailable, elapsed_ms, at_ms}`)",
        content_type = "text/event-stream"
    ))
)]
pub(crate) async fn events(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let stream = state.events().subscribe(last.as_deref());
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use futures_util::StreamExt;
    use serde_json::json;

    use super::*;

    fn ids(since: Since) -> Vec<u64> {
        match since {
            Since::Events(events) => events.iter().map(|e| e.id).collect(),
            Since::Gap { last } => panic!("gap at {last}"),
        }
    }

    /// Large events are bounded by their bytes too (a count alone let
    /// reasons of 64 KiB fill a hundred MiB); the newest stays, however
    /// large; a reason in a state event is cut to 1,024 characters.
    #[test]
    fn the_buffer_is_bounded_in_bytes_and_reasons_are_cut() {
        let hub = Events::starting_at(EVENT_BUFFER, 1);
        let big = "x".repeat(EVENT_BUFFER_BYTES / 4);
        for _ in 0..10 {
            hub.publish("reload", &json!({"r": big}));
        }
        let ring = hub.ring();
        assert!(ring.bytes <= EVENT_BUFFER_BYTES, "{}", ring.bytes);
        assert_eq!(ring.events.len(), 3);
        assert_eq!(
            ring.bytes,
            ring.events.iter().map(|e| e.frame.len()).sum::<usize>()
        );
        drop(ring);
        hub.publish("reload", &json!({"r": "y".repeat(EVENT_BUFFER_BYTES * 2)}));
        assert_eq!(hub.ring().events.len(), 1, "the newest stays alone");

        let registry = forgesyte_registry::Registry::new();
        registry.add_observer(hub.observer());
        registry
            .register("p", forgesyte_registry::PluginInfo::default())
            .unwrap();
        registry.mark_failed("p", "z".repeat(70_000)).unwrap();
        let last = hub.ring().events.back().cloned().unwrap();
        let event: serde_json::Value = serde_json::from_str(last.data()).unwrap();
        let reason = event["reason"].as_str().unwrap();
        assert_eq!(
            reason.chars().count(),
            EVENT_REASON_CHARS + 1,
            "{reason:.20}"
        );
        assert!(reason.ends_with('…'));
        // A crash's exit reason as well (it carried a runner's 10 MB).
        registry
            .register("c", forgesyte_registry::PluginInfo::default())
            .unwrap();
        let exit = forgesyte_registry::ExitInfo {
            description: Some("e".repeat(70_000)),
            ..forgesyte_registry::ExitInfo::default()
        };
        registry.mark_crashed("c", "crashed", exit).unwrap();
        let last = hub.ring().events.back().cloned().unwrap();
        let event: serde_json::Value = serde_json::from_str(last.data()).unwrap();
        let exit = event["exit"].as_str().unwrap();
        assert_eq!(exit.chars().count(), EVENT_REASON_CHARS + 1, "{exit:.20}");
    }

    #[test]
    fn ids_are_consecutive_and_the_buffer_is_bounded() {
        let hub = Events::starting_at(4, 10);
        assert_eq!(hub.last_id(), 9);
        assert_eq!(ids(hub.since(9, 10)), Vec::<u64>::new());
        for i in 0..6 {
            assert_eq!(hub.publish("state", &json!({"n": i})), Some(10 + i));
        }
        assert_eq!(hub.last_id(), 15);
        assert_eq!(hub.ring().events.len(), 4, "bounded");
        // 12..=15 are held: resuming from 11 or later works.
        assert_eq!(ids(hub.since(11, 10)), [12, 13, 14, 15]);
        assert_eq!(ids(hub.since(13, 10)), [14, 15]);
        assert_eq!(ids(hub.since(13, 1)), [14]);
        assert_eq!(ids(hub.since(15, 10)), Vec::<u64>::new());
        // 11 fell out: resuming from 10 would miss it.
        assert_eq!(hub.since(10, 10), Since::Gap { last: 15 });
        assert_eq!(hub.since(0, 10), Since::Gap { last: 15 });
        // An id this hub never gave out (another process's).
        assert_eq!(hub.since(16, 10), Since::Gap { last: 15 });
        let held = match hub.since(14, 1) {
            Since::Events(events) => events,
            Since::Gap { .. } => panic!("gap"),
        };
        assert_eq!(held[0].kind, "state");
        assert_eq!(held[0].data(), r#"{"n":5}"#);
    }

    #[test]
    fn an_empty_hub_resumes_only_from_its_last_id() {
        let hub = Events::starting_at(8, 100);
        assert_eq!(ids(hub.since(99, 8)), Vec::<u64>::new());
        assert_eq!(hub.since(98, 8), Since::Gap { last: 99 });
        assert_eq!(hub.since(100, 8), Since::Gap { last: 99 });
    }

    #[test]
    fn ids_start_after_any_earlier_process() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros();
        let hub = Events::new(8);
        assert!(u128::from(hub.last_id()) + 1 >= before);
    }

    /// The text of the next SSE event of `stream` (bounded wait).
    async fn next_text(
        stream: &mut (impl Stream<Item = Result<Bytes, Infallible>> + Unpin),
    ) -> String {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("no event within 5 s")
            .expect("stream ended")
            .unwrap();
        String::from_utf8(event.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_subscriber_gets_hello_then_live_events_and_ends_on_close() {
        let hub = Events::starting_at(16, 1);
        hub.publish("state", &json!({"old": true}));
        let mut stream = Box::pin(hub.subscribe(None));
        let hello = next_text(&mut stream).await;
        assert!(
            hello.contains("event: hello\n") && hello.contains("id: 1\n"),
            "{hello}"
        );
        let publisher = Arc::clone(&hub);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            publisher.publish("load", &json!({"phase": "started"}));
        });
        let live = next_text(&mut stream).await;
        assert_eq!(
            live, "id: 2\nevent: load\ndata: {\"phase\":\"started\"}\n\n",
            "only events after subscribing"
        );
        hub.close();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
        assert!(matches!(end, Ok(None)), "stream did not end on close");
    }

    /// A quiet stream sends a comment every [`KEEP_ALIVE`], and events
    /// after it as before.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_sends_a_comment_at_each_interval() {
        let hub = Events::starting_at(16, 1);
        let mut stream = Box::pin(hub.subscribe(None));
        assert!(next_text(&mut stream).await.contains("event: hello"));
        // Paused time runs ahead to each timer (a bounded wait of 5 s
        // would end first).
        let started = tokio::time::Instant::now();
        for _ in 0..2 {
            let sent = stream.next().await.map(|sent| sent.map(|b| b.to_vec()));
            assert_eq!(sent, Some(Ok(b":\n\n".to_vec())));
        }
        assert!(
            started.elapsed() >= 2 * KEEP_ALIVE,
            "{:?}",
            started.elapsed()
        );
        hub.publish("state", &json!({"n": 1}));
        let live = next_text(&mut stream).await;
        assert_eq!(live, "id: 1\nevent: state\ndata: {\"n\":1}\n\n");
    }

    /// Every subscriber sends the hub's own bytes of an event: one that
    /// never reads holds no copy of it (400 such clients of a 1.2 MB reload
    /// event held 480 MB).
    #[tokio::test]
    async fn subscribers_send_the_hubs_bytes_never_a_copy() {
        let hub = Events::starting_at(16, 1);
        let mut streams: Vec<_> = (0..3).map(|_| Box::pin(hub.subscribe(None))).collect();
        for stream in &mut streams {
            assert!(next_text(stream).await.contains("event: hello"));
        }
        hub.publish("reload", &json!({"r": "x".repeat(100_000)}));
        let held = hub.ring().events.back().cloned().unwrap();
        for stream in &mut streams {
            let sent = tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(sent.as_ptr(), held.frame.as_ptr());
            assert_eq!(sent.len(), held.frame.len());
        }
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_reset_and_the_newest_events() {
        let hub = Events::starting_at(4, 1);
        let mut stream = Box::pin(hub.subscribe(None));
        assert!(next_text(&mut stream).await.contains("event: hello"));
        // Ten events while the subscriber reads nothing: six fall out.
        for i in 0..10 {
            hub.publish("state", &json!({"n": i}));
        }
        let reset = next_text(&mut stream).await;
        assert!(
            reset.contains("event: reset\n") && reset.contains("id: 10\n"),
            "{reset}"
        );
        hub.publish("state", &json!({"n": 10}));
        assert!(next_text(&mut stream).await.starts_with("id: 11\n"));
    }

    #[tokio::test]
    async fn resuming_replays_what_was_missed_or_resets() {
        let hub = Events::starting_at(4, 1);
        for i in 0..6 {
            hub.publish("state", &json!({"n": i}));
        }
        // Held: 3..=6.
        let mut resumed = Box::pin(hub.subscribe(Some("4")));
        assert!(next_text(&mut resumed).await.starts_with("id: 5\n"));
        assert!(next_text(&mut resumed).await.starts_with("id: 6\n"));
        // An empty id is no id: a fresh subscription.
        for empty in ["", " "] {
            let mut fresh = Box::pin(hub.subscribe(Some(empty)));
            let hello = next_text(&mut fresh).await;
            assert!(hello.contains("event: hello\n"), "{empty:?}: {hello}");
        }
        for (id, why) in [
            ("1", "events were missed"),
            ("99", "events were missed"),
            ("bogus", "unknown Last-Event-ID"),
        ] {
            let mut stream = Box::pin(hub.subscribe(Some(id)));
            let reset = next_text(&mut stream).await;
            assert!(reset.contains("event: reset\n"), "{id}: {reset}");
            assert!(
                reset.contains("id: 6\n") && reset.contains(why),
                "{id}: {reset}"
            );
        }
    }

    #[test]
    fn registry_changes_become_events_and_calls_do_not() {
        use forgesyte_registry::{PluginInfo, Registry};
        let hub = Events::starting_at(64, 1);
        let registry = Registry::new();
        registry.add_observer(hub.observer());
        hub.load_started();
        registry.register("p", PluginInfo::default()).unwrap();
        registry.mark_initialized("p").unwrap();
        registry.mark_running("p").unwrap();
        registry
            .end_call("p", Duration::from_millis(1), true)
            .unwrap();
        std::thread::sleep(Duration::from_millis(2));
        // The loader's own measure starts later than the hub's.
        hub.load_finished(Some((1, 0, 0)), 0.5);
        registry.mark_failed("p", "ToolPanic: boom").unwrap();
        let events = match hub.since(0, 64) {
            Since::Events(events) => events,
            Since::Gap { .. } => panic!("gap"),
        };
        let kinds: Vec<(&str, serde_json::Value)> = events
            .iter()
            .map(|e| (e.kind, serde_json::from_str(e.data()).unwrap()))
            .collect();
        let summary: Vec<String> = kinds
            .iter()
            .map(|(kind, v)| match *kind {
                "load" => format!("load {} {}/{}", v["phase"], v["settled"], v["registered"]),
                _ => format!("{kind} {} {} {}", v["plugin"], v["to"], v["reason"]),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "load \"started\" 0/0",
                "state \"p\" \"LOADED\" null",
                "load \"progress\" 0/1",
                "state \"p\" \"INITIALIZED\" null",
                "load \"progress\" 1/1",
                "load \"finished\" 1/1",
                "state \"p\" \"FAILED\" \"ToolPanic: boom\"",
            ]
        );
        assert_eq!(kinds[5].1["loaded"], 1);
        let elapsed = |i: usize| kinds[i].1["elapsed_ms"].as_f64().unwrap();
        assert!(elapsed(5) >= 2.0 && elapsed(5) >= elapsed(4), "{kinds:?}");
    }

    /// A plugin whose runner dies while it is LOADED (a crash in its
    /// constructor) is settled; one restarted during the pass (back
    /// through LOADED) is settled once.
    #[test]
    fn load_progress_counts_each_plugin_once_crashes_included() {
        use forgesyte_registry::{ExitInfo, PluginInfo, Registry};
        let crash = |registry: &Registry| {
            registry
                .mark_crashed("p", "CrashError: boom", ExitInfo::default())
                .unwrap();
        };
        let crashed_loaded = |registry: &Registry| crash(registry);
        let restarted = |registry: &Registry| {
            registry.mark_initialized("p").unwrap();
            crash(registry);
            registry.mark_restarting("p").unwrap();
            registry.mark_initialized("p").unwrap();
        };
        for (what, pass) in [
            (
                "crashed while LOADED",
                &crashed_loaded as &dyn Fn(&Registry),
            ),
            ("restarted during the pass", &restarted),
        ] {
            let hub = Events::starting_at(64, 1);
            let registry = Registry::new();
            registry.add_observer(hub.observer());
            hub.load_started();
            registry.register("p", PluginInfo::default()).unwrap();
            pass(&registry);
            hub.load_finished(Some((1, 0, 0)), 1.0);
            let events = match hub.since(1, 64) {
                Since::Events(events) => events,
                Since::Gap { .. } => panic!("gap"),
            };
            let settled: Vec<serde_json::Value> = events
                .iter()
                .filter(|e| e.kind == "load")
                .map(|e| serde_json::from_str::<serde_json::Value>(e.data()).unwrap())
                .map(|l| json!([l["phase"], l["settled"]]))
                .collect();
            // (The registration's progress, 0 of 1, comes first.)
            assert_eq!(
                settled,
                [
                    json!(["progress", 0]),
                    json!(["progress", 1]),
                    json!(["finished", 1])
                ],
                "{what}"
            );
        }
    }

    #[test]
    fn crashes_and_restarts_are_their_own_events() {
        use forgesyte_registry::{ExitInfo, PluginInfo, Registry};
        let hub = Events::starting_at(64, 1);
        let registry = Registry::new();
        registry.add_observer(hub.observer());
        registry.register("iso", PluginInfo::default()).unwrap();
        registry.mark_initialized("iso").unwrap();
        let exit = ExitInfo {
            description: Some("killed by signal SIGKILL (9)".into()),
            signal: Some("SIGKILL".into()),
            ..ExitInfo::default()
        };
        registry
            .mark_crashed("iso", "CrashError: killed by signal SIGKILL", exit)
            .unwrap();
        registry.mark_restarting("iso").unwrap();
        let events = match hub.since(2, 64) {
            Since::Events(events) => events,
            Since::Gap { .. } => panic!("gap"),
        };
        let crash: serde_json::Value = serde_json::from_str(events[0].data()).unwrap();
        assert_eq!(events[0].kind, "crash");
        assert_eq!(crash["change"], "crashed");
        assert_eq!(
            (&crash["from"], &crash["to"]),
            (&json!("INITIALIZED"), &json!("FAILED"))
        );
        assert_eq!(crash["exit"], "killed by signal SIGKILL (9)");
        let restart: serde_json::Value = serde_json::from_str(events[1].data()).unwrap();
        assert_eq!(events[1].kind, "restart");
        assert_eq!(
            (&restart["to"], &restart["restart_count"]),
            (&json!("LOADED"), &json!(1))
        );
        assert_eq!(events.len(), 2);
    }
}
