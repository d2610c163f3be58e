//! Write ForgeSyte plugins in Rust.
//!
//! **Who this crate is for:** authors of plugins — shared libraries that the
//! ForgeSyte server loads to offer vision tools. Implement [`Plugin`] for a
//! type, call [`export_plugin!`] once, build the crate as a `cdylib`, and put
//! the library next to a `manifest.json` in the server's plugins directory.
//! If you are writing a *host*, read the [`abi`] module: it is the contract.
//!
//! **What this crate must not know:** anything of the host. It depends on
//! `forgesyte-protocol` (the boundary's own types), `serde` and `serde_json`
//! only, never on the loader, registry or server,
//! and no Rust type crosses the library boundary: only the C structures of
//! [`abi`] and JSON bytes.
//!
//! # The contract in brief
//!
//! - The library exports one C symbol, `forgesyte_plugin_entry`, returning a
//!   table of functions whose first field is the ABI version
//!   ([`abi::ABI_VERSION`]); the host checks it before anything else.
//! - Configuration, tool arguments, results and errors cross as JSON bytes;
//!   binary arguments and results (ABI 3) cross as raw bytes beside them:
//!   a tool that implements [`Plugin::call`] gets its binary arguments as
//!   `&[u8]` ([`Call::binary`], the host's own buffer, no copy) and may
//!   return binary results ([`Output::with_binary`]). Memory is freed by
//!   the side that allocated it: the host hands every buffer the plugin
//!   wrote back to the plugin's `free_buffer`.
//! - No panic ever crosses the boundary: the SDK catches it and the host sees
//!   an error with the panic message. Keep the default `panic = "unwind"`.
//! - Tools run concurrently from several threads on one instance.
//! - The host never unloads a library once loaded, so statics, thread locals
//!   and background threads are safe to use.
//! - The same library runs in-process and in ForgeSyte's child-process host.
//!
//! # A complete plugin
//!
//! ```
//! use forgesyte_plugin_sdk::{BoxError, Plugin, PluginConfig, ToolError, ToolSpec};
//! use serde_json::{Value, json};
//!
//! /// Counts the words of a text.
//! pub struct WordCount {
//!     min_len: usize,
//! }
//!
//! impl Plugin for WordCount {
//!     fn new(config: PluginConfig) -> Result<Self, BoxError> {
//!         // Settings may come from the manifest; models from `config.models`.
//!         let min_len = config.manifest["min_len"].as_u64().unwrap_or(1);
//!         Ok(WordCount { min_len: usize::try_from(min_len)? })
//!     }
//!
//!     fn tools(&self) -> Vec<ToolSpec> {
//!         vec![ToolSpec::new("count")
//!             .title("Count words")
//!             .description("Number of words of at least `min_len` characters")
//!             .inputs(json!({"type": "object", "properties": {"text": {"type": "string"}},
//!                            "required": ["text"]}))
//!             .outputs(json!({"type": "object", "properties": {"words": {"type": "integer"}}}))]
//!     }
//!
//!     fn run(&self, tool: &str, args: Value) -> Result<Value, ToolError> {
//!         match tool {
//!             "count" => {
//!                 let text = args["text"]
//!                     .as_str()
//!                     .ok_or_else(|| ToolError::invalid_input("`text` must be a string"))?;
//!                 let words = text.split_whitespace().filter(|w| w.len() >= self.min_len).count();
//!                 Ok(json!({ "words": words }))
//!             }
//!             // The SDK only passes ids listed by `tools()`.
//!             other => Err(ToolError::new("UnknownTool", other)),
//!         }
//!     }
//! }
//!
//! forgesyte_plugin_sdk::export_plugin!(WordCount);
//! # fn main() {
//! #     // What a host does, in-process: look up the entry, create, call.
//! #     use forgesyte_plugin_sdk::abi::{FsBuffer, STATUS_OK, STATUS_ERROR};
//! #     let vt = unsafe { &*forgesyte_plugin_entry() };
//! #     assert_eq!(vt.abi_version, forgesyte_plugin_sdk::abi::ABI_VERSION);
//! #     let config = br#"{"manifest": {"min_len": 2}, "plugin_dir": "/plugins/wc"}"#;
//! #     let mut instance = std::ptr::null_mut();
//! #     let mut out = FsBuffer::empty();
//! #     let status = unsafe { (vt.create)(config.as_ptr(), config.len(), &mut instance, &mut out) };
//! #     assert_eq!(status, STATUS_OK);
//! #     let mut run = |args: &[u8]| {
//! #         let mut out = FsBuffer::empty();
//! #         let status = unsafe {
//! #             (vt.call)(instance, b"count".as_ptr(), 5, args.as_ptr(), args.len(), &mut out)
//! #         };
//! #         let body: Value = serde_json::from_slice(&unsafe { out.to_vec() }).unwrap();
//! #         unsafe { (vt.free_buffer)(out) };
//! #         (status, body)
//! #     };
//! #     assert_eq!(run(br#"{"text": "a bb ccc"}"#), (STATUS_OK, json!({"words": 2})));
//! #     let (status, body) = run(br#"{"text": 3}"#);
//! #     assert_eq!((status, body["error_type"].as_str()), (STATUS_ERROR, Some("InvalidInput")));
//! #     unsafe { (vt.destroy)(instance) };
//! # }
//! ```
//!
//! With, in `Cargo.toml`:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # rlib: so `cargo test` can unit-test it
//!
//! [dependencies]
//! # Not on a registry yet: a path to the crate (`forgesyte new --rust`
//! # writes it).
//! forgesyte-plugin-sdk = { path = "/path/to/forgesyte/crates/forgesyte-plugin-sdk" }
//! serde_json = "1"
//! ```
//!
//! The crate's `README.md` shows how to build and install it.

mod binary;
mod plugin;

pub mod abi;
pub mod fingerprint;

pub mod context;

pub use binary::{Call, Output};
pub use context::{CallContext, current_call, log};
pub use plugin::{BoxError, Plugin, PluginConfig, ToolError, ToolSpec, parse_args};

/// Exports a [`Plugin`] type as this library's plugin: emits the
/// `forgesyte_plugin_entry` symbol, its static [`abi::PluginVTable`], and the
/// build [`fingerprint`] record in the ELF section `.forgesyte_abi` (which
/// hosts read before they open the library).
///
/// Use it exactly once per library, at the crate root. The expansion carries
/// its own `#[allow(unsafe_code)]`, so crates that `deny(unsafe_code)`
/// compile (`forbid` would refuse the allowance).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The ForgeSyte plugin entry point (generated by
        /// `forgesyte_plugin_sdk::export_plugin!`).
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn forgesyte_plugin_entry() -> *const $crate::abi::PluginVTable {
            // Must match `fingerprint::SECTION`. Read below, so that the
            // linker keeps it with `--gc-sections`.
            #[used]
            #[unsafe(link_section = ".forgesyte_abi")]
            static FINGERPRINT: $crate::fingerprint::Record = $crate::fingerprint::RECORD;
            $crate::fingerprint::__retain(&FINGERPRINT);
            static VTABLE: $crate::abi::PluginVTable = $crate::abi::vtable_for::<$plugin>();
            &VTABLE
        }

        /// The context of the call this thread is about to run (generated
        /// by `forgesyte_plugin_sdk::export_plugin!`; see
        /// `forgesyte_plugin_sdk::current_call`).
        ///
        /// # Safety
        ///
        /// `json` is null, or valid for reads of `len` bytes.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn forgesyte_plugin_call_context(json: *const u8, len: usize) {
            // SAFETY: the caller's contract, passed on.
            unsafe { $crate::context::__set_from_host(json, len) }
        }

        /// Where `forgesyte_plugin_sdk::log` writes in process: the host's
        /// log (generated by `forgesyte_plugin_sdk::export_plugin!`; see
        /// `forgesyte_plugin_sdk::abi::LOG_SINK_SYMBOL`).
        ///
        /// # Safety
        ///
        /// `sink` is the host's, callable with `context` from any thread
        /// while the library is loaded.
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn forgesyte_plugin_host_log(
            sink: Option<$crate::abi::LogLineFn>,
            context: *const ::core::ffi::c_void,
        ) {
            // SAFETY: the caller's contract, passed on.
            unsafe { $crate::context::__set_log_sink(sink, context) }
        }
    };
}
