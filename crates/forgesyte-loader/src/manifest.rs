//! `manifest.json`: reading, validation, and the typed view the loader uses.
//!
//! The manifest is kept twice: as the JSON object that was read (unknown
//! fields included, served by the manifest endpoint) and as the few typed
//! fields the loader acts on.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forgesyte_deps::{BareDependency, Requirements, json_type_name};
use forgesyte_errors::{ManifestError, TimeoutError};
use serde_json::Value;

/// The file name the loader looks for in each plugin directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Default cap on the size of `manifest.json` (1 MiB).
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// How a plugin is hosted (SPEC §3 `isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Isolation {
    /// Loaded into the server process (fastest).
    #[default]
    InProcess,
    /// Loaded into a child process.
    Process,
}

/// What runs a plugin's code (SPEC §3 `runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Runtime {
    /// A shared library built with the Rust SDK (in-process or isolated).
    #[default]
    Native,
    /// Python code, always in a child process running the host's runner.
    Python,
}

impl Isolation {
    /// `in-process` / `process`, as the manifest spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::InProcess => "in-process",
            Isolation::Process => "process",
        }
    }
}

impl Runtime {
    /// `native` / `python`.
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Native => "native",
            Runtime::Python => "python",
        }
    }
}

/// Where a Python plugin's code is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PythonEntry {
    /// A file inside the plugin directory (the seed's `plugin.py`) and
    /// optionally the class in it (`plugin.py:OCRPlugin`).
    File {
        /// The file, relative to the plugin directory.
        file: String,
        /// The class, when named.
        class: Option<String>,
    },
    /// A module on the interpreter's path (`forgesyte_ocr.plugin`) and
    /// optionally the class in it (`:Plugin`).
    Module {
        /// The dotted module path.
        module: String,
        /// The class, when named.
        class: Option<String>,
    },
}

/// The seed's file name for a Python plugin's code.
pub const PLUGIN_PY: &str = "plugin.py";

/// Whether `entry` is a dotted Python module path, optionally with a class
/// (`pkg.module`, `pkg.module:Class`), rather than a library file name
/// (`libocr.so`). A `.py` file name (`plugin.py`) reads as Python code too.
pub fn is_module_path(entry: &str) -> bool {
    let (module, class) = match entry.split_once(':') {
        Some((m, c)) => (m, Some(c)),
        None => (entry, None),
    };
    let library_like = [".so", ".dylib", ".dll"]
        .iter()
        .any(|ext| module.ends_with(ext) || module.contains(&format!("{ext}.")));
    // One bare word (`ocr`) is too ambiguous to call a module path.
    let dotted = module.contains('.') || class.is_some();
    // After the colon an attribute path, as an entry point may name one
    // (`module:Outer.Plugin`).
    !library_like
        && dotted
        && module.split('.').all(is_identifier)
        && class.is_none_or(|c| c.split('.').all(is_identifier))
}

/// Whether `entry` names a Python file (`src/plugin.py`, `main.py:Main`,
/// `my-plugin.py`): what [`Manifest::python_entry`] reads as one.
pub fn names_python_file(entry: &str) -> bool {
    entry
        .split_once(':')
        .map_or(entry, |(path, _)| path)
        .ends_with(".py")
}

/// The version of a plugin whose manifest gives none (SPEC §3).
pub const UNKNOWN_VERSION: &str = "unknown";

/// A manifest's `version` as the host shows it: a string as written, a
/// number as its text (published manifests sometimes write numbers);
/// `None` for any other type.
pub fn version_text(version: &Value) -> Option<String> {
    match version {
        Value::String(text) => Some(text.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether `a` and `b` name the same path relative to one directory
/// (`lib.so` and `./lib.so`).
fn same_relative_path(a: &str, b: &str) -> bool {
    fn parts(p: &str) -> impl Iterator<Item = Component<'_>> {
        Path::new(p)
            .components()
            .filter(|c| *c != Component::CurDir)
    }
    parts(a).eq(parts(b))
}

/// Whether `s` is a Python identifier of ASCII letters, digits and `_`
/// (what a module path's parts are held to as well).
fn is_identifier(s: &str) -> bool {
    s.chars()
        .next()
        .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && s.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Per-plugin limits from the manifest's `limits` object. `None` means
/// "the host's default" (`LoaderConfig::process`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// `limits.call_timeout_s`: time limit of one tool call.
    pub call_timeout: Option<Duration>,
    /// `limits.init_timeout_s`: time limit of construction.
    pub init_timeout: Option<Duration>,
    /// `limits.memory_mb`: address-space limit of an isolated plugin's
    /// process, in MiB (`0`: none).
    pub memory_mb: Option<u64>,
    /// `limits.max_response_mb`: the largest answer frame an isolated
    /// plugin's process may send, in MiB; it may lower the host's limit,
    /// not raise it.
    pub max_response_mb: Option<u64>,
}

/// Where a construction's time limit is set, as its time-out's reason says.
pub(crate) const INIT_TIMEOUT_SET_BY: &str =
    "the limit is the manifest's limits.init_timeout_s, else the server's --init-timeout";

impl Limits {
    /// A construction (`operation`: `init`, `handshake`, …) past its
    /// limit, with where that limit is set.
    pub(crate) fn init_timed_out(operation: &str, after: Duration) -> TimeoutError {
        TimeoutError {
            operation: operation.to_owned(),
            after,
            remedy: Some(INIT_TIMEOUT_SET_BY.to_owned()),
            stuck_at: None,
        }
    }

    /// A call of `tool` past its limit, with where that limit is set.
    pub(crate) fn call_timed_out(tool: &str, after: Duration) -> TimeoutError {
        TimeoutError {
            operation: format!("tool '{tool}'"),
            after,
            remedy: Some(
                "the limit is the manifest's limits.call_timeout_s, else the server's \
                 --call-timeout"
                    .to_owned(),
            ),
            stuck_at: None,
        }
    }
}

/// A validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The registry key: `id`, else `name`, else the directory name.
    pub name: String,
    /// `version`, `"unknown"` when absent.
    pub version: String,
    /// `description`, if any.
    pub description: Option<String>,
    /// `entrypoint` (or `library`), if given.
    pub entrypoint: Option<String>,
    /// What runs the plugin: `runtime` if given, else Python when
    /// `entrypoint` is a dotted module path or the directory holds
    /// `plugin.py` (and names no entrypoint), else native.
    pub runtime: Runtime,
    /// `python`: the interpreter for a Python plugin as written (relative
    /// to the plugin directory, or absolute), if any.
    pub python: Option<String>,
    /// `isolation`, [`Isolation::InProcess`] when absent.
    pub isolation: Isolation,
    /// `isolation` as written, `None` when absent (so that a host-wide
    /// default can apply).
    pub declared_isolation: Option<Isolation>,
    /// `preflight`: construct the plugin once in a throw-away child process
    /// before loading it in-process.
    pub preflight: bool,
    /// What the plugin needs.
    pub requirements: Requirements,
    /// Limits.
    pub limits: Limits,
    /// `optional`: never blocks readiness.
    pub optional: bool,
    /// `sha256`: the pinned digest of the plugin's code, in lowercase hex
    /// (the library file of a native plugin, the source tree of a Python
    /// one: see [`crate::integrity`]).
    pub sha256: Option<String>,
    /// `network`, `filesystem` and `env`: what its runner's sandbox allows
    /// beyond the default (see [`crate::sandbox`]).
    pub sandbox: crate::sandbox::SandboxSpec,
    /// The object as read, unknown fields kept.
    pub raw: Arc<Value>,
    /// The SHA-256 (hex) of the file's bytes this was parsed from; `None`
    /// for a manifest made of an entry point. A signature check compares it
    /// with the signed digest: the load parses the manifest before it
    /// checks signatures.
    pub source_sha256: Option<String>,
    /// The fields the file gives twice (`isolation`, `limits.memory_mb`),
    /// of which the last one counts, as in Python's `json` (the seed's
    /// reader): said at load ([`read_json`]).
    pub duplicate_fields: Duplicates,
}

impl Manifest {
    /// Where a Python plugin's code is: the entrypoint as a module path, a
    /// file named by the entrypoint (`main.py`, or `main.py:Class` with the
    /// class), or `plugin.py`.
    pub fn python_entry(&self) -> PythonEntry {
        let file = |file: &str, class: Option<&str>| PythonEntry::File {
            file: file.to_owned(),
            class: class.filter(|c| !c.is_empty()).map(str::to_owned),
        };
        let Some(entry) = &self.entrypoint else {
            return file(PLUGIN_PY, None);
        };
        // `FILE.py:Class`: a file and the class in it, not a module path.
        if names_python_file(entry)
            && let Some((path, class)) = entry.split_once(':')
        {
            return file(path, Some(class));
        }
        if !is_module_path(entry) || names_python_file(entry) {
            return file(entry, None);
        }
        match entry.split_once(':') {
            Some((module, class)) => PythonEntry::Module {
                module: module.to_owned(),
                class: Some(class.to_owned()),
            },
            None => PythonEntry::Module {
                module: entry.clone(),
                class: None,
            },
        }
    }
}

/// Whether `name` is a valid registry key (`[A-Za-z0-9][A-Za-z0-9._-]{0,63}`).
pub fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A registry key derived from a directory name that may not be a valid name:
/// invalid characters become `_`, and the result is cut to 64 bytes.
pub fn key_from_dir_name(dir_name: &str) -> String {
    let mut key: String = dir_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if !key.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        key.insert(0, 'p');
        key.truncate(64);
    }
    key
}

/// The name a manifest asks for, if it can be read at all (used to register a
/// plugin whose manifest is otherwise invalid under its own name).
pub fn claimed_name(raw: &Value) -> Option<&str> {
    raw.get("id")
        .and_then(Value::as_str)
        .or_else(|| raw.get("name").and_then(Value::as_str))
}

/// Parses manifest bytes read from `path` for the plugin directory named `dir_name`.
pub fn parse(bytes: &[u8], path: &Path, dir_name: &str) -> Result<Manifest, ManifestError> {
    parse_in(bytes, path, dir_name, false)
}

/// [`parse`] for a directory that holds `plugin.py` (`has_plugin_py`), which
/// makes a manifest without `runtime` or `entrypoint` a Python plugin.
pub fn parse_in(
    bytes: &[u8],
    path: &Path,
    dir_name: &str,
    has_plugin_py: bool,
) -> Result<Manifest, ManifestError> {
    parse_asking(bytes, path, dir_name, &|| has_plugin_py)
}

/// [`parse_in`] that asks `has_plugin_py` only when the answer decides the
/// runtime (no `runtime`, no `entrypoint`): a file-system look-up the
/// other manifests do not pay.
pub fn parse_asking(
    bytes: &[u8],
    path: &Path,
    dir_name: &str,
    has_plugin_py: &dyn Fn() -> bool,
) -> Result<Manifest, ManifestError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ManifestError::Empty {
            path: path.to_path_buf(),
        });
    }
    // Editors on Windows save one; the parser's "expected value" at
    // column 1 would not say so.
    if bytes.starts_with(b"\xEF\xBB\xBF") {
        return Err(ManifestError::InvalidJson {
            path: path.to_path_buf(),
            line: 1,
            column: 1,
            message: "the file starts with a UTF-8 byte order mark (BOM): save it as UTF-8 \
                      without one"
                .into(),
        });
    }
    let (raw, duplicate_fields) = read_json(bytes).map_err(|e| ManifestError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut manifest = from_value_asking(raw, dir_name, has_plugin_py)
        .map_err(|e| duplicate_fields.noted_on(e))?;
    manifest.duplicate_fields = duplicate_fields;
    Ok(manifest)
}

/// The object keys a JSON document gives twice ([`read_json`]): the paths
/// of the first [`Duplicates::KEPT`] (each cut to
/// [`Duplicates::PATH_CHARS`] characters), and how many more there are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Duplicates {
    /// Their paths (`isolation`, `limits.memory_mb`, `tools[0].id`).
    pub paths: Vec<String>,
    /// How many more keys are given twice.
    pub more: usize,
}

impl Duplicates {
    /// How many paths are kept: a manifest of a MiB could name a hundred
    /// thousand, each path up to its whole length.
    pub const KEPT: usize = 16;
    /// The most characters of a path kept.
    pub const PATH_CHARS: usize = 80;

    /// Whether no key is given twice.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// `error` refusing a field the document gives twice (or a field
    /// inside one given twice), with that said: the value refused is the
    /// last one, which may not be the one its author looked at.
    #[must_use]
    pub fn noted_on(&self, error: ManifestError) -> ManifestError {
        match error {
            ManifestError::InvalidField { field, message } => {
                let within = |path: &String| {
                    field == *path
                        || field
                            .strip_prefix(path.as_str())
                            .is_some_and(|rest| rest.starts_with(['.', '[']))
                };
                let message = match self.paths.iter().find(|p| within(p)) {
                    Some(path) => {
                        format!("{message} (the file gives {path:?} twice: the last one counts)")
                    }
                    None => message,
                };
                ManifestError::InvalidField { field, message }
            }
            other => other,
        }
    }
}

/// Reads a JSON document as `serde_json::from_slice` reads a [`Value`],
/// noting each object key it gives twice by its path (`isolation`,
/// `limits.memory_mb`, `tools[0].id`): the last one counts, as in
/// Python's `json`, which the seed read manifests with (so a manifest the
/// seed loaded still loads), and the note says which was overridden.
///
/// # Errors
///
/// What `serde_json` says of text that is not one JSON value (with its
/// line and column), nesting past its limit of 128 levels included.
pub fn read_json(bytes: &[u8]) -> Result<(Value, Duplicates), serde_json::Error> {
    use serde::de::DeserializeSeed;
    let path = std::cell::RefCell::new(String::new());
    let duplicates = std::cell::RefCell::new(Duplicates::default());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = NotingDuplicates {
        path: &path,
        duplicates: &duplicates,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((value, duplicates.into_inner()))
}

/// [`read_json`]'s visitor: builds the [`Value`] as serde_json's own does,
/// the path of the value being read kept in one buffer (a segment pushed
/// and taken off per nested value, no allocation per value).
#[derive(Clone, Copy)]
struct NotingDuplicates<'a> {
    path: &'a std::cell::RefCell<String>,
    duplicates: &'a std::cell::RefCell<Duplicates>,
}

impl NotingDuplicates<'_> {
    /// Reads the next value under path segment `segment` (pushed for the
    /// read, then taken off).
    fn nested<T>(self, segment: std::fmt::Arguments<'_>, read: impl FnOnce(Self) -> T) -> T {
        let len = self.path.borrow().len();
        {
            let mut path = self.path.borrow_mut();
            let _ = std::fmt::Write::write_fmt(&mut *path, segment);
        }
        let value = read(self);
        self.path.borrow_mut().truncate(len);
        value
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for NotingDuplicates<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for NotingDuplicates<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            let at = items.len();
            let next = self.nested(format_args!("[{at}]"), |s| seq.next_element_seed(s))?;
            match next {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let dot = if self.path.borrow().is_empty() {
                ""
            } else {
                "."
            };
            let value = self.nested(format_args!("{dot}{key}"), |s| {
                let value = map.next_value_seed(s);
                if object.contains_key(&key) {
                    let mut duplicates = s.duplicates.borrow_mut();
                    if duplicates.paths.len() < Duplicates::KEPT {
                        let path =
                            forgesyte_errors::shorten(&s.path.borrow(), Duplicates::PATH_CHARS);
                        duplicates.paths.push(path);
                    } else {
                        duplicates.more += 1;
                    }
                }
                value
            });
            object.insert(key, value?);
        }
        Ok(Value::Object(object))
    }
}

/// Validates an already-parsed manifest object.
pub fn from_value(raw: Value, dir_name: &str) -> Result<Manifest, ManifestError> {
    from_value_in(raw, dir_name, false)
}

/// [`from_value`] for a directory that may hold `plugin.py`.
pub fn from_value_in(
    raw: Value,
    dir_name: &str,
    has_plugin_py: bool,
) -> Result<Manifest, ManifestError> {
    from_value_asking(raw, dir_name, &|| has_plugin_py)
}

fn from_value_asking(
    raw: Value,
    dir_name: &str,
    has_plugin_py: &dyn Fn() -> bool,
) -> Result<Manifest, ManifestError> {
    let Some(obj) = raw.as_object() else {
        return Err(ManifestError::InvalidField {
            field: "(root)".into(),
            message: format!("expected a JSON object, found {}", json_type_name(&raw)),
        });
    };
    let name = match (opt_str(obj, "id")?, opt_str(obj, "name")?) {
        (Some(id), _) => id.to_owned(),
        (None, Some(name)) => name.to_owned(),
        (None, None) => dir_name.to_owned(),
    };
    if !is_valid_name(&name) {
        return Err(ManifestError::InvalidName { name });
    }
    let version = match obj.get("version") {
        None | Some(Value::Null) => UNKNOWN_VERSION.to_owned(),
        Some(other) => {
            version_text(other).ok_or_else(|| wrong_type("version", "a string", other))?
        }
    };
    let description = opt_str(obj, "description")?.map(str::to_owned);
    let entrypoint = match (opt_str(obj, "entrypoint")?, opt_str(obj, "library")?) {
        // The same file, however written (`./lib.so`), is one.
        (Some(e), Some(l)) if !same_relative_path(e, l) => {
            return Err(ManifestError::InvalidField {
                field: "library".into(),
                message: format!(
                    "names {l:?}, and \"entrypoint\" names {e:?}: give one (\"library\" is \
                     another name of \"entrypoint\")"
                ),
            });
        }
        (Some(e), _) | (None, Some(e)) => Some(e.to_owned()),
        (None, None) => None,
    };
    if let Some(entry) = &entrypoint {
        check_relative("entrypoint", entry)?;
    }
    let runtime = match opt_str(obj, "runtime")? {
        Some("native") => Runtime::Native,
        Some("python") => Runtime::Python,
        Some(other) => {
            return Err(ManifestError::InvalidField {
                field: "runtime".into(),
                message: format!("expected \"native\" or \"python\", found {other:?}"),
            });
        }
        None => match &entrypoint {
            Some(entry) if is_module_path(entry) || names_python_file(entry) => Runtime::Python,
            Some(_) => Runtime::Native,
            None if has_plugin_py() => Runtime::Python,
            None => Runtime::Native,
        },
    };
    let python = opt_str(obj, "python")?.map(str::to_owned);
    if let Some(python) = &python
        && (python.is_empty() || python.contains('\0'))
    {
        return Err(ManifestError::InvalidField {
            field: "python".into(),
            message: "must be an interpreter path".into(),
        });
    }
    let declared_isolation = match opt_str(obj, "isolation")? {
        None => None,
        Some("in-process") => Some(Isolation::InProcess),
        Some("process") => Some(Isolation::Process),
        Some(other) => {
            return Err(ManifestError::InvalidField {
                field: "isolation".into(),
                message: format!("expected \"in-process\" or \"process\", found {other:?}"),
            });
        }
    };
    let isolation = declared_isolation.unwrap_or_default();
    let optional = opt_bool(obj, "optional")?;
    let preflight = opt_bool(obj, "preflight")?;
    // A list of tools (each with `id`, or `name`), or an object of tool id
    // → tool, as ForgeSyte's published manifests write both.
    if let Some(tools) = obj.get("tools")
        && !tools.is_array()
        && !tools.is_object()
        && !tools.is_null()
    {
        return Err(wrong_type("tools", "an array or an object", tools));
    }
    let limits = parse_limits(obj.get("limits"))?;
    let sha256 = opt_str(obj, "sha256")?
        .map(|pin| crate::integrity::parse_pin("sha256", pin))
        .transpose()?;
    let bare = match runtime {
        Runtime::Python => BareDependency::Py,
        Runtime::Native => BareDependency::Lib,
    };
    let requirements = Requirements::from_manifest_as(&raw, bare)?;
    let sandbox = crate::sandbox::parse_spec(obj)?;
    let manifest = Manifest {
        name,
        version,
        description,
        entrypoint,
        runtime,
        python,
        isolation,
        declared_isolation,
        preflight,
        requirements,
        limits,
        optional,
        sha256,
        sandbox,
        raw: Arc::new(raw),
        source_sha256: None,
        duplicate_fields: Duplicates::default(),
    };
    if manifest.runtime == Runtime::Python
        && let PythonEntry::File { file, class } = manifest.python_entry()
    {
        check_python_file(&file)?;
        // `main.py:Plugin`: what follows the colon is a class's name (or a
        // dotted path to one); anything else reached the runner, which
        // refused it with its usage text as the plugin's reason.
        if let Some(class) = class
            && !class.split('.').all(is_identifier)
        {
            return Err(ManifestError::InvalidField {
                field: "entrypoint".into(),
                message: format!(
                    "what follows ':' in {:?} must be a Python class name (Plugin, or \
                     Outer.Plugin), not {class:?}",
                    manifest.entrypoint.as_deref().unwrap_or_default()
                ),
            });
        }
    }
    Ok(manifest)
}

/// The top-level fields the host reads, and those ForgeSyte's published
/// manifests carry (a plugin may read any other of its own).
const KNOWN_FIELDS: &[&str] = &[
    "id",
    "name",
    "version",
    "description",
    "author",
    "license",
    "entrypoint",
    "library",
    "type",
    "capabilities",
    "tools",
    "runtime",
    "python",
    "dependencies",
    "requires_gpu",
    "models",
    "isolation",
    "limits",
    "optional",
    "preflight",
    "network",
    "filesystem",
    "env",
    "sha256",
    "workers",
    "config",
];

/// The fields of `limits`.
const LIMIT_FIELDS: &[&str] = &[
    "call_timeout_s",
    "init_timeout_s",
    "memory_mb",
    "max_response_mb",
];

/// The known field that `key` likely misspells, if any: a few edits away
/// (none for a short name: `ids`, `types` are a plugin's own; one from 5
/// characters, two from 8: `depedencies`), or the same word with another
/// ending of at most 3 characters, for a known name of 5 or more
/// (`dependency`, `isolated`, `networking`, `tool`).
fn closest_field(key: &str, known: &[&str]) -> Option<String> {
    let ending = |k: &str| {
        let common = key
            .chars()
            .zip(k.chars())
            .take_while(|(a, b)| a == b)
            .count();
        k.len() >= 5
            && common >= 4
            && key.chars().count() - common <= 3
            && k.chars().count() - common <= 3
    };
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(key, k), *k))
        .filter(|(d, k)| *d <= (k.len().saturating_sub(2) / 3).min(2) || ending(k))
        .min()
        .map(|(_, k)| k.to_owned())
}

/// The likely typos of manifest `raw`, said at load: a top-level field the
/// host does not read whose name is close to one it does (`depedencies`:
/// the dependencies were silently not checked), with the field it may
/// mean. A plugin's fields of its own, far from every known name, are left
/// alone. (An unknown field of `limits`, the host's own object, is refused
/// when the manifest is read.)
pub fn unread_field_notes(raw: &Value) -> Vec<String> {
    let Some(obj) = raw.as_object() else {
        return Vec::new();
    };
    obj.keys()
        .filter(|k| !KNOWN_FIELDS.contains(&k.as_str()))
        .filter_map(|key| {
            closest_field(key, KNOWN_FIELDS).map(|meant| {
                format!(
                    "field {:?} is not one the host reads (did you mean {meant:?}?)",
                    forgesyte_errors::shorten(key, 60)
                )
            })
        })
        .collect()
}

/// A Python plugin's entry file must be one its source tree covers (the
/// tree's pin and its signed list: every `*.py` file, `__pycache__` and
/// dot-names left out): else the code that runs would be outside both.
fn check_python_file(file: &str) -> Result<(), ManifestError> {
    let hidden = Path::new(file).components().any(|c| match c {
        Component::Normal(name) => {
            let name = name.to_string_lossy();
            name.starts_with('.') || name == "__pycache__"
        }
        _ => false,
    });
    if !file.ends_with(".py") || hidden {
        return Err(ManifestError::InvalidField {
            field: "entrypoint".into(),
            message: format!(
                "a Python plugin's entry file must be a *.py file outside __pycache__ and \
                 dot-directories, which its pin and signature cover: {file:?}"
            ),
        });
    }
    Ok(())
}

fn parse_limits(value: Option<&Value>) -> Result<Limits, ManifestError> {
    let Some(value) = value else {
        return Ok(Limits::default());
    };
    if value.is_null() {
        return Ok(Limits::default());
    }
    let Some(obj) = value.as_object() else {
        return Err(wrong_type("limits", "an object", value));
    };
    // The host's own object: a field it does not read is a limit silently
    // not set (`call_timeout`, `memory`), refused as `requires_gpu`'s and
    // `filesystem`'s unknown fields are.
    if let Some(key) = obj.keys().find(|k| !LIMIT_FIELDS.contains(&k.as_str())) {
        let hint = closest_field(key, LIMIT_FIELDS)
            .map_or_else(String::new, |meant| format!(" (did you mean {meant:?}?)"));
        return Err(ManifestError::InvalidField {
            field: format!("limits.{}", forgesyte_errors::shorten(key, 60)),
            message: format!(
                "not a limit the host reads{hint}; it reads {}",
                LIMIT_FIELDS.join(", ")
            ),
        });
    }
    let seconds = |key: &str| -> Result<Option<Duration>, ManifestError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            // At least a millisecond: a smaller limit read as 0 ms, every
            // call or construction timed out at once.
            Some(v) => match v.as_f64() {
                Some(s) if (0.001..=86_400.0).contains(&s) => Ok(Some(Duration::from_secs_f64(s))),
                _ => Err(ManifestError::InvalidField {
                    field: format!("limits.{key}"),
                    message: format!("expected seconds in [0.001, 86400], found {v}"),
                }),
            },
        }
    };
    let mebibytes = |key: &str, min: u64| -> Result<Option<u64>, ManifestError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=MAX_MIB).contains(&n) => Ok(Some(n)),
                _ => Err(ManifestError::InvalidField {
                    field: format!("limits.{key}"),
                    message: format!(
                        "expected an integer number of MiB in [{min}, {MAX_MIB}], found {v}"
                    ),
                }),
            },
        }
    };
    Ok(Limits {
        call_timeout: seconds("call_timeout_s")?,
        init_timeout: seconds("init_timeout_s")?,
        memory_mb: mebibytes("memory_mb", 0)?,
        max_response_mb: mebibytes("max_response_mb", 1)?,
    })
}

/// The largest memory or response limit a manifest may ask for (1 TiB),
/// and so the server's `--memory-limit`.
pub const MAX_MIB: u64 = 1024 * 1024;

fn opt_bool(obj: &serde_json::Map<String, Value>, key: &str) -> Result<bool, ManifestError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(wrong_type(key, "a boolean", other)),
    }
}

/// Rejects absolute paths and `..` components: a manifest path must stay
/// inside the plugin directory. (Symlinks are checked when the path is
/// resolved on disk.)
pub fn check_relative(field: &str, path: &str) -> Result<(), ManifestError> {
    let escape = || ManifestError::PathEscape {
        field: field.to_owned(),
        path: path.to_owned(),
    };
    if path.is_empty() {
        return Err(ManifestError::InvalidField {
            field: field.to_owned(),
            message: "must not be empty".into(),
        });
    }
    if path.contains('\0') {
        return Err(ManifestError::InvalidField {
            field: field.to_owned(),
            message: "must not contain NUL bytes".into(),
        });
    }
    for component in Path::new(path).components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(escape());
            }
        }
    }
    Ok(())
}

/// Joins `rel` to `dir`, for a path already checked with [`check_relative`].
pub fn join_inside(dir: &Path, rel: &str) -> PathBuf {
    dir.join(rel)
}

fn opt_str<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, ManifestError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(key, "a string", other)),
    }
}

fn wrong_type(field: &str, expected: &str, found: &Value) -> ManifestError {
    ManifestError::InvalidField {
        field: field.to_owned(),
        message: format!("expected {expected}, found {}", json_type_name(found)),
    }
}

#[cfg(test)]
mod tests;
