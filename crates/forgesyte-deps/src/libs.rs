//! The shared-library seam and its real implementation, a file search with
//! `dlopen` as the last resort.

use std::collections::HashMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::dlopen;

/// Finds shared libraries the way the dynamic loader would.
pub trait LibraryProbe: Send + Sync + Debug {
    /// Where the library is, or `None`. `name` is a soname or file name
    /// (`libc.so.6`, `libfoo.so`), a short name (`c`, `z`, `ssl`) or an
    /// absolute path.
    fn find(&self, name: &str) -> Option<PathBuf>;

    /// Forgets whatever the probe cached (called at the start of a new load
    /// pass, so libraries installed since are found). Does nothing by default.
    fn refresh(&self) {}
}

/// Whether the file at `path` starts as an ELF object does.
fn is_elf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

/// The real library search.
///
/// In order: the extra search paths given to [`new`](Self::new), the
/// directories of `LD_LIBRARY_PATH`, the `ld.so` cache (`ldconfig -p`, read
/// once and cached), and the standard directories (`/lib`, `/usr/lib`,
/// `/lib64`, `/usr/lib64`, the multiarch directories, `/usr/local/lib`).
/// Only when none of them has the library does it ask the dynamic loader
/// (`dlopen` with `RTLD_LAZY | RTLD_LOCAL`), which runs the library's
/// initialisers; that last step can be turned off with
/// [`dlopen_fallback`](Self::dlopen_fallback), or made in a child process
/// with [`dlopen_in_child`](Self::dlopen_in_child), which a server does:
/// a manifest's `lib:` name must not run a library's initialisers (and
/// keep it mapped) in the server.
#[derive(Debug)]
pub struct SystemLibraries {
    extra: Vec<PathBuf>,
    dlopen_fallback: bool,
    /// The command that tries `dlopen` in a child (`None`: here).
    dlopen_child: Option<(PathBuf, Vec<std::ffi::OsString>)>,
    ld_cache: Mutex<Option<Arc<Vec<LdCacheEntry>>>>,
    listings: Mutex<HashMap<PathBuf, Arc<Vec<String>>>>,
    dlopen_attempts: AtomicU64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LdCacheEntry {
    soname: String,
    path: PathBuf,
}

impl SystemLibraries {
    /// A search that looks in `extra_search_paths` before the system's paths.
    pub fn new(extra_search_paths: Vec<PathBuf>) -> Self {
        SystemLibraries {
            extra: extra_search_paths,
            dlopen_fallback: true,
            dlopen_child: None,
            ld_cache: Mutex::new(None),
            listings: Mutex::new(HashMap::new()),
            dlopen_attempts: AtomicU64::new(0),
        }
    }

    /// Turns the `dlopen` last resort on (the default) or off.
    pub fn dlopen_fallback(mut self, enabled: bool) -> Self {
        self.dlopen_fallback = enabled;
        self
    }

    /// Makes the `dlopen` last resort in a child process: `program` with
    /// `args` and then the candidate names, which must run
    /// [`dlopen_first`] on those names and print its answer as JSON (the
    /// name that opened, or `null`), and nothing else, on stdout. A child
    /// that crashes or hangs (killed after 10 s) found nothing.
    pub fn dlopen_in_child(
        mut self,
        program: impl Into<PathBuf>,
        args: Vec<std::ffi::OsString>,
    ) -> Self {
        self.dlopen_child = Some((program.into(), args));
        self
    }

    /// How many times this search fell back to `dlopen`: in this process,
    /// one per candidate name tried; in a child, one per child.
    pub fn dlopen_attempts(&self) -> u64 {
        self.dlopen_attempts.load(Ordering::Relaxed)
    }

    /// Searches the files only, without the `dlopen` fallback.
    fn search_files(&self, name: &str, pattern: &Pattern) -> Option<PathBuf> {
        let ld_library_path: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
            .map(|v| std::env::split_paths(&v).collect())
            .unwrap_or_default();
        for dir in self
            .extra
            .iter()
            .chain(ld_library_path.iter())
            .filter(|d| !d.as_os_str().is_empty())
        {
            if let Some(found) = self.search_dir(dir, name, pattern) {
                return Some(found);
            }
        }
        if let Some(found) = self
            .ld_cache()
            .iter()
            .find(|e| pattern.matches(&e.soname) && e.path.is_file())
        {
            return Some(found.path.clone());
        }
        standard_dirs()
            .iter()
            .find_map(|dir| self.search_dir(dir, name, pattern))
    }

    fn search_dir(&self, dir: &Path, name: &str, pattern: &Pattern) -> Option<PathBuf> {
        match pattern {
            Pattern::Exact(_) => {
                let candidate = dir.join(name);
                candidate.is_file().then_some(candidate)
            }
            Pattern::Short(_) => self
                .listing(dir)
                .iter()
                .filter(|file| pattern.matches(file))
                .map(|file| dir.join(file))
                .find(|candidate| candidate.is_file()),
        }
    }

    /// The file names in `dir`, sorted, cached until [`refresh`](LibraryProbe::refresh).
    fn listing(&self, dir: &Path) -> Arc<Vec<String>> {
        if let Some(names) = self.listings.lock().get(dir) {
            return Arc::clone(names);
        }
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let names = Arc::new(names);
        self.listings
            .lock()
            .insert(dir.to_path_buf(), Arc::clone(&names));
        names
    }

    fn ld_cache(&self) -> Arc<Vec<LdCacheEntry>> {
        if let Some(cache) = self.ld_cache.lock().as_ref() {
            return Arc::clone(cache);
        }
        let cache = Arc::new(read_ld_cache());
        *self.ld_cache.lock() = Some(Arc::clone(&cache));
        cache
    }
}

impl Default for SystemLibraries {
    fn default() -> Self {
        SystemLibraries::new(Vec::new())
    }
}

impl LibraryProbe for SystemLibraries {
    fn find(&self, name: &str) -> Option<PathBuf> {
        if name.is_empty() || name.contains('\0') {
            return None;
        }
        if name.contains('/') {
            let path = PathBuf::from(name);
            // An ELF file, not any file (`lib:/etc/passwd` was met).
            return (path.is_absolute() && path.is_file() && is_elf(&path)).then_some(path);
        }
        let pattern = Pattern::new(name);
        if let Some(found) = self.search_files(name, &pattern) {
            tracing::debug!(library = name, path = %found.display(), "library found by file search");
            return Some(found);
        }
        if !self.dlopen_fallback {
            return None;
        }
        let candidates = pattern.dlopen_candidates();
        let opened = match &self.dlopen_child {
            None => candidates
                .iter()
                .find(|candidate| {
                    self.dlopen_attempts.fetch_add(1, Ordering::Relaxed);
                    dlopen::can_open(candidate)
                })
                .cloned(),
            Some((program, args)) => {
                self.dlopen_attempts.fetch_add(1, Ordering::Relaxed);
                dlopen_in_child(program, args, &candidates)
            }
        };
        opened.map(|candidate| {
            tracing::debug!(library = name, candidate, "library found by dlopen");
            PathBuf::from(candidate)
        })
    }

    fn refresh(&self) {
        *self.ld_cache.lock() = None;
        self.listings.lock().clear();
    }
}

/// The first of `candidates` the dynamic loader opens (kept open: see
/// `dlopen`), trying no more after it.
pub fn dlopen_first(candidates: &[String]) -> Option<String> {
    candidates.iter().find(|c| dlopen::can_open(c)).cloned()
}

/// [`dlopen_first`] in a child process (`program args CANDIDATES…`).
fn dlopen_in_child(
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    candidates: &[String],
) -> Option<String> {
    let mut command = std::process::Command::new(program);
    command.args(args).args(candidates);
    crate::die_with_parent_thread(&mut command);
    match crate::python::run_captured(
        command,
        "the library probe",
        std::time::Duration::from_secs(10),
    ) {
        Ok(out) => serde_json::from_slice::<Option<String>>(&out)
            .ok()
            .flatten()
            .filter(|opened| candidates.contains(opened)),
        Err(why) => {
            tracing::warn!(candidates = ?candidates, "cannot ask the dynamic loader for a library: {why}");
            None
        }
    }
}

/// Which file names answer a library name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// A file name or soname (`libc.so.6`, `foo.so`): that name only.
    Exact(String),
    /// A short name: `c` answers `libc.so` and `libc.so.*`; `libfoo` also
    /// answers `libfoo.so*`.
    Short(Vec<String>),
}

impl Pattern {
    fn new(name: &str) -> Self {
        if name.contains(".so") {
            return Pattern::Exact(name.to_string());
        }
        let mut stems = vec![format!("lib{name}.so")];
        if name.starts_with("lib") {
            stems.push(format!("{name}.so"));
        }
        Pattern::Short(stems)
    }

    fn matches(&self, file: &str) -> bool {
        match self {
            Pattern::Exact(name) => file == name,
            Pattern::Short(stems) => stems.iter().any(|stem| {
                file.strip_prefix(stem.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            }),
        }
    }

    fn dlopen_candidates(&self) -> Vec<String> {
        match self {
            Pattern::Exact(name) => vec![name.clone()],
            Pattern::Short(stems) => stems.clone(),
        }
    }
}

/// The standard library directories, most specific first.
fn standard_dirs() -> Vec<PathBuf> {
    let triple = match std::env::consts::ARCH {
        "x86" => "i386-linux-gnu".to_string(),
        "arm" => "arm-linux-gnueabihf".to_string(),
        arch => format!("{arch}-linux-gnu"),
    };
    [
        format!("/lib/{triple}"),
        format!("/usr/lib/{triple}"),
        "/lib64".to_string(),
        "/usr/lib64".to_string(),
        "/lib".to_string(),
        "/usr/lib".to_string(),
        "/usr/local/lib".to_string(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

/// Reads the `ld.so` cache through `ldconfig -p`; empty when there is no
/// `ldconfig` (musl) or it fails.
fn read_ld_cache() -> Vec<LdCacheEntry> {
    for ldconfig in ["/sbin/ldconfig", "/usr/sbin/ldconfig", "/usr/bin/ldconfig"] {
        if !Path::new(ldconfig).is_file() {
            continue;
        }
        match Command::new(ldconfig)
            .arg("-p")
            .env("LC_ALL", "C")
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {
                let entries = parse_ldconfig(&String::from_utf8_lossy(&out.stdout));
                tracing::debug!(ldconfig, entries = entries.len(), "read the ld.so cache");
                return entries;
            }
            Ok(out) => tracing::debug!(ldconfig, status = %out.status, "ldconfig -p failed"),
            Err(e) => tracing::debug!(ldconfig, error = %e, "cannot run ldconfig"),
        }
    }
    Vec::new()
}

/// Parses `ldconfig -p` output, keeping the entries for this machine's
/// word size and architecture (a 32-bit `libfoo` does not satisfy a 64-bit
/// host).
fn parse_ldconfig(text: &str) -> Vec<LdCacheEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, path) = line.trim().split_once(" => ")?;
            let (soname, flags) = left.split_once(" (")?;
            arch_matches(flags).then(|| LdCacheEntry {
                soname: soname.trim().to_string(),
                path: PathBuf::from(path.trim()),
            })
        })
        .collect()
}

fn arch_matches(flags: &str) -> bool {
    match std::env::consts::ARCH {
        "x86_64" => flags.contains("x86-64"),
        "aarch64" => flags.contains("AArch64"),
        "x86" | "arm" => !flags.contains("64"),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_sonames_and_short_names() {
        let c = Pattern::new("c");
        assert!(c.matches("libc.so"));
        assert!(c.matches("libc.so.6"));
        assert!(!c.matches("libcrypt.so.1"));
        assert!(!c.matches("libc.socket"));
        let libz = Pattern::new("libz");
        assert!(libz.matches("libz.so.1"));
        assert!(libz.matches("liblibz.so"));
        let exact = Pattern::new("libc.so.6");
        assert!(exact.matches("libc.so.6"));
        assert!(!exact.matches("libc.so"));
        assert_eq!(c.dlopen_candidates(), vec!["libc.so".to_string()]);
    }

    #[test]
    fn parses_ldconfig_output_for_this_arch() {
        let text = "3 libs found in cache `/etc/ld.so.cache'\n\
            \tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1\n\
            \tlibz.so.1 (libc6) => /lib/i386-linux-gnu/libz.so.1\n\
            \tlibfoo.so (libc6,AArch64) => /lib/aarch64-linux-gnu/libfoo.so\n\
            garbage line\n";
        let entries = parse_ldconfig(text);
        if std::env::consts::ARCH == "x86_64" {
            assert_eq!(
                entries,
                vec![LdCacheEntry {
                    soname: "libz.so.1".into(),
                    path: "/lib/x86_64-linux-gnu/libz.so.1".into()
                }]
            );
        }
        assert!(entries.iter().all(|e| !e.soname.contains(' ')));
    }

    #[test]
    fn finds_libc_without_dlopen() {
        let libs = SystemLibraries::default();
        for name in ["c", "libc.so.6"] {
            let path = libs
                .find(name)
                .unwrap_or_else(|| panic!("{name} not found"));
            assert!(path.is_absolute(), "{name}: {}", path.display());
        }
        assert_eq!(libs.dlopen_attempts(), 0);
    }

    #[test]
    fn extra_paths_come_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libforgesyte_fake.so.3"), b"not elf").unwrap();
        let libs = SystemLibraries::new(vec![dir.path().to_path_buf()]).dlopen_fallback(false);
        assert_eq!(
            libs.find("forgesyte_fake"),
            Some(dir.path().join("libforgesyte_fake.so.3"))
        );
        assert_eq!(
            libs.find("libforgesyte_fake.so.3"),
            Some(dir.path().join("libforgesyte_fake.so.3"))
        );
        // Cached listing until refresh.
        std::fs::write(dir.path().join("libforgesyte_new.so"), b"x").unwrap();
        assert_eq!(libs.find("forgesyte_new"), None);
        libs.refresh();
        assert_eq!(
            libs.find("forgesyte_new"),
            Some(dir.path().join("libforgesyte_new.so"))
        );
        assert_eq!(libs.dlopen_attempts(), 0);
    }

    /// The last resort in a child: the child's answer is taken (only as
    /// one of the names it was asked about), and a child that crashes or
    /// answers garbage found nothing; this process opens nothing.
    #[test]
    fn the_dlopen_last_resort_can_run_in_a_child() {
        let answering = |script: &str| {
            SystemLibraries::default()
                .dlopen_in_child("/bin/sh", vec!["-c".into(), script.into(), "sh".into()])
        };
        // The child is given the candidates as its arguments: it answers the
        // first (a stem of `libdefinitely_missing_xyz.so*`).
        let libs = answering(r#"printf '"%s"' "$1""#);
        let found = libs
            .find("definitely_missing_xyz")
            .map(|p| p.display().to_string());
        assert!(
            found
                .as_deref()
                .is_some_and(|f| f.starts_with("libdefinitely_missing_xyz")),
            "{found:?}"
        );
        assert_eq!(libs.dlopen_attempts(), 1);
        // Not a name it was asked about; garbage; a crash; none.
        for script in [
            r#"printf '"libc.so.6"'"#,
            "echo garbage",
            "kill -SEGV $$",
            "printf null",
        ] {
            assert_eq!(
                answering(script).find("definitely_missing_xyz"),
                None,
                "{script}"
            );
        }
    }

    #[test]
    fn missing_library_tries_dlopen_last_and_fails() {
        let libs = SystemLibraries::default();
        assert_eq!(libs.find("definitely_missing_xyz"), None);
        assert_eq!(libs.dlopen_attempts(), 1);
        let no_dlopen = SystemLibraries::default().dlopen_fallback(false);
        assert_eq!(no_dlopen.find("definitely_missing_xyz"), None);
        assert_eq!(no_dlopen.dlopen_attempts(), 0);
    }

    #[test]
    fn paths_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libx.so");
        std::fs::write(&lib, b"\x7fELF rest").unwrap();
        let libs = SystemLibraries::default().dlopen_fallback(false);
        assert_eq!(libs.find(lib.to_str().unwrap()), Some(lib.clone()));
        // A path is met by an ELF file only (`lib:/etc/passwd` was).
        let text = dir.path().join("passwd");
        std::fs::write(&text, b"root:x:0:0").unwrap();
        assert_eq!(libs.find(text.to_str().unwrap()), None);
        assert_eq!(libs.find("relative/libx.so"), None);
        assert_eq!(libs.find(""), None);
        assert_eq!(libs.find("a\0b"), None);
    }
}
