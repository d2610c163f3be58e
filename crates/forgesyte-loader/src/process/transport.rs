//! The host's side of one runner connection, apart from any process: it
//! writes requests to a stream, reads answers from another, and routes each
//! answer to the caller waiting for its id. It takes its streams as
//! arguments, so it is tested over in-memory pipes; spawning and reaping the
//! process is [`super::child`]'s business.
//!
//! Several requests can be in flight at once: each registers a one-shot
//! channel under a fresh id, its frame is written under the writer lock, and
//! the one reader hands each answer to the channel of its id. A request's
//! timeout covers all of it: the wait for the writer lock, the write (the
//! request stream is non-blocking and written with a deadline, so a runner
//! that stops reading its stdin cannot block a caller past its timeout)
//! and the wait for the answer. The first
//! frame is the runner's greeting, checked by
//! [`forgesyte_protocol::wire::greeting`] (version included) and handed to
//! whoever waits for [`HELLO_ID`].
//!
//! Shared memory (`PROTOCOL.md` §3.1): a transport offered a shared-memory
//! socket ([`Transport::offer_shm`]) sends attachments at or above the
//! threshold as sealed memory files once the runner's hello announces
//! `shared_memory` (the descriptors go first, under the writer lock, then
//! the frame), and maps the ones the runner sends back. A memory file that
//! cannot be made, or a descriptor message that cannot be sent, leaves the
//! attachments inline. A frame that is not written whole (descriptors
//! sent or not) takes the request stream out of use for good: the runner
//! would read the next frame out of step, or pair it with the descriptors.
//! It stays open until it is closed (`Transport::set_aside`). The host keeps no descriptor past the call: its own
//! are closed once sent (those of 1 MiB or more once the answer came, off
//! the call's path: [`super::spares::Retire`]), the runner's once mapped,
//! and a mapping lives as long as the answer's frame. Attachments from 1 MiB are written into
//! spare memory files made in advance ([`super::spares`]), then sealed the
//! same way.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

use forgesyte_protocol::wire::shm::{self, DEFAULT_SHM_THRESHOLD, Outgoing};
use forgesyte_protocol::wire::{
    Frame, FrameError, Greeting, HELLO_ID, HandshakeError, Response, capability, read_body,
    read_frame, write_frame_parts,
};
use parking_lot::{Mutex, MutexGuard};
use rustix::event::{PollFd, PollFlags, Timespec, poll};

use crate::host::ExitReport;

/// What a waiting request receives.
#[derive(Debug)]
pub(crate) enum Reply {
    /// The runner's greeting (to [`HELLO_ID`]).
    Greeting(Result<Greeting, HandshakeError>),
    /// The runner's answer, and the frame that carried it (its
    /// attachments).
    Answer(Response, Frame),
    /// The connection ended before an answer came.
    Died(Arc<ExitReport>),
    /// The answer came, but this process could not take its shared
    /// attachments (out of file descriptors, `shm::ReceiveError`): the
    /// call failed for the host's lack, the runner serves on.
    Unreceived(String),
}

/// Why a request got no reply.
#[derive(Debug)]
pub(crate) enum RequestError {
    /// None within the timeout (nothing was done about it). The frame may
    /// not have been written, or only in part: then the request stream is
    /// closed, since the runner would read the next frame out of step.
    TimedOut,
    /// The connection is closed: this is how it ended, if known.
    Closed(Option<Arc<ExitReport>>),
}

/// Where a request's reply goes: a thread blocked on a channel
/// ([`Transport::request`]) or a task awaiting it ([`Transport::try_send`]).
#[derive(Debug)]
enum Waiter {
    Blocked(SyncSender<Reply>),
    Awaiting(tokio::sync::oneshot::Sender<Reply>),
}

impl Waiter {
    /// Hands over `reply`; a caller that gave up meanwhile is nobody to
    /// tell.
    fn send(self, reply: Reply) {
        match self {
            Waiter::Blocked(tx) => {
                let _ = tx.try_send(reply);
            }
            Waiter::Awaiting(tx) => {
                let _ = tx.send(reply);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Waiters {
    closed: Option<Arc<ExitReport>>,
    next_id: u64,
    map: HashMap<u64, Waiter>,
}

impl Waiters {
    /// A fresh id with `waiter` registered under it; the report of a
    /// connection already closed instead.
    fn register(&mut self, waiter: Waiter) -> Result<u64, RequestError> {
        if let Some(report) = &self.closed {
            return Err(RequestError::Closed(Some(ExitReport::for_an_unsent_call(
                Arc::clone(report),
            ))));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.map.insert(id, waiter);
        Ok(id)
    }
}

/// A request sent by [`Transport::try_send`], whose reply is awaited.
#[derive(Debug)]
pub(crate) struct Sent {
    id: u64,
    reply: tokio::sync::oneshot::Receiver<Reply>,
}

/// What [`Transport::try_send`] did.
#[derive(Debug)]
pub(crate) enum TrySend {
    /// The request went whole.
    Sent(Sent),
    /// Nothing went: another caller is writing, or the pipe has no room.
    Busy,
    /// Nothing went: the frame is too large to go whole at once.
    TooLarge,
    /// Nothing went: the connection is closed (how it ended, if known).
    Closed(Option<Arc<ExitReport>>),
}

/// How long [`Transport::try_send`] waits for a writer another awaited
/// request holds before it gives up (`Busy`); a blocked caller's request
/// ([`Transport::request`], which may hold it until its deadline) is not
/// waited for.
const WRITER_WAIT: Duration = Duration::from_micros(50);

/// How long a blocked caller waits for a quick answer awake, yielding its
/// CPU, before it sleeps ([`Transport::quick_reply`]).
const ANSWER_SPIN: Duration = Duration::from_micros(200);

/// Marks the writer held by [`Transport::request`] while it lives.
struct HeldByRequest<'a>(&'a AtomicBool);

impl<'a> HeldByRequest<'a> {
    fn new(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        HeldByRequest(flag)
    }
}

impl Drop for HeldByRequest<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Declared before the writer's guard, so dropped after it: once the
/// writer is free again, closes it if [`Transport::close_writer_when_free`]
/// asked for that while it was held. (Looked at after the release, not
/// before: a close asked between the look and the release would be lost.
/// With the asker's own look after its request, one of the two sees the
/// other: whichever does closes.)
struct ClosesIfAsked<'a>(&'a Transport);

impl Drop for ClosesIfAsked<'_> {
    fn drop(&mut self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.0.close_asked.load(Ordering::SeqCst) {
            self.0.close_writer_within(Duration::ZERO);
        }
    }
}

/// Takes an awaited request's waiter out, however its wait ends, unless
/// its answer came (`id` then `None`: whoever answered took it out).
struct Forget<'a> {
    transport: &'a Transport,
    id: Option<u64>,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.transport.waiters.lock().map.remove(&id);
        }
    }
}

/// The largest frame [`Transport::try_send`] writes: a pipe takes a write
/// of at most `PIPE_BUF` bytes whole or not at all, so a frame that finds
/// no room is not half sent.
pub(crate) const ATOMIC_FRAME: usize = libc::PIPE_BUF;

/// The request stream: a pipe (or anything with a descriptor that
/// `poll(2)` understands), switched to non-blocking mode by
/// [`Transport::new`].
pub(crate) trait RequestStream: Write + AsFd + Send {}

impl<T: Write + AsFd + Send> RequestStream for T {}

/// The size from which attachments go to runners through shared memory
/// (0: never); see [`set_shm_threshold`].
static SHM_THRESHOLD: AtomicU64 = AtomicU64::new(DEFAULT_SHM_THRESHOLD);

/// Sets the size in bytes from which attachments travel between the host
/// and runners through shared memory (`serve --shm-threshold`; default
/// 64 KiB); 0 turns shared memory off. Runners started later use it.
pub fn set_shm_threshold(bytes: u64) {
    SHM_THRESHOLD.store(bytes, Ordering::Relaxed);
}

/// The current threshold (0: shared memory off).
pub fn shm_threshold() -> u64 {
    SHM_THRESHOLD.load(Ordering::Relaxed)
}

/// The host's end of a runner's shared-memory socket.
#[derive(Debug)]
struct ShmLink {
    /// Closed (`None`) once the runner's answers end: its queue, and every
    /// descriptor still in it, goes with it.
    socket: Mutex<Option<OwnedFd>>,
    threshold: u64,
    /// The runner's hello announced `shared_memory`.
    accepted: AtomicBool,
}

/// One connection to a runner.
pub(crate) struct Transport {
    writer: Mutex<Option<Box<dyn RequestStream>>>,
    /// The request stream after part of a frame went out: no longer
    /// written to, still open until [`Transport::close_writer`] (see
    /// [`Transport::set_aside`]).
    out_of_step: Mutex<Option<Box<dyn RequestStream>>>,
    /// The writer is held by [`Transport::request`] ([`HeldByRequest`]).
    held_by_request: AtomicBool,
    /// [`Transport::close_writer_when_free`] was called: whoever holds the
    /// writer closes it once done ([`ClosesIfAsked`]).
    close_asked: AtomicBool,
    waiters: Mutex<Waiters>,
    max_answer_bytes: u64,
    shm: Option<ShmLink>,
    /// The last answer to a blocked caller came within [`ANSWER_SPIN`]
    /// (see [`Transport::quick_reply`]); none yet: `false`.
    answers_quickly: AtomicBool,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("max_answer_bytes", &self.max_answer_bytes)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A connection writing requests to `writer`, accepting answer frames
    /// of at most `max_answer_bytes`; the returned receiver gets the
    /// greeting. `writer` is made non-blocking (an error if it cannot be):
    /// every write has a deadline.
    pub(crate) fn new(
        writer: impl RequestStream + 'static,
        max_answer_bytes: u64,
    ) -> io::Result<(Transport, Receiver<Reply>)> {
        rustix::io::ioctl_fionbio(&writer, true)?;
        let (tx, rx) = sync_channel(1);
        let mut map = HashMap::new();
        map.insert(HELLO_ID, Waiter::Blocked(tx));
        let transport = Transport {
            writer: Mutex::new(Some(Box::new(writer))),
            out_of_step: Mutex::new(None),
            held_by_request: AtomicBool::new(false),
            close_asked: AtomicBool::new(false),
            waiters: Mutex::new(Waiters {
                closed: None,
                next_id: HELLO_ID + 1,
                map,
            }),
            max_answer_bytes,
            shm: None,
            // The first request is the construction, rarely quick.
            answers_quickly: AtomicBool::new(false),
        };
        Ok((transport, rx))
    }

    /// Offers the runner shared memory through `socket` (the host's end of
    /// its shared-memory socket) for attachments of at least `threshold`
    /// bytes; used for requests once the hello accepts it.
    pub(crate) fn offer_shm(&mut self, socket: OwnedFd, threshold: u64) {
        self.shm = Some(ShmLink {
            socket: Mutex::new(Some(socket)),
            threshold,
            accepted: AtomicBool::new(false),
        });
    }

    /// Whether requests use shared memory (offered and accepted).
    pub(crate) fn uses_shm(&self) -> bool {
        self.shm
            .as_ref()
            .is_some_and(|l| l.accepted.load(Ordering::Acquire))
    }

    /// Sends a request and waits up to `timeout` for its answer: the
    /// timeout covers the wait for the writer, the write and the wait for
    /// the answer. The header is `head(id)` followed by `tail` (written as
    /// is, not copied); `attachments` follow.
    pub(crate) fn request(
        &self,
        head: impl FnOnce(u64) -> Vec<u8>,
        tail: &[&[u8]],
        attachments: &[&[u8]],
        timeout: Duration,
    ) -> Result<Reply, RequestError> {
        let (tx, rx) = sync_channel(1);
        let id = self.waiters.lock().register(Waiter::Blocked(tx))?;
        // `None`: too far away to matter (no deadline).
        let deadline = Instant::now().checked_add(timeout);
        let head = head(id);
        // The copies into memory files happen before the writer is taken.
        let outgoing = match &self.shm {
            Some(link) if self.uses_shm() => {
                Outgoing::prepare_with(attachments, link.threshold, super::spares::sealed)
            }
            _ => Outgoing::default(),
        };
        let shared_head = outgoing.header(&head);
        let shared_inline = outgoing.inline(attachments);
        // Its check runs once the guard below is dropped (at the end of
        // the `let`).
        let closes_if_asked = ClosesIfAsked(self);
        let written = match self.lock_writer(deadline) {
            None => Err(RequestError::TimedOut),
            Some(mut writer) => match writer.as_mut() {
                Some(w) => {
                    let _held = HeldByRequest::new(&self.held_by_request);
                    // Descriptors first; if they cannot go, all goes inline.
                    let sent_fds = match &self.shm {
                        Some(link) if !outgoing.is_empty() => {
                            let socket = link.socket.lock();
                            socket
                                .as_ref()
                                .is_some_and(|s| outgoing.send(s.as_fd()).is_ok())
                        }
                        _ => false,
                    };
                    let (first, atts) = if sent_fds {
                        (shared_head.as_slice(), shared_inline.as_slice())
                    } else {
                        (head.as_slice(), attachments)
                    };
                    let header = header_parts(first, tail);
                    let mut w = DeadlineWriter {
                        inner: w.as_mut(),
                        deadline,
                        written: 0,
                    };
                    match write_frame_parts(&mut w, &header, atts) {
                        Ok(()) => Ok(()),
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                            if w.written > 0 || sent_fds {
                                // Half a frame is in the pipe: the stream is
                                // out of step for good.
                                self.set_aside(&mut writer);
                            }
                            Err(RequestError::TimedOut)
                        }
                        Err(_) => {
                            if sent_fds {
                                writer.take();
                            }
                            Err(RequestError::Closed(None))
                        }
                    }
                }
                None => Err(RequestError::Closed(None)),
            },
        };
        drop(closes_if_asked);
        // The host's copies of the memory files of 1 MiB or more stay open
        // until the answer came (or the request failed), so the runner's
        // close is never the one that frees their pages; the spares thread
        // closes them, off this path. Smaller ones close here, once sent
        // (freeing them is cheap).
        let _retire = super::spares::Retire::new(outgoing, attachments);
        if let Err(e) = written {
            self.waiters.lock().map.remove(&id);
            return Err(match e {
                // The peer is gone (or we let it go): the end of the
                // connection is being processed and its report follows.
                RequestError::Closed(_) => {
                    RequestError::Closed(self.closed().map(ExitReport::for_an_unsent_call))
                }
                e => e,
            });
        }
        let sent_at = Instant::now();
        if let Some(reply) = self.quick_reply(&rx, sent_at, deadline) {
            return Ok(reply);
        }
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        match rx.recv_timeout(left) {
            Ok(reply) => {
                self.note_answer_time(sent_at);
                Ok(reply)
            }
            Err(RecvTimeoutError::Timeout) => {
                if let Some(reply) = after_a_stall(&rx, deadline) {
                    return Ok(reply);
                }
                if self.waiters.lock().map.remove(&id).is_none() {
                    // Its answer (or the connection's end) was taken out
                    // for it just now, and is on its way: not lost.
                    if let Ok(reply) = rx.recv_timeout(STALL_GRACE) {
                        return Ok(reply);
                    }
                }
                Err(RequestError::TimedOut)
            }
            Err(RecvTimeoutError::Disconnected) => Err(RequestError::Closed(self.closed())),
        }
    }

    /// The reply of a blocked caller's request, if it comes within
    /// [`ANSWER_SPIN`] of `sent_at` (when its frame was written) and before
    /// `deadline`, and this runner's last answer to a blocked caller came
    /// so too (else `None` at once): the caller yields its CPU in a loop instead
    /// of sleeping. On a virtual machine, waking a thread whose CPU has
    /// gone idle takes tens of microseconds, and a quick call's answer
    /// crosses three threads (the runner's, the reader's, the caller's):
    /// the caller awake saves one of those wake-ups. A runner whose calls
    /// take longer is never waited for so, so a slow tool costs no
    /// spinning (its first call after a quick one at most `ANSWER_SPIN`).
    fn quick_reply(
        &self,
        rx: &Receiver<Reply>,
        sent_at: Instant,
        deadline: Option<Instant>,
    ) -> Option<Reply> {
        if !self.answers_quickly.load(Ordering::Relaxed) {
            return None;
        }
        let spin_end = deadline.map_or(sent_at + ANSWER_SPIN, |d| d.min(sent_at + ANSWER_SPIN));
        loop {
            match rx.try_recv() {
                Ok(reply) => {
                    self.note_answer_time(sent_at);
                    return Some(reply);
                }
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            if Instant::now() >= spin_end {
                self.note_answer_time(sent_at);
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// Records whether the answer to a request sent at `sent_at` came (or,
    /// still awaited, may yet come) within [`ANSWER_SPIN`] (see
    /// [`Self::quick_reply`]).
    fn note_answer_time(&self, sent_at: Instant) {
        self.answers_quickly
            .store(sent_at.elapsed() < ANSWER_SPIN, Ordering::Relaxed);
    }

    /// Sends a request of no attachments at once, without blocking, for a
    /// caller that awaits its reply ([`Self::wait`]). Nothing is sent
    /// unless it all is: [`TrySend::Busy`] when another caller is writing
    /// or the pipe has no room for the frame (try again later),
    /// [`TrySend::TooLarge`] for a frame over [`ATOMIC_FRAME`] bytes (send
    /// it with [`Self::request`]), [`TrySend::Closed`] when the stream is
    /// closed or failing. `head` and `tail` as for [`Self::request`].
    pub(crate) fn try_send(&self, head: impl FnOnce(u64) -> Vec<u8>, tail: &[&[u8]]) -> TrySend {
        if tail.iter().map(|part| part.len()).sum::<usize>() >= ATOMIC_FRAME {
            return TrySend::TooLarge;
        }
        // Another awaited request holds the writer for one write: worth
        // waiting for on this thread (a task that yields waits behind every
        // task ready). One a blocked caller holds (its frame may take until
        // its deadline to write) is waited out by the task, never on the
        // thread.
        // Declared before the guard, so dropped after it.
        let _close = ClosesIfAsked(self);
        let writer = match self.writer.try_lock() {
            Some(writer) => Some(writer),
            None if self.held_by_request.load(Ordering::Acquire) => None,
            None => self.writer.try_lock_for(WRITER_WAIT),
        };
        let Some(mut writer) = writer else {
            return TrySend::Busy;
        };
        let Some(stream) = writer.as_mut() else {
            return TrySend::Closed(self.closed().map(ExitReport::for_an_unsent_call));
        };
        let (tx, reply) = tokio::sync::oneshot::channel();
        let id = match self.waiters.lock().register(Waiter::Awaiting(tx)) {
            Ok(id) => id,
            Err(RequestError::Closed(report)) => return TrySend::Closed(report),
            Err(RequestError::TimedOut) => return TrySend::Busy,
        };
        let head = head(id);
        let header = header_parts(&head, tail);
        let mut frame = Vec::with_capacity(ATOMIC_FRAME);
        let small =
            write_frame_parts(&mut frame, &header, &[]).is_ok() && frame.len() <= ATOMIC_FRAME;
        let outcome = if !small {
            TrySend::TooLarge
        } else {
            match stream.write(&frame) {
                Ok(n) if n == frame.len() => return TrySend::Sent(Sent { id, reply }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => TrySend::Busy,
                // Part of a frame: only a stream that is not a pipe does
                // that (every runner's is one). Out of step for good.
                Ok(n) if n > 0 => {
                    self.set_aside(&mut writer);
                    TrySend::Closed(None)
                }
                // The end of the connection, which `request` reports.
                _ => TrySend::Closed(None),
            }
        };
        self.waiters.lock().map.remove(&id);
        outcome
    }

    /// Awaits the reply of a request [`Self::try_send`] sent, until
    /// `deadline` (`None`: none). It must be polled inside a tokio runtime
    /// whose timers are enabled. Dropped before its end, the request is
    /// forgotten (its answer, if one comes, dropped); its deadline is then
    /// no longer watched.
    pub(crate) async fn wait(
        &self,
        sent: Sent,
        deadline: Option<Instant>,
    ) -> Result<Reply, RequestError> {
        let Sent { id, reply } = sent;
        let mut forget = Forget {
            transport: self,
            id: Some(id),
        };
        let replied = match deadline {
            None => Ok(reply.await),
            Some(deadline) => {
                tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), reply).await
            }
        };
        match replied {
            // Its waiter was taken out by whoever answered (`deliver`,
            // `fail_all`): no lock to take again.
            Ok(Ok(reply)) => {
                forget.id = None;
                Ok(reply)
            }
            Ok(Err(_)) => Err(RequestError::Closed(self.closed())),
            Err(_) => Err(RequestError::TimedOut),
        }
    }

    /// The writer, waited for until `deadline` at most.
    fn lock_writer(
        &self,
        deadline: Option<Instant>,
    ) -> Option<MutexGuard<'_, Option<Box<dyn RequestStream>>>> {
        match deadline {
            Some(deadline) => self.writer.try_lock_until(deadline),
            None => Some(self.writer.lock()),
        }
    }

    /// How the connection ended, once it has.
    pub(crate) fn closed(&self) -> Option<Arc<ExitReport>> {
        self.waiters.lock().closed.clone()
    }

    /// Takes the request stream out of use for good once part of a frame
    /// went out (the runner would read the next frame out of step), but
    /// keeps it open until [`close_writer`](Self::close_writer): closed
    /// now, the runner could read the end of its input and exit before the
    /// caller kills it for what went wrong, and its death would be told as
    /// an exit of its own.
    fn set_aside(&self, writer: &mut Option<Box<dyn RequestStream>>) {
        if let Some(stream) = writer.take() {
            *self.out_of_step.lock() = Some(stream);
        }
    }

    /// Closes the request stream (one set aside too): the runner reads the
    /// end of its input, which asks it to exit.
    pub(crate) fn close_writer(&self) {
        self.writer.lock().take();
        self.out_of_step.lock().take();
    }

    /// [`close_writer`](Self::close_writer), unless a request is still
    /// being written after `wait` (a runner that reads nothing holds the
    /// writer until that request's deadline): then `false`, and nothing is
    /// closed.
    pub(crate) fn close_writer_within(&self, wait: Duration) -> bool {
        match self.writer.try_lock_for(wait) {
            Some(mut writer) => {
                writer.take();
                self.out_of_step.lock().take();
                true
            }
            None => false,
        }
    }

    /// Closes the request stream now if no request is being written, else
    /// as soon as the one being written is done (its holder closes it): for
    /// a runner whose answers ended, which must see its input end too,
    /// whatever caller was preempted holding the writer.
    pub(crate) fn close_writer_when_free(&self) {
        self.close_asked.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.close_writer_within(Duration::ZERO);
    }

    /// Reads answers from `reader` and routes them until the stream ends
    /// (`None`) or the runner breaks the protocol (`Some(what it did)`);
    /// then the shared-memory socket is done with: shut down, and closed,
    /// so that whatever the runner sent on it without the frame that would
    /// have used it (a crash mid-transfer, or on purpose) is closed, and
    /// nothing more is taken. (Reading the queue empty is not enough: an
    /// empty message reads as its end, and a pending error of a peer that
    /// died with data unread as a failure.)
    pub(crate) fn read_answers(&self, reader: impl Read) -> Option<String> {
        let end = self.route_answers(reader);
        if let Some(link) = &self.shm
            && let Some(socket) = link.socket.lock().take()
        {
            shm::discard(socket.as_fd());
        }
        end
    }

    fn route_answers(&self, reader: impl Read) -> Option<String> {
        let mut reader = io::BufReader::with_capacity(64 * 1024, reader);
        match read_body(&mut reader, self.max_answer_bytes) {
            Ok(body) => {
                let greeting = forgesyte_protocol::wire::greeting(body);
                if let (Some(link), Ok(Greeting::Hello(hello))) = (&self.shm, &greeting)
                    && hello.can(capability::SHARED_MEMORY)
                {
                    link.accepted.store(true, Ordering::Release);
                }
                let failed = greeting.as_ref().err().map(ToString::to_string);
                self.deliver(HELLO_ID, Reply::Greeting(greeting));
                if let Some(detail) = failed {
                    return Some(detail);
                }
            }
            Err(e) => return frame_violation(e, self.max_answer_bytes),
        }
        loop {
            let mut frame = match read_frame(&mut reader, self.max_answer_bytes) {
                Ok(frame) => frame,
                Err(e) => return frame_violation(e, self.max_answer_bytes),
            };
            // Its shared attachments (sent before the frame): mapped, and
            // their descriptors closed, whatever follows.
            let received = match &self.shm {
                Some(link) => {
                    let socket = link.socket.lock();
                    let socket = socket.as_ref().map(AsFd::as_fd);
                    shm::receive(&mut frame, socket, self.max_answer_bytes)
                }
                None => shm::receive(&mut frame, None, self.max_answer_bytes),
            };
            match received {
                Ok(()) => {}
                // The frame is whole and the stream in step: this answer
                // is failed, the runner's next ones read on.
                Err(e @ shm::ReceiveError::OutOfDescriptors) => {
                    match serde_json::from_slice::<Response>(frame.header()) {
                        Ok(response) => {
                            let id = response.id();
                            if id == HELLO_ID || !self.deliver(id, Reply::Unreceived(e.to_string()))
                            {
                                return Some(format!("answer to unknown request id {id}"));
                            }
                            continue;
                        }
                        Err(parse) => return Some(format!("malformed answer: {parse}")),
                    }
                }
                Err(e) => return Some(format!("malformed answer: {e}")),
            }
            let response = match serde_json::from_slice::<Response>(frame.header()) {
                Ok(response) => response,
                // A header that is no object (`[1,2,3]`) said so, not as
                // the first type the message's fields were read as.
                Err(_) if frame.header().trim_ascii_start().first() != Some(&b'{') => {
                    return Some("malformed answer: its header is not a JSON object".into());
                }
                Err(e) => return Some(format!("malformed answer: {e}")),
            };
            let id = response.id();
            if id == HELLO_ID {
                return Some("a second greeting".into());
            }
            if !self.deliver(id, Reply::Answer(response, frame)) {
                return Some(format!("answer to unknown request id {id}"));
            }
        }
    }

    /// Hands `reply` to the waiter of `id`; `false` if there is none (and
    /// none was ever registered: a caller that gave up is not an error).
    fn deliver(&self, id: u64, reply: Reply) -> bool {
        let (waiter, known) = {
            let mut waiters = self.waiters.lock();
            (waiters.map.remove(&id), id < waiters.next_id)
        };
        if let Some(waiter) = waiter {
            waiter.send(reply);
        }
        known
    }

    /// Ends the connection: every request still waiting, and every later
    /// one, gets `report`.
    pub(crate) fn fail_all(&self, report: &Arc<ExitReport>) {
        let waiters = {
            let mut waiters = self.waiters.lock();
            waiters.closed = Some(Arc::clone(report));
            std::mem::take(&mut waiters.map)
        };
        for (_, waiter) in waiters {
            waiter.send(Reply::Died(Arc::clone(report)));
        }
    }
}

/// How late past its deadline a timed-out wait must wake for the host to
/// have stalled (a timer on a busy machine wakes within milliseconds).
const STALLED: Duration = Duration::from_millis(100);
/// The moment more such a wait gets.
const STALL_GRACE: Duration = Duration::from_millis(250);

/// The reply of a wait on `rx` that timed out at `deadline`, when it woke
/// long after it ([`STALLED`]): the host itself was stopped or starved (a
/// VM paused, `SIGSTOP`, a frozen cgroup), and an answer the runner sent
/// meanwhile is in the pipe, its reader thread about to hand it on; it
/// gets [`STALL_GRACE`]. A runner healthy through a 5 s pause of the
/// server was killed for "no hello within 5 s". A timeout the host waited
/// out awake is final (`None`).
pub(crate) fn after_a_stall<T>(rx: &Receiver<T>, deadline: Option<Instant>) -> Option<T> {
    let late = Instant::now().saturating_duration_since(deadline?);
    if late < STALLED {
        return None;
    }
    rx.recv_timeout(STALL_GRACE).ok()
}

/// A request's header as the parts it is written from: `head`, then
/// `tail`.
fn header_parts<'a>(head: &'a [u8], tail: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut header = Vec::with_capacity(1 + tail.len());
    header.push(head);
    header.extend_from_slice(tail);
    header
}

/// A non-blocking stream written with a deadline: a write that would block
/// waits (`poll(2)`) for room until the deadline, then fails with
/// [`io::ErrorKind::TimedOut`].
struct DeadlineWriter<'a> {
    inner: &'a mut dyn RequestStream,
    /// `None`: no deadline.
    deadline: Option<Instant>,
    /// Bytes written so far.
    written: usize,
}

impl Write for DeadlineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.inner.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(n) => {
                    self.written += n;
                    return Ok(n);
                }
                Err(e) => return Err(e),
            }
            let timeout = match self.deadline {
                None => None,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                    // Past what a timespec holds: no deadline worth the name.
                    Timespec::try_from(left).ok()
                }
            };
            let fd = self.inner.as_fd();
            let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
            match poll(&mut fds, timeout.as_ref()) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What a frame error means for the connection: `None` for a clean end.
fn frame_violation(e: FrameError, limit: u64) -> Option<String> {
    match e {
        FrameError::Eof => None,
        FrameError::TooLarge { len, .. } => Some(format!(
            "answer frame of {len} bytes exceeds the limit of {}",
            fmt_bytes(limit)
        )),
        other => Some(other.to_string()),
    }
}

/// `64 MiB`, `512 KiB`, `100 bytes`.
pub(crate) fn fmt_bytes(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests;
