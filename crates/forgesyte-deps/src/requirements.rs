//! What a plugin requires, parsed from its manifest (SPEC §3).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr as _;

use forgesyte_errors::ManifestError;
use serde_json::Value;

/// One entry of the manifest's `dependencies` list.
///
/// `Display` gives the canonical spelling (`lib:NAME`, `bin:NAME`,
/// `env:NAME`, `py:NAME`, `plugin:NAME`, `plugin:NAME@REQ`), which is also
/// how a missing dependency is named in a report. A Python package written
/// bare in the manifest is shown bare (`torch`), as the seed named it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dependency {
    /// A shared library the dynamic loader can find (soname, file name or
    /// short name). A bare name means this under [`BareDependency::Lib`].
    Lib(String),
    /// An executable on `PATH`.
    Bin(String),
    /// An environment variable that must be set.
    Env(String),
    /// A Python package the plugin's interpreter can import (found without
    /// importing it; `torch.cuda` asks for `torch`), or with a version
    /// requirement (`numpy>=1.24`) an installed distribution of that name
    /// whose version matches. A bare name means this under
    /// [`BareDependency::Py`].
    Py {
        /// The package name as written (`[A-Za-z0-9_.-]+`, dotted parts
        /// non-empty).
        package: String,
        /// Whether it was written without the `py:` prefix (then it is
        /// shown without one).
        bare: bool,
        /// The PEP 440 version requirement, if any.
        version: Option<PyVersionReq>,
    },
    /// Another plugin, optionally of a version matching `req`.
    Plugin {
        /// The other plugin's registry name.
        name: String,
        /// The semver requirement on its version.
        req: Option<semver::VersionReq>,
    },
}

/// A Python package's version requirement (PEP 440 specifiers, as in a
/// PEP 508 requirement: `>=1.24`, `~=2.1, !=2.1.3`, `==1.*`), checked
/// against the version of the installed distribution of the package's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PyVersionReq(pep440_rs::VersionSpecifiers);

impl PyVersionReq {
    /// Whether `installed` (a version as the distribution's metadata gives
    /// it) matches; `Err` naming it when it is no PEP 440 version.
    /// Pre-releases match as pip matches an installed one: when the
    /// requirement admits them or names one.
    pub fn matches(&self, installed: &str) -> Result<bool, String> {
        let version = pep440_rs::Version::from_str(installed.trim()).map_err(|e| {
            format!("installed version {installed:?} is not a PEP 440 version: {e}")
        })?;
        Ok(self.0.iter().all(|spec| specifier_contains(spec, &version)))
    }
}

/// Whether `version` matches one specifier. A prefix match (`==V.*`,
/// `!=V.*`) is PEP 440's: the candidate's release is padded with zeros to
/// the prefix's length, so `1` is `1.0` and not `1.1.*`; `pep440_rs` 0.7
/// compares only as many parts as the shorter of the two has (`1` matched
/// `==1.1.*`). Everything else is `pep440_rs`'s.
fn specifier_contains(spec: &pep440_rs::VersionSpecifier, version: &pep440_rs::Version) -> bool {
    use pep440_rs::Operator;
    let equal = match spec.operator() {
        Operator::EqualStar => true,
        Operator::NotEqualStar => false,
        _ => return spec.contains(version),
    };
    let prefix = spec.version();
    let padded = version.release().iter().chain(std::iter::repeat(&0));
    let matches = prefix.epoch() == version.epoch()
        && prefix.release().iter().zip(padded).all(|(p, v)| p == v);
    matches == equal
}

impl fmt::Display for PyVersionReq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a bare `dependencies` entry (one without a `KIND:` prefix) means
/// (SPEC §3): the seed's Python package for a Python plugin, a shared
/// library for a native one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BareDependency {
    /// A bare name is `lib:NAME` (native plugins; the default).
    #[default]
    Lib,
    /// A bare name is `py:NAME` (Python plugins).
    Py,
}

impl Dependency {
    /// Parses one `dependencies` entry (`lib:z`, `bin:ffmpeg`, `env:KEY`,
    /// `py:torch`, `plugin:base@^2`, or a bare name meaning what `bare`
    /// says). The error message says what is wrong; the caller names the
    /// field.
    pub(crate) fn parse(s: &str, bare: BareDependency) -> Result<Self, String> {
        let s = s.trim();
        // PEP 508's `NAME @ URL` (`numpy @ file:/tmp/x.whl`): an `@` before
        // any `:` (a URL's scheme), not a `plugin:NAME@REQ`.
        let url_form = s
            .find('@')
            .is_some_and(|at| s.find(':').is_none_or(|colon| at < colon));
        if s.starts_with("plugin:") && s.contains("://") {
            return Err(format!(
                "a plugin dependency takes a version requirement after '@' \
                 (plugin:NAME@^1.2), not a URL: {s:?}"
            ));
        }
        if s.contains("://") || url_form {
            return Err(format!(
                "URL requirements (NAME @ URL) are not supported: {s:?}; install the package \
                 and name it"
            ));
        }
        let bare_prefix = match bare {
            BareDependency::Lib => "lib",
            BareDependency::Py => "py",
        };
        let (prefix, name, is_bare) = match s.split_once(':') {
            Some((prefix, name)) => (prefix, name, false),
            None => (bare_prefix, s, true),
        };
        let check_name = |name: &str, what: &str| -> Result<String, String> {
            if name.is_empty() {
                let article = if what.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                };
                Err(format!("{prefix}: needs {article} {what} name"))
            } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                Err(format!(
                    "{what} name {name:?} contains whitespace or control characters"
                ))
            } else {
                Ok(name.to_string())
            }
        };
        match prefix {
            "lib" => Ok(Dependency::Lib(check_name(name, "library")?)),
            "bin" => Ok(Dependency::Bin(check_name(name, "executable")?)),
            "env" => {
                let name = check_name(name, "variable")?;
                if name.contains('=') {
                    return Err(format!("variable name {name:?} contains '='"));
                }
                Ok(Dependency::Env(name))
            }
            "py" => {
                let (package, version) = split_python_requirement(name)?;
                let package = check_name(package, "package")?;
                // Every plugin's packages go to one interpreter run (its
                // arguments): one name past the kernel's limit for an
                // argument failed that run for all of them.
                if package.len() > MAX_PYTHON_NAME {
                    return Err(format!(
                        "Python package name of {} bytes, longer than {MAX_PYTHON_NAME}",
                        package.len()
                    ));
                }
                if !valid_python_name(&package) {
                    return Err(format!(
                        "invalid Python package name {package:?}: must match [A-Za-z0-9_.-]+ \
                         with no empty dotted part (like torch or torch.cuda)"
                    ));
                }
                Ok(Dependency::Py {
                    package,
                    bare: is_bare,
                    version,
                })
            }
            "plugin" => {
                let (name, req) = match name.split_once('@') {
                    Some((name, req)) => {
                        let name = name.trim();
                        let req = semver::VersionReq::parse(req.trim()).map_err(|e| {
                            format!("invalid version requirement {req:?} for plugin {name:?}: {e}")
                        })?;
                        (name, Some(req))
                    }
                    None => (name, None),
                };
                if !valid_plugin_name(name) {
                    return Err(format!(
                        "invalid plugin name {name:?}: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,63}}"
                    ));
                }
                Ok(Dependency::Plugin {
                    name: name.to_string(),
                    req,
                })
            }
            other => Err(format!(
                "unknown dependency kind {other:?} in {s:?}: expected lib:, bin:, env:, py: or plugin:"
            )),
        }
    }
}

impl Dependency {
    /// What the Python probe is asked for a Python package: its name
    /// (whether it can be imported), or `=NAME` for one with a version
    /// requirement (the installed distribution's version); `None` for
    /// other kinds.
    pub fn python_query(&self) -> Option<String> {
        match self {
            Dependency::Py {
                package,
                version: None,
                ..
            } => Some(package.clone()),
            Dependency::Py {
                package,
                version: Some(_),
                ..
            } => Some(format!("{VERSION_QUERY}{package}")),
            _ => None,
        }
    }
}

/// Marks a query for the installed version of a distribution (a package
/// name never starts with it).
pub(crate) const VERSION_QUERY: char = '=';

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dependency::Lib(name) => write!(f, "lib:{name}"),
            Dependency::Bin(name) => write!(f, "bin:{name}"),
            Dependency::Env(name) => write!(f, "env:{name}"),
            Dependency::Py {
                package,
                bare,
                version,
            } => {
                if !bare {
                    f.write_str("py:")?;
                }
                f.write_str(package)?;
                match version {
                    Some(version) => write!(f, "{version}"),
                    None => Ok(()),
                }
            }
            Dependency::Plugin { name, req: None } => write!(f, "plugin:{name}"),
            Dependency::Plugin {
                name,
                req: Some(req),
            } => write!(f, "plugin:{name}@{req}"),
        }
    }
}

/// Splits a Python dependency (what follows `py:`, or a bare one) into its
/// package name and its version requirement: `numpy`, `numpy>=1.24`,
/// `numpy >= 1.24, < 2`, `numpy (>=1.24)`, `ultralytics[export]>=8` (the
/// extras are not checked: what a package's extras install is not
/// recorded under its name). Environment markers (`; python_version …`)
/// and URL requirements (`name @ url`) are refused. What is not a
/// requirement is left whole for the name check, which says what is
/// wrong with it.
fn split_python_requirement(text: &str) -> Result<(&str, Option<PyVersionReq>), String> {
    if text.contains(';') {
        return Err(format!(
            "environment markers are not supported in {text:?}: list the package without `; …`"
        ));
    }
    let name_end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        .unwrap_or(text.len());
    let (name, rest) = text.split_at(name_end);
    let mut spec = rest.trim_start();
    if let Some(extras) = spec.strip_prefix('[') {
        let Some((extras, after)) = extras.split_once(']') else {
            return Err(format!("unclosed extras `[` in {text:?}"));
        };
        // A comma-separated list of names (PEP 508): `[a b]` is none.
        let extra_name = |extra: &str| {
            !extra.is_empty()
                && extra
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        };
        if !extras.trim().is_empty() && !extras.split(',').map(str::trim).all(extra_name) {
            return Err(format!(
                "invalid extras [{extras}] in {text:?}: a comma-separated list of names"
            ));
        }
        spec = after.trim_start();
    }
    if spec.is_empty() {
        return Ok((name, None));
    }
    let starts_spec = spec.starts_with(['<', '>', '=', '!', '~', '(']);
    if !starts_spec {
        // Not a requirement: the name check names the fault.
        return Ok((text, None));
    }
    let spec = match spec.strip_prefix('(') {
        Some(inner) => inner
            .strip_suffix(')')
            .ok_or_else(|| format!("unclosed `(` in {text:?}"))?,
        None => spec,
    };
    let specifiers = pep440_rs::VersionSpecifiers::from_str(spec.trim()).map_err(|e| {
        // Its first line: the rest draws a caret under the text.
        let e = e.to_string();
        let why = e.lines().next().unwrap_or_default().trim_end_matches(':');
        format!("invalid version requirement {spec:?} for Python package {name:?}: {why}")
    })?;
    if specifiers.is_empty() {
        return Err(format!("an empty version requirement in {text:?}"));
    }
    Ok((name, Some(PyVersionReq(specifiers))))
}

/// The SPEC §3 plugin-name rule: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
fn valid_plugin_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The longest Python package name a dependency may give (PyPI's longest
/// are under 100 bytes).
const MAX_PYTHON_NAME: usize = 255;

/// The most dependencies a manifest may list: the `py:` packages of a load
/// pass are asked of each interpreter in shared runs, which one plugin's
/// endless list must not make time out for every plugin on it.
pub(crate) const MAX_DEPENDENCIES: usize = 256;

/// A Python package name: `[A-Za-z0-9_.-]+`, no empty dotted part (so no
/// leading, trailing or doubled `.`). `-` is allowed for distribution
/// names (`opencv-python`), looked up by their installed metadata.
fn valid_python_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        })
}

/// The manifest's `requires_gpu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuRequirement {
    /// No GPU needed (`false` or absent).
    #[default]
    None,
    /// At least one CUDA device (`true`).
    Any,
    /// Devices meeting limits (an object). Unset limits are not checked;
    /// `min_devices` defaults to 1.
    Spec {
        /// How many qualifying devices are needed.
        min_devices: Option<u32>,
        /// Memory each qualifying device must have, in MiB.
        min_memory_mb: Option<u64>,
        /// Compute capability each qualifying device must have.
        min_compute_capability: Option<(u32, u32)>,
    },
}

/// Everything a manifest requires before the plugin may load.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Requirements {
    /// The `dependencies` list, in manifest order.
    pub dependencies: Vec<Dependency>,
    /// The `requires_gpu` field.
    pub gpu: GpuRequirement,
    /// The `models` object as `(name, path)` pairs in manifest order; paths
    /// as written (relative ones are resolved at check time).
    pub models: Vec<(String, PathBuf)>,
    /// The Python interpreter that answers this plugin's `py:` dependencies,
    /// as the loader resolved it. Never read from the manifest here: `None`
    /// after parsing, and then every `py:` dependency is missing.
    pub python: Option<PathBuf>,
    /// When [`python`](Self::python) is `None` because the loader found no
    /// interpreter: the one it looked for (`/opt/py/bin/python3`, `python3
    /// (on PATH)`), named in each `py:` dependency's entry.
    pub python_wanted: Option<String>,
}

impl Requirements {
    /// Parses `dependencies`, `requires_gpu` and `models` from a whole
    /// manifest, a bare dependency name meaning a shared library (a native
    /// plugin's manifest): [`from_manifest_as`](Self::from_manifest_as) with
    /// [`BareDependency::Lib`].
    pub fn from_manifest(manifest: &Value) -> Result<Self, ManifestError> {
        Self::from_manifest_as(manifest, BareDependency::Lib)
    }

    /// Parses `dependencies`, `requires_gpu` and `models` from a whole
    /// manifest, a bare dependency name meaning what `bare` says. Absent (or
    /// `null`) fields mean no requirement; other fields are ignored. Wrong
    /// types, unknown dependency kinds, bad package names and bad semver
    /// requirements are [`ManifestError::InvalidField`] naming the field
    /// (`dependencies[2]`, `requires_gpu.min_memory_mb`, `models.yolo`).
    /// [`python`](Self::python) is left `None` for the loader to set.
    pub fn from_manifest_as(manifest: &Value, bare: BareDependency) -> Result<Self, ManifestError> {
        let obj = manifest.as_object().ok_or_else(|| {
            invalid(
                "manifest",
                format!("expected a JSON object, found {}", json_type_name(manifest)),
            )
        })?;
        let present = |key: &str| obj.get(key).filter(|v| !v.is_null());
        Ok(Requirements {
            dependencies: present("dependencies")
                .map(|v| parse_dependencies(v, bare))
                .transpose()?
                .unwrap_or_default(),
            gpu: present("requires_gpu")
                .map(parse_gpu)
                .transpose()?
                .unwrap_or_default(),
            models: present("models")
                .map(parse_models)
                .transpose()?
                .unwrap_or_default(),
            python: None,
            python_wanted: None,
        })
    }

    /// Whether nothing at all is required ([`python`](Self::python) is not
    /// a requirement).
    pub fn is_empty(&self) -> bool {
        self.dependencies.is_empty() && self.gpu == GpuRequirement::None && self.models.is_empty()
    }

    /// What the interpreter is asked for the Python packages among the
    /// dependencies, in manifest order (what to hand to
    /// [`DependencyChecker::prefetch_python`](crate::DependencyChecker::prefetch_python)):
    /// see [`Dependency::python_query`].
    pub fn python_queries(&self) -> impl Iterator<Item = String> + '_ {
        self.dependencies
            .iter()
            .filter_map(Dependency::python_query)
    }
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError::InvalidField {
        field: field.into(),
        message: message.into(),
    }
}

/// How a JSON value's type reads in an error message: `a string`,
/// `an array`, ... (shared by every layer that validates JSON input).
pub fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_dependencies(v: &Value, bare: BareDependency) -> Result<Vec<Dependency>, ManifestError> {
    let list = v.as_array().ok_or_else(|| {
        invalid(
            "dependencies",
            format!(
                "expected a list of strings like \"lib:NAME\", found {}",
                json_type_name(v)
            ),
        )
    })?;
    if list.len() > MAX_DEPENDENCIES {
        return Err(invalid(
            "dependencies",
            format!(
                "{} dependencies, more than the {MAX_DEPENDENCIES} a manifest may list",
                list.len()
            ),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("dependencies[{i}]");
            let s = item.as_str().ok_or_else(|| {
                invalid(
                    &field,
                    format!(
                        "expected a string like \"lib:NAME\", found {}",
                        json_type_name(item)
                    ),
                )
            })?;
            Dependency::parse(s, bare).map_err(|message| invalid(&field, message))
        })
        .collect()
}

const GPU_KEYS: &str = "min_devices, min_memory_mb, min_compute_capability";

fn parse_gpu(v: &Value) -> Result<GpuRequirement, ManifestError> {
    match v {
        Value::Bool(false) => Ok(GpuRequirement::None),
        Value::Bool(true) => Ok(GpuRequirement::Any),
        Value::Object(map) => {
            let mut min_devices = None;
            let mut min_memory_mb = None;
            let mut min_compute_capability = None;
            for (key, value) in map {
                let field = format!("requires_gpu.{key}");
                if value.is_null() {
                    continue;
                }
                match key.as_str() {
                    "min_devices" => {
                        let n = value
                            .as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .filter(|n| *n >= 1)
                            .ok_or_else(|| {
                                invalid(
                                    &field,
                                    format!("expected a whole number >= 1, found {value}"),
                                )
                            })?;
                        min_devices = Some(n);
                    }
                    "min_memory_mb" => {
                        let n = value.as_u64().ok_or_else(|| {
                            invalid(
                                &field,
                                format!("expected a whole number of MiB, found {value}"),
                            )
                        })?;
                        min_memory_mb = Some(n);
                    }
                    "min_compute_capability" => {
                        let text = match value {
                            Value::String(s) => s.clone(),
                            Value::Number(n) => n.to_string(),
                            other => {
                                return Err(invalid(
                                    &field,
                                    format!(
                                        "expected a version like \"8.0\", found {}",
                                        json_type_name(other)
                                    ),
                                ));
                            }
                        };
                        min_compute_capability =
                            Some(parse_compute_capability(&text).ok_or_else(|| {
                                invalid(
                                    &field,
                                    format!("expected a version like \"8.0\", found {text:?}"),
                                )
                            })?);
                    }
                    _ => {
                        return Err(invalid(
                            &field,
                            format!("unknown key; expected one of {GPU_KEYS}"),
                        ));
                    }
                }
            }
            Ok(GpuRequirement::Spec {
                min_devices,
                min_memory_mb,
                min_compute_capability,
            })
        }
        other => Err(invalid(
            "requires_gpu",
            format!(
                "expected true, false or an object with {GPU_KEYS}, found {}",
                json_type_name(other)
            ),
        )),
    }
}

/// `"8"`, `"8.0"`, `"8.6"` → `(major, minor)`.
fn parse_compute_capability(s: &str) -> Option<(u32, u32)> {
    let s = s.trim();
    let (major, minor) = s.split_once('.').unwrap_or((s, "0"));
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return None;
    }
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn parse_models(v: &Value) -> Result<Vec<(String, PathBuf)>, ManifestError> {
    let map = v.as_object().ok_or_else(|| {
        invalid(
            "models",
            format!(
                "expected an object of name: path, found {}",
                json_type_name(v)
            ),
        )
    })?;
    map.iter()
        .map(|(name, path)| {
            let field = format!("models.{name}");
            if name.is_empty() {
                return Err(invalid(&field, "model name is empty"));
            }
            match path.as_str() {
                Some(p) if !p.trim().is_empty() && !p.contains('\0') => {
                    Ok((name.clone(), PathBuf::from(p)))
                }
                Some(p) if p.contains('\0') => {
                    Err(invalid(&field, "a path cannot hold a NUL character"))
                }
                Some(_) => Err(invalid(&field, "expected a non-empty path")),
                None => Err(invalid(
                    &field,
                    format!("expected a path string, found {}", json_type_name(path)),
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Requirements {
        Requirements::from_manifest(&v).unwrap()
    }

    /// Asserts the manifest is rejected on `field` with a message holding `needle`.
    fn check_invalid(v: Value, field: &str, needle: &str) {
        match Requirements::from_manifest(&v) {
            Err(ManifestError::InvalidField { field: f, message }) => {
                assert_eq!(f, field, "{message}");
                assert!(message.contains(needle), "{message:?} lacks {needle:?}");
            }
            other => panic!("expected InvalidField on {field}, got {other:?}"),
        }
    }

    #[test]
    fn absent_fields_mean_nothing_required() {
        let r = parse(json!({"name": "ocr", "unknown": [1, 2]}));
        assert!(r.is_empty());
        let r = parse(json!({"dependencies": null, "requires_gpu": null, "models": null}));
        assert_eq!(r, Requirements::default());
    }

    #[test]
    fn dependency_kinds_by_prefix() {
        let r = parse(json!({"dependencies": [
            "lib:z", "libc.so.6", "bin:ffmpeg", "env:API_KEY", "plugin:base", "plugin:base@^2", "plugin:x@>=1.2, <2"
        ]}));
        let shown: Vec<String> = r.dependencies.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "lib:z",
                "lib:libc.so.6",
                "bin:ffmpeg",
                "env:API_KEY",
                "plugin:base",
                "plugin:base@^2",
                "plugin:x@>=1.2, <2"
            ]
        );
        assert_eq!(
            r.dependencies[5],
            Dependency::Plugin {
                name: "base".into(),
                req: Some(semver::VersionReq::parse("^2").unwrap())
            }
        );
        // Spaces around the `@`, as around the requirement: the same.
        let spaced = parse(json!({"dependencies": ["plugin:base @ ^2"]}));
        assert_eq!(spaced.dependencies[0], r.dependencies[5]);
    }

    #[test]
    fn bad_dependencies_name_the_entry() {
        check_invalid(
            json!({"dependencies": ["lib:z", "bin:sh", "foo:x"]}),
            "dependencies[2]",
            "unknown dependency kind \"foo\"",
        );
        check_invalid(
            json!({"dependencies": ["plugin:base@not-semver"]}),
            "dependencies[0]",
            "invalid version requirement",
        );
        check_invalid(
            json!({"dependencies": ["lib:z", 3]}),
            "dependencies[1]",
            "found a number",
        );
        check_invalid(
            json!({"dependencies": "lib:z"}),
            "dependencies",
            "expected a list",
        );
        check_invalid(
            json!({"dependencies": ["lib:"]}),
            "dependencies[0]",
            "needs a library name",
        );
        check_invalid(
            json!({"dependencies": ["env:A=B"]}),
            "dependencies[0]",
            "'='",
        );
        check_invalid(
            json!({"dependencies": ["bin:a b"]}),
            "dependencies[0]",
            "whitespace",
        );
        check_invalid(
            json!({"dependencies": ["plugin:../x"]}),
            "dependencies[0]",
            "invalid plugin name",
        );
        check_invalid(json!([1]), "manifest", "expected a JSON object");
    }

    #[test]
    fn requires_gpu_forms() {
        assert_eq!(
            parse(json!({"requires_gpu": false})).gpu,
            GpuRequirement::None
        );
        assert_eq!(
            parse(json!({"requires_gpu": true})).gpu,
            GpuRequirement::Any
        );
        assert_eq!(
            parse(json!({"requires_gpu": {"min_devices": 2, "min_memory_mb": 16384, "min_compute_capability": "8.0"}})).gpu,
            GpuRequirement::Spec {
                min_devices: Some(2),
                min_memory_mb: Some(16384),
                min_compute_capability: Some((8, 0))
            }
        );
        assert_eq!(
            parse(json!({"requires_gpu": {"min_compute_capability": 8.6}})).gpu,
            GpuRequirement::Spec {
                min_devices: None,
                min_memory_mb: None,
                min_compute_capability: Some((8, 6))
            }
        );
        assert_eq!(
            parse(json!({"requires_gpu": {}})).gpu,
            GpuRequirement::Spec {
                min_devices: None,
                min_memory_mb: None,
                min_compute_capability: None
            }
        );
    }

    #[test]
    fn bad_gpu_requirements() {
        check_invalid(
            json!({"requires_gpu": "yes"}),
            "requires_gpu",
            "found a string",
        );
        check_invalid(
            json!({"requires_gpu": {"min_devices": 0}}),
            "requires_gpu.min_devices",
            ">= 1",
        );
        check_invalid(
            json!({"requires_gpu": {"min_devices": -1}}),
            "requires_gpu.min_devices",
            ">= 1",
        );
        check_invalid(
            json!({"requires_gpu": {"min_memory_mb": 1.5}}),
            "requires_gpu.min_memory_mb",
            "whole number",
        );
        check_invalid(
            json!({"requires_gpu": {"min_compute_capability": "eight"}}),
            "requires_gpu.min_compute_capability",
            "\"eight\"",
        );
        check_invalid(
            json!({"requires_gpu": {"min_compute_capability": [8, 0]}}),
            "requires_gpu.min_compute_capability",
            "found an array",
        );
        check_invalid(
            json!({"requires_gpu": {"min_memory": 1}}),
            "requires_gpu.min_memory",
            "unknown key",
        );
    }

    #[test]
    fn compute_capability_strings() {
        assert_eq!(parse_compute_capability("8.0"), Some((8, 0)));
        assert_eq!(parse_compute_capability("9"), Some((9, 0)));
        assert_eq!(parse_compute_capability(" 7.5 "), Some((7, 5)));
        assert_eq!(parse_compute_capability("8."), None);
        assert_eq!(parse_compute_capability("-1.0"), None);
        assert_eq!(parse_compute_capability("8.0.1"), None);
    }

    #[test]
    fn models_keep_manifest_order() {
        let text =
            r#"{"models": {"zeta": "models/z.bin", "alpha": "/abs/a.bin", "mid": "m.onnx"}}"#;
        let r = parse(serde_json::from_str(text).unwrap());
        let names: Vec<&str> = r.models.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha", "mid"]);
        assert_eq!(r.models[1].1, PathBuf::from("/abs/a.bin"));
    }

    #[test]
    fn bad_models() {
        check_invalid(json!({"models": ["a"]}), "models", "expected an object");
        check_invalid(
            json!({"models": {"yolo": 3}}),
            "models.yolo",
            "found a number",
        );
        check_invalid(json!({"models": {"yolo": ""}}), "models.yolo", "non-empty");
        check_invalid(
            json!({"models": {"yolo": "x\u{0}y"}}),
            "models.yolo",
            "cannot hold a NUL",
        );
    }

    #[test]
    fn bare_names_mean_py_for_python_plugins_and_lib_otherwise() {
        let manifest = json!({"dependencies": ["torch", "py:numpy", "lib:z", "bin:sh"]});
        let py = Requirements::from_manifest_as(&manifest, BareDependency::Py).unwrap();
        assert_eq!(
            py.dependencies,
            [
                Dependency::Py {
                    package: "torch".into(),
                    bare: true,
                    version: None,
                },
                Dependency::Py {
                    package: "numpy".into(),
                    bare: false,
                    version: None,
                },
                Dependency::Lib("z".into()),
                Dependency::Bin("sh".into()),
            ]
        );
        assert_eq!(py.python, None, "never read from the manifest");
        assert_eq!(py.python_queries().collect::<Vec<_>>(), ["torch", "numpy"]);
        let native = parse(manifest.clone());
        assert_eq!(native.dependencies[0], Dependency::Lib("torch".into()));
        assert_eq!(
            native.dependencies[1],
            Dependency::Py {
                package: "numpy".into(),
                bare: false,
                version: None,
            },
            "py: works in any manifest"
        );
        assert_eq!(
            Requirements::from_manifest_as(&manifest, BareDependency::Lib).unwrap(),
            native
        );
        assert_eq!(BareDependency::default(), BareDependency::Lib);
    }

    #[test]
    fn python_packages_display_as_written() {
        let r = Requirements::from_manifest_as(
            &json!({"dependencies": ["torch", "py:torch.cuda", " numpy ", "py:opencv-python", "lib:c"]}),
            BareDependency::Py,
        )
        .unwrap();
        let shown: Vec<String> = r.dependencies.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "torch",
                "py:torch.cuda",
                "numpy",
                "py:opencv-python",
                "lib:c"
            ]
        );
    }

    #[test]
    fn python_version_requirements() {
        let r = Requirements::from_manifest_as(
            &json!({"dependencies": [
                "numpy>=1.24",
                "py:numpy >= 1.24 , < 2",
                "ultralytics[export, onnx]~=8.1",
                "torch (==2.*)",
                "zope.interface!=5.0",
            ]}),
            BareDependency::Py,
        )
        .unwrap();
        let shown: Vec<String> = r.dependencies.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "numpy>=1.24",
                "py:numpy>=1.24, <2",
                "ultralytics~=8.1",
                "torch==2.*",
                "zope.interface!=5.0",
            ]
        );
        assert_eq!(
            r.python_queries().collect::<Vec<_>>(),
            [
                "=numpy",
                "=numpy",
                "=ultralytics",
                "=torch",
                "=zope.interface"
            ]
        );
        let Dependency::Py {
            version: Some(version),
            ..
        } = &r.dependencies[1]
        else {
            panic!("{:?}", r.dependencies[1]);
        };
        assert_eq!(version.matches("1.26.4"), Ok(true));
        assert_eq!(version.matches("1.24"), Ok(true));
        assert_eq!(version.matches("2.0.0"), Ok(false));
        assert_eq!(version.matches("1.23"), Ok(false));
        assert!(
            version
                .matches("not a version")
                .is_err_and(|e| e.contains("\"not a version\" is not a PEP 440 version")),
        );
    }

    /// Prefix matches against installed versions of fewer, as many and
    /// more parts; the expected answers are those of `packaging` 26.4
    /// (`SpecifierSet(spec).contains(v, prereleases=True)`).
    #[test]
    fn prefix_matches_pad_the_installed_release_with_zeros() {
        for (spec, installed, expected) in [
            ("==1.1.*", "1", false),
            ("!=1.1.*", "1", true),
            ("!=1.2.3.*", "1.2", true),
            ("==1.0.*", "1", true),
            ("!=1.0.*", "1", false),
            ("==1.0.0.0.*", "1", true),
            ("==1.0.*", "1.0.5", true),
            ("==1.0.*", "1.1", false),
            ("==1.2.*", "1.2rc1", true),
            ("==1.2.*", "1.2.post1", true),
            ("==2.0.*", "2.0.0+cu121", true),
            ("!=1.2.*", "1.2.0.dev1", false),
            ("==1.*", "1!1.0", false),
            ("==0!1.*", "1.5", true),
            ("==1.*, !=1.4.*", "1.4", false),
            ("==1.*, !=1.4.*", "1.5", true),
        ] {
            let (_, req) = split_python_requirement(&format!("x{spec}")).unwrap();
            assert_eq!(
                req.unwrap().matches(installed),
                Ok(expected),
                "{installed} against {spec}"
            );
        }
    }

    #[test]
    fn a_bad_version_requirement_is_named_on_one_line() {
        match Requirements::from_manifest_as(
            &json!({"dependencies": ["numpy>=", "torch"]}),
            BareDependency::Py,
        ) {
            Err(ManifestError::InvalidField { field, message }) => {
                assert_eq!(field, "dependencies[0]");
                assert!(!message.contains('\n'), "{message}");
                assert!(
                    message.starts_with(
                        "invalid version requirement \">=\" for Python package \"numpy\": "
                    ),
                    "{message}"
                );
            }
            other => panic!("expected InvalidField, got {other:?}"),
        }
    }

    #[test]
    fn bad_python_package_names() {
        for (dep, needle) in [
            ("py:", "needs a package name"),
            ("bin:", "bin: needs an executable name"),
            ("py:a b", "whitespace"),
            ("py:.torch", "invalid Python package name"),
            ("py:torch.", "invalid Python package name"),
            ("py:a..b", "invalid Python package name"),
            ("py:to/rch", "invalid Python package name"),
            ("py:torch@1", "invalid Python package name"),
            (
                "numpy @ https://x/numpy.whl",
                "URL requirements (NAME @ URL) are not supported",
            ),
            ("py:numpy @ https://x/numpy.whl", "URL requirements"),
            ("py:numpy@1", "invalid Python package name"),
            (
                "py:numpy>=1; python_version < '3.9'",
                "environment markers are not supported",
            ),
            (
                "py:numpy>=",
                "invalid version requirement \">=\" for Python package \"numpy\"",
            ),
            ("py:numpy>=1.0 <2", "invalid version requirement"),
            ("py:numpy=>1", "invalid version requirement"),
            ("py:numpy (>=1", "unclosed `(`"),
            ("py:numpy[gpu>=1", "unclosed extras"),
            ("py:numpy[g/pu]>=1", "invalid extras [g/pu]"),
            ("py:pip[a b]>=1", "invalid extras [a b]"),
            ("py:pip[a,]>=1", "invalid extras [a,]"),
            ("py:>=1", "needs a package name"),
            // A URL whose scheme has no `//` (it read as a kind "numpy @
            // file").
            ("numpy @ file:/tmp/x.whl", "URL requirements (NAME @ URL)"),
            (
                "plugin:base @ https://x/base",
                "a plugin dependency takes a version requirement after '@'",
            ),
        ] {
            check_invalid(json!({"dependencies": [dep]}), "dependencies[0]", needle);
        }
        match Requirements::from_manifest_as(
            &json!({"dependencies": ["ok", "x/y"]}),
            BareDependency::Py,
        ) {
            Err(ManifestError::InvalidField { field, message }) => {
                assert_eq!(field, "dependencies[1]");
                assert!(message.contains("\"x/y\""), "{message}");
            }
            other => panic!("expected InvalidField, got {other:?}"),
        }
        check_invalid(json!({"dependencies": ["foo:x"]}), "dependencies[0]", "py:");
        let many: Vec<String> = (0..=MAX_DEPENDENCIES).map(|i| format!("py:p{i}")).collect();
        check_invalid(
            json!({ "dependencies": many }),
            "dependencies",
            "257 dependencies, more than the 256",
        );
        let most = &many[..MAX_DEPENDENCIES];
        assert_eq!(
            Requirements::from_manifest(&json!({ "dependencies": most }))
                .map(|r| r.dependencies.len())
                .ok(),
            Some(MAX_DEPENDENCIES)
        );
        assert!(valid_python_name("torch_2.cuda-x.A9"));
        assert!(valid_python_name("9x"));
        assert!(!valid_python_name(""));
        assert!(!valid_python_name("é"));
        let long = format!("py:{}", "a".repeat(MAX_PYTHON_NAME + 1));
        assert!(
            Dependency::parse(&long, BareDependency::Py)
                .is_err_and(|e| e.contains("longer than 255")),
            "a name too long for one interpreter run's arguments"
        );
        assert!(
            Dependency::parse(
                &format!("py:{}", "a".repeat(MAX_PYTHON_NAME)),
                BareDependency::Py
            )
            .is_ok()
        );
    }

    #[test]
    fn plugin_names_follow_the_spec_rule() {
        assert!(valid_plugin_name("ocr"));
        assert!(valid_plugin_name("a.b_c-9"));
        assert!(!valid_plugin_name(""));
        assert!(!valid_plugin_name("-x"));
        assert!(!valid_plugin_name(&"a".repeat(65)));
        assert!(valid_plugin_name(&"a".repeat(64)));
    }
}
