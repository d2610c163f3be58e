//! One open stream: reads the client's messages, feeds frames to the plugin
//! through the stream's [`FrameQueue`], and writes the answers in order.
//!
//! Three parts run together on the connection's task: the reader (client
//! messages into the queue, never waiting on the plugin under `latest`), the
//! worker ([`work`]: one frame at a time through `tools::run`, the run
//! route's own call, so limits, registry records and metrics are the same), and the
//! writer (the only owner of the socket's sending half). Between worker and
//! writer a channel of [`ANSWERS_IN_FLIGHT`] answers: a client that does not
//! read its answers stops the worker, never grows a buffer. What a stream
//! holds is bounded: the queue's frames, one frame in the plugin, a few
//! answers and the socket's buffers.
//!
//! It knows the WebSocket messages of the stream protocol (README "Live
//! streams"), not how the route was checked or admitted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use forgesyte_loader::CallContext;

use super::metered::{FrameRoom, Ledger, Metered};
use super::queue::{FrameQueue, Policy};
use crate::body::parse_json_body;
use crate::budget::CallRoom;
use crate::error::RunError;
use crate::state::AppState;

mod work;

use work::work;

/// Answers made but not yet written, at most.
const ANSWERS_IN_FLIGHT: usize = 2;

/// How long the side of a stream that did not end first (the worker after
/// the reader, the conversation after the writer) may still take.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// How long the writer may still take to deliver the last answers and the
/// close when the stream has no idle timeout.
const WRITER_FLUSH: Duration = Duration::from_secs(60);

/// How long a closed stream's connection may still be read (and what it
/// brings dropped) for the client's close reply: see [`linger`].
const LINGER: Duration = Duration::from_secs(5);
/// How long a stream closed for want of room, or by the server's stop,
/// lingers (see [`linger`]).
const REFUSED_LINGER: Duration = Duration::from_secs(1);
/// How long a lingering connection whose WebSocket layer gave up may stay
/// silent before it is dropped (see [`linger`]).
const LINGER_QUIET: Duration = Duration::from_millis(250);

/// The longest close reason a WebSocket close frame carries, in bytes.
const MAX_CLOSE_REASON: usize = 123;

/// Pings a client may send in one second; one more closes its stream
/// (1008). Each ping's pong waits in the connection's write buffer until
/// the client reads it: a client that pings fast and reads nothing made
/// that buffer grow by every ping (a keep-alive pings once in seconds).
const MAX_PINGS_PER_SECOND: u32 = 32;

/// Close codes of RFC 6455 the stream uses.
pub(crate) mod close {
    /// The stream was idle past `--stream-idle-timeout`.
    pub(crate) const IDLE: u16 = 1000;
    /// The server is shutting down, or the plugin or tool was removed.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol (a reserved opcode, ...).
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    /// The client pinged more than the stream allows.
    pub(crate) const POLICY_VIOLATION: u16 = 1008;
    /// A text message was not UTF-8.
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    /// A message (a frame or a text message) was larger than the body
    /// limit.
    pub(crate) const TOO_BIG: u16 = 1009;
    /// What the client sent (of any message) found no room as it arrived,
    /// in the body budget or the arrival reserve beside it.
    pub(crate) const TRY_AGAIN_LATER: u16 = 1013;
    /// The plugin crashed (or ran past its time limit) mid-stream, or an
    /// answer was larger than a stream may send.
    pub(crate) const PLUGIN_FAILED: u16 = 1011;
}

/// What one stream runs: the tool, how calls are made, and its policy.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) state: AppState,
    pub(crate) plugin: String,
    pub(crate) tool: String,
    /// The upgrade request's id and trace context, for every call.
    pub(crate) context: CallContext,
    pub(crate) policy: Policy,
    /// Messages (frames or text) larger than this close the stream with
    /// 1009.
    pub(crate) body_limit: usize,
    /// Answers larger than this close the stream with 1011 (see
    /// `super::answer_limit`).
    pub(crate) answer_limit: usize,
    /// With no client message and no answer for this long, the stream
    /// closes with 1000; `None`: never.
    pub(crate) idle_timeout: Option<Duration>,
    /// Becomes `true` when the server shuts down.
    pub(crate) closing: watch::Receiver<bool>,
}

/// A frame and the JSON arguments in force when it arrived.
type Frame = (Arc<StreamArgs>, Charged);

/// A stream's JSON arguments (its last text message) and their room in
/// `--body-memory`, held as long as a frame that uses them waits or runs:
/// every frame waiting under `block` may hold arguments of its own.
#[derive(Debug, Default)]
struct StreamArgs {
    map: Map<String, Value>,
    _room: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl StreamArgs {
    /// The arguments of a text message, charged to the body budget, first
    /// from `held` (the room of the arguments they replace, when no frame
    /// holds those: replacing arguments never needs room for both); or why
    /// not (no room, too many values, not `{"args": {...}}`), with `held`
    /// handed back.
    fn of_text(
        text: &str,
        session: &Session,
        held: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<StreamArgs, (RunError, Option<tokio::sync::OwnedSemaphorePermit>)> {
        // Too many values is `TooManyValues` (no retry helps), before any
        // room is asked for; then room for what they take parsed, not their
        // text's size (a value's text may be two bytes, `0,`; parsed, up to
        // `PARSED_VALUE_BYTES`), at most the body limit, which the budget
        // always holds.
        let max_values = crate::body::max_json_values(session.body_limit);
        let values = forgesyte_loader::json_text::json_values(text.as_bytes());
        if values > max_values {
            let too_many = RunError::TooManyValues {
                values,
                max: max_values,
            };
            return Err((too_many, held));
        }
        // Parsed before any room changes hands: a malformed text leaves
        // the arguments in force as they were.
        // Its values are counted above: no second pass over the text.
        let request = match parse_json_body(text.as_bytes(), usize::MAX) {
            Ok(request) => request,
            Err(e) => return Err((e, held)),
        };
        let parsed = values
            .saturating_mul(crate::body::PARSED_VALUE_BYTES)
            .saturating_add(text.len())
            .min(session.body_limit);
        let room = session.state.body_budget().charge_from(parsed, held)?;
        Ok(StreamArgs {
            map: request.args,
            _room: Some(room),
        })
    }
}

/// A frame's bytes with their room in `--body-memory` (the run route's
/// budget, which stream frames share), held until the plugin returns or
/// the frame is dropped; or why there was no room: the frame is then
/// answered (`ServerBusy`) without a call, its bytes let go at once.
#[derive(Debug)]
enum Charged {
    Held(Bytes, CallRoom),
    Refused(RunError),
}

/// Where the reader and the worker leave what the writer sends: answers
/// through a channel of [`ANSWERS_IN_FLIGHT`]; the close aside (the first
/// one said wins), which the writer sends after the last answer once the
/// conversation is over, however long a slow client takes to read the
/// answers before it (within the writer's own time limit). A close that
/// waited for room among the answers was lost when a slow client's answer
/// held the writer past that wait.
#[derive(Debug, Clone)]
struct Outbox {
    answers: mpsc::Sender<Outgoing>,
    close: CloseSlot,
}

/// An answer on its way to the writer, with its room in `--answer-memory`
/// (held until it is written); the host's own short answers hold none.
#[derive(Debug)]
struct Outgoing {
    text: String,
    room: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl From<String> for Outgoing {
    fn from(text: String) -> Self {
        Outgoing { text, room: None }
    }
}

/// The close said (code, reason), shared by the outbox and the writer,
/// which holds no sender of the answers (their end is its cue).
type CloseSlot = Arc<std::sync::Mutex<Option<(u16, String)>>>;

impl Outbox {
    /// An outbox, the writer's end of its answers, and its close.
    fn new() -> (Outbox, mpsc::Receiver<Outgoing>, CloseSlot) {
        let (answers, receiver) = mpsc::channel(ANSWERS_IN_FLIGHT);
        let close = CloseSlot::default();
        let slot = Arc::clone(&close);
        (Outbox { answers, close }, receiver, slot)
    }
}

/// How a stream ended, for the log.
#[derive(Debug, Default)]
struct Counts {
    frames: u64,
    answered: u64,
}

/// When the stream last moved (a client message or an answer), for the
/// idle timeout: milliseconds since the stream opened; and whether a frame
/// is in the plugin (a stream waiting on its plugin is not idle).
#[derive(Debug)]
struct Activity {
    opened: Instant,
    last_ms: AtomicU64,
    calling: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            last_ms: AtomicU64::new(0),
            calling: AtomicBool::new(false),
        }
    }

    fn calling(&self, calling: bool) {
        self.calling.store(calling, Ordering::Relaxed);
        self.touch();
    }

    fn touch(&self) {
        let ms = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Returns once nothing moved for `timeout`; never without one.
    async fn idle_for(&self, timeout: Option<Duration>) {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = self.opened + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let now = Instant::now();
            // A timeout too large for the clock never ends.
            let Some(mut deadline) = last.checked_add(timeout) else {
                return std::future::pending().await;
            };
            if now >= deadline {
                if !self.calling.load(Ordering::Relaxed) {
                    return;
                }
                let Some(later) = now.checked_add(timeout) else {
                    return std::future::pending().await;
                };
                deadline = later;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// An upgraded connection: the WebSocket protocol over reads charged to
/// the stream's [`Ledger`].
pub(crate) type WebSocket = WebSocketStream<Metered<TokioIo<hyper::upgrade::Upgraded>>>;

/// Runs the stream over `socket` until the client closes it, the plugin
/// fails, or the server shuts down; `ledger` is what its reads are charged
/// to.
pub(crate) async fn run(socket: WebSocket, session: Session, ledger: &Arc<Ledger>) {
    let (mut sink, mut incoming) = socket.split();
    let (out, answers, close) = Outbox::new();
    let queue = FrameQueue::new(session.policy);
    let mut counts = Counts::default();
    let activity = Activity::new();
    let conversation = async {
        let reading = read(
            (&mut incoming, ledger),
            &session,
            &queue,
            out.clone(),
            &activity,
            &mut counts.frames,
        );
        let working = work(&session, &queue, out, &activity, &mut counts.answered);
        tokio::pin!(reading, working);
        tokio::select! {
            // The worker first: after the reader's yield it takes the frame
            // just queued before the reader reads the next one.
            biased;
            // The plugin failed: the worker has said so and closed.
            () = &mut working => queue.close(),
            // The client went, or the stream idled out: the worker gets a
            // moment to finish; a call in flight runs on without it (its
            // answer discarded), and a worker waiting to hand an answer to
            // a client that reads nothing is let go. At the server's stop,
            // a call in flight is answered as a run route's request is:
            // within the shutdown's grace (the server waits for its open
            // streams within it); frames still queued are dropped.
            () = &mut reading => {
                if *session.closing.borrow() {
                    queue.finish();
                    working.await;
                } else {
                    queue.close();
                    let _ = tokio::time::timeout(CLOSE_WAIT, working).await;
                }
            }
        }
    };
    // Whichever ends first, the other gets a bounded time more: the writer
    // the idle timeout (a slow client still reading gets its last answer
    // and the close), then it is dropped, and the connection with it (the
    // stream's slot freed, after the linger below), instead of waiting
    // forever on a client that reads nothing; the conversation `CLOSE_WAIT`.
    let said_close = {
        let flush = session.idle_timeout.unwrap_or(WRITER_FLUSH).max(CLOSE_WAIT);
        let writing = write(&mut sink, answers, &close, (session.idle_timeout, ledger));
        tokio::pin!(conversation, writing);
        tokio::select! {
            () = &mut conversation => {
                // Closed for want of room: the room it holds comes back
                // soon, not once a client that reads nothing idled out.
                let flush = if ledger.is_draining() { REFUSED_LINGER } else { flush };
                tokio::time::timeout(flush, writing).await.unwrap_or(false)
            }
            said = &mut writing => {
                let _ = tokio::time::timeout(CLOSE_WAIT, conversation).await;
                said
            }
        }
    };
    // The server closed: the client's reply is awaited. (A client that
    // closed first had its reply; one that took no close is not waited for.)
    if said_close && let Ok(socket) = incoming.reunite(sink) {
        let stopping = *session.closing.borrow();
        linger(socket, ledger, stopping).await;
    }
    tracing::info!(
        plugin = %crate::error::Shown(&session.plugin),
        tool = %crate::error::Shown(&session.tool),
        frames = counts.frames,
        answered = counts.answered,
        dropped = queue.dropped(),
        "Stream closed"
    );
}

/// A lingering close: what the client sent before it saw the server's
/// close is read and dropped until its close reply or the connection's
/// end, for at most [`LINGER`]. A connection dropped with bytes unread
/// is answered by the kernel with a reset, which can destroy the close
/// frame (its code and reason) before the client reads it: a client that
/// pinged on after its limit saw "connection reset" instead of 1008.
///
/// What is read meanwhile gives its room back as its messages end. A
/// stream closed for want of room ([`Ledger::refused`]) drops all it reads,
/// the client's close reply too: it lingers [`REFUSED_LINGER`] only, so
/// its slot and the room its unfinished frame held come back soon. So does
/// one the server's stop closed (`stopping`): a client that never replied
/// held the stop 5 s.
///
/// A stream the WebSocket layer ended (a message over the limit, a
/// protocol error: closed with 1009, 1007 or 1002) is read no more by that
/// layer: the rest of what the client sends (the rest of a frame far over
/// the limit, which the client is still writing) is read from the
/// connection beneath and dropped, uncharged, until it ends or stays silent
/// for [`LINGER_QUIET`].
async fn linger(mut socket: WebSocket, ledger: &Arc<Ledger>, stopping: bool) {
    let drained = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(_))) => return,
                Some(Ok(message)) => drop(settle(ledger, &message)),
                Some(Err(_)) | None => break,
            }
        }
        // What the WebSocket layer gathered is given back (nothing more
        // comes out of it).
        ledger.claim(0);
        discard(socket.get_mut().get_mut()).await;
    };
    let limit = if ledger.is_draining() || stopping {
        REFUSED_LINGER
    } else {
        LINGER
    };
    // Refused while it lingers: a second more at most.
    let refused = async {
        ledger.refused().await;
        tokio::time::sleep(REFUSED_LINGER).await;
    };
    tokio::select! {
        () = drained => {}
        () = tokio::time::sleep(limit) => {}
        () = refused => {}
    }
}

/// Reads `io` and drops what comes, until its end, an error, or
/// [`LINGER_QUIET`] without a byte.
async fn discard<IO: tokio::io::AsyncRead + Unpin>(io: &mut IO) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0; 64 * 1024];
    while let Ok(Ok(read)) = tokio::time::timeout(LINGER_QUIET, io.read(&mut buf)).await {
        if read == 0 {
            return;
        }
    }
}

/// What was read passes to `message`, once the WebSocket layer has it
/// whole: a frame takes the room of its bytes (returned), a text message
/// gives all back (its arguments are charged for what they hold parsed),
/// a ping or pong gives back exactly what its frame took on the wire (its
/// payload and a client frame's head: 2 bytes and the 4-byte mask, a
/// control frame's payload being at most 125 bytes). Only at the end of a
/// data message is the rest given back: a ping or pong may come between
/// the fragments of one, which the WebSocket layer still holds.
fn settle(ledger: &Arc<Ledger>, message: &Message) -> Option<FrameRoom> {
    match message {
        Message::Binary(bytes) => ledger.claim_frame(bytes.len()),
        Message::Text(text) => {
            ledger.claim(text.len());
            None
        }
        Message::Ping(payload) | Message::Pong(payload) => {
            ledger.release(payload.len() + 6);
            None
        }
        Message::Close(_) | Message::Frame(_) => None,
    }
}

/// The client's messages: text sets the arguments, binary is a frame.
async fn read(
    (incoming, ledger): (&mut SplitStream<WebSocket>, &Arc<Ledger>),
    session: &Session,
    queue: &FrameQueue<Frame>,
    out: Outbox,
    activity: &Activity,
    frames: &mut u64,
) {
    let mut closing = session.closing.clone();
    let mut args = Arc::new(StreamArgs::default());
    let idle_timeout = session.idle_timeout;
    let mut pings = Pings::default();
    loop {
        let next = async {
            tokio::select! {
                message = incoming.next() => Ok(message),
                refused = ledger.refused() => Err(refused),
            }
        };
        let message = match unless(next, &mut closing, activity, idle_timeout).await {
            Waited::Done(Ok(message)) => message,
            Waited::Done(Err(RunError::PayloadTooLarge { limit })) => {
                let reason =
                    format!("the client sent {limit} bytes and more without finishing a message");
                return say_close(&out, close::TOO_BIG, &reason);
            }
            Waited::Done(Err(busy)) => {
                let reason = format!("no room for what the client sent as it arrived: {busy}");
                return say_close(&out, close::TRY_AGAIN_LATER, &reason);
            }
            Waited::Closing => break,
            Waited::Idle => return say_idle(&out, session),
        };
        // What was read passes to the message (a frame's room), or is
        // given back.
        let claimed = match &message {
            Some(Ok(message)) => settle(ledger, message),
            _ => None,
        };
        // Frames and text messages are activity; pings and pongs are not:
        // a client could otherwise hold a half-sent message's room (charged
        // as it arrives) or arguments' room for ever by pinging.
        if matches!(message, Some(Ok(Message::Binary(_) | Message::Text(_)))) {
            activity.touch();
        }
        match message {
            None => return,
            // Read on: the next read sends the close reply and ends.
            Some(Ok(Message::Close(_))) => {}
            Some(Err(e)) => {
                if let Some((code, reason)) = refusal(e, session.body_limit) {
                    say_close(&out, code, &reason);
                }
                return;
            }
            Some(Ok(Message::Binary(bytes))) => {
                let seq = *frames;
                *frames += 1;
                // Under `block` this waits for room: the socket is not read
                // meanwhile (TCP backpressure); a shutdown still ends it,
                // and so does the idle timeout (a client that sends but
                // never reads keeps the worker waiting to hand over an
                // answer, and this wait with it).
                queue.drop_waiting_for_newer();
                let room = match claimed {
                    Some(room) => room.top_up(bytes.len()).map(CallRoom::from),
                    // Refused meanwhile: its reader closes the stream.
                    None => session
                        .state
                        .body_budget()
                        .take(bytes.len().div_ceil(1024))
                        .map(CallRoom::from),
                };
                let charged = match room {
                    Ok(room) => Charged::Held(bytes, room),
                    // Its bytes go now, not once the push (which may wait
                    // for room under `block`) is done: they are counted
                    // nowhere.
                    Err(busy) => {
                        drop(bytes);
                        Charged::Refused(busy)
                    }
                };
                let frame = (Arc::clone(&args), charged);
                match unless(queue.push(seq, frame), &mut closing, activity, idle_timeout).await {
                    Waited::Done(true) => {}
                    Waited::Done(false) => return,
                    Waited::Closing => break,
                    Waited::Idle => return say_idle(&out, session),
                }
                // The worker runs in this task: let it take the frame
                // before the next one (already buffered) can replace it.
                tokio::task::yield_now().await;
            }
            Some(Ok(Message::Text(text))) => {
                // The arguments in force give up their room to the new ones
                // when no waiting or running frame holds them.
                let held = Arc::get_mut(&mut args).and_then(|a| a._room.take());
                match StreamArgs::of_text(text.as_str(), session, held) {
                    Ok(given) => args = Arc::new(given),
                    Err((e, held)) => {
                        if let Some(a) = Arc::get_mut(&mut args) {
                            a._room = held;
                        }
                        let answer = json!({
                            "ok": false,
                            "error_type": e.error_type(),
                            "detail": format!(
                                "A text message {{\"args\": {{...}}}} was refused (the arguments in force stay): {e}"
                            ),
                        });
                        // Its bytes (up to the body limit, their room given
                        // back) go before the wait below.
                        drop(text);
                        // The answers' room is full while the client reads
                        // nothing: as above.
                        let sent = out.answers.send(answer.to_string().into());
                        match unless(sent, &mut closing, activity, idle_timeout).await {
                            Waited::Done(Ok(())) => {}
                            Waited::Done(Err(_)) => return,
                            Waited::Closing => break,
                            Waited::Idle => return say_idle(&out, session),
                        }
                    }
                }
            }
            // Pings are answered by the WebSocket layer, within a rate.
            Some(Ok(Message::Ping(_))) => {
                if !pings.allow(Instant::now()) {
                    let reason = format!("more than {MAX_PINGS_PER_SECOND} pings in a second");
                    return say_close(&out, close::POLICY_VIOLATION, &reason);
                }
            }
            // Raw frames are what a reader of frames gets, never this one.
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
        }
    }
    say_close(&out, close::GOING_AWAY, "the server is shutting down");
}

/// The client's pings of the current second.
#[derive(Debug, Default)]
struct Pings {
    since: Option<Instant>,
    count: u32,
}

impl Pings {
    /// Counts a ping at `now`: whether it is within
    /// [`MAX_PINGS_PER_SECOND`].
    fn allow(&mut self, now: Instant) -> bool {
        match self.since {
            Some(since) if now.saturating_duration_since(since) < Duration::from_secs(1) => {
                self.count += 1;
            }
            _ => {
                self.since = Some(now);
                self.count = 1;
            }
        }
        self.count <= MAX_PINGS_PER_SECOND
    }
}

/// The close code and reason for a client's message that broke the
/// WebSocket rules (`None`: the connection itself failed, nothing to say).
fn refusal(error: tungstenite::Error, body_limit: usize) -> Option<(u16, String)> {
    use tungstenite::error::CapacityError;
    match error {
        // A 64-bit length whose most significant bit is set breaks RFC
        // 6455 (§5.2: "MUST be 0"), whatever the limit; the WebSocket layer
        // finds it too long before it finds it wrong.
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { size, .. })
            if u64::try_from(size).is_ok_and(|size| size > i64::MAX as u64) =>
        {
            Some((
                close::PROTOCOL_ERROR,
                "protocol error: a frame's 64-bit payload length has its most significant bit set"
                    .to_owned(),
            ))
        }
        tungstenite::Error::Capacity(_) => Some((
            close::TOO_BIG,
            format!(
                "a message (a frame, or a text message) is larger than the limit of {body_limit} bytes"
            ),
        )),
        tungstenite::Error::Utf8(_) => Some((
            close::INVALID_PAYLOAD,
            "a text message, or a close frame's reason, is not valid UTF-8".to_owned(),
        )),
        tungstenite::Error::Protocol(e) => {
            Some((close::PROTOCOL_ERROR, format!("protocol error: {e}")))
        }
        _ => None,
    }
}

/// How one of the reader's waits ended.
enum Waited<T> {
    /// What it waited for came.
    Done(T),
    /// The server is shutting down.
    Closing,
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Waits for `future` unless the server shuts down or the stream idles out
/// first: every wait of the reader, so none outlasts either.
async fn unless<T>(
    future: impl Future<Output = T>,
    closing: &mut watch::Receiver<bool>,
    activity: &Activity,
    idle_timeout: Option<Duration>,
) -> Waited<T> {
    tokio::select! {
        biased;
        _ = closing.wait_for(|c| *c) => Waited::Closing,
        value = future => Waited::Done(value),
        () = activity.idle_for(idle_timeout) => Waited::Idle,
    }
}

/// Closes an idle stream: nothing moved for the session's idle timeout.
fn say_idle(out: &Outbox, session: &Session) {
    let secs = session.idle_timeout.map_or(0.0, |t| t.as_secs_f64());
    let reason = format!("idle: no frame, no text message and no answer for {secs} s");
    say_close(out, close::IDLE, &reason);
}

/// Asks the writer to close with `code` and `reason` after the answers
/// (unless a close was said already).
fn say_close(out: &Outbox, code: u16, reason: &str) {
    let mut close = out
        .close
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if close.is_none() {
        *close = Some((code, close_reason(reason)));
    }
}

/// `reason` cut to what a close frame carries (123 bytes), on a character
/// boundary.
fn close_reason(reason: &str) -> String {
    if reason.len() <= MAX_CLOSE_REASON {
        return reason.to_owned();
    }
    let mut end = MAX_CLOSE_REASON - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

/// Sends the answers in order, then the close said, if any, once the
/// answers end (the conversation is over). An answer the client does not
/// take within `timeout` (the idle timeout) ends the writer, and so the
/// stream: a client that stops reading is disconnected whatever it keeps
/// sending (under `latest` its frames never wait, so its reader never
/// idles). `true` if it sent a close message.
async fn write(
    sink: &mut SplitSink<WebSocket, Message>,
    mut answers: mpsc::Receiver<Outgoing>,
    close: &CloseSlot,
    (idle_timeout, ledger): (Option<Duration>, &Ledger),
) -> bool {
    // Each send waits for the client up to the idle timeout; once the
    // stream is closed for want of room, [`REFUSED_LINGER`].
    let timeout = || {
        if ledger.is_draining() {
            Some(REFUSED_LINGER)
        } else {
            idle_timeout
        }
    };
    while let Some(Outgoing { text, room }) = answers.recv().await {
        let sending = async {
            for frame in fragments(text) {
                sink.send(frame).await?;
            }
            Ok(())
        };
        if !sent_within(timeout(), sending).await {
            return false;
        }
        // Written (into the socket, or the connection's bounded write
        // buffer): its room comes back.
        drop(room);
    }
    let said = close
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let Some((code, reason)) = said else {
        return false;
    };
    let frame = CloseFrame {
        code: code.into(),
        reason: reason.into(),
    };
    sent_within(timeout(), sink.send(Message::Close(Some(frame)))).await
}

/// The most bytes of one WebSocket frame of an answer.
const FRAGMENT: usize = 64 * 1024;

/// An answer as the frames of one text message, each of at most
/// [`FRAGMENT`] bytes: the connection's write buffer grows to the largest
/// frame written and never shrinks (tungstenite), so an answer (up to
/// twice the body limit) written as one frame stayed held until the stream
/// ended. Split anywhere: UTF-8 is checked per message, not per frame.
fn fragments(text: String) -> Vec<Message> {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    if text.len() <= FRAGMENT {
        return vec![Message::Text(text.into())];
    }
    let bytes = bytes::Bytes::from(text.into_bytes());
    let count = bytes.len().div_ceil(FRAGMENT);
    (0..count)
        .map(|i| {
            let part = bytes.slice(i * FRAGMENT..bytes.len().min((i + 1) * FRAGMENT));
            let opcode = if i == 0 { Data::Text } else { Data::Continue };
            Message::Frame(Frame::message(part, OpCode::Data(opcode), i + 1 == count))
        })
        .collect()
}

/// Whether `sending` succeeded within `timeout` (`None`: however long).
async fn sent_within(
    timeout: Option<Duration>,
    sending: impl Future<Output = Result<(), tungstenite::Error>>,
) -> bool {
    match timeout {
        Some(limit) => matches!(tokio::time::timeout(limit, sending).await, Ok(Ok(()))),
        None => sending.await.is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long answer goes as frames of at most 64 KiB, one message (a text
    /// frame, continuations, the last final), split inside characters as
    /// it falls; a short one as one text message.
    #[test]
    fn long_answers_go_as_frames_of_at_most_64_kib() {
        use tungstenite::protocol::frame::coding::{Data, OpCode};
        assert!(
            matches!(&fragments("short".into())[..], [Message::Text(t)] if t.as_str() == "short")
        );
        let text = "é".repeat(100_000); // 200,000 bytes
        let frames = fragments(text.clone());
        assert_eq!(frames.len(), 4);
        let mut joined = Vec::new();
        for (i, message) in frames.iter().enumerate() {
            let Message::Frame(frame) = message else {
                panic!("{message:?}");
            };
            let header = frame.header();
            let opcode = if i == 0 { Data::Text } else { Data::Continue };
            assert_eq!(header.opcode, OpCode::Data(opcode));
            assert_eq!(header.is_final, i == 3);
            assert!(frame.payload().len() <= FRAGMENT);
            joined.extend_from_slice(frame.payload());
        }
        assert_eq!(joined, text.as_bytes());
    }

    #[test]
    fn close_reasons_fit_a_close_frame_on_a_character_boundary() {
        assert_eq!(close_reason("short"), "short");
        let exact = "x".repeat(MAX_CLOSE_REASON);
        assert_eq!(close_reason(&exact), exact);
        for long in [
            "é".repeat(200),
            "x".repeat(1000),
            format!("x{}", "€".repeat(80)),
        ] {
            let cut = close_reason(&long);
            assert!(cut.len() <= MAX_CLOSE_REASON, "{} bytes", cut.len());
            assert!(cut.ends_with('…'), "{cut}");
            assert!(long.starts_with(cut.trim_end_matches('…')));
        }
    }
}
