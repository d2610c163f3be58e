//! `manifest.json`: reading, validation, and the typed view the loader uses.
//!
//! The manifest is kept twice: as the JSON object that was read (unknown
//! fields included, served by the manifest endpoint) and as the few typed
//! fields the loader acts on.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use forgesyte_deps::{BareDependency, Requirements, json_type_name};
use forgesyte_errors::ManifestError;
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
    let ident = |s: &str| {
        s.chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
            && s.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
    };
    let library_like = [".so", ".dylib", ".dll"]
        .iter()
        .any(|ext| module.ends_with(ext) || module.contains(&format!("{ext}.")));
    // One bare word (`ocr`) is too ambiguous to call a module path.
    let dotted = module.contains('.') || class.is_some();
    !library_like && dotted && module.split('.').all(ident) && class.is_none_or(ident)
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
    /// plugin's process may send, in MiB.
    pub max_response_mb: Option<u64>,
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
        if let Some((path, class)) = entry
            .split_once(':')
            .filter(|(path, _)| path.ends_with(".py"))
        {
            return file(path, Some(class));
        }
        if !is_module_path(entry) || entry.ends_with(".py") {
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
    let raw: Value = serde_json::from_slice(bytes).map_err(|e| ManifestError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    from_value_asking(raw, dir_name, has_plugin_py)
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
        None | Some(Value::Null) => "unknown".to_owned(),
        Some(Value::String(s)) => s.clone(),
        // Published manifests sometimes write numbers: keep them readable.
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => return Err(wrong_type("version", "a string", other)),
    };
    let description = opt_str(obj, "description")?.map(str::to_owned);
    let entrypoint = match (opt_str(obj, "entrypoint")?, opt_str(obj, "library")?) {
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
            Some(entry) if is_module_path(entry) => Runtime::Python,
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
    if let Some(tools) = obj.get("tools")
        && !tools.is_array()
        && !tools.is_null()
    {
        return Err(wrong_type("tools", "an array", tools));
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
    Ok(Manifest {
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
    })
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
    let seconds = |key: &str| -> Result<Option<Duration>, ManifestError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(s) if s > 0.0 && s <= 86_400.0 => Ok(Some(Duration::from_secs_f64(s))),
                _ => Err(ManifestError::InvalidField {
                    field: format!("limits.{key}"),
                    message: format!("expected seconds in (0, 86400], found {v}"),
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

/// The largest memory or response limit a manifest may ask for (1 TiB).
const MAX_MIB: u64 = 1024 * 1024;

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
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn check(json: &str, expect: Result<&str, &str>) {
        let got = parse(json.as_bytes(), Path::new("/p/x/manifest.json"), "x");
        match (got, expect) {
            (Ok(m), Ok(name)) => assert_eq!(m.name, name),
            (Err(e), Err(msg)) => assert_eq!(e.to_string(), msg),
            (got, expect) => panic!("got {got:?}, expected {expect:?}"),
        }
    }

    fn runtime_of(raw: Value, has_plugin_py: bool) -> (Runtime, PythonEntry) {
        let m = from_value_in(raw, "x", has_plugin_py).unwrap();
        (m.runtime, m.python_entry())
    }

    #[test]
    fn the_runtime_is_declared_or_follows_the_entrypoint_or_plugin_py() {
        let module = |m: &str, c: Option<&str>| PythonEntry::Module {
            module: m.into(),
            class: c.map(Into::into),
        };
        let file = |f: &str| PythonEntry::File {
            file: f.into(),
            class: None,
        };
        assert_eq!(
            runtime_of(json!({"entrypoint": "forgesyte_ocr.plugin"}), false),
            (Runtime::Python, module("forgesyte_ocr.plugin", None))
        );
        assert_eq!(
            runtime_of(
                json!({"entrypoint": "forgesyte_ocr.plugin:OCRPlugin"}),
                false
            ),
            (
                Runtime::Python,
                module("forgesyte_ocr.plugin", Some("OCRPlugin"))
            )
        );
        assert_eq!(
            runtime_of(json!({}), true),
            (Runtime::Python, file("plugin.py"))
        );
        assert_eq!(runtime_of(json!({}), false).0, Runtime::Native);
        for native in ["libocr.so", "libocr.so.1", "ocr", "lib/libocr.so"] {
            assert_eq!(
                runtime_of(json!({"entrypoint": native}), true).0,
                Runtime::Native,
                "{native}"
            );
        }
        assert_eq!(
            runtime_of(json!({"runtime": "python", "entrypoint": "main.py"}), false),
            (Runtime::Python, file("main.py"))
        );
        assert_eq!(
            runtime_of(json!({"runtime": "native"}), true).0,
            Runtime::Native
        );
        // A file and the class in it: never read as a module path.
        let file_class = |f: &str, c: &str| PythonEntry::File {
            file: f.into(),
            class: Some(c.into()),
        };
        assert_eq!(
            runtime_of(json!({"entrypoint": "plugin.py:OCRPlugin"}), false),
            (Runtime::Python, file_class("plugin.py", "OCRPlugin"))
        );
        assert_eq!(
            runtime_of(
                json!({"runtime": "python", "entrypoint": "src/main.py:Plugin"}),
                false
            ),
            (Runtime::Python, file_class("src/main.py", "Plugin"))
        );
        assert_eq!(
            runtime_of(
                json!({"runtime": "python", "entrypoint": "main.py:"}),
                false
            ),
            (Runtime::Python, file("main.py"))
        );
        let err = from_value(json!({"runtime": "ruby"}), "x").unwrap_err();
        assert!(err.to_string().contains("runtime"), "{err}");
    }

    #[test]
    fn bare_dependencies_are_python_packages_for_python_plugins() {
        let m = from_value_in(json!({"dependencies": ["torch", "lib:z"]}), "x", true).unwrap();
        let shown: Vec<String> = m
            .requirements
            .dependencies
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["torch", "lib:z"]);
        assert!(matches!(
            m.requirements.dependencies[0],
            forgesyte_deps::Dependency::Py { .. }
        ));
        let m = from_value(json!({"dependencies": ["z"]}), "x").unwrap();
        assert!(matches!(
            m.requirements.dependencies[0],
            forgesyte_deps::Dependency::Lib(_)
        ));
    }

    #[test]
    fn name_comes_from_id_then_name_then_dir() {
        check(r#"{"id": "ocr", "name": "OCR"}"#, Ok("ocr"));
        check(r#"{"name": "ocr2"}"#, Ok("ocr2"));
        check(r#"{}"#, Ok("x"));
    }

    #[test]
    fn bad_json_names_the_position() {
        check(
            "{\n  \"name\": ,\n}",
            Err("invalid JSON in /p/x/manifest.json at line 2, column 11: expected value"),
        );
        check("   \n", Err("manifest /p/x/manifest.json is empty"));
        check(
            "[1]",
            Err("invalid field '(root)': expected a JSON object, found an array"),
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        check(
            r#"{"name": 5}"#,
            Err("invalid field 'name': expected a string, found a number"),
        );
        check(
            r#"{"name": "a", "isolation": "vm"}"#,
            Err(r#"invalid field 'isolation': expected "in-process" or "process", found "vm""#),
        );
        check(
            r#"{"name": "a", "limits": {"call_timeout_s": -1}}"#,
            Err("invalid field 'limits.call_timeout_s': expected seconds in (0, 86400], found -1"),
        );
    }

    #[test]
    fn invalid_names_are_rejected() {
        check(
            r#"{"name": "../etc"}"#,
            Err(r#"invalid plugin name "../etc": must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}"#),
        );
        assert!(!is_valid_name(&"a".repeat(65)));
        assert!(is_valid_name(&"a".repeat(64)));
        assert!(!is_valid_name("é"));
        assert!(!is_valid_name("-a"));
    }

    #[test]
    fn entrypoint_must_stay_inside() {
        check(
            r#"{"name": "a", "entrypoint": "../b/liba.so"}"#,
            Err("field 'entrypoint' points outside the plugin directory: ../b/liba.so"),
        );
        check(
            r#"{"name": "a", "entrypoint": "/usr/lib/liba.so"}"#,
            Err("field 'entrypoint' points outside the plugin directory: /usr/lib/liba.so"),
        );
        check(r#"{"name": "a", "entrypoint": "lib/liba.so"}"#, Ok("a"));
    }

    #[test]
    fn unknown_fields_are_kept_and_version_defaults() {
        let m = from_value(json!({"name": "a", "colour": "blue"}), "a").unwrap();
        assert_eq!(m.raw["colour"], "blue");
        assert_eq!(m.version, "unknown");
        assert_eq!(m.isolation, Isolation::InProcess);
    }

    #[test]
    fn isolation_limits_and_preflight() {
        let m = from_value(
            json!({"name": "a", "isolation": "process", "preflight": true,
                   "limits": {"memory_mb": 0, "max_response_mb": 2, "init_timeout_s": 0.5}}),
            "a",
        )
        .unwrap();
        assert_eq!(m.isolation, Isolation::Process);
        assert_eq!(m.declared_isolation, Some(Isolation::Process));
        assert!(m.preflight);
        assert_eq!(m.limits.memory_mb, Some(0));
        assert_eq!(m.limits.max_response_mb, Some(2));
        assert_eq!(m.limits.init_timeout, Some(Duration::from_millis(500)));
        let m = from_value(json!({"name": "a"}), "a").unwrap();
        assert_eq!(m.declared_isolation, None);
        assert!(!m.preflight);
        assert_eq!(m.limits, Limits::default());
        check(
            r#"{"name": "a", "limits": {"max_response_mb": 0}}"#,
            Err(
                "invalid field 'limits.max_response_mb': expected an integer number of MiB in [1, 1048576], found 0",
            ),
        );
        check(
            r#"{"name": "a", "limits": {"memory_mb": 1.5}}"#,
            Err(
                "invalid field 'limits.memory_mb': expected an integer number of MiB in [0, 1048576], found 1.5",
            ),
        );
        check(
            r#"{"name": "a", "preflight": "yes"}"#,
            Err("invalid field 'preflight': expected a boolean, found a string"),
        );
    }

    #[test]
    fn a_pin_is_64_hex_digits_or_a_manifest_error_naming_the_field() {
        let pin = "AB".repeat(32);
        let m = from_value(json!({"name": "a", "sha256": pin}), "a").unwrap();
        assert_eq!(m.sha256, Some("ab".repeat(32)));
        assert_eq!(from_value(json!({"name": "a"}), "a").unwrap().sha256, None);
        check(
            r#"{"name": "a", "sha256": "3f2a"}"#,
            Err(
                r#"invalid field 'sha256': expected a SHA-256 digest (64 hexadecimal digits), found "3f2a""#,
            ),
        );
        check(
            r#"{"name": "a", "sha256": 5}"#,
            Err("invalid field 'sha256': expected a string, found a number"),
        );
    }

    #[test]
    fn dir_names_become_valid_keys() {
        assert_eq!(key_from_dir_name("my plugin"), "my_plugin");
        assert_eq!(key_from_dir_name(".hidden"), "p.hidden");
        assert!(is_valid_name(&key_from_dir_name(&"é".repeat(100))));
    }

    /// The manifest's keys (top level and nested), and a few more.
    const KEYS: &[&str] = &[
        "id",
        "name",
        "version",
        "description",
        "entrypoint",
        "library",
        "runtime",
        "python",
        "isolation",
        "optional",
        "preflight",
        "tools",
        "limits",
        "dependencies",
        "requires_gpu",
        "models",
        "call_timeout_s",
        "init_timeout_s",
        "memory_mb",
        "max_response_mb",
        "min_devices",
        "min_memory_mb",
        "min_compute_capability",
    ];

    /// Strings a manifest holds, right and wrong: names, runtimes,
    /// isolations, dependency specs, paths that escape, versions, anything.
    fn text() -> impl Strategy<Value = String> + Clone {
        prop_oneof![
            prop::sample::select(
                &[
                    "ocr",
                    "../../etc",
                    "/abs/lib.so",
                    "lib.so",
                    "a\0b",
                    "",
                    "native",
                    "python",
                    "process",
                    "in-process",
                    "lib:ssl",
                    "bin:ffmpeg",
                    "env:HOME",
                    "py:numpy>=1",
                    "foo:bar",
                    "lib:",
                    "pkg.mod:Class",
                    "plugin.py:X",
                    "8.6",
                    "x.y",
                    "1.2.3",
                ][..]
            )
            .prop_map(str::to_owned),
            ".{0,10}",
        ]
    }

    /// A JSON scalar, often one on the edge of a field's range.
    fn leaf() -> impl Strategy<Value = Value> + Clone {
        prop_oneof![
            1 => Just(Value::Null),
            1 => any::<bool>().prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => any::<f64>().prop_map(Value::from),
            2 => prop::sample::select(&[0.0, -1.0, 1e-300, 0.5, 86_400.0, 86_400.5, 1e300][..])
                .prop_map(Value::from),
            2 => prop::sample::select(&[0, 1, 2, 1024 * 1024, 1024 * 1024 + 1, u64::MAX][..])
                .prop_map(Value::from),
            3 => text().prop_map(Value::from),
        ]
    }

    /// JSON of any type; objects keyed mostly by the manifest's keys, so
    /// that every field is seen with values of every type, nested ones too.
    fn json_value() -> impl Strategy<Value = Value> + Clone {
        leaf().prop_recursive(3, 24, 6, |inner| {
            let key =
                prop_oneof![3 => prop::sample::select(KEYS).prop_map(str::to_owned), 1 => ".{0,5}"];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..6)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    /// A value shaped like one of a manifest's: a scalar, a list of
    /// scalars, or an object of the nested keys (`limits`, `requires_gpu`,
    /// `models`) with scalar values; or any JSON at all.
    fn field_value() -> impl Strategy<Value = Value> {
        let nested = prop::sample::select(&KEYS[16..]).prop_map(str::to_owned);
        prop_oneof![
            3 => leaf(),
            1 => prop::collection::vec(leaf(), 0..3).prop_map(Value::Array),
            3 => prop::collection::vec((nested, leaf()), 0..3)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            1 => json_value(),
        ]
    }

    /// A value of `key` that is right, or right in type with a value on
    /// the edge of its range (the limits, the GPU's numbers).
    fn plausible(key: &'static str) -> BoxedStrategy<Value> {
        let pick = |options: &'static [&'static str]| {
            prop::sample::select(options).prop_map(Value::from).boxed()
        };
        let object_of = |keys: &'static [&'static str]| {
            prop::collection::vec((prop::sample::select(keys), leaf()), 0..4)
                .prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                })
                .boxed()
        };
        match key {
            "id" | "name" => pick(&["ocr", "a-b.c_1", "x"]),
            "version" => prop_oneof![pick(&["1.0.0"]), any::<u32>().prop_map(Value::from)].boxed(),
            "entrypoint" | "library" => {
                pick(&["lib.so", "pkg.mod:Class", "plugin.py", "sub/lib.so"])
            }
            "runtime" => pick(&["native", "python"]),
            "python" => pick(&["python3", "/usr/bin/python3"]),
            "isolation" => pick(&["process", "in-process"]),
            "optional" | "preflight" => any::<bool>().prop_map(Value::from).boxed(),
            "tools" => Just(json!([])).boxed(),
            "limits" => object_of(&KEYS[16..20]),
            "requires_gpu" => {
                prop_oneof![any::<bool>().prop_map(Value::from), object_of(&KEYS[20..])].boxed()
            }
            "dependencies" => prop::collection::vec(text(), 0..3)
                .prop_map(|v| Value::Array(v.into_iter().map(Value::from).collect()))
                .boxed(),
            "models" => prop::collection::vec((text(), text()), 0..3)
                .prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
                })
                .boxed(),
            _ => text().prop_map(Value::from).boxed(),
        }
    }

    /// A manifest object: each top-level key absent (most often), with a
    /// plausible value, or with any value at all (names and types wrong
    /// inside nested objects included).
    fn manifest_object() -> impl Strategy<Value = Value> {
        let fields: Vec<_> = KEYS[..16]
            .iter()
            .map(|&key| {
                prop_oneof![
                    8 => Just(None),
                    4 => plausible(key).prop_map(move |v| Some((key, v))),
                    1 => field_value().prop_map(move |v| Some((key, v))),
                ]
            })
            .collect();
        fields.prop_map(|fields| {
            Value::Object(
                fields
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            )
        })
    }

    /// What a refused manifest must carry: a reason a person can act on.
    fn refused_with_a_reason(e: &ManifestError) -> Result<(), TestCaseError> {
        let text = e.to_string();
        prop_assert!(text.len() > 10, "{e:?}");
        if let ManifestError::InvalidField { field, .. } = e {
            prop_assert!(
                text.contains(field.as_str()),
                "{text} does not name {field}"
            );
        }
        Ok(())
    }

    proptest! {
        // 256 cases each (the default); each property runs in well under a
        // second.

        /// Arbitrary bytes: a manifest or a typed error with a reason.
        #[test]
        fn arbitrary_bytes_are_refused_with_a_reason(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Err(e) = parse(&bytes, Path::new("/p/x/manifest.json"), "x") {
                refused_with_a_reason(&e)?;
            }
        }

        /// The manifest's keys with values of every type (nested objects
        /// included): validated, or refused naming the field.
        #[test]
        fn any_manifest_object_is_valid_or_refused_by_field(raw in manifest_object(), py in any::<bool>()) {
            match from_value_in(raw.clone(), "x", py) {
                Ok(m) => {
                    prop_assert!(is_valid_name(&m.name), "{}", m.name);
                    prop_assert_eq!(&*m.raw, &raw);
                    if let Some(entry) = &m.entrypoint {
                        prop_assert!(check_relative("entrypoint", entry).is_ok());
                    }
                }
                Err(e) => refused_with_a_reason(&e)?,
            }
        }

        /// The same objects as bytes, damaged or not: `parse` agrees with
        /// [`from_value_in`] on intact text and never panics on damaged text.
        /// (Intact text is compared with the value it reads back as: without
        /// `serde_json`'s `float_roundtrip`, a float may come back one unit
        /// in the last place off, and its error message shows it.)
        #[test]
        fn manifest_text_parses_as_its_value(raw in manifest_object(),
                                             cut in any::<prop::sample::Index>(),
                                             damage in any::<bool>()) {
            let mut bytes = serde_json::to_vec_pretty(&raw).unwrap();
            if damage {
                bytes.truncate(cut.index(bytes.len()));
            }
            let path = Path::new("/p/x/manifest.json");
            if let Err(e) = parse(&bytes, path, "x") {
                refused_with_a_reason(&e)?;
            }
            if !damage {
                prop_assert_eq!(
                    parse(&bytes, path, "x").map(|m| m.name).map_err(|e| e.to_string()),
                    from_value(serde_json::from_slice(&bytes).unwrap(), "x")
                        .map(|m| m.name)
                        .map_err(|e| e.to_string())
                );
            }
        }
    }
}
