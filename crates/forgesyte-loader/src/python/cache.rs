//! How the interpreter is handed the runner package: from a private cache
//! directory when one is usable, so the interpreter compiles the runner
//! once and later starts load its bytecode from `__pycache__`; else from
//! its sources carried in the code on the command line (`-c`), compiled at
//! every start.
//!
//! Compiling the runner costs about 25 ms of CPU per interpreter start
//! (measured with `compile()` on this machine), which is a good part of a
//! Python plugin's start-up. The cache directory is
//! `$XDG_CACHE_HOME/forgesyte/python` (else `~/.cache/forgesyte/python`),
//! created `0700`, and used only when it is a directory owned by this user
//! that nobody else can write to, under directories nobody else can change
//! (root's or this user's; writable by others only when sticky, as `/tmp`); the package's files in it are checked
//! against the ones this binary ships before each interpreter start, and
//! rewritten when they differ or are gone.

use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::RUNNER_MODULES;

/// `-s -u` as one argument: no user site directory (`~/.local`,
/// `PYTHONUSERBASE`), as in the dependency check and the entry-point
/// discovery (`forgesyte_deps`'s `-s`), so a package is found by all three
/// or by none; and unbuffered output.
const USER_SITE_OFF_UNBUFFERED: &str = "-su";

/// The interpreter arguments that start the runner (its own arguments
/// follow): `-su -c CODE`, CODE importing the cached runner package or
/// carrying its sources.
pub fn runner_invocation() -> [OsString; 3] {
    // Checked (and rewritten where it differs) at every interpreter start,
    // a zygote's or a runner's: a cache that a cleaner removed, or whose
    // sources were changed, since the last start is written again, not
    // imported as it is (a few small reads). Its bytecode (`__pycache__`)
    // is not checked: Python takes it while its header matches the
    // source's time and size, and checking it would cost the compile the
    // cache saves; one the import fails on (cut short by a full disk) is
    // dropped then (`bootstrap`). Only this user writes the private
    // directory, and no confined runner may (Landlock).
    let code = cache_dir()
        .and_then(|dir| bootstrap(&dir).map_err(|e| format!("{}: {e}", dir.display())))
        .unwrap_or_else(|why| {
            // Said once at INFO (each interpreter then compiles the runner,
            // about 25 ms of CPU: a full or read-only cache went unseen),
            // then at debug level.
            static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::debug!("the Python runner is not cached ({why}): run from source");
            } else {
                tracing::info!("The Python runner cannot be cached ({why}): every interpreter compiles it from its source (about 25 ms of CPU each); give the server a writable cache directory (XDG_CACHE_HOME) to save that");
            }
            source_code().to_owned()
        });
    // Unbuffered, so print() from a plugin reaches the log now; no user
    // site directory (see `USER_SITE_OFF_UNBUFFERED`).
    [USER_SITE_OFF_UNBUFFERED.into(), "-c".into(), code.into()]
}

/// The interpreter's arguments that run the runner from its sources,
/// without the cache: for runners that run as another user
/// (`--runner-user`), who cannot read this user's private cache.
pub fn runner_source_invocation() -> [OsString; 3] {
    [
        USER_SITE_OFF_UNBUFFERED.into(),
        "-c".into(),
        source_code().into(),
    ]
}

/// The name the runner package is imported under from its sources.
const SOURCE_PACKAGE: &str = "_forgesyte_runner";
/// What the runner's module files are named from its sources:
/// `<forgesyte_runner/NAME.py>`.
const SOURCE_FILE_PREFIX: &str = "<forgesyte_runner/";
/// The cached package's directory: `forgesyte_runner_HASH` (16 hex digits).
const CACHED_PACKAGE_PREFIX: &str = "forgesyte_runner_";

/// Whether `path` (a traceback frame's file) is one of the runner's own
/// modules: in its cached package ([`module_name`]), or run from its
/// sources ([`SOURCE_FILE_PREFIX`]).
pub(crate) fn is_runner_file(path: &str) -> bool {
    if path.starts_with(SOURCE_FILE_PREFIX) {
        return true;
    }
    Path::new(path)
        .parent()
        .and_then(|dir| dir.file_name())
        .and_then(|name| name.to_str())
        .and_then(|name| name.strip_prefix(CACHED_PACKAGE_PREFIX))
        .is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Code that imports the runner package from its sources, which it
/// carries, and starts it: a finder on `sys.meta_path` serves the
/// package's modules (named `<forgesyte_runner/NAME.py>` in tracebacks,
/// which the runner leaves out of a plugin's) while the package is
/// imported, which imports all of them at once. The sources travel as one
/// JSON object (module -> source), zlib-compressed and in base64: about a
/// third of their size, since one `execve` argument holds at most 128 KiB.
/// Their comment lines are left empty ([`without_comment_lines`]), and so
/// are their docstrings ([`without_docstrings`]).
fn source_code() -> &'static str {
    use base64::Engine as _;
    static CODE: OnceLock<String> = OnceLock::new();
    CODE.get_or_init(|| {
        let sources: serde_json::Map<String, serde_json::Value> = RUNNER_MODULES
            .iter()
            .map(|(file, source)| {
                let module = file.strip_suffix(".py").unwrap_or(file);
                (
                    module.to_owned(),
                    serde_json::Value::from(without_docstrings(&without_comment_lines(source))),
                )
            })
            .collect();
        let json = serde_json::Value::Object(sources).to_string();
        let packed = base64::engine::general_purpose::STANDARD.encode(
            miniz_oxide::deflate::compress_to_vec_zlib(json.as_bytes(), 9),
        );
        let gate = forgesyte_deps::python_version_gate();
        format!(
            r#"{gate}def _load(packed, name={SOURCE_PACKAGE:?}):
    import base64, importlib.util, json, zlib

    sources = json.loads(zlib.decompress(base64.b64decode(packed)))

    class Finder(object):
        def find_spec(self, fullname, path=None, target=None):
            short = "__init__" if fullname == name else fullname[len(name) + 1:]
            if fullname != name and (not fullname.startswith(name + ".") or short not in sources):
                return None
            return importlib.util.spec_from_loader(fullname, self, is_package=short == "__init__")

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            short = "__init__" if module.__name__ == name else module.__name__[len(name) + 1:]
            exec(compile(sources[short], "{SOURCE_FILE_PREFIX}%s.py>" % short, "exec"), module.__dict__)

    finder = Finder()
    sys.meta_path.insert(0, finder)
    try:
        return __import__(name)
    finally:
        # Every module is imported by now: plugins' imports need not ask.
        sys.meta_path.remove(finder)
_load("{packed}").start(sys.argv[1:])
"#
        )
    })
}

/// `source` with each line whose first character past its indentation is
/// `#` left empty: the lines keep their numbers (a traceback's stay
/// right), and the carried code is a sixth smaller. Sound while no string
/// of the runner holds a line that starts so: a test asks Python's own
/// tokenizer.
fn without_comment_lines(source: &str) -> String {
    source
        .split_inclusive('\n')
        .map(|line| match line.trim_start().starts_with('#') {
            true if line.ends_with('\n') => "\n",
            true => "",
            false => line,
        })
        .collect()
}

/// `source` with its docstrings (a module's, and each class's and
/// function's whose header is one line, written `"""`) emptied, its line
/// numbers kept: a docstring's first line becomes `""` (a body of only a
/// docstring stays a body), its other lines are left empty. Run after
/// [`without_comment_lines`]: empty lines between a header and its
/// docstring are passed over.
fn without_docstrings(source: &str) -> String {
    const QUOTES: &str = "\"\"\"";
    let mut out = String::with_capacity(source.len());
    // At the module's start, or right after a `def` or `class` line.
    let mut header = true;
    let mut in_docstring = false;
    for line in source.split_inclusive('\n') {
        let newline = if line.ends_with('\n') { "\n" } else { "" };
        let text = line.trim_start();
        let code = text.trim_end();
        if in_docstring {
            in_docstring = !code.contains(QUOTES);
            out.push_str(newline);
        } else if code.is_empty() {
            out.push_str(line);
        } else if header && let Some(rest) = code.strip_prefix(QUOTES) {
            out.push_str(&line[..line.len() - text.len()]);
            out.push_str("\"\"");
            out.push_str(newline);
            in_docstring = !rest.contains(QUOTES);
            header = false;
        } else {
            header = ["def ", "async def ", "class "]
                .iter()
                .any(|start| code.starts_with(start))
                && code.ends_with(':');
            out.push_str(line);
        }
    }
    out
}

/// The cache directory, if this user has one.
fn cache_dir() -> Result<PathBuf, String> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").ok_or("no HOME")?).join(".cache"),
    };
    if !base.is_absolute() {
        return Err(format!("{} is not absolute", base.display()));
    }
    Ok(base.join("forgesyte").join("python"))
}

/// Creates `dir` (`0700`) when it is not there, and checks that it is a
/// directory of this user's that only it can write to.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir()
        || meta.uid() != rustix::process::geteuid().as_raw()
        || meta.mode() & 0o022 != 0
    {
        return Err(std::io::Error::other(
            "not a directory of this user's that only it can write to",
        ));
    }
    Ok(())
}

/// Checks that no directory above `dir` lets another user swap what lies
/// under it: each is root's or this user's, and writable by others only
/// with the sticky bit (`/tmp`), where nobody may rename another's entries.
/// (`XDG_CACHE_HOME=/srv/shared/cache`, in a directory another user may
/// write to, would let that user put their own package in the cache's
/// place after it was checked.)
///
/// Both the directories named and those the names lead to are checked: a
/// link among them (`~/.cache` → `/data/shared/u-cache`) puts the cache
/// under its target's directories.
fn safe_ancestors(dir: &Path) -> std::io::Result<()> {
    let me = rustix::process::geteuid().as_raw();
    let mut ancestors: Vec<PathBuf> = dir.ancestors().skip(1).map(Path::to_path_buf).collect();
    // The nearest that is there, resolved: it (unless it is `dir`, which
    // `private_dir` checks through its link) and the directories above it,
    // when a link made them others than those named (this runs at every
    // interpreter start).
    if let Some(there) = dir.ancestors().find(|a| a.exists()) {
        let real = there.canonicalize()?;
        if real != there {
            let skip = usize::from(there == dir);
            ancestors.extend(real.ancestors().skip(skip).map(Path::to_path_buf));
        }
    }
    for ancestor in &ancestors {
        let meta = match std::fs::metadata(ancestor) {
            Ok(meta) => meta,
            // Not there yet: `private_dir` makes it, as this user's.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let owner_ok = meta.uid() == me || meta.uid() == 0;
        let others_write = meta.mode() & 0o022 != 0;
        let sticky = meta.mode() & 0o1000 != 0;
        if !owner_ok || (others_write && !sticky) {
            return Err(std::io::Error::other(format!(
                "{} may be changed by another user",
                ancestor.display()
            )));
        }
    }
    Ok(())
}

/// Writes the runner package into `dir` (the files that are not there
/// already, or differ) and returns the code that imports it and starts it.
fn bootstrap(dir: &Path) -> std::io::Result<String> {
    safe_ancestors(dir)?;
    private_dir(dir)?;
    let module = module_name();
    let package = dir.join(&module);
    private_dir(&package)?;
    for (file, source) in RUNNER_MODULES {
        let path = package.join(file);
        if std::fs::read(&path).ok().as_deref() == Some(source.as_bytes()) {
            continue;
        }
        // One temporary file per writer: starts on several threads may
        // write the cache at once.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temp = package.join(format!("{file}.{}.{n}.tmp", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, source.as_bytes()))
            .and_then(|()| std::fs::rename(&temp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
    }
    // The directory as a Python string literal (a JSON string is one).
    let dir = dir
        .to_str()
        .and_then(|d| serde_json::to_string(d).ok())
        .ok_or_else(|| std::io::Error::other("the path is not UTF-8"))?;
    // The bytecode is written even under PYTHONDONTWRITEBYTECODE (which
    // still holds for everything else, plugins included): the cache is
    // this directory's whole point. The package imports all its modules
    // at once, so all of them are compiled here.
    // A bytecode file cut short (the disk was full as Python wrote it:
    // it ignores a short write, and the file's header still matches its
    // source) failed every start after, until someone removed the cache:
    // then the package's bytecode goes, and it is imported from its
    // sources, not written again.
    let gate = forgesyte_deps::python_version_gate();
    Ok(format!(
        "{gate}w = sys.dont_write_bytecode; sys.dont_write_bytecode = False\n\
         sys.path.insert(0, {dir})\n\
         try:\n    import {module} as r\n\
         except (EOFError, ValueError, TypeError):\n    \
         import os, shutil\n    \
         for m in [m for m in sys.modules if m.split('.')[0] == '{module}']: del sys.modules[m]\n    \
         shutil.rmtree(os.path.join({dir}, '{module}', '__pycache__'), ignore_errors=True)\n    \
         sys.dont_write_bytecode = True\n    import {module} as r\n\
         del sys.path[0]; sys.dont_write_bytecode = w; del w; r.start(sys.argv[1:])"
    ))
}

/// `forgesyte_runner_HASH`: one name per runner package, so binaries of
/// different versions sharing the cache do not rewrite each other's.
fn module_name() -> String {
    let mut hasher = std::hash::DefaultHasher::new();
    RUNNER_MODULES.hash(&mut hasher);
    format!("{CACHED_PACKAGE_PREFIX}{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runner_is_written_once_and_rewritten_when_it_differs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("forgesyte/python");
        let code = bootstrap(&dir).unwrap();
        let package = dir.join(module_name());
        for (file, source) in RUNNER_MODULES {
            assert_eq!(
                &std::fs::read_to_string(package.join(file)).unwrap(),
                source
            );
        }
        assert!(code.contains(&module_name()), "{code}");
        assert!(
            code.contains(&format!("{:?}", dir.display().to_string())),
            "{code}"
        );
        for private in [&dir, &package] {
            assert_eq!(
                std::fs::metadata(private).unwrap().mode() & 0o777,
                0o700,
                "{} is private",
                private.display()
            );
        }
        let (file, source) = RUNNER_MODULES[1];
        std::fs::write(package.join(file), "tampered").unwrap();
        bootstrap(&dir).unwrap();
        assert_eq!(
            &std::fs::read_to_string(package.join(file)).unwrap(),
            source
        );
    }

    /// A bytecode file cut short (a full disk as Python wrote it) is
    /// dropped and the runner imported from its sources: every start
    /// failed with "marshal data too short" until the cache was removed.
    #[test]
    fn a_bytecode_file_cut_short_is_dropped_and_the_runner_starts() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("forgesyte/python");
        let code = bootstrap(&dir).unwrap();
        // A runner's command line it refuses after the import: its exit
        // code says the import went through.
        let start = || {
            std::process::Command::new("python3")
                .args(["-su", "-c", &code, "--protocol-fd", "x"])
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        };
        let first = start();
        let pycache = dir.join(module_name()).join("__pycache__");
        let mut cut = 0;
        for entry in std::fs::read_dir(&pycache).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            cut += 1;
        }
        assert!(cut > 3, "{cut} bytecode files");
        let again = start();
        let said = String::from_utf8_lossy(&again.stderr);
        assert_eq!(again.status.code(), first.status.code(), "{said}");
        assert!(!said.contains("marshal"), "{said}");
        // Imported from its sources: no bytecode written again.
        assert!(!pycache.exists() || std::fs::read_dir(&pycache).unwrap().next().is_none());
    }

    #[test]
    fn a_directory_others_can_write_to_is_not_used() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(bootstrap(&dir).is_err());
        assert!(!dir.join(module_name()).exists());
        // Nor one under a directory others may write to (no sticky bit).
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let under = open.join("cache/forgesyte/python");
        assert!(bootstrap(&under).is_err());
        assert!(!under.exists());
        // With the sticky bit (as /tmp), nobody renames another's entries.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        bootstrap(&under).unwrap();
        // Nor one whose name leads through a link to under such a
        // directory (`~/.cache` a link into a shared directory).
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let target = open.join("u-cache");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
        let home = tmp.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::symlink(&target, home.join(".cache")).unwrap();
        for linked in [home.join(".cache"), home.join(".cache/forgesyte/python")] {
            let refused = bootstrap(&linked);
            assert!(refused.is_err(), "{}", linked.display());
        }
        assert!(!target.join("forgesyte").exists());
        // Nor a package directory others can write to in a private cache.
        let dir = tmp.path().join("private");
        bootstrap(&dir).unwrap();
        let package = dir.join(module_name());
        std::fs::set_permissions(&package, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(bootstrap(&dir).is_err());
    }

    /// What `python3 -c check` prints, given `input` on its stdin (it must
    /// succeed).
    fn python_says(check: &str, input: serde_json::Value) -> String {
        use std::io::Write as _;
        let mut python = std::process::Command::new("python3")
            .args(["-c", check])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        python
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        let out = python.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every line [`without_comment_lines`] empties is a comment by
    /// Python's tokenizer, none a line of a string.
    #[test]
    fn only_comments_are_left_out_of_the_carried_sources() {
        let sample = "x = 1\n    # indented\ny = '''\n# in a string\n'''\n";
        let sources: serde_json::Map<String, serde_json::Value> = RUNNER_MODULES
            .iter()
            .map(|(file, source)| ((*file).to_owned(), (*source).into()))
            .chain([("sample.py".to_owned(), sample.into())])
            .collect();
        let check = r##"
import io, json, sys, tokenize
for name, text in json.load(sys.stdin).items():
    lines = text.split("\n")
    comments = {t.start[0] - 1 for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type == tokenize.COMMENT and lines[t.start[0] - 1].strip().startswith("#")}
    starting = {i for i, line in enumerate(lines) if line.strip().startswith("#")}
    for i in sorted(starting - comments):
        print("%s:%d: %s" % (name, i + 1, lines[i]))
"##;
        let out = python_says(check, serde_json::Value::Object(sources));
        // Only the sample's line in a string: the check sees one.
        assert_eq!(
            out, "sample.py:4: # in a string\n",
            "lines in strings that start with '#' would be emptied"
        );
        assert_eq!(
            without_comment_lines("a = 1  # kept\n  # gone\n#gone\nb"),
            "a = 1  # kept\n\n\nb"
        );
    }

    /// What [`without_docstrings`] empties of each runner module is its
    /// docstrings, by Python's own parser: the carried source compiles,
    /// keeps its line count, differs only inside docstrings, and has none.
    #[test]
    fn only_docstrings_are_emptied_and_the_sources_still_compile() {
        let sample = "\"\"\"Module.\n\nMore.\"\"\"\nimport os\n\n\nclass A:\n    \"\"\"Only a docstring.\"\"\"\n\n\n\
                      def f(x):\n\n    \"\"\"Two\n    lines.\"\"\"\n    return '''\n\"\"\"not one\"\"\"\n'''\n";
        let pairs: serde_json::Map<String, serde_json::Value> = RUNNER_MODULES
            .iter()
            .map(|(file, source)| ((*file).to_owned(), without_comment_lines(source)))
            .chain([("sample.py".to_owned(), sample.to_owned())])
            .map(|(name, text)| {
                let stripped = without_docstrings(&text);
                (name, serde_json::json!([text, stripped]))
            })
            .collect();
        let check = r##"
import ast, json, sys
def docstring_lines(tree):
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if ast.get_docstring(node, clean=False) is not None:
                first = node.body[0]
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines
for name, (text, stripped) in json.load(sys.stdin).items():
    before, after = text.split("\n"), stripped.split("\n")
    if len(before) != len(after):
        print("%s: %d lines, then %d" % (name, len(before), len(after)))
        continue
    inside = docstring_lines(ast.parse(text))
    for i, (a, b) in enumerate(zip(before, after)):
        if a != b and i + 1 not in inside:
            print("%s:%d: %s" % (name, i + 1, a))
    tree = ast.parse(stripped)
    compile(stripped, name, "exec")
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and ast.get_docstring(n, clean=False):
            print("%s:%s: a docstring left" % (name, getattr(n, "lineno", 0)))
"##;
        let out = python_says(check, serde_json::Value::Object(pairs));
        assert_eq!(out, "");
        assert_eq!(
            without_docstrings(sample),
            "\"\"\n\n\nimport os\n\n\nclass A:\n    \"\"\n\n\n\
             def f(x):\n\n    \"\"\n\n    return '''\n\"\"\"not one\"\"\"\n'''\n"
        );
    }

    /// The names the runner's modules get, cached or from sources, are the
    /// ones [`is_runner_file`] knows (a timeout's stack dump is read by it).
    #[test]
    fn the_runners_own_file_names_are_recognised() {
        let cached = format!("/home/u/.cache/forgesyte/python/{}/serve.py", module_name());
        assert!(is_runner_file(&cached), "{cached}");
        assert!(source_code().contains(&format!("\"{SOURCE_FILE_PREFIX}%s.py>\"")));
        assert!(is_runner_file("<forgesyte_runner/serve.py>"));
        assert!(!is_runner_file("/plugins/forgesyte_runner_x/plugin.py"));
    }

    /// Linux refuses an `execve` argument over 32 pages (`MAX_ARG_STRLEN`).
    /// (That the code runs is tested by the conformance suite and by
    /// `test_runner.py`'s `SourceModeTests`.)
    #[test]
    fn the_source_code_fits_in_one_command_line_argument() {
        const MAX_ARG_STRLEN: usize = 32 * 4096;
        let code = source_code();
        let sources: usize = RUNNER_MODULES.iter().map(|(_, s)| s.len()).sum();
        assert!(
            code.len() < MAX_ARG_STRLEN / 2 && code.len() < sources / 2,
            "the code carrying the runner's {sources} bytes of sources takes {} bytes \
             of the {MAX_ARG_STRLEN} one argument may hold",
            code.len()
        );
    }
}
