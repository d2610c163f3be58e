//! A request body received straight into a spare memory file, for a call
//! whose plugin runs in a child process. Without it, a large body is
//! received into the heap and then copied into a memory file for the
//! runner: a second pass over the bytes, cold, about 3 ms for 8 MB on a VM
//! with 3 GB/s of memory bandwidth, the whole of an isolated call's excess
//! over the bare receive (BENCHMARKS.md "Stop 45"). Here each piece, still
//! hot from the socket, is written into the pages of a spare
//! (`spares`, allocated in advance), the file is sealed once the
//! body is complete, and `spares::sealed` hands the runner that
//! file when the call's attachment is these very bytes ([`file_of`]). The
//! wire does not change: the runner gets a new sealed file, as always.
//!
//! Only a spare that is ready is used: receiving into a fresh memory file
//! costs more than the copy it saves (the kernel allocates and zeroes its
//! pages on the request's path; measured, BENCHMARKS.md "Spare memory
//! files"). Without one the body is received into memory as before, and a
//! spare of its size is asked for the next.
//!
//! Knows nothing of HTTP: the server decides which bodies come here.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Weak};

use forgesyte_protocol::wire::shm::{self, Mapping};
use parking_lot::Mutex;

use super::spares;

/// A spare memory file a body is being written into.
#[derive(Debug)]
pub struct BodyFile {
    /// `None` once handed on (finished or read back).
    fd: Option<OwnedFd>,
    capacity: u64,
    written: u64,
}

impl BodyFile {
    /// A ready spare for a body of `len` bytes, when the body is large
    /// enough to go through shared memory and to take a spare (1 to 32
    /// MiB) and one of its size is ready; else `None` (receive it into
    /// memory), and a spare of its size is asked for the next body.
    pub fn for_len(len: u64) -> Option<BodyFile> {
        let capacity = BodyFile::capacity_for(len)?;
        let fd = spares::take_ready(capacity)?;
        Some(BodyFile {
            fd: Some(fd),
            capacity,
            written: 0,
        })
    }

    /// The bytes of the spare a body of `len` bytes would take, when it
    /// would take one: what it holds from [`BodyFile::for_len`] until its
    /// body is dropped, all of it allocated, however little of the body
    /// has arrived. A caller that bounds the memory of bodies charges this
    /// first.
    pub fn capacity_for(len: u64) -> Option<u64> {
        let threshold = super::transport::shm_threshold();
        if threshold == 0 || len < threshold {
            return None;
        }
        spares::class(len)
    }

    /// Appends `piece`. An error (the piece would pass the file's capacity,
    /// or the write failed) leaves what was written readable by
    /// [`BodyFile::into_vec`].
    pub fn write(&mut self, piece: &[u8]) -> io::Result<()> {
        let fd = self.fd.as_ref().ok_or(io::ErrorKind::BrokenPipe)?;
        let end = self.written + piece.len() as u64;
        if end > self.capacity {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "the body is longer than it said",
            ));
        }
        let mut done = 0usize;
        while done < piece.len() {
            match rustix::io::pwrite(fd, &piece[done..], self.written + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    // What was written of this piece is not counted: it is
                    // written again by whoever takes the body on.
                    return Err(e.into());
                }
            }
        }
        self.written = end;
        Ok(())
    }

    /// How many bytes were written.
    pub fn len(&self) -> u64 {
        self.written
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// The body, sealed (cut to its length, nothing can change it) and
    /// mapped read-only. On an error the file comes back, for
    /// [`BodyFile::into_vec`].
    pub fn finish(mut self) -> Result<ReceivedBody, (BodyFile, io::Error)> {
        let Some(fd) = self.fd.take() else {
            return Err((self, io::ErrorKind::BrokenPipe.into()));
        };
        let sealed = shm::seal_written(&fd, self.written).and_then(|()| {
            let mapping =
                Mapping::of_sealed(fd.try_clone()?, u64::MAX).map_err(io::Error::other)?;
            Ok(mapping)
        });
        match sealed {
            Ok(mapping) => {
                spares::want(self.capacity);
                Ok(ReceivedBody::new(mapping, fd))
            }
            Err(e) => {
                self.fd = Some(fd);
                Err((self, e))
            }
        }
    }

    /// What was written, read back into memory, with room for `total`
    /// bytes in all: for a body that could not go on into the file.
    pub fn into_vec(mut self, total: usize) -> io::Result<Vec<u8>> {
        let fd = self.fd.take().ok_or(io::ErrorKind::BrokenPipe)?;
        let len = usize::try_from(self.written).map_err(io::Error::other)?;
        let mut bytes = vec![0u8; len];
        bytes.reserve(total.saturating_sub(len));
        let mut done = 0usize;
        while done < len {
            match rustix::io::pread(&fd, &mut bytes[done..], done as u64) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        spares::close_later(fd);
        spares::want(self.capacity);
        Ok(bytes)
    }
}

impl Drop for BodyFile {
    fn drop(&mut self) {
        // A body abandoned half-way (the client went away): its pages are
        // freed off the request's path, and another spare is made.
        if let Some(fd) = self.fd.take() {
            spares::close_later(fd);
            spares::want(self.capacity);
        }
    }
}

/// A body received into a sealed memory file: its bytes, mapped read-only
/// (no page is touched until read), and the file, which
/// `spares::sealed` hands a runner instead of copying the bytes
/// into a new one.
pub struct ReceivedBody {
    /// `None` once dropped.
    inner: Option<(Mapping, Arc<OwnedFd>)>,
}

/// The bodies alive, by the address and length of their bytes. Few at a
/// time (as many as spares taken), so a list.
static RECEIVED: Mutex<Vec<(usize, usize, Weak<OwnedFd>)>> = Mutex::new(Vec::new());

impl ReceivedBody {
    fn new(mapping: Mapping, fd: OwnedFd) -> ReceivedBody {
        let fd = Arc::new(fd);
        if !mapping.is_empty() {
            RECEIVED.lock().push((
                mapping.as_ptr() as usize,
                mapping.len(),
                Arc::downgrade(&fd),
            ));
        }
        ReceivedBody {
            inner: Some((mapping, fd)),
        }
    }
}

impl AsRef<[u8]> for ReceivedBody {
    fn as_ref(&self) -> &[u8] {
        self.inner.as_ref().map_or(&[], |(mapping, _)| mapping)
    }
}

impl std::fmt::Debug for ReceivedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReceivedBody({} bytes)", self.as_ref().len())
    }
}

impl Drop for ReceivedBody {
    fn drop(&mut self) {
        if let Some((mapping, fd)) = self.inner.take() {
            // Out of the list before the mapping goes: an address is
            // another body's only once this one's mapping is gone.
            let at = mapping.as_ptr() as usize;
            RECEIVED.lock().retain(|(ptr, _, _)| *ptr != at);
            spares::drop_later(Box::new((mapping, fd)));
        }
    }
}

/// A new descriptor of the sealed file holding exactly `bytes`, when they
/// are a [`ReceivedBody`]'s (same address, same length); `None` otherwise.
/// The body is alive while `bytes` is borrowed, and only its mapping is at
/// that address, so the file is the one holding these bytes.
pub(super) fn file_of(bytes: &[u8]) -> Option<io::Result<OwnedFd>> {
    if bytes.is_empty() {
        return None;
    }
    let at = bytes.as_ptr() as usize;
    let received = RECEIVED.lock();
    let (_, _, fd) = received
        .iter()
        .find(|(ptr, len, _)| *ptr == at && *len == bytes.len())?;
    let fd = fd.upgrade()?;
    Some(fd.try_clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    const MIB: usize = 1 << 20;

    /// A body file for `len` bytes, once the filler has made its spare.
    fn body_file(len: usize) -> BodyFile {
        let since = Instant::now();
        loop {
            if let Some(file) = BodyFile::for_len(len as u64) {
                return file;
            }
            assert!(since.elapsed() < Duration::from_secs(10), "no spare made");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_body_written_in_pieces_is_its_bytes_and_its_file_is_handed_on_not_copied() {
        // 5 MiB + a bit: class 6 MiB, which no other test uses (the stock
        // is the process's).
        let data: Vec<u8> = (0..5 * MIB + 7).map(|i| (i % 251) as u8).collect();
        let mut file = body_file(data.len());
        for piece in data.chunks(16 * 1024 + 3) {
            file.write(piece).unwrap();
        }
        assert_eq!(file.len(), data.len() as u64);
        let body = file.finish().map_err(|(_, e)| e).unwrap();
        assert!(body.as_ref() == &data[..]);
        // The attachment of exactly these bytes is the body's own file:
        // the same inode, sealed.
        let sent = spares::sealed(body.as_ref()).unwrap();
        let inode = |fd: &OwnedFd| rustix::fs::fstat(fd).unwrap().st_ino;
        let (mapping, own) = body.inner.as_ref().unwrap();
        assert_eq!(inode(&sent), inode(own));
        assert!(*Mapping::of_sealed(sent, u64::MAX).unwrap() == data[..]);
        // A part of them is not: a new file.
        let part = spares::sealed(&mapping[1..]).unwrap();
        assert_ne!(inode(&part), inode(own));
        assert!(*Mapping::of_sealed(part, u64::MAX).unwrap() == data[1..]);
        // Nor are the same bytes elsewhere.
        let copy = spares::sealed(&data).unwrap();
        assert_ne!(inode(&copy), inode(own));
        // Gone with the body.
        let at = body.as_ref().as_ptr() as usize;
        drop(body);
        assert!(!RECEIVED.lock().iter().any(|(ptr, _, _)| *ptr == at));
    }

    #[test]
    fn a_body_longer_than_it_said_is_read_back_into_memory() {
        // Class 7 MiB, used by no other test.
        let data: Vec<u8> = (0..6 * MIB + 11).map(|i| (i % 241) as u8).collect();
        let mut file = body_file(data.len());
        let (head, tail) = data.split_at(4 * MIB);
        file.write(head).unwrap();
        let long = [tail, &[0u8; 2 * MIB]].concat();
        assert!(file.write(&long).is_err());
        assert_eq!(file.len(), head.len() as u64);
        let mut back = file.into_vec(data.len()).unwrap();
        assert!(back == head);
        assert!(back.capacity() >= data.len());
        back.extend_from_slice(tail);
        assert!(back == data);
    }

    #[test]
    fn small_bodies_take_no_spare() {
        assert!(BodyFile::for_len(MIB as u64 - 1).is_none());
        assert!(BodyFile::for_len(64 * MIB as u64).is_none());
    }
}
