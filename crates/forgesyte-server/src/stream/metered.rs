//! What a stream's client has sent that no message has taken yet, charged
//! to `--body-memory` as it arrives.
//!
//! The WebSocket layer gathers a message (a frame, up to the body limit)
//! before the session sees it: without this, a client could make the server
//! hold a message at the limit per open stream (each stream's partial
//! message for up to the idle timeout), which the budget never saw.
//! [`Metered`] sits under the WebSocket layer and charges every byte read
//! to the stream's [`Ledger`]: first from the body budget, then, when it
//! has no room, from the arrival reserve (room for one body at the limit
//! and what its reading brings beside it, shared by all streams), so that
//! a frame that arrives while the budget is full can still be answered
//! `ServerBusy` rather than end its stream. When
//! neither has room, the stream is refused: its reader is told
//! ([`Ledger::refused`]), and what the client sends from then on is read
//! and dropped, never gathered. When a message comes out, its room passes
//! to it ([`Ledger::claim_frame`]) and what else was charged is given back.
//!
//! What the WebSocket layer keeps is charged too: its read buffer grows to
//! hold a whole message and never shrinks (tungstenite keeps the capacity
//! of the largest message it gathered until the connection ends: twelve
//! streams that each received one 16 MiB frame, then only small ones, held
//! 190 MiB the budget never saw). Beyond the buffer's first
//! [`READ_BUFFER`] bytes, which every connection has, that capacity keeps
//! room of its own (`kept`) until the stream ends: a frame's room passes to
//! it when the frame is done ([`FrameRoom`]), whether or not other frames
//! are still in use, a text message's as it comes out, and what the stream
//! gathers next fills it before it takes more (while no frame is in use: a
//! frame shares the buffer's memory, and what is read meanwhile goes to new
//! memory). When the kept buffer needs more room than that brings, it takes
//! it from the budget (not the reserve, which is for what arrives); with
//! none there, the stream is refused. Only what frames in use hold room for
//! (`covered`: what one borrowed of the kept room, what each grew the
//! buffer by) is not asked for again until they are done: twenty streams
//! that each kept a small frame in use after a 30 MB one held 588 MiB of
//! buffers in a budget of 64 MiB, charged to nothing, while the kept buffer
//! waited for no frame to be in use.
//!
//! A leaf of the stream module: it knows the budgets, not the protocol.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::error::RunError;
use crate::state::AppState;

/// The read buffer every connection has, uncharged (tungstenite's
/// default `read_buffer_size`, which the stream's configuration keeps).
pub(crate) const READ_BUFFER: usize = 128 * 1024;

/// The bytes of one stream read and not yet taken by a message, and their
/// room.
#[derive(Debug)]
pub(crate) struct Ledger {
    state: AppState,
    held: Mutex<Held>,
    refused: Notify,
}

#[derive(Debug, Default)]
struct Held {
    /// Bytes read since the last message came out.
    bytes: usize,
    /// Their room in the body budget.
    room: Option<OwnedSemaphorePermit>,
    /// Their room in the arrival reserve, when the budget had none.
    reserve: Option<OwnedSemaphorePermit>,
    /// Room for what the WebSocket layer's read buffer keeps beyond
    /// [`READ_BUFFER`] (see the module's documentation).
    kept: Option<OwnedSemaphorePermit>,
    /// The KiB `kept` is to hold: the largest message gathered so far,
    /// beyond [`READ_BUFFER`].
    keep: usize,
    /// Frames claimed and still in use ([`FrameRoom`]s alive).
    frames: usize,
    /// The KiB of `keep` that frames in use hold room for, until they are
    /// done: what one borrowed of `kept` (it was read into the kept
    /// buffer, whose memory it shares) and what each grew it by (the
    /// buffer grew to hold it).
    covered: usize,
    /// Why the stream was refused, until its reader takes it.
    refusal: Option<RunError>,
    /// Refused: reads are dropped from then on.
    draining: bool,
}

impl Ledger {
    pub(crate) fn new(state: AppState) -> Arc<Ledger> {
        Arc::new(Ledger {
            state,
            held: Mutex::new(Held::default()),
            refused: Notify::new(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most one stream may hold read and not yet taken by a message:
    /// a message at the limit, its fragments' heads and the read ahead
    /// need at most the limit and [`RESERVE_SLACK`](crate::budget::RESERVE_SLACK)
    /// with fragments of 14 bytes or more; twice the limit leaves room for
    /// any fragmenting a client means. More is a client filling the budget
    /// with what never becomes a message (empty fragments, pongs with
    /// padded lengths).
    fn most_held(&self) -> usize {
        self.state
            .body_limit()
            .saturating_mul(2)
            .saturating_add(crate::budget::RESERVE_SLACK)
    }

    /// Charges `n` bytes just read; `false` when there is no room for them,
    /// or the stream holds more than [`most_held`](Self::most_held) (the
    /// stream is then refused, and its reader told).
    fn read(&self, n: usize) -> bool {
        let mut held = self.held();
        if held.draining {
            return false;
        }
        held.bytes = held.bytes.saturating_add(n);
        let have = permits(held.room.as_ref()) + permits(held.reserve.as_ref()) + held.kept_free();
        let need = held.bytes.div_ceil(1024);
        if need <= have {
            return true;
        }
        let more = need - have;
        let budget = self.state.body_budget();
        match budget.take(more) {
            Ok(room) => merge(&mut held.room, room),
            Err(busy) => match budget.take_reserve(more) {
                Some(room) => merge(&mut held.reserve, room),
                None => return self.refuse(&mut held, busy),
            },
        }
        let most = self.most_held();
        if held.bytes > most {
            return self.refuse(&mut held, RunError::PayloadTooLarge { limit: most });
        }
        true
    }

    /// Refuses the stream for `why`: its reader is told, and what it reads
    /// from now on is dropped.
    fn refuse(&self, held: &mut Held, why: RunError) -> bool {
        held.refusal = Some(why);
        held.draining = true;
        self.refused.notify_one();
        false
    }

    /// A message of `len` bytes that is no frame (a text message; or none,
    /// at the stream's end) came out of what was read: the read buffer
    /// keeps its room from what the reads took, the rest is given back.
    pub(crate) fn claim(&self, len: usize) {
        let mut held = self.held();
        if held.draining {
            return;
        }
        held.bytes = 0;
        held.note_kept(len);
        held.reserve = None;
        let from_reads = held.room.take();
        self.settle_kept(&mut held, from_reads);
    }

    /// A frame of `len` bytes came out of what was read: its room, for up
    /// to `len` bytes (what the reads took, and the kept buffer's room the
    /// frame was read into; the reserve's is given back, so the frame may
    /// find too little and be answered busy: [`FrameRoom::top_up`]); the
    /// rest is given back. `None` once the stream was refused.
    pub(crate) fn claim_frame(self: &Arc<Self>, len: usize) -> Option<FrameRoom> {
        let mut held = self.held();
        if held.draining {
            return None;
        }
        held.bytes = 0;
        let kept_before = held.keep;
        held.note_kept(len);
        let mut covers = held.keep - kept_before;
        held.reserve = None;
        let want = len.div_ceil(1024);
        let mut room = take_up_to(&mut held.room, want);
        let short = want - permits(room.as_ref());
        if held.frames == 0
            && let Some(lent) = take_up_to(&mut held.kept, short)
        {
            covers += lent.num_permits();
            merge(&mut room, lent);
        }
        held.covered += covers;
        held.room = None;
        held.frames += 1;
        Some(FrameRoom {
            room,
            covers,
            ledger: Arc::clone(self),
        })
    }

    /// A frame that covered `covers` KiB of the kept buffer is done with:
    /// its room passes to the kept buffer (the buffer's memory it shared,
    /// or that it grew, is the buffer's alone now), even while other frames
    /// are in use (they hold room for their own bytes only); what that
    /// does not need is given back.
    fn frame_done(&self, room: Option<OwnedSemaphorePermit>, covers: usize) {
        let mut held = self.held();
        held.frames = held.frames.saturating_sub(1);
        held.covered = held.covered.saturating_sub(covers);
        if held.draining {
            return;
        }
        self.settle_kept(&mut held, room);
    }

    /// Brings the kept buffer's room to what it is to hold (less what
    /// frames in use hold room for: `covered`), from `from`
    /// first (the room of what the buffer held), then the budget; the rest
    /// of `from` is given back. Refuses the stream when
    /// there is no room anywhere: the memory is held, and only the
    /// stream's end gives it back.
    fn settle_kept(&self, held: &mut Held, mut from: Option<OwnedSemaphorePermit>) {
        let target = held.keep.saturating_sub(held.covered);
        let grow = target.saturating_sub(permits(held.kept.as_ref()));
        if let Some(room) = take_up_to(&mut from, grow) {
            merge(&mut held.kept, room);
        }
        drop(from);
        let short = target.saturating_sub(permits(held.kept.as_ref()));
        if short == 0 {
            return;
        }
        // Not from the reserve: it is for what arrives while the budget
        // is full (and its room is of another semaphore, which a frame's
        // room lent from the kept buffer could not be merged with).
        match self.state.body_budget().take(short) {
            Ok(room) => merge(&mut held.kept, room),
            Err(busy) => {
                self.refuse(held, busy);
            }
        }
    }

    /// `n` bytes read are gone (a ping's or pong's frame, which the
    /// WebSocket layer answered and dropped): their room is given back,
    /// the reserve's first. What a message still being gathered holds
    /// stays counted.
    pub(crate) fn release(&self, n: usize) {
        let mut held = self.held();
        if held.draining {
            return;
        }
        held.bytes = held.bytes.saturating_sub(n);
        // What the kept buffer covers needs no room of its own (its room
        // stays until the stream ends).
        let need = held.bytes.div_ceil(1024).saturating_sub(held.kept_free());
        let mut excess =
            (permits(held.room.as_ref()) + permits(held.reserve.as_ref())).saturating_sub(need);
        let held = &mut *held;
        for room in [&mut held.reserve, &mut held.room] {
            let Some(permit) = room.as_mut() else {
                continue;
            };
            let have = permit.num_permits();
            let give = excess.min(have);
            if give == have {
                *room = None;
            } else if give > 0 {
                drop(permit.split(give));
            }
            excess -= give;
        }
    }

    /// Whether the stream was refused (what it reads is dropped).
    pub(crate) fn is_draining(&self) -> bool {
        self.held().draining
    }

    /// Returns, with why, once the stream was refused for want of room.
    pub(crate) async fn refused(&self) -> RunError {
        loop {
            if let Some(why) = self.held().refusal.take() {
                return why;
            }
            self.refused.notified().await;
        }
    }
}

impl Held {
    /// The kept buffer's room that covers what is read: all of it while no
    /// frame is in use, none while one is (what is read then goes to new
    /// memory).
    fn kept_free(&self) -> usize {
        if self.frames == 0 {
            permits(self.kept.as_ref())
        } else {
            0
        }
    }

    /// A message of `len` bytes was gathered: the read buffer keeps room
    /// for it from now on (its capacity grew to hold it whole). Its length,
    /// not all that was read since the last message: what was read ahead
    /// of the next one made a stream of back-to-back messages keep more
    /// than it holds.
    fn note_kept(&mut self, len: usize) {
        self.keep = self
            .keep
            .max(len.saturating_sub(READ_BUFFER).div_ceil(1024));
    }
}

/// A frame's room in `--body-memory` (see [`Ledger::claim_frame`]), held
/// until the plugin returns (or the frame is dropped); then it passes to
/// its stream's read buffer, whose memory the frame shared.
#[derive(Debug)]
pub(crate) struct FrameRoom {
    room: Option<OwnedSemaphorePermit>,
    /// The KiB of the kept buffer its room stands for (see
    /// `Held::covered`).
    covers: usize,
    ledger: Arc<Ledger>,
}

impl FrameRoom {
    /// Room for all of the frame's `bytes`: what it lacks taken from the
    /// budget; on `BodiesInFlight` the frame is refused (its room passes
    /// back as it drops).
    pub(crate) fn top_up(mut self, bytes: usize) -> Result<FrameRoom, RunError> {
        let short = bytes
            .div_ceil(1024)
            .saturating_sub(permits(self.room.as_ref()));
        if short > 0 {
            let more = self.ledger.state.body_budget().take(short)?;
            merge(&mut self.room, more);
        }
        Ok(self)
    }
}

impl Drop for FrameRoom {
    fn drop(&mut self) {
        self.ledger.frame_done(self.room.take(), self.covers);
    }
}

/// Up to `kib` of `from`'s room, taken out of it.
fn take_up_to(from: &mut Option<OwnedSemaphorePermit>, kib: usize) -> Option<OwnedSemaphorePermit> {
    let have = permits(from.as_ref());
    if kib == 0 || have == 0 {
        return None;
    }
    if kib >= have {
        return from.take();
    }
    from.as_mut().and_then(|room| room.split(kib))
}

fn permits(room: Option<&OwnedSemaphorePermit>) -> usize {
    room.map_or(0, OwnedSemaphorePermit::num_permits)
}

fn merge(into: &mut Option<OwnedSemaphorePermit>, more: OwnedSemaphorePermit) {
    match into {
        Some(room) => room.merge(more),
        None => *into = Some(more),
    }
}

pin_project_lite::pin_project! {
    /// A connection whose reads are charged to a [`Ledger`]; writes pass
    /// through.
    pub(crate) struct Metered<IO> {
        #[pin]
        io: IO,
        ledger: Arc<Ledger>,
    }
}

impl<IO> Metered<IO> {
    pub(crate) fn new(io: IO, ledger: Arc<Ledger>) -> Self {
        Metered { io, ledger }
    }

    /// The connection beneath, whose reads are charged to nothing.
    pub(crate) fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }
}

impl<IO: AsyncRead> AsyncRead for Metered<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        loop {
            let before = buf.filled().len();
            std::task::ready!(this.io.as_mut().poll_read(cx, buf))?;
            let read = buf.filled().len() - before;
            if read == 0 || this.ledger.read(read) {
                return Poll::Ready(Ok(()));
            }
            // Refused: what came is dropped, and so is all that follows,
            // until the client's end (or the stream's, which its reader
            // decides). The WebSocket layer is never handed it.
            buf.set_filled(before);
        }
    }
}

impl<IO: AsyncWrite> AsyncWrite for Metered<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerConfig;

    const K: usize = 1024;

    /// A ledger over 64 KiB of body memory (bodies of at most 64 KiB: the
    /// reserve holds 64 KiB and its slack beside).
    fn ledger() -> Arc<Ledger> {
        Ledger::new(state(64, 64))
    }

    /// A server's state with bodies of `limit` KiB, `memory` KiB of them
    /// in all.
    fn state(limit: usize, memory: usize) -> AppState {
        let config = ServerConfig {
            body_limit: limit * K,
            body_memory: Some(memory * K),
            ..ServerConfig::default()
        };
        AppState::new(Arc::new(crate::build_loader(&[])), &config)
    }

    fn free_kib(ledger: &Ledger) -> usize {
        ledger.state.body_budget().available_kib()
    }

    #[test]
    fn reads_take_room_as_they_come_and_a_message_takes_its_own() {
        let ledger = ledger();
        assert!(ledger.read(10 * K));
        assert!(ledger.read(20 * K));
        assert_eq!(free_kib(&ledger), 34);
        // A ping's frame read since is given back; the message so far
        // stays counted.
        assert!(ledger.read(106));
        assert_eq!(free_kib(&ledger), 33);
        ledger.release(106);
        assert_eq!(free_kib(&ledger), 34);
        // The message came out (25 KiB of the 30 read): its room passes
        // to it, the rest comes back.
        let room = ledger.claim_frame(25 * K).expect("its room");
        assert_eq!(permits(room.room.as_ref()), 25);
        assert_eq!(free_kib(&ledger), 39);
        drop(room);
        assert_eq!(free_kib(&ledger), 64);
    }

    /// The read buffer keeps the capacity of the largest message beyond
    /// its first 128 KiB: a frame's room passes to it when the frame is
    /// done, and stays until the stream ends; what the stream reads next
    /// fills it first.
    #[test]
    fn what_the_read_buffer_keeps_of_a_large_message_stays_charged() {
        let ledger = Ledger::new(state(1024, 4096));
        assert!(ledger.read(512 * K));
        let room = ledger.claim_frame(512 * K).expect("its room");
        assert_eq!(permits(room.room.as_ref()), 512);
        assert_eq!(free_kib(&ledger), 4096 - 512, "the frame's room alone");
        // Done with: the buffer keeps 384 KiB of its room.
        drop(room);
        assert_eq!(free_kib(&ledger), 4096 - 384, "the buffer's room stays");
        // A smaller frame fills the kept buffer (no room taken as it is
        // read) and borrows the buffer's room while it is in use.
        assert!(ledger.read(300 * K));
        assert_eq!(free_kib(&ledger), 4096 - 384);
        let room = ledger.claim_frame(300 * K).expect("its room");
        assert_eq!(permits(room.room.as_ref()), 300);
        assert_eq!(free_kib(&ledger), 4096 - 384);
        // While it is in use, what is read goes to new memory: charged.
        assert!(ledger.read(100 * K));
        assert_eq!(free_kib(&ledger), 4096 - 484);
        ledger.release(100 * K);
        drop(room);
        assert_eq!(free_kib(&ledger), 4096 - 384);
        // A text message larger than all before grows what is kept.
        assert!(ledger.read(1000 * K));
        ledger.claim(1000 * K);
        assert_eq!(free_kib(&ledger), 4096 - 872);
        // The stream's end gives it all back.
        let state = ledger.state.clone();
        drop(ledger);
        assert_eq!(state.body_budget().available_kib(), 4096);
    }

    /// A large frame done while a later one is still in use passes its
    /// room to the kept buffer at once (a stream that always had a small
    /// frame in use kept its buffer charged to nothing); without room for
    /// it, the stream is refused. The frame that borrowed the kept room
    /// is not charged for twice.
    #[test]
    fn a_frame_done_while_another_is_in_use_leaves_its_buffer_charged() {
        let state = state(1024, 2048);
        let ledger = Ledger::new(state.clone());
        assert!(ledger.read(1024 * K));
        let large = ledger.claim_frame(1024 * K).expect("its room");
        assert!(ledger.read(K));
        let small = ledger.claim_frame(K).expect("its room");
        assert_eq!(free_kib(&ledger), 2048 - 1025);
        // The large frame holds room for the buffer it grew: a text
        // message meanwhile asks none for it.
        assert!(ledger.read(K));
        ledger.claim(K);
        assert_eq!(free_kib(&ledger), 2048 - 1025);
        drop(large);
        assert_eq!(free_kib(&ledger), 2048 - 896 - 1, "kept at once");
        drop(small);
        assert_eq!(free_kib(&ledger), 2048 - 896);
        // A frame read into the kept buffer borrows its room; one done
        // meanwhile asks none of it again.
        assert!(ledger.read(600 * K));
        let borrower = ledger.claim_frame(600 * K).expect("its room");
        assert!(ledger.read(K));
        let small = ledger.claim_frame(K).expect("its room");
        drop(small);
        assert_eq!(free_kib(&ledger), 2048 - 896);
        drop(borrower);
        assert_eq!(free_kib(&ledger), 2048 - 896);
        // A second stream's large frame arrives in the reserve (a call
        // holds 400 KiB), is refused busy while its small one is in use,
        // and its buffer finds no room either: the stream is refused.
        let call = state.body_budget().take(400).expect("room");
        let other = Ledger::new(state.clone());
        assert!(other.read(K));
        let small = other.claim_frame(K).expect("its room");
        assert!(other.read(1024 * K));
        let large = other.claim_frame(1024 * K).expect("its room");
        assert!(large.top_up(1024 * K).is_err(), "busy");
        assert!(other.is_draining(), "its buffer found no room");
        drop((small, other, call, ledger));
        assert_eq!(state.body_budget().available_kib(), 2048);
    }

    /// What was read ahead of the next message is not kept as the last
    /// one's: back-to-back messages of 140 KiB keep 12 KiB, not what the
    /// reads brought (a stream of pipelined messages was refused for it).
    #[test]
    fn what_is_read_ahead_is_not_kept() {
        let ledger = Ledger::new(state(1024, 4096));
        assert!(ledger.read(140 * K + 100 * K));
        ledger.claim(140 * K);
        assert_eq!(free_kib(&ledger), 4096 - 12);
    }

    /// Kept buffers take what room the budget has; with none left their
    /// stream is refused: twelve streams of one large message each hold no
    /// more than the budget.
    #[test]
    fn kept_buffers_without_room_refuse_their_streams() {
        let state = state(1024, 2048);
        let streams: Vec<Arc<Ledger>> = (0..12).map(|_| Ledger::new(state.clone())).collect();
        for ledger in &streams {
            if ledger.read(1024 * K) {
                ledger.claim(1024 * K);
            }
        }
        let kept = streams.iter().filter(|l| !l.is_draining()).count();
        // 896 KiB kept each: two in the budget.
        assert_eq!(kept, 2);
        assert_eq!(state.body_budget().available_kib(), 2048 - 2 * 896);
        drop(streams);
        assert_eq!(state.body_budget().available_kib(), 2048);
    }

    #[test]
    fn a_stream_holding_more_than_twice_the_limit_unfinished_is_refused() {
        let ledger = Ledger::new(state(64, 1024));
        // Twice the limit and the slack (257 KiB) of empty fragments'
        // heads, say: room enough in the budget, but never a message.
        assert!(ledger.read(250 * K));
        assert!(ledger.read(7 * K));
        assert!(!ledger.read(1));
        assert!(ledger.is_draining());
        let refusal = ledger.held().refusal.clone().expect("why it was refused");
        assert_eq!(refusal, RunError::PayloadTooLarge { limit: 257 * K });
    }

    #[test]
    fn past_the_budget_the_reserve_then_a_refusal_that_drops_what_follows() {
        let ledger = ledger();
        assert!(ledger.read(60 * K));
        // 4 KiB of budget left, too little: the reserve takes the 60 more.
        assert!(ledger.read(60 * K));
        assert_eq!(free_kib(&ledger), 4);
        // Given back by a ping's release: the reserve's first.
        ledger.release(30 * K);
        assert_eq!(free_kib(&ledger), 4);
        ledger.release(60 * K);
        assert_eq!(free_kib(&ledger), 34);
        // The reserve (64 KiB and its 129 KiB of slack) runs out too:
        // refused.
        assert!(ledger.read(30 * K));
        assert!(ledger.read(150 * K));
        assert_eq!(free_kib(&ledger), 4);
        assert!(!ledger.read(100 * K));
        assert!(ledger.is_draining());
        assert!(
            ledger.claim_frame(10).is_none(),
            "refused: no message comes out"
        );
        let refusal = ledger.held().refusal.clone().expect("why it was refused");
        assert!(
            matches!(refusal, RunError::BodiesInFlight { .. }),
            "{refusal:?}"
        );
        // Its room comes back with the ledger (the stream's end).
        let state = ledger.state.clone();
        drop(ledger);
        assert_eq!(state.body_budget().available_kib(), 64);
    }
}
