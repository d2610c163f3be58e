//! A WebSocket client of the stream route, `GET
//! /v1/plugins/{name}/tools/{tool}/stream` (PROTOCOL.md, "Live streams"):
//! sends `frames` binary messages as fast as the server takes them (an
//! optional text message with the other arguments first) while reading the
//! answers, and checks their order and drop accounting.
//!
//! It knows the wire protocol of the route only, nothing of the server's
//! internals or of the figures made from its runs.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::body::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, Message};

/// How long a whole stream run may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(120);

/// What one stream run saw.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct StreamRun {
    /// Frames sent.
    pub(crate) sent: usize,
    /// Answers with `seq` received.
    pub(crate) answered: usize,
    /// Of which `"ok": true`.
    pub(crate) ok: usize,
    /// The last answer's `dropped`.
    pub(crate) dropped: u64,
    /// Every answer's `seq` was larger than the one before.
    pub(crate) in_order: bool,
    /// First frame sent to last answer received.
    pub(crate) seconds: f64,
    /// `sent / seconds`.
    pub(crate) frames_per_second: f64,
    /// The answers' `processing_time_ms`.
    pub(crate) processing_ms: Vec<f64>,
    /// The first few error answers, verbatim.
    pub(crate) errors: Vec<String>,
}

/// The route is missing (404 before the upgrade, as on a server without
/// streams) or refuses this tool: why, for the report.
#[derive(Debug, Clone)]
pub(crate) struct NotAvailable(pub(crate) String);

/// Streams `frames` copies of `frame` to `path` (with its query) on `addr`.
///
/// # Errors
///
/// `Ok(Err(NotAvailable))` when the server answers the upgrade with an
/// HTTP error; `Err` when the connection fails or the stream breaks.
pub(crate) async fn run(
    addr: SocketAddr,
    path: &str,
    args: Option<&Value>,
    frame: Bytes,
    frames: usize,
) -> anyhow::Result<Result<StreamRun, NotAvailable>> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let url = format!("ws://{addr}{path}");
    let (socket, _) = match tokio_tungstenite::client_async(url.as_str(), tcp).await {
        Ok(pair) => pair,
        Err(tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect::<String>();
            return Ok(Err(NotAvailable(format!(
                "GET {path} answered {} instead of upgrading: {body}",
                response.status()
            ))));
        }
        Err(e) => return Err(e).context("the WebSocket handshake failed"),
    };
    let (mut sink, mut stream) = socket.split();
    let first = args.map(|a| serde_json::json!({ "args": a }).to_string());
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        if let Some(text) = first {
            sink.send(Message::text(text)).await?;
        }
        for _ in 0..frames {
            sink.feed(Message::Binary(frame.clone())).await?;
        }
        sink.flush().await?;
        anyhow::Ok(sink)
    });
    let mut run = StreamRun {
        sent: frames,
        in_order: true,
        ..StreamRun::default()
    };
    let mut last_seq: Option<u64> = None;
    let reading = async {
        // Done when every frame is answered or counted as dropped.
        while run.answered + usize::try_from(run.dropped).unwrap_or(usize::MAX) < frames {
            let Some(message) = stream.next().await else {
                bail!(
                    "the server closed the stream after {} answers",
                    run.answered
                );
            };
            let text = match message? {
                Message::Text(text) => text,
                Message::Close(frame) => bail!(
                    "the server closed the stream after {} answers: {frame:?}",
                    run.answered
                ),
                _ => continue,
            };
            let answer: Value = serde_json::from_str(&text)
                .with_context(|| format!("an answer that is not JSON: {text}"))?;
            let Some(seq) = answer["seq"].as_u64() else {
                if run.errors.len() < 5 {
                    run.errors.push(text.to_string());
                }
                continue;
            };
            run.in_order &= last_seq.is_none_or(|last| seq > last);
            last_seq = Some(seq);
            run.answered += 1;
            run.dropped = answer["dropped"].as_u64().unwrap_or(run.dropped);
            if let Some(ms) = answer["processing_time_ms"].as_f64() {
                run.processing_ms.push(ms);
            }
            if answer["ok"] == true {
                run.ok += 1;
            } else if run.errors.len() < 5 {
                run.errors.push(text.to_string());
            }
        }
        anyhow::Ok(())
    };
    let outcome = match tokio::time::timeout(STREAM_TIMEOUT, reading).await {
        Ok(read) => read,
        Err(_) => Err(anyhow::anyhow!(
            "the stream took longer than {STREAM_TIMEOUT:?}"
        )),
    };
    if let Err(e) = outcome {
        // A writer blocked by backpressure would wait forever.
        writer.abort();
        return Err(e);
    }
    run.seconds = started.elapsed().as_secs_f64();
    run.frames_per_second = frames as f64 / run.seconds.max(1e-9);
    let mut sink = writer.await.context("the stream's writer task")??;
    let _ = sink.close().await;
    Ok(Ok(run))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream server of the protocol's shape: answers every binary frame
    /// in order, `dropped` 0, and drops every `skip`-th frame instead
    /// (counting it) when `skip` is not 0.
    async fn server(skip: u64) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let (mut seq, mut dropped) = (0u64, 0u64);
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Binary(frame) = message {
                    if skip != 0 && seq % skip == skip - 1 {
                        dropped += 1;
                    } else {
                        let answer = serde_json::json!({
                            "seq": seq, "ok": true, "result": {"bytes": frame.len()},
                            "processing_time_ms": 0.5, "dropped": dropped,
                        });
                        ws.send(Message::text(answer.to_string())).await.unwrap();
                    }
                    seq += 1;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_stream_is_answered_in_order_and_counted() {
        let addr = server(0).await;
        let run = run(addr, "/s", None, Bytes::from_static(b"frame"), 50)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (run.sent, run.answered, run.ok, run.dropped),
            (50, 50, 50, 0)
        );
        assert!(run.in_order && run.frames_per_second > 0.0);
        assert_eq!(run.processing_ms.len(), 50);
    }

    #[tokio::test]
    async fn dropped_frames_end_the_run_too() {
        let addr = server(5).await;
        // Frames 4, 9, ..., 44 are dropped; the last one (seq 48) is
        // answered and says 9.
        let run = run(addr, "/s", None, Bytes::from_static(b"x"), 49)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(run.answered, 40);
        assert_eq!(run.dropped, 9);
        assert!(run.in_order);
    }

    #[tokio::test]
    async fn a_404_before_the_upgrade_is_not_available() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            let body = r#"{"detail":"Not Found"}"#;
            let answer = format!(
                "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(answer.as_bytes()).await.unwrap();
        });
        let outcome = run(addr, "/v1/x/stream", None, Bytes::new(), 1)
            .await
            .unwrap();
        let Err(NotAvailable(why)) = outcome else {
            panic!("expected not available: {outcome:?}");
        };
        assert!(why.contains("404") && why.contains("Not Found"), "{why}");
    }
}
