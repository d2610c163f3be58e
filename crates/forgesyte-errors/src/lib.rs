//! The error taxonomy of the ForgeSyte plugin host.
//!
//! Every layer of the host reports what went wrong with a plugin through the
//! types in this crate. The hierarchy follows the Python original (seed §1):
//!
//! ```text
//! PluginError
//! ├── Load(LoadError)
//! │   ├── Import(ImportError)          kind "ImportError"
//! │   ├── Init(InitError)              kind "InitError"
//! │   └── Dependency(DependencyError)  kind "DependencyError"
//! ├── Manifest(ManifestError)          kind "ManifestError"
//! ├── Integrity(IntegrityError)        kind "IntegrityError"
//! ├── Tool(ToolError)                  kind "ToolError" / "ToolPanic" / ...
//! ├── Timeout(TimeoutError)            kind "TimeoutError"
//! └── Crash(CrashError)                kind "CrashError"
//! ```
//!
//! Each type has a stable [`kind()`](PluginError::kind) string and a
//! [`reason()`](PluginError::reason) that is what the registry stores and the
//! HTTP API shows: `"<kind>: <display>"`, e.g.
//! `ImportError: entry symbol 'forgesyte_plugin_entry' not found in /p/libx.so`.
//! Dependency errors are the exception: their reason is the seed's
//! `Missing dependencies: a, b` line, which operators already grep for.
//!
//! Sizes in messages, here and in every layer, read as [`Kib`] prints them
//! (`512 KiB`, `8.9 MiB`).
//!
//! `Display` is always a single readable line, and it already contains the
//! text of the cause, so that [`reason()`](PluginError::reason) is complete
//! on its own. Print `Display` *or* walk the chain, not both.
//!
//! # Causes: typed `source()` chains, or text
//!
//! A cause that exists as a Rust value where the error is built is kept as
//! that value, reachable through [`std::error::Error::source`] and
//! `downcast_ref`:
//!
//! | error | `source()` | |
//! |---|---|---|
//! | [`ManifestError::Io`] | [`std::io::Error`] | reading `manifest.json` |
//! | [`ManifestError::Json`] | [`serde_json::Error`] | parsing it |
//! | [`ImportError::Io`] | [`std::io::Error`] | reading the library file |
//! | [`InitError::InvalidJson`] | [`serde_json::Error`] | a constructor's answer (tool list) |
//! | [`ToolError::InvalidJson`] | [`JsonError`] → [`serde_json::Error`] | a tool's result |
//! | [`ImportError::Crashed`], [`InitError::Crashed`], [`ToolError::Crashed`] | [`CrashError`] | the runner died |
//! | [`ImportError::TimedOut`], [`InitError::TimedOut`] | [`TimeoutError`] | the runner was too slow |
//!
//! [`PluginError`] and [`LoadError`] are transparent wrappers: their
//! `source()` is that of the error they wrap.
//!
//! Every other payload is text, because that is all there ever is:
//!
//! - **the dynamic loader's words** (`dlerror()`): [`ImportError::NotALibrary`],
//!   [`ImportError::UnresolvedSymbol`], [`ImportError::MissingSharedLibrary`],
//!   [`ImportError::Open`];
//! - **the plugin's words**, which crossed the C ABI or the runner's pipe as
//!   bytes: [`InitError::Failed`], [`InitError::Panicked`],
//!   [`ToolError::Failed`], [`ToolError::Panicked`], [`ToolError::InvalidArgs`]
//!   (when the plugin rejects its arguments), and the last lines of its
//!   stderr in [`CrashError::stderr_tail`];
//! - **the host's own findings**, which have no underlying error:
//!   [`ImportError::Incompatible`], [`ImportError::InvalidInterface`],
//!   [`ImportError::SharedLibraryShadowed`], [`ImportError::NotConfined`],
//!   [`ImportError::NotStarted`] (with the system's words),
//!   [`InitError::Protocol`], [`ToolError::Protocol`], [`ToolError::Stopped`],
//!   [`ToolError::Failed`] of `ResultTooDeep`,
//!   [`CrashCause::Protocol`], [`CrashCause::Killed`], [`CrashCause::Lost`]
//!   and the manifest
//!   checks ([`ManifestError::InvalidField`], ...), and the integrity
//!   checks ([`IntegrityError`]).
//!
//! **Typed causes end at a process boundary.** An error built in a plugin's
//! runner process reaches the host as its kind and text (the wire protocol
//! carries no Rust values), so an isolated plugin's import, init or tool
//! error arrives as one of the text variants even where the in-process one
//! has a typed cause.
//!
//! The typed variants read exactly as their text twins
//! ([`ManifestError::Json`] as [`ManifestError::InvalidJson`],
//! [`ImportError::Io`] as [`ImportError::Open`], the `InvalidJson` variants
//! as the `Protocol` ones, with the same [`kind()`](PluginError::kind)), so
//! building one instead of the other never changes a reason. The text twins
//! stay for callers that have only text.
//!
//! This crate knows nothing about the registry, the loader, HTTP or plugin
//! code: it is plain data, usable by every other crate (the plugin SDK
//! included).

mod quote;
mod size;
mod tool;

use std::path::PathBuf;
use std::time::Duration;

pub use quote::{LOGGED_CHARS, logged, shorten, within};
pub use size::Kib;
pub use tool::{JsonError, ToolError};

/// Any error the host reports about a plugin.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The plugin could not be loaded (import, init or dependencies).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The plugin's `manifest.json` is missing or invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The plugin's files are not the ones pinned (manifest `sha256` or the
    /// operator's lock file).
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    /// A tool call failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// An operation on the plugin ran past its time limit.
    #[error(transparent)]
    Timeout(#[from] TimeoutError),
    /// The plugin's process died.
    #[error(transparent)]
    Crash(#[from] CrashError),
}

impl PluginError {
    /// Stable machine-readable name of the error class (`"ImportError"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Load(e) => e.kind(),
            PluginError::Manifest(e) => e.kind(),
            PluginError::Integrity(e) => e.kind(),
            PluginError::Tool(e) => e.kind(),
            PluginError::Timeout(e) => e.kind(),
            PluginError::Crash(e) => e.kind(),
        }
    }

    /// The human reason stored in the registry (`"<kind>: <message>"`).
    pub fn reason(&self) -> String {
        match self {
            PluginError::Load(e) => e.reason(),
            other => format!("{}: {}", other.kind(), other),
        }
    }
}

impl From<ImportError> for PluginError {
    fn from(e: ImportError) -> Self {
        PluginError::Load(LoadError::Import(e))
    }
}

impl From<InitError> for PluginError {
    fn from(e: InitError) -> Self {
        PluginError::Load(LoadError::Init(e))
    }
}

impl From<DependencyError> for PluginError {
    fn from(e: DependencyError) -> Self {
        PluginError::Load(LoadError::Dependency(e))
    }
}

/// The plugin could not be brought to `INITIALIZED`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The plugin library could not be opened or is not a valid plugin.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// The plugin's constructor failed or panicked.
    #[error(transparent)]
    Init(#[from] InitError),
    /// Something the plugin needs is missing.
    #[error(transparent)]
    Dependency(#[from] DependencyError),
}

impl LoadError {
    /// Stable machine-readable name of the error class.
    pub fn kind(&self) -> &'static str {
        match self {
            LoadError::Import(_) => "ImportError",
            LoadError::Init(_) => "InitError",
            LoadError::Dependency(_) => "DependencyError",
        }
    }

    /// The human reason stored in the registry.
    pub fn reason(&self) -> String {
        match self {
            LoadError::Dependency(e) => e.to_string(),
            other => format!("{}: {}", other.kind(), other),
        }
    }
}

/// Opening the plugin library failed (seed: `PluginImportError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// The library file does not exist.
    #[error("library not found: {path}")]
    LibraryNotFound {
        /// Where the library was looked for.
        path: PathBuf,
    },
    /// A library named by its bare file name is in neither the plugin's
    /// directory nor any `--lib-path` directory (none given: said so, with
    /// where a library built elsewhere is found from).
    #[error("library not found: {path}, {}{}", lib_path_searched(searched), python_file_hint(python_file.as_deref()))]
    LibraryNotFoundInPath {
        /// The path in the plugin's directory.
        path: PathBuf,
        /// The `--lib-path` directories looked in, as the reason shows
        /// them (`DIR (missing)` for one that does not exist).
        searched: Vec<String>,
        /// `NAME.py` beside where the library was looked for, when there
        /// is one: the entrypoint (`main`) meant a Python file, which one
        /// bare word does not say.
        python_file: Option<String>,
    },
    /// The file exists but is not a loadable shared object.
    ///
    /// The detail is text: `dlerror()`'s message or the ELF check's.
    #[error("not a shared library: {path}: {detail}")]
    NotALibrary {
        /// The file.
        path: PathBuf,
        /// What the dynamic loader said.
        detail: String,
    },
    /// The library needs symbols that nothing provides.
    ///
    /// The detail is `dlerror()`'s text; there is no typed cause.
    #[error("unresolved symbol in {path}: {detail}")]
    UnresolvedSymbol {
        /// The library.
        path: PathBuf,
        /// What the dynamic loader said.
        detail: String,
    },
    /// The library needs another shared library that cannot be found.
    ///
    /// The detail is `dlerror()`'s text; there is no typed cause.
    #[error("{path} needs a shared library that cannot be loaded: {detail}")]
    MissingSharedLibrary {
        /// The library.
        path: PathBuf,
        /// What the dynamic loader said.
        detail: String,
    },
    /// The host could not start the plugin's process for want of its own
    /// resources (file descriptors, processes, memory): no fault of the
    /// plugin's. A supervisor's restart that meets it spends none of the
    /// plugin's restart budget.
    #[error("cannot start {what}: {detail}")]
    HostResources {
        /// What was to start (`the Python interpreter /usr/bin/python3`).
        what: String,
        /// What is short, and which limit to raise.
        detail: String,
    },
    /// The host could not start the plugin's process for another reason:
    /// its program is missing, not executable, or not the runner user's
    /// to run. The reason names the program, not the plugin's file.
    #[error("{detail}")]
    NotStarted {
        /// What was to start and why it could not (`cannot start the
        /// Python interpreter /venv/bin/python: Permission denied`).
        detail: String,
    },
    /// The dynamic loader refused the library for another reason.
    ///
    /// The detail is text (`dlerror()`'s, or what came over the runner's
    /// pipe). Where the cause is an [`std::io::Error`] in this process,
    /// [`ImportError::Io`] keeps it typed and reads the same.
    #[error("cannot open {path}: {detail}")]
    Open {
        /// The library.
        path: PathBuf,
        /// What the dynamic loader said.
        detail: String,
    },
    /// A shared library the plugin ships beside it (found through
    /// `$ORIGIN` in its run path) has the name of another library the
    /// server has loaded already: the dynamic loader shares libraries by
    /// name, so it would give the plugin that one instead of its own.
    #[error(
        "{path} needs {name}, which it ships as {shipped}, but another library of that name is loaded in the server already ({loaded}) and the dynamic loader would give the plugin that one; run the plugin isolated (\"isolation\": \"process\") or give its library a name of its own"
    )]
    SharedLibraryShadowed {
        /// The plugin's library.
        path: PathBuf,
        /// The name in its `DT_NEEDED`.
        name: String,
        /// The file its run path finds under that name.
        shipped: PathBuf,
        /// The library of that name already loaded.
        loaded: PathBuf,
    },
    /// Confinement is required (`--require-confinement`) and the plugin
    /// would run unconfined: in the server's process, with runners not
    /// confined, or in a runner that could not confine itself.
    #[error("confinement is required (--require-confinement) and {detail}")]
    NotConfined {
        /// Why it would run unconfined, and what to do.
        detail: String,
    },
    /// The plugin's directory has a path that is not valid UTF-8: a
    /// plugin is given its directory (and its models' paths) as JSON text,
    /// which cannot hold it.
    #[error(
        "the plugin's directory {} is not valid UTF-8, and a plugin is given its directory as JSON text: rename it (or a directory above it)",
        path.display()
    )]
    PathNotUtf8 {
        /// The directory.
        path: PathBuf,
    },
    /// The versioned entry symbol is missing: not a ForgeSyte plugin.
    #[error("entry symbol '{symbol}' not found in {path} (not built with forgesyte-plugin-sdk?)")]
    MissingEntrySymbol {
        /// The library.
        path: PathBuf,
        /// The symbol looked up.
        symbol: String,
    },
    /// The plugin was built against another ABI version.
    #[error("ABI version mismatch: host speaks {host}, plugin {path} speaks {plugin}")]
    AbiMismatch {
        /// The library.
        path: PathBuf,
        /// ABI version the host implements.
        host: u32,
        /// ABI version the plugin declares.
        plugin: u32,
    },
    /// The plugin's build fingerprint is incompatible with the host.
    #[error("incompatible build of {path}: {detail}")]
    Incompatible {
        /// The library.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The plugin's vtable or metadata is malformed.
    #[error("invalid plugin interface in {path}: {detail}")]
    InvalidInterface {
        /// The library.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The plugin's process (an isolated native runner, a Python runner)
    /// died while it loaded the plugin: its library, or its module. The
    /// [`CrashError`] is the [`source`](std::error::Error::source).
    #[error("plugin process died while loading the plugin: {0}")]
    Crashed(#[source] CrashError),
    /// The isolated plugin's process did not finish loading the library
    /// (and answer the handshake) in time. The [`TimeoutError`] is the
    /// [`source`](std::error::Error::source).
    #[error("{0}")]
    TimedOut(#[source] TimeoutError),
    /// Reading the library file failed. Same text as [`ImportError::Open`]
    /// with the I/O error as its detail, but the [`std::io::Error`] is kept
    /// as the [`source`](std::error::Error::source), so its
    /// [`kind()`](std::io::Error::kind) can be matched.
    #[error("cannot open {path}: {source}")]
    Io {
        /// The library.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The plugin's runner process speaks another version of the wire
    /// protocol than the host.
    #[error(
        "the plugin runner {runner} speaks protocol version {runner_version}, this host speaks version {host}"
    )]
    ProtocolMismatch {
        /// The runner program.
        runner: String,
        /// The protocol version the host speaks.
        host: u32,
        /// The protocol version the runner announced.
        runner_version: u32,
    },
    /// Importing a Python plugin's module raised (a `SyntaxError`, a
    /// `ModuleNotFoundError`, anything raised at import time). Reads as the
    /// seed's `ImportError: SyntaxError: invalid syntax (plugin.py, line 3)`.
    ///
    /// Text: the exception crossed the runner's pipe as its class name and
    /// message.
    #[error("{error_type}: {message}")]
    Python {
        /// The exception's class name.
        error_type: String,
        /// Its message (`str(exc)`).
        message: String,
        /// The last lines of its traceback, for people.
        traceback: Vec<String>,
    },
}

/// The plugin's constructor failed (seed: `PluginInitError`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// The constructor returned an error.
    ///
    /// Text: the plugin's message crossed the C ABI or the runner's pipe.
    #[error("{message}")]
    Failed {
        /// The plugin's own message.
        message: String,
    },
    /// The constructor panicked.
    ///
    /// Text: the panic payload as the plugin's side rendered it.
    #[error("plugin panicked during construction: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// The plugin answered with something the host cannot understand.
    ///
    /// The host's own finding, as text. When the cause is a JSON parse
    /// error in this process, [`InitError::InvalidJson`] keeps it typed and
    /// reads the same.
    #[error("invalid answer from plugin constructor: {detail}")]
    Protocol {
        /// What is wrong.
        detail: String,
    },
    /// The plugin answered the host with bytes that are not the JSON it
    /// expects (e.g. its tool list). Same text as [`InitError::Protocol`]
    /// with `"{what} is not valid JSON: {source}"` as its detail; the
    /// [`serde_json::Error`] is the [`source`](std::error::Error::source).
    #[error("invalid answer from plugin constructor: {what} is not valid JSON: {source}")]
    InvalidJson {
        /// What was being read (`"tool list"`).
        what: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A Python plugin's constructor (or its `validate()` / `on_load()`)
    /// raised, or the module has no plugin class. Reads as the seed's
    /// `InitError: ValueError: …` and `InitError: AttributeError: No
    /// 'Plugin' class found in module`.
    ///
    /// Text: the exception crossed the runner's pipe as its class name and
    /// message.
    #[error("{error_type}: {message}")]
    Python {
        /// The exception's class name.
        error_type: String,
        /// Its message (`str(exc)`).
        message: String,
        /// The last lines of its traceback, for people.
        traceback: Vec<String>,
    },
    /// The isolated plugin's process died during construction. The
    /// [`CrashError`] is the [`source`](std::error::Error::source).
    #[error("plugin process died during construction: {0}")]
    Crashed(#[source] CrashError),
    /// Construction ran past its time limit (the process was killed). The
    /// [`TimeoutError`] is the [`source`](std::error::Error::source).
    #[error("{0}")]
    TimedOut(#[source] TimeoutError),
}

/// One or more dependencies are missing (seed: `PluginDependencyError`).
///
/// Its `Display` is the seed's `Missing dependencies: a, b` line (or the GPU
/// sentence when only the GPU is missing), so it doubles as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DependencyError {
    /// Every missing item, in a stable order.
    pub missing: Vec<String>,
    /// The human reason, naming every missing item.
    pub reason: String,
}

impl DependencyError {
    /// Build the error and its reason from the list of missing items.
    ///
    /// The reason is `Missing dependencies: a, b`; when a GPU requirement is
    /// among them, its detail follows after `; ` (and always contains both
    /// `GPU` and `CUDA`).
    pub fn new(missing: Vec<String>, gpu_detail: Option<String>) -> Self {
        let mut reason = format!("Missing dependencies: {}", missing.join(", "));
        if let Some(detail) = gpu_detail {
            reason.push_str("; ");
            reason.push_str(&detail);
        }
        DependencyError { missing, reason }
    }
}

/// `manifest.json` is missing, unreadable or invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// No manifest file.
    #[error("manifest not found: {path}")]
    NotFound {
        /// Where it was expected.
        path: PathBuf,
    },
    /// The manifest could not be read.
    #[error("cannot read manifest {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest is larger than the host accepts.
    #[error("manifest {path} is {size} bytes, larger than the {limit}-byte limit")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        limit: u64,
    },
    /// The manifest is empty.
    #[error("manifest {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The manifest is not valid JSON (or not an object), told as text.
    /// [`ManifestError::Json`] says the same and keeps the parser's error.
    #[error("invalid JSON in {path} at line {line}, column {column}: {message}")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The manifest is not valid JSON. Reads exactly as
    /// [`ManifestError::InvalidJson`] (line, column and the parser's
    /// message without its position), but the [`serde_json::Error`] is kept
    /// as the [`source`](std::error::Error::source).
    #[error(
        "invalid JSON in {path} at line {}, column {}: {}",
        .source.line(),
        .source.column(),
        json_message(.source)
    )]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// A field has the wrong type or an invalid value.
    #[error("invalid field '{field}': {message}")]
    InvalidField {
        /// The field's name (dotted for nested fields).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// The plugin name does not match the allowed pattern.
    #[error("invalid plugin name {name:?}: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// A path in the manifest leaves the plugin directory.
    #[error("field '{field}' points outside the plugin directory: {path}")]
    PathEscape {
        /// The field holding the path.
        field: String,
        /// The offending path.
        path: String,
    },
    /// Another plugin already claimed this name.
    #[error(
        "duplicate plugin name '{name}': already registered from {existing}{}",
        this.as_deref().map_or_else(String::new, |this| format!("; this plugin is {this}"))
    )]
    DuplicateName {
        /// The contested name.
        name: String,
        /// Where the first plugin of that name lives (its directory, or
        /// the installed package's entry point).
        existing: PathBuf,
        /// Where this one comes from, when its directory does not say
        /// (an installed package's entry point).
        this: Option<String>,
    },
}

impl ManifestError {
    /// Stable machine-readable name of the error class.
    pub fn kind(&self) -> &'static str {
        "ManifestError"
    }
}

/// A pinned plugin's files are not the pinned ones, or cannot be checked.
/// Nothing of the plugin ran: the check is made before its library is
/// opened or its runner started.
///
/// The host's own findings, as text (digests are lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IntegrityError {
    /// The digest of `subject` is not the pinned one.
    /// Reads `sha256 of libfoo.so is 3f2a…, the manifest pins 9b1c…`.
    #[error("sha256 of {subject} is {actual}, {pinned_by} pins {expected}")]
    Mismatch {
        /// What was hashed: a library file (`libfoo.so`) or a Python
        /// source tree (`the Python source tree of /p/ocr`).
        subject: String,
        /// Its digest now.
        actual: String,
        /// Who pins it: `the manifest` or `the lock file /p/forgesyte.lock`.
        pinned_by: String,
        /// The pinned digest.
        expected: String,
    },
    /// A pinned file or tree could not be read to be hashed.
    #[error("cannot compute the sha256 of {subject}: {detail}")]
    Unreadable {
        /// What was to be hashed.
        subject: String,
        /// Why it could not be read.
        detail: String,
    },
    /// The operator's lock file exists but cannot be used: every plugin
    /// it would cover is refused rather than loaded unchecked.
    #[error("lock file {path} is invalid: {detail}")]
    LockFile {
        /// The lock file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// Signatures are required (`--require-signed`) and the plugin's is not
    /// `signed` by a trusted key. Reads `signature required, but the
    /// plugin is modified: libfoo.so changed after signing (…)`.
    #[error("signature required, but the plugin is {status}: {detail}")]
    SignatureRequired {
        /// `unsigned`, `modified` or `invalid`.
        status: String,
        /// Which file, key or signature, and what is wrong with it.
        detail: String,
    },
    /// The manifest widens the plugin's sandbox (network, environment
    /// variables, paths to read or write) and the server's policy does not
    /// grant that to this plugin (`--sandbox-widening`). Reads `its
    /// manifest asks for the network, which this server grants only to
    /// plugins signed by a trusted key (…)`.
    #[error("its manifest asks for {asks}, which this server grants {grants}")]
    SandboxNotGranted {
        /// What the manifest asks for.
        asks: String,
        /// To whom the server grants it, and how to change that.
        grants: String,
    },
    /// A signed plugin under `--require-signed`, or a pinned one, names an
    /// interpreter in its own directory (`.venv/bin/python`): what a
    /// virtual environment runs (its interpreter, `pyvenv.cfg`'s `home`,
    /// the `.pth` files and packages of its site-packages) is not among the
    /// checked files, and runs before and beside them.
    #[error(
        "its interpreter {interpreter} lies in its own directory, which {covered_by} does not \
         cover: a virtual environment's interpreter, pyvenv.cfg, .pth files and packages run \
         before and beside the checked files; serve it with an interpreter outside its \
         directory (--python, or an absolute \"python\" in its manifest)"
    )]
    InterpreterInside {
        /// The interpreter as the manifest names it.
        interpreter: String,
        /// What checks the plugin: `its signature (--require-signed)`,
        /// `its pin`.
        covered_by: String,
    },
    /// A checked file was different when it was loaded (swapped or
    /// rewritten between the check and the load).
    #[error("{subject} changed between its check and its load: {detail}")]
    ChangedSinceCheck {
        /// The file (`libfoo.so`) or tree.
        subject: String,
        /// The digests, or why it could not be read again.
        detail: String,
    },
}

impl IntegrityError {
    /// Stable machine-readable name of the error class.
    pub fn kind(&self) -> &'static str {
        "IntegrityError"
    }
}

/// An operation on a plugin exceeded its time limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {} during {operation}{}{}", fmt_duration(*after), stuck_suffix(.stuck_at), remedy_suffix(.remedy))]
pub struct TimeoutError {
    /// What was running (`"init"`, `"tool 'ocr'"`, ...).
    pub operation: String,
    /// The limit that was exceeded.
    pub after: Duration,
    /// Where the limit is set, for the person who reads the reason (`"the
    /// limit is the manifest's limits.init_timeout_s, else …"`); shown
    /// after a `; `.
    pub remedy: Option<String>,
    /// Where the plugin's code was when the limit passed, when its runner
    /// could say (`/plugins/slow/plugin.py:8 in __init__`); shown after
    /// `, stuck at `.
    pub stuck_at: Option<String>,
}

fn stuck_suffix(stuck_at: &Option<String>) -> String {
    stuck_at
        .as_deref()
        .map_or_else(String::new, |at| format!(", stuck at {at}"))
}

fn remedy_suffix(remedy: &Option<String>) -> String {
    remedy
        .as_deref()
        .map_or_else(String::new, |remedy| format!("; {remedy}"))
}

impl TimeoutError {
    /// Stable machine-readable name of the error class.
    pub fn kind(&self) -> &'static str {
        "TimeoutError"
    }
}

/// The plugin's process died or broke its protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{cause}{}", stderr_suffix(.stderr_tail))]
pub struct CrashError {
    /// How it died.
    pub cause: CrashCause,
    /// The last lines the plugin wrote to stderr, if any.
    pub stderr_tail: Vec<String>,
}

impl CrashError {
    /// Stable machine-readable name of the error class.
    pub fn kind(&self) -> &'static str {
        "CrashError"
    }
}

/// How a plugin process died.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CrashCause {
    /// Killed by a signal.
    #[error("killed by signal {name} ({number})")]
    Signal {
        /// Signal name, e.g. `SIGSEGV`.
        name: String,
        /// Signal number.
        number: i32,
    },
    /// Exited on its own.
    #[error("exited with code {code}")]
    Exit {
        /// Exit code.
        code: i32,
    },
    /// Exited with the runners' code for their own descriptors to the host
    /// closed, or replaced, from inside the process (plugin code that
    /// closes descriptors it did not open), unless the plugin's own code
    /// exited with it.
    #[error(
        "exited with code {code}: the runner's own connection to the host was closed from \
         inside the process (by plugin code that closes file descriptors it did not open?), or \
         the plugin exited with that code itself"
    )]
    ChannelClosed {
        /// Exit code (74, as `EX_IOERR`).
        code: i32,
    },
    /// Killed by `SIGKILL` that the host did not send, while the kernel's
    /// OOM killer killed processes on the machine (its `oom_kill` count
    /// rose): most likely this one, the machine or its memory cgroup out
    /// of memory.
    #[error(
        "killed by signal SIGKILL (9), most likely by the kernel's OOM killer: the machine or \
         its memory cgroup ran out of memory ({kills} OOM kill(s) on the machine while it ran)"
    )]
    OomKilled {
        /// How much the machine's OOM kill count rose while it ran.
        kills: u64,
    },
    /// Went over its memory limit.
    #[error(
        "exceeded memory limit {limit_mib} MiB (an address-space limit: the manifest's \
         limits.memory_mb, else the server's --memory-limit)"
    )]
    MemoryLimit {
        /// The limit, in MiB.
        limit_mib: u64,
    },
    /// Broke the framed protocol (closed the pipe, sent garbage, ...).
    #[error("protocol violation: {detail}")]
    Protocol {
        /// What went wrong.
        detail: String,
    },
    /// The host killed it on purpose (a timeout or a fault elsewhere).
    #[error("killed by the host: {reason}")]
    Killed {
        /// Why.
        reason: String,
    },
    /// It ended with the process that forked it and whose report of its
    /// exit the host waited for (a Python zygote), so how is not known.
    #[error("lost: {detail}")]
    Lost {
        /// What happened to the process that forked it.
        detail: String,
    },
}

/// The parser's message without the ` at line L column C` it ends with.
fn json_message(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

fn stderr_suffix(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; stderr: {}", tail.join(" | "))
    }
}

/// What [`ImportError::LibraryNotFoundInPath`] says of the `--lib-path`
/// directories it looked in.
fn lib_path_searched(searched: &[String]) -> String {
    if searched.is_empty() {
        "and no --lib-path was given (a library built elsewhere, such as \
         target/debug, is found with --lib-path DIR)"
            .to_owned()
    } else {
        format!("nor in the --lib-path directories {}", searched.join(", "))
    }
}

/// What [`ImportError::LibraryNotFoundInPath`] says of a Python file of the
/// entrypoint's name beside it.
fn python_file_hint(python_file: Option<&str>) -> String {
    python_file.map_or_else(String::new, |file| {
        format!(
            "; {file} is there: a Python plugin's manifest names its file (\"entrypoint\": \
             \"{file}\") or says \"runtime\": \"python\" (one bare word is read as a \
             library's name)"
        )
    })
}

/// Formats a duration as people write it: `5 s`, `250 ms`, `1.5 s`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests;
