//! Signing and checking real plugin directories (a temporary directory,
//! a fresh key pair), and the parsers under arbitrary bytes.

use std::path::{Path, PathBuf};

use forgesyte_deps::RealFs;
use proptest::prelude::*;

use super::keys::{self, MAX_PUBLIC_KEY_BYTES, MAX_SIGNATURE_BYTES};
use super::*;

struct Fixture {
    _tmp: tempfile::TempDir,
    plugin: PathBuf,
    trusted: TrustedKeys,
    secret: minisign::SecretKey,
    key_id: String,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let keys_dir = tmp.path().join("keys");
    std::fs::create_dir(&keys_dir).unwrap();
    let (key, _, key_id) = keys::keygen(&keys_dir, "author", None).unwrap();
    let plugin = tmp.path().join("hello");
    std::fs::create_dir_all(plugin.join("pkg")).unwrap();
    std::fs::write(plugin.join(MANIFEST_FILE), r#"{"name": "hello"}"#).unwrap();
    std::fs::write(plugin.join(PLUGIN_PY), "class Plugin:\n    pass\n").unwrap();
    std::fs::write(plugin.join("pkg/util.py"), "X = 1\n").unwrap();
    std::fs::write(plugin.join("README.md"), "not loaded\n").unwrap();
    Fixture {
        plugin,
        trusted: TrustedKeys::load(&keys_dir).unwrap(),
        secret: keys::read_secret_key(&key, keys::Password::Unset).unwrap(),
        key_id,
        _tmp: tmp,
    }
}

fn manifest_of(dir: &Path) -> Manifest {
    let path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&path).unwrap();
    manifest::parse_in(&bytes, &path, "hello", true).unwrap()
}

fn check_dir(f: &Fixture, keys: &TrustedKeys) -> Checked {
    check(&RealFs, &f.plugin, &manifest_of(&f.plugin), keys)
}

fn detail(c: &Checked) -> String {
    c.info.detail.clone().unwrap_or_default()
}

#[test]
fn a_signed_plugin_is_signed_with_its_key_id_and_digests() {
    let f = fixture();
    assert_eq!(
        check_dir(&f, &f.trusted).info.status,
        SignatureState::Unsigned
    );
    let outcome = sign_dir(&RealFs, &f.plugin, &f.secret).unwrap();
    assert_eq!(outcome.key_id, f.key_id);
    assert_eq!(outcome.files, ["manifest.json", "pkg/util.py", "plugin.py"]);
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(
        checked.info,
        SignatureInfo {
            status: SignatureState::Signed,
            key_id: Some(f.key_id.clone()),
            detail: None,
        }
    );
    assert_eq!(
        checked.digests["plugin.py"],
        integrity::file_digest(&RealFs, &f.plugin.join(PLUGIN_PY)).unwrap()
    );
    // A file the plugin does not load may change freely.
    std::fs::write(f.plugin.join("README.md"), "changed\n").unwrap();
    assert_eq!(
        check_dir(&f, &f.trusted).info.status,
        SignatureState::Signed
    );
}

/// A file whose name the list cannot hold is refused by `sign` itself
/// (it signed, and every check then refused the list), and nothing is
/// written.
#[test]
fn a_name_the_list_cannot_hold_is_refused_at_signing() {
    for name in ["a\\b.py", "a\rb.py"] {
        let f = fixture();
        std::fs::write(f.plugin.join(name), "").unwrap();
        let err = sign_dir(&RealFs, &f.plugin, &f.secret).unwrap_err();
        assert!(
            err.starts_with("cannot sign: a file's name cannot be listed (line "),
            "{err}"
        );
        assert!(err.contains("rename the file"), "{err}");
        assert!(!f.plugin.join(LIST_FILE).exists());
        assert!(!f.plugin.join(SIG_FILE).exists());
    }
}

#[test]
fn a_changed_added_or_missing_file_is_modified_and_named() {
    let f = fixture();
    sign_dir(&RealFs, &f.plugin, &f.secret).unwrap();
    std::fs::write(f.plugin.join("pkg/util.py"), "X = 2\n").unwrap();
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(checked.info.status, SignatureState::Modified);
    assert_eq!(checked.info.key_id.as_deref(), Some(f.key_id.as_str()));
    assert!(
        detail(&checked).starts_with("pkg/util.py changed after signing (sha256 now "),
        "{checked:?}"
    );
    assert!(checked.digests.is_empty());

    sign_dir(&RealFs, &f.plugin, &f.secret).unwrap();
    std::fs::write(f.plugin.join("pkg/new.py"), "").unwrap();
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(checked.info.status, SignatureState::Modified);
    assert_eq!(detail(&checked), "pkg/new.py is not in the signed list");

    std::fs::remove_file(f.plugin.join("pkg/new.py")).unwrap();
    std::fs::remove_file(f.plugin.join("pkg/util.py")).unwrap();
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(detail(&checked), "pkg/util.py is listed but missing");
}

/// A plugin that ships its signature files as links (to the signer's own
/// key, say) gets them replaced by signing, never written through.
#[test]
fn signing_replaces_shipped_links_and_never_writes_through_them() {
    let f = fixture();
    let victim = f.plugin.parent().unwrap().join("signers-secret.key");
    std::fs::write(&victim, "precious\n").unwrap();
    for name in [LIST_FILE, SIG_FILE] {
        std::os::unix::fs::symlink(&victim, f.plugin.join(name)).unwrap();
    }
    sign_dir(&RealFs, &f.plugin, &f.secret).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    for name in [LIST_FILE, SIG_FILE] {
        let meta = std::fs::symlink_metadata(f.plugin.join(name)).unwrap();
        assert!(meta.is_file(), "{name} is still a link");
    }
    assert_eq!(
        check_dir(&f, &f.trusted).info.status,
        SignatureState::Signed
    );
    // Nothing left beside them.
    let left: Vec<_> = std::fs::read_dir(&f.plugin)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A trust store that cannot be read at a rescan trusts no key, and the
/// reason says so and why (it said the signer's key, still in the
/// directory, was not among the trusted keys).
#[test]
fn a_store_unreadable_at_a_rescan_says_why_it_trusts_no_key() {
    let f = fixture();
    sign_dir(&RealFs, &f.plugin, &f.secret).unwrap();
    let dir = f.plugin.parent().unwrap().join("keys");
    std::fs::write(dir.join("junk.pub"), "junk\n").unwrap();
    let (store, error) = f.trusted.reread().unwrap();
    let error = error.unwrap();
    assert!(error.contains("junk.pub"), "{error}");
    let checked = check_dir(&f, &store);
    assert_eq!(checked.info.status, SignatureState::Invalid);
    let detail = detail(&checked);
    assert!(
        detail.contains("of which none is trusted while they cannot be read (")
            && detail.contains("junk.pub"),
        "{detail}"
    );
    // Readable again: trusted again.
    std::fs::remove_file(dir.join("junk.pub")).unwrap();
    let (store, error) = store.reread().unwrap();
    assert_eq!(error, None);
    assert_eq!(check_dir(&f, &store).info.status, SignatureState::Signed);
}

#[test]
fn bad_signatures_untrusted_keys_and_half_signatures_are_invalid() {
    let f = fixture();
    sign_dir(&RealFs, &f.plugin, &f.secret).unwrap();
    // Untrusted: no key configured, or another key.
    let checked = check_dir(&f, &TrustedKeys::default());
    assert_eq!(checked.info.status, SignatureState::Invalid);
    assert_eq!(checked.info.key_id.as_deref(), Some(f.key_id.as_str()));
    assert!(
        detail(&checked).contains("which is not among the trusted keys"),
        "{checked:?}"
    );
    let other = tempfile::tempdir().unwrap();
    keys::keygen(other.path(), "other", None).unwrap();
    let checked = check_dir(&f, &TrustedKeys::load(other.path()).unwrap());
    assert_eq!(checked.info.status, SignatureState::Invalid);

    // The list changed after it was signed (a digest edited to match a
    // changed file): the signature no longer verifies.
    let list_path = f.plugin.join(LIST_FILE);
    let list = std::fs::read_to_string(&list_path).unwrap();
    let forged = list.replacen(&list[..1], if &list[..1] == "0" { "1" } else { "0" }, 1);
    std::fs::write(&list_path, &forged).unwrap();
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(checked.info.status, SignatureState::Invalid);
    assert!(
        detail(&checked).starts_with(&format!(
            "the signature of {LIST_FILE} does not verify with key {}",
            f.key_id
        )),
        "{checked:?}"
    );

    // The global signature (the comment's) cut short under a data
    // signature that verifies: refused, where minisign panicked.
    std::fs::write(&list_path, &list).unwrap();
    let sig_path = f.plugin.join(SIG_FILE);
    let sig = std::fs::read_to_string(&sig_path).unwrap();
    assert_eq!(
        check_dir(&f, &f.trusted).info.status,
        SignatureState::Signed
    );
    let mut lines: Vec<&str> = sig.lines().collect();
    lines[3] = "AAAA";
    std::fs::write(&sig_path, lines.join("\n") + "\n").unwrap();
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(checked.info.status, SignatureState::Invalid);
    assert!(detail(&checked).contains("global signature"), "{checked:?}");

    // A signature file that is not one.
    std::fs::write(f.plugin.join(SIG_FILE), "garbage\n").unwrap();
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(checked.info.status, SignatureState::Invalid);
    assert!(detail(&checked).starts_with(SIG_FILE), "{checked:?}");

    // Half a signature.
    std::fs::remove_file(f.plugin.join(SIG_FILE)).unwrap();
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(detail(&checked), format!("{SIG_FILE} is missing"));
    assert_eq!(checked.info.status, SignatureState::Invalid);
}

#[test]
fn an_oversized_signature_is_refused_before_it_is_parsed() {
    let f = fixture();
    sign_dir(&RealFs, &f.plugin, &f.secret).unwrap();
    std::fs::write(
        f.plugin.join(SIG_FILE),
        vec![b'u'; MAX_SIGNATURE_BYTES + 10],
    )
    .unwrap();
    let checked = check_dir(&f, &f.trusted);
    assert_eq!(checked.info.status, SignatureState::Invalid);
    assert_eq!(
        detail(&checked),
        format!("{SIG_FILE} is larger than the {MAX_SIGNATURE_BYTES}-byte limit")
    );
}

fn one_line_reason(err: &str) -> Result<(), TestCaseError> {
    prop_assert!(!err.is_empty() && !err.contains('\n'), "{err:?}");
    Ok(())
}

/// Arbitrary bytes, or a valid file with bytes flipped, cut or appended.
fn damaged(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        (
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(move |(flips, cut, tail)| {
                let mut bytes = valid.clone();
                for (at, byte) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
                bytes.truncate(cut.index(bytes.len() + 1));
                bytes.extend(tail);
                bytes
            }),
    ]
}

fn valid_files() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let f = fixture();
    sign_dir(&RealFs, &f.plugin, &f.secret).unwrap();
    let read = |name: &str| std::fs::read(f.plugin.join(name)).unwrap();
    let public = minisign::PublicKey::from_secret_key(&f.secret)
        .unwrap()
        .to_box()
        .unwrap()
        .into_string();
    (read(LIST_FILE), read(SIG_FILE), public.into_bytes())
}

proptest! {
    // Each case parses at most a few KiB in memory: 512 cases of each
    // parser take well under a second.
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The list parser never panics, and anything it refuses has a
    /// one-line reason; anything it accepts reads back to the same bytes.
    #[test]
    fn the_list_parser_ends_in_a_value_or_a_reason(bytes in damaged(valid_files().0)) {
        match list::parse_list(&bytes) {
            Ok(files) => {
                let text = list::format_list(&files);
                prop_assert_eq!(text.as_bytes(), &bytes[..]);
            }
            Err(e) => one_line_reason(&e.to_string())?,
        }
    }

    /// The signature and public key parsers never panic and give a
    /// one-line reason for what they refuse.
    #[test]
    fn the_key_and_signature_parsers_end_in_a_value_or_a_reason(
        sig in damaged(valid_files().1),
        public in damaged(valid_files().2),
    ) {
        if let Err(e) = keys::parse_signature(&sig) {
            one_line_reason(&e)?;
        }
        if let Err(e) = keys::parse_public_key(&public) {
            one_line_reason(&e)?;
        }
    }

    /// Input over the stated bounds is refused by its size alone.
    #[test]
    fn oversized_input_is_refused_by_size(extra in 1usize..4096, byte in any::<u8>()) {
        let sig = vec![byte; MAX_SIGNATURE_BYTES + extra];
        prop_assert!(keys::parse_signature(&sig).err().is_some_and(|e| e.contains("limit")));
        let public = vec![byte; MAX_PUBLIC_KEY_BYTES + extra];
        prop_assert!(keys::parse_public_key(&public).unwrap_err().contains("limit"));
        let list = vec![byte; list::MAX_LIST_BYTES + extra];
        prop_assert!(list::parse_list(&list).unwrap_err().what.contains("limit"));
    }
}
