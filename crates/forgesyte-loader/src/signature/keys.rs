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
        return Err(format!(
            "{} bytes, larger than the {max}-byte limit for {what}",
            bytes.len()
        ));
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
    let text = text(bytes, MAX_SIGNATURE_BYTES, "a signature")?;
    SignatureBox::from_string(&text).map_err(|e| format!("not a minisign signature: {e}"))
}

/// Reads a secret key file (at most [`MAX_SECRET_KEY_BYTES`]): an
/// unencrypted one as it is, an encrypted one with `password` (never
/// prompted for).
///
/// # Errors
///
/// One line: unreadable, not a key, encrypted without a password, or the
/// wrong password.
pub fn read_secret_key(path: &Path, password: Option<String>) -> Result<SecretKey, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = text(&bytes, MAX_SECRET_KEY_BYTES, "a secret key")?;
    let key_box = SecretKeyBox::from_string(&text).map_err(|e| e.to_string())?;
    let unencrypted = SecretKey::from_unencrypted_box(key_box.clone());
    match (unencrypted, password) {
        (Ok(key), _) => Ok(key),
        (Err(_), Some(password)) => SecretKey::from_box(key_box, Some(password))
            .map_err(|e| format!("{}: {e}", path.display())),
        (Err(e), None) => Err(format!(
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
}

impl fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedKeys")
            .field("dir", &self.dir)
            .field("ids", &self.ids().collect::<Vec<_>>())
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
        let mut keys = Vec::new();
        for path in paths {
            let bytes = read_capped(&path, MAX_PUBLIC_KEY_BYTES)
                .map_err(|e| format!("cannot read trusted key {}: {e}", path.display()))?;
            let key = parse_public_key(&bytes)
                .map_err(|e| format!("trusted key {}: {e}", path.display()))?;
            keys.push((key_id(key.keynum()), key));
        }
        Ok(TrustedKeys {
            dir: Some(dir.to_path_buf()),
            keys,
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
            Err(e) => (
                TrustedKeys {
                    dir: Some(dir.clone()),
                    keys: Vec::new(),
                },
                Some(e),
            ),
        })
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
        match &self.dir {
            Some(dir) => format!("the trusted keys of {}", dir.display()),
            None => "the trusted keys (none configured: --trusted-keys)".to_owned(),
        }
    }
}

/// At most `max + 1` bytes of `path` (so that an oversized file is seen
/// as such without reading it whole).
fn read_capped(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
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
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

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
    let write = |path: &Path, text: &str, mode: u32| -> Result<(), String> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(&key_path, &secret, 0o600)?;
    write(&pub_path, &public, 0o644)?;
    Ok((key_path, pub_path, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encrypted_key_needs_its_password() {
        let tmp = tempfile::tempdir().unwrap();
        let (key, _, id) = keygen(tmp.path(), "locked", Some("s3cret".into())).unwrap();
        let err = read_secret_key(&key, None).unwrap_err();
        assert!(err.contains(PASSWORD_ENV), "{err}");
        let err = read_secret_key(&key, Some("wrong".into())).unwrap_err();
        assert!(err.ends_with("Wrong password for that key"), "{err}");
        let secret = read_secret_key(&key, Some("s3cret".into())).unwrap();
        assert_eq!(key_id(secret.keynum()), id);
    }

    #[test]
    fn key_ids_are_printed_as_minisign_prints_them() {
        assert_eq!(key_id(&[1, 0, 0, 0, 0, 0, 0, 0xab]), "AB00000000000001");
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
        let secret = read_secret_key(&key, None).unwrap();
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
        let err = read_secret_key(&public, None).unwrap_err();
        assert!(err.contains(PASSWORD_ENV), "{err}");
    }
}
