//! Unit tests of the native importer: ABI versions 1 and 3, buffers freed
//! once, ELF checks.

use super::*;
use forgesyte_protocol::fingerprint::{self, FingerprintError};
use proptest::prelude::*;

/// A hand-written ABI-3 table whose `call_binary` returns the binary
/// arguments as binary results (a pointer `\xff` when the tool is
/// `bad`), counting what is freed.
mod counted {
    use super::*;
    use forgesyte_protocol::abi::FsBinaryResult;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub(super) static BUFFERS: AtomicUsize = AtomicUsize::new(0);
    pub(super) static LISTS: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn create(
        _: *const u8,
        _: usize,
        _: *mut *mut c_void,
        _: *mut FsBuffer,
    ) -> FsStatus {
        STATUS_BAD_REQUEST
    }
    unsafe extern "C" fn tools(_: *const c_void, _: *mut FsBuffer) -> FsStatus {
        STATUS_BAD_REQUEST
    }
    unsafe extern "C" fn call(
        _: *const c_void,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *mut FsBuffer,
    ) -> FsStatus {
        STATUS_BAD_REQUEST
    }
    unsafe extern "C" fn destroy(_: *mut c_void) {}
    unsafe extern "C" fn free_buffer(buf: FsBuffer) {
        if !buf.ptr.is_null() {
            BUFFERS.fetch_add(1, Ordering::SeqCst);
            // SAFETY: made by `FsBuffer::from_vec` below.
            drop(unsafe { Vec::from_raw_parts(buf.ptr, buf.len, buf.cap) });
        }
    }
    unsafe extern "C" fn free_results(list: FsResultList) {
        if !list.ptr.is_null() {
            LISTS.fetch_add(1, Ordering::SeqCst);
            // SAFETY: made by `FsResultList::from_vec` below.
            drop(unsafe { Vec::from_raw_parts(list.ptr, list.len, list.cap) });
        }
    }
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn call_binary(
        _: *const c_void,
        tool: *const u8,
        tool_len: usize,
        _: *const u8,
        _: usize,
        binary: *const FsBinaryArg,
        binary_len: usize,
        out: *mut FsBuffer,
        out_binary: *mut FsResultList,
    ) -> FsStatus {
        // SAFETY: the host's slices, valid for the call.
        let (tool, args) = unsafe {
            (
                std::slice::from_raw_parts(tool, tool_len),
                std::slice::from_raw_parts(binary, binary_len),
            )
        };
        let results = args
            .iter()
            .map(|arg| {
                // SAFETY: as above.
                let (pointer, bytes) = unsafe {
                    (
                        std::slice::from_raw_parts(arg.pointer.ptr, arg.pointer.len),
                        std::slice::from_raw_parts(arg.bytes.ptr, arg.bytes.len),
                    )
                };
                let pointer = if tool == b"bad" { b"\xff" } else { pointer };
                FsBinaryResult {
                    pointer: FsBuffer::from_vec(pointer.to_vec()),
                    bytes: FsBuffer::from_vec(bytes.to_vec()),
                }
            })
            .collect();
        // SAFETY: the host's slots.
        unsafe {
            out.write(FsBuffer::from_vec(b"{\"a\":null,\"b\":null}".to_vec()));
            out_binary.write(FsResultList::from_vec(results));
        }
        STATUS_OK
    }

    pub(super) static TABLE: PluginVTable = PluginVTable {
        abi_version: ABI_VERSION,
        sdk_version: c"test".as_ptr(),
        rustc_version: c"test".as_ptr(),
        create,
        tools,
        call,
        destroy,
        free_buffer,
        call_binary,
        free_results,
    };
}

#[test]
fn binary_results_are_the_plugins_buffers_freed_once_when_the_last_share_drops() {
    use std::sync::atomic::Ordering;
    let instance = NativeInstance {
        vtable: Table::V3(&counted::TABLE),
        call_context: None,
        handle: std::ptr::null_mut(),
        tools: Arc::from([]),
    };
    let buffers = || counted::BUFFERS.load(Ordering::SeqCst);
    let lists = || counted::LISTS.load(Ordering::SeqCst);
    let (b0, l0) = (buffers(), lists());
    let out = instance
        .invoke("ok", b"{}", &[("/a", b"\x00\x01"), ("/b", b"xyz")])
        .unwrap();
    assert_eq!(out.json, br#"{"a":null,"b":null}"#);
    assert_eq!(out.binary.len(), 2);
    assert_eq!(
        (out.binary[0].0.as_str(), &out.binary[0].1[..]),
        ("/a", &b"\x00\x01"[..])
    );
    assert_eq!(
        (out.binary[1].0.as_str(), &out.binary[1].1[..]),
        ("/b", &b"xyz"[..])
    );
    // The JSON and the two pointers are freed; the array at once; the
    // bytes only when their last share drops.
    assert_eq!((buffers() - b0, lists() - l0), (3, 1));
    let share = out.binary[0].1.clone();
    drop(out);
    assert_eq!(buffers() - b0, 4);
    drop(share);
    assert_eq!(buffers() - b0, 5);
    // A pointer that is not UTF-8: a protocol error, everything freed.
    let err = instance.invoke("bad", b"{}", &[("/a", b"1")]).unwrap_err();
    assert!(matches!(err, ToolError::Protocol { .. }), "{err}");
    assert_eq!((buffers() - b0, lists() - l0), (8, 2));
    assert!(instance.takes_binary());
}

#[test]
fn open_errors_are_classified() {
    let p = Path::new("/p/libx.so");
    assert!(matches!(
        classify_open_error(p, "/p/libx.so: undefined symbol: foo"),
        ImportError::UnresolvedSymbol { .. }
    ));
    assert!(matches!(
        classify_open_error(
            p,
            "libbar.so: cannot open shared object file: No such file or directory"
        ),
        ImportError::MissingSharedLibrary { .. }
    ));
    assert!(matches!(
        classify_open_error(p, "/p/libx.so: invalid ELF header"),
        ImportError::NotALibrary { .. }
    ));
    assert!(matches!(
        classify_open_error(p, "/p/libx.so: file too short"),
        ImportError::NotALibrary { .. }
    ));
}

#[test]
fn missing_file_is_not_found() {
    let err = NativeLibrary::open(Path::new("/definitely/not/here/libx.so")).unwrap_err();
    assert!(matches!(err, ImportError::LibraryNotFound { .. }));
}

#[test]
fn text_file_is_not_a_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libx.so");
    std::fs::write(&path, "hello, I am not ELF").unwrap();
    let err = NativeLibrary::open(&path).unwrap_err();
    assert!(matches!(err, ImportError::NotALibrary { .. }), "{err}");
    // An empty one says so.
    std::fs::write(&path, "").unwrap();
    let err = NativeLibrary::open(&path).unwrap_err();
    assert!(
        matches!(err, ImportError::NotALibrary { .. })
            && err.to_string().ends_with("the file is empty (0 bytes)"),
        "{err}"
    );
}

fn fp(abi: u32, sdk: &str, rustc: &str, target: &str) -> Fingerprint {
    let record = fingerprint::build_record(abi, sdk, rustc, target);
    Fingerprint::parse(&record).unwrap()
}

#[test]
fn fingerprints_are_vetted_against_the_host() {
    let p = Path::new("/p/libx.so");
    let host = fp(1, "0.1.0", "rustc 1.95.0", "x86_64-unknown-linux-gnu");
    // No section, or a record from a newer SDK: opened, the ABI version
    // is checked after dlopen.
    assert_eq!(vet_fingerprint(p, None, &host).unwrap(), None);
    let future = Err(FingerprintError::UnknownFormat { format: 2 });
    assert_eq!(vet_fingerprint(p, Some(future), &host).unwrap(), None);
    // Same build, or only another SDK / compiler: accepted.
    let same = vet_fingerprint(p, Some(Ok(host.clone())), &host).unwrap();
    assert_eq!(same.as_ref(), Some(&host));
    let other = fp(1, "0.3.0", "rustc 1.99.0", "x86_64-unknown-linux-gnu");
    let got = vet_fingerprint(p, Some(Ok(other.clone())), &host).unwrap();
    assert_eq!(got, Some(other));
    // A host of ABI 3 still takes ABI 1 (JSON only), not 2 (skipped).
    let host3 = fp(3, "0.1.0", "rustc 1.95.0", "x86_64-unknown-linux-gnu");
    let v1 = fp(1, "0.1.0", "rustc 1.95.0", "x86_64-unknown-linux-gnu");
    let got = vet_fingerprint(p, Some(Ok(v1.clone())), &host3).unwrap();
    assert_eq!(got, Some(v1));
    let two = fp(2, "0.1.0", "rustc 1.95.0", "x86_64-unknown-linux-gnu");
    let err = vet_fingerprint(p, Some(Ok(two)), &host3).unwrap_err();
    assert!(
        matches!(
            err,
            ImportError::AbiMismatch {
                host: 3,
                plugin: 2,
                ..
            }
        ),
        "{err}"
    );
    // Another ABI: refused, both versions named.
    let err = vet_fingerprint(p, Some(Ok(fp(7, "0.1.0", "r", &host.target))), &host).unwrap_err();
    assert!(
        matches!(
            err,
            ImportError::AbiMismatch {
                host: 1,
                plugin: 7,
                ..
            }
        ),
        "{err}"
    );
    // Another target: refused, both named.
    let err = vet_fingerprint(
        p,
        Some(Ok(fp(
            1,
            "0.1.0",
            "rustc 1.95.0",
            "aarch64-unknown-linux-musl",
        ))),
        &host,
    )
    .unwrap_err();
    assert!(matches!(err, ImportError::Incompatible { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("'aarch64-unknown-linux-musl'"), "{text}");
    assert!(text.contains("'x86_64-unknown-linux-gnu'"), "{text}");
    // A damaged record: refused.
    let err = vet_fingerprint(p, Some(Err(FingerprintError::BadMagic)), &host).unwrap_err();
    assert!(matches!(err, ImportError::InvalidInterface { .. }), "{err}");
    assert!(err.to_string().contains(".forgesyte_abi"), "{err}");
}

#[test]
fn a_file_without_the_section_passes_inspection() {
    // This test binary: a position-independent executable is ET_DYN
    // like a library (a fixed-address one is refused as not a library);
    // it has no fingerprint section, so nothing is vetted.
    let exe = std::env::current_exe().unwrap();
    match inspect(&exe) {
        Ok(found) => assert_eq!(found, None),
        Err(err) => assert!(matches!(err, ImportError::NotALibrary { .. }), "{err}"),
    }
}

#[test]
fn error_bodies_are_read_leniently() {
    assert_eq!(
        error_parts(br#"{"error_type":"InvalidInput","message":"bad"}"#),
        (Some("InvalidInput".into()), "bad".into())
    );
    assert_eq!(error_parts(b"plain"), (None, "plain".into()));
}

/// The smallest file `inspect` accepts with a fingerprint: a 64-bit
/// little-endian ELF shared object (x86-64) of 856 bytes with one
/// loadable segment (the whole file) and three sections: the null one,
/// `.shstrtab`, and `.forgesyte_abi` holding `record`.
fn tiny_library(record: &[u8]) -> Vec<u8> {
    const NAMES: &[u8] = b"\0.shstrtab\0.forgesyte_abi\0";
    let names_at = 64 + 56;
    let record_at = names_at + NAMES.len();
    let shoff = (record_at + record.len()).next_multiple_of(8);
    let total = shoff + 3 * 64;
    let mut elf = Vec::with_capacity(total);
    let u16 = |elf: &mut Vec<u8>, v: u16| elf.extend_from_slice(&v.to_le_bytes());
    let u32 = |elf: &mut Vec<u8>, v: u32| elf.extend_from_slice(&v.to_le_bytes());
    let u64 = |elf: &mut Vec<u8>, v: usize| elf.extend_from_slice(&(v as u64).to_le_bytes());
    // File header.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    u16(&mut elf, 3); // ET_DYN
    u16(&mut elf, 62); // EM_X86_64
    u32(&mut elf, 1);
    u64(&mut elf, 0); // e_entry
    u64(&mut elf, 64); // e_phoff
    u64(&mut elf, shoff);
    u32(&mut elf, 0); // e_flags
    for v in [64, 56, 1, 64, 3, 1] {
        // e_ehsize, e_phentsize, e_phnum, e_shentsize, e_shnum, e_shstrndx
        u16(&mut elf, v);
    }
    // PT_LOAD over the whole file.
    u32(&mut elf, 1);
    u32(&mut elf, 4);
    for v in [0, 0, 0, total, total, 0x1000] {
        u64(&mut elf, v);
    }
    elf.extend_from_slice(NAMES);
    elf.extend_from_slice(record);
    elf.resize(shoff, 0);
    elf.resize(shoff + 64, 0); // the null section
    for (name, kind, at, size) in [
        (1, 3, names_at, NAMES.len()),
        (11, 1, record_at, record.len()),
    ] {
        u32(&mut elf, name);
        u32(&mut elf, kind);
        u64(&mut elf, 0); // sh_flags
        u64(&mut elf, 0); // sh_addr
        u64(&mut elf, at);
        u64(&mut elf, size);
        u32(&mut elf, 0);
        u32(&mut elf, 0);
        u64(&mut elf, 1);
        u64(&mut elf, 0);
    }
    assert_eq!(elf.len(), total);
    elf
}

fn this_hosts_record() -> Vec<u8> {
    let host = Fingerprint::current();
    fingerprint::build_record(
        host.abi_version,
        &host.sdk_version,
        &host.rustc_version,
        &host.target,
    )
    .to_vec()
}

fn inspect_bytes(bytes: &[u8]) -> Result<Option<Fingerprint>, ImportError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libhostile.so");
    std::fs::write(&path, bytes).unwrap();
    // The check made before opening a library from its path reads its
    // dynamic section too (`origin`): the same bytes, never a panic, and
    // never a refusal of its own.
    let check = |origin| {
        let file = std::fs::File::open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        check_elf(&file, len, &path, origin).map(|elf| elf.origin_path)
    };
    let (with, without) = (check(true), check(false));
    assert_eq!(with.is_ok(), without.is_ok(), "{with:?} / {without:?}");
    inspect(&path)
}

/// A refused file: an import error that names the file and says why.
fn refused_with_a_reason(err: &ImportError) -> Result<(), TestCaseError> {
    let text = err.to_string();
    prop_assert!(text.contains("libhostile.so"), "{text}");
    prop_assert!(
        matches!(
            err,
            ImportError::NotALibrary { .. }
                | ImportError::InvalidInterface { .. }
                | ImportError::AbiMismatch { .. }
                | ImportError::Incompatible { .. }
        ),
        "{err:?}"
    );
    Ok(())
}

#[test]
fn the_tiny_library_passes_inspection_with_its_fingerprint() {
    let found = inspect_bytes(&tiny_library(&this_hosts_record())).unwrap();
    assert_eq!(found, Some(Fingerprint::current()));
    let other = fingerprint::build_record(ABI_VERSION + 1, "0", "r", "t");
    let err = inspect_bytes(&tiny_library(&other)).unwrap_err();
    assert!(matches!(err, ImportError::AbiMismatch { .. }), "{err}");
}

/// A library prepared ahead of its opening (`prepare`, on a load pass's
/// pool) and replaced before it: its opening checks the file it opens, not
/// the one prepared.
#[test]
fn a_library_replaced_after_its_preparation_is_checked_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("libreplaced.so");
    std::fs::write(&path, tiny_library(&this_hosts_record())).unwrap();
    let prepared = NativeLibrary::prepare(&path).unwrap();
    let newer = dir.path().join("libreplaced.so.new");
    let other = fingerprint::build_record(ABI_VERSION + 1, "0", "r", "t");
    std::fs::write(&newer, tiny_library(&other)).unwrap();
    std::fs::rename(&newer, &path).unwrap();
    let err = NativeLibrary::open_with(&path, Some(prepared)).unwrap_err();
    assert!(matches!(err, ImportError::AbiMismatch { .. }), "{err}");
}

proptest! {
    // Each case writes a file of at most a few KiB and reads it back:
    // 256 cases take under a second.
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes, often behind a valid ELF identification so that
    /// the header fields are what is arbitrary.
    #[test]
    fn arbitrary_files_are_refused_with_a_reason(mut bytes in prop::collection::vec(any::<u8>(), 0..1024),
                                                elf_magic in any::<bool>()) {
        if elf_magic && bytes.len() >= 6 {
            bytes[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        }
        if let Err(e) = inspect_bytes(&bytes) {
            refused_with_a_reason(&e)?;
        }
    }

    /// A real library (the tiny one, or `/bin/true` where there is one)
    /// with bytes flipped and cut short: offsets, counts and sizes of
    /// anything up to 2^64 are refused or ignored without reading (or
    /// allocating) past the end of the file, never a panic.
    #[test]
    fn damaged_libraries_are_refused_with_a_reason(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        in_headers in any::<bool>(),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        real in any::<bool>(),
    ) {
        let mut bytes = match std::fs::read("/bin/true") {
            Ok(bytes) if real => bytes,
            _ => tiny_library(&this_hosts_record()),
        };
        let len = bytes.len();
        for (at, byte) in flips {
            // Half the flips hit the headers (the first 120 bytes or
            // the section table at the end), where a byte means most.
            let i = if in_headers {
                let header = at.index(120 + 192);
                if header < 120 { header } else { len - 192 + (header - 120) }
            } else {
                at.index(len)
            };
            bytes[i] = byte;
        }
        if truncate {
            bytes.truncate(cut.index(len));
        }
        if let Err(e) = inspect_bytes(&bytes) {
            refused_with_a_reason(&e)?;
        }
    }
}

/// A table with null function fields is named field by field, read as raw
/// pointers (a C plugin's null `create` crashed the host); the fields a
/// version's table lacks are not read.
#[test]
fn null_function_fields_of_a_table_are_named() {
    use std::mem::{offset_of, size_of};
    // Zeroed, aligned as the table is, never called: only read as pointers.
    let mut raw = vec![0_usize; size_of::<PluginVTable>().div_ceil(size_of::<usize>())];
    let table = raw.as_mut_ptr().cast::<PluginVTable>();
    assert_eq!(
        super::null_functions(table, ABI_VERSION),
        [
            "create",
            "tools",
            "call",
            "destroy",
            "free_buffer",
            "call_binary",
            "free_results"
        ]
    );
    assert_eq!(
        super::null_functions(table, ABI_VERSION_1),
        ["create", "tools", "call", "destroy", "free_buffer"]
    );
    for field in [
        offset_of!(PluginVTable, create),
        offset_of!(PluginVTable, tools),
        offset_of!(PluginVTable, destroy),
        offset_of!(PluginVTable, free_buffer),
        offset_of!(PluginVTable, call_binary),
        offset_of!(PluginVTable, free_results),
    ] {
        raw[field / size_of::<usize>()] = 1;
    }
    let table = raw.as_mut_ptr().cast::<PluginVTable>();
    assert_eq!(super::null_functions(table, ABI_VERSION), ["call"]);
    assert_eq!(super::null_functions(table, ABI_VERSION_1), ["call"]);
}

/// A library file with holes on a memory filesystem is told apart (it is
/// loaded from a copy of its bytes: a mapping of it died of SIGBUS on a
/// full tmpfs); one without holes is not. A memory file is on the same
/// filesystem as tmpfs.
#[test]
fn a_sparse_file_on_a_memory_filesystem_is_told_apart() {
    use std::io::Write as _;
    let memfd = |name: &str| -> std::fs::File {
        rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
            .unwrap()
            .into()
    };
    let mut sparse = memfd("sparse");
    sparse.write_all(b"\x7fELF").unwrap();
    sparse.set_len(1 << 20).unwrap();
    assert!(super::holes_on_memory_fs(&sparse, 1 << 20));
    // Read from its start afterwards.
    let mut head = [0u8; 4];
    std::io::Read::read_exact(&mut sparse, &mut head).unwrap();
    assert_eq!(&head, b"\x7fELF");
    let mut dense = memfd("dense");
    dense.write_all(&vec![1u8; 1 << 16]).unwrap();
    assert!(!super::holes_on_memory_fs(&dense, 1 << 16));
}

/// A library read whole (a sparse one on tmpfs, one opened again) is read
/// only up to its cap: a file's stated size is not memory the server has.
#[test]
fn a_library_copied_into_memory_is_bounded_before_it_is_read() {
    let file: std::fs::File = rustix::fs::memfd_create("huge", rustix::fs::MemfdFlags::CLOEXEC)
        .unwrap()
        .into();
    file.set_len(64 << 30).unwrap();
    let meta = file.metadata().unwrap();
    let path = Path::new("/plugins/huge/libhuge.so");
    match super::read_whole(&file, &meta, path) {
        Err(ImportError::Open { detail, .. }) => assert!(
            detail.starts_with("68719476736 bytes, more than the 4294967296 bytes of a library"),
            "{detail}"
        ),
        other => panic!("{other:?}"),
    }
    file.set_len(3).unwrap();
    let meta = file.metadata().unwrap();
    assert_eq!(super::read_whole(&file, &meta, path).unwrap(), [0, 0, 0]);
}
