//! The load generator and a small client, on tokio and hyper 1.
//!
//! Each connection is one task that owns its HTTP/1.1 keep-alive connection
//! and drives it in the same task (no hand-off to a separate connection
//! task), so the client spends as little CPU per request as it can: on a
//! small machine the client and the server share the cores, and a heavy
//! client would flatten every ratio towards 1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

/// A request that takes longer than this counts as unanswered (a deadlock
/// shows up as timeouts, and the run still ends).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One request of a workload.
#[derive(Debug, Clone)]
pub(crate) struct Req {
    /// What the request counts as (results are kept per label).
    pub(crate) label: &'static str,
    method: Method,
    uri: Uri,
    body: Bytes,
    /// The body's `Content-Type` (sent when the body is not empty).
    content_type: HeaderValue,
    /// Wait this long before sending it.
    pause: Duration,
}

impl Req {
    /// `GET path`.
    pub(crate) fn get(label: &'static str, path: &str) -> anyhow::Result<Req> {
        Ok(Req {
            label,
            method: Method::GET,
            uri: path.parse().with_context(|| format!("bad path {path}"))?,
            body: Bytes::new(),
            content_type: HeaderValue::from_static("application/json"),
            pause: Duration::ZERO,
        })
    }

    /// `POST path` with a JSON body.
    pub(crate) fn post_json(label: &'static str, path: &str, body: &str) -> anyhow::Result<Req> {
        Ok(Req {
            method: Method::POST,
            body: Bytes::from(body.to_owned()),
            ..Req::get(label, path)?
        })
    }

    /// `POST path` with any body and its content type.
    pub(crate) fn post(
        label: &'static str,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> anyhow::Result<Req> {
        Ok(Req {
            method: Method::POST,
            body,
            content_type: HeaderValue::from_str(content_type)
                .with_context(|| format!("bad content type {content_type}"))?,
            ..Req::get(label, path)?
        })
    }

    /// The request's path.
    pub(crate) fn path(&self) -> &str {
        self.uri.path()
    }

    /// The same request, sent after a pause.
    pub(crate) fn after(mut self, pause: Duration) -> Req {
        self.pause = pause;
        self
    }

    fn to_request(&self, host: &HeaderValue) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut builder = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone())
            .header(HOST, host.clone());
        if !self.body.is_empty() {
            builder = builder.header(CONTENT_TYPE, self.content_type.clone());
        }
        Ok(builder.body(Full::new(self.body.clone()))?)
    }
}

/// What each connection sends: request `seq` of connection `conn`, or
/// `None` when that connection is done.
pub(crate) trait Workload: Send + Sync {
    /// The next request of connection `conn`.
    fn next(&self, conn: usize, seq: u64) -> Option<Req>;
}

impl<F> Workload for F
where
    F: Fn(usize, u64) -> Option<Req> + Send + Sync,
{
    fn next(&self, conn: usize, seq: u64) -> Option<Req> {
        self(conn, seq)
    }
}

/// A workload that sends `req` again and again on every connection.
pub(crate) fn repeat(req: Req) -> Arc<dyn Workload> {
    Arc::new(move |_: usize, _: u64| Some(req.clone()))
}

/// Shape of a load run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Spec {
    /// Concurrent keep-alive connections.
    pub(crate) connections: usize,
    /// Unmeasured start.
    #[serde(skip)]
    pub(crate) warmup: Duration,
    /// Measured part.
    #[serde(skip)]
    pub(crate) duration: Duration,
}

/// Results of one label of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct LabelResult {
    /// Requests sent (warm-up included).
    pub(crate) sent: u64,
    /// Requests that got a response (warm-up included).
    pub(crate) answered: u64,
    /// Responses by status code (warm-up included).
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// Requests lost to a transport error.
    pub(crate) errors: u64,
    /// Requests not answered within [`REQUEST_TIMEOUT`].
    pub(crate) timeouts: u64,
    /// Answered requests started in the measured window.
    pub(crate) measured: u64,
    /// `measured` per second of the measured window.
    pub(crate) rps: f64,
    /// Latency percentiles of the measured requests, in microseconds.
    pub(crate) p50_us: f64,
    /// 90th percentile.
    pub(crate) p90_us: f64,
    /// 99th percentile.
    pub(crate) p99_us: f64,
    /// Slowest.
    pub(crate) max_us: f64,
}

impl LabelResult {
    /// Answered requests whose status is not `expected`.
    pub(crate) fn unexpected(&self, expected: u16) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| **status != expected)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Results of one load run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LoadResult {
    /// Connections used.
    pub(crate) connections: usize,
    /// Connections that could not be opened (each retried).
    pub(crate) connect_errors: u64,
    /// Length of the measured window, in seconds.
    pub(crate) seconds: f64,
    /// Per label.
    pub(crate) labels: BTreeMap<String, LabelResult>,
}

impl LoadResult {
    /// The results of `label` (empty if it sent nothing).
    pub(crate) fn label(&self, label: &str) -> LabelResult {
        self.labels.get(label).cloned().unwrap_or_default()
    }

    /// Requests lost to errors or timeouts, all labels, and connections
    /// that could not be opened (fewer connections would make a figure
    /// look better or worse, never pass it silently).
    pub(crate) fn unanswered(&self) -> u64 {
        self.connect_errors
            + self
                .labels
                .values()
                .map(|l| l.errors + l.timeouts)
                .sum::<u64>()
    }
}

#[derive(Debug)]
struct ConnLabel {
    counts: LabelResult,
    histogram: Histogram<u64>,
}

/// An empty latency histogram: nanoseconds, 1 ns to 100 s, 3 significant figures.
fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 100_000_000_000, 3)?)
}

#[derive(Debug)]
struct ConnStats {
    labels: BTreeMap<&'static str, ConnLabel>,
    connect_errors: u64,
    empty: Histogram<u64>,
}

impl ConnStats {
    fn new(empty: Histogram<u64>) -> Self {
        ConnStats {
            labels: BTreeMap::new(),
            connect_errors: 0,
            empty,
        }
    }

    fn label(&mut self, label: &'static str) -> &mut ConnLabel {
        let empty = &self.empty;
        self.labels.entry(label).or_insert_with(|| ConnLabel {
            counts: LabelResult::default(),
            histogram: empty.clone(),
        })
    }
}

enum Outcome {
    Status(u16),
    Error,
    Timeout,
}

/// Runs `workload` against `addr` and collects the results.
pub(crate) async fn run(
    addr: SocketAddr,
    spec: Spec,
    workload: Arc<dyn Workload>,
) -> anyhow::Result<LoadResult> {
    let empty = histogram()?;
    let host = host_header(addr);
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let tasks: Vec<_> = (0..spec.connections)
        .map(|conn| {
            let workload = Arc::clone(&workload);
            let host = host.clone();
            let stats = ConnStats::new(empty.clone());
            tokio::spawn(drive(addr, host, conn, workload, stats, measure_from, end))
        })
        .collect();
    let mut merged: BTreeMap<&'static str, ConnLabel> = BTreeMap::new();
    let mut connect_errors = 0;
    for task in tasks {
        let Ok(stats) = task.await else {
            connect_errors += 1;
            continue;
        };
        connect_errors += stats.connect_errors;
        for (label, part) in stats.labels {
            let into = merged.entry(label).or_insert_with(|| ConnLabel {
                counts: LabelResult::default(),
                histogram: empty.clone(),
            });
            let (a, b) = (&mut into.counts, &part.counts);
            a.sent += b.sent;
            a.answered += b.answered;
            a.errors += b.errors;
            a.timeouts += b.timeouts;
            a.measured += b.measured;
            for (status, n) in &b.statuses {
                *a.statuses.entry(*status).or_default() += n;
            }
            let _ = into.histogram.add(&part.histogram);
        }
    }
    // The requests counted are those started in the measured window, so
    // the window is the divisor: not the time to the last answer, which
    // adds one latency and flattered the slower side of a comparison.
    let seconds = spec.duration.as_secs_f64().max(1e-9);
    let us = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let labels = merged
        .into_iter()
        .map(
            |(
                label,
                ConnLabel {
                    mut counts,
                    histogram,
                },
            )| {
                counts.rps = counts.measured as f64 / seconds;
                counts.p50_us = us(&histogram, 0.50);
                counts.p90_us = us(&histogram, 0.90);
                counts.p99_us = us(&histogram, 0.99);
                counts.max_us = histogram.max() as f64 / 1000.0;
                (label.to_owned(), counts)
            },
        )
        .collect();
    Ok(LoadResult {
        connections: spec.connections,
        connect_errors,
        seconds,
        labels,
    })
}

fn host_header(addr: SocketAddr) -> HeaderValue {
    HeaderValue::from_str(&addr.to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("localhost"))
}

/// One connection: sends the workload's requests one after another on a
/// keep-alive connection (reconnecting after an error) until `end`.
async fn drive(
    addr: SocketAddr,
    host: HeaderValue,
    conn_index: usize,
    workload: Arc<dyn Workload>,
    mut stats: ConnStats,
    measure_from: Instant,
    end: Instant,
) -> ConnStats {
    let mut seq = 0u64;
    'connect: while Instant::now() < end {
        let Ok(stream) = TcpStream::connect(addr).await else {
            stats.connect_errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) = http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await
        else {
            stats.connect_errors += 1;
            continue;
        };
        let mut conn = pin!(conn);
        loop {
            let Some(req) = workload.next(conn_index, seq) else {
                break 'connect;
            };
            seq += 1;
            if !req.pause.is_zero() {
                let left = end.saturating_duration_since(Instant::now());
                tokio::time::sleep(req.pause.min(left)).await;
            }
            let started = Instant::now();
            if started >= end {
                break 'connect;
            }
            let label = stats.label(req.label);
            label.counts.sent += 1;
            let Ok(request) = req.to_request(&host) else {
                label.counts.errors += 1;
                continue;
            };
            let exchange = async {
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let status = response.status().as_u16();
                response.into_body().collect().await?;
                Ok::<u16, hyper::Error>(status)
            };
            // The connection is driven here too: no separate task.
            let outcome = tokio::select! {
                biased;
                answered = tokio::time::timeout(REQUEST_TIMEOUT, exchange) => match answered {
                    Ok(Ok(status)) => Outcome::Status(status),
                    Ok(Err(_)) => Outcome::Error,
                    Err(_) => Outcome::Timeout,
                },
                _ = &mut conn => Outcome::Error,
            };
            let elapsed = started.elapsed();
            match outcome {
                Outcome::Status(status) => {
                    label.counts.answered += 1;
                    *label.counts.statuses.entry(status).or_default() += 1;
                    if started >= measure_from {
                        label.counts.measured += 1;
                        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
                        label.histogram.saturating_record(ns.max(1));
                    }
                }
                Outcome::Error => {
                    label.counts.errors += 1;
                    continue 'connect;
                }
                Outcome::Timeout => {
                    label.counts.timeouts += 1;
                    continue 'connect;
                }
            }
        }
    }
    stats
}

/// A one-request-at-a-time client on one keep-alive connection.
#[derive(Debug)]
pub(crate) struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
    host: HeaderValue,
    connection: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects to `addr`.
    pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client {
            sender,
            host: host_header(addr),
            connection,
        })
    }

    /// Sends `req` and returns the status and the body.
    pub(crate) async fn send(&mut self, req: &Req) -> anyhow::Result<(u16, Bytes)> {
        let request = req.to_request(&self.host)?;
        let exchange = async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(answer) => Ok(answer?),
            Err(_) => bail!(
                "no answer to {} {} within {REQUEST_TIMEOUT:?}",
                req.method,
                req.uri
            ),
        }
    }

    /// `GET path`; the body must be JSON.
    pub(crate) async fn get_json(
        &mut self,
        path: &str,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let (status, body) = self.send(&Req::get("get", path)?).await?;
        let value = serde_json::from_slice(&body).with_context(|| {
            format!("GET {path} answered {status} with a body that is not JSON")
        })?;
        Ok((status, value))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.connection.abort();
    }
}
