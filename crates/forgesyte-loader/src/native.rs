//! The host side of the plugin C ABI (SPEC §6): dlopen an SDK-built library,
//! check its ABI version, create instances and call tools.
//!
//! This is the only module of the loader that contains `unsafe` code. The ABI
//! itself (the vtable layout, status codes, who frees what) is defined once,
//! in `forgesyte_protocol::abi`, so the two sides cannot drift apart.
//!
//! Libraries are opened with `RTLD_NOW` (an unresolved symbol is an import
//! error now, not a crash at the first call) and `RTLD_NODELETE` (they are
//! never unmapped: code or thread-local destructors of a plugin may still run
//! after its last instance is dropped).
//!
//! # Before `dlopen`
//!
//! Opening a library runs its initialisers, so [`inspect`] first reads the
//! file as data (with the `object` crate) and refuses what must not be
//! opened:
//!
//! - a file that is not a 64-bit ELF shared object, or is truncated
//!   (`ImportError::NotALibrary`);
//! - a build fingerprint (the `.forgesyte_abi` section that
//!   `export_plugin!` emits, see `forgesyte_protocol::fingerprint`) with
//!   an ABI version other than 1 or 3 (`ImportError::AbiMismatch`; a
//!   version-1 library is called through the first part of the table, see
//!   `forgesyte_protocol::abi`) or another target
//!   triple than the host's (`ImportError::Incompatible`); a section that is
//!   there but damaged is `ImportError::InvalidInterface`;
//! - a library it ships beside it (a `DT_NEEDED` name that its `$ORIGIN`
//!   run path finds) whose name the process has loaded already from another
//!   file with other bytes, which the dynamic loader would hand it instead
//!   (`ImportError::SharedLibraryShadowed`, see `origin.rs`).
//!
//! A different SDK or compiler version is only logged (`warn`): nothing of
//! Rust's own ABI crosses the boundary, only C structures and JSON. A
//! library **without** the section (built by hand, by another tool, or an
//! SDK older than the fingerprint), or with a record format newer than this
//! host reads, is opened as before: the entry symbol lookup and the vtable's
//! ABI version, checked right after `dlopen` and before any plugin call,
//! still refuse it with a precise reason.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_void};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use forgesyte_errors::{ImportError, InitError, ToolError};
use forgesyte_protocol::abi::{
    ABI_VERSION, ABI_VERSION_1, CALL_CONTEXT_SYMBOL_C, CallContextFn, ENTRY_SYMBOL, ENTRY_SYMBOL_C,
    FsBinaryArg, FsBuffer, FsResultList, FsSlice, FsStatus, LOG_SINK_SYMBOL_C, LogSinkFn,
    PluginBuffer, PluginVTable, PluginVTableV1, STATUS_BAD_REQUEST, STATUS_ERROR, STATUS_OK,
    STATUS_PANIC, STATUS_UNKNOWN_TOOL,
};
use forgesyte_protocol::fingerprint::Fingerprint;
use forgesyte_protocol::wire::CallContext;
use libc::RTLD_NODELETE;
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

use crate::host::{CallOutput, Importer, PluginInstance, PluginLibrary, Prepared, ToolInfo};

pub use self::elf::inspect;
use self::elf::{Elf, check_elf, open_regular, vet_fingerprint};
pub(crate) use self::origin::names_origin;

/// Opens real shared libraries built with `forgesyte-plugin-sdk`.
#[derive(Debug, Default, Clone, Copy)]
pub struct NativeImporter;

impl Importer for NativeImporter {
    fn open(&self, path: &Path) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        NativeLibrary::open(path).map(|lib| Arc::new(lib) as Arc<dyn PluginLibrary>)
    }

    fn open_bytes(&self, path: &Path, bytes: &[u8]) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        NativeLibrary::open_bytes(path, bytes).map(|lib| Arc::new(lib) as Arc<dyn PluginLibrary>)
    }

    /// The file read ahead and its ELF headers checked (`NativeLibrary::prepare`).
    fn prepare(&self, path: &Path) -> Result<Prepared, ImportError> {
        NativeLibrary::prepare(path).map(|elf| Prepared(Some(Box::new(elf))))
    }

    fn open_prepared(
        &self,
        path: &Path,
        prepared: Prepared,
    ) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        NativeLibrary::open_with(path, prepared.0.map(|elf| *elf))
            .map(|lib| Arc::new(lib) as Arc<dyn PluginLibrary>)
    }
}

/// A library's ELF check made ahead of its opening ([`NativeLibrary::prepare`]),
/// with the identity of the file it read.
pub(crate) struct PreparedElf {
    file: FileIdentity,
    elf: Elf,
}

impl fmt::Debug for PreparedElf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedElf")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// What tells a file from another, or from itself changed: device, inode,
/// size, and the change time (which every write and every change of its
/// metadata moves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    ctime: (i64, i64),
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// [`sealed_memfd`], failing as the import of the library at `path`.
pub(crate) fn sealed_copy(path: &Path, bytes: &[u8]) -> Result<std::os::fd::OwnedFd, ImportError> {
    sealed_memfd(path, bytes).map_err(|e| ImportError::Open {
        path: path.to_path_buf(),
        detail: format!("cannot copy its bytes into a sealed memory file: {e}"),
    })
}

/// A memory file holding `bytes`, sealed against any change (named after
/// `path`'s file name; closed on exec; never one of the standard
/// descriptors 0 to 2, which a runner's own stdio would take).
fn sealed_memfd(path: &Path, bytes: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    use std::io::Write as _;
    let name = path
        .file_name()
        .map_or_else(|| "plugin".to_owned(), |n| n.to_string_lossy().into_owned());
    let mut fd = rustix::fs::memfd_create(
        name.replace('\0', "_").as_str(),
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    if std::os::fd::AsRawFd::as_raw_fd(&fd) < 3 {
        // A server started with a standard descriptor closed.
        fd = rustix::io::fcntl_dupfd_cloexec(&fd, 3)?;
    }
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(file.into())
}

/// A library's vtable, by the ABI version it speaks: version 1's table
/// only, or all of version 3's.
#[derive(Clone, Copy)]
enum Table {
    V1(&'static PluginVTableV1),
    V3(&'static PluginVTable),
}

impl Table {
    /// The part every version has.
    fn v1(self) -> &'static PluginVTableV1 {
        match self {
            Table::V1(table) => table,
            Table::V3(table) => table.v1(),
        }
    }
}

/// An opened plugin library and its vtable.
pub struct NativeLibrary {
    path: PathBuf,
    vtable: Table,
    /// The plugin's optional `forgesyte_plugin_call_context` (SDKs that
    /// have it export it; see `CALL_CONTEXT_SYMBOL`).
    call_context: Option<CallContextFn>,
    fingerprint: Option<Fingerprint>,
    /// Where the library's SDK `log` lines go, when the host routes them
    /// (`plugin_log`).
    log: Option<&'static crate::plugin_log::LibraryLog>,
}

impl fmt::Debug for NativeLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativeLibrary")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The largest library loaded from a copy of its bytes ([`read_whole`]): a
/// file's stated size is not memory the server has (a sparse 64 GiB file
/// on tmpfs aborted the allocation, and the server with it). As large as a
/// pinned file may be (the integrity check's bound): a library linked
/// with CUDA's may take a GiB or two.
const MAX_COPIED_LIBRARY_BYTES: u64 = 4 << 30;

/// The bytes of the library `file` (of `meta`), read from its start: at
/// most [`MAX_COPIED_LIBRARY_BYTES`], in memory that could be had.
fn read_whole(
    file: &std::fs::File,
    meta: &std::fs::Metadata,
    path: &Path,
) -> Result<Vec<u8>, ImportError> {
    use std::os::unix::fs::FileExt as _;
    let cannot = |detail: String| ImportError::Open {
        path: path.to_path_buf(),
        detail,
    };
    if meta.len() > MAX_COPIED_LIBRARY_BYTES {
        return Err(cannot(format!(
            "{} bytes, more than the {MAX_COPIED_LIBRARY_BYTES} bytes of a library loaded from a \
             copy of its bytes (it is on a memory filesystem with holes, or its name was loaded \
             before)",
            meta.len()
        )));
    }
    let len = usize::try_from(meta.len()).map_err(|e| cannot(e.to_string()))?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(len)
        .map_err(|e| cannot(format!("no memory for a copy of its {len} bytes: {e}")))?;
    bytes.resize(len, 0);
    file.read_exact_at(&mut bytes, 0)
        .map_err(|e| cannot(e.to_string()))?;
    Ok(bytes)
}

/// Whether `file` (of `len` bytes) lies on a memory filesystem (tmpfs)
/// with a hole before its end. Relocating a mapping of it writes to a
/// page of a hole, which the filesystem must allocate: a full tmpfs
/// cannot, and the dynamic loader died of SIGBUS, the server with it (a
/// linker writes sparse files; an init container may copy plugins onto a
/// memory-backed volume). Such a library is loaded from a copy of its
/// bytes instead (`read` fails with an error, no signal).
fn holes_on_memory_fs(file: &std::fs::File, len: u64) -> bool {
    use rustix::fs::{SeekFrom, fstatfs, seek};
    // Of different types on 32-bit targets (an unsigned `f_type`).
    #[allow(clippy::useless_conversion)]
    let on_tmpfs =
        fstatfs(file).is_ok_and(|fs| i64::from(fs.f_type) == i64::from(libc::TMPFS_MAGIC));
    // `SEEK_HOLE` moves the file's offset: read again from its start.
    let hole = on_tmpfs && matches!(seek(file, SeekFrom::Hole(0)), Ok(at) if at < len);
    if on_tmpfs {
        let _ = seek(file, SeekFrom::Start(0));
    }
    hole
}

impl NativeLibrary {
    /// Checks the file with [`inspect`], opens it, resolves the entry symbol
    /// and checks the ABI version before anything else of the plugin is
    /// called.
    ///
    /// A path whose name or file the dynamic loader has mapped before (a
    /// library replaced since, a link retargeted, a hard link, the same
    /// library retried: see `native/mapped.rs`) is loaded from its bytes
    /// instead, as [`open_bytes`](Self::open_bytes) does, so that what runs
    /// is the file at `path` now, with statics of its own.
    pub fn open(path: &Path) -> Result<Self, ImportError> {
        Self::open_with(path, None)
    }

    /// The part of [`open`](Self::open) that needs no lock of the dynamic
    /// loader's, done ahead (a load pass runs it on its pool): the file
    /// opened, the kernel asked to read all of it into the page cache in the
    /// background (`posix_fadvise(WILLNEED)`: after a restart with a cold
    /// cache the opening thread then waits for no disk, BENCHMARKS.md
    /// "Stop 25"), its ELF headers read and checked. Nothing is kept open.
    pub(crate) fn prepare(path: &Path) -> Result<PreparedElf, ImportError> {
        let (file, meta) = open_regular(path, path)?;
        let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::WillNeed);
        Ok(PreparedElf {
            file: FileIdentity::of(&meta),
            elf: check_elf(&file, meta.len(), path, true)?,
        })
    }

    /// [`open`](Self::open), with the ELF check `prepared` made ahead when
    /// it was made of the file now at `path`, unchanged.
    fn open_with(path: &Path, prepared: Option<PreparedElf>) -> Result<Self, ImportError> {
        let (file, meta) = open_regular(path, path)?;
        if holes_on_memory_fs(&file, meta.len()) {
            tracing::info!(library = %path.display(), "In-process library loaded from a memory file of its bytes: it has holes on a memory filesystem (tmpfs), whose mapping a full filesystem would end with SIGBUS");
            return Self::open_bytes(path, &read_whole(&file, &meta, path)?);
        }
        match mapped::claim(path, &meta) {
            mapped::Claim::Path(unmapped) => {
                let elf = match prepared {
                    Some(prepared) if prepared.file == FileIdentity::of(&meta) => prepared.elf,
                    _ => check_elf(&file, meta.len(), path, true)?,
                };
                Self::map(path, path, elf, Some(unmapped))
            }
            mapped::Claim::Copy => {
                tracing::info!(library = %path.display(), "In-process library opened again under a new file identity (a memory file of its bytes): the dynamic loader has mapped this name or file before");
                Self::open_bytes(path, &read_whole(&file, &meta, path)?)
            }
        }
    }

    /// Loads `bytes` themselves: copied into a sealed memory file
    /// (`memfd_create`, then no write, grow or shrink is possible), which
    /// is inspected and `dlopen`ed as `/proc/self/fd/N` (an `N` that names
    /// no mapped object: `mapped::unclaimed_fd_path`). What runs is
    /// exactly what was hashed, whatever happens to `path` meanwhile.
    /// Errors name `path`. The library's own path is then that memory
    /// file: `$ORIGIN` in its run path does not find its directory.
    pub fn open_bytes(path: &Path, bytes: &[u8]) -> Result<Self, ImportError> {
        Self::open_fd(path, sealed_copy(path, bytes)?)
    }

    /// Loads the library in the memory file `fd` (sealed by whoever made
    /// it: an isolated plugin's runner gets the one its host checked), as
    /// [`open_bytes`](Self::open_bytes) does. Errors name `path`.
    pub fn open_fd(path: &Path, fd: std::os::fd::OwnedFd) -> Result<Self, ImportError> {
        let (fd, load) = mapped::unclaimed_fd_path(fd).map_err(|e| ImportError::Open {
            path: path.to_path_buf(),
            detail: format!("cannot give its memory file a descriptor of its own: {e}"),
        })?;
        let (file, meta) = open_regular(&load, path)?;
        // The mapping made by dlopen keeps the memory file alive; the
        // descriptors are closed when they drop.
        let opened = Self::map(&load, path, check_elf(&file, meta.len(), path, true)?, None);
        drop(fd);
        opened
    }

    /// Maps the file at `load` (named `path` in errors and reasons), whose
    /// ELF check found `elf`: the fingerprint vetted, the libraries it
    /// ships beside `path` checked against those loaded already, `dlopen`
    /// (recording `by_name` as mapped once it is), the entry symbol and
    /// the ABI version.
    fn map(
        load: &Path,
        path: &Path,
        elf: Elf,
        by_name: Option<mapped::Unmapped>,
    ) -> Result<Self, ImportError> {
        let fingerprint = vet_fingerprint(path, elf.fingerprint, &Fingerprint::current())?;
        if let Some(origin_path) = &elf.origin_path {
            if load != path {
                tracing::warn!(
                    library = %path.display(),
                    "{} is loaded from a memory file of its bytes, where $ORIGIN in its run path finds nothing: the libraries it ships beside it are not found there (run it isolated to have them)",
                    path.display()
                );
            }
            // Against `path`'s directory even for a memory file: its
            // `$ORIGIN` finds nothing there, so a library of the name
            // loaded already is what it would get.
            origin::check(path, origin_path)?;
        }
        // SAFETY: opening a library runs its initialisers. That is the point
        // of an in-process plugin; the file was named by the operator's
        // plugin directory, and the dependency checker never reaches here
        // for libraries it only needs to find.
        let library = unsafe { Library::open(Some(load), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) }
            .map_err(|e| {
            let message =
                error_chain(&e).replace(&*load.to_string_lossy(), &path.to_string_lossy());
            classify_open_error(path, &message)
        })?;
        // Mapped for good (RTLD_NODELETE), whatever the checks below say.
        if let Some(unmapped) = by_name {
            unmapped.mapped();
        }
        type Entry = unsafe extern "C" fn() -> *const PluginVTable;
        // SAFETY: the symbol, when present, is taken for the SDK's entry
        // function with exactly this signature (SPEC §6). That is the trust
        // an in-process plugin is given, not a fact checked here: a library
        // that exports the name as something else (data, another signature)
        // is called all the same, and can crash the server as any code it
        // runs in process can; a plugin not so trusted runs isolated
        // (`"isolation": "process"`), where the same mistake is its runner's
        // crash. One that resolves to null (an absolute symbol of value 0)
        // is none.
        let entry: Entry = unsafe { library.get::<Option<Entry>>(ENTRY_SYMBOL_C) }
            .ok()
            .and_then(|sym| *sym)
            .ok_or_else(|| ImportError::MissingEntrySymbol {
                path: path.to_path_buf(),
                symbol: ENTRY_SYMBOL.to_owned(),
            })?;
        // SAFETY: the entry function takes no arguments and returns a pointer
        // to a static (SPEC §6, trusted as above). The SDK's entry cannot
        // unwind; one written by hand that unwinds (a C++ exception) aborts
        // the process at this `extern "C"` boundary, as any in-process
        // plugin's fault does.
        let ptr = unsafe { entry() };
        if ptr.is_null() {
            return Err(ImportError::InvalidInterface {
                path: path.to_path_buf(),
                detail: "entry symbol returned a null vtable".into(),
            });
        }
        if !ptr.is_aligned() {
            return Err(ImportError::InvalidInterface {
                path: path.to_path_buf(),
                detail: "entry symbol returned a misaligned vtable".into(),
            });
        }
        // SAFETY: `abi_version` is the first field of every ABI version's
        // vtable, so reading it is valid whatever version the plugin speaks.
        let plugin_abi = unsafe { (*ptr).abi_version };
        if plugin_abi == ABI_VERSION_1 || plugin_abi == ABI_VERSION {
            let null = null_functions(ptr, plugin_abi);
            if !null.is_empty() {
                return Err(ImportError::InvalidInterface {
                    path: path.to_path_buf(),
                    detail: format!("vtable function field(s) null: {}", null.join(", ")),
                });
            }
        }
        let vtable = match plugin_abi {
            // SAFETY: a version-1 library's pointee is a `PluginVTableV1` (the
            // prefix of today's table) in a static of a library that is never
            // unmapped (RTLD_NODELETE); nothing past it is read.
            ABI_VERSION_1 => Table::V1(unsafe { &*ptr.cast::<PluginVTableV1>() }),
            // SAFETY: this host's ABI version, so the pointee is a whole
            // `PluginVTable`, static as above.
            ABI_VERSION => Table::V3(unsafe { &*ptr }),
            _ => {
                return Err(ImportError::AbiMismatch {
                    path: path.to_path_buf(),
                    host: ABI_VERSION,
                    plugin: plugin_abi,
                });
            }
        };
        // The SDK's optional setters are looked up only in a library built
        // with the SDK (its fingerprint section says so, and
        // `export_plugin!` emits them): a symbol of one of their names in
        // another library may be anything (a C plugin's data), and calling
        // it crashed the server (the log sink's at load, the call
        // context's at the first call). One that resolves to null is none.
        let sdk_built = fingerprint.is_some();
        // SAFETY: the symbol, in an SDK-built library, is the SDK's context
        // setter with exactly this signature (`abi::CallContextFn`); the
        // library stays mapped (RTLD_NODELETE), so the pointer outlives
        // every use.
        let call_context = sdk_built
            .then(|| unsafe { library.get::<Option<CallContextFn>>(CALL_CONTEXT_SYMBOL_C) })
            .and_then(Result::ok)
            .and_then(|sym| *sym);
        let log = sdk_built
            .then_some(())
            .filter(|()| crate::plugin_log::routed())
            // SAFETY: the symbol, in an SDK-built library, is the SDK's
            // log-sink setter with exactly this signature (`abi::LogSinkFn`).
            .and_then(|()| unsafe { library.get::<Option<LogSinkFn>>(LOG_SINK_SYMBOL_C) }.ok())
            .and_then(|sym| *sym)
            .map(|set| {
                // A context only for a library that takes it.
                let (host_log, log) = crate::plugin_log::LibraryLog::for_new_library();
                // SAFETY: as above; called once, before any construction; the
                // host's function and the context stay valid for the
                // process's life (never freed).
                unsafe { set(Some(host_log), log.as_context()) };
                log
            });
        // The handle is given up, never closed: the library is mapped for
        // good (RTLD_NODELETE), so `dlclose` would only take the dynamic
        // loader's lock again to lower a count, and a load pass constructs
        // its plugins on the pool while its own thread holds that lock
        // opening the next library (a profile put 2% of a 1,000-plugin
        // pass in that wait).
        let _ = library.into_raw();
        Ok(NativeLibrary {
            path: path.to_path_buf(),
            vtable,
            call_context,
            fingerprint,
            log,
        })
    }

    /// An address in the library (its vtable, a static of its own): a
    /// stack dump tells the library's frames by it.
    pub(crate) fn address_inside(&self) -> usize {
        std::ptr::from_ref(self.vtable.v1()) as usize
    }

    /// The SDK version the plugin was built with, as it reports it.
    pub fn sdk_version(&self) -> String {
        c_str(self.vtable.v1().sdk_version)
    }

    /// The ABI version the library speaks: 1 (JSON only) or 3 (binary
    /// arguments and results as bytes).
    pub fn abi_version(&self) -> u32 {
        self.vtable.v1().abi_version
    }

    /// The build fingerprint read from the file before it was opened, if it
    /// has one.
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        self.fingerprint.as_ref()
    }
}

impl PluginLibrary for NativeLibrary {
    fn constructed_for(&self, plugin: &str) {
        if let Some(log) = self.log {
            log.constructed_for(plugin);
        }
    }

    fn instantiate(&self, config: &[u8]) -> Result<Box<dyn PluginInstance>, InitError> {
        let v1 = self.vtable.v1();
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut out = FsBuffer::empty();
        // SAFETY: pointers are valid for the call: `config` for `config.len()`
        // bytes, `handle` and `out` are live locals the plugin writes to.
        let status = unsafe { (v1.create)(config.as_ptr(), config.len(), &mut handle, &mut out) };
        let body = take_buffer(v1, out);
        match status {
            STATUS_OK if !handle.is_null() => {}
            STATUS_OK => {
                return Err(InitError::Protocol {
                    detail: "constructor reported success but returned no instance".into(),
                });
            }
            STATUS_PANIC => {
                return Err(InitError::Panicked {
                    message: error_message(&body),
                });
            }
            STATUS_ERROR => {
                return Err(InitError::Failed {
                    message: error_message(&body),
                });
            }
            other => {
                return Err(InitError::Protocol {
                    detail: format!(
                        "constructor returned status {other}: {}",
                        error_message(&body)
                    ),
                });
            }
        }
        let mut instance = NativeInstance {
            vtable: self.vtable,
            call_context: self.call_context,
            handle,
            tools: Arc::from([]),
        };
        let mut out = FsBuffer::empty();
        // SAFETY: `handle` is the live instance just created; `out` is a local.
        let status = unsafe { (v1.tools)(instance.handle, &mut out) };
        let body = take_buffer(v1, out);
        if status != STATUS_OK {
            return Err(InitError::Protocol {
                detail: format!("listing tools failed: {}", error_message(&body)),
            });
        }
        instance.tools = serde_json::from_slice::<Vec<ToolInfo>>(&body)
            .map(Arc::from)
            .map_err(|e| match e.classify() {
                // Valid JSON that is no list of tools (an object, an empty
                // id): said so, not "not valid JSON".
                serde_json::error::Category::Data => InitError::Protocol {
                    detail: format!("tool list is not a list of tools: {e}"),
                },
                _ => InitError::InvalidJson {
                    what: "tool list".into(),
                    source: e,
                },
            })?;
        crate::host::check_tool_list(&instance.tools)?;
        Ok(Box::new(instance))
    }
}

/// A live instance in a native library.
struct NativeInstance {
    vtable: Table,
    call_context: Option<CallContextFn>,
    handle: *mut c_void,
    tools: Arc<[ToolInfo]>,
}

// SAFETY: the SDK only exports types that implement `Plugin: Send + Sync`,
// and the ABI requires `call` to be callable from several threads at once.
unsafe impl Send for NativeInstance {}
// SAFETY: as above.
unsafe impl Sync for NativeInstance {}

impl fmt::Debug for NativeInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativeInstance")
            .field("tools", &self.tools)
            .finish_non_exhaustive()
    }
}

impl PluginInstance for NativeInstance {
    fn tools(&self) -> &[ToolInfo] {
        &self.tools
    }

    fn shared_tools(&self) -> Arc<[ToolInfo]> {
        Arc::clone(&self.tools)
    }

    /// Hands the plugin the call's context first (on this thread, which
    /// runs the call), when the context is not empty and the library takes
    /// one, and clears it after.
    #[allow(unsafe_code)]
    fn call_output(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
        context: &CallContext,
    ) -> Result<CallOutput, ToolError> {
        let set = self.call_context.filter(|_| !context.is_empty());
        let json = match set {
            Some(_) => serde_json::to_vec(context).ok(),
            None => None,
        };
        if let (Some(set), Some(json)) = (set, &json) {
            // SAFETY: `set` is the library's context setter (see `open`);
            // `json` is live for the call and the plugin copies it.
            unsafe { set(json.as_ptr(), json.len()) };
        }
        let result = self.invoke(tool, args, attachments);
        if let (Some(set), Some(_)) = (set, &json) {
            // SAFETY: as above; a null pointer clears the context.
            unsafe { set(std::ptr::null(), 0) };
        }
        result
    }

    fn call_with(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
    ) -> Result<Vec<u8>, ToolError> {
        self.invoke(tool, args, attachments)?.into_json()
    }

    fn call(&self, tool: &str, args: &[u8]) -> Result<Vec<u8>, ToolError> {
        self.invoke(tool, args, &[])?.into_json()
    }

    fn takes_binary(&self) -> bool {
        matches!(self.vtable, Table::V3(_))
    }
}

impl NativeInstance {
    /// One call through the library's table: ABI 3's `call_binary` with
    /// the attachments as borrowed slices (no copy), or ABI 1's `call`
    /// with them put into the arguments as base64 strings.
    #[allow(unsafe_code)]
    fn invoke(
        &self,
        tool: &str,
        args: &[u8],
        attachments: &[(&str, &[u8])],
    ) -> Result<CallOutput, ToolError> {
        let v1 = self.vtable.v1();
        let mut out = FsBuffer::empty();
        let (status, binary) = match self.vtable {
            Table::V1(_) => {
                let encoded;
                let args = if attachments.is_empty() {
                    args
                } else {
                    encoded = crate::host::base64_into_json(args, attachments)?;
                    &encoded[..]
                };
                // SAFETY: `handle` is live until `drop`; the byte slices are
                // valid for their lengths during the call; `out` is a local.
                let status = unsafe {
                    (v1.call)(
                        self.handle,
                        tool.as_ptr(),
                        tool.len(),
                        args.as_ptr(),
                        args.len(),
                        &mut out,
                    )
                };
                (status, FsResultList::empty())
            }
            Table::V3(v3) => {
                let entries: Vec<FsBinaryArg> = attachments
                    .iter()
                    .map(|(pointer, bytes)| FsBinaryArg {
                        pointer: FsSlice::new(pointer.as_bytes()),
                        bytes: FsSlice::new(bytes),
                    })
                    .collect();
                let mut list = FsResultList::empty();
                // SAFETY: as above; `entries` and the slices it borrows
                // outlive the call; `list` is a local the plugin writes to.
                let status = unsafe {
                    (v3.call_binary)(
                        self.handle,
                        tool.as_ptr(),
                        tool.len(),
                        args.as_ptr(),
                        args.len(),
                        entries.as_ptr(),
                        entries.len(),
                        &mut out,
                        &mut list,
                    )
                };
                (status, list)
            }
        };
        let body = take_buffer(v1, out);
        let binary = take_results(self.vtable, binary);
        outcome(tool, status, &body).and_then(|()| {
            Ok(CallOutput {
                json: body.to_vec(),
                binary: binary?,
            })
        })
    }
}

/// The typed outcome of a call's `status`, its body the result or error.
fn outcome(tool: &str, status: FsStatus, body: &[u8]) -> Result<(), ToolError> {
    match status {
        STATUS_OK => Ok(()),
        STATUS_ERROR => {
            let (error_type, message) = error_parts(body);
            Err(ToolError::Failed {
                error_type,
                message,
                traceback: Vec::new(),
            })
        }
        STATUS_PANIC => Err(ToolError::Panicked {
            message: error_message(body),
        }),
        STATUS_UNKNOWN_TOOL => Err(ToolError::UnknownTool {
            plugin: String::new(),
            tool: tool.to_owned(),
        }),
        STATUS_BAD_REQUEST => Err(ToolError::InvalidArgs {
            message: error_message(body),
        }),
        other => Err(ToolError::Protocol {
            detail: format!("unknown status {other}"),
        }),
    }
}

/// Takes ownership of the binary results a version-3 library wrote: each
/// buffer becomes shared bytes that go back to the plugin's `free_buffer`
/// when the last clone drops (no copy); the array goes back to its
/// `free_results` at once. A pointer that is not UTF-8 is a protocol error
/// (every buffer is freed all the same).
#[allow(unsafe_code)]
fn take_results(
    table: Table,
    list: FsResultList,
) -> Result<Vec<(String, bytes::Bytes)>, ToolError> {
    let Table::V3(v3) = table else {
        return Ok(Vec::new());
    };
    if list.ptr.is_null() {
        return Ok(Vec::new());
    }
    // What no slice may be: refused (the list is left to the plugin)
    // rather than read, or a capacity that panics.
    // The array read, and the vector of taken pairs made from it.
    let widest = std::mem::size_of::<forgesyte_protocol::abi::FsBinaryResult>()
        .max(std::mem::size_of::<(PluginBuffer, PluginBuffer)>())
        .max(1);
    let room = isize::MAX as usize / widest;
    if list.len > room || !list.ptr.is_aligned() {
        return Err(ToolError::Protocol {
            detail: format!(
                "its list of binary results cannot be read ({} results at {:p})",
                list.len, list.ptr
            ),
        });
    }
    // Not reserved from the plugin's count: one that is absurd but under
    // `room` would reserve terabytes before anything is read.
    let mut taken = Vec::new();
    // SAFETY: the plugin wrote `len` initialised results at `ptr` (the SDK's
    // `FsResultList::from_vec`), which stay valid until `free_results`.
    let items = unsafe { std::slice::from_raw_parts(list.ptr, list.len) };
    for item in items {
        let pointer = FsBuffer { ..item.pointer };
        let bytes = FsBuffer { ..item.bytes };
        taken.push((take_buffer(v3.v1(), pointer), take_buffer(v3.v1(), bytes)));
    }
    // SAFETY: the array came from this library's `out_binary` and is handed
    // back once; its buffers were moved out above and are freed by their
    // owners, never by `free_results`.
    unsafe { (v3.free_results)(list) };
    let mut results = Vec::with_capacity(taken.len());
    let mut bad = None;
    for (pointer, bytes) in taken {
        match std::str::from_utf8(&pointer) {
            Ok(text) => results.push((text.to_owned(), bytes::Bytes::from_owner(bytes))),
            Err(e) => bad = Some(e),
        }
    }
    match bad {
        None => Ok(results),
        Some(e) => Err(ToolError::Protocol {
            detail: format!("a binary result's pointer is not UTF-8: {e}"),
        }),
    }
}

impl Drop for NativeInstance {
    fn drop(&mut self) {
        // SAFETY: `handle` came from `create` and is destroyed exactly once;
        // no call can be in flight because calls borrow `self`.
        unsafe { (self.vtable.v1().destroy)(self.handle) };
    }
}

/// Takes ownership of a buffer the plugin wrote: freed by the plugin's
/// `free_buffer` when dropped.
fn take_buffer(vtable: &'static PluginVTableV1, buf: FsBuffer) -> PluginBuffer {
    // SAFETY: `buf` was just written to an `out` (or a result list) by a
    // function of `vtable` and not freed; the library is never unloaded.
    unsafe { PluginBuffer::with_free(buf, vtable.free_buffer) }
}

fn error_parts(body: &[u8]) -> (Option<String>, String) {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => (
            v.get("error_type")
                .and_then(|t| t.as_str())
                .map(str::to_owned),
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| v.to_string()),
        ),
        Err(_) => (None, String::from_utf8_lossy(body).into_owned()),
    }
}

fn error_message(body: &[u8]) -> String {
    error_parts(body).1
}

fn c_str(ptr: *const std::ffi::c_char) -> String {
    if ptr.is_null() {
        return "unknown".into();
    }
    // SAFETY: the SDK stores pointers to static NUL-terminated strings.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// The error and its sources on one line (libloading keeps dlerror's text in
/// the source).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// Turns the dynamic loader's message into a precise import error.
fn classify_open_error(path: &Path, message: &str) -> ImportError {
    let path = path.to_path_buf();
    let detail = message.to_owned();
    if message.contains("undefined symbol") {
        ImportError::UnresolvedSymbol { path, detail }
    } else if message.contains("cannot open shared object file") {
        ImportError::MissingSharedLibrary { path, detail }
    } else if [
        "invalid ELF header",
        "file too short",
        "ELF",
        "not a dynamic",
    ]
    .iter()
    .any(|m| message.contains(m))
    {
        ImportError::NotALibrary { path, detail }
    } else {
        ImportError::Open { path, detail }
    }
}

/// The function fields of the vtable at `ptr` (of ABI version `abi`, 1 or
/// 3) that are null, by name. Each is read as a raw pointer at its offset:
/// the table's fields are Rust function types, which may not be null, so
/// a null one must be found before the table is read through a reference
/// (a C plugin's table with a null `create` crashed the host).
fn null_functions(ptr: *const PluginVTable, abi: u32) -> Vec<&'static str> {
    use std::mem::offset_of;
    let mut fields = vec![
        ("create", offset_of!(PluginVTableV1, create)),
        ("tools", offset_of!(PluginVTableV1, tools)),
        ("call", offset_of!(PluginVTableV1, call)),
        ("destroy", offset_of!(PluginVTableV1, destroy)),
        ("free_buffer", offset_of!(PluginVTableV1, free_buffer)),
    ];
    if abi == ABI_VERSION {
        fields.push(("call_binary", offset_of!(PluginVTable, call_binary)));
        fields.push(("free_results", offset_of!(PluginVTable, free_results)));
    }
    fields
        .into_iter()
        .filter(|&(_, offset)| {
            // SAFETY: `ptr` is the non-null table of a library of ABI
            // version `abi`, so it holds at least the fields listed for that
            // version (version 1's table is the prefix of version 3's, at
            // the same offsets); each is pointer-sized, read unaligned as a
            // raw pointer, which any bits are.
            let field = unsafe {
                ptr.cast::<u8>()
                    .add(offset)
                    .cast::<*const c_void>()
                    .read_unaligned()
            };
            field.is_null()
        })
        .map(|(name, _)| name)
        .collect()
}

mod elf;
mod mapped;
mod origin;
mod pread;

#[cfg(test)]
mod tests;
