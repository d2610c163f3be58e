//! The plugin C ABI, version 3: the contract between a plugin library and
//! any host that loads it in its own process.
//!
//! Plugin authors never touch this module: the SDK's `export_plugin!`
//! generates the plugin side. Hosts use these definitions (and
//! [`PluginBuffer`], which hands a plugin's buffer back to it when dropped);
//! a host in another language mirrors them.
//!
//! # Versions
//!
//! - **1**: configuration, arguments, results and errors cross as JSON
//!   bytes; a binary argument is a base64 string inside the arguments.
//! - **2** was never released (the number is skipped).
//! - **3** (this one, [`ABI_VERSION`]) is the release that carries binary
//!   payloads: the vtable is version 1's ([`PluginVTableV1`], unchanged,
//!   field for field) with two fields **appended**, `call_binary` and
//!   `free_results`. Binary arguments reach the plugin as borrowed byte
//!   slices (no base64, no JSON string, no copy) and a tool may hand back
//!   binary results beside its JSON result.
//!
//! A host reads `abi_version` first, then uses only the part of the table
//! that version has: a version-1 library is called through the
//! [`PluginVTableV1`] prefix (binary arguments as base64 strings, results
//! JSON only), a version-3 one through [`PluginVTable`]. ForgeSyte's host
//! accepts exactly [`SUPPORTED_ABI_VERSIONS`] (1 and 3); any other version
//! is an `ImportError` naming the plugin's version and the host's.
//!
//! # Entry
//!
//! A plugin library exports one C symbol, [`ENTRY_SYMBOL`]
//! (`forgesyte_plugin_entry`):
//!
//! ```text
//! extern "C" fn forgesyte_plugin_entry() -> *const PluginVTable
//! ```
//!
//! It returns a pointer to a `static` [`PluginVTable`] (or, for a version-1
//! library, a [`PluginVTableV1`]), valid for as long as the library stays
//! loaded. The host reads [`PluginVTable::abi_version`] — the first field,
//! at offset 0, in every ABI version — **before anything else**, and must
//! not touch any other field unless it is a version it knows.
//!
//! # Calls
//!
//! | function | input | `out` on [`STATUS_OK`] |
//! |---|---|---|
//! | `create` | config JSON `{"manifest": {…}, "plugin_dir": "/abs", "models": {"name": "/abs/path"}}` | nothing (empty buffer); the instance is in `*out_instance` |
//! | `tools` | an instance | JSON array of `{"id", "title", "description", "input_schema", "output_schema"}` |
//! | `call` | an instance, the tool id (UTF-8), the arguments (JSON) | the result JSON |
//! | `call_binary` (3) | as `call`, plus the binary arguments: an array of [`FsBinaryArg`] | the result JSON; the binary results in `*out_binary` |
//! | `free_results` (3) | a result list this library wrote to `out_binary` | — |
//! | `destroy` | an instance | — |
//! | `free_buffer` | a buffer this library filled | — |
//!
//! ## Binary arguments and results (version 3)
//!
//! `call_binary` takes `binary[..binary_len]`, each [`FsBinaryArg`] a JSON
//! Pointer (RFC 6901, UTF-8) into the arguments and the bytes that belong
//! there. Both are the host's, borrowed for the duration of the call; the
//! arguments' JSON holds a placeholder (`null`) at each pointer. The SDK
//! hands the bytes to the tool as `&[u8]`, without copying them.
//!
//! On [`STATUS_OK`] the plugin writes to `*out_binary` an [`FsResultList`]:
//! an array of [`FsBinaryResult`], each a pointer into the result JSON and
//! the bytes that belong there (the result JSON holds a placeholder there).
//! On any other status it writes the empty list. **Who frees what:** every
//! `pointer` and `bytes` buffer in the list is an [`FsBuffer`] like any
//! other, handed back (once each) to `free_buffer`; the array itself is
//! handed back to `free_results` (which frees the array only, never the
//! buffers in it). So a host may keep a result's bytes (zero copy) after it
//! has returned the array.
//!
//! Every other status comes with `out` holding
//! `{"error_type": "...", "message": "..."}`:
//!
//! | status | meaning | `error_type` |
//! |---|---|---|
//! | [`STATUS_ERROR`] | the constructor or the tool returned an error | `"InitError"` from `create`; the tool's own (e.g. `"InvalidInput"`) from `call` |
//! | [`STATUS_PANIC`] | the plugin panicked; caught, never unwound into the host | `"Panic"`, message = the panic message |
//! | [`STATUS_UNKNOWN_TOOL`] | `call` named a tool not in the plugin's list | `"UnknownTool"` |
//! | [`STATUS_BAD_REQUEST`] | the host broke the contract where it can be checked: a null pointer, bytes that are not UTF-8 or not the expected JSON | `"BadRequest"` |
//!
//! When `out` itself is null the status is [`STATUS_BAD_REQUEST`] and nothing
//! is written to it (a non-null `out_binary` is set to the empty list, as
//! on every path of `call_binary`). When `out_binary` is null (and `out` is not), the status is
//! [`STATUS_BAD_REQUEST`] too, its error is written to `out` (the host frees
//! it as any other), and nothing to `out_binary`.
//!
//! # Rules
//!
//! - **Memory is freed by the side that allocated it.** Input buffers belong
//!   to the host and are only borrowed for the duration of the call. Every
//!   [`FsBuffer`] written to `out` (or inside a result list) was allocated
//!   by the plugin and must be handed back, exactly once, to the same
//!   library's `free_buffer` (an empty buffer may be passed too; it is a
//!   no-op); every result list, to its `free_results`. Instances are
//!   released only by `destroy`.
//! - **No panic crosses the boundary.** Every function catches unwinding and
//!   turns it into [`STATUS_PANIC`]. (A plugin built with `panic = "abort"`
//!   cannot be protected: it aborts the process, which is what process
//!   isolation is for.)
//! - **Concurrency.** `call`, `call_binary` and `tools` may run concurrently
//!   from several threads on the same instance. `create` may run
//!   concurrently for different instances. `destroy` must not overlap any
//!   other call on that instance, and may run on another thread than its
//!   `create`. `free_buffer` and `free_results` may be called from any
//!   thread, at the same time as any other function, and after `destroy`
//!   of the instance whose buffers they free (the host's answers hold
//!   binary results until they are written): a plugin's buffers come from
//!   an allocator that allows it, not a per-thread or per-instance pool.
//! - **Lifetime.** The host never unloads (`dlclose`) a plugin library while
//!   anything from it may still run, and in practice never unloads it at
//!   all: thread-local destructors and detached threads make unloading
//!   unsound. The pointers in the vtable, including the version strings,
//!   live as long as the library.
//! - **Versions.** A change of layout or meaning of anything here bumps
//!   [`ABI_VERSION`]; new functions are appended, so the table of an older
//!   version stays a prefix of the newer one. `sdk_version` and
//!   `rustc_version` are informational only; since nothing of Rust's own
//!   ABI crosses, host and plugin need not share a compiler.
//! - **Fingerprint.** The same versions, the ABI version and the target
//!   triple are also in the library's `.forgesyte_abi` section
//!   ([`crate::fingerprint`]), so a host can refuse a mismatch before it
//!   opens the library. The section is optional for a host: one without it
//!   falls back to the entry's `abi_version`.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};
use std::fmt;
use std::mem::ManuallyDrop;

/// The version of this ABI, the one the SDK builds: 3, the release that
/// carries binary payloads (2 was skipped).
pub const ABI_VERSION: u32 = 3;

/// The first ABI version, JSON only: its vtable is [`PluginVTableV1`].
pub const ABI_VERSION_1: u32 = 1;

/// The ABI versions a ForgeSyte host accepts: a library whose
/// [`PluginVTable::abi_version`] is another is refused, naming both.
pub const SUPPORTED_ABI_VERSIONS: [u32; 2] = [ABI_VERSION_1, ABI_VERSION];

/// Name of the symbol every plugin library exports.
pub const ENTRY_SYMBOL: &str = "forgesyte_plugin_entry";

/// [`ENTRY_SYMBOL`], NUL-terminated, for `dlsym`-style lookups.
pub const ENTRY_SYMBOL_C: &[u8] = b"forgesyte_plugin_entry\0";

/// The signature of [`ENTRY_SYMBOL`].
pub type EntryFn = extern "C" fn() -> *const PluginVTable;

/// Name of the optional symbol through which a plugin learns the context
/// of the call it is about to run (request id, W3C `traceparent`): a
/// [`CallContextFn`]. Libraries built with an SDK that has it export it
/// (`export_plugin!`); older ones do not, and are called as before. Not
/// part of the vtable, so [`ABI_VERSION`] is unchanged.
pub const CALL_CONTEXT_SYMBOL: &str = "forgesyte_plugin_call_context";

/// [`CALL_CONTEXT_SYMBOL`], NUL-terminated.
pub const CALL_CONTEXT_SYMBOL_C: &[u8] = b"forgesyte_plugin_call_context\0";

/// The signature of [`CALL_CONTEXT_SYMBOL`]. The host calls it on the
/// thread that then calls [`PluginVTable::call`], with the context as a JSON
/// object (`{"request_id": ..., "traceparent": ...}`, UTF-8, `len` bytes at
/// `json`), and again with a null pointer and 0 once the call returned.
/// The plugin copies what it needs; the bytes are the host's.
pub type CallContextFn = unsafe extern "C" fn(json: *const u8, len: usize);

/// Name of the optional symbol through which the host hands an in-process
/// plugin the function its log lines go to ([`LogLineFn`]) instead of the
/// server's stderr, so that they reach the host's log as records (JSON ones
/// under `--log-format json`) tagged with the plugin: a [`LogSinkFn`].
/// Libraries built with an SDK that has it export it (`export_plugin!`);
/// older ones write to stderr as before. Not part of the vtable, so
/// [`ABI_VERSION`] is unchanged. A runner process (an isolated plugin)
/// never calls it: there stderr is the host's channel. A symbol's name
/// is never given another signature: a change of signature is a new name
/// (a draft of this one, `forgesyte_plugin_log_sink`, took the function
/// alone, and is never looked up).
pub const LOG_SINK_SYMBOL: &str = "forgesyte_plugin_host_log";

/// [`LOG_SINK_SYMBOL`], NUL-terminated.
pub const LOG_SINK_SYMBOL_C: &[u8] = b"forgesyte_plugin_host_log\0";

/// The host's function for one log line of a plugin: `context` as the
/// host handed it with the function, then UTF-8, `len` bytes at `line`, no
/// newline, tagged as on stderr when it was written during a call (`@call
/// {"request_id":…} …`, see `wire::LogTags`). The host copies it; callable
/// from any thread, for as long as the library is loaded.
pub type LogLineFn =
    unsafe extern "C" fn(context: *const core::ffi::c_void, line: *const u8, len: usize);

/// The signature of [`LOG_SINK_SYMBOL`]: the host calls it once, after
/// opening the library and before constructing any instance, with its
/// function and the context the library hands back with every line (the
/// host's record of which library, and so which plugin, logs).
pub type LogSinkFn =
    unsafe extern "C" fn(sink: Option<LogLineFn>, context: *const core::ffi::c_void);

/// Outcome of a call across the boundary; one of the `STATUS_*` constants.
pub type FsStatus = i32;

/// Success. `out` holds the result (empty for `create`).
pub const STATUS_OK: FsStatus = 0;
/// The constructor or the tool returned an error; `out` holds it.
pub const STATUS_ERROR: FsStatus = 1;
/// The plugin panicked; `out` holds `{"error_type": "Panic", "message": …}`.
pub const STATUS_PANIC: FsStatus = 2;
/// No tool of that id; `out` holds `{"error_type": "UnknownTool", …}`.
pub const STATUS_UNKNOWN_TOOL: FsStatus = 3;
/// The host passed a null pointer or bytes that are not the expected
/// UTF-8 / JSON; `out` (if not null) holds `{"error_type": "BadRequest", …}`.
pub const STATUS_BAD_REQUEST: FsStatus = 4;

/// Bytes allocated by the plugin (a `Vec<u8>` of JSON taken apart), owned
/// by the host until it hands them back to the plugin's `free_buffer`.
///
/// The host may read `len` bytes from `ptr`; `cap` is the plugin's business.
/// A null `ptr` means empty.
#[repr(C)]
#[derive(Debug)]
pub struct FsBuffer {
    /// Start of the bytes (null when empty).
    pub ptr: *mut u8,
    /// Number of initialized bytes.
    pub len: usize,
    /// Allocated capacity, needed to free the allocation.
    pub cap: usize,
}

impl FsBuffer {
    /// The empty buffer (null pointer); freeing it is a no-op.
    pub const fn empty() -> Self {
        FsBuffer {
            ptr: std::ptr::null_mut(),
            len: 0,
            cap: 0,
        }
    }

    /// Takes `bytes` apart; only [`PluginVTable::free_buffer`] of the
    /// library that called this may put it back together.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let mut bytes = ManuallyDrop::new(bytes);
        FsBuffer {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            cap: bytes.capacity(),
        }
    }

    /// A copy of the bytes, leaving the buffer as it is.
    ///
    /// # Safety
    /// The buffer must be empty or come from a plugin's `out` and not have
    /// been freed yet.
    pub unsafe fn to_vec(&self) -> Vec<u8> {
        // A length no slice may have (a hostile or broken plugin): empty.
        if self.ptr.is_null() || self.len == 0 || self.len > isize::MAX as usize {
            return Vec::new();
        }
        // SAFETY: the caller guarantees `ptr` points to `len` initialized
        // bytes still owned by the plugin.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }
}

/// The table of functions a plugin library hands the host. See the
/// [module documentation](self) for the contract.
#[repr(C)]
#[derive(Debug)]
pub struct PluginVTable {
    /// Must be read first and must equal [`ABI_VERSION`] before any other
    /// field is used. Never moves from offset 0.
    pub abi_version: u32,
    /// Version of the SDK that built the library, static and NUL-terminated.
    pub sdk_version: *const c_char,
    /// The compiler that built the SDK (`rustc --version`), or `unknown`;
    /// static and NUL-terminated. Informational.
    pub rustc_version: *const c_char,
    /// Creates an instance from the config JSON `config[..config_len]`.
    /// On [`STATUS_OK`], `*out_instance` is the new instance; otherwise it
    /// is null and `out` holds the error.
    pub create: CreateFn,
    /// Writes the instance's tools, a JSON array of tool specs, to `out`.
    pub tools: ToolsFn,
    /// Runs tool `tool[..tool_len]` (UTF-8 id) with `args[..args_len]`
    /// (JSON) and writes the result or the error to `out`.
    pub call: CallFn,
    /// Drops an instance made by `create`. Null is a no-op.
    pub destroy: DestroyFn,
    /// Frees a buffer this library wrote to an `out`. Empty is a no-op.
    pub free_buffer: FreeBufferFn,
    /// (ABI 3) `call` with binary arguments `binary[..binary_len]` (borrowed
    /// for the call) and binary results: on [`STATUS_OK`] the result JSON
    /// goes to `out` and the binary results to `*out_binary`; otherwise the
    /// error to `out` and the empty list to `*out_binary`.
    pub call_binary: CallBinaryFn,
    /// (ABI 3) Frees the array of a result list this library wrote to an
    /// `out_binary`, not the buffers in it (those go to `free_buffer`).
    /// Empty is a no-op.
    pub free_results: unsafe extern "C" fn(list: FsResultList),
}

/// The signature of [`PluginVTable::create`] (both ABI versions).
pub type CreateFn = unsafe extern "C" fn(
    config: *const u8,
    config_len: usize,
    out_instance: *mut *mut c_void,
    out: *mut FsBuffer,
) -> FsStatus;

/// The signature of [`PluginVTable::tools`] (both ABI versions).
pub type ToolsFn = unsafe extern "C" fn(instance: *const c_void, out: *mut FsBuffer) -> FsStatus;

/// The signature of [`PluginVTable::call`] (both ABI versions).
pub type CallFn = unsafe extern "C" fn(
    instance: *const c_void,
    tool: *const u8,
    tool_len: usize,
    args: *const u8,
    args_len: usize,
    out: *mut FsBuffer,
) -> FsStatus;

/// The signature of [`PluginVTable::destroy`] (both ABI versions).
pub type DestroyFn = unsafe extern "C" fn(instance: *mut c_void);

/// The signature of [`PluginVTable::free_buffer`] (both ABI versions).
pub type FreeBufferFn = unsafe extern "C" fn(buf: FsBuffer);

/// The signature of [`PluginVTable::call_binary`].
pub type CallBinaryFn = unsafe extern "C" fn(
    instance: *const c_void,
    tool: *const u8,
    tool_len: usize,
    args: *const u8,
    args_len: usize,
    binary: *const FsBinaryArg,
    binary_len: usize,
    out: *mut FsBuffer,
    out_binary: *mut FsResultList,
) -> FsStatus;

/// The vtable of ABI version 1: the first eight fields of [`PluginVTable`],
/// the same layout. A host that finds `abi_version == 1` reads the table
/// through this type and nothing past it.
#[repr(C)]
#[derive(Debug)]
pub struct PluginVTableV1 {
    /// Always [`ABI_VERSION_1`] for a version-1 library.
    pub abi_version: u32,
    /// As [`PluginVTable::sdk_version`].
    pub sdk_version: *const c_char,
    /// As [`PluginVTable::rustc_version`].
    pub rustc_version: *const c_char,
    /// As [`PluginVTable::create`].
    pub create: CreateFn,
    /// As [`PluginVTable::tools`].
    pub tools: ToolsFn,
    /// As [`PluginVTable::call`]: binary arguments arrive as base64 strings.
    pub call: CallFn,
    /// As [`PluginVTable::destroy`].
    pub destroy: DestroyFn,
    /// As [`PluginVTable::free_buffer`].
    pub free_buffer: FreeBufferFn,
}

// SAFETY: as for `PluginVTable`: static strings and code addresses only.
unsafe impl Sync for PluginVTableV1 {}
// SAFETY: as above.
unsafe impl Send for PluginVTableV1 {}

impl PluginVTable {
    /// The version-1 part of this table (the same first fields, the same
    /// layout), e.g. to drive a version-3 library the way a version-1 host
    /// would.
    pub fn v1(&self) -> &PluginVTableV1 {
        let ptr: *const PluginVTable = self;
        // SAFETY: both types are `repr(C)` and `PluginVTableV1`'s fields are
        // exactly the first fields of `PluginVTable`, of the same types in
        // the same order, so the prefix has the same layout; the borrow
        // keeps `self` alive.
        unsafe { &*ptr.cast::<PluginVTableV1>() }
    }
}

/// Bytes borrowed from the other side for the duration of a call (never
/// freed by the receiver). A null `ptr` means empty.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FsSlice {
    /// Start of the bytes (null when empty).
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

impl FsSlice {
    /// Borrows `bytes` (the caller keeps them alive for the call).
    pub const fn new(bytes: &[u8]) -> Self {
        FsSlice {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }
}

/// One binary argument of [`PluginVTable::call_binary`]: where it goes in
/// the arguments (a JSON Pointer, UTF-8) and its bytes, both the host's.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FsBinaryArg {
    /// The JSON Pointer into the arguments, e.g. `/image`.
    pub pointer: FsSlice,
    /// The argument's bytes.
    pub bytes: FsSlice,
}

/// One binary result: where it goes in the result JSON (a JSON Pointer,
/// UTF-8) and its bytes, both allocated by the plugin and each freed by its
/// `free_buffer`.
#[repr(C)]
#[derive(Debug)]
pub struct FsBinaryResult {
    /// The JSON Pointer into the result, e.g. `/mask`.
    pub pointer: FsBuffer,
    /// The bytes.
    pub bytes: FsBuffer,
}

/// The binary results of a call: an array of [`FsBinaryResult`] allocated
/// by the plugin (a `Vec` taken apart), whose array goes back to
/// [`PluginVTable::free_results`]. A null `ptr` means empty.
#[repr(C)]
#[derive(Debug)]
pub struct FsResultList {
    /// Start of the array (null when empty).
    pub ptr: *mut FsBinaryResult,
    /// Number of results.
    pub len: usize,
    /// Allocated capacity, needed to free the array.
    pub cap: usize,
}

impl FsResultList {
    /// The empty list; freeing it is a no-op.
    pub const fn empty() -> Self {
        FsResultList {
            ptr: std::ptr::null_mut(),
            len: 0,
            cap: 0,
        }
    }

    /// Takes `results` apart; only [`PluginVTable::free_results`] of the
    /// library that called this may put the array back together.
    pub fn from_vec(results: Vec<FsBinaryResult>) -> Self {
        if results.is_empty() {
            return FsResultList::empty();
        }
        let mut results = ManuallyDrop::new(results);
        FsResultList {
            ptr: results.as_mut_ptr(),
            len: results.len(),
            cap: results.capacity(),
        }
    }
}

// SAFETY: the only non-`Sync` fields are the two `*const c_char`, which point
// to immutable `'static` string literals; the function pointers are plain
// code addresses. Sharing the table between threads therefore shares only
// immutable data.
unsafe impl Sync for PluginVTable {}

// SAFETY: as for `Sync`: nothing the table points to is owned or mutable.
unsafe impl Send for PluginVTable {}

/// A buffer a plugin wrote to an `out`, owned by the host: it derefs to the
/// bytes and, when dropped, hands them back to the `free_buffer` of the
/// library that allocated them, exactly once.
pub struct PluginBuffer {
    buf: FsBuffer,
    free: FreeBufferFn,
}

impl PluginBuffer {
    /// Takes ownership of `buf`, to be freed by `vtable.free_buffer`.
    ///
    /// # Safety
    /// `buf` must be empty, or have been written to an `out` by a function
    /// of `vtable` and not freed yet; `len` bytes at `ptr` must stay valid
    /// until it is freed; `vtable`'s library must stay loaded as long as the
    /// returned value lives (hosts never unload plugin libraries).
    pub unsafe fn new(buf: FsBuffer, vtable: &PluginVTable) -> Self {
        // SAFETY: the caller's contract, passed on.
        unsafe { Self::with_free(buf, vtable.free_buffer) }
    }

    /// [`new`](Self::new) with the library's `free_buffer` itself (for a
    /// version-1 table, [`PluginVTableV1::free_buffer`]).
    ///
    /// # Safety
    /// As for [`new`](Self::new), `free` being the `free_buffer` of the
    /// library that wrote `buf`.
    pub unsafe fn with_free(buf: FsBuffer, free: FreeBufferFn) -> Self {
        PluginBuffer { buf, free }
    }

    /// The bytes (empty for an empty buffer).
    pub fn as_bytes(&self) -> &[u8] {
        // A length no slice may have (a hostile or broken plugin): empty.
        if self.buf.ptr.is_null() || self.buf.len == 0 || self.buf.len > isize::MAX as usize {
            return &[];
        }
        // SAFETY: `new`'s contract: `len` initialised bytes at `ptr`, valid
        // until `drop` frees them; the borrow cannot outlive `self`.
        unsafe { std::slice::from_raw_parts(self.buf.ptr, self.buf.len) }
    }
}

impl AsRef<[u8]> for PluginBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::ops::Deref for PluginBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for PluginBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginBuffer")
            .field("len", &self.buf.len)
            .finish_non_exhaustive()
    }
}

impl Drop for PluginBuffer {
    fn drop(&mut self) {
        if self.buf.ptr.is_null() {
            return;
        }
        let buf = std::mem::replace(&mut self.buf, FsBuffer::empty());
        // SAFETY: `new`'s contract: the buffer came from the library whose
        // `free_buffer` this is, and it is freed here, once.
        unsafe { (self.free)(buf) };
    }
}

// SAFETY: the buffer is plain bytes owned by this value alone (the plugin
// no longer touches it), and `free_buffer` may be called from any thread.
unsafe impl Send for PluginBuffer {}
// SAFETY: shared access only reads the bytes.
unsafe impl Sync for PluginBuffer {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static FREED: AtomicUsize = AtomicUsize::new(0);

    unsafe extern "C" fn free_counting(buf: FsBuffer) {
        FREED.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the test made `buf` with `FsBuffer::from_vec`.
        drop(unsafe { Vec::from_raw_parts(buf.ptr, buf.len, buf.cap) });
    }

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
    #[allow(clippy::too_many_arguments)]
    unsafe extern "C" fn call_binary(
        _: *const c_void,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const FsBinaryArg,
        _: usize,
        _: *mut FsBuffer,
        _: *mut FsResultList,
    ) -> FsStatus {
        STATUS_BAD_REQUEST
    }
    unsafe extern "C" fn free_results(_: FsResultList) {}

    fn table() -> PluginVTable {
        PluginVTable {
            abi_version: ABI_VERSION,
            sdk_version: c"test".as_ptr(),
            rustc_version: c"test".as_ptr(),
            create,
            tools,
            call,
            destroy,
            free_buffer: free_counting,
            call_binary,
            free_results,
        }
    }

    #[test]
    fn version_1_is_a_prefix_of_version_3() {
        use std::mem::offset_of;
        assert_eq!(ABI_VERSION, 3);
        assert_eq!(SUPPORTED_ABI_VERSIONS, [1, 3]);
        let pairs = [
            (
                offset_of!(PluginVTable, abi_version),
                offset_of!(PluginVTableV1, abi_version),
            ),
            (
                offset_of!(PluginVTable, sdk_version),
                offset_of!(PluginVTableV1, sdk_version),
            ),
            (
                offset_of!(PluginVTable, rustc_version),
                offset_of!(PluginVTableV1, rustc_version),
            ),
            (
                offset_of!(PluginVTable, create),
                offset_of!(PluginVTableV1, create),
            ),
            (
                offset_of!(PluginVTable, tools),
                offset_of!(PluginVTableV1, tools),
            ),
            (
                offset_of!(PluginVTable, call),
                offset_of!(PluginVTableV1, call),
            ),
            (
                offset_of!(PluginVTable, destroy),
                offset_of!(PluginVTableV1, destroy),
            ),
            (
                offset_of!(PluginVTable, free_buffer),
                offset_of!(PluginVTableV1, free_buffer),
            ),
        ];
        for (v3, v1) in pairs {
            assert_eq!(v3, v1);
        }
        assert_eq!(offset_of!(PluginVTable, abi_version), 0);
        assert_eq!(
            offset_of!(PluginVTable, call_binary),
            std::mem::size_of::<PluginVTableV1>()
        );
        let vtable = table();
        let v1 = vtable.v1();
        assert_eq!(v1.abi_version, ABI_VERSION);
        assert!(std::ptr::fn_addr_eq(
            v1.free_buffer,
            free_counting as unsafe extern "C" fn(FsBuffer)
        ));
        assert!(FsResultList::from_vec(Vec::new()).ptr.is_null());
    }

    #[test]
    fn plugin_buffers_free_themselves_exactly_once() {
        let vtable = table();
        let before = FREED.load(Ordering::SeqCst);
        {
            // SAFETY: made here, freed by `free_counting` with the same allocator.
            let owned = unsafe { PluginBuffer::new(FsBuffer::from_vec(b"{}".to_vec()), &vtable) };
            assert_eq!(&*owned, b"{}");
            // SAFETY: the empty buffer is never freed.
            let empty = unsafe { PluginBuffer::new(FsBuffer::empty(), &vtable) };
            assert!(empty.is_empty());
        }
        assert_eq!(FREED.load(Ordering::SeqCst), before + 1);
    }

    unsafe extern "C" fn free_nothing(_: FsBuffer) {}

    #[test]
    fn a_length_no_slice_may_have_reads_as_empty() {
        let mut byte = 7u8;
        let absurd = FsBuffer {
            ptr: &mut byte,
            len: isize::MAX as usize + 1,
            cap: 0,
        };
        // SAFETY: the bytes are never read (the length is refused first),
        // and `free_nothing` frees nothing.
        assert!(unsafe { absurd.to_vec() }.is_empty());
        // SAFETY: as above.
        let buffer = unsafe { PluginBuffer::with_free(absurd, free_nothing) };
        assert!(buffer.as_bytes().is_empty());
    }
}
