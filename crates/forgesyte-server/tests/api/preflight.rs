//! The build fingerprint check before `dlopen`, over real libraries: a copy
//! of the zoo's good library whose `.forgesyte_abi` record is patched is
//! refused with a precise `ImportError`, and is never opened (its path never
//! shows up in this process's memory maps). Unpatched copies, and copies
//! that differ only in compiler or SDK version, load.

use std::path::{Path, PathBuf};

use forgesyte_errors::ImportError;
use forgesyte_loader::native::{self, NativeLibrary};
use forgesyte_server::{ServerConfig, check};
use serde_json::{Value, json};

use crate::support::PluginsDir;

/// The record's magic and format (see `forgesyte_plugin_sdk::fingerprint`).
const MAGIC: &[u8] = b"FORGESYTE-FP\x01\x00\x00\x00";
const RECORD_LEN: usize = 512;
const JSON_AT: usize = 16;

/// Where the fingerprint record lies in `bytes`.
fn record_offset(bytes: &[u8]) -> usize {
    let at = bytes
        .windows(MAGIC.len())
        .position(|w| w == MAGIC)
        .expect("the good library carries a fingerprint record");
    assert_eq!(
        bytes[at + MAGIC.len()..]
            .windows(MAGIC.len())
            .position(|w| w == MAGIC),
        None,
        "exactly one record"
    );
    at
}

/// The record's JSON in the library at `path`.
fn read_record(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap();
    let at = record_offset(&bytes);
    let json = &bytes[at + JSON_AT..at + RECORD_LEN];
    let end = json.iter().position(|&b| b == 0).unwrap();
    serde_json::from_slice(&json[..end]).unwrap()
}

/// Rewrites the record's JSON part of the library at `path` in place.
fn patch_record(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = record_offset(&bytes);
    let mut record = read_record(path);
    edit(&mut record);
    let text = serde_json::to_vec(&record).unwrap();
    let area = &mut bytes[at + JSON_AT..at + RECORD_LEN];
    assert!(text.len() < area.len());
    area.fill(0);
    area[..text.len()].copy_from_slice(&text);
    std::fs::write(path, bytes).unwrap();
}

/// Whether `path` is mapped into this process (that is, was `dlopen`ed).
fn is_mapped(path: &Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let canonical = path.canonicalize().unwrap();
    maps.lines()
        .any(|line| line.ends_with(canonical.to_str().unwrap()))
}

/// A copy of the good library under a name of its own, in `dir`.
fn copy_of_good(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("lib{name}.so"));
    std::fs::copy(forgesyte_tests::zoo::GOOD_LIBRARY, &path).unwrap();
    path
}

#[test]
fn the_good_library_carries_this_builds_fingerprint() {
    let record = read_record(Path::new(forgesyte_tests::zoo::GOOD_LIBRARY));
    assert_eq!(record["abi_version"], 3);
    for key in ["sdk_version", "rustc_version", "target"] {
        assert!(
            record[key].as_str().is_some_and(|s| !s.is_empty()),
            "{record}"
        );
    }
    let fingerprint = native::inspect(Path::new(forgesyte_tests::zoo::GOOD_LIBRARY))
        .unwrap()
        .expect("a fingerprint");
    assert_eq!(fingerprint.abi_version, 3);
    assert_eq!(json!(fingerprint.target), record["target"]);
}

#[test]
fn a_foreign_abi_version_is_refused_without_opening_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of_good(dir.path(), "foreign_abi");
    patch_record(&path, |r| r["abi_version"] = json!(7));

    let err = NativeLibrary::open(&path).unwrap_err();
    assert!(
        matches!(&err, ImportError::AbiMismatch { host: 3, plugin: 7, path: p } if p == &path),
        "{err}"
    );
    assert!(!is_mapped(&path), "the library was opened");
    let err = native::inspect(&path).unwrap_err();
    assert!(matches!(err, ImportError::AbiMismatch { .. }), "{err}");
    assert!(!is_mapped(&path));
}

#[test]
fn a_foreign_target_is_refused_without_opening_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of_good(dir.path(), "foreign_target");
    let host_target = read_record(&path)["target"].as_str().unwrap().to_owned();
    patch_record(&path, |r| {
        r["target"] = json!("riscv64gc-unknown-linux-musl")
    });

    let err = NativeLibrary::open(&path).unwrap_err();
    assert!(matches!(err, ImportError::Incompatible { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("built for target 'riscv64gc-unknown-linux-musl'"),
        "{text}"
    );
    assert!(
        text.contains(&format!("this host is '{host_target}'")),
        "{text}"
    );
    assert!(!is_mapped(&path), "the library was opened");
}

#[test]
fn a_damaged_record_is_refused_without_opening_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of_good(dir.path(), "damaged_record");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = record_offset(&bytes);
    bytes[at + JSON_AT] = b'[';
    std::fs::write(&path, bytes).unwrap();

    let err = NativeLibrary::open(&path).unwrap_err();
    assert!(matches!(err, ImportError::InvalidInterface { .. }), "{err}");
    assert!(
        err.to_string().contains("damaged .forgesyte_abi section"),
        "{err}"
    );
    assert!(!is_mapped(&path), "the library was opened");
}

#[test]
fn another_compiler_or_sdk_version_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = copy_of_good(dir.path(), "other_rustc");
    patch_record(&path, |r| {
        r["rustc_version"] = json!("rustc 1.80.0 (an older one)");
        r["sdk_version"] = json!("0.0.9");
    });
    // The control: the check above can fail, since an opened library shows.
    assert!(!is_mapped(&path));
    let library = NativeLibrary::open(&path).unwrap();
    assert!(is_mapped(&path), "an opened library is in the maps");
    let fingerprint = library.fingerprint().expect("read before opening");
    assert_eq!(fingerprint.rustc_version, "rustc 1.80.0 (an older one)");
    assert_eq!(fingerprint.sdk_version, "0.0.9");
}

#[test]
fn the_loader_reports_a_foreign_fingerprint_as_an_import_error() {
    let plugins = PluginsDir::new();
    plugins.good("alien", json!({})).good("native", json!({}));
    let library = plugins.path().join("alien").join(
        Path::new(forgesyte_tests::zoo::GOOD_LIBRARY)
            .file_name()
            .unwrap(),
    );
    patch_record(&library, |r| r["abi_version"] = json!(2));

    let report = check(plugins.path(), &ServerConfig::default()).unwrap();
    let states: Vec<(&str, &str)> = report
        .plugins
        .iter()
        .map(|p| (p.name.as_str(), p.state.as_str()))
        .collect();
    assert_eq!(states, [("alien", "FAILED"), ("native", "INITIALIZED")]);
    let reason = report.plugins[0].reason.as_deref().unwrap();
    assert!(
        reason.starts_with("ImportError: ABI version mismatch: host speaks 3"),
        "{reason}"
    );
    assert!(reason.contains("speaks 2"), "{reason}");
    assert!(!is_mapped(&library), "the library was opened");
}
