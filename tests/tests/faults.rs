//! The fault fixtures of process isolation are on disk beside the zoo (not
//! in it): each directory holds a manifest naming the `faulty` library,
//! isolated except the preflight one. (How each one fails is tested with
//! real runner processes in `forgesyte-loader`'s `isolation` tests, where
//! the runner binary is built.)

use std::path::Path;

use forgesyte_tests::zoo;

#[test]
fn fault_fixtures_are_laid_out_beside_the_zoo() {
    assert_ne!(Path::new(zoo::FAULTS_DIR), Path::new(zoo::ZOO_DIR));
    assert_eq!(zoo::FAULTS.len(), 9);
    let faulty = std::fs::read(zoo::FAULTY_LIBRARY).unwrap();
    assert_eq!(&faulty[..4], b"\x7fELF");
    for fixture in zoo::FAULTS {
        let dir = Path::new(fixture.dir);
        assert_eq!(
            dir.parent(),
            Some(Path::new(zoo::FAULTS_DIR)),
            "{fixture:?}"
        );
        let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
        let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(manifest["name"], fixture.name, "{fixture:?}");
        assert_eq!(manifest["entrypoint"], "libfixture_faulty.so");
        assert_eq!(std::fs::read(dir.join(fixture.library)).unwrap(), faulty);
        let isolation = if fixture.constant == "PREFLIGHT_SEGV" {
            assert_eq!(manifest["preflight"], true);
            "in-process"
        } else {
            "process"
        };
        assert_eq!(manifest["isolation"], isolation, "{fixture:?}");
        if let Some(fault) = fixture.constant.strip_prefix("INIT_") {
            assert_eq!(
                manifest["config"]["fault_at_init"],
                fault.to_lowercase(),
                "{fixture:?}"
            );
        }
    }
    assert_eq!(zoo::FAULTY_NAME, "faulty");
    assert_eq!(zoo::INIT_HANG_NAME, "init-hang");
}
