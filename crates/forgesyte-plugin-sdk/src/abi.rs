//! The plugin side of the C ABI: the `extern "C"` functions that
//! [`crate::export_plugin!`] puts in a plugin's vtable, generic over the
//! [`Plugin`] type.
//!
//! The contract itself (vtable layout, status codes, who frees what) is
//! defined once, in `forgesyte_protocol::abi`, and re-exported here; read
//! it there. Plugin authors never touch this module.
#![allow(unsafe_code)]

use std::any::Any;
use std::collections::BTreeSet;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use serde_json::Value;

pub use forgesyte_protocol::abi::*;

use crate::binary::{Call, Output};
use crate::plugin::{Plugin, PluginConfig, ToolSpec};

const SDK_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
const RUSTC_VERSION: &str = forgesyte_protocol::fingerprint::BUILD_RUSTC_VERSION_NUL;

/// The vtable of plugin type `P`, as [`crate::export_plugin!`] puts it in a
/// `static`. Also handy to drive a plugin through the ABI in tests.
pub const fn vtable_for<P: Plugin>() -> PluginVTable {
    PluginVTable {
        abi_version: ABI_VERSION,
        sdk_version: SDK_VERSION.as_ptr().cast(),
        rustc_version: RUSTC_VERSION.as_ptr().cast(),
        create: __create::<P>,
        tools: __tools::<P>,
        call: __call::<P>,
        destroy: __destroy::<P>,
        free_buffer: __free_buffer,
        call_binary: __call_binary::<P>,
        free_results: __free_results,
    }
}

/// A version-1 table of plugin type `P` ([`ABI_VERSION_1`], JSON only):
/// what libraries built before ABI 3 export. Plugins use
/// [`crate::export_plugin!`]; this is for testing that a host still serves
/// such libraries (binary arguments reach `P` as base64 strings, binary
/// results leave as base64 strings).
pub const fn vtable_v1_for<P: Plugin>() -> PluginVTableV1 {
    PluginVTableV1 {
        abi_version: ABI_VERSION_1,
        sdk_version: SDK_VERSION.as_ptr().cast(),
        rustc_version: RUSTC_VERSION.as_ptr().cast(),
        create: __create::<P>,
        tools: __tools::<P>,
        call: __call::<P>,
        destroy: __destroy::<P>,
        free_buffer: __free_buffer,
    }
}

/// What an instance pointer points to.
struct Instance<P> {
    plugin: P,
    specs: Vec<ToolSpec>,
    /// Not a `HashSet`: its hasher's keys live in a thread-local, and the
    /// first thread-local access of a thread in a library opened with
    /// `dlopen` allocates the library's TLS block under the dynamic
    /// loader's lock, which a host loading many libraries holds most of the
    /// time (BENCHMARKS.md, "Stop 25"). Construction touches none now.
    tool_ids: BTreeSet<String>,
}

/// A failed call: its status and the `{"error_type", "message"}` body.
struct Failure {
    status: FsStatus,
    error_type: String,
    message: String,
}

impl Failure {
    fn new(status: FsStatus, error_type: impl Into<String>, message: impl Into<String>) -> Self {
        Failure {
            status,
            error_type: error_type.into(),
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Failure::new(STATUS_BAD_REQUEST, "BadRequest", message)
    }

    fn body(&self) -> Vec<u8> {
        let body = serde_json::json!({
            "error_type": self.error_type,
            "message": self.message,
        });
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// `Ok(bytes)` for the `out` buffer of a successful call.
type Outcome = Result<Vec<u8>, Failure>;

/// The message of a caught panic.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Runs `body` with unwinding caught and writes its outcome to `out`.
fn guarded(out: *mut FsBuffer, body: impl FnOnce() -> Outcome) -> FsStatus {
    // The outer guard catches the improbable: a panic while reporting one
    // (e.g. a panic payload whose destructor panics).
    catch_unwind(AssertUnwindSafe(|| {
        if out.is_null() {
            return STATUS_BAD_REQUEST;
        }
        let outcome = match catch_unwind(AssertUnwindSafe(body)) {
            Ok(outcome) => outcome,
            Err(payload) => Err(Failure::new(
                STATUS_PANIC,
                "Panic",
                panic_message(payload.as_ref()),
            )),
        };
        let (status, bytes) = match outcome {
            Ok(bytes) => (STATUS_OK, bytes),
            Err(failure) => (failure.status, failure.body()),
        };
        let buf = if bytes.is_empty() {
            FsBuffer::empty()
        } else {
            FsBuffer::from_vec(bytes)
        };
        // SAFETY: `out` is not null and the host promises it points to
        // writable memory for one `FsBuffer`; `write` does not read the old
        // (possibly uninitialized) value.
        unsafe { out.write(buf) };
        status
    }))
    .unwrap_or_else(|payload| {
        contained(Err(payload));
        STATUS_PANIC
    })
}

/// Lets go of a caught panic's payload without dropping it: its `Drop`
/// could panic again, outside any guard, and unwind into the host.
fn contained(caught: std::thread::Result<()>) {
    if let Err(payload) = caught {
        let _leaked = std::mem::ManuallyDrop::new(payload);
    }
}

/// Borrows `len` bytes at `ptr`; null with a zero length is the empty slice.
///
/// # Safety
/// A non-null `ptr` must point to `len` readable bytes that stay valid and
/// unchanged for `'a`.
unsafe fn borrow_bytes<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], Failure> {
    if ptr.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(Failure::bad_request(format!(
                "{what} is a null pointer with length {len}"
            )))
        };
    }
    if len > isize::MAX as usize {
        return Err(Failure::bad_request(format!(
            "{what} length {len} is too large"
        )));
    }
    // SAFETY: non-null, length within `isize::MAX`; the caller guarantees
    // the bytes are readable and unchanged for `'a`.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// The instance behind `instance`, or a bad request if it is null.
///
/// # Safety
/// A non-null `instance` must come from `__create::<P>` and not be destroyed.
unsafe fn instance_ref<'a, P>(instance: *const c_void) -> Result<&'a Instance<P>, Failure> {
    if instance.is_null() {
        return Err(Failure::bad_request("instance is a null pointer"));
    }
    // SAFETY: the caller guarantees `instance` is a live `Box<Instance<P>>`
    // from `__create::<P>`; only shared references are made until `destroy`.
    Ok(unsafe { &*instance.cast::<Instance<P>>() })
}

/// Error message of a constructor error, with its chain of sources.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !message.ends_with(&cause_text) {
            message.push_str(": ");
            message.push_str(&cause_text);
        }
        source = cause.source();
    }
    message
}

/// `create` of [`vtable_for`]; use the vtable, not this.
///
/// # Safety
/// See the [module documentation](self): `config` must point to
/// `config_len` readable bytes (or be null with length 0), `out_instance`
/// and `out` to writable slots (or be null, which is reported).
#[doc(hidden)]
pub unsafe extern "C" fn __create<P: Plugin>(
    config: *const u8,
    config_len: usize,
    out_instance: *mut *mut c_void,
    out: *mut FsBuffer,
) -> FsStatus {
    guarded(out, || {
        if out_instance.is_null() {
            return Err(Failure::bad_request("out_instance is a null pointer"));
        }
        // SAFETY: not null; the host promises a writable slot.
        unsafe { out_instance.write(std::ptr::null_mut()) };
        // SAFETY: the host promises `config_len` readable bytes for the call.
        let bytes = unsafe { borrow_bytes(config, config_len, "config") }?;
        let config: PluginConfig = serde_json::from_slice(bytes)
            .map_err(|e| Failure::bad_request(format!("invalid config JSON: {e}")))?;
        let plugin = P::new(config)
            .map_err(|e| Failure::new(STATUS_ERROR, "InitError", error_chain(e.as_ref())))?;
        let specs = plugin.tools();
        let tool_ids = specs.iter().map(|spec| spec.id.clone()).collect();
        let instance = Box::new(Instance {
            plugin,
            specs,
            tool_ids,
        });
        // SAFETY: checked non-null above; ownership of the box passes to the
        // host until `destroy`.
        unsafe { out_instance.write(Box::into_raw(instance).cast()) };
        Ok(Vec::new())
    })
}

/// `tools` of [`vtable_for`]; use the vtable, not this.
///
/// # Safety
/// `instance` must be null or a live instance from the same vtable's
/// `create`; `out` a writable slot or null.
#[doc(hidden)]
pub unsafe extern "C" fn __tools<P: Plugin>(
    instance: *const c_void,
    out: *mut FsBuffer,
) -> FsStatus {
    guarded(out, || {
        // SAFETY: the host passes an instance of this vtable or null.
        let instance = unsafe { instance_ref::<P>(instance) }?;
        serde_json::to_vec(&instance.specs)
            .map_err(|e| Failure::new(STATUS_ERROR, "InvalidOutput", e.to_string()))
    })
}

/// `call` of [`vtable_for`] (JSON only: a binary result leaves as a base64
/// string at its place); use the vtable, not this.
///
/// # Safety
/// `instance` must be null or a live instance from the same vtable's
/// `create`; `tool` and `args` must point to the given number of readable
/// bytes (or be null with length 0); `out` a writable slot or null.
#[doc(hidden)]
pub unsafe extern "C" fn __call<P: Plugin>(
    instance: *const c_void,
    tool: *const u8,
    tool_len: usize,
    args: *const u8,
    args_len: usize,
    out: *mut FsBuffer,
) -> FsStatus {
    guarded(out, || {
        // SAFETY: the caller's contract, passed on; no binary arguments.
        let (instance, tool, args) =
            unsafe { call_parts::<P>(instance, tool, tool_len, args, args_len) }?;
        let output = run_call(instance, Call::new(tool, args))?;
        let json = output
            .into_json()
            .map_err(|e| Failure::new(STATUS_ERROR, e.error_type, e.message))?;
        serde_json::to_vec(&json)
            .map_err(|e| Failure::new(STATUS_ERROR, "InvalidOutput", e.to_string()))
    })
}

/// `call_binary` of [`vtable_for`] (ABI 3); use the vtable, not this.
///
/// # Safety
/// As [`__call`]; besides, `binary` must point to `binary_len` readable
/// [`FsBinaryArg`]s whose slices are readable for the call (or be null with
/// length 0), and `out_binary` to a writable slot (or be null, which is
/// reported).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn __call_binary<P: Plugin>(
    instance: *const c_void,
    tool: *const u8,
    tool_len: usize,
    args: *const u8,
    args_len: usize,
    binary: *const FsBinaryArg,
    binary_len: usize,
    out: *mut FsBuffer,
    out_binary: *mut FsResultList,
) -> FsStatus {
    if out_binary.is_null() {
        return guarded(out, || {
            Err(Failure::bad_request("out_binary is a null pointer"))
        });
    }
    // SAFETY: not null; the host promises a writable slot. Written first so
    // that every path leaves the empty list there.
    unsafe { out_binary.write(FsResultList::empty()) };
    let mut results: Vec<(String, Vec<u8>)> = Vec::new();
    let status = guarded(out, || {
        // SAFETY: the caller's contract, passed on.
        let (instance, tool, args) =
            unsafe { call_parts::<P>(instance, tool, tool_len, args, args_len) }?;
        // SAFETY: the host promises `binary_len` readable entries.
        let entries = unsafe { borrow_array(binary, binary_len) }?;
        let mut call = Call::new(tool, args);
        for entry in entries {
            // SAFETY: the host promises each slice readable for the call.
            let pointer = unsafe { borrow_bytes(entry.pointer.ptr, entry.pointer.len, "pointer") }?;
            let pointer = std::str::from_utf8(pointer).map_err(|e| {
                Failure::bad_request(format!("a binary argument's pointer is not UTF-8: {e}"))
            })?;
            // SAFETY: as above.
            let bytes = unsafe { borrow_bytes(entry.bytes.ptr, entry.bytes.len, "bytes") }?;
            call = call.with_binary(pointer, bytes);
        }
        // Each place gets the `null` the host puts there anyway.
        let output = run_call(instance, call)?
            .placed(|_| Value::Null)
            .map_err(|e| Failure::new(STATUS_ERROR, e.error_type, e.message))?;
        let json = serde_json::to_vec(&output.json)
            .map_err(|e| Failure::new(STATUS_ERROR, "InvalidOutput", e.to_string()))?;
        results = output.binary;
        Ok(json)
    });
    if status == STATUS_OK && !results.is_empty() {
        let list: Vec<FsBinaryResult> = results
            .into_iter()
            .map(|(pointer, bytes)| FsBinaryResult {
                pointer: buffer(pointer.into_bytes()),
                bytes: buffer(bytes),
            })
            .collect();
        // SAFETY: checked non-null above; the host promises a writable slot.
        unsafe { out_binary.write(FsResultList::from_vec(list)) };
    }
    status
}

/// The instance, the tool id and the parsed arguments of a call.
///
/// # Safety
/// As [`__call`].
unsafe fn call_parts<'a, P: Plugin>(
    instance: *const c_void,
    tool: *const u8,
    tool_len: usize,
    args: *const u8,
    args_len: usize,
) -> Result<(&'a Instance<P>, &'a str, Value), Failure> {
    // SAFETY: the host passes an instance of this vtable or null.
    let instance = unsafe { instance_ref::<P>(instance) }?;
    // SAFETY: the host promises `tool_len` readable bytes for the call.
    let tool = unsafe { borrow_bytes(tool, tool_len, "tool") }?;
    let tool = std::str::from_utf8(tool)
        .map_err(|e| Failure::bad_request(format!("tool id is not UTF-8: {e}")))?;
    // SAFETY: the host promises `args_len` readable bytes for the call.
    let args = unsafe { borrow_bytes(args, args_len, "args") }?;
    let args: Value = serde_json::from_slice(args)
        .map_err(|e| Failure::bad_request(format!("invalid args JSON: {e}")))?;
    if !instance.tool_ids.contains(tool) {
        return Err(Failure::new(
            STATUS_UNKNOWN_TOOL,
            "UnknownTool",
            format!("no tool '{tool}'"),
        ));
    }
    Ok((instance, tool, args))
}

/// Runs `call` on the plugin; its error becomes the call's.
fn run_call<P: Plugin>(instance: &Instance<P>, call: Call<'_>) -> Result<Output, Failure> {
    instance
        .plugin
        .call(call)
        .map_err(|err| Failure::new(STATUS_ERROR, err.error_type, err.message))
}

/// A buffer for `bytes`: the empty (null) one when there are none.
fn buffer(bytes: Vec<u8>) -> FsBuffer {
    if bytes.is_empty() {
        FsBuffer::empty()
    } else {
        FsBuffer::from_vec(bytes)
    }
}

/// Borrows `len` entries at `ptr`; null with a zero length is empty.
///
/// # Safety
/// A non-null `ptr` must point to `len` readable, initialised `T`s that stay
/// valid and unchanged for `'a`.
unsafe fn borrow_array<'a, T>(ptr: *const T, len: usize) -> Result<&'a [T], Failure> {
    if ptr.is_null() {
        return if len == 0 {
            Ok(&[])
        } else {
            Err(Failure::bad_request(format!(
                "binary is a null pointer with length {len}"
            )))
        };
    }
    if !ptr.is_aligned() {
        return Err(Failure::bad_request(format!(
            "binary is not aligned for its entries ({} bytes)",
            std::mem::align_of::<T>()
        )));
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(Failure::bad_request(format!(
            "binary length {len} is too large"
        )));
    }
    // SAFETY: non-null, aligned, total size within `isize::MAX`; the
    // caller guarantees the entries are readable and unchanged for `'a`.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// `destroy` of [`vtable_for`]; use the vtable, not this.
///
/// # Safety
/// `instance` must be null or a live instance from the same vtable's
/// `create`, with no other call on it running or to come.
#[doc(hidden)]
pub unsafe extern "C" fn __destroy<P: Plugin>(instance: *mut c_void) {
    if instance.is_null() {
        return;
    }
    // A panicking `Drop` cannot be reported here; it is contained.
    contained(catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller hands back sole ownership of the box made by
        // `__create::<P>`.
        drop(unsafe { Box::from_raw(instance.cast::<Instance<P>>()) });
    })));
}

/// `free_buffer` of every vtable; use the vtable, not this.
///
/// # Safety
/// `buf` must be empty or a buffer this library wrote to an `out`, not yet
/// freed.
#[doc(hidden)]
pub unsafe extern "C" fn __free_buffer(buf: FsBuffer) {
    if buf.ptr.is_null() || buf.len > buf.cap {
        return;
    }
    contained(catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller returns parts made by `FsBuffer::from_vec` in
        // this library, with this allocator, exactly once.
        drop(unsafe { Vec::from_raw_parts(buf.ptr, buf.len, buf.cap) });
    })));
}

/// `free_results` of [`vtable_for`]: frees a result list's array (not the
/// buffers in it); use the vtable, not this.
///
/// # Safety
/// `list` must be empty or a list this library wrote to an `out_binary`,
/// not yet freed.
#[doc(hidden)]
pub unsafe extern "C" fn __free_results(list: FsResultList) {
    if list.ptr.is_null() || list.len > list.cap {
        return;
    }
    contained(catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the caller returns parts made by `FsResultList::from_vec`
        // in this library, with this allocator, exactly once. The elements
        // have no destructor: their buffers are not touched.
        drop(unsafe { Vec::from_raw_parts(list.ptr, list.len, list.cap) });
    })));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::{BoxError, ToolError};
    use serde_json::json;
    use std::ffi::{CStr, c_char};

    /// A plugin whose behaviour the manifest picks.
    struct Probe {
        dir: String,
    }

    impl Plugin for Probe {
        fn new(config: PluginConfig) -> Result<Self, BoxError> {
            match config.manifest["init"].as_str() {
                Some("panic") => panic!("constructor panic {}", 42),
                Some("error") => Err(std::io::Error::other("missing weights").into()),
                _ => Ok(Probe {
                    dir: config.plugin_dir.display().to_string(),
                }),
            }
        }

        fn tools(&self) -> Vec<ToolSpec> {
            ["echo", "fail", "panic", "dir", "bytes", "placed"]
                .into_iter()
                .map(ToolSpec::new)
                .collect()
        }

        /// `bytes`: the binary argument `data` (or, without one, the
        /// string `text`) back as binary result `/data`, with its length
        /// and the address the tool saw it at.
        fn call(&self, call: Call<'_>) -> Result<Output, ToolError> {
            if call.tool() == "placed" {
                // `{"json": J, "at": [pointers]}`: J with a binary result
                // `x` at each pointer.
                let args = call.args();
                let mut output = Output::json(args["json"].clone());
                for pointer in args["at"].as_array().into_iter().flatten() {
                    output = output.with_binary(pointer.as_str().unwrap_or("?"), b"x".to_vec());
                }
                return Ok(output);
            }
            if call.tool() != "bytes" {
                let tool = call.tool();
                return self.run(tool, call.into_json_args()?).map(Output::json);
            }
            let data = match call.binary("data") {
                Some(data) => data,
                None => call.args()["text"].as_str().unwrap_or_default().as_bytes(),
            };
            Ok(Output::json(json!({
                "len": data.len(),
                "at": data.as_ptr() as usize,
                "data": null,
            }))
            .with_binary("/data", data.to_vec()))
        }

        fn run(&self, tool: &str, args: Value) -> Result<Value, ToolError> {
            match tool {
                "echo" => Ok(args),
                "fail" => Err(ToolError::new("Nope", "asked to fail")),
                "panic" => panic!("tool panic"),
                "dir" => Ok(json!(self.dir)),
                other => panic!("the SDK let unknown tool {other} through"),
            }
        }
    }

    /// The macro's expansion, as a plugin crate gets it (a plugin exports it
    /// at its root, where it is reachable).
    #[allow(unreachable_pub)]
    mod exported {
        crate::export_plugin!(super::Probe);
    }

    fn vtable() -> &'static PluginVTable {
        // SAFETY: the entry returns a pointer to a static.
        unsafe { &*exported::forgesyte_plugin_entry() }
    }

    /// Status and body of a call, the body freed through the vtable.
    fn take(vt: &PluginVTable, status: FsStatus, out: FsBuffer) -> (FsStatus, Value) {
        // SAFETY: `out` was just written by the plugin.
        let bytes = unsafe { out.to_vec() };
        // SAFETY: handed back once.
        unsafe { (vt.free_buffer)(out) };
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, body)
    }

    fn create(vt: &PluginVTable, config: &[u8]) -> (FsStatus, Value, *mut c_void) {
        let mut instance = std::ptr::dangling_mut::<c_void>();
        let mut out = FsBuffer::empty();
        // SAFETY: valid pointers for the duration of the call.
        let status = unsafe { (vt.create)(config.as_ptr(), config.len(), &mut instance, &mut out) };
        let (status, body) = take(vt, status, out);
        (status, body, instance)
    }

    fn config(manifest: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"manifest": manifest, "plugin_dir": "/plugins/probe"})).unwrap()
    }

    fn call(
        vt: &PluginVTable,
        instance: *mut c_void,
        tool: &[u8],
        args: &[u8],
    ) -> (FsStatus, Value) {
        let mut out = FsBuffer::empty();
        // SAFETY: valid pointers for the duration of the call.
        let status = unsafe {
            (vt.call)(
                instance,
                tool.as_ptr(),
                tool.len(),
                args.as_ptr(),
                args.len(),
                &mut out,
            )
        };
        take(vt, status, out)
    }

    fn c_str(ptr: *const c_char) -> &'static str {
        // SAFETY: the vtable's strings are static and NUL-terminated.
        unsafe { CStr::from_ptr(ptr) }.to_str().unwrap()
    }

    #[test]
    fn header_fields() {
        let vt = vtable();
        assert_eq!(vt.abi_version, ABI_VERSION);
        assert_eq!(std::mem::offset_of!(PluginVTable, abi_version), 0);
        assert_eq!(c_str(vt.sdk_version), env!("CARGO_PKG_VERSION"));
        assert!(!c_str(vt.rustc_version).is_empty());
        assert_eq!(
            &ENTRY_SYMBOL_C[..ENTRY_SYMBOL.len()],
            ENTRY_SYMBOL.as_bytes()
        );
        assert_eq!(ENTRY_SYMBOL_C.last(), Some(&0));
        let _: EntryFn = exported::forgesyte_plugin_entry;
    }

    #[test]
    fn lifecycle_through_the_vtable() {
        let vt = vtable();
        let (status, body, instance) = create(vt, &config(json!({"name": "probe"})));
        assert_eq!((status, body), (STATUS_OK, Value::Null));
        assert!(!instance.is_null());

        let mut out = FsBuffer::empty();
        // SAFETY: live instance, valid out slot.
        let status = unsafe { (vt.tools)(instance, &mut out) };
        let (status, tools) = take(vt, status, out);
        assert_eq!(status, STATUS_OK);
        let ids: Vec<&str> = tools
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["echo", "fail", "panic", "dir", "bytes", "placed"]);
        assert_eq!(tools[0]["input_schema"], json!({"type": "object"}));

        assert_eq!(
            call(vt, instance, b"echo", br#"{"a": [1, 2]}"#),
            (STATUS_OK, json!({"a": [1, 2]}))
        );
        assert_eq!(
            call(vt, instance, b"dir", b"{}"),
            (STATUS_OK, json!("/plugins/probe"))
        );
        assert_eq!(
            call(vt, instance, b"fail", b"{}"),
            (
                STATUS_ERROR,
                json!({"error_type": "Nope", "message": "asked to fail"})
            )
        );
        assert_eq!(
            call(vt, instance, b"panic", b"{}"),
            (
                STATUS_PANIC,
                json!({"error_type": "Panic", "message": "tool panic"})
            )
        );
        // The instance survives a panic.
        assert_eq!(call(vt, instance, b"echo", b"7"), (STATUS_OK, json!(7)));
        let (status, body) = call(vt, instance, b"nope", b"{}");
        assert_eq!(status, STATUS_UNKNOWN_TOOL);
        assert_eq!(body["error_type"], "UnknownTool");
        assert!(body["message"].as_str().unwrap().contains("nope"));

        // SAFETY: created above, no call running.
        unsafe { (vt.destroy)(instance) };
    }

    #[test]
    fn concurrent_calls_share_one_instance() {
        let vt = vtable();
        let (status, _, instance) = create(vt, &config(Value::Null));
        assert_eq!(status, STATUS_OK);
        let addr = instance as usize;
        std::thread::scope(|s| {
            for i in 0..4 {
                s.spawn(move || {
                    for j in 0..50 {
                        let args = json!({"i": i, "j": j}).to_string();
                        let (status, body) =
                            call(vt, addr as *mut c_void, b"echo", args.as_bytes());
                        assert_eq!((status, body), (STATUS_OK, json!({"i": i, "j": j})));
                    }
                });
            }
        });
        // SAFETY: all calls have returned.
        unsafe { (vt.destroy)(instance) };
    }

    #[test]
    fn constructor_panic_and_error_are_reported() {
        let vt = vtable();
        let (status, body, instance) = create(vt, &config(json!({"init": "panic"})));
        assert_eq!(status, STATUS_PANIC);
        assert_eq!(
            body,
            json!({"error_type": "Panic", "message": "constructor panic 42"})
        );
        assert!(instance.is_null());

        let (status, body, instance) = create(vt, &config(json!({"init": "error"})));
        assert_eq!(status, STATUS_ERROR);
        assert_eq!(
            body,
            json!({"error_type": "InitError", "message": "missing weights"})
        );
        assert!(instance.is_null());
    }

    #[test]
    fn bad_requests_are_refused_without_running_anything() {
        let vt = vtable();
        for bad_config in [&b"\xff\xfe"[..], b"", b"{", br#"{"manifest": {}}"#] {
            let (status, body, instance) = create(vt, bad_config);
            assert_eq!(status, STATUS_BAD_REQUEST, "{bad_config:?}");
            assert_eq!(body["error_type"], "BadRequest");
            assert!(instance.is_null());
        }

        let (_, _, instance) = create(vt, &config(Value::Null));
        let (status, body) = call(vt, instance, b"ec\xffho", b"{}");
        assert_eq!(status, STATUS_BAD_REQUEST);
        assert!(
            body["message"].as_str().unwrap().contains("UTF-8"),
            "{body}"
        );
        for bad_args in [&b"\xff"[..], b"", b"{\"a\":"] {
            assert_eq!(call(vt, instance, b"echo", bad_args).0, STATUS_BAD_REQUEST);
        }

        let mut out = FsBuffer::empty();
        // SAFETY: null instance and null tool pointers are checked by the SDK.
        let status = unsafe {
            (vt.call)(
                std::ptr::null(),
                b"echo".as_ptr(),
                4,
                b"{}".as_ptr(),
                2,
                &mut out,
            )
        };
        assert_eq!(take(vt, status, out).0, STATUS_BAD_REQUEST);
        let mut out = FsBuffer::empty();
        // SAFETY: as above.
        let status =
            unsafe { (vt.call)(instance, std::ptr::null(), 4, b"{}".as_ptr(), 2, &mut out) };
        assert_eq!(take(vt, status, out).0, STATUS_BAD_REQUEST);
        // SAFETY: a null `out` is checked and nothing is written.
        let status = unsafe {
            (vt.call)(
                instance,
                b"echo".as_ptr(),
                4,
                b"{}".as_ptr(),
                2,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(status, STATUS_BAD_REQUEST);
        let mut out = FsBuffer::empty();
        let cfg = config(Value::Null);
        // SAFETY: a null `out_instance` is checked.
        let status =
            unsafe { (vt.create)(cfg.as_ptr(), cfg.len(), std::ptr::null_mut(), &mut out) };
        assert_eq!(take(vt, status, out).0, STATUS_BAD_REQUEST);

        // SAFETY: created above; null and empty are no-ops.
        unsafe {
            (vt.destroy)(instance);
            (vt.destroy)(std::ptr::null_mut());
            (vt.free_buffer)(FsBuffer::empty());
        }
    }

    #[test]
    fn error_chain_includes_sources() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("cannot load weights")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(std::io::Error::other("file not found"));
        assert_eq!(error_chain(&err), "cannot load weights: file not found");
    }

    /// A `call_binary`: status, result JSON and binary results (pointer,
    /// bytes), every buffer and the list handed back to the plugin.
    fn call_binary(
        vt: &PluginVTable,
        instance: *mut c_void,
        tool: &[u8],
        args: &[u8],
        binary: &[(&[u8], &[u8])],
    ) -> (FsStatus, Value, Vec<(String, Vec<u8>)>) {
        let entries: Vec<FsBinaryArg> = binary
            .iter()
            .map(|(pointer, bytes)| FsBinaryArg {
                pointer: FsSlice::new(pointer),
                bytes: FsSlice::new(bytes),
            })
            .collect();
        let mut out = FsBuffer::empty();
        let mut list = FsResultList::empty();
        // SAFETY: valid pointers for the duration of the call.
        let status = unsafe {
            (vt.call_binary)(
                instance,
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
        let (status, body) = take(vt, status, out);
        let mut results = Vec::new();
        if !list.ptr.is_null() {
            // SAFETY: the plugin wrote `len` results at `ptr`.
            let items = unsafe { std::slice::from_raw_parts(list.ptr, list.len) };
            for item in items {
                let pointer = FsBuffer { ..item.pointer };
                let bytes = FsBuffer { ..item.bytes };
                // SAFETY: each buffer was written by the plugin, freed once.
                let pointer = unsafe { PluginBuffer::new(pointer, vt) };
                // SAFETY: as above.
                let bytes = unsafe { PluginBuffer::new(bytes, vt) };
                results.push((String::from_utf8(pointer.to_vec()).unwrap(), bytes.to_vec()));
            }
        }
        // SAFETY: the list's array, handed back once.
        unsafe { (vt.free_results)(list) };
        (status, body, results)
    }

    #[test]
    fn binary_arguments_arrive_as_the_hosts_slices_and_results_leave_as_bytes() {
        let vt = vtable();
        let (_, _, instance) = create(vt, &config(Value::Null));
        let data: Vec<u8> = (0..=255).cycle().take(70_000).collect();
        let (status, body, results) = call_binary(
            vt,
            instance,
            b"bytes",
            br#"{"data": null}"#,
            &[(b"/data", &data)],
        );
        assert_eq!(status, STATUS_OK, "{body}");
        assert_eq!(body["len"], 70_000);
        // Zero copy: the tool saw the host's own bytes.
        assert_eq!(body["at"], data.as_ptr() as usize);
        assert_eq!(body["data"], Value::Null);
        assert_eq!(results, [("/data".to_owned(), data.clone())]);
        // Empty bytes and no binary argument at all.
        let (status, body, results) =
            call_binary(vt, instance, b"bytes", b"{}", &[(b"/data", b"")]);
        assert_eq!((status, &body["len"]), (STATUS_OK, &json!(0)));
        assert_eq!(results, [("/data".to_owned(), Vec::new())]);
        // A tool that only implements `run` gets base64 strings.
        let (status, body, results) = call_binary(
            vt,
            instance,
            b"echo",
            br#"{"img": null, "n": 1}"#,
            &[(b"/img", b"\x00\xff")],
        );
        assert_eq!((status, body), (STATUS_OK, json!({"img": "AP8=", "n": 1})));
        assert!(results.is_empty());
        // Through ABI 1's `call` a binary result is a base64 string.
        assert_eq!(
            call(vt, instance, b"bytes", br#"{"text": "hi"}"#).1["data"],
            json!("aGk=")
        );
        // SAFETY: created above, no call running.
        unsafe { (vt.destroy)(instance) };
    }

    /// Binary results the host would refuse as a protocol fault (the
    /// plugin then FAILED) are the tool's `InvalidOutput` error, as through
    /// ABI 1; good ones leave with a `null` at their places.
    #[test]
    fn binary_results_without_a_place_are_the_tools_error() {
        let vt = vtable();
        let (_, _, instance) = create(vt, &config(Value::Null));
        let placed = |json: Value, at: Value| {
            let args = serde_json::to_vec(&json!({"json": json, "at": at})).unwrap();
            call_binary(vt, instance, b"placed", &args, &[])
        };
        for (json, at) in [
            (json!({"a": 1}), json!(["/missing/x"])),
            (json!({"m": null}), json!(["/m", "/m"])),
            (json!({"a": [0]}), json!(["/a/5"])),
            (json!({"a": 1}), json!(["nope"])),
            (json!({"a": {"b": null}}), json!(["/a", "/a/b"])),
        ] {
            let (status, body, results) = placed(json.clone(), at.clone());
            assert_eq!(status, STATUS_ERROR, "{json} {at}: {body}");
            assert_eq!(body["error_type"], "InvalidOutput", "{json} {at}: {body}");
            assert!(results.is_empty(), "{json} {at}");
            // The same through ABI 1's `call` (base64 at the places).
            let args = serde_json::to_vec(&json!({"json": json, "at": at})).unwrap();
            let (status, body) = call(vt, instance, b"placed", &args);
            assert_eq!(status, STATUS_ERROR, "ABI 1: {json} {at}: {body}");
            assert_eq!(
                body["error_type"], "InvalidOutput",
                "ABI 1: {json} {at}: {body}"
            );
        }
        let (status, body, results) = placed(json!({"a": 1}), json!(["/m", "/a"]));
        assert_eq!((status, body), (STATUS_OK, json!({"a": null, "m": null})));
        assert_eq!(results.len(), 2);
        // SAFETY: created above, no call running.
        unsafe { (vt.destroy)(instance) };
    }

    /// `call_binary` of the tool `bytes` with `{}`, the raw `binary` array
    /// and the raw `out_binary` slot: its status and answer.
    fn raw_call_binary(
        vt: &PluginVTable,
        instance: *mut c_void,
        binary: *const FsBinaryArg,
        binary_len: usize,
        out_binary: *mut FsResultList,
    ) -> (FsStatus, Value) {
        let mut out = FsBuffer::empty();
        // SAFETY: what the test passes is what the SDK must check: null
        // pointers with lengths; everything else is valid for the call.
        let status = unsafe {
            (vt.call_binary)(
                instance,
                b"bytes".as_ptr(),
                5,
                b"{}".as_ptr(),
                2,
                binary,
                binary_len,
                &mut out,
                out_binary,
            )
        };
        take(vt, status, out)
    }

    #[test]
    fn binary_calls_that_break_the_contract_are_bad_requests_with_no_results() {
        let vt = vtable();
        let (_, _, instance) = create(vt, &config(Value::Null));
        let (status, _, results) = call_binary(vt, instance, b"bytes", b"{}", &[(b"\xff", b"1")]);
        assert_eq!(status, STATUS_BAD_REQUEST);
        assert!(results.is_empty());
        let (status, body, results) = call_binary(vt, instance, b"fail", b"{}", &[(b"/x", b"1")]);
        assert_eq!(
            (status, &body["error_type"]),
            (STATUS_ERROR, &json!("Nope"))
        );
        assert!(results.is_empty());
        let (status, _, _) = call_binary(vt, instance, b"nope", b"{}", &[]);
        assert_eq!(status, STATUS_UNKNOWN_TOOL);
        // A null binary array with a length.
        let mut list = FsResultList::empty();
        let (status, _) = raw_call_binary(vt, instance, std::ptr::null(), 3, &mut list);
        assert_eq!(status, STATUS_BAD_REQUEST);
        assert!(list.ptr.is_null());
        // An entry whose bytes are a null pointer with a length, and one
        // whose pointer is: refused, nothing read, no results.
        let text = b"/x";
        let slice = |ptr: *const u8, len| FsSlice { ptr, len };
        for (pointer, bytes) in [
            (slice(text.as_ptr(), 2), slice(std::ptr::null(), 4)),
            (slice(std::ptr::null(), 2), slice(text.as_ptr(), 1)),
        ] {
            let entry = [FsBinaryArg { pointer, bytes }];
            let mut list = FsResultList::empty();
            let (status, body) = raw_call_binary(vt, instance, entry.as_ptr(), 1, &mut list);
            assert_eq!(status, STATUS_BAD_REQUEST, "{body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains("null pointer"), "{body}");
            assert!(list.ptr.is_null());
        }
        // A misaligned binary array: refused, nothing read.
        let entries = [FsBinaryArg {
            pointer: slice(text.as_ptr(), 2),
            bytes: slice(text.as_ptr(), 1),
        }; 2];
        let misaligned = entries
            .as_ptr()
            .cast::<u8>()
            .wrapping_add(1)
            .cast::<FsBinaryArg>();
        let mut list = FsResultList::empty();
        let (status, body) = raw_call_binary(vt, instance, misaligned, 1, &mut list);
        assert_eq!(status, STATUS_BAD_REQUEST, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not aligned"),
            "{body}"
        );
        assert!(list.ptr.is_null());
        // A null `out_binary`.
        let (status, _) = raw_call_binary(vt, instance, std::ptr::null(), 0, std::ptr::null_mut());
        assert_eq!(status, STATUS_BAD_REQUEST);
        // SAFETY: created above; the empty list is a no-op.
        unsafe {
            (vt.free_results)(FsResultList::empty());
            (vt.destroy)(instance);
        }
    }

    #[test]
    fn the_version_1_table_is_the_prefix_and_calls_json_only() {
        const V1: PluginVTableV1 = vtable_v1_for::<Probe>();
        assert_eq!(V1.abi_version, 1);
        let v3 = vtable();
        assert!(std::ptr::fn_addr_eq(v3.v1().call, V1.call));
    }
}
