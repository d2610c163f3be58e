//! The fixture zoo is on disk: every fixture directory holds a manifest
//! naming a library file that is there. (How each one loads is the loader
//! tests' business.)

use std::path::Path;

use forgesyte_tests::zoo;

#[test]
fn every_fixture_has_a_manifest_and_its_library() {
    assert_eq!(
        Path::new(zoo::ZOO_DIR),
        Path::new(env!("FORGESYTE_ZOO_DIR"))
    );
    assert_eq!(zoo::ALL.len(), 19);
    for fixture in zoo::ALL {
        let dir = Path::new(fixture.dir);
        assert_eq!(dir.parent(), Some(Path::new(zoo::ZOO_DIR)), "{fixture:?}");
        let text = std::fs::read_to_string(dir.join("manifest.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", fixture.constant));
        let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(manifest["name"], fixture.name, "{fixture:?}");
        assert_eq!(manifest["entrypoint"], fixture.library, "{fixture:?}");
        let library = dir.join(fixture.library);
        let len = std::fs::metadata(&library)
            .unwrap_or_else(|e| panic!("{}: {e}", library.display()))
            .len();
        assert!(len > 0, "{} is empty", library.display());
    }
    let mut dirs: Vec<_> = std::fs::read_dir(zoo::ZOO_DIR)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    dirs.sort();
    let listed: Vec<_> = zoo::ALL
        .iter()
        .map(|f| Path::new(f.dir).to_path_buf())
        .collect();
    assert_eq!(dirs, listed, "the zoo holds exactly the listed fixtures");
}

#[test]
fn libraries_are_what_their_fixture_says() {
    const ELF_MAGIC: &[u8] = b"\x7fELF";
    let read = |dir: &str, file: &str| std::fs::read(Path::new(dir).join(file)).unwrap();
    let good = std::fs::read(zoo::GOOD_LIBRARY).unwrap();
    let library = |constant: &str| {
        let f = zoo::ALL.iter().find(|f| f.constant == constant).unwrap();
        read(f.dir, f.library)
    };
    assert!(good.len() > 4096);
    for constant in [
        "GOOD",
        "MISSING_LIB",
        "NEEDS_GPU",
        "MISSING_MODEL",
        "DUP_A",
        "CHAIN_C",
    ] {
        assert_eq!(
            library(constant),
            good,
            "{constant} reuses the good library"
        );
    }
    assert_eq!(library("TRUNCATED"), good[..4096]);
    for constant in [
        "WRONG_ABI",
        "ABI_V1",
        "NO_ENTRY",
        "UNDEFINED_SYMBOL",
        "PANIC_INIT",
        "ERR_INIT",
    ] {
        let bytes = library(constant);
        assert_ne!(bytes, good, "{constant}");
        if cfg!(target_os = "linux") {
            assert!(
                bytes.starts_with(ELF_MAGIC),
                "{constant} is a shared object"
            );
        }
    }
    assert!(!library("NOT_A_LIBRARY").starts_with(ELF_MAGIC));
    assert_eq!(zoo::DUP_A_NAME, zoo::DUP_B_NAME);
}
