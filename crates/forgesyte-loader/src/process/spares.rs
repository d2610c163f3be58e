//! A small stock of spare memory files for the host's shared attachments
//! (`PROTOCOL.md` §3.1, "Spare memory files"). Writing 8 MB into a new
//! memory file makes the kernel allocate and zero 2,048 pages on the
//! request's path; a spare has its pages allocated in advance by a
//! background thread, so the request only copies into them, then seals the
//! file exactly as a fresh one. The wire does not change: every attachment
//! is still a new, fully sealed file, held by one runner for one call.
//!
//! The same thread also closes the host's copies of sent files once their
//! call is answered ([`Retire`]), and drops received frames that map large
//! shared attachments ([`drop_frame`]): the close or unmapping of a file's
//! last copy frees its pages, which is then neither on the runner's nor the
//! host's request path.
//!
//! This module owns the stock and its filler thread. It knows nothing of
//! runners or sockets: [`sealed`] is a drop-in for [`shm::sealed`],
//! [`Retire`] takes an [`Outgoing`] frame's files and [`drop_frame`] a
//! [`Frame`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use forgesyte_protocol::wire::Frame;
use forgesyte_protocol::wire::shm::{self, Outgoing};
use parking_lot::{Condvar, Mutex};

const MIB: u64 = 1 << 20;
/// Attachments from this size take a spare; smaller ones cost little to
/// put in a fresh file.
pub(crate) const SPARE_MIN_BYTES: u64 = MIB;
/// What the stock holds at most, all spares together (and so the largest
/// attachment that takes a spare). Idle, the host keeps this much memory.
pub(crate) const STOCK_MAX_BYTES: u64 = 32 * MIB;
/// How many spares the stock holds at most.
pub(crate) const STOCK_MAX_FILES: usize = 2;

#[derive(Default)]
struct Stock {
    /// Spares ready, oldest first: (capacity, file).
    ready: VecDeque<(u64, OwnedFd)>,
    /// Capacities to make, in order.
    wanted: VecDeque<u64>,
    /// What the filler drops: sent files whose last copy it closes, and
    /// received frames whose memory-file mappings it unmaps.
    retired: Vec<Box<dyn Send>>,
    filler_started: bool,
}

impl Stock {
    /// Starts the filler thread the first time; whether it runs.
    fn start_filler(&mut self) -> bool {
        if !self.filler_started {
            self.filler_started = std::thread::Builder::new()
                .name("forgesyte-spares".into())
                .spawn(fill)
                .is_ok();
        }
        self.filler_started
    }
}

struct Shared {
    stock: Mutex<Stock>,
    wake: Condvar,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        stock: Mutex::new(Stock::default()),
        wake: Condvar::new(),
    })
}

/// The capacity of the spare an attachment of `len` bytes takes: whole
/// MiB; `None` when it takes none (too small or too large).
pub(super) fn class(len: u64) -> Option<u64> {
    (SPARE_MIN_BYTES..=STOCK_MAX_BYTES)
        .contains(&len)
        .then(|| len.div_ceil(MIB) * MIB)
}

/// A new sealed memory file holding `bytes`, as [`shm::sealed`]: from a
/// spare of its size class when one is ready (and then a new spare of that
/// class is asked of the filler), else a fresh file (and a spare of its
/// class is asked for the next attachment of that size).
pub(crate) fn sealed(bytes: &[u8]) -> io::Result<OwnedFd> {
    // A body received straight into a memory file is that file already.
    if let Some(file) = super::received::file_of(bytes) {
        return file;
    }
    let Some(capacity) = class(bytes.len() as u64) else {
        return shm::sealed(bytes);
    };
    let sealed = match take(capacity) {
        Some(spare) => shm::seal_spare(spare, bytes).or_else(|_| shm::sealed(bytes)),
        None => shm::sealed(bytes),
    };
    // Asked for after the copy: the filler zeroes pages, and would take
    // memory bandwidth and a core from the copy on a small machine.
    want(capacity);
    sealed
}

/// A ready spare of `capacity` (a size class, [`class`]), for a body
/// received straight into it (`received.rs`); `None` when none is ready
/// (one is then asked for the next).
pub(super) fn take_ready(capacity: u64) -> Option<OwnedFd> {
    let spare = take(capacity);
    if spare.is_none() {
        want(capacity);
    }
    spare
}

/// Closes `fd`, a memory file of at least [`SPARE_MIN_BYTES`], on the
/// filler thread (the close of its last copy frees its pages).
pub(super) fn close_later(fd: OwnedFd) {
    drop_later(Box::new(fd));
}

/// A ready spare of `capacity`, if any.
fn take(capacity: u64) -> Option<OwnedFd> {
    let mut stock = shared().stock.lock();
    stock
        .ready
        .iter()
        .position(|(c, _)| *c == capacity)
        .and_then(|i| stock.ready.remove(i))
        .map(|(_, fd)| fd)
}

/// Asks the filler for a spare of `capacity` (starting it the first time):
/// after an attachment's copy, or to replace a spare a body took.
pub(super) fn want(capacity: u64) {
    let shared = shared();
    let mut stock = shared.stock.lock();
    if !stock.wanted.contains(&capacity) {
        stock.wanted.push_back(capacity);
    }
    if !stock.start_filler() {
        // Without a thread, no spare is ever made: fresh files, as before.
        stock.wanted.clear();
    }
    shared.wake.notify_one();
}

/// Whether letting go of the last copy of a memory file of `len` bytes
/// (its pages freed) is worth the filler thread: from [`SPARE_MIN_BYTES`].
fn frees_slowly(len: usize) -> bool {
    len as u64 >= SPARE_MIN_BYTES
}

/// Drops `thing` on the filler thread (started if need be), or here when
/// there is none: for what frees a memory file's pages.
pub(super) fn drop_later(thing: Box<dyn Send>) {
    let shared = shared();
    let mut stock = shared.stock.lock();
    if stock.start_filler() {
        stock.retired.push(thing);
        shared.wake.notify_one();
    }
    // Else `thing` drops here, after the lock, as it always did.
}

/// Drops a received frame: on the filler thread when it holds a mapping of
/// a shared attachment of at least [`SPARE_MIN_BYTES`] (unmapping the last
/// copy frees the file's pages: about 2 ms for 8 MB on a slow VM, which on
/// an async runtime's thread would hold up every request it serves), else
/// here.
pub(crate) fn drop_frame(frame: Frame) {
    let large = (0..frame.attachment_count())
        .any(|i| frame.is_shared(i) && frame.attachment(i).is_some_and(|a| frees_slowly(a.len())));
    if large {
        drop_later(Box::new(frame));
    }
}

/// The filler thread: makes the spares wanted, one at a time, and keeps
/// the stock within its bounds (the oldest spares go first). It runs at a
/// lower priority (nice 10) than the threads serving requests, whose work
/// it only prepares.
fn fill() {
    // Best effort: at the default priority it only competes more.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
    let shared = shared();
    loop {
        let (retired, capacity) = {
            let mut stock = shared.stock.lock();
            loop {
                let retired = std::mem::take(&mut stock.retired);
                let capacity = stock.wanted.pop_front();
                if !retired.is_empty() || capacity.is_some() {
                    break (retired, capacity);
                }
                shared.wake.wait(&mut stock);
            }
        };
        // Closed first: their pages are what the next spare may need.
        drop(retired);
        let Some(capacity) = capacity else {
            continue;
        };
        // Outside the lock: this is the slow part. A spare that cannot be
        // made (memory limit) leaves the next attachment a fresh file.
        let Ok(fd) = shm::spare(capacity) else {
            continue;
        };
        let mut stock = shared.stock.lock();
        stock.ready.push_back((capacity, fd));
        while stock.ready.len() > STOCK_MAX_FILES
            || stock.ready.iter().map(|(c, _)| c).sum::<u64>() > STOCK_MAX_BYTES
        {
            stock.ready.pop_front();
        }
    }
}

/// The host's copies of one frame's memory files, closed when this is
/// dropped: those of at least [`SPARE_MIN_BYTES`] by the filler thread
/// (the close of a file's last copy frees its pages, about 2 ms for 8 MB
/// on a slow VM), smaller ones at once.
#[derive(Debug)]
pub(crate) struct Retire(Vec<OwnedFd>);

impl Retire {
    /// The files of `outgoing`, whose attachments were `attachments`.
    pub(crate) fn new(outgoing: Outgoing, attachments: &[&[u8]]) -> Retire {
        Retire(
            outgoing
                .into_files()
                .into_iter()
                .filter(|(i, _)| attachments.get(*i).is_some_and(|a| frees_slowly(a.len())))
                .map(|(_, fd)| fd)
                .collect(),
        )
    }
}

impl Drop for Retire {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            drop_later(Box::new(std::mem::take(&mut self.0)));
        }
    }
}

/// The spares ready now (for tests and diagnostics).
#[cfg(test)]
pub(crate) fn ready() -> Vec<u64> {
    shared()
        .stock
        .lock()
        .ready
        .iter()
        .map(|(c, _)| *c)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use forgesyte_protocol::wire::shm::Mapping;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    #[test]
    fn size_classes_are_whole_mib_within_the_stock() {
        assert_eq!(class(MIB - 1), None);
        assert_eq!(class(MIB), Some(MIB));
        assert_eq!(class(MIB + 1), Some(2 * MIB));
        assert_eq!(class(8 * MIB), Some(8 * MIB));
        assert_eq!(class(STOCK_MAX_BYTES), Some(STOCK_MAX_BYTES));
        assert_eq!(class(STOCK_MAX_BYTES + 1), None);
    }

    #[test]
    fn the_second_attachment_of_a_size_takes_a_spare_and_reads_the_same() {
        // 3 MiB + a bit: class 4 MiB, which no other test of this module
        // uses (the stock is the process's).
        let data: Vec<u8> = (0..3 * MIB as usize + 5).map(|i| (i % 253) as u8).collect();
        let first = sealed(&data).unwrap();
        // A small one never takes a spare.
        let small = sealed(&data[..1000]).unwrap();
        assert!(*Mapping::of_sealed(small, u64::MAX).unwrap() == data[..1000]);
        assert!(*Mapping::of_sealed(first, u64::MAX).unwrap() == data[..]);
        // The filler makes a 4 MiB spare.
        let since = Instant::now();
        while !ready().contains(&(4 * MIB)) {
            assert!(since.elapsed() < Duration::from_secs(10), "no spare made");
            std::thread::sleep(Duration::from_millis(5));
        }
        let other: Vec<u8> = data.iter().map(|b| b ^ 0x5A).collect();
        let second = sealed(&other).unwrap();
        let name = |fd: &OwnedFd| {
            use std::os::fd::AsRawFd;
            std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .unwrap()
                .to_string_lossy()
                .into_owned()
        };
        assert!(
            name(&second).contains(shm::SPARE_MEMFD_NAME),
            "{}",
            name(&second)
        );
        // The spare was taken (a new one may already be ready again: at
        // most one of its class).
        assert!(ready().iter().filter(|c| **c == 4 * MIB).count() <= 1);
        // Sealed like a fresh file: cut to length, nothing can change it.
        assert_eq!(
            rustix::fs::fstat(&second).unwrap().st_size as usize,
            other.len()
        );
        assert!(rustix::io::pwrite(&second, b"x", 0).is_err());
        assert!(*Mapping::of_sealed(second, u64::MAX).unwrap() == other[..]);
        // The stock stays within its bounds.
        let stock = ready();
        assert!(stock.len() <= STOCK_MAX_FILES);
        assert!(stock.iter().sum::<u64>() <= STOCK_MAX_BYTES);
    }

    /// The descriptors of this process whose link names `name`.
    fn open_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|l| l.to_string_lossy().contains(name))
            .count()
    }

    #[test]
    fn retired_files_close_small_ones_at_once_and_large_ones_on_the_filler() {
        // The filler runs once any attachment of a spare's size was sealed
        // (2 MiB: a class no other test of this module uses).
        drop(sealed(&vec![7u8; 2 * MIB as usize]).unwrap());
        let large = vec![1u8; MIB as usize];
        let small = vec![2u8; 4096];
        let make = |bytes: &[u8]| {
            let name = if bytes.len() == small.len() {
                "forgesyte-test-retire-small"
            } else {
                "forgesyte-test-retire-large"
            };
            let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
            rustix::io::write(&fd, bytes)?;
            Ok(fd)
        };
        let attachments: [&[u8]; 3] = [&small, &[], &large];
        let outgoing = Outgoing::prepare_with(&attachments, 1, make);
        assert_eq!(open_named("forgesyte-test-retire-"), 2);
        drop(Retire::new(outgoing, &attachments));
        assert_eq!(open_named("forgesyte-test-retire-small"), 0);
        let since = Instant::now();
        while open_named("forgesyte-test-retire-large") > 0 {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "the filler did not close a retired file"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(shared().stock.lock().retired.is_empty());
    }

    /// Bytes of a shared attachment that record the thread dropping them.
    struct Recorded {
        bytes: Vec<u8>,
        dropped_on: Arc<parking_lot::Mutex<Option<String>>>,
    }

    impl AsRef<[u8]> for Recorded {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }

    impl Drop for Recorded {
        fn drop(&mut self) {
            *self.dropped_on.lock() = std::thread::current().name().map(str::to_owned);
        }
    }

    /// A frame whose one attachment is shared: `len` recorded bytes.
    fn frame_sharing(len: usize) -> (Frame, Arc<parking_lot::Mutex<Option<String>>>) {
        let mut body = Vec::new();
        forgesyte_protocol::wire::write_frame(&mut body, b"{}", &[b""]).unwrap();
        let mut frame =
            forgesyte_protocol::wire::read_frame(&mut body.as_slice(), 1 << 20).unwrap();
        let dropped_on = Arc::new(parking_lot::Mutex::new(None));
        let shared = Recorded {
            bytes: vec![9; len],
            dropped_on: Arc::clone(&dropped_on),
        };
        frame.share(0, Arc::new(shared)).unwrap();
        (frame, dropped_on)
    }

    #[test]
    fn a_frame_sharing_a_large_attachment_is_dropped_on_the_filler_a_small_one_here() {
        let (small, small_dropped) = frame_sharing(4096);
        drop_frame(small);
        let here = std::thread::current().name().map(str::to_owned);
        assert_eq!(*small_dropped.lock(), here);
        let (large, large_dropped) = frame_sharing(MIB as usize);
        drop_frame(large);
        let since = Instant::now();
        while large_dropped.lock().is_none() {
            assert!(since.elapsed() < Duration::from_secs(10), "never dropped");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(large_dropped.lock().as_deref(), Some("forgesyte-spares"));
    }
}
