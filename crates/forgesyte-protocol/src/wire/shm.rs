//! Shared memory for large attachments (`PROTOCOL.md` §3.1): an attachment
//! at or above a threshold is written once into a sealed memory file
//! (`memfd_create`, sealed against writes, growth and shrinking), its
//! descriptor travels over the runner's *shared-memory socket* (a
//! `SOCK_SEQPACKET` Unix socket, `SCM_RIGHTS`) just before the frame, and
//! the receiver maps it read-only and uses the mapping as the attachment's
//! bytes, without a copy. The frame keeps its layout: a shared
//! attachment's size in the frame is 0, and the header's `shm` field lists
//! the indices of the shared attachments, in the order of the descriptors.
//!
//! This module owns the memory files, their mappings, the descriptor
//! messages and the `shm` field. It knows nothing of processes, threads,
//! timeouts or which peer is which: the host's transport and the runners
//! decide when to use it.

use std::ffi::c_void;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::Deserialize;

use super::frame::Frame;

/// The environment variable that tells a runner the descriptor number of
/// its shared-memory socket (absent: no shared memory).
pub const SHM_FD_ENV: &str = "FORGESYTE_SHM_FD";
/// The environment variable that tells a runner from what size (bytes) an
/// attachment goes through shared memory.
pub const SHM_THRESHOLD_ENV: &str = "FORGESYTE_SHM_THRESHOLD";
/// The default threshold: 64 KiB.
pub const DEFAULT_SHM_THRESHOLD: u64 = 64 * 1024;
/// The most shared attachments one frame may carry.
pub const MAX_SHARED_PER_FRAME: usize = 64;
/// The name every memory file gets (`/proc/PID/fd` shows
/// `memfd:forgesyte-attachment`).
pub const MEMFD_NAME: &str = "forgesyte-attachment";
/// The name of a spare memory file ([`spare`]): made in advance, filled
/// and sealed by [`seal_spare`] when an attachment needs it.
pub const SPARE_MEMFD_NAME: &str = "forgesyte-spare";

/// The seals a shared attachment must carry: its bytes and size are fixed.
fn required_seals() -> SealFlags {
    SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW
}

/// A read-only mapping of a sealed memory file: the bytes of one shared
/// attachment. Unmapped when dropped.
pub struct Mapping {
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and its file is sealed against writes,
// growth and shrinking: the bytes never change and stay mapped until drop,
// so sharing or sending the pointer between threads is sound.
#[allow(unsafe_code)]
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: immutable memory.
#[allow(unsafe_code)]
unsafe impl Sync for Mapping {}

/// `statfs`'s `f_type` of tmpfs, where every memory file not of huge pages
/// lives (`linux/magic.h`).
const TMPFS_MAGIC: i64 = 0x0102_1994;

impl Mapping {
    /// Maps `fd` read-only after checking its seals and its file system; the descriptor is
    /// closed (the mapping keeps the file alive). At most `limit` bytes.
    pub fn of_sealed(fd: OwnedFd, limit: u64) -> Result<Mapping, String> {
        let seals = rustix::fs::fcntl_get_seals(&fd)
            .map_err(|e| format!("a shared attachment is not a sealed memory file: {e}"))?;
        if !seals.contains(required_seals()) {
            return Err(format!(
                "a shared attachment's memory file is not sealed against writes and resizing (seals {seals:?})"
            ));
        }
        // A memory file of hugetlbfs would be mapped in whole huge pages,
        // and a size that is not one (1 byte) could never be unmapped.
        let filesystem = rustix::fs::fstatfs(&fd)
            .map_err(|e| format!("cannot read a shared attachment's file system: {e}"))?
            .f_type;
        // `f_type`'s type is the architecture's (`i64` here, `u32` on some).
        #[allow(clippy::useless_conversion)]
        if i64::from(filesystem) != TMPFS_MAGIC {
            return Err(format!(
                "a shared attachment's memory file is not of tmpfs (file system {filesystem:#x}: a huge-page memory file?)"
            ));
        }
        let size = rustix::fs::fstat(&fd)
            .map_err(|e| format!("cannot read a shared attachment's size: {e}"))?
            .st_size;
        let size = u64::try_from(size).map_err(|_| "a negative size".to_owned())?;
        if size > limit {
            return Err(format!(
                "a shared attachment of {size} bytes exceeds the limit: {limit} bytes are left of it"
            ));
        }
        let len = usize::try_from(size).map_err(|_| format!("{size} bytes cannot be mapped"))?;
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::NonNull::<u8>::dangling().as_ptr().cast(),
                len: 0,
            });
        }
        // SAFETY: a new mapping at an address the kernel chooses, so no
        // existing memory is affected; the file is sealed against shrinking,
        // so no page of the mapping can vanish (no SIGBUS on access).
        #[allow(unsafe_code)]
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(|e| format!("cannot map a shared attachment of {len} bytes: {e}"))?;
        Ok(Mapping { ptr, len })
    }
}

impl AsRef<[u8]> for Mapping {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::Deref for Mapping {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is a live read-only mapping of `len` bytes (or a
        // dangling, aligned pointer with `len` 0) that nobody can write
        // (sealed), valid until `drop`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr.cast::<u8>(), self.len)
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping made in `of_sealed`, unmapped once; no
            // borrow of it outlives `self`.
            #[allow(unsafe_code)]
            unsafe {
                let _ = rustix::mm::munmap(self.ptr, self.len);
            }
        }
    }
}

impl PartialEq for Mapping {
    fn eq(&self, other: &Mapping) -> bool {
        **self == **other
    }
}

impl Eq for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({} bytes)", self.len)
    }
}

/// A new sealed, close-on-exec memory file holding `bytes`.
pub fn sealed(bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(MEMFD_NAME, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    let mut rest = bytes;
    while !rest.is_empty() {
        match rustix::io::write(&fd, rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    rustix::fs::fcntl_add_seals(&fd, required_seals() | SealFlags::SEAL)?;
    Ok(fd)
}

/// A spare memory file: unsealed, `capacity` bytes allocated in advance
/// (`fallocate`), so that filling it later ([`seal_spare`]) is a copy into
/// pages that exist, without the kernel allocating and zeroing them on the
/// request's path. Close-on-exec; only its maker holds it.
pub fn spare(capacity: u64) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(
        SPARE_MEMFD_NAME,
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    if capacity > 0 {
        rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::empty(), 0, capacity)?;
    }
    Ok(fd)
}

/// Fills a [`spare`] with `bytes` (written from offset 0; the file is cut
/// to their length) and seals it as [`sealed`] does: the same sealed memory
/// file, its pages allocated earlier. The caller must be the spare's only
/// holder (nobody may have mapped it writable).
pub fn seal_spare(fd: OwnedFd, bytes: &[u8]) -> io::Result<OwnedFd> {
    let mut offset = 0usize;
    while offset < bytes.len() {
        match rustix::io::pwrite(&fd, &bytes[offset..], offset as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => offset += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    seal_written(&fd, bytes.len() as u64)?;
    Ok(fd)
}

/// Seals a [`spare`] its holder wrote `len` bytes into from offset 0 (the
/// file is cut to them) as [`sealed`] does. The caller must be the spare's
/// only holder (nobody may have mapped it writable).
pub fn seal_written(fd: &OwnedFd, len: u64) -> io::Result<()> {
    rustix::fs::ftruncate(fd, len)?;
    rustix::fs::fcntl_add_seals(fd, required_seals() | SealFlags::SEAL)?;
    Ok(())
}

/// The shared half of one outgoing frame: which attachments go through
/// shared memory, and their sealed memory files.
#[derive(Debug, Default)]
pub struct Outgoing {
    indices: Vec<usize>,
    fds: Vec<OwnedFd>,
}

impl Outgoing {
    /// Puts every attachment of at least `threshold` bytes (`0`: none) into
    /// a sealed memory file, at most [`MAX_SHARED_PER_FRAME`]. Best effort:
    /// an attachment whose file cannot be made stays inline.
    pub fn prepare(attachments: &[&[u8]], threshold: u64) -> Outgoing {
        Outgoing::prepare_with(attachments, threshold, sealed)
    }

    /// As [`Outgoing::prepare`], with `make` making each sealed memory file
    /// (for example [`seal_spare`] on a spare made in advance); it must
    /// return a file sealed as [`sealed`]'s.
    pub fn prepare_with(
        attachments: &[&[u8]],
        threshold: u64,
        mut make: impl FnMut(&[u8]) -> io::Result<OwnedFd>,
    ) -> Outgoing {
        let mut out = Outgoing::default();
        if threshold == 0 {
            return out;
        }
        for (i, bytes) in attachments.iter().enumerate() {
            if out.indices.len() == MAX_SHARED_PER_FRAME {
                break;
            }
            if bytes.is_empty() || (bytes.len() as u64) < threshold {
                continue;
            }
            if let Ok(fd) = make(bytes) {
                out.indices.push(i);
                out.fds.push(fd);
            }
        }
        out
    }

    /// The memory files, each with its attachment's index, for the caller
    /// to close where closing costs least.
    pub fn into_files(self) -> Vec<(usize, OwnedFd)> {
        self.indices.into_iter().zip(self.fds).collect()
    }

    /// Whether nothing goes through shared memory.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The attachments as the frame carries them: shared ones empty.
    pub fn inline<'a>(&self, attachments: &[&'a [u8]]) -> Vec<&'a [u8]> {
        let mut inline = attachments.to_vec();
        for &i in &self.indices {
            if let Some(slot) = inline.get_mut(i) {
                *slot = &[];
            }
        }
        inline
    }

    /// `head` (a JSON object's opening, `{…`) with the `shm` field put
    /// first; `head` itself when nothing is shared.
    pub fn header(&self, head: &[u8]) -> Vec<u8> {
        if self.is_empty() {
            return head.to_vec();
        }
        let list: Vec<String> = self.indices.iter().map(usize::to_string).collect();
        let field = format!(r#""shm":[{}],"#, list.join(","));
        let mut out = Vec::with_capacity(head.len() + field.len());
        match head.split_first() {
            Some((b'{', rest)) => {
                out.push(b'{');
                out.extend_from_slice(field.as_bytes());
                out.extend_from_slice(rest);
            }
            // Not an object's opening: nothing can be put in it.
            _ => out.extend_from_slice(head),
        }
        out
    }

    /// Sends the descriptors over `socket`, before the frame is written:
    /// one message, the count as a `u32le`, the descriptors in the order of
    /// the indices. Nothing is sent when nothing is shared; on an error,
    /// the frame goes inline. The sender's copies stay open until this
    /// value is dropped or [`Outgoing::into_files`] takes them: a sender
    /// that holds them until the answer arrives keeps the receiver's close
    /// from being the last one, which frees the file's pages (PROTOCOL.md
    /// §3.1, "Who frees a memory file").
    pub fn send(&self, socket: BorrowedFd<'_>) -> io::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let borrowed: Vec<BorrowedFd<'_>> = self.fds.iter().map(AsFd::as_fd).collect();
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SHARED_PER_FRAME))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        let count = u32::try_from(borrowed.len())
            .map_err(|_| io::Error::other("too many descriptors"))?
            .to_le_bytes();
        loop {
            match rustix::net::sendmsg(
                socket,
                &[IoSlice::new(&count)],
                &mut control,
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[derive(Deserialize)]
struct ShmField {
    #[serde(default)]
    shm: Vec<usize>,
}

/// The indices a header's `shm` field names (none without the field).
pub fn shared_indices(header: &[u8]) -> Result<Vec<usize>, String> {
    // Most headers have no such field: look before parsing. A key spelled
    // with escapes (`"\u0073hm"`) is the same key, and is parsed: a header
    // with an escape that can spell `s`, `h` or `m` (`\u006.`, `\u007.`);
    // other escapes (a control character, `\u00e9`) cost no parse.
    let may_spell = |w: &[u8]| w == b"\\u006" || w == b"\\u007";
    if !header.windows(5).any(|w| w == b"\"shm\"" || may_spell(w)) {
        return Ok(Vec::new());
    }
    serde_json::from_slice::<ShmField>(header)
        .map(|f| f.shm)
        .map_err(|e| format!("malformed 'shm' field: {e}"))
}

/// Completes a frame just read: for each index of its `shm` field, receives
/// a descriptor from `socket` (sent before the frame, so never waited for),
/// checks and maps it, and makes the mapping that attachment. `socket`
/// `None` (no shared memory offered) makes any `shm` field an error, as
/// are indices out of order or range, attachments with bytes in the frame,
/// descriptors missing or in excess, unsealed files, and a frame whose own
/// bytes and shared bytes together exceed `limit` (the same limit as an
/// inline frame's). Every descriptor received is closed before this returns.
pub fn receive(
    frame: &mut Frame,
    socket: Option<BorrowedFd<'_>>,
    limit: u64,
) -> Result<(), ReceiveError> {
    let indices = shared_indices(frame.header())?;
    if indices.is_empty() {
        return Ok(());
    }
    let Some(socket) = socket else {
        return Err("shared attachments, but no shared memory was offered".into());
    };
    if indices.len() > MAX_SHARED_PER_FRAME {
        return Err(format!(
            "{} shared attachments in one frame (at most {MAX_SHARED_PER_FRAME})",
            indices.len()
        )
        .into());
    }
    if indices.windows(2).any(|w| w[0] >= w[1]) {
        return Err("the 'shm' indices are not in increasing order".into());
    }
    let fds = receive_fds(socket, indices.len())?;
    let mut left = limit.saturating_sub(frame.body_len() as u64);
    for (i, fd) in indices.into_iter().zip(fds) {
        let mapping = Mapping::of_sealed(fd, left)?;
        left -= mapping.len() as u64;
        frame.share(i, std::sync::Arc::new(mapping))?;
    }
    Ok(())
}

/// Ends `socket`, the end of a peer that is gone: shuts it down both ways,
/// so nothing more arrives, and closes every descriptor still queued on it
/// (memory files a peer sent without the frame that would have used them:
/// a crash mid-transfer, or on purpose, pin their pages until then).
/// Returns how many it closed.
pub fn discard(socket: BorrowedFd<'_>) -> usize {
    let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Both);
    let mut closed = 0;
    let mut reset = false;
    loop {
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SHARED_PER_FRAME))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut count = [0u8; 4];
        match rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut count)],
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut got = 0;
                for message in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = message {
                        // Dropped: closed.
                        got += received.count();
                    }
                }
                closed += got;
                if msg.bytes == 0 && got == 0 {
                    return closed; // the end: nothing is queued
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            // A peer that died with data of ours unread leaves this error,
            // told once, before what it queued.
            Err(rustix::io::Errno::CONNRESET) if !reset => reset = true,
            Err(_) => return closed,
        }
    }
}

/// Why [`receive`] took no shared attachments. (Hand-written `Display`:
/// this crate is a plugin's dependency too, and keeps its own few.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiveError {
    /// The frame or its descriptor message breaks the protocol: the peer's
    /// doing.
    Malformed(String),
    /// This process is out of file descriptors: the kernel could not
    /// install the descriptors the peer sent, and closed them. The frame
    /// itself is whole and the stream in step: the reader may fail this
    /// one message and read on. No fault of the peer's.
    OutOfDescriptors,
}

impl std::fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReceiveError::Malformed(message) => f.write_str(message),
            ReceiveError::OutOfDescriptors => f.write_str(
                "its shared attachments were lost: this process is out of file descriptors (the \
                 kernel dropped those sent)",
            ),
        }
    }
}

impl std::error::Error for ReceiveError {}

impl From<String> for ReceiveError {
    fn from(message: String) -> Self {
        ReceiveError::Malformed(message)
    }
}

impl From<&str> for ReceiveError {
    fn from(message: &str) -> Self {
        ReceiveError::Malformed(message.to_owned())
    }
}

/// Whether this process has no descriptor free (a `dup` of `fd` is
/// refused with `EMFILE`).
fn out_of_descriptors(fd: BorrowedFd<'_>) -> bool {
    matches!(
        rustix::io::fcntl_dupfd_cloexec(fd, 0),
        Err(rustix::io::Errno::MFILE | rustix::io::Errno::NFILE)
    )
}

/// Receives one descriptor message of exactly `expected` descriptors,
/// without waiting (close-on-exec).
fn receive_fds(socket: BorrowedFd<'_>, expected: usize) -> Result<Vec<OwnedFd>, ReceiveError> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SHARED_PER_FRAME))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut count = [0u8; 4];
    let mut reset = false;
    let msg = loop {
        match rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(&mut count)],
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg,
            Err(rustix::io::Errno::INTR) => {}
            // A peer that died with data of ours unread (after it sent its
            // last answer whole) leaves this error, told once, before what
            // it queued.
            Err(rustix::io::Errno::CONNRESET) if !reset => reset = true,
            Err(rustix::io::Errno::AGAIN) => {
                return Err(
                    "shared attachments announced, but their descriptors did not come first".into(),
                );
            }
            Err(e) => return Err(format!("the shared-memory socket failed: {e}").into()),
        }
    };
    let mut fds = Vec::with_capacity(expected);
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if msg
        .flags
        .intersects(ReturnFlags::CTRUNC | ReturnFlags::TRUNC)
    {
        // Truncated by the kernel when it could not install them all
        // (those it did are in `fds`, still held: the test sees the
        // process as full as the kernel did), or by a peer that sent more
        // than a frame may carry.
        if msg.flags.contains(ReturnFlags::CTRUNC) && out_of_descriptors(socket) {
            return Err(ReceiveError::OutOfDescriptors);
        }
        return Err("a truncated descriptor message".into());
    }
    let counted = u32::from_le_bytes(count) as usize;
    if msg.bytes != 4 || counted != expected || fds.len() != expected {
        return Err(format!(
            "{expected} shared attachments announced in the frame; the descriptor message \
             counts {counted} ({} bytes) and carries {} descriptors",
            msg.bytes,
            fds.len()
        )
        .into());
    }
    Ok(fds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{read_frame, write_frame};
    use rustix::net::{AddressFamily, SocketFlags, SocketType, socketpair};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    /// Sends a frame the way a peer does (descriptors first), reads it back.
    fn round_trip(atts: &[&[u8]], threshold: u64) -> (Frame, Vec<u8>) {
        let (a, b) = pair();
        let out = Outgoing::prepare(atts, threshold);
        let header = out.header(br#"{"op":"call","id":2}"#);
        out.send(a.as_fd()).unwrap();
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &header, &out.inline(atts)).unwrap();
        let mut frame = read_frame(&mut bytes.as_slice(), 1 << 30).unwrap();
        receive(&mut frame, Some(b.as_fd()), 1 << 30).unwrap();
        (frame, bytes)
    }

    #[test]
    fn large_attachments_travel_as_mappings_and_small_ones_inline() {
        let big = vec![0xA5u8; 100_000];
        let atts: [&[u8]; 4] = [b"small", &big, b"", &big[..10]];
        let (frame, wire) = round_trip(&atts, 64 * 1024);
        assert_eq!(frame.attachments().collect::<Vec<_>>(), atts);
        assert!(frame.is_shared(1));
        assert!(!frame.is_shared(0) && !frame.is_shared(2) && !frame.is_shared(3));
        assert!(wire.len() < 200, "the big one is not in the frame");
        let (header, _) = (frame.header(), ());
        assert_eq!(shared_indices(header).unwrap(), [1]);
        // The threshold is inclusive; 0 turns shared memory off.
        for (size, threshold, shared) in [
            (64 * 1024 - 1, 64 * 1024, false),
            (64 * 1024, 64 * 1024, true),
            (64 * 1024 + 1, 64 * 1024, true),
            (1, 1, true),
            (1 << 20, 0, false),
        ] {
            let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let (frame, _) = round_trip(&[&data], threshold);
            assert_eq!(frame.attachment(0), Some(&data[..]), "{size}");
            assert_eq!(frame.is_shared(0), shared, "{size} / {threshold}");
        }
    }

    #[test]
    fn discard_closes_what_a_gone_peer_left_queued_and_takes_no_more() {
        let (ours, theirs) = pair();
        // Two messages of descriptors no frame will claim: pipe ends, so
        // their closing shows (the pipe's reader sees its end).
        let (read, write) = std::io::pipe().unwrap();
        let write: OwnedFd = write.into();
        let second = write.try_clone().unwrap();
        for fd in [write, second] {
            let out = Outgoing {
                indices: vec![0],
                fds: vec![fd],
            };
            out.send(theirs.as_fd()).unwrap();
        }
        assert_eq!(discard(ours.as_fd()), 2);
        let mut end = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &read, &mut end).unwrap(), 0);
        // Shut down: the peer can send nothing more.
        let (_, late) = std::io::pipe().unwrap();
        let out = Outgoing {
            indices: vec![0],
            fds: vec![late.into()],
        };
        assert!(out.send(theirs.as_fd()).is_err());
        assert_eq!(discard(ours.as_fd()), 0);
    }

    #[test]
    fn a_huge_page_memory_file_is_refused() {
        use rustix::fs::{MemfdFlags, SealFlags};
        let fd = rustix::fs::memfd_create(
            "forgesyte-test-huge",
            MemfdFlags::HUGETLB | MemfdFlags::ALLOW_SEALING | MemfdFlags::CLOEXEC,
        )
        .expect("this kernel makes huge-page memory files (hugetlbfs)");
        rustix::fs::ftruncate(&fd, 2 << 20).unwrap();
        rustix::fs::fcntl_add_seals(&fd, required_seals() | SealFlags::SEAL).unwrap();
        let refused = Mapping::of_sealed(fd, 1 << 30)
            .map(|m| m.len())
            .unwrap_err();
        assert!(refused.contains("not of tmpfs"), "{refused}");
    }

    #[test]
    fn a_peer_that_died_with_our_data_unread_still_has_its_descriptors_taken() {
        let (ours, theirs) = pair();
        // Ours to it, never read: its end's close then leaves ECONNRESET
        // pending on ours, told before what it queued.
        Outgoing::prepare(&[&[1u8; 100][..]], 1)
            .send(ours.as_fd())
            .unwrap();
        let data = vec![0x5Au8; 100_000];
        let out = Outgoing::prepare(&[&data], 64 * 1024);
        let header = out.header(br#"{"op":"call","id":2}"#);
        out.send(theirs.as_fd()).unwrap();
        drop(theirs);
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &header, &out.inline(&[&data])).unwrap();
        let mut frame = read_frame(&mut bytes.as_slice(), 1 << 30).unwrap();
        receive(&mut frame, Some(ours.as_fd()), 1 << 30).unwrap();
        assert_eq!(frame.attachment(0), Some(&data[..]));
        // And what it queued after its last frame is closed.
        let (ours, theirs) = pair();
        Outgoing::prepare(&[&[1u8; 100][..]], 1)
            .send(ours.as_fd())
            .unwrap();
        let (read, write) = std::io::pipe().unwrap();
        Outgoing {
            indices: vec![0],
            fds: vec![write.into()],
        }
        .send(theirs.as_fd())
        .unwrap();
        drop(theirs);
        assert_eq!(discard(ours.as_fd()), 1);
        let mut end = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &read, &mut end).unwrap(), 0);
    }

    /// The mappings of memory files in this process (`/proc/self/maps`):
    /// each one's address range and its file's inode.
    fn memfd_mappings() -> Vec<(std::ops::Range<usize>, u64)> {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains(MEMFD_NAME))
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (start, end) = fields.next()?.split_once('-')?;
                let start = usize::from_str_radix(start, 16).ok()?;
                let end = usize::from_str_radix(end, 16).ok()?;
                let inode = fields.nth(3)?.parse().ok()?;
                Some((start..end, inode))
            })
            .collect()
    }

    /// Whether the memory file `inode` is open as a descriptor of this
    /// process.
    fn memfd_open(inode: u64) -> bool {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains(MEMFD_NAME))
            })
            .any(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == inode))
    }

    #[test]
    fn descriptors_are_closed_after_mapping_and_mappings_on_drop() {
        // This frame's own memory file, by inode: other tests in this
        // process make memory files of their own meanwhile.
        let big = vec![1u8; 200_000];
        let (frame, _) = round_trip(&[&big], 1);
        let addr = frame.attachment(0).unwrap().as_ptr() as usize;
        let inode = memfd_mappings()
            .into_iter()
            .find_map(|(range, inode)| range.contains(&addr).then_some(inode))
            .expect("the attachment is a mapped memory file");
        assert!(!memfd_open(inode), "no descriptor of it is left open");
        drop(frame);
        assert!(
            memfd_mappings().iter().all(|(_, mapped)| *mapped != inode),
            "its mapping goes with the frame"
        );
    }

    #[test]
    fn broken_promises_are_errors() {
        let big = vec![3u8; 1000];
        // A `shm` field without descriptors.
        let (_a, b) = pair();
        let mut bytes = Vec::new();
        write_frame(&mut bytes, br#"{"shm":[0]}"#, &[b""]).unwrap();
        let mut frame = read_frame(&mut bytes.as_slice(), 1 << 20).unwrap();
        let e = receive(&mut frame, Some(b.as_fd()), 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not come"), "{e}");
        // Without a socket offered.
        let e = receive(&mut frame, None, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("no shared memory"), "{e}");
        // An unsealed file; bytes in the frame as well; over the limit.
        for (header, inline, sealed_fd, limit, expected) in [
            (
                &br#"{"shm":[0]}"#[..],
                &b""[..],
                false,
                1 << 20,
                "not sealed",
            ),
            (br#"{"shm":[0]}"#, b"x", true, 1 << 20, "also has bytes"),
            (br#"{"shm":[0]}"#, b"", true, 10, "exceeds the limit"),
            // The frame's own bytes count too: 1000 shared bytes do not
            // fit a limit of 1000 beside a header.
            (br#"{"shm":[0]}"#, b"", true, 1000, "exceeds the limit"),
            (br#"{"shm":[0]}"#, b"", true, 1010, "exceeds the limit"),
            (br#"{"shm":[1]}"#, b"", true, 1 << 20, "of a frame with 1"),
            (br#"{"shm":"x"}"#, b"", true, 1 << 20, "malformed"),
        ] {
            let (a, b) = pair();
            let fd = if sealed_fd {
                sealed(&big).unwrap()
            } else {
                rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC).unwrap()
            };
            let out = Outgoing {
                indices: vec![0],
                fds: vec![fd],
            };
            out.send(a.as_fd()).unwrap();
            let mut bytes = Vec::new();
            write_frame(&mut bytes, header, &[inline]).unwrap();
            let mut frame = read_frame(&mut bytes.as_slice(), 1 << 20).unwrap();
            let e = receive(&mut frame, Some(b.as_fd()), limit)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{e}");
        }
        // Exactly at the limit, the frame's bytes and the shared ones: taken.
        let (a, b) = pair();
        let out = Outgoing {
            indices: vec![0],
            fds: vec![sealed(&big).unwrap()],
        };
        out.send(a.as_fd()).unwrap();
        let mut bytes = Vec::new();
        write_frame(&mut bytes, br#"{"shm":[0]}"#, &[b""]).unwrap();
        let mut frame = read_frame(&mut bytes.as_slice(), 1 << 20).unwrap();
        let limit = (frame.body_len() + big.len()) as u64;
        receive(&mut frame, Some(b.as_fd()), limit).unwrap();
        assert!(frame.attachment(0) == Some(&big[..]));
    }

    #[test]
    fn sealed_files_cannot_change() {
        let fd = sealed(b"frozen").unwrap();
        assert!(rustix::io::write(&fd, b"x").is_err());
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert!(rustix::fs::fcntl_add_seals(&fd, SealFlags::empty()).is_err());
        let mapping = Mapping::of_sealed(fd, 100).unwrap();
        assert_eq!(&*mapping, b"frozen");
    }

    #[test]
    fn a_filled_spare_is_sealed_like_a_fresh_file_and_travels_the_same() {
        let data: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i % 251) as u8).collect();
        let fd = seal_spare(spare(4 << 20).unwrap(), &data).unwrap();
        // Cut to the attachment's length, sealed for good.
        assert_eq!(rustix::fs::fstat(&fd).unwrap().st_size as usize, data.len());
        assert!(rustix::io::pwrite(&fd, b"x", 0).is_err());
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert!(rustix::fs::fcntl_add_seals(&fd, SealFlags::empty()).is_err());
        let mapping = Mapping::of_sealed(fd, 1 << 30).unwrap();
        assert!(*mapping == data[..]);
        // Through a frame, made by `prepare_with`.
        let (a, b) = pair();
        let atts: [&[u8]; 2] = [b"small", &data];
        let mut made = 0;
        let out = Outgoing::prepare_with(&atts, 1000, |bytes| {
            made += 1;
            seal_spare(spare(bytes.len() as u64)?, bytes)
        });
        assert_eq!(made, 1);
        let header = out.header(br#"{"op":"call"}"#);
        out.send(a.as_fd()).unwrap();
        let mut wire = Vec::new();
        write_frame(&mut wire, &header, &out.inline(&atts)).unwrap();
        let mut frame = read_frame(&mut wire.as_slice(), 1 << 30).unwrap();
        receive(&mut frame, Some(b.as_fd()), 1 << 30).unwrap();
        assert!(frame.is_shared(1) && frame.attachment(1) == Some(&data[..]));
        // A spare smaller than its bytes grows: its size is a promise of
        // speed, not a limit.
        let fd = seal_spare(spare(10).unwrap(), &data[..100]).unwrap();
        assert_eq!(&*Mapping::of_sealed(fd, 100).unwrap(), &data[..100]);
    }

    #[test]
    fn the_field_goes_first_in_the_header() {
        let out = Outgoing {
            indices: vec![0, 2],
            fds: vec![],
        };
        assert_eq!(
            out.header(br#"{"op":"call""#),
            br#"{"shm":[0,2],"op":"call""#
        );
        assert_eq!(Outgoing::default().header(b"{}"), b"{}");
        assert_eq!(
            shared_indices(br#"{"a":"\"shm\""}"#).unwrap(),
            Vec::<usize>::new()
        );
        // The same key, escaped: a runner's frame that names shared
        // attachments so is read as one (its descriptors would otherwise
        // pair with the next frame's attachments).
        assert_eq!(shared_indices(br#"{"\u0073hm":[0]}"#).unwrap(), [0]);
        assert_eq!(
            shared_indices(br#"{"a":"\u0041"}"#).unwrap(),
            Vec::<usize>::new()
        );
        // An escape that cannot spell a letter of `shm` is not parsed (this
        // header, not JSON, would be refused if it were).
        assert_eq!(
            shared_indices(br#"{"a":"\u00e9\u001f", "b": "#).unwrap(),
            Vec::<usize>::new()
        );
        // Named twice, spelled either way: refused.
        assert!(shared_indices(br#"{"shm":[0],"\u0073hm":[]}"#).is_err());
    }
}
