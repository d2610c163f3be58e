//! The ForgeSyte plugin boundary, with no I/O policy: everything two sides
//! must agree on to load and run a plugin, and nothing else.
//!
//! **Who this crate is for:** hosts (the ForgeSyte loader), the Rust plugin
//! SDK, and anyone writing a plugin runner or a host in another language
//! (for them the normative text is `PROTOCOL.md` beside this crate; the
//! types here are its Rust rendering). Plugin authors use the SDK, not this.
//!
//! - [`abi`]: the C ABI of an in-process plugin library (the versioned
//!   vtable, status codes, buffer ownership, and [`abi::PluginBuffer`], the
//!   host's owning handle on a buffer the plugin allocated).
//! - [`fingerprint`]: the build record a plugin library carries in an ELF
//!   section, so a host can vet it without running any of its code.
//! - [`wire`]: the child-process protocol, version
//!   [`wire::PROTOCOL_VERSION`]: framing with binary attachments, messages,
//!   the version handshake.
//! - [`ToolSpec`]: what a plugin says about a tool, the same everywhere.
//!
//! **What this crate must not know:** processes, threads, timeouts, the
//! registry, HTTP, or any host error type. It depends on `serde` and
//! `serde_json` only, so the SDK that depends on it stays light.

pub mod abi;
pub mod fingerprint;
mod tool;
pub mod wire;

pub use tool::ToolSpec;
