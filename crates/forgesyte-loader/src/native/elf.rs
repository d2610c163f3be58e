//! Reading a plugin library as data before `dlopen` runs any of it (see
//! the [`super`] module's "Before `dlopen`"): a complete 64-bit ELF shared
//! object, its build fingerprint vetted against the host's, and the
//! `$ORIGIN` run path its shipped libraries are checked by (`origin`).

use std::path::Path;

use forgesyte_errors::ImportError;
use forgesyte_protocol::abi::SUPPORTED_ABI_VERSIONS;
use forgesyte_protocol::fingerprint::{self, Fingerprint, FingerprintError};

use super::{origin, pread};

/// Checks a plugin library **without opening it**: the file exists, is a
/// complete 64-bit ELF shared object, and its build fingerprint (if it has
/// one) matches this host's ABI version and target. Returns the fingerprint,
/// or `None` for a library without one (see the [module
/// documentation](crate::native) for what is an error and what is only logged).
pub fn inspect(path: &Path) -> Result<Option<Fingerprint>, ImportError> {
    let (file, meta) = open_regular(path, path)?;
    let elf = check_elf(&file, meta.len(), path, false)?;
    vet_fingerprint(path, elf.fingerprint, &Fingerprint::current())
}

/// What the ELF check read of a library.
pub(super) struct Elf {
    /// Its fingerprint record: `None` when it has no fingerprint section.
    pub(super) fingerprint: Option<Result<Fingerprint, FingerprintError>>,
    /// The libraries it names and the `$ORIGIN` entries of its run path,
    /// when it has any (`origin::read`).
    pub(super) origin_path: Option<origin::OriginPath>,
}

/// Decides what a library's fingerprint record (`found`: `None` when the
/// file has no fingerprint section) means for a host whose own is `host`.
pub(super) fn vet_fingerprint(
    path: &Path,
    found: Option<Result<Fingerprint, FingerprintError>>,
    host: &Fingerprint,
) -> Result<Option<Fingerprint>, ImportError> {
    let plugin = match found {
        None => {
            tracing::debug!(
                path = %path.display(),
                "no {} section: the ABI version is checked after opening",
                fingerprint::SECTION
            );
            return Ok(None);
        }
        Some(Err(err @ FingerprintError::UnknownFormat { .. })) => {
            tracing::warn!(
                path = %path.display(),
                "{err}: the ABI version is checked after opening"
            );
            return Ok(None);
        }
        Some(Err(err)) => {
            return Err(ImportError::InvalidInterface {
                path: path.to_path_buf(),
                detail: format!("damaged {} section: {err}", fingerprint::SECTION),
            });
        }
        Some(Ok(plugin)) => plugin,
    };
    if plugin.abi_version != host.abi_version
        && !SUPPORTED_ABI_VERSIONS.contains(&plugin.abi_version)
    {
        return Err(ImportError::AbiMismatch {
            path: path.to_path_buf(),
            host: host.abi_version,
            plugin: plugin.abi_version,
        });
    }
    if plugin.target != host.target {
        return Err(ImportError::Incompatible {
            path: path.to_path_buf(),
            detail: format!(
                "built for target '{}', this host is '{}'",
                plugin.target, host.target
            ),
        });
    }
    if plugin.sdk_version != host.sdk_version || plugin.rustc_version != host.rustc_version {
        tracing::warn!(
            path = %path.display(),
            plugin = %plugin,
            host = %host,
            "plugin built with another SDK or compiler version; compatible (same ABI {})",
            host.abi_version
        );
    }
    Ok(Some(plugin))
}

/// The regular file at `load` (named `path` in errors), opened, and its
/// metadata (one `fstat`): missing is [`ImportError::LibraryNotFound`],
/// anything but a regular file [`ImportError::Open`], "not a regular
/// file".
pub(super) fn open_regular(
    load: &Path,
    path: &Path,
) -> Result<(std::fs::File, std::fs::Metadata), ImportError> {
    let not_found = || ImportError::LibraryNotFound {
        path: path.to_path_buf(),
    };
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => not_found(),
        _ => ImportError::Open {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    };
    // Not a regular file (a FIFO, whose open would wait for a writer, a
    // device): refused without waiting, and said so.
    forgesyte_deps::open_regular(load).map_err(io)
}

/// Reads the ELF headers without running anything, so that files `dlopen`
/// would crash on (a truncated library makes glibc's loader touch mapped
/// pages past the end of the file: SIGBUS) are rejected with a reason; then
/// reads the fingerprint section and, with `origin` (a library about to be
/// opened), its `$ORIGIN` run path, if any.
pub(super) fn check_elf(
    file: &std::fs::File,
    file_len: u64,
    path: &Path,
    origin: bool,
) -> Result<Elf, ImportError> {
    use object::elf::{ET_DYN, FileHeader64, PT_LOAD};
    use object::read::elf::{FileHeader as _, ProgramHeader as _};

    let not_a_library = |detail: String| ImportError::NotALibrary {
        path: path.to_path_buf(),
        detail,
    };
    // Truncated to nothing (`: > lib.so`, a copy cut short): said so, not
    // as a header of the wrong size.
    if file_len == 0 {
        return Err(not_a_library("the file is empty (0 bytes)".into()));
    }
    let data = object::ReadCache::new(pread::PreadFile::new(file, file_len));
    let header = FileHeader64::<object::Endianness>::parse(&data)
        .map_err(|e| not_a_library(format!("not a 64-bit ELF file ({e})")))?;
    let endian = header
        .endian()
        .map_err(|e| not_a_library(format!("bad ELF header ({e})")))?;
    if header.e_type(endian) != ET_DYN {
        return Err(not_a_library("ELF file is not a shared object".into()));
    }
    let segments = header.program_headers(endian, &data).map_err(|e| {
        not_a_library(format!(
            "truncated or corrupt: program headers unreadable ({e})"
        ))
    })?;
    for segment in segments {
        if segment.p_type(endian) != PT_LOAD {
            continue;
        }
        let end = segment
            .p_offset(endian)
            .checked_add(segment.p_filesz(endian));
        if end.is_none_or(|end| end > file_len) {
            return Err(not_a_library(format!(
                "truncated or corrupt: a loadable segment ends past the end of the {file_len}-byte file"
            )));
        }
    }
    let origin_path = if origin {
        origin::read(&data, endian, segments)
    } else {
        None
    };
    Ok(Elf {
        fingerprint: fingerprint_record(&data, header, endian, path),
        origin_path,
    })
}

/// The fingerprint record of the ELF file in `data`: `None` when it has no
/// fingerprint section (or no readable section table).
fn fingerprint_record<'data>(
    data: impl object::ReadRef<'data>,
    header: &object::elf::FileHeader64<object::Endianness>,
    endian: object::Endianness,
    path: &Path,
) -> Option<Result<Fingerprint, FingerprintError>> {
    use object::read::elf::{FileHeader as _, SectionHeader as _};

    // `dlopen` never reads section headers; a library whose table is
    // unreadable loads fine, so that alone is no reason to refuse it.
    // The section table and its name table are read in one piece each
    // (looking names up one by one costs a read per section).
    let table = (|| -> Result<_, String> {
        let sections = header
            .section_headers(endian, data)
            .map_err(|e| e.to_string())?;
        let index = header.shstrndx(endian, data).map_err(|e| e.to_string())?;
        let (offset, size) = sections
            .get(index as usize)
            .and_then(|names| names.file_range(endian))
            .ok_or("no section name table")?;
        let names = data
            .read_bytes_at(offset, size)
            .map_err(|()| "section name table past the end of the file")?;
        Ok((sections, names))
    })();
    let (sections, names) = match table {
        Ok(table) => table,
        Err(e) => {
            tracing::debug!(path = %path.display(), "section headers unreadable: {e}");
            return None;
        }
    };
    let wanted = fingerprint::SECTION.as_bytes();
    let section = sections.iter().find(|section| {
        names
            .get(section.sh_name(endian) as usize..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            == Some(wanted)
    })?;
    // Only the first record is read: a corrupt size cannot make us read
    // (or allocate) more than that.
    let Some((offset, size)) = section.file_range(endian) else {
        // SHT_NOBITS: no bytes in the file.
        return Some(Err(FingerprintError::TooShort { len: 0 }));
    };
    let len = size.min(fingerprint::RECORD_LEN as u64);
    Some(match data.read_bytes_at(offset, len) {
        Ok(bytes) => Fingerprint::parse(bytes),
        Err(()) => Err(FingerprintError::Malformed {
            detail: format!(
                "section of {size} bytes at offset {offset} lies past the end of the file"
            ),
        }),
    })
}
