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
//! to it ([`Ledger::claim`]) and what else was charged is given back: what
//! the WebSocket layer still holds then is at most the rest of one read (its
//! read buffer), bounded per connection as hyper's are.
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
        let have = permits(held.room.as_ref()) + permits(held.reserve.as_ref());
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

    /// A message of `len` bytes came out of what was read: its room (what
    /// the budget gave for up to `len` bytes; the reserve's is given back,
    /// so the message may find none and be answered busy), and the rest
    /// given back.
    pub(crate) fn claim(&self, len: usize) -> Option<OwnedSemaphorePermit> {
        let mut held = self.held();
        if held.draining {
            return None;
        }
        held.bytes = 0;
        held.reserve = None;
        let mut room = held.room.take()?;
        let keep = len.div_ceil(1024);
        let have = room.num_permits();
        if have > keep {
            drop(room.split(have - keep));
        }
        (keep > 0).then_some(room)
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
        let need = held.bytes.div_ceil(1024);
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
        let config = ServerConfig {
            body_limit: 64 * K,
            body_memory: Some(64 * K),
            ..ServerConfig::default()
        };
        Ledger::new(AppState::new(Arc::new(crate::build_loader(&[])), &config))
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
        let room = ledger.claim(25 * K).expect("its room");
        assert_eq!(room.num_permits(), 25);
        assert_eq!(free_kib(&ledger), 39);
        drop(room);
        assert_eq!(free_kib(&ledger), 64);
    }

    #[test]
    fn a_stream_holding_more_than_twice_the_limit_unfinished_is_refused() {
        let config = ServerConfig {
            body_limit: 64 * K,
            body_memory: Some(1024 * K),
            ..ServerConfig::default()
        };
        let ledger = Ledger::new(AppState::new(Arc::new(crate::build_loader(&[])), &config));
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
        assert!(ledger.claim(10).is_none(), "refused: no message comes out");
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
