//! [`PreadFile`]: a file read by position (`pread`), for the ELF pre-read.
//!
//! `object`'s [`ReadCache`](object::ReadCache) over a plain `File` seeks
//! before every read and once more to learn the length: two system calls
//! per range, about a dozen per library. Reading at an offset needs no
//! seek, and the length is the one already known from the open file's
//! metadata. Knows files only, nothing of ELF or plugins.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// A file of known length, read at a position kept here (no `lseek`).
#[derive(Debug)]
pub(super) struct PreadFile<'a> {
    file: &'a File,
    len: u64,
    pos: u64,
}

impl<'a> PreadFile<'a> {
    /// Reads `file`, `len` bytes long.
    pub(super) fn new(file: &'a File, len: u64) -> Self {
        PreadFile { file, len, pos: 0 }
    }
}

impl object::read::ReadCacheOps for PreadFile<'_> {
    fn len(&mut self) -> Result<u64, ()> {
        Ok(self.len)
    }

    fn seek(&mut self, pos: u64) -> Result<u64, ()> {
        self.pos = pos;
        Ok(pos)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ()> {
        let n = self.file.read_at(buf, self.pos).map_err(|_| ())?;
        self.pos += n as u64;
        Ok(n)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ()> {
        self.file.read_exact_at(buf, self.pos).map_err(|_| ())?;
        self.pos += buf.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::read::ReadCacheOps as _;

    #[test]
    fn reads_at_the_position_set_and_moves_past_what_it_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("f");
        std::fs::write(&path, b"0123456789").expect("write");
        let file = File::open(&path).expect("open");
        let mut file = PreadFile::new(&file, 10);
        assert_eq!(file.len(), Ok(10));
        assert_eq!(file.seek(4), Ok(4));
        let mut two = [0u8; 2];
        file.read_exact(&mut two).expect("read");
        assert_eq!(&two, b"45");
        let mut rest = [0u8; 8];
        assert_eq!(file.read(&mut rest), Ok(4));
        assert_eq!(&rest[..4], b"6789");
        assert_eq!(file.read(&mut rest), Ok(0), "at the end");
        file.seek(8).expect("seek");
        assert!(file.read_exact(&mut [0u8; 3]).is_err(), "past the end");
    }
}
