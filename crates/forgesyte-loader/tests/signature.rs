//! Signed plugins at load, through the real pipeline: a file swapped
//! between the signature check and the load is caught, and an in-process
//! library is loaded from the very bytes that were checked.
//!
//! The swap is made by a filesystem seam over the real one that replaces
//! a file on disk right after the loader's N-th read of it, so the moment
//! is exact rather than raced.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use forgesyte_deps::fake::FakeGpu;
use forgesyte_deps::{DependencyChecker, DirEntry, FileSystem, FsMetadata, RealFs};
use forgesyte_loader::native::NativeImporter;
use forgesyte_loader::signature::{SignatureState, TrustedKeys, keys, sign_dir};
use forgesyte_loader::{Loader, LoaderConfig};
use forgesyte_registry::{PluginLifecycleState as S, PluginStatus, Registry};

/// The real filesystem, except that right after read number `after` of
/// `path`, `path` is replaced (renamed over) by a file holding `with`.
#[derive(Debug)]
struct SwapFs {
    path: PathBuf,
    with: Vec<u8>,
    after: usize,
    reads: AtomicUsize,
}

impl SwapFs {
    /// Replaces `path` by `with` right after the loader's read number `after`.
    fn new(path: PathBuf, with: &[u8], after: usize) -> Self {
        SwapFs {
            path,
            with: with.to_vec(),
            after,
            reads: AtomicUsize::new(0),
        }
    }
}

impl FileSystem for SwapFs {
    fn exists(&self, path: &Path) -> bool {
        RealFs.exists(path)
    }
    fn metadata(&self, path: &Path) -> std::io::Result<FsMetadata> {
        RealFs.metadata(path)
    }
    fn read(&self, path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
        let bytes = RealFs.read(path, limit)?;
        if path == self.path && self.reads.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
            let tmp = path.with_extension("swap");
            std::fs::write(&tmp, &self.with)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(bytes)
    }
    fn read_dir(&self, path: &Path) -> std::io::Result<Vec<DirEntry>> {
        RealFs.read_dir(path)
    }
    fn canonicalize(&self, path: &Path) -> std::io::Result<PathBuf> {
        RealFs.canonicalize(path)
    }
}

/// A plugins directory with one plugin `name` made by `make`, signed by a
/// fresh key that the returned store trusts.
fn signed_plugin(
    name: &str,
    make: impl FnOnce(&Path),
) -> (tempfile::TempDir, PathBuf, TrustedKeys) {
    let tmp = tempfile::tempdir().unwrap();
    let keys_dir = tmp.path().join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let (key, _, _) = keys::keygen(&keys_dir, "author", None).unwrap();
    let plugins = tmp.path().join("plugins");
    let dir = plugins.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    make(&dir);
    let secret = keys::read_secret_key(&key, keys::Password::Unset).unwrap();
    sign_dir(&RealFs, &dir, &secret).unwrap();
    let trusted = TrustedKeys::load(&keys_dir).unwrap();
    (tmp, dir, trusted)
}

/// [`signed_plugin`]: a Python plugin `name` with `manifest` and a
/// `plugin.py` whose class has no tools.
fn signed_python_plugin(name: &str, manifest: &str) -> (tempfile::TempDir, PathBuf, TrustedKeys) {
    crate::python::require_python();
    signed_plugin(name, |dir| {
        std::fs::write(dir.join("manifest.json"), manifest).unwrap();
        std::fs::write(
            dir.join("plugin.py"),
            format!(
                "class Plugin:\n    name = '{name}'\n    tools = {{}}\n    def run_tool(self, tool, args):\n        return {{}}\n"
            ),
        )
        .unwrap();
    })
}

fn good_plugin(dir: &Path) {
    let library = Path::new(forgesyte_tests::zoo::GOOD_LIBRARY);
    let file = library.file_name().unwrap().to_str().unwrap();
    std::fs::copy(library, dir.join(file)).unwrap();
    let manifest = serde_json::json!({"name": "good", "version": "1.0.0", "entrypoint": file});
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
}

fn library_of(dir: &Path) -> PathBuf {
    dir.join(
        Path::new(forgesyte_tests::zoo::GOOD_LIBRARY)
            .file_name()
            .unwrap(),
    )
}

/// Loads the plugins directory that holds `dir` through `fs`: the loader,
/// and the status of plugin `name`.
fn load(fs: SwapFs, trusted: TrustedKeys, dir: &Path, name: &str) -> (Loader, PluginStatus) {
    let registry = Registry::new();
    let loader = loader(fs, trusted, &registry);
    loader.load_all(dir.parent().unwrap());
    let status = registry.get_status(name).unwrap();
    (loader, status)
}

fn loader(fs: SwapFs, trusted: TrustedKeys, registry: &Registry) -> Loader {
    let checker = DependencyChecker::builder()
        .gpu(Arc::new(FakeGpu::none(
            "no GPU on this test machine (CUDA absent)",
        )))
        .build();
    let config = LoaderConfig {
        trusted_keys: trusted,
        require_signed: true,
        ..LoaderConfig::default()
    };
    Loader::with_seams(
        registry.clone(),
        Arc::new(checker),
        Arc::new(fs),
        Arc::new(NativeImporter),
        config,
    )
}

#[test]
fn a_library_swapped_after_its_check_is_refused_before_it_is_opened() {
    let (_tmp, dir, trusted) = signed_plugin("good", good_plugin);
    let library = library_of(&dir);
    // The signature check is read 1; the load's read 2 sees the swap.
    let fs = SwapFs::new(library.clone(), b"\x7fELF not the signed library", 1);
    let (_loader, status) = load(fs, trusted, &dir, "good");
    assert_eq!(status.state, S::Failed, "{status:?}");
    let file = library.file_name().unwrap().to_string_lossy();
    let reason = status.reason.unwrap();
    assert!(
        reason.starts_with(&format!(
            "IntegrityError: {file} changed between its check and its load: sha256 now "
        )),
        "{reason}"
    );
    // The signature was fine when it was checked; what is on disk now is
    // not what was signed, and the status says so, naming the file.
    let signature = status.signature.unwrap();
    assert_eq!(signature.status, SignatureState::Modified, "{signature:?}");
    assert!(signature.key_id.is_some(), "{signature:?}");
    assert_eq!(
        signature.detail.as_deref(),
        Some(format!("{file} changed after the signature was checked").as_str())
    );
}

#[test]
fn a_library_swapped_after_it_was_read_does_not_matter_the_checked_bytes_run() {
    let (_tmp, dir, trusted) = signed_plugin("good", good_plugin);
    let library = library_of(&dir);
    // Swapped right after the load's own read (read 2): what runs is what
    // was read and checked, not what is on disk now.
    let fs = SwapFs::new(library.clone(), b"garbage that dlopen would refuse", 2);
    let (loader, status) = load(fs, trusted, &dir, "good");
    assert_eq!(status.state, S::Initialized, "{status:?}");
    assert_eq!(
        std::fs::read(&library).unwrap(),
        b"garbage that dlopen would refuse"
    );
    let answer = loader
        .handle("good")
        .unwrap()
        .call("echo", &serde_json::json!({"x": 1}))
        .unwrap();
    assert_eq!(answer, serde_json::json!({"x": 1}));
}

/// A signature covers the manifest the load parsed. The load reads the
/// manifest before it checks the signature: one that asked for the network
/// when the load read it, and was put back to the signed one before the
/// check, gets nothing (the plugin is FAILED) rather than the network.
#[test]
fn a_manifest_that_widened_its_sandbox_until_the_signature_check_is_refused() {
    let narrow = r#"{"name": "wide", "runtime": "python"}"#;
    let (_tmp, dir, trusted) = signed_python_plugin("wide", narrow);
    // On disk until the load's first read: the same manifest asking for
    // the network; then the signed one again.
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"name": "wide", "runtime": "python", "network": true}"#,
    )
    .unwrap();
    let fs = SwapFs::new(manifest, narrow.as_bytes(), 1);
    let (_loader, status) = load(fs, trusted, &dir, "wide");
    assert_eq!(status.state, S::Failed, "{status:?}");
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.starts_with(
            "IntegrityError: manifest.json changed between its check and its load: the load parsed sha256 "
        ),
        "{reason}"
    );
}

#[test]
fn a_python_source_swapped_before_its_runner_starts_is_caught_and_never_runs() {
    let (_tmp, dir, trusted) = signed_python_plugin(
        "swapped",
        r#"{"name": "swapped", "runtime": "python", "filesystem": {"write": ["."]}}"#,
    );
    let source = dir.join("plugin.py");
    let evil = "import pathlib\npathlib.Path(__file__).with_name('ran').write_text('x')\n\
                class Plugin:\n    name = 'swapped'\n    tools = {}\n    def run_tool(self, tool, args):\n        return {}\n";
    let fs = SwapFs::new(source.clone(), evil.as_bytes(), 1);
    let (loader, status) = load(fs, trusted, &dir, "swapped");
    assert_eq!(status.state, S::Failed, "{status:?}");
    let reason = status.reason.unwrap();
    assert!(
        reason.starts_with(
            "IntegrityError: plugin.py changed between its check and its load: sha256 now "
        ),
        "{reason}"
    );
    // The sources the runner is handed are hashed once more and held
    // against the signature: the swap is caught there, before any runner
    // starts, so the swapped code never ran (it used to run in the runner
    // before the re-check after its start caught it).
    assert!(!dir.join("ran").exists(), "the swapped code ran");
    assert!(loader.handle("swapped").is_none());
    assert_eq!(
        status.signature.unwrap().status,
        SignatureState::Modified,
        "a signature that no longer holds for the files still read signed"
    );
}
