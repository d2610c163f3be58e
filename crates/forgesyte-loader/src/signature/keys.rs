//! minisign keys and signatures: the operator's trusted public keys, the
//! bounded parsers of key and signature files, and the author's side
//! (generating a key pair, reading a secret key).
//!
//! Every parser here refuses input larger than its stated bound before
//! handing it to the `minisign` crate, and returns a one-line error. This
//! module knows nothing of plugins, lists or the load pipeline.

use std::fmt;
use std::path::{Path, PathBuf};

use minisign::{PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};

/// The largest public key file read (minisign's are about 100 bytes).
pub const MAX_PUBLIC_KEY_BYTES: usize = 1024;

/// The largest signature file read (minisign's are about 300 bytes plus
/// the trusted comment).
pub const MAX_SIGNATURE_BYTES: usize = 4096;

/// The largest secret key file read.
pub const MAX_SECRET_KEY_BYTES: usize = 4096;

/// The environment variable holding the password of an encrypted secret
/// key, for `forgesyte keygen` and `forgesyte sign`.
pub const PASSWORD_ENV: &str = "FORGESYTE_KEY_PASSWORD";

/// A key id as minisign prints it: 16 upper-case hex digits of the
/// little-endian key number.
pub fn key_id(keynum: &[u8]) -> String {
    let mut bytes = [0u8; 8];
    for (to, from) in bytes.iter_mut().zip(keynum) {
        *to = *from;
    }
    format!("{:016X}", u64::from_le_bytes(bytes))
}

fn text(bytes: &[u8], max: usize, what: &str) -> Result<String, String> {
    if bytes.len() > max {
        // Read capped (at most `max + 1` bytes): how much larger is not
        // known, and its length would be the cap's.
        return Err(format!("larger than the {max}-byte limit for {what}"));
    }
    String::from_utf8(bytes.to_vec()).map_err(|e| {
        format!(
            "{what} is not UTF-8 text (byte {})",
            e.utf8_error().valid_up_to()
        )
    })
}

/// Parses a minisign public key file (`untrusted comment: …` then the
/// base64 key; at most [`MAX_PUBLIC_KEY_BYTES`]).
///
/// # Errors
///
/// One line saying what is wrong.
pub fn parse_public_key(bytes: &[u8]) -> Result<PublicKey, String> {
    let text = text(bytes, MAX_PUBLIC_KEY_BYTES, "a public key")?;
    PublicKeyBox::from_string(&text)
        .and_then(PublicKeyBox::into_public_key)
        .map_err(|e| format!("not a minisign public key: {e}"))
}

/// Parses a minisign signature file (at most [`MAX_SIGNATURE_BYTES`]).
///
/// # Errors
///
/// One line saying what is wrong.
pub fn parse_signature(bytes: &[u8]) -> Result<SignatureBox, String> {
    use base64::Engine as _;
    let text = text(bytes, MAX_SIGNATURE_BYTES, "a signature")?;
    let signature =
        SignatureBox::from_string(&text).map_err(|e| format!("not a minisign signature: {e}"))?;
    // minisign 0.10 takes the global signature (the fourth line) at any
    // length and slices it as 64 bytes when verifying: a shorter one, under
    // a data signature that verifies, panicked there.
    let global = text.lines().nth(3).unwrap_or_default().trim();
    match base64::engine::general_purpose::STANDARD.decode(global) {
        Ok(bytes) if bytes.len() == 64 => Ok(signature),
        _ => Err("not a minisign signature: its global signature is not 64 bytes of base64".into()),
    }
}

/// What [`PASSWORD_ENV`] holds, for [`read_secret_key`]. Its `Debug` never
/// shows the password.
#[derive(Clone, PartialEq, Eq)]
pub enum Password {
    /// Not set.
    Unset,
    /// Set, to nothing: no password, but said as such (an empty value is
    /// more often a template's blank than a choice).
    Empty,
    /// A password.
    Given(String),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unset => "Unset",
            Self::Empty => "Empty",
            Self::Given(_) => "Given(<redacted>)",
        })
    }
}

/// Reads a secret key file (at most [`MAX_SECRET_KEY_BYTES`]): an
/// unencrypted one as it is, an encrypted one with `password` (never
/// prompted for).
///
/// # Errors
///
/// One line: unreadable, not a key, encrypted without a password (or with
/// an empty one), or the wrong password.
pub fn read_secret_key(path: &Path, password: Password) -> Result<SecretKey, String> {
    let bytes = read_capped(path, MAX_SECRET_KEY_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = text(&bytes, MAX_SECRET_KEY_BYTES, "a secret key")?;
    // A public key parses as a box too, and then fails as "failed to fill
    // whole buffer".
    if text.starts_with("untrusted comment: minisign public key") {
        return Err(format!(
            "{} is a public key (the .pub file); sign with the secret key beside it",
            path.display()
        ));
    }
    let key_box = SecretKeyBox::from_string(&text)
        .map_err(|e| format!("{} is not a minisign secret key ({e})", path.display()))?;
    let unencrypted = SecretKey::from_unencrypted_box(key_box.clone());
    match (unencrypted, password) {
        (Ok(key), _) => Ok(key),
        (Err(_), Password::Given(password)) => SecretKey::from_box(key_box, Some(password))
            .map_err(|e| format!("{}: {e}", path.display())),
        (Err(e), Password::Empty) => Err(format!(
            "{} is not an unencrypted minisign secret key ({e}), and {PASSWORD_ENV} is set, but \
             empty: set it to the key's password",
            path.display()
        )),
        (Err(e), Password::Unset) => Err(format!(
            "{} is not an unencrypted minisign secret key ({e}); for an encrypted key set {PASSWORD_ENV}",
            path.display()
        )),
    }
}

/// The operator's trusted public keys, by key id.
#[derive(Clone, Default)]
pub struct TrustedKeys {
    dir: Option<PathBuf>,
    keys: Vec<(String, PublicKey)>,
    /// Why `dir` could not be read (then no key is trusted).
    unreadable: Option<String>,
}

impl fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedKeys")
            .field("dir", &self.dir)
            .field("ids", &self.ids().collect::<Vec<_>>())
            .field("unreadable", &self.unreadable)
            .finish()
    }
}

impl TrustedKeys {
    /// Reads every `*.pub` file of `dir` (hidden files skipped).
    ///
    /// # Errors
    ///
    /// The directory cannot be listed, or a `*.pub` file cannot be read or
    /// is not a minisign public key (named): a misconfigured trust store
    /// is refused whole rather than half used.
    pub fn load(dir: &Path) -> Result<TrustedKeys, String> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| format!("cannot list trusted keys directory {}: {e}", dir.display()))?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|ext| ext == "pub")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        let mut keys: Vec<(String, PublicKey)> = Vec::new();
        let mut read_from: Vec<PathBuf> = Vec::new();
        for path in paths {
            let bytes = read_capped(&path, MAX_PUBLIC_KEY_BYTES)
                .map_err(|e| format!("cannot read trusted key {}: {e}", path.display()))?;
            let key = parse_public_key(&bytes)
                .map_err(|e| format!("trusted key {}: {e}", path.display()))?;
            let id = key_id(key.keynum());
            // Two keys of one id: which one a signature is checked with,
            // and which one a removed file revokes, would depend on the
            // files' order (a second key under a trusted key's id was
            // taken silently, and removing the first revoked nothing).
            // The same key twice is one key.
            if let Some(at) = keys.iter().position(|(known, _)| *known == id) {
                if keys[at].1.to_bytes() == key.to_bytes() {
                    continue;
                }
                return Err(format!(
                    "trusted keys {} and {} have the same key id {id} but are different keys: \
                     remove the one that is not the signer's",
                    read_from[at].display(),
                    path.display()
                ));
            }
            keys.push((id, key));
            read_from.push(path);
        }
        Ok(TrustedKeys {
            dir: Some(dir.to_path_buf()),
            keys,
            unreadable: None,
        })
    }

    /// The same store read again from its directory (`None` when it has
    /// none): what a rescan trusts. A directory that cannot be read now, or
    /// a key that cannot be parsed, gives a store of no keys (fail closed)
    /// and the error.
    pub fn reread(&self) -> Option<(TrustedKeys, Option<String>)> {
        let dir = self.dir.as_ref()?;
        Some(match TrustedKeys::load(dir) {
            Ok(keys) => (keys, None),
            Err(e) => (TrustedKeys::unreadable(dir, e.clone()), Some(e)),
        })
    }

    /// A store of `dir` that trusts no key yet: what a store that cannot be
    /// read (`why`) stands for (fail closed), read again by the next
    /// rescan; its reasons say why.
    pub fn unreadable(dir: &Path, why: String) -> TrustedKeys {
        TrustedKeys {
            dir: Some(dir.to_path_buf()),
            keys: Vec::new(),
            unreadable: Some(why),
        }
    }

    /// The ids of the keys trusted by one of `self` and `other` but not by
    /// both alike (added, removed, or the same id with other key bytes).
    pub fn differing_ids(&self, other: &TrustedKeys) -> std::collections::BTreeSet<String> {
        let bytes = |keys: &TrustedKeys| -> std::collections::BTreeMap<String, Vec<u8>> {
            keys.keys
                .iter()
                .map(|(id, key)| (id.clone(), key.to_bytes()))
                .collect()
        };
        let (a, b) = (bytes(self), bytes(other));
        a.keys()
            .chain(b.keys())
            .filter(|id| a.get(*id) != b.get(*id))
            .cloned()
            .collect()
    }

    /// The key of id `id`, if it is trusted.
    pub fn get(&self, id: &str) -> Option<&PublicKey> {
        self.keys.iter().find(|(k, _)| k == id).map(|(_, key)| key)
    }

    /// The ids of the trusted keys.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(id, _)| id.as_str())
    }

    /// Where they were read from, for reasons: `DIR`, or that none is
    /// configured.
    pub fn describe(&self) -> String {
        match (&self.dir, &self.unreadable) {
            (Some(dir), Some(why)) => format!(
                "the trusted keys of {}, of which none is trusted while they cannot be read ({why})",
                dir.display()
            ),
            (Some(dir), None) => format!("the trusted keys of {}", dir.display()),
            (None, _) => "the trusted keys (none configured: --trusted-keys)".to_owned(),
        }
    }
}

/// At most `max + 1` bytes of `path` (so that an oversized file is seen
/// as such without reading it whole), if it is a regular file: a FIFO
/// named `*.pub` waited for a writer, holding the start, or a rescan and
/// every reload after it, for good.
fn read_capped(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    use forgesyte_deps::FileSystem as _;
    forgesyte_deps::RealFs.read(path, max as u64)
}

/// A new key pair, written as `DIR/NAME.key` (mode 0600, never over an
/// existing file) and `DIR/NAME.pub`; the secret key is encrypted with
/// `password` when there is one. Returns both paths and the key id.
///
/// # Errors
///
/// One line: a file exists or cannot be written, or key generation failed.
pub fn keygen(
    dir: &Path,
    name: &str,
    password: Option<String>,
) -> Result<(PathBuf, PathBuf, String), String> {
    let pair = match password {
        Some(password) => minisign::KeyPair::generate_encrypted_keypair(Some(password)),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|e| format!("cannot generate a key pair: {e}"))?;
    let id = key_id(pair.pk.keynum());
    let secret = pair
        .sk
        .to_box(Some(&format!("forgesyte secret key {id}")))
        .map_err(|e| e.to_string())?
        .into_string();
    let public = pair.pk.to_box().map_err(|e| e.to_string())?.into_string();
    let key_path = dir.join(format!("{name}.key"));
    let pub_path = dir.join(format!("{name}.pub"));
    for path in [&key_path, &pub_path] {
        if path.exists() {
            return Err(format!("{} exists; not overwritten", path.display()));
        }
    }
    write_new_pair(
        dir,
        [(&key_path, &secret, 0o600), (&pub_path, &public, 0o644)],
    )?;
    Ok((key_path, pub_path, id))
}

/// Writes both files whole, or neither: each is written to a temporary
/// file in `dir` first, then moved to its name (never over an existing
/// file), and the first is removed again if the second cannot be. A full
/// disk left half a key pair (an empty `.pub`, or a secret key whose
/// public half was lost) that blocked the next try.
fn write_new_pair(dir: &Path, files: [(&Path, &str, u32); 2]) -> Result<(), String> {
    let cannot =
        |path: &Path, e: &dyn std::fmt::Display| format!("cannot write {}: {e}", path.display());
    let mut staged = Vec::with_capacity(2);
    for (path, text, mode) in files {
        let file = crate::integrity::staged(dir, ".forgesyte-keygen.", mode, text.as_bytes())
            .map_err(|e| cannot(path, &e))?;
        staged.push((path, file));
    }
    let mut placed: Vec<&Path> = Vec::with_capacity(2);
    for (path, file) in staged {
        if let Err(e) = file.persist_noclobber(path) {
            for done in placed {
                let _ = std::fs::remove_file(done);
            }
            return Err(cannot(path, &e.error));
        }
        placed.push(path);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The second file not written: the first is not left behind, and
    /// nothing of theirs stays in the directory.
    #[test]
    fn a_pair_is_written_whole_or_not_at_all() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("k.key");
        let public = tmp.path().join("missing-dir/k.pub");
        let err = write_new_pair(
            tmp.path(),
            [(&key, "secret", 0o600), (&public, "pub", 0o644)],
        )
        .unwrap_err();
        assert!(
            err.starts_with(&format!("cannot write {}", public.display())),
            "{err}"
        );
        assert!(!key.exists(), "half a pair left");
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        // Whole: both, with their modes.
        let public = tmp.path().join("k.pub");
        write_new_pair(
            tmp.path(),
            [(&key, "secret", 0o600), (&public, "pub", 0o644)],
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Never over an existing file.
        let err = write_new_pair(tmp.path(), [(&key, "other", 0o600), (&public, "x", 0o644)])
            .unwrap_err();
        assert!(err.contains("k.key"), "{err}");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "secret");
    }

    #[test]
    fn an_encrypted_key_needs_its_password() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, _, id) = keygen(tmp.path(), "locked", Some("s3cret".into())).unwrap();
        let err = read_secret_key(&key, Password::Unset).unwrap_err();
        assert!(err.contains(PASSWORD_ENV), "{err}");
        let err = read_secret_key(&key, Password::Empty).unwrap_err();
        assert!(
            err.ends_with(&format!(
                "{PASSWORD_ENV} is set, but empty: set it to the key's password"
            )),
            "{err}"
        );
        let err = read_secret_key(&key, Password::Given("wrong".into())).unwrap_err();
        assert!(err.ends_with("Wrong password for that key"), "{err}");
        let secret = read_secret_key(&key, Password::Given("s3cret".into())).unwrap();
        assert_eq!(
            format!("{:?}", Password::Given("s3cret".into())),
            "Given(<redacted>)"
        );
        assert_eq!(key_id(secret.keynum()), id);
    }

    #[test]
    fn key_ids_are_printed_as_minisign_prints_them() {
        assert_eq!(key_id(&[1, 0, 0, 0, 0, 0, 0, 0xab]), "AB00000000000001");
    }

    /// What a rescan compares: keys added, removed or replaced under the
    /// same id (the same file with other bytes); a store read again after
    /// it broke trusts none, and is still read from its directory.
    #[test]
    fn rereading_names_the_keys_that_differ() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, _, a) = keygen(tmp.path(), "a", None).unwrap();
        let before = TrustedKeys::load(tmp.path()).unwrap();
        let (_, b_pub, b) = keygen(tmp.path(), "b", None).unwrap();
        let (after, error) = before.reread().unwrap();
        assert_eq!(error, None);
        assert_eq!(before.differing_ids(&after), [b.clone()].into());
        assert_eq!(after.differing_ids(&before), [b.clone()].into());
        assert!(after.differing_ids(&after).is_empty());
        // `b`'s id, another key's bytes.
        let other = tempfile::tempdir().unwrap();
        let (_, c_pub, _) = keygen(other.path(), "c", None).unwrap();
        let c_text = std::fs::read_to_string(c_pub).unwrap();
        let b_text = std::fs::read_to_string(&b_pub).unwrap();
        let b_raw = PublicKeyBox::from_string(&b_text)
            .and_then(PublicKeyBox::into_public_key)
            .unwrap()
            .to_bytes();
        let mut c_raw = PublicKeyBox::from_string(&c_text)
            .and_then(PublicKeyBox::into_public_key)
            .unwrap()
            .to_bytes();
        // Algorithm (2 bytes), key number (8), key: the id is the number.
        c_raw[2..10].copy_from_slice(&b_raw[2..10]);
        let forged = PublicKey::from_bytes(&c_raw).unwrap();
        std::fs::write(
            &b_pub,
            format!("untrusted comment: same id\n{}\n", forged.to_base64()),
        )
        .unwrap();
        let (replaced, _) = after.reread().unwrap();
        assert_eq!(
            replaced.ids().collect::<Vec<_>>(),
            after.ids().collect::<Vec<_>>()
        );
        assert_eq!(after.differing_ids(&replaced), [b.clone()].into());
        // Broken: no key at all, the directory kept.
        std::fs::write(tmp.path().join("bad.pub"), "not a key\n").unwrap();
        let (broken, error) = replaced.reread().unwrap();
        assert!(error.is_some());
        assert_eq!(broken.ids().count(), 0);
        assert_eq!(broken.differing_ids(&replaced), [a, b].into());
        assert!(broken.reread().is_some());
        assert!(TrustedKeys::default().reread().is_none());
    }

    /// Two files of one key id but different keys refuse the store whole,
    /// naming both (the first by path was used and the second taken
    /// silently: removing the first revoked nothing); the same key twice
    /// is one key.
    #[test]
    fn two_keys_of_one_id_are_refused_and_one_key_twice_is_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, a_pub, a) = keygen(tmp.path(), "a", None).unwrap();
        let a_text = std::fs::read_to_string(&a_pub).unwrap();
        std::fs::write(tmp.path().join("a-copy.pub"), &a_text).unwrap();
        let store = TrustedKeys::load(tmp.path()).unwrap();
        assert_eq!(store.ids().collect::<Vec<_>>(), [a.as_str()]);
        let other = tempfile::tempdir().unwrap();
        let (_, c_pub, _) = keygen(other.path(), "c", None).unwrap();
        let raw = |path: &Path| {
            PublicKeyBox::from_string(&std::fs::read_to_string(path).unwrap())
                .and_then(PublicKeyBox::into_public_key)
                .unwrap()
                .to_bytes()
        };
        let mut forged = raw(&c_pub);
        forged[2..10].copy_from_slice(&raw(&a_pub)[2..10]);
        let forged = PublicKey::from_bytes(&forged).unwrap();
        let z_pub = tmp.path().join("z-forged.pub");
        std::fs::write(
            &z_pub,
            format!("untrusted comment: same id\n{}\n", forged.to_base64()),
        )
        .unwrap();
        let err = TrustedKeys::load(tmp.path()).unwrap_err();
        assert!(
            err.contains(&format!("the same key id {a}"))
                && err.contains("a-copy.pub")
                && err.contains("z-forged.pub"),
            "{err}"
        );
        let (reread, error) = store.reread().unwrap();
        assert_eq!(reread.ids().count(), 0, "fails closed");
        assert!(error.is_some());
    }

    #[test]
    fn a_generated_pair_is_trusted_and_signs() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, public, id) = keygen(tmp.path(), "author", None).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            std::fs::read_to_string(&public)
                .unwrap()
                .contains(&format!("minisign public key: {id}"))
        );
        let err = keygen(tmp.path(), "author", None).unwrap_err();
        assert!(err.ends_with("exists; not overwritten"), "{err}");
        let trusted = TrustedKeys::load(tmp.path()).unwrap();
        assert_eq!(trusted.ids().collect::<Vec<_>>(), [id.as_str()]);
        let secret = read_secret_key(&key, Password::Unset).unwrap();
        assert_eq!(key_id(secret.keynum()), id);
        // A bad key file refuses the whole store, naming the file.
        std::fs::write(tmp.path().join("bad.pub"), "untrusted comment: x\nAAAA\n").unwrap();
        let err = TrustedKeys::load(tmp.path()).unwrap_err();
        assert!(
            err.starts_with(&format!(
                "trusted key {}",
                tmp.path().join("bad.pub").display()
            )),
            "{err}"
        );
        // A public key for a secret one is named so.
        let err = read_secret_key(&public, Password::Unset).unwrap_err();
        assert!(err.contains("is a public key (the .pub file)"), "{err}");
        // An endless file (a device) is not read, and a regular file past
        // the limit is read no further than it.
        let err = read_secret_key(Path::new("/dev/zero"), Password::Unset).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let big = tmp.path().join("big.key");
        std::fs::write(&big, vec![b'x'; MAX_SECRET_KEY_BYTES + 10]).unwrap();
        let err = read_secret_key(&big, Password::Unset).unwrap_err();
        assert!(err.contains("larger than the"), "{err}");
    }
}
