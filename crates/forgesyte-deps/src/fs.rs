//! The filesystem seam and its real implementation on `std::fs`.

use std::ffi::OsString;
use std::fmt::Debug;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Opens `path` for reading if it is a regular file (after following
/// links), with its metadata (the one `fstat` that tells); anything else
/// is refused with `InvalidInput`, "not a regular file", without blocking:
/// a FIFO put where a manifest or a library is expected used to hang the
/// opening thread (and with it a load pass), and a link to `/dev/zero` to
/// be read without end.
///
/// # Errors
///
/// The path cannot be opened, or is not a regular file.
pub fn open_regular(path: &Path) -> io::Result<(std::fs::File, std::fs::Metadata)> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, meta))
}

/// What the host needs to know about a path.
///
/// `is_symlink` describes the path itself (`symlink_metadata`); `len`,
/// `is_dir` and `is_file` follow symbolic links. A dangling symlink has
/// `is_symlink: true` and every other field false or zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsMetadata {
    /// Size in bytes of the file (after following links).
    pub len: u64,
    /// The path (after following links) is a directory.
    pub is_dir: bool,
    /// The path (after following links) is a regular file.
    pub is_file: bool,
    /// The path itself is a symbolic link.
    pub is_symlink: bool,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The entry's file name.
    pub name: OsString,
    /// The listed directory's path joined with `name` (links not resolved).
    pub path: PathBuf,
    /// The entry is a directory, following symbolic links.
    pub is_dir: bool,
}

/// Read access to a filesystem: enough for the dependency checker and the
/// plugin loader.
pub trait FileSystem: Send + Sync + Debug {
    /// Whether the path exists, following symbolic links (false on any error).
    fn exists(&self, path: &Path) -> bool;

    /// Metadata of the path (see [`FsMetadata`] for link semantics).
    fn metadata(&self, path: &Path) -> io::Result<FsMetadata>;

    /// Whether the path itself is a symbolic link ([`FsMetadata::is_symlink`]
    /// without the rest: the real filesystem answers it with one `lstat`).
    /// An error when nothing is at the path.
    fn is_symlink(&self, path: &Path) -> io::Result<bool> {
        self.metadata(path).map(|m| m.is_symlink)
    }

    /// The file's bytes, at most `limit + 1` of them, so that a caller can
    /// tell "larger than `limit`" without reading a huge file.
    fn read(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>>;

    /// The file's bytes as a stream, at most `limit + 1` of them, for a
    /// reader that needs them once and in order (a digest), without
    /// holding them all. The default reads them whole, through
    /// [`read`](Self::read).
    fn reader(&self, path: &Path, limit: u64) -> io::Result<Box<dyn io::Read + '_>> {
        Ok(Box::new(io::Cursor::new(self.read(path, limit)?)))
    }

    /// The directory's entries, sorted by name.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;

    /// The absolute path with every symbolic link and `..` resolved (for
    /// "does this path escape the plugin directory" checks).
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf>;
}

/// What [`RealFs::read`] reads into its first buffer.
const FIRST_READ: u64 = 8 * 1024;

/// The real filesystem, through `std::fs`.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

impl FileSystem for RealFs {
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn metadata(&self, path: &Path) -> io::Result<FsMetadata> {
        let link = std::fs::symlink_metadata(path)?;
        let is_symlink = link.file_type().is_symlink();
        match std::fs::metadata(path) {
            Ok(meta) => Ok(FsMetadata {
                len: meta.len(),
                is_dir: meta.is_dir(),
                is_file: meta.is_file(),
                is_symlink,
            }),
            Err(e) if is_symlink && e.kind() == io::ErrorKind::NotFound => Ok(FsMetadata {
                is_symlink,
                ..FsMetadata::default()
            }),
            Err(e) => Err(e),
        }
    }

    fn is_symlink(&self, path: &Path) -> io::Result<bool> {
        std::fs::symlink_metadata(path).map(|m| m.file_type().is_symlink())
    }

    /// Two `read`s for a file that fits in the first buffer (8 KiB: a
    /// manifest): `read_to_end` into an empty vector probes with 32 bytes
    /// and then doubles, six `read`s for a 469-byte manifest. A larger file
    /// gets the rest in one buffer sized from its length.
    fn reader(&self, path: &Path, limit: u64) -> io::Result<Box<dyn io::Read + '_>> {
        let (file, _) = open_regular(path)?;
        Ok(Box::new(file.take(limit.saturating_add(1))))
    }

    fn read(&self, path: &Path, limit: u64) -> io::Result<Vec<u8>> {
        let (file, meta) = open_regular(path)?;
        let mut reader = file.take(limit.saturating_add(1));
        let first = FIRST_READ.min(reader.limit());
        let mut bytes = Vec::with_capacity(usize::try_from(first).unwrap_or(0));
        (&mut reader).take(first).read_to_end(&mut bytes)?;
        if bytes.len() as u64 == first && reader.limit() > 0 {
            let len = meta.len();
            let rest = len.min(reader.limit() + first).saturating_sub(first);
            bytes.reserve(usize::try_from(rest).unwrap_or(0).saturating_add(1));
            reader.read_to_end(&mut bytes)?;
        }
        Ok(bytes)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let path = entry.path();
            // The listing's own file type where it says (no look-up); a
            // link, or a file system that does not say, is followed.
            let is_dir = match entry.file_type() {
                Ok(kind) if !kind.is_symlink() => kind.is_dir(),
                _ => std::fs::metadata(&path).is_ok_and(|m| m.is_dir()),
            };
            entries.push(DirEntry {
                name: entry.file_name(),
                path,
                is_dir,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("b.txt"), b"hello world").unwrap();
        std::fs::write(dir.path().join("a.txt"), b"").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink("b.txt", dir.path().join("link")).unwrap();
            std::os::unix::fs::symlink("nowhere", dir.path().join("dangling")).unwrap();
            std::os::unix::fs::symlink("sub", dir.path().join("sublink")).unwrap();
        }
        dir
    }

    #[test]
    fn read_is_bounded() {
        let dir = tree();
        let p = dir.path().join("b.txt");
        assert_eq!(RealFs.read(&p, 100).unwrap(), b"hello world");
        assert_eq!(RealFs.read(&p, 4).unwrap(), b"hello");
        assert_eq!(RealFs.read(&p, u64::MAX).unwrap(), b"hello world");
        // The stream gives the same bytes, as bounded.
        let streamed = |limit| {
            let mut bytes = Vec::new();
            RealFs
                .reader(&p, limit)
                .unwrap()
                .read_to_end(&mut bytes)
                .unwrap();
            bytes
        };
        assert_eq!(streamed(100), b"hello world");
        assert_eq!(streamed(4), b"hello");
        // What is not a regular file is refused at once: a FIFO (whose
        // open would wait for a writer), a device.
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        for odd in [fifo.as_path(), Path::new("/dev/zero"), dir.path()] {
            let err = RealFs.read(odd, 4).unwrap_err();
            assert!(
                err.to_string().contains("not a regular file"),
                "{}: {err}",
                odd.display()
            );
            let Err(err) = RealFs.reader(odd, 4) else {
                panic!("{}: a stream of what is not a regular file", odd.display());
            };
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
        let err = RealFs.read(&dir.path().join("missing"), 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn read_of_files_around_the_first_buffer_is_whole_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let first = usize::try_from(FIRST_READ).unwrap();
        for len in [0, 1, first - 1, first, first + 1, 3 * first + 7] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let p = dir.path().join(format!("f{len}"));
            std::fs::write(&p, &data).unwrap();
            assert_eq!(RealFs.read(&p, u64::MAX).unwrap(), data, "{len} bytes");
            assert_eq!(RealFs.read(&p, len as u64).unwrap(), data, "{len} bytes");
            for limit in [0, len / 2, first, first + 3] {
                let got = RealFs.read(&p, limit as u64).unwrap();
                let want = &data[..len.min(limit + 1)];
                assert_eq!(got, want, "{len} bytes, limit {limit}");
            }
        }
    }

    #[test]
    fn read_dir_is_sorted_and_follows_links() {
        let dir = tree();
        let entries = RealFs.read_dir(dir.path()).unwrap();
        let names: Vec<_> = entries
            .iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        let sub = entries.iter().find(|e| e.name == "sub").unwrap();
        assert!(sub.is_dir);
        assert_eq!(sub.path, dir.path().join("sub"));
        #[cfg(unix)]
        assert!(entries.iter().find(|e| e.name == "sublink").unwrap().is_dir);
        assert!(!entries.iter().find(|e| e.name == "a.txt").unwrap().is_dir);
    }

    #[cfg(unix)]
    #[test]
    fn metadata_link_semantics() {
        let dir = tree();
        let link = RealFs.metadata(&dir.path().join("link")).unwrap();
        assert_eq!(
            link,
            FsMetadata {
                len: 11,
                is_dir: false,
                is_file: true,
                is_symlink: true
            }
        );
        let dangling = RealFs.metadata(&dir.path().join("dangling")).unwrap();
        assert!(dangling.is_symlink && !dangling.is_file && !dangling.is_dir);
        assert!(!RealFs.exists(&dir.path().join("dangling")));
        let sub = RealFs.metadata(&dir.path().join("sub")).unwrap();
        assert!(sub.is_dir && !sub.is_symlink);
        assert!(RealFs.metadata(&dir.path().join("missing")).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn canonicalize_resolves_links() {
        let dir = tree();
        let real = RealFs.canonicalize(dir.path()).unwrap();
        assert_eq!(
            RealFs.canonicalize(&dir.path().join("link")).unwrap(),
            real.join("b.txt")
        );
        assert!(RealFs.canonicalize(&dir.path().join("dangling")).is_err());
    }
}
