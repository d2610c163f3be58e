//! Installed Python plugins: the entry points of group
//! [`GROUP`] (`forgesyte.plugins`) that a Python interpreter's installed
//! distributions declare.
//!
//! [`discover`] asks the interpreter once, with a small standard-library
//! script, for every entry point of the group: its name and value
//! (`module:attr`), the distribution that declares it, and the directory of
//! its module, found **without importing anything** (the top-level
//! package is looked up with `importlib.util.find_spec`, submodules with
//! `importlib.machinery.PathFinder` in their parent's directories; a
//! package that builds its `__path__` as it is imported is not found).
//! Whether that directory holds a `manifest.json` is reported too. Each
//! distribution is read on its own: one whose metadata cannot be read is an
//! error of its own (when it declares the group), one that declares more
//! than 64 entry points of the group is one error, and at most 1,024 are
//! read in all. Nothing of a plugin's own module runs: the loader then
//! loads each entry point as a Python plugin whose directory is the
//! module's directory (see [`Loader`](crate::Loader) and
//! [`LoaderConfig::python_entry_points`](crate::LoaderConfig::python_entry_points)).
//!
//! The script runs with the working directory `/`, stdin closed, the
//! process environment inherited (so `PYTHONPATH` and virtual environments
//! count), in a process group of its own that is killed after
//! [`DISCOVERY_TIMEOUT`]. Whatever packages print while their parents are
//! imported goes to stderr, and the answer follows
//! [`forgesyte_deps::ANSWER_MARKER`]: what a `.pth` file or
//! `sitecustomize` prints as the interpreter starts is told apart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The entry-point group ForgeSyte plugins declare.
pub const GROUP: &str = "forgesyte.plugins";

/// How the discovery script's error for a module it cannot find begins
/// (see [`EntryPoint::module_not_found`]).
const MODULE_NOT_FOUND: &str = "ModuleNotFoundError: No module named";

/// How long [`discover`] lets the interpreter run before it kills it.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// The discovery script: one JSON object on (the real) stdout after the
/// answer marker, `{"python": VERSION, "entry_points": [...]}`.
const SCRIPT: &str = r#"import os, sys
# Under -c the working directory ("") comes first: nothing may be found there.
if sys.path and sys.path[0] in ("", "."):
    del sys.path[0]
# The answer alone goes to stdout; whatever packages print while their
# parents are imported (Python or C code) goes to stderr.
_out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
sys.stdout = sys.stderr
import json, re
import importlib.machinery, importlib.util
try:
    from importlib import metadata
except ImportError:  # Python < 3.8, with the backport installed
    import importlib_metadata as metadata

GROUP = "forgesyte.plugins"
VALUE = re.compile(r"^\s*(\w+(?:\.\w+)*)\s*(?::\s*(\w+(?:\.\w+)*)\s*)?(?:\[[^\]]*\]\s*)?$")
# The longest name or value read: one of megabytes made the whole answer
# too large to read, and every installed plugin was gone with it.
MAX_TEXT = 1024


def normalized(name):
    return re.sub(r"[-_.]+", "-", name or "").lower()


# Read at most: a distribution declaring more of the group, or more in all,
# is an error of its own, not a server made of thousands of runners.
MAX_PER_DIST = 64
MAX_TOTAL = 1024
# What the host logs: distributions skipped, entry points files unread.
WARNINGS = []


def failed(name, dist, error, whole=False):
    """An entry point that failed, or (``whole``) a distribution none of
    whose entry points could be read."""
    return {"name": name, "value": "", "module": None, "attr": None, "dist": dist,
            "version": None, "module_dir": None, "origin": None, "owns_dir": False,
            "location": None, "has_manifest": False, "error": error,
            "whole_distribution": whole}


def found():
    """(entry point, its distribution) for the group, and the errors of
    distributions that could not be read. Each distribution is read on its
    own, the first of a name on sys.path winning (as importlib.metadata's
    entry_points does): one whose metadata is broken (a malformed line in
    any group of its entry_points.txt) is its own error when it declares
    the group, and nobody's when it does not."""
    pairs, errors, seen = [], [], set()
    # In a stable order: which distributions the limits below leave out
    # must not depend on the order a file system lists them in.
    def where(dist):
        return str(getattr(dist, "_path", ""))
    for dist in sorted(metadata.distributions(), key=where):
        name = None
        try:
            # A distribution whose metadata has no Name goes by its
            # directory's (`pkg-1.0.dist-info`: pkg).
            name = dist.metadata.get("Name") or label_of(dist)
            key = normalized(name)
            if key in seen:
                continue
            seen.add(key)
            eps = [ep for ep in dist.entry_points if ep.group == GROUP]
            # An entry_points.txt that cannot be read (no permission, a
            # directory, a dangling link) reads as none: said, not lost.
            if not eps:
                path = os.path.join(str(getattr(dist, "_path", "")), "entry_points.txt")
                if os.path.lexists(path) and not (os.path.isfile(path) and os.access(path, os.R_OK)):
                    WARNINGS.append("the entry points of %s (%s) cannot be read: a plugin it "
                                    "declares is not found" % (name, path))
        except BaseException as e:
            try:
                text = dist.read_text("entry_points.txt") or ""
            except BaseException:
                try:  # not UTF-8: is the group there at all?
                    with open(os.path.join(str(dist._path), "entry_points.txt"), "rb") as f:
                        text = f.read(1 << 20).decode("utf-8", "replace")
                except BaseException:
                    text = ""
            if "[" + GROUP + "]" in text:
                label = name or label_of(dist)
                # No name yet: its METADATA was what could not be read.
                what = "its entry points" if name is not None else "its metadata"
                errors.append(failed(label, label, "%s cannot be read: %s: %s"
                                     % (what, type(e).__name__, e), whole=True))
            else:
                WARNINGS.append("skipped distribution %s, whose metadata cannot be read: %s: %s"
                                % (name or label_of(dist), type(e).__name__, e))
            continue
        if len(eps) > MAX_PER_DIST:
            errors.append(failed(name, name, "it declares %d entry points of group %s, more than %d"
                                 % (len(eps), GROUP, MAX_PER_DIST), whole=True))
            continue
        if len(pairs) + len(eps) > MAX_TOTAL:
            errors.append(failed(name, name, "more than %d entry points of group %s are installed; "
                                 "this distribution's are not read" % (MAX_TOTAL, GROUP),
                                 whole=True))
            continue
        pairs.extend((ep, dist) for ep in eps)
    return pairs, errors


def label_of(dist):
    """A distribution's name from its metadata directory's
    (`pkg-1.0.dist-info`, `pkg.egg-info`: pkg)."""
    path = getattr(dist, "_path", None)
    if path is None:
        return "distribution"
    base = os.path.basename(str(path))
    for suffix in (".dist-info", ".egg-info"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.split("-")[0]


def locate(module):
    """The module's spec, found without importing anything: a package that
    builds its __path__ at import time is not found (importing its parents
    could run, hang or end this process, for every entry point)."""
    parts = module.split(".")
    # A top-level name: find_spec imports nothing.
    spec = importlib.util.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        # The part's own name: a dotted one under a namespace package makes
        # PathFinder read the parent from sys.modules (KeyError: nothing
        # was imported).
        spec = importlib.machinery.PathFinder.find_spec(
            parts[i], list(spec.submodule_search_locations)
        )
    return spec


def describe(ep, dist):
    item = {"name": ep.name, "value": ep.value, "module": None, "attr": None,
            "dist": None, "version": None, "module_dir": None, "origin": None,
            "owns_dir": False, "location": None, "has_manifest": False, "error": None}
    if len(ep.name) > MAX_TEXT or len(ep.value) > MAX_TEXT:
        return failed(ep.name[:64] + "…", None, "its name or value is longer than %d characters"
                      % MAX_TEXT)
    if dist is not None:
        try:
            item["dist"] = dist.metadata.get("Name")
            item["version"] = dist.version
        except Exception:
            pass
        try:
            item["location"] = os.path.abspath(str(dist.locate_file("")))
        except Exception:
            pass
    match = VALUE.match(ep.value)
    if match is None:
        item["error"] = "the value %r is not MODULE[:ATTR]" % ep.value
        return item
    module = item["module"] = match.group(1)
    item["attr"] = match.group(2)
    try:
        spec = locate(module)
    except BaseException as e:  # a parent's import may raise anything
        item["error"] = "%s: %s" % (type(e).__name__, e)
        return item
    if spec is None:
        item["error"] = ("ModuleNotFoundError: No module named %r (found without importing "
                         "anything: a package that builds its __path__ as it is imported is not "
                         "found)" % module)
        return item
    if spec.origin and os.path.isabs(spec.origin) and os.path.isfile(spec.origin):
        directory = os.path.dirname(os.path.abspath(spec.origin))
        item["origin"] = os.path.abspath(spec.origin)
    elif spec.submodule_search_locations:
        directory = os.path.abspath(list(spec.submodule_search_locations)[0])
    else:
        # Found, but not as a file (in a zip archive, built in): it loads
        # by name; it has no directory of its own, nor a manifest.
        return item
    item["module_dir"] = directory
    # A top-level single-file module lies in a sys.path entry itself
    # (site-packages): a manifest.json there belongs to nobody.
    shared = "." not in module and spec.submodule_search_locations is None
    item["owns_dir"] = not shared
    item["has_manifest"] = not shared and os.path.isfile(os.path.join(directory, "manifest.json"))
    return item


pairs, items = found()
seen = set()
for ep, dist in pairs:
    try:
        item = describe(ep, dist)
    except BaseException as e:  # an entry point's own oddity stays its own
        item = failed(str(getattr(ep, "name", "?")), None, "%s: %s" % (type(e).__name__, e))
    key = (item["name"], item["value"], normalized(item["dist"]))
    if key not in seen:
        seen.add(key)
        items.append(item)
_out.write("\x1eforgesyte-answer\x1e"
           + json.dumps({"python": sys.version.split()[0], "entry_points": items,
                         "warnings": [w[:MAX_TEXT] for w in WARNINGS[:20]]}))
_out.flush()
"#;

/// One entry point of group [`GROUP`], as the interpreter reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryPoint {
    /// The entry point's name (`my-plugin` in `my-plugin = pkg.mod:Plugin`).
    pub name: String,
    /// Its value as declared (`pkg.mod:Plugin`).
    pub value: String,
    /// The module part of the value; `None` when the value is not
    /// `MODULE[:ATTR]`.
    pub module: Option<String>,
    /// The attribute part of the value (the plugin class), if any.
    pub attr: Option<String>,
    /// The name of the distribution that declares it, if known.
    pub dist: Option<String>,
    /// That distribution's version, if known.
    pub version: Option<String>,
    /// The directory of the module's file (`None` when it could not be
    /// found: see [`error`](Self::error)).
    pub module_dir: Option<PathBuf>,
    /// The module's file (`__init__.py` of a package), when it is one.
    #[serde(default)]
    pub origin: Option<PathBuf>,
    /// Whether [`module_dir`](Self::module_dir) is the plugin's own: a
    /// package's, or a dotted module's; not a `sys.path` entry that a
    /// top-level single-file module shares with every other package.
    #[serde(default)]
    pub owns_dir: bool,
    /// Where the distribution is installed (`site-packages`), if known.
    pub location: Option<PathBuf>,
    /// Whether [`module_dir`](Self::module_dir) holds a `manifest.json`
    /// (never for a top-level single-file module, whose directory is
    /// `site-packages` itself).
    pub has_manifest: bool,
    /// Why the module's directory is unknown (`ModuleNotFoundError: …`,
    /// or the exception a parent package raised), if it is.
    pub error: Option<String>,
    /// Whether this stands for a whole distribution none of whose entry
    /// points could be read ([`error`](Self::error) says why), not for
    /// one entry point.
    #[serde(default)]
    pub whole_distribution: bool,
}

impl EntryPoint {
    /// The Python entrypoint it names, `module` or `module:attr` (extras
    /// dropped); `None` when the value is not `MODULE[:ATTR]`.
    pub fn target(&self) -> Option<String> {
        let module = self.module.as_deref()?;
        Some(match &self.attr {
            Some(attr) => format!("{module}:{attr}"),
            None => module.to_owned(),
        })
    }

    /// The plugin's directory: the module's directory, else the
    /// distribution's location, else `/`.
    pub fn plugin_dir(&self) -> PathBuf {
        self.module_dir
            .clone()
            .or_else(|| self.location.clone())
            .unwrap_or_else(|| PathBuf::from("/"))
    }

    /// Whether it is declared but its module was not found (its package
    /// directory removed, an upgrade half done): the discovery script's
    /// `ModuleNotFoundError`, not a value that is no `MODULE[:ATTR]` or a
    /// parent package that raised.
    pub fn module_not_found(&self) -> bool {
        !self.whole_distribution
            && self.module_dir.is_none()
            && self
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(MODULE_NOT_FOUND))
    }

    /// Whether `other` is the same declaration (name, value, distribution).
    pub fn same_declaration(&self, other: &EntryPoint) -> bool {
        self.name == other.name && self.value == other.value && self.dist == other.dist
    }

    /// Which of `found` (what the interpreter declares now) this entry
    /// point, a registered plugin's, is: the same declaration, else the
    /// one of its name and distribution whose value changed (an upgrade
    /// that moved the plugin's class) and that no other plugin is
    /// registered from (`taken`); `None` when there is none, or two such
    /// (which one it became is not known).
    pub fn now_among<'a>(
        &self,
        found: &'a [EntryPoint],
        taken: impl Fn(&EntryPoint) -> bool,
    ) -> Option<&'a EntryPoint> {
        found
            .iter()
            .find(|ep| ep.same_declaration(self))
            .or_else(|| {
                let mut moved = found.iter().filter(|ep| {
                    !ep.whole_distribution
                        && ep.name == self.name
                        && ep.dist == self.dist
                        && !taken(ep)
                });
                match (moved.next(), moved.next()) {
                    (Some(one), None) => Some(one),
                    _ => None,
                }
            })
    }

    /// `entry point 'my-plugin' (pkg.mod:Plugin) of mypkg 1.0 in /site/pkg`:
    /// where a plugin came from, for reasons and logs.
    /// A distribution's own failure ([`whole_distribution`](Self::whole_distribution))
    /// is `distribution mypkg`.
    pub fn describe(&self) -> String {
        if self.whole_distribution {
            return format!("distribution {}", self.dist.as_ref().unwrap_or(&self.name));
        }
        let mut text = format!("entry point '{}'", self.name);
        if !self.value.is_empty() {
            text.push_str(&format!(" ({})", self.value));
        }
        if let Some(dist) = &self.dist {
            text.push_str(&format!(" of {dist}"));
            if let Some(version) = &self.version {
                text.push_str(&format!(" {version}"));
            }
        }
        if let Some(dir) = &self.module_dir {
            text.push_str(&format!(" in {}", dir.display()));
        }
        text
    }
}

#[derive(Deserialize)]
struct Answer {
    entry_points: Vec<EntryPoint>,
    /// Distributions it could not read (at most 20, each cut to 1,024
    /// characters): logged, since a plugin they declare is not found.
    #[serde(default)]
    warnings: Vec<String>,
}

/// The entry points of group [`GROUP`] that `interpreter` sees, sorted by
/// name (then value and distribution), with [`DISCOVERY_TIMEOUT`].
///
/// # Errors
///
/// The interpreter could not answer: it does not start, fails, runs past
/// the timeout (it is killed, with its process group) or prints nonsense.
/// The message begins with the interpreter's path.
pub fn discover(interpreter: &Path) -> Result<Vec<EntryPoint>, String> {
    discover_with_timeout(interpreter, DISCOVERY_TIMEOUT)
}

/// [`discover`] with another timeout.
///
/// # Errors
///
/// As [`discover`].
pub fn discover_with_timeout(
    interpreter: &Path,
    timeout: Duration,
) -> Result<Vec<EntryPoint>, String> {
    let out = forgesyte_deps::run_python(
        interpreter,
        // No user site directory, as the runners and the dependency check.
        &[
            std::ffi::OsStr::new("-s"),
            std::ffi::OsStr::new("-c"),
            std::ffi::OsStr::new(&format!(
                "{}{SCRIPT}",
                forgesyte_deps::python_version_gate()
            )),
        ],
        timeout,
    )?;
    let answer = forgesyte_deps::script_answer::<Answer>(interpreter, &out)?;
    for warning in &answer.warnings {
        tracing::warn!(interpreter = %interpreter.display(), "Entry points: {warning}");
    }
    let mut found = answer.entry_points;
    found.sort_by(|a, b| (&a.name, &a.value, &a.dist).cmp(&(&b.name, &b.value, &b.dist)));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(value: &str, module: Option<&str>, attr: Option<&str>) -> EntryPoint {
        EntryPoint {
            name: "p".into(),
            value: value.into(),
            module: module.map(str::to_owned),
            attr: attr.map(str::to_owned),
            dist: Some("pkg".into()),
            version: Some("1.0".into()),
            module_dir: None,
            origin: None,
            owns_dir: false,
            location: Some("/site".into()),
            has_manifest: false,
            error: None,
            whole_distribution: false,
        }
    }

    #[test]
    fn target_dir_and_description() {
        let a = ep("pkg.mod:Plugin [gpu]", Some("pkg.mod"), Some("Plugin"));
        assert_eq!(a.target().as_deref(), Some("pkg.mod:Plugin"));
        assert_eq!(a.plugin_dir(), PathBuf::from("/site"));
        assert_eq!(
            a.describe(),
            "entry point 'p' (pkg.mod:Plugin [gpu]) of pkg 1.0"
        );
        let b = ep("pkg.mod", Some("pkg.mod"), None);
        assert_eq!(b.target().as_deref(), Some("pkg.mod"));
        assert!(!a.same_declaration(&b));
        assert!(a.same_declaration(&a.clone()));
        let c = EntryPoint {
            location: None,
            ..ep("not a value", None, None)
        };
        assert_eq!(c.target(), None);
        assert_eq!(c.plugin_dir(), PathBuf::from("/"));
        // An entry point declared with no value is still that entry point;
        // a distribution's own failure is the distribution.
        assert_eq!(ep("", None, None).describe(), "entry point 'p' of pkg 1.0");
        let whole = EntryPoint {
            whole_distribution: true,
            ..ep("", None, None)
        };
        assert_eq!(whole.describe(), "distribution pkg");
    }

    #[test]
    fn a_missing_interpreter_is_named() {
        let err = discover(Path::new("/nonexistent/python3")).unwrap_err();
        assert!(
            err.starts_with("/nonexistent/python3: cannot start"),
            "{err}"
        );
    }
}
