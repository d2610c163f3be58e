//! The memory clients can make the server hold, bounded: the request
//! bodies of tool calls in progress and the frames of open streams, from
//! their first byte (`--body-memory`, and beside it a reserve of one body
//! at the limit for frames arriving while it is full), and the answers of tool calls waiting to be sent
//! (`--answer-memory`). Room is counted in KiB in a semaphore and taken
//! without waiting: a request that finds none is answered 503 at once
//! (waiting would hold the very memory the bound is for). A leaf: it knows
//! bytes and the run route's errors, nothing of plugins or HTTP.

use std::sync::Arc;

use axum::body::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RunError;

/// KiB of room, taken without waiting and given back as the permits drop.
#[derive(Debug)]
struct Room {
    free: Arc<Semaphore>,
    kib: usize,
}

impl Room {
    /// The room for things of at most `limit` bytes each: `memory` bytes,
    /// else eight at the limit, at least 256 MiB; never less than one at
    /// the limit (one that could never fit would be told to retry for
    /// ever): a `memory` below it is raised, with a warning (`what`).
    fn for_limit(limit: usize, memory: Option<usize>, what: &str) -> Self {
        if let Some(asked) = memory.filter(|&asked| asked < limit) {
            tracing::warn!("{what}: {limit} bytes apply ({asked} asked)");
        }
        Room::new(applied_memory(limit, memory))
    }

    /// Room for `bytes` bytes (rounded up to the KiB).
    fn new(bytes: usize) -> Self {
        let kib = bytes.div_ceil(1024).min(Semaphore::MAX_PERMITS);
        Room {
            free: Arc::new(Semaphore::new(kib)),
            kib,
        }
    }

    /// `kib` KiB, if they are free now.
    fn take(&self, kib: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(kib).ok()?;
        Arc::clone(&self.free).try_acquire_many_owned(n).ok()
    }
}

/// The bytes of memory `serve` sets aside for things of at most `limit`
/// bytes each (`--body-memory` for bodies of `--body-limit`,
/// `--answer-memory` for answers of `--max-response`) when `memory` is
/// asked: that, else eight at the limit, at least 256 MiB; never less than
/// one at the limit.
pub fn applied_memory(limit: usize, memory: Option<usize>) -> usize {
    memory
        .unwrap_or_else(|| limit.saturating_mul(8).max(256 << 20))
        .max(limit)
}

/// What the arrival reserve holds beyond one body at the limit: a frame's
/// head and the WebSocket layer's read ahead (its 128 KiB read buffer), so
/// that a frame of exactly the limit fits.
pub(crate) const RESERVE_SLACK: usize = 128 * 1024 + 1024;

/// Room in `--body-memory` that a call holds until its plugin returns
/// (then drops): a request body's, or a stream frame's
/// ([`crate::stream::FrameRoom`], which passes back to its stream's read
/// buffer). Only held: what it holds goes back as it drops.
#[derive(Debug)]
pub(crate) enum CallRoom {
    /// A run request's body's.
    Body { _held: OwnedSemaphorePermit },
    /// A stream frame's.
    Frame { _held: crate::stream::FrameRoom },
}

impl From<OwnedSemaphorePermit> for CallRoom {
    fn from(room: OwnedSemaphorePermit) -> Self {
        CallRoom::Body { _held: room }
    }
}

impl From<crate::stream::FrameRoom> for CallRoom {
    fn from(room: crate::stream::FrameRoom) -> Self {
        CallRoom::Frame { _held: room }
    }
}

/// The memory all tool calls' request bodies and streams' frames may hold
/// at once (room is counted in KiB, taken as bytes arrive: see
/// [`crate::body::receive`]). Without a bound, clients (who need no token
/// to send bodies) could make the server hold a body at the limit per
/// connection: 24 connections sending 32 MiB bodies they never finished
/// took it from 6 MiB to 784 MiB.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    room: Room,
    /// Room for one body at the limit beside the budget, for the messages
    /// streams are receiving while the budget is full (see
    /// [`crate::stream`]'s ledger): such a frame arrives whole and is
    /// answered `ServerBusy`, rather than ending its stream.
    reserve: Room,
}

impl BodyBudget {
    /// The budget for bodies of at most `body_limit` bytes: `memory` bytes,
    /// else eight bodies at the limit, at least 256 MiB; never less than one
    /// body at the limit (a body that could never fit would be told to
    /// retry for ever).
    pub(crate) fn new(body_limit: usize, memory: Option<usize>) -> Self {
        BodyBudget {
            room: Room::for_limit(
                body_limit,
                memory,
                "--body-memory is less than --body-limit",
            ),
            reserve: Room::new(body_limit.saturating_add(RESERVE_SLACK)),
        }
    }

    /// `kib` KiB of the arrival reserve, if they are free now.
    pub(crate) fn take_reserve(&self, kib: usize) -> Option<OwnedSemaphorePermit> {
        self.reserve.take(kib)
    }

    /// Room for `bytes` bytes, taken first from `held` (room its caller
    /// already holds: a stream's arguments being replaced, or the room a
    /// text message took as it arrived), the rest from
    /// the budget; on `BodiesInFlight`, `held` is handed back untouched.
    /// What `held` has beyond `bytes` is given back.
    pub(crate) fn charge_from(
        &self,
        bytes: usize,
        held: Option<OwnedSemaphorePermit>,
    ) -> Result<OwnedSemaphorePermit, (RunError, Option<OwnedSemaphorePermit>)> {
        let kib = bytes.div_ceil(1024);
        let Some(mut held) = held else {
            return self.take(kib).map_err(|e| (e, None));
        };
        let have = held.num_permits();
        if kib <= have {
            // The excess goes back to the budget as it drops.
            if let Some(rest) = held.split(have - kib) {
                drop(rest);
            }
            return Ok(held);
        }
        match self.take(kib - have) {
            Ok(more) => {
                held.merge(more);
                Ok(held)
            }
            Err(e) => Err((e, Some(held))),
        }
    }

    /// `kib` more KiB of room, or `BodiesInFlight`.
    pub(crate) fn take(&self, kib: usize) -> Result<OwnedSemaphorePermit, RunError> {
        self.room.take(kib).ok_or(RunError::BodiesInFlight {
            budget_kib: self.room.kib,
        })
    }

    /// The KiB free now.
    #[cfg(test)]
    pub(crate) fn available_kib(&self) -> usize {
        self.room.free.available_permits()
    }
}

/// Answers of at most this many bytes take no room in the answer budget,
/// so a budget that slow clients filled with large answers still lets
/// small ones out. What they hold waiting is bounded by the connection
/// cap instead (one answer a connection, four a stream).
pub(crate) const UNCHARGED_ANSWER: usize = 64 * 1024;

/// The memory the answers of tool calls may hold while they wait to be
/// sent. An answer is produced whole (a plugin's result, then its JSON or
/// multipart encoding) and then held until its client has read the last
/// byte: without a bound, clients that read slowly (or not at all) could
/// make the server hold an answer at the largest size per connection
/// (16 answers of 60 MiB took it to 1.4 GB). Its room is taken when the
/// encoded answer is ready and travels with its bytes ([`AnswerBudget::hold`]).
#[derive(Debug)]
pub(crate) struct AnswerBudget {
    room: Room,
}

impl AnswerBudget {
    /// The budget for answers: `memory` bytes, else eight answers of
    /// `max_response` bytes (the largest a runner may send), at least
    /// 256 MiB; never less than one such answer.
    pub(crate) fn new(max_response: usize, memory: Option<usize>) -> Self {
        AnswerBudget {
            room: Room::for_limit(
                max_response,
                memory,
                "--answer-memory is less than --max-response",
            ),
        }
    }

    /// Room for an answer of `bytes` bytes: `AnswersInFlight` when the
    /// answers waiting to be sent leave too little now, `AnswerTooLarge`
    /// when it could never fit (retrying would not help). An answer of at
    /// most [`UNCHARGED_ANSWER`] bytes takes none: the socket's buffer
    /// takes it whole, and a full budget must not refuse every answer.
    pub(crate) fn charge(&self, bytes: usize) -> Result<OwnedSemaphorePermit, RunError> {
        let kib = if bytes <= UNCHARGED_ANSWER {
            0
        } else {
            bytes.div_ceil(1024)
        };
        if kib > self.room.kib {
            return Err(RunError::AnswerTooLarge {
                bytes,
                budget_kib: self.room.kib,
            });
        }
        self.room.take(kib).ok_or(RunError::AnswersInFlight {
            budget_kib: self.room.kib,
        })
    }

    /// `bytes` as a buffer that gives `room` back when its last copy is
    /// dropped: when hyper has written it all, or the connection ended.
    pub(crate) fn hold<T>(bytes: T, room: OwnedSemaphorePermit) -> Bytes
    where
        T: AsRef<[u8]> + Send + 'static,
    {
        Bytes::from_owner(Held { bytes, _room: room })
    }

    /// The KiB free now.
    #[cfg(test)]
    pub(crate) fn available_kib(&self) -> usize {
        self.room.free.available_permits()
    }
}

/// Bytes and the room they hold.
struct Held<T> {
    bytes: T,
    _room: OwnedSemaphorePermit,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Held<T> {
    fn as_ref(&self) -> &[u8] {
        self.bytes.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_holds_its_room_until_its_last_copy_is_dropped() {
        const K: usize = 1024;
        let budget = AnswerBudget::new(256 * K, Some(400 * K));
        assert_eq!(budget.available_kib(), 400);
        let room = budget.charge(300 * K).unwrap();
        assert_eq!(budget.available_kib(), 100);
        let held = AnswerBudget::hold(vec![7u8; 300 * K], room);
        let part = held.slice(10..20);
        drop(held);
        assert_eq!(budget.available_kib(), 100, "a slice still holds it");
        assert_eq!(&part[..], &[7u8; 10]);
        // Too little room now: busy; more than the whole budget: too large.
        assert_eq!(
            budget.charge(200 * K).unwrap_err(),
            RunError::AnswersInFlight { budget_kib: 400 }
        );
        assert_eq!(
            budget.charge(401 * K).unwrap_err(),
            RunError::AnswerTooLarge {
                bytes: 401 * K,
                budget_kib: 400
            }
        );
        // A small answer takes no room: a full budget still lets it out.
        let _small = budget.charge(UNCHARGED_ANSWER).unwrap();
        assert_eq!(budget.available_kib(), 100);
        drop(part);
        assert_eq!(budget.available_kib(), 400);
        assert!(budget.charge(400 * K).is_ok());
    }

    #[test]
    fn the_default_budgets_hold_eight_at_the_limit_and_never_less_than_one() {
        let mib = 1 << 20;
        assert_eq!(
            AnswerBudget::new(64 * mib, None).available_kib(),
            512 * 1024
        );
        assert_eq!(AnswerBudget::new(mib, None).available_kib(), 256 * 1024);
        assert_eq!(AnswerBudget::new(mib, Some(1024)).available_kib(), 1024);
        assert_eq!(BodyBudget::new(64 * mib, None).available_kib(), 512 * 1024);
        assert_eq!(BodyBudget::new(mib, Some(1024)).available_kib(), 1024);
    }
}
