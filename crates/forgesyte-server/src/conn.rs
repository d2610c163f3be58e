//! Connections: the accept loop, the connection cap, and the time a client
//! may take to send a request's headers or keep an idle connection open.
//!
//! hyper serves each connection (`hyper::server::conn::http1`; within the
//! cap with upgrades, the WebSocket streams). [`drain_on_stop`] drains each
//! at the stop, and the drain waits until every permit of the cap and of
//! the probe reserve is back. A connection waiting for a request head
//! (none yet, or part of one: [`ReadClock::reading_head`]) closes at once,
//! as hyper closes an idle one: for a connection's first request hyper
//! would wait for the rest of the head, as long as the header timeout lets
//! the client take. A connection
//! ends at its upgrade (its permit is returned): the streams are capped
//! and drained on their own (`crate::stream::Streams`). Three things are our own,
//! because neither hyper nor axum offers them:
//!
//! - **Header and idle timeouts.** hyper's only read timer is
//!   `header_read_timeout`, armed whenever it waits for a request head: on a
//!   fresh connection and after every response. Alone it would close idle
//!   keep-alive connections after the (short) header timeout, or let a
//!   slowloris client trickle headers for the (long) idle timeout. Each
//!   connection gets its own [`RequestTimer`] and [`ReadClock`] instead: the
//!   timer hyper arms fires `header_read_timeout` after the connection was
//!   accepted (first request) or after the first byte of a later request
//!   arrived, and `idle_timeout` after a response when no byte came since.
//!   hyper arms no timer while it writes, so a client that stops reading
//!   (pipelined requests for large answers, never read) would hold its
//!   connection, and a place under the cap, for ever: a write that takes
//!   no byte for `idle_timeout` fails instead ([`TimedStream`]), and hyper
//!   closes the connection. So does a write whose client takes the
//!   response slower than `--answer-min-rate` once that grace is over
//!   ([`SlowRead`]): an answer it holds holds room in `--answer-memory`.
//! - **The cap.** A semaphore of `max_connections` permits is taken before
//!   a connection is served. Beyond it, [`PROBE_RESERVE`] more connections
//!   are served probes only (`/livez`, `/readyz`, `/v1/health`), every
//!   other route answering 503 with `Retry-After`, one request each; beyond
//!   those, a connection is accepted and closed at once (it costs nothing
//!   to hold).
//! - **Requests a web page sent.** [`crate::origin`]'s rules are checked
//!   as each request enters, before routing.
//! - **Accept errors.** Running out of file descriptors (`EMFILE`,
//!   `ENFILE`) or memory never ends the loop: it logs, waits
//!   [`ACCEPT_BACKOFF`] and accepts again.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Connections beyond the cap that are still served the probe routes.
pub(crate) const PROBE_RESERVE: usize = 16;

/// Places of the probe reserve one client may hold (a quarter): a client
/// that reopens each connection the moment it is closed kept the cap and
/// the whole reserve full, and the probes failed with the rest.
const RESERVE_PER_CLIENT: usize = 4;

/// The probe reserve's places held, by client: an IPv4 address, an IPv6
/// address's /64 (which one holder has whole). Loopback addresses are each
/// their own client, so a local health check keeps its places beside a
/// remote client's (a local process that sends from many loopback addresses
/// can still fill the reserve).
#[derive(Debug, Default)]
struct ReserveShares(Mutex<HashMap<IpAddr, usize>>);

/// The client an address belongs to: an IPv4 address (an IPv4-mapped
/// IPv6 address is its IPv4 address), or an IPv6 address's /64, which one
/// holder has whole; the IPv6 loopback address its own. What a client may
/// hold or try is counted by this (the probe reserve's places here, wrong
/// admin tokens in `admin`).
pub(crate) fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) if !v6.is_loopback() => {
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1)))
        }
        other => other,
    }
}

/// One reserve place held by a client, given back when dropped.
struct ReserveShare {
    shares: Arc<ReserveShares>,
    client: IpAddr,
}

impl ReserveShares {
    /// A place for `peer`'s client, unless it holds [`RESERVE_PER_CLIENT`].
    fn take(self: &Arc<Self>, peer: IpAddr) -> Option<ReserveShare> {
        let client = client_of(peer);
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = held.entry(client).or_default();
        if *count >= RESERVE_PER_CLIENT {
            return None;
        }
        *count += 1;
        Some(ReserveShare {
            shares: Arc::clone(self),
            client,
        })
    }
}

impl Drop for ReserveShare {
    fn drop(&mut self) {
        let mut held = self.shares.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = held.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.client);
            }
        }
    }
}

/// The wait before accepting again after an accept error that is not the
/// peer's (out of file descriptors or memory).
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accept errors are logged at most once per this time (the rest at debug).
const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The header timeout of a connection served beyond the cap (probes only).
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// The routes still served beyond the connection cap.
const PROBE_PATHS: [&str; 3] = ["/livez", "/readyz", "/v1/health"];

/// What the accept loop needs to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Time to send a request's complete headers.
    pub(crate) header_read_timeout: Duration,
    /// Time an idle keep-alive connection stays open, and a write may
    /// take no byte; the grace of a slow reader.
    pub(crate) idle_timeout: Duration,
    /// Bytes a second a client must average reading a response the socket
    /// could not take at once, after that grace (0: no minimum).
    pub(crate) answer_min_rate: u64,
    /// Connections served at once (the probe reserve aside).
    pub(crate) max_connections: usize,
}

/// The connection cap actually applied: `configured`, but never more than
/// half the soft file-descriptor limit `nofile` (the other half is for
/// plugin runners' pipes, plugin files and the probe reserve), and at
/// least 1.
pub(crate) fn effective_max_connections(configured: usize, nofile: Option<u64>) -> usize {
    let half = nofile
        .map(|n| usize::try_from(n / 2).unwrap_or(usize::MAX))
        .unwrap_or(usize::MAX);
    configured.min(half).max(1)
}

/// The process's soft file-descriptor limit (`None`: unlimited).
pub(crate) fn nofile_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Work refused at the connection cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A request on a connection of the probes' reserve that is no probe:
    /// answered 503 `Too many connections`.
    Answered,
    /// A connection beyond the reserve too: closed unanswered.
    Closed,
}

impl Refusal {
    /// Every kind, for metrics made at zero.
    pub(crate) const ALL: [Refusal; 2] = [Refusal::Answered, Refusal::Closed];

    /// Its metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::Answered => "answered_503",
            Refusal::Closed => "closed",
        }
    }
}

/// How often, at most, the log says the connection cap refuses work, in
/// seconds.
const REFUSALS_LOG_EVERY_S: u64 = 10;

/// Tells of work refused at the connection cap: `record` (the metrics) of
/// each, and a warning in the log at most every [`REFUSALS_LOG_EVERY_S`]
/// seconds (a [`crate::throttle::Throttle`]) with the count since the last
/// (they went to the debug log only, and an operator saw nothing of a
/// server refusing work).
#[derive(Clone)]
pub(crate) struct Refusals {
    record: Arc<dyn Fn(Refusal) + Send + Sync>,
    cap: usize,
    /// The refusals the log has not said yet.
    unsaid: Arc<AtomicU64>,
    throttle: Arc<crate::throttle::Throttle>,
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals")
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl Refusals {
    pub(crate) fn new(cap: usize, record: impl Fn(Refusal) + Send + Sync + 'static) -> Refusals {
        Refusals {
            record: Arc::new(record),
            cap,
            unsaid: Arc::default(),
            throttle: Arc::new(crate::throttle::Throttle::new(REFUSALS_LOG_EVERY_S)),
        }
    }

    fn refused(&self, how: Refusal) {
        (self.record)(how);
        self.unsaid.fetch_add(1, Ordering::Relaxed);
        if self.throttle.warn_now() {
            let count = self.unsaid.swap(0, Ordering::Relaxed);
            tracing::warn!(
                cap = self.cap,
                refused = count,
                "At the connection cap ({}): {count} request(s) or connection(s) refused since the last such line (503 \"Too many connections\", or closed; probes still answered); raise --max-connections or add servers",
                self.cap
            );
        } else {
            tracing::debug!(how = how.label(), "Connection cap reached: refused");
        }
    }

    /// Says the refusals not said yet (at the stop: a burst's tail that
    /// came within [`REFUSALS_LOG_EVERY_S`] of its first line waited for
    /// the next burst).
    fn flush(&self) {
        let count = self.unsaid.swap(0, Ordering::Relaxed);
        if count > 0 {
            tracing::warn!(
                cap = self.cap,
                refused = count,
                "At the connection cap ({}): {count} more request(s) or connection(s) refused since the last such line",
                self.cap
            );
        }
    }
}

/// Accepts and serves connections until `stop` completes, then stops
/// accepting and waits for the connections to finish their requests (idle
/// ones close at once). Work refused at the cap is told to `refusals`.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    public_hosts: Vec<String>,
    refusals: Refusals,
    stop: impl Future<Output = ()>,
) {
    // `true` from the stop on: the connections within the cap drain.
    let (stopping, stop_seen) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let reserve = Arc::new(Semaphore::new(PROBE_RESERVE));
    let shares = Arc::new(ReserveShares::default());
    let service = TowerToHyperService::new(router);
    let public_hosts: Arc<[String]> = public_hosts.into();
    let mut last_warned: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_peer_error(&e) => continue,
                Err(e) => {
                    if last_warned.is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_LOG_EVERY) {
                        last_warned = Some(Instant::now());
                        tracing::warn!(error = %e, "Cannot accept a connection; retrying every {} ms", ACCEPT_BACKOFF.as_millis());
                    } else {
                        tracing::debug!(error = %e, "Cannot accept a connection");
                    }
                    tokio::select! {
                        () = &mut stop => break,
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        // Nagle only delays small responses; failing to turn it off is harmless.
        let _ = stream.set_nodelay(true);
        // Every request knows its client's address (axum's `ConnectInfo`):
        // the admin routes log it and count wrong tokens by it.
        // The loopback rule is the connection's: a server bound to
        // `0.0.0.0` that a rebound page reaches on 127.0.0.1 is a loopback
        // server for it.
        let guard = crate::origin::Guard {
            loopback: stream
                .local_addr()
                .is_ok_and(|addr| addr.ip().to_canonical().is_loopback()),
            public_hosts: Arc::clone(&public_hosts),
            linger: crate::unread::Linger::default(),
        };
        let linger = guard.linger.clone();
        let service = with_peer(service.clone(), peer, guard);
        let clock = ReadClock::new();
        if let Ok(permit) = Arc::clone(&permits).try_acquire_owned() {
            let connection =
                connection(stream, service, limits, true, linger, clock.clone()).with_upgrades();
            let stop_seen = stop_seen.clone();
            tokio::spawn(async move {
                drain_on_stop(connection, &clock, stop_seen).await;
                drop(permit);
            });
        } else if let Some(share) = shares.take(peer.ip())
            && let Ok(permit) = Arc::clone(&reserve).try_acquire_owned()
        {
            let main = service;
            let refused = linger.clone();
            let refusals = refusals.clone();
            let probes_only = service_fn(move |request: Request<Incoming>| {
                let main = main.clone();
                let probe = PROBE_PATHS.contains(&request.uri().path());
                let id = (!probe)
                    .then(|| crate::router::request_id_of(&request))
                    .flatten();
                // The 503 leaves a body unread: the socket lingers, or the
                // client that sends before it reads never sees the 503.
                if !probe && crate::body::announces_a_body(request.headers()) {
                    refused.set();
                }
                if !probe {
                    refusals.refused(Refusal::Answered);
                }
                async move {
                    if probe {
                        hyper::service::Service::call(&main, request).await
                    } else {
                        Ok::<_, Infallible>(busy(id))
                    }
                }
            });
            let limits = Limits {
                header_read_timeout: limits.header_read_timeout.min(RESERVE_HEADER_TIMEOUT),
                ..limits
            };
            let connection = connection(stream, probes_only, limits, false, linger, clock.clone());
            let stop_seen = stop_seen.clone();
            tokio::spawn(async move {
                drain_on_stop(connection, &clock, stop_seen).await;
                drop((permit, share));
            });
        } else {
            refusals.refused(Refusal::Closed);
            drop(stream);
        }
    }
    drop(listener);
    refusals.flush();
    stopping.send_replace(true);
    // Each connection holds a permit, of the cap or of the reserve, until
    // it ends.
    let cap = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _all = permits.acquire_many(cap).await;
    let _reserve = reserve.acquire_many(PROBE_RESERVE as u32).await;
}

/// A connection within the cap: hyper's HTTP/1 with upgrades.
type MainConnection =
    http1::UpgradeableConnection<TokioIo<TimedStream>, WithPeer<TowerToHyperService<Router>>>;

/// A hyper connection that can be asked to finish its request in flight
/// and close (hyper-util's `GracefulConnection` leaves out the connection
/// with upgrades).
trait Drain: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl Drain for MainConnection {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<S> Drain for http1::Connection<TokioIo<TimedStream>, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = Body>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::Connection::graceful_shutdown(self);
    }
}

/// Serves `connection` until it ends (a WebSocket's at its upgrade); once
/// `stop` is `true`, lets its request in flight finish and closes it. One
/// waiting for a request head (`clock`), idle or with part of a head
/// received, closes at once: no request of it started.
async fn drain_on_stop(connection: impl Drain, clock: &ReadClock, mut stop: watch::Receiver<bool>) {
    tokio::pin!(connection);
    tokio::select! {
        // The connection first: a request head that came with the stop is
        // read (and its request served) before the stop is looked at.
        biased;
        _ = connection.as_mut() => return,
        _ = stop.wait_for(|stopping| *stopping) => {}
    }
    if clock.reading_head() {
        return;
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// One connection served by hyper with its own request timer.
fn connection<S>(
    stream: TcpStream,
    service: S,
    limits: Limits,
    keep_alive: bool,
    linger: crate::unread::Linger,
    clock: ReadClock,
) -> http1::Connection<TokioIo<TimedStream>, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = Body>,
{
    let timer = RequestTimer {
        clock: clock.clone(),
        header: limits.header_read_timeout,
        idle: limits.idle_timeout,
    };
    http1::Builder::new()
        .timer(timer)
        // Any value: the timer decides the deadline. hyper adds it to the
        // present moment, so not the configured one (an embedder's
        // `Duration::MAX` would overflow there).
        .header_read_timeout(Duration::from_secs(1))
        .keep_alive(keep_alive)
        .serve_connection(
            TokioIo::new(TimedStream {
                stream,
                clock,
                write_stall: limits.idle_timeout,
                stalled: None,
                min_rate: limits.answer_min_rate,
                slow: None,
                linger,
            }),
            service,
        )
}

/// `service` with the client's address and the connection's
/// [`crate::origin::Guard`] in every request's extensions (the router's
/// [`crate::origin::GuardLayer`] checks the request against it), and
/// without a `Content-Length` on a 204 answer ([`without_length_if_empty`]).
fn with_peer<S>(inner: S, peer: SocketAddr, guard: crate::origin::Guard) -> WithPeer<S> {
    WithPeer { inner, peer, guard }
}

/// See [`with_peer`].
#[derive(Debug, Clone)]
struct WithPeer<S> {
    inner: S,
    peer: SocketAddr,
    guard: crate::origin::Guard,
}

impl<S> hyper::service::Service<Request<Incoming>> for WithPeer<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = futures_util::future::MapOk<S::Future, fn(Response<Body>) -> Response<Body>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        use futures_util::TryFutureExt as _;
        let extensions = request.extensions_mut();
        extensions.insert(ConnectInfo(self.peer));
        extensions.insert(self.guard.clone());
        self.inner.call(request).map_ok(without_length_if_empty)
    }
}

/// A 204 answer without `Content-Length` (RFC 9110 §8.6: a server must
/// not send one). axum sets `Content-Length: 0` on every answer of an
/// empty body, and hyper leaves it out of a 204 except in answer to
/// `HEAD`, where it keeps what it is given (`HEAD /favicon.ico` said
/// `content-length: 0`).
fn without_length_if_empty(mut response: Response<Body>) -> Response<Body> {
    if response.status() == StatusCode::NO_CONTENT {
        response.headers_mut().remove(header::CONTENT_LENGTH);
    }
    response
}

/// 503 with `Retry-After`, closing the connection: the answer beyond the
/// cap, with the request's id (`id`: the client's, or one made) as every
/// answer has.
fn busy(id: Option<(header::HeaderName, header::HeaderValue)>) -> Response<Body> {
    let mut response = crate::respond::closing(
        StatusCode::SERVICE_UNAVAILABLE,
        "Too many connections; retry later",
    );
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    if let Some((name, value)) = id {
        headers.insert(name, value);
    }
    response
}

/// Accept errors that concern one connection only (retry at once).
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// When hyper started waiting for a request head, and when its first byte came.
#[derive(Debug, Clone)]
struct ReadClock(Arc<Mutex<ClockState>>);

#[derive(Debug)]
struct ClockState {
    /// When the current wait for a request head began.
    waiting_since: Instant,
    /// Whether a response was sent before this wait (keep-alive).
    after_response: bool,
    /// The first byte read since `waiting_since`.
    first_byte: Option<Instant>,
    /// Times hyper armed its header timer.
    armed: u64,
    /// The header timers that exist ([`RequestSleep`]s not dropped): hyper
    /// holds one from the start of a wait for a request head until the
    /// head is read (a reset makes the next before dropping the last).
    heads: u32,
}

impl ReadClock {
    fn new() -> ReadClock {
        ReadClock(Arc::new(Mutex::new(ClockState {
            waiting_since: Instant::now(),
            after_response: false,
            first_byte: None,
            armed: 0,
            heads: 0,
        })))
    }

    /// Whether hyper is waiting for a request head (idle, or part of a
    /// head received): nothing of this connection is being served. hyper
    /// waits for a head once an answer is written out and flushed
    /// (`Conn::poll_flush`); the one other way there, a request body that
    /// ends after its answer, does not arise here: such an answer closes
    /// its connection (`crate::unread`).
    fn reading_head(&self) -> bool {
        self.lock().heads > 0
    }

    fn lock(&self) -> MutexGuard<'_, ClockState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// hyper starts waiting for a request head (a [`RequestSleep`] is
    /// made).
    fn arm(&self) {
        let mut state = self.lock();
        state.heads += 1;
        state.armed += 1;
        if state.armed > 1 {
            state.waiting_since = Instant::now();
            state.after_response = true;
            state.first_byte = None;
        }
    }

    fn read_some(&self) {
        let mut state = self.lock();
        if state.first_byte.is_none() {
            state.first_byte = Some(Instant::now());
        }
    }

    /// When the current wait ends: `header` after the connection opened or
    /// the first byte of a later request, `idle` after a response while no
    /// byte came.
    fn deadline(&self, header: Duration, idle: Duration) -> Instant {
        let state = self.lock();
        match (state.after_response, state.first_byte) {
            (false, _) => later(state.waiting_since, header),
            (true, Some(first)) => later(first, header),
            (true, None) => later(state.waiting_since, idle),
        }
    }
}

/// `at + wait`, or a century after `at` where that is past what an
/// `Instant` holds (an embedder's `Duration::MAX`: the CLI takes at most
/// 1e9 s).
fn later(at: Instant, wait: Duration) -> Instant {
    at.checked_add(wait)
        .or_else(|| at.checked_add(FAR_FUTURE))
        .unwrap_or(at)
}

/// A century: where a wait past what an `Instant` holds ends.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A TCP stream that tells its [`ReadClock`] when bytes arrive, and fails
/// a write during which the client's side has taken no byte for
/// `write_stall` (a client that stopped reading), or whose client reads what the socket could not take at once
/// slower than `min_rate` on average after that grace (a client that
/// trickles), so hyper closes its connection and the answer it held (and
/// its room in `--answer-memory`) is let go.
#[derive(Debug)]
pub(crate) struct TimedStream {
    stream: TcpStream,
    clock: ReadClock,
    write_stall: Duration,
    /// Since the first write that found the socket full, until one takes
    /// bytes again.
    stalled: Option<Stall>,
    /// Bytes a second a slow reader must average (0: no minimum).
    min_rate: u64,
    /// The current response's account of writes that found the socket
    /// full, if one did.
    slow: Option<SlowRead>,
    /// Set when an answer left its request's body unread: the socket
    /// lingers when this ends ([`crate::unread::linger`]).
    linger: crate::unread::Linger,
}

impl Drop for TimedStream {
    fn drop(&mut self) {
        if self.linger.is_set() {
            crate::unread::linger(&self.stream);
        }
    }
}

/// A write waiting for room: the end of its current period of
/// `write_stall`, and the socket's send queue when that period began. A
/// period in which the client's side took bytes (the queue shrank) is
/// followed by another: the socket frees room for a write only once about
/// half its queue is taken, which a client that reads steadily but slowly
/// may take longer than `write_stall` to do.
#[derive(Debug)]
struct Stall {
    ends: Pin<Box<tokio::time::Sleep>>,
    queued: u64,
}

/// How a response's client has kept up since a write first found the
/// socket full: the time writes waited (paused while hyper had nothing to
/// write: between a stream's messages, a multipart answer's batches, an
/// event stream's events) against the bytes its side took meanwhile. One
/// account per response (per request head hyper waited for), and one for
/// a whole upgraded connection.
#[derive(Debug)]
struct SlowRead {
    /// The response it counts: the clock's arming when it began.
    response: u64,
    /// Time writes waited, over the finished stretches.
    waited: Duration,
    /// When the current stretch began; `None` while paused.
    since: Option<Instant>,
    /// Bytes written since it began.
    written: u64,
    /// The socket's send queue (written, not yet taken by the client's
    /// side) when it began.
    queued: u64,
}

/// Bytes written to `stream` that its peer's side has not taken yet (sent
/// and unacknowledged, or not sent): `SIOCOUTQ`; 0 when it cannot be read.
#[allow(unsafe_code)]
fn send_queue(stream: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: `TIOCOUTQ` (`SIOCOUTQ` for a socket) writes one `c_int` to
    // the pointer given, which points to a live local; the descriptor is
    // the stream's own, open while it is borrowed.
    let done = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if done == 0 {
        u64::try_from(queued).unwrap_or(0)
    } else {
        0
    }
}

impl TimedStream {
    /// A write's outcome, with the stall and the slow reader accounted.
    fn watch_write(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match &polled {
            Poll::Ready(Ok(n)) => {
                if let Some(slow) = &mut self.slow {
                    slow.written = slow
                        .written
                        .saturating_add(u64::try_from(*n).unwrap_or(u64::MAX));
                }
                self.watch_stall(cx, polled)
            }
            Poll::Ready(Err(_)) => polled,
            Poll::Pending if self.min_rate == 0 => self.watch_stall(cx, polled),
            Poll::Pending => {
                if self.too_slow() {
                    self.slow = None;
                    tracing::info!(
                        min_rate = self.min_rate,
                        "closing a connection whose client reads its response slower than \
                         --answer-min-rate"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "the client read the response slower than {} bytes a second",
                            self.min_rate
                        ),
                    )));
                }
                self.watch_stall(cx, polled)
            }
        }
    }

    /// A write found the socket full: whether its client has taken the
    /// response slower than `min_rate` since the account began, after the
    /// grace of `write_stall` plus a second per `min_rate` bytes it took.
    /// Judged on the bytes the client's side really took (what was written
    /// less what the send queue grew by), not on the writes alone, which
    /// lag behind when a write is polled before the socket said it had
    /// room.
    fn too_slow(&mut self) -> bool {
        let now = Instant::now();
        let response = self.clock.lock().armed;
        let slow = match &mut self.slow {
            Some(slow) if slow.response == response => slow,
            other => other.insert(SlowRead {
                response,
                waited: Duration::ZERO,
                since: None,
                written: 0,
                queued: send_queue(&self.stream),
            }),
        };
        let since = *slow.since.get_or_insert(now);
        let waited = slow.waited.saturating_add(now.duration_since(since));
        if waited <= self.write_stall {
            return false;
        }
        let taken = slow
            .written
            .saturating_add(slow.queued)
            .saturating_sub(send_queue(&self.stream));
        let earned = Duration::try_from_secs_f64(taken as f64 / self.min_rate as f64)
            .unwrap_or(Duration::MAX);
        waited > self.write_stall.saturating_add(earned)
    }

    /// A write's (or flush's) outcome, with the stall accounted: a pending
    /// write past `write_stall` since the socket filled is `TimedOut`.
    fn watch_stall<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.write_stall;
        let stream = &self.stream;
        let stall = self.stalled.get_or_insert_with(|| Stall {
            ends: Box::pin(tokio::time::sleep(limit)),
            queued: send_queue(stream),
        });
        loop {
            if stall.ends.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let queued = send_queue(stream);
            if queued >= stall.queued {
                break;
            }
            // The client took bytes in this period: another one.
            stall.queued = queued;
            let now = tokio::time::Instant::now();
            let ends = now.checked_add(limit).unwrap_or(now + FAR_FUTURE);
            stall.ends.as_mut().reset(ends);
        }
        self.stalled = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client read nothing of the response for {} s",
                limit.as_secs_f64()
            ),
        )))
    }
}

impl AsyncRead for TimedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read_some();
        }
        polled
    }
}

impl AsyncWrite for TimedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch_write(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        // hyper flushes once it has written all it had: the slow
        // reader's account pauses until a write finds the socket full
        // again (a new response starts a new one).
        if polled.is_ready()
            && let Some(slow) = &mut self.slow
            && let Some(since) = slow.since.take()
        {
            slow.waited = slow.waited.saturating_add(since.elapsed());
        }
        self.watch_stall(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The timer of one connection: hyper uses it only for its header-read
/// timeout, whose deadline this timer decides ([`ReadClock::deadline`]).
#[derive(Debug, Clone)]
struct RequestTimer {
    clock: ReadClock,
    header: Duration,
    idle: Duration,
}

impl RequestTimer {
    fn request_sleep(&self) -> RequestSleep {
        self.clock.arm();
        let deadline = self.clock.deadline(self.header, self.idle);
        RequestSleep {
            timer: self.clone(),
            sleep: Box::pin(tokio::time::sleep_until(deadline.into())),
        }
    }
}

impl hyper::rt::Timer for RequestTimer {
    fn sleep(&self, _duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.request_sleep())
    }

    fn sleep_until(&self, _deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.request_sleep())
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, _new_deadline: Instant) {
        *sleep = Box::pin(self.request_sleep());
    }
}

/// Ends at the current deadline of its connection's wait for a request
/// head, re-read each time hyper polls it (after every read that left the
/// head incomplete).
struct RequestSleep {
    timer: RequestTimer,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Future for RequestSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = tokio::time::Instant::from(
            self.timer
                .clock
                .deadline(self.timer.header, self.timer.idle),
        );
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        self.sleep.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for RequestSleep {}

impl Drop for RequestSleep {
    fn drop(&mut self) {
        let mut state = self.timer.clock.lock();
        state.heads = state.heads.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client holds at most a quarter of the probe reserve; an IPv6
    /// client's /64 is one client, each loopback address its own; a place
    /// given back can be taken again.
    #[test]
    fn a_client_holds_at_most_its_share_of_the_probe_reserve() {
        let shares = Arc::new(ReserveShares::default());
        let one: IpAddr = "192.0.2.7".parse().unwrap();
        let mut held: Vec<ReserveShare> = (0..RESERVE_PER_CLIENT)
            .map(|_| shares.take(one).unwrap())
            .collect();
        assert!(shares.take(one).is_none());
        // The same client over IPv6 (mapped), and another /64 address.
        assert!(shares.take("::ffff:192.0.2.7".parse().unwrap()).is_none());
        let v6a: IpAddr = "2001:db8:0:7::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:0:7:ffff::2".parse().unwrap();
        let _v6: Vec<ReserveShare> = (0..RESERVE_PER_CLIENT)
            .map(|_| shares.take(v6a).unwrap())
            .collect();
        assert!(shares.take(v6b).is_none());
        // Loopback addresses are their own clients.
        assert!(shares.take("127.0.0.2".parse().unwrap()).is_some());
        held.pop();
        assert!(shares.take(one).is_some());
    }
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A client of `addr` with a 4 KiB receive buffer that reads 4 KiB,
    /// then waits `pause`, until the end of the stream, 20 s, or `done`.
    fn slow_reader(
        addr: std::net::SocketAddr,
        pause: Duration,
        done: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            use std::io::Read as _;
            let client = std::net::TcpStream::connect(addr).unwrap();
            rustix::net::sockopt::set_socket_recv_buffer_size(&client, 4096).unwrap();
            let mut client = client;
            let mut buf = [0u8; 4096];
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) && !done.load(Ordering::SeqCst) {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => std::thread::sleep(pause),
                }
            }
        })
    }

    /// A client reading slower than the minimum rate is let go even when
    /// the response comes in many small writes, each flushed (a multipart
    /// answer of many parts, an event stream): the account pauses at a
    /// flush, it does not start again. (It used to start again at every
    /// flush, and such a reader was never judged.)
    #[tokio::test]
    async fn a_slow_reader_of_many_flushed_writes_is_let_go() {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // 4 KiB every 20 ms (200 KiB a second), from a small buffer.
        let reader = slow_reader(addr, Duration::from_millis(20), Arc::default());
        let (stream, _) = listener.accept().await.unwrap();
        rustix::net::sockopt::set_socket_send_buffer_size(&stream, 16384).unwrap();
        let mut timed = TimedStream {
            stream,
            clock: ReadClock::new(),
            // Far longer than the socket's wake-ups take at this rate: the
            // stall timer alone never fires.
            write_stall: Duration::from_secs(3),
            stalled: None,
            min_rate: 1024 * 1024,
            slow: None,
            linger: crate::unread::Linger::default(),
        };
        let started = Instant::now();
        let chunk = [7u8; 2048];
        let ended = loop {
            let wrote = tokio::time::timeout(Duration::from_secs(5), async {
                timed.write_all(&chunk).await?;
                timed.flush().await
            })
            .await;
            match wrote {
                Ok(Ok(())) if started.elapsed() < Duration::from_secs(15) => {}
                other => break other,
            }
        };
        let took = started.elapsed();
        drop(timed);
        reader.join().unwrap();
        match ended {
            Ok(Err(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
                assert!(e.to_string().contains("slower than"), "{e}");
                assert!(took < Duration::from_secs(12), "let go only after {took:?}");
            }
            other => panic!("never let go ({took:?}): {other:?}"),
        }
    }

    /// A client that keeps taking bytes, however slowly, has not stalled:
    /// with no minimum rate, a write that waits longer than the stall
    /// limit for room (the socket frees room only once about half its
    /// queue is taken) goes on while the client's side takes bytes.
    #[tokio::test]
    async fn a_client_that_keeps_reading_slowly_has_not_stalled() {
        use tokio::io::AsyncWriteExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // 4 KiB every 50 ms (80 KiB a second), from a small buffer.
        let done = Arc::new(AtomicBool::new(false));
        let reader = slow_reader(addr, Duration::from_millis(50), Arc::clone(&done));
        let (stream, _) = listener.accept().await.unwrap();
        // A 2 s stall limit: forty of the reader's pauses (at 1 s, a reader
        // thread held off the CPU for a second by a loaded CI machine's
        // other tests failed this once).
        let mut timed = TimedStream {
            stream,
            clock: ReadClock::new(),
            write_stall: Duration::from_secs(2),
            stalled: None,
            min_rate: 0,
            slow: None,
            linger: crate::unread::Linger::default(),
        };
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            loop {
                timed.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            Ok::<(), io::Error>(())
        });
        // The send queue fills in a moment; draining half of it at this
        // rate takes far longer than the 2 s stall limit.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            !writer.is_finished(),
            "the writer ended: {:?}",
            writer.await
        );
        writer.abort();
        let _ = writer.await;
        done.store(true, Ordering::SeqCst);
        reader.join().unwrap();
    }

    #[test]
    fn the_cap_leaves_half_the_descriptors() {
        assert_eq!(effective_max_connections(10_000, Some(20_000)), 10_000);
        assert_eq!(effective_max_connections(10_000, Some(1024)), 512);
        assert_eq!(effective_max_connections(50, Some(1024)), 50);
        assert_eq!(effective_max_connections(10_000, None), 10_000);
        assert_eq!(effective_max_connections(10, Some(1)), 1);
    }

    #[test]
    fn the_deadline_is_header_then_idle_then_header_from_the_first_byte() {
        let header = Duration::from_secs(10);
        let idle = Duration::from_secs(60);
        let clock = ReadClock::new();
        let opened = clock.lock().waiting_since;
        clock.arm();
        assert_eq!(clock.deadline(header, idle), opened + header);
        clock.read_some();
        assert_eq!(clock.deadline(header, idle), opened + header);
        // After a response: idle until a byte comes, then header from it.
        clock.arm();
        let since = clock.lock().waiting_since;
        assert_eq!(clock.deadline(header, idle), since + idle);
        clock.read_some();
        let first = clock.lock().first_byte.unwrap_or(since);
        assert_eq!(clock.deadline(header, idle), first + header);
    }

    #[test]
    fn a_wait_past_what_an_instant_holds_is_a_century() {
        let clock = ReadClock::new();
        let deadline = clock.deadline(Duration::MAX, Duration::MAX);
        assert!(deadline > Instant::now() + Duration::from_secs(99 * 365 * 24 * 3600));
    }
}
