//! Request bodies received straight into a sealed memory file, so that an
//! attachment that *is* such a body crosses to a runner without a copy
//! (`PROTOCOL.md` §3.1, "Bodies received into memory files").
//!
//! The host's HTTP layer writes a large `application/octet-stream` body
//! into a [`BodyWriter`] chunk by chunk (this replaces the copy that
//! joins the chunks into one buffer), then [`BodyWriter::finish`] seals the
//! file and maps it read-only: a [`SharedBody`], whose bytes the host uses
//! as any buffer. While it lives, [`sealed_file_of`] finds the file of
//! exactly its bytes, so the transport passes that descriptor instead of
//! copying the bytes into a new file. A slice of the body (or any other
//! buffer) is not found, and travels as before.
//!
//! This module owns the writer, the sealed body and the table of live
//! bodies. It knows nothing of HTTP, plugins or runners.

use std::collections::HashMap;
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, PoisonError};

use rustix::fs::{MemfdFlags, SealFlags};

use super::shm::{Mapping, required_seals};

/// The name of a memory file holding a received body.
pub const BODY_MEMFD_NAME: &str = "forgesyte-body";

/// A body being received into a memory file of a fixed capacity (the
/// request's `Content-Length`), through a writable mapping only this
/// process holds.
pub struct BodyWriter {
    fd: OwnedFd,
    ptr: *mut c_void,
    capacity: usize,
    len: usize,
}

// SAFETY: the writer owns its mapping exclusively (nobody else holds the
// file or the pointer until `finish`); moving it between threads moves
// that ownership.
#[allow(unsafe_code)]
unsafe impl Send for BodyWriter {}

impl BodyWriter {
    /// A writer of `capacity` bytes into `file` (a new memory file when
    /// `None`; a spare whose pages were allocated in advance otherwise),
    /// which must allow sealing and have no seals yet.
    ///
    /// # Errors
    ///
    /// When the file cannot be made, sized or mapped.
    pub fn new(capacity: usize, file: Option<OwnedFd>) -> io::Result<BodyWriter> {
        let fd = match file {
            Some(fd) => fd,
            None => rustix::fs::memfd_create(
                BODY_MEMFD_NAME,
                MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
            )?,
        };
        rustix::fs::ftruncate(&fd, capacity as u64)?;
        if capacity == 0 {
            return Ok(BodyWriter {
                fd,
                ptr: std::ptr::NonNull::<u8>::dangling().as_ptr().cast(),
                capacity,
                len: 0,
            });
        }
        // SAFETY: a new shared mapping at an address the kernel chooses;
        // the file is this process's alone and is not shrunk while mapped
        // (`finish` unmaps before cutting it), so no access can fault.
        #[allow(unsafe_code)]
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                capacity,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::POPULATE,
                &fd,
                0,
            )
        }?;
        Ok(BodyWriter {
            fd,
            ptr,
            capacity,
            len: 0,
        })
    }

    /// Appends `chunk`; `false` (nothing written) when it would go past
    /// the capacity.
    pub fn write(&mut self, chunk: &[u8]) -> bool {
        if chunk.len() > self.capacity - self.len {
            return false;
        }
        // SAFETY: `ptr` maps `capacity` writable bytes; `len + chunk.len()`
        // is within them (checked above); `chunk` is another allocation.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(
                chunk.as_ptr(),
                self.ptr.cast::<u8>().add(self.len),
                chunk.len(),
            );
        }
        self.len += chunk.len();
        true
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Ends the body: the writable mapping goes, the file is cut to the
    /// bytes written and sealed as a shared attachment's, and mapped
    /// read-only.
    ///
    /// # Errors
    ///
    /// When the file cannot be cut, sealed or mapped.
    pub fn finish(mut self) -> io::Result<SharedBody> {
        self.unmap();
        // A descriptor of the same file (the writer's own closes with it).
        let fd = rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?;
        rustix::fs::ftruncate(&fd, self.len as u64)?;
        rustix::fs::fcntl_add_seals(&fd, required_seals() | SealFlags::SEAL)?;
        let kept = rustix::io::fcntl_dupfd_cloexec(&fd, 0)?;
        let mapping = Mapping::of_sealed(fd, u64::MAX).map_err(io::Error::other)?;
        Ok(SharedBody::new(mapping, kept))
    }

    fn unmap(&mut self) {
        if self.capacity > 0 {
            // SAFETY: the mapping made in `new`, unmapped once (capacity
            // is set to 0 after), and no borrow of it exists.
            #[allow(unsafe_code)]
            unsafe {
                let _ = rustix::mm::munmap(self.ptr, self.capacity);
            }
            self.capacity = 0;
        }
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        self.unmap();
    }
}

impl std::fmt::Debug for BodyWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BodyWriter({} of {} bytes)", self.len, self.capacity)
    }
}

/// A received body: a read-only mapping of its sealed memory file, and the
/// file, listed in the table of live bodies until dropped.
pub struct SharedBody {
    mapping: Mapping,
    fd: OwnedFd,
}

/// Live bodies by the address of their first byte: their length and file.
fn live() -> &'static Mutex<HashMap<usize, (usize, RawFd)>> {
    static LIVE: std::sync::OnceLock<Mutex<HashMap<usize, (usize, RawFd)>>> =
        std::sync::OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
}

impl SharedBody {
    fn new(mapping: Mapping, fd: OwnedFd) -> SharedBody {
        if !mapping.is_empty() {
            live()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(mapping.as_ptr() as usize, (mapping.len(), fd.as_raw_fd()));
        }
        SharedBody { mapping, fd }
    }

    /// The sealed memory file holding the body.
    pub fn file(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SharedBody {
    fn drop(&mut self) {
        if !self.mapping.is_empty() {
            // Out of the table before the file closes (with `self.fd`).
            live()
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&(self.mapping.as_ptr() as usize));
        }
    }
}

impl AsRef<[u8]> for SharedBody {
    fn as_ref(&self) -> &[u8] {
        &self.mapping
    }
}

impl std::ops::Deref for SharedBody {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.mapping
    }
}

impl std::fmt::Debug for SharedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedBody({} bytes)", self.mapping.len())
    }
}

/// A new descriptor of the sealed memory file holding exactly `bytes`,
/// when `bytes` is a live [`SharedBody`] (the whole of it, not a part);
/// `None` otherwise. The caller holds `bytes`, so the body (and its file)
/// lives through the call.
pub fn sealed_file_of(bytes: &[u8]) -> Option<OwnedFd> {
    if bytes.is_empty() {
        return None;
    }
    let live = live().lock().unwrap_or_else(PoisonError::into_inner);
    let &(len, fd) = live.get(&(bytes.as_ptr() as usize))?;
    if len != bytes.len() {
        return None;
    }
    // SAFETY: `fd` belongs to a live `SharedBody` (listed until its drop,
    // which takes this lock before its file closes), so it is open while
    // the lock is held; it is only borrowed to duplicate it.
    #[allow(unsafe_code)]
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_dupfd_cloexec(borrowed, 0).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(data: &[u8], capacity: usize) -> SharedBody {
        let mut writer = BodyWriter::new(capacity, None).unwrap();
        for chunk in data.chunks(7000) {
            assert!(writer.write(chunk));
        }
        writer.finish().unwrap()
    }

    #[test]
    fn a_received_body_is_sealed_and_found_whole_only() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let shared = body(&data, data.len());
        assert_eq!(&*shared, &data[..]);
        let seals = rustix::fs::fcntl_get_seals(shared.file()).unwrap();
        assert!(seals.contains(required_seals() | SealFlags::SEAL));
        // The whole body is found; its file maps to the same bytes.
        let fd = sealed_file_of(&shared).expect("the body's file");
        assert_eq!(&*Mapping::of_sealed(fd, u64::MAX).unwrap(), &data[..]);
        // A part of it, or a copy, is not.
        assert!(sealed_file_of(&shared[1..]).is_none());
        assert!(sealed_file_of(&shared[..10]).is_none());
        assert!(sealed_file_of(&data).is_none());
        // Gone with the body.
        let address = shared.as_ptr() as usize;
        drop(shared);
        assert!(!live().lock().unwrap().contains_key(&address));
    }

    #[test]
    fn a_writer_refuses_more_than_its_capacity_and_cuts_to_what_it_got() {
        let mut writer = BodyWriter::new(10, None).unwrap();
        assert!(writer.write(b"0123456"));
        assert!(!writer.write(b"7890"), "past the capacity");
        assert!(writer.write(b"78"));
        assert_eq!(writer.len(), 9);
        let shared = writer.finish().unwrap();
        assert_eq!(&*shared, b"012345678");
        let size = rustix::fs::fstat(shared.file()).unwrap().st_size;
        assert_eq!(size, 9, "cut to the bytes written");
        // Nothing can change or resize it any more.
        assert!(rustix::io::pwrite(shared.file(), b"x", 0).is_err());
        assert!(rustix::fs::ftruncate(shared.file(), 1).is_err());
        // An empty body, and a writer dropped unfinished.
        assert!(body(b"", 0).is_empty());
        drop(BodyWriter::new(1 << 20, None).unwrap());
    }
}
